//! Outlier detection: an endpoint that fails `N` times in a row (5xx, or gateway errors:
//! 502/503/504 and connection failures) is ejected for `baseEjectionTime × times ejected`,
//! unless that would eject more than `maxEjectionPercent` of the service's endpoints (one
//! ejection is always allowed when none is active, as in Envoy). It comes back lazily: the
//! next pick after its ejection ends sees it healthy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Detection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// Longest ejection, whatever the count (Envoy's default cap).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Clone, Copy)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// What a result was, for detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Status(u16),
    ConnectFailure,
}

/// Detector of one service.
#[derive(Debug)]
pub struct Detector {
    config: Config,
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
}

impl Detector {
    pub fn new(config: Config) -> Self {
        Detector {
            config,
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        match self.endpoints.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// True when `ep` is ejected at `now`.
    pub fn is_ejected(&self, ep: SocketAddr, now: Instant) -> bool {
        self.lock()
            .get(&ep)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Records a result of `ep`, one of `total` endpoints; returns true if it was ejected now.
    pub fn observe(&self, ep: SocketAddr, obs: Observation, total: usize, now: Instant) -> bool {
        let mut map = self.lock();
        let ejected_now = map
            .iter()
            .filter(|(addr, s)| **addr != ep && s.ejected_until.is_some_and(|u| now < u))
            .count();
        let state = map.entry(ep).or_default();
        let (is_5xx, is_gateway) = match obs {
            Observation::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
            Observation::ConnectFailure => (true, true),
        };
        if is_5xx {
            state.consecutive_5xx += 1;
        } else {
            state.consecutive_5xx = 0;
        }
        if is_gateway {
            state.consecutive_gateway += 1;
        } else {
            state.consecutive_gateway = 0;
        }
        if !is_5xx {
            return false;
        }
        let tripped = self
            .config
            .consecutive_5xx
            .is_some_and(|n| state.consecutive_5xx >= n)
            || self
                .config
                .consecutive_gateway
                .is_some_and(|n| state.consecutive_gateway >= n);
        let already = state.ejected_until.is_some_and(|u| now < u);
        let within_share = ejected_now == 0
            || (ejected_now + 1) * 100 <= total.max(1) * self.config.max_ejection_percent as usize;
        if !tripped || already || !within_share {
            return false;
        }
        state.ejections += 1;
        let time = self
            .config
            .base_ejection
            .saturating_mul(state.ejections)
            .min(MAX_EJECTION);
        state.ejected_until = Some(now + time);
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn eject_and_return() {
        let d = Detector::new(Config {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        });
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let t0 = Instant::now();
        assert!(!d.observe(a, Observation::Status(503), 2, t0));
        assert!(!d.observe(a, Observation::Status(200), 2, t0));
        assert!(!d.observe(a, Observation::Status(500), 2, t0));
        assert!(!d.observe(a, Observation::Status(500), 2, t0));
        assert!(d.observe(a, Observation::ConnectFailure, 2, t0));
        assert!(d.is_ejected(a, t0 + Duration::from_secs(9)));
        // The other endpoint cannot be ejected too: 2 of 2 is over 50%.
        for _ in 0..5 {
            assert!(!d.observe(b, Observation::Status(500), 2, t0));
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(!d.is_ejected(a, t1));
        // Second ejection lasts twice as long.
        for _ in 0..3 {
            d.observe(a, Observation::Status(500), 2, t1);
        }
        assert!(d.is_ejected(a, t1 + Duration::from_secs(19)));
        assert!(!d.is_ejected(a, t1 + Duration::from_secs(20)));
    }
}
