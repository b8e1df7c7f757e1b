//! The limits that keep one pod (or a peer flooding one pod) from taking the node's mesh
//! down: caps on open proxied connections and on concurrent TLS handshakes, per pod and per
//! node; the timeouts of connections that never send or go idle; and the descriptor budget
//! those caps are sized from.
//!
//! - [`Limits`]: the configured figures (flags in `config.rs`, defaults and their reasons in
//!   `ARCHITECTURE.md`).
//! - [`NodeLimits`]: shared by every pod's proxies; [`PodLimits`]: one per enrolled pod. A
//!   new connection needs a permit from both ([`ConnectionPermit`]), held for its life, so a
//!   pod at its cap is refused while the node still has room for everyone else.
//! - [`Refused`]: why a connection was refused, as a metric label and a log cause.
//! - [`Activity`]: tracks the last byte of a proxied connection for the first-byte and idle
//!   timeouts.
//! - [`raise_nofile`]: RLIMIT_NOFILE to its hard limit at start; the node caps are then
//!   clamped so that a [`Limits::descriptor_reserve`] stays free for the operations ports,
//!   discovery, certificates and the namespace workers.
//!
//! Over a cap the new connection is reset at once (`SO_LINGER 0`, then closed): nothing is
//! read from it, nothing is dialled, and the connections already open are untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Why the descriptor limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// `getrlimit(RLIMIT_NOFILE)` failed.
    #[error("cannot read RLIMIT_NOFILE")]
    Get(#[source] nix::Error),
    /// `setrlimit(RLIMIT_NOFILE)` to the hard limit failed.
    #[error("cannot raise RLIMIT_NOFILE from {soft} to its hard limit {hard}")]
    Set {
        /// The soft limit we started with.
        soft: u64,
        /// The hard limit we asked for.
        hard: u64,
        #[source]
        source: nix::Error,
    },
}

/// The configured limits. Every figure is a flag; the defaults' reasons are in
/// `ARCHITECTURE.md` ("Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open proxied connections per pod and direction (its outbound on 15001; its inbound on
    /// 15006 plus HBONE streams on 15008).
    pub pod_connections: usize,
    /// Open proxied connections on the whole node (all pods, both directions, plus HBONE
    /// connections on 15008). Clamped to the descriptor budget at start.
    pub node_connections: usize,
    /// Concurrent TLS handshakes on one pod's HBONE listener.
    pub pod_handshakes: usize,
    /// Concurrent TLS handshakes on the whole node.
    pub node_handshakes: usize,
    /// A proxied connection on which neither side has sent a byte by then is closed.
    pub first_byte_timeout: Duration,
    /// A plaintext inbound connection (15006) that carries no byte either way for this long is
    /// closed.
    pub plaintext_idle_timeout: Duration,
    /// Descriptors kept out of the connection budget, for everything that is not a proxied
    /// connection.
    pub descriptor_reserve: u64,
    /// At most one log line per cause of refusal or failure per this interval.
    pub log_interval: Duration,
    /// Open outbound UDP flows (one per 5-tuple) per pod.
    pub pod_udp_flows: usize,
    /// A UDP flow without a datagram either way for this long is closed.
    pub udp_idle_timeout: Duration,
}

