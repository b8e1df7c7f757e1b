//! What the waypoint remembers per destination service between requests: circuit breaker,
//! rate-limit buckets, outlier detection, retry budget, round-robin turn and requests in
//! flight per endpoint. It outlives state updates while the service's TrafficPolicy is
//! unchanged, and is the only mutable state requests share (the decision reads it only
//! through [`RateLimits`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::decision::RateLimits;
use crate::resilience::{circuit, outlier, ratelimit, Settings};
use crate::route::retry;
use crate::state::State;

/// Per-service runtime states kept before those of vanished services are dropped.
const MAX_RUNTIMES: usize = 4096;

/// Runtime state of one destination service.
#[derive(Debug)]
pub(crate) struct ServiceRuntime {
    pub(crate) settings: Arc<Settings>,
    pub(crate) breaker: circuit::Breaker,
    pub(crate) limiter: Option<ratelimit::Limiter>,
    pub(crate) outlier: Option<outlier::Detector>,
    pub(crate) budget: Arc<retry::Budget>,
    pub(crate) rr: AtomicUsize,
    pub(crate) active: Mutex<HashMap<SocketAddr, usize>>,
}

impl ServiceRuntime {
    pub(crate) fn new(settings: Arc<Settings>) -> Self {
        ServiceRuntime {
            breaker: circuit::Breaker::new(settings.circuit.as_ref()),
            limiter: settings.rate_limit.clone().map(ratelimit::Limiter::new),
            outlier: settings.outlier.clone().map(outlier::Detector::new),
            budget: Arc::default(),
            rr: AtomicUsize::new(0),
            active: Mutex::default(),
            settings,
        }
    }
}

/// The runtime states of every service, by service key. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Runtimes {
    map: Arc<Mutex<HashMap<String, Arc<ServiceRuntime>>>>,
}

impl Runtimes {
    /// The runtime of service `key` under `state`'s traffic policy (a new one when the
    /// policy changed).
    pub(crate) fn get(&self, state: &State, key: &str) -> Arc<ServiceRuntime> {
        let settings = state.settings(key).cloned().unwrap_or_default();
        let mut map = lock(&self.map);
        if map.len() > MAX_RUNTIMES {
            // Services come and go; drop the runtime state of those no longer known.
            map.retain(|k, _| state.service(k).is_some());
        }
        match map.get(key) {
            Some(rt) if rt.settings == settings => rt.clone(),
            _ => {
                let rt = Arc::new(ServiceRuntime::new(settings));
                map.insert(key.to_string(), rt.clone());
                rt
            }
        }
    }

    /// The token buckets as a decision on `state` consults them.
    pub(crate) fn limits<'a>(&'a self, state: &'a State) -> Buckets<'a> {
        Buckets {
            runtimes: self,
            state,
        }
    }
}

/// The rate limiters of [`Runtimes`], for one decision.
pub(crate) struct Buckets<'a> {
    runtimes: &'a Runtimes,
    state: &'a State,
}

impl RateLimits for Buckets<'_> {
    fn check(&self, service_key: &str, principal: &str) -> ratelimit::Decision {
        match &self.runtimes.get(self.state, service_key).limiter {
            Some(limiter) => limiter.check(principal, Instant::now()),
            None => ratelimit::Decision::Allowed,
        }
    }
}

/// Critical sections here are a few instructions that cannot panic half-way, so a poisoned
/// lock still holds consistent data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
