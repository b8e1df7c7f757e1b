//! Per-subscriber discovery statistics, kept where the metrics endpoint can read them.
//!
//! Updates happen a few times per push, so a mutex per subscriber is cheap and keeps the
//! values consistent with each other (a push count never runs ahead of its nonce).
//! [`Totals`] adds up every subscriber that ever connected, for Prometheus counters that
//! must never go down when a proxy disconnects.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// Nonces remembered while waiting for their ACK; older ones are forgotten.
const MAX_PENDING: usize = 32;

/// A copy of one subscriber's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Stream id, unique in this controller's lifetime.
    pub id: u64,
    /// `ztunnel node=...` or `waypoint gateway=...`.
    pub proxy: String,
    /// Where the proxy serves Prometheus metrics: the stream's peer address with the port
    /// it announced (`ambit-metrics-port`); `None` when it announced none.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Pushes queued for the proxy (full and incremental).
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Model version of the latest push queued.
    pub version_sent: u64,
    /// Model version of the latest push ACKed.
    pub version_acked: u64,
    /// Time from queueing the latest ACKed push to its ACK.
    pub last_ack_latency: Option<Duration>,
    /// Nonce and reason of the latest NACK.
    pub last_nack: Option<(String, String)>,
}

/// Counters over all subscribers, past and present. Clones share the values.
#[derive(Clone, Debug)]
pub struct Totals {
    /// Pushes queued (full and incremental).
    pub pushes: Counter,
    /// Pushes refused by the proxy.
    pub nacks: Counter,
    /// Seconds from queueing a push to its ACK: delivery plus the proxy applying it.
    pub push_duration: Histogram,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            pushes: Counter::default(),
            nacks: Counter::default(),
            // 1 ms to ~16 s: a push is normally applied in milliseconds; seconds mean a
            // slow or stuck proxy.
            push_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
        }
    }
}

impl Totals {
    /// Registers `ambit_pushes_total`, `ambit_nacks_total` and
    /// `ambit_push_duration_seconds`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ambit_pushes",
            "Discovery pushes queued",
            self.pushes.clone(),
        );
        registry.register(
            "ambit_nacks",
            "Discovery pushes refused by proxies",
            self.nacks.clone(),
        );
        registry.register_with_unit(
            "ambit_push_duration",
            "Time from queueing a discovery push to the proxy's ACK",
            prometheus_client::registry::Unit::Seconds,
            self.push_duration.clone(),
        );
    }
}

#[derive(Debug)]
struct State {
    stats: SubscriberStats,
    /// (nonce, version, when queued), oldest first.
    pending: VecDeque<(String, u64, Instant)>,
}

/// One subscriber's statistics.
#[derive(Debug)]
pub struct SubscriberMetrics {
    state: Mutex<State>,
    totals: Totals,
}

impl SubscriberMetrics {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop metrics; the data stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> SubscriberStats {
        self.lock().stats.clone()
    }

    pub(crate) fn pushed(&self, nonce: &str, version: u64) {
        self.totals.pushes.inc();
        let mut s = self.lock();
        s.stats.pushes += 1;
        s.stats.version_sent = version;
        if s.pending.len() == MAX_PENDING {
            s.pending.pop_front();
        }
        s.pending
            .push_back((nonce.to_string(), version, Instant::now()));
    }

    /// Records an ACK; returns false for a nonce we do not know (never sent or too old).
    pub(crate) fn acked(&self, nonce: &str) -> bool {
        let mut s = self.lock();
        let Some(i) = s.pending.iter().position(|(n, _, _)| n == nonce) else {
            return false;
        };
        // An ACK covers everything sent before it too.
        let drained: Vec<_> = s.pending.drain(..=i).collect();
        if let Some((_, version, at)) = drained.last() {
            s.stats.acks += 1;
            s.stats.version_acked = *version;
            s.stats.last_ack_latency = Some(at.elapsed());
            self.totals
                .push_duration
                .observe(at.elapsed().as_secs_f64());
        }
        true
    }

    pub(crate) fn nacked(&self, nonce: &str, reason: &str) {
        self.totals.nacks.inc();
        let mut s = self.lock();
        s.stats.nacks += 1;
        s.stats.last_nack = Some((nonce.to_string(), reason.to_string()));
        if let Some(i) = s.pending.iter().position(|(n, _, _)| n == nonce) {
            s.pending.drain(..=i);
        }
    }
}

/// Every connected subscriber's metrics. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    subscribers: Arc<Mutex<BTreeMap<u64, Arc<SubscriberMetrics>>>>,
    totals: Totals,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<SubscriberMetrics>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters over every subscriber so far.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Statistics of every connected subscriber, by id.
    pub fn snapshot(&self) -> Vec<SubscriberStats> {
        self.lock().values().map(|m| m.stats()).collect()
    }

    pub(crate) fn register(
        &self,
        id: u64,
        proxy: String,
        metrics_addr: Option<std::net::SocketAddr>,
    ) -> Registration {
        let metrics = Arc::new(SubscriberMetrics {
            state: Mutex::new(State {
                stats: SubscriberStats {
                    id,
                    proxy,
                    metrics_addr,
                    ..SubscriberStats::default()
                },
                pending: VecDeque::new(),
            }),
            totals: self.totals.clone(),
        });
        self.lock().insert(id, metrics.clone());
        Registration {
            registry: self.clone(),
            id,
            metrics,
        }
    }
}

/// A subscriber's entry; removed from the registry when dropped (the stream ended).
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Registry,
    id: u64,
    pub metrics: Arc<SubscriberMetrics>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