// The defaults; their reasons are in ARCHITECTURE.md ("Limits").
const DEFAULT_POD_CONNECTIONS: usize = 4096;
const DEFAULT_NODE_CONNECTIONS: usize = 32768;
const DEFAULT_POD_HANDSHAKES: usize = 128;
const DEFAULT_NODE_HANDSHAKES: usize = 512;
const DEFAULT_FIRST_BYTE_SECONDS: u64 = 30;
const DEFAULT_PLAINTEXT_IDLE_SECONDS: u64 = 3600;
const DEFAULT_DESCRIPTOR_RESERVE: u64 = 1024;
const DEFAULT_POD_UDP_FLOWS: usize = 1024;
const DEFAULT_UDP_IDLE_SECONDS: u64 = 60;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pod_connections: DEFAULT_POD_CONNECTIONS,
            node_connections: DEFAULT_NODE_CONNECTIONS,
            pod_handshakes: DEFAULT_POD_HANDSHAKES,
            node_handshakes: DEFAULT_NODE_HANDSHAKES,
            first_byte_timeout: Duration::from_secs(DEFAULT_FIRST_BYTE_SECONDS),
            plaintext_idle_timeout: Duration::from_secs(DEFAULT_PLAINTEXT_IDLE_SECONDS),
            descriptor_reserve: DEFAULT_DESCRIPTOR_RESERVE,
            log_interval: ambit_hbone::throttle::DEFAULT_INTERVAL,
            pod_udp_flows: DEFAULT_POD_UDP_FLOWS,
            udp_idle_timeout: Duration::from_secs(DEFAULT_UDP_IDLE_SECONDS),
        }
    }
}

/// The limits on the command line (flattened into ztunnel's `Args`; every flag is also an
/// environment variable).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LimitArgs {
    /// Open proxied connections per pod and direction; a new one over it is reset.
    #[arg(long, default_value_t = DEFAULT_POD_CONNECTIONS, env = "AMBIT_POD_CONNECTION_LIMIT")]
    pub pod_connection_limit: usize,
    /// Open proxied connections on the node (lowered at start to fit the descriptor limit
    /// minus --descriptor-reserve, two descriptors per connection).
    #[arg(long, default_value_t = DEFAULT_NODE_CONNECTIONS, env = "AMBIT_NODE_CONNECTION_LIMIT")]
    pub node_connection_limit: usize,
    /// TLS handshakes in progress per pod on its HBONE listener (15008).
    #[arg(long, default_value_t = DEFAULT_POD_HANDSHAKES, env = "AMBIT_POD_HANDSHAKE_LIMIT")]
    pub pod_handshake_limit: usize,
    /// TLS handshakes in progress on the node.
    #[arg(long, default_value_t = DEFAULT_NODE_HANDSHAKES, env = "AMBIT_NODE_HANDSHAKE_LIMIT")]
    pub node_handshake_limit: usize,
    /// Seconds a proxied connection may stay without a byte either way before its first.
    #[arg(long, default_value_t = DEFAULT_FIRST_BYTE_SECONDS, env = "AMBIT_FIRST_BYTE_TIMEOUT_SECONDS")]
    pub first_byte_timeout_seconds: u64,
    /// Seconds a plaintext inbound connection (15006) may carry no byte either way.
    #[arg(long, default_value_t = DEFAULT_PLAINTEXT_IDLE_SECONDS, env = "AMBIT_PLAINTEXT_IDLE_TIMEOUT_SECONDS")]
    pub plaintext_idle_timeout_seconds: u64,
    /// Descriptors kept out of the connection budget (ops ports, discovery, certificates).
    #[arg(long, default_value_t = DEFAULT_DESCRIPTOR_RESERVE, env = "AMBIT_DESCRIPTOR_RESERVE")]
    pub descriptor_reserve: u64,
    /// Seconds between two log lines of the same refusal or failure cause.
    #[arg(long, default_value_t = ambit_hbone::throttle::DEFAULT_INTERVAL.as_secs(), env = "AMBIT_LOG_THROTTLE_SECONDS")]
    pub log_throttle_seconds: u64,
    /// Open outbound UDP flows (5-tuples) per pod; a datagram that would open one more is
    /// dropped.
    #[arg(long, default_value_t = DEFAULT_POD_UDP_FLOWS, env = "AMBIT_POD_UDP_FLOW_LIMIT")]
    pub pod_udp_flow_limit: usize,
    /// Seconds a UDP flow may carry no datagram either way before it is closed.
    #[arg(long, default_value_t = DEFAULT_UDP_IDLE_SECONDS, env = "AMBIT_UDP_IDLE_TIMEOUT_SECONDS")]
    pub udp_idle_timeout_seconds: u64,
}

impl From<LimitArgs> for Limits {
    fn from(a: LimitArgs) -> Self {
        Limits {
            pod_connections: a.pod_connection_limit,
            node_connections: a.node_connection_limit,
            pod_handshakes: a.pod_handshake_limit,
            node_handshakes: a.node_handshake_limit,
            first_byte_timeout: Duration::from_secs(a.first_byte_timeout_seconds),
            plaintext_idle_timeout: Duration::from_secs(a.plaintext_idle_timeout_seconds),
            descriptor_reserve: a.descriptor_reserve,
            log_interval: Duration::from_secs(a.log_throttle_seconds),
            pod_udp_flows: a.pod_udp_flow_limit,
            udp_idle_timeout: Duration::from_secs(a.udp_idle_timeout_seconds.max(1)),
        }
    }
}

/// Why a new connection was refused before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// Its original destination is one of ztunnel's own listeners (it would loop).
    SelfDial,
    /// The pod has its cap of open connections in that direction.
    PodConnections,
    /// The node has its cap of open connections.
    NodeConnections,
    /// The pod's HBONE listener has its cap of handshakes in progress.
    PodHandshakes,
    /// The node has its cap of handshakes in progress.
    NodeHandshakes,
    /// The source's outbound policy is REGISTRY_ONLY and the destination is unknown.
    RegistryOnly,
    /// The pod has its cap of open outbound UDP flows.
    PodUdpFlows,
}

impl Refused {
    /// The metric label and log cause.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refused::SelfDial => "self_dial",
            Refused::PodConnections => "pod_connections",
            Refused::NodeConnections => "node_connections",
            Refused::PodHandshakes => "pod_handshakes",
            Refused::NodeHandshakes => "node_handshakes",
            Refused::RegistryOnly => "registry_only",
            Refused::PodUdpFlows => "pod_udp_flows",
        }
    }
}

/// One connection's place under the pod's and the node's caps; released on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    _pod: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
}

/// The node-wide budgets, shared by every pod's proxies. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeLimits {
    limits: Arc<Limits>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// The connection cap after clamping to the descriptor budget.
    connection_cap: usize,
}

impl NodeLimits {
    /// Budgets for `limits`, with the node connection cap clamped so that `nofile`
    /// descriptors (the process's soft RLIMIT_NOFILE) are never exhausted by proxied
    /// connections: each costs up to two (client and upstream), and the reserve is kept free.
    pub fn new(limits: Limits, nofile: u64) -> Self {
        let budget = nofile.saturating_sub(limits.descriptor_reserve) / 2;
        let budget = usize::try_from(budget).unwrap_or(usize::MAX).max(1);
        let connection_cap = limits.node_connections.min(budget).max(1);
        NodeLimits {
            connections: Arc::new(Semaphore::new(connection_cap)),
            handshakes: Arc::new(Semaphore::new(limits.node_handshakes.max(1))),
            limits: Arc::new(limits),
            connection_cap,
        }
    }

    /// The configured figures.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The node connection cap in force (after the descriptor clamp).
    pub fn connection_cap(&self) -> usize {
        self.connection_cap
    }

    /// Per-pod budgets sized by these limits.
    pub fn pod(&self) -> PodLimits {
        let per_pod = self.limits.pod_connections.max(1);
        PodLimits {
            outbound: Arc::new(Semaphore::new(per_pod)),
            inbound: Arc::new(Semaphore::new(per_pod)),
            handshakes: Arc::new(Semaphore::new(self.limits.pod_handshakes.max(1))),
            udp_flows: Arc::new(Semaphore::new(self.limits.pod_udp_flows.max(1))),
        }
    }

    /// A permit for one connection under the pod's `budget` (`None`: the node's only, for
    /// HBONE connections whose streams count against the pod).
    pub fn connection(&self, budget: Option<&Arc<Semaphore>>) -> Result<ConnectionPermit, Refused> {
        // The pod's cap first: a pod at its cap must not consume node permits it then drops.
        let pod = match budget {
            Some(sem) => Some(
                sem.clone()
                    .try_acquire_owned()
                    .map_err(|_| Refused::PodConnections)?,
            ),
            None => None,
        };
        let node = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::NodeConnections)?;
        Ok(ConnectionPermit {
            _pod: pod,
            _node: node,
        })
    }

    /// A permit for one TLS handshake on `pod`'s HBONE listener.
    pub fn handshake(&self, pod: &PodLimits) -> Result<ConnectionPermit, Refused> {
        let pod = pod
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::PodHandshakes)?;
        let node = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::NodeHandshakes)?;
        Ok(ConnectionPermit {
            _pod: Some(pod),
            _node: node,
        })
    }
}

/// One pod's budgets.
#[derive(Debug, Clone)]
pub struct PodLimits {
    /// Connections the pod's app opened (15001).
    pub outbound: Arc<Semaphore>,
    /// Connections arriving for the pod (15006, and streams on 15008).
    pub inbound: Arc<Semaphore>,
    /// Handshakes in progress on the pod's 15008.
    pub handshakes: Arc<Semaphore>,
    /// UDP flows the pod's app opened (its captured UDP).
    pub udp_flows: Arc<Semaphore>,
}

/// The descriptor limit after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now (the hard limit, unless raising failed).
    pub now: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: the soft default (often 1024) would make
/// every cap above meaningless, and the hard limit is what the operator granted the pod.
pub fn raise_nofile() -> Result<Nofile, LimitsError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::Get)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| LimitsError::Set {
            soft,
            hard,
            source,
        })?;
    }
    Ok(Nofile {
        was: soft,
        now: soft.max(hard),
    })
}

/// The current soft RLIMIT_NOFILE (what the node caps are sized from).
pub fn current_nofile() -> Result<u64, LimitsError> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .map_err(LimitsError::Get)
}

/// When a proxied connection last carried a byte (either way), for its timeouts. Cheap to
/// clone; updated with one relaxed store per read.
#[derive(Debug, Clone)]
pub struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last byte, plus one; 0 = none yet.
    last: Arc<AtomicU64>,
}

/// Why a connection was closed by its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No byte either way within the first-byte timeout.
    FirstByte(Duration),
    /// No byte either way for the idle timeout.
    Idle(Duration),
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expired::FirstByte(d) => write!(f, "no byte either way within {d:?}"),
            Expired::Idle(d) => write!(f, "idle for {d:?}"),
        }
    }
}

impl Activity {
    /// Starts the clock (at accept).
    pub fn new() -> Self {
        Activity {
            started: Instant::now(),
            last: Arc::default(),
        }
    }

    /// Records that a byte moved now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last.store(ms + 1, Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.started + Duration::from_millis(ms - 1)),
        }
    }

    /// Completes when the connection has been silent too long: no byte at all within
    /// `first_byte`, or (when `idle` is set) no byte for `idle` after the last one.
    pub async fn expired(&self, first_byte: Duration, idle: Option<Duration>) -> Expired {
        loop {
            let (deadline, why) = match (self.last(), idle) {
                (None, _) => (self.started + first_byte, Expired::FirstByte(first_byte)),
                (Some(last), Some(idle)) => (last + idle, Expired::Idle(idle)),
                // Bytes have moved and there is no idle timeout: nothing can expire.
                (Some(_), None) => return std::future::pending().await,
            };
            tokio::time::sleep_until(deadline).await;
            // Re-check: a byte may have moved while we slept.
            let fresh = match self.last() {
                None => false,
                Some(last) => idle.is_none_or(|idle| last + idle > Instant::now()),
            };
            if !fresh {
                return why;
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

pin_project_lite::pin_project! {
    /// A stream whose reads mark its connection's [`Activity`].
    pub struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Activity,
        read: u64,
    }
}

impl<S> Tracked<S> {
    /// Wraps `inner`, recording reads into `activity`.
    pub fn new(inner: S, activity: Activity) -> Self {
        Tracked {
            inner,
            activity,
            read: 0,
        }
    }

    /// Bytes read through this wrapper so far (what a copy cut short had moved).
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Tracked<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            *this.read += n as u64;
            this.activity.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Tracked<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl<S: ambit_hbone::copy::Pipe> ambit_hbone::copy::Pipe for Tracked<S> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut bytes::BytesMut,
        want: usize,
    ) -> std::task::Poll<std::io::Result<bytes::Bytes>> {
        let polled = self.inner.poll_read_chunk(cx, buf, want);
        if let std::task::Poll::Ready(Ok(chunk)) = &polled {
            if !chunk.is_empty() {
                self.read += chunk.len() as u64;
                self.activity.touch();
            }
        }
        polled
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits {
            pod_connections: 2,
            node_connections: 3,
            pod_handshakes: 1,
            node_handshakes: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn a_pod_at_its_cap_leaves_the_node_budget_to_the_others() {
        let node = NodeLimits::new(small(), 1_000_000);
        let (a, b) = (node.pod(), node.pod());
        let a1 = node.connection(Some(&a.inbound)).unwrap();
        let _a2 = node.connection(Some(&a.inbound)).unwrap();
        assert_eq!(
            node.connection(Some(&a.inbound)).unwrap_err(),
            Refused::PodConnections
        );
        // A's refusal did not take a node permit: B still gets the last one.
        let _b1 = node.connection(Some(&b.outbound)).unwrap();
        assert_eq!(
            node.connection(Some(&b.outbound)).unwrap_err(),
            Refused::NodeConnections
        );
        drop(a1);
        assert!(node.connection(Some(&b.outbound)).is_ok());
        // Directions have their own pod budget.
        let _a_out = node.connection(Some(&a.outbound));
    }

    #[test]
    fn handshakes_have_their_own_caps() {
        let node = NodeLimits::new(small(), 1_000_000);
        let (a, b, c) = (node.pod(), node.pod(), node.pod());
        let _ha = node.handshake(&a).unwrap();
        assert_eq!(node.handshake(&a).unwrap_err(), Refused::PodHandshakes);
        let _hb = node.handshake(&b).unwrap();
        assert_eq!(node.handshake(&c).unwrap_err(), Refused::NodeHandshakes);
        // Connections are counted apart from handshakes.
        assert!(node.connection(Some(&a.inbound)).is_ok());
    }

    #[test]
    fn the_node_cap_leaves_the_descriptor_reserve_free() {
        let limits = Limits {
            node_connections: 100_000,
            descriptor_reserve: 1024,
            ..Limits::default()
        };
        // 20,000 descriptors: (20,000 - 1,024) / 2 connections of two descriptors each.
        assert_eq!(
            NodeLimits::new(limits.clone(), 20_000).connection_cap(),
            9488
        );
        assert_eq!(
            NodeLimits::new(limits, 10_000_000).connection_cap(),
            100_000
        );
    }

    #[test]
    fn raising_nofile_reaches_the_hard_limit() {
        let raised = raise_nofile().unwrap();
        assert!(raised.now >= raised.was);
        assert_eq!(current_nofile().unwrap(), raised.now);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connections_expire_and_active_ones_do_not() {
        let first = Duration::from_secs(30);
        let idle = Duration::from_secs(60);
        let silent = Activity::new();
        let started = Instant::now();
        assert_eq!(
            silent.expired(first, Some(idle)).await,
            Expired::FirstByte(first)
        );
        assert_eq!(started.elapsed(), first);

        let chatty = Activity::new();
        chatty.touch();
        let watch = chatty.clone();
        let timer = tokio::spawn(async move { watch.expired(first, Some(idle)).await });
        tokio::time::sleep(Duration::from_secs(50)).await;
        chatty.touch();
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(!timer.is_finished(), "a byte 50 s ago keeps it open");
        assert_eq!(timer.await.unwrap(), Expired::Idle(idle));
        assert_eq!(started.elapsed(), first + Duration::from_secs(110));

        // Without an idle timeout, one byte is enough to never expire.
        let once = Activity::new();
        once.touch();
        let never = tokio::time::timeout(Duration::from_secs(86_400), once.expired(first, None));
        assert!(never.await.is_err());
    }
}
