//! The data path: the three proxies ztunnel runs for every enrolled pod, on the listeners
//! capture opened inside the pod's network namespace.
//!
//! - [`outbound`] (15001): the pod's own connections, REDIRECTed; decides with
//!   [`decision::outbound`](crate::decision::outbound) and either passes through, or tunnels
//!   over HBONE as the pod's identity.
//! - [`inbound`] (15008): HBONE from other proxies; decides with
//!   [`decision::inbound`](crate::decision::inbound) and dials the app *as the client*.
//! - [`inbound_plaintext`] (15006): plain TCP from outside the mesh, TPROXYed; decides with
//!   [`decision::inbound_plaintext`](crate::decision::inbound_plaintext).
//! - [`udp`] (15001/udp, with UDP capture): the pod's UDP flows, carried over CONNECT-UDP;
//!   their inbound side is the HBONE server's ([`inbound`]).
//!
//! Every connection is decided first (a plain value from a state snapshot), then served; each
//! ends with its metrics recorded and exactly one access-log line. [`PodProxy`] is what the
//! three share for one pod: its identity's credentials (with the TLS configs cached per
//! certificate), its HBONE pool (whose sockets are made inside the pod, so tunnels leave from
//! the pod's IP), its socket factory, and the [`registry`] of its open inbound connections
//! that a policy change re-checks.
//!
//! Limits (`limits.rs`): each accepted connection first takes a permit from its pod's and the
//! node's budgets; over a cap it is reset at once ([`refuse_new`]), counted in
//! `ambit_ztunnel_connections_refused_total` and logged at most once per interval per cause.
//! Served connections close when silent too long (first byte, and idle for plaintext inbound).
//! Refusal and failure lines of the access log share that throttle; a served connection
//! always gets its line.
//!
//! Who the peers are is a [`PeerIdentity`]: proven (mTLS, or the pod itself) or not. Only a
//! proven identity reaches `source_principal` / `destination_principal` and the access log's
//! identity fields.

pub mod credentials;
pub mod dns;
pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;
pub mod registry;
pub mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::client::{ConnectError, ConnectTarget};
use ambit_hbone::connect_udp::TunnelProtocol;
use ambit_hbone::copy::{Copied, CopyError, Transferred};
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::throttle::LogThrottle;
use ambit_hbone::Identity;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::access_log::{self, ConnectionLog, Direction, Outcome, Peer, Protocol};
use crate::capture::sockets::SocketError;
use crate::capture::{CapturedPod, PodListeners};
use crate::certs::{CertManager, CertsError};
use crate::decision::Balancer;
use crate::drain::DrainWatcher;
use crate::limits::{Activity, NodeLimits, PodLimits, Refused, Tracked};
use crate::metrics::{ConnectionLabels, Metrics, Reporter, ResponseFlags, SecurityPolicy};
use crate::peer::PeerIdentity;
use crate::state::{Service, StateReader, Workload};

pub use credentials::Credentials;
pub use registry::{Reevaluation, Registration, Registry, Revocation};

// Errors are built at most once per failed connection and carry the names an operator
// needs (identities, addresses); boxing them would cost more than moving them.
#[allow(clippy::result_large_err)]
/// Why one proxied connection failed (refusals on purpose are not errors: they are
/// decisions, logged with their reason).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The kernel could not tell where a captured connection was going.
    #[error("cannot read the original destination of a captured connection")]
    OriginalDst(#[source] std::io::Error),
    /// The pod's identity has no usable certificate (yet, or any more).
    #[error("no certificate for {identity} within {waited:?}")]
    NoCertificate {
        /// The pod's identity.
        identity: Identity,
        /// How long we waited for the certificate manager.
        waited: Duration,
        /// Why, when the manager said.
        #[source]
        source: Option<Box<CertsError>>,
    },
    /// Building a TLS configuration from the certificate failed.
    #[error("cannot build a TLS configuration for {identity}")]
    Tls {
        /// The pod's identity.
        identity: Identity,
        #[source]
        source: ambit_hbone::tls::TlsError,
    },
    /// A socket inside the pod could not be created or connected.
    #[error("cannot connect from the pod")]
    Socket(#[source] SocketError),
    /// The HBONE tunnel could not be opened.
    #[error("cannot open the HBONE tunnel")]
    Tunnel(#[source] ConnectError),
    /// Copying between the two sides failed part-way.
    #[error("connection broke while copying")]
    Copy(#[source] CopyError),
}

/// Knobs of the data path.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The mesh's trust domain: peers' identities must be in it.
    pub trust_domain: Arc<str>,
    /// ztunnel's own mTLS mode is STRICT: plaintext inbound (15006) is refused where no
    /// PeerAuthentication sets a mode (see `decision::default_mtls`).
    pub strict_inbound: bool,
    /// How long a connection waits for its pod's first certificate.
    pub cert_wait: Duration,
    /// How long open connections get when a pod is un-enrolled or ztunnel drains.
    pub drain_deadline: Duration,
    /// How long they get once ztunnel handed over to a successor (an upgrade).
    pub upgrade_drain_deadline: Duration,
    /// TCP connect timeout for passthrough and for dials to the app.
    pub connect_timeout: Duration,
    /// HBONE pool tuning (one pool per pod).
    pub pool: PoolConfig,
    /// Whether a policy change closes open inbound connections it now denies.
    pub policy_reevaluation: Reevaluation,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            trust_domain: Arc::from(ambit_hbone::identity::DEFAULT_TRUST_DOMAIN),
            strict_inbound: false,
            cert_wait: Duration::from_secs(10),
            drain_deadline: crate::drain::DEFAULT_DRAIN_DEADLINE,
            upgrade_drain_deadline: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            pool: PoolConfig::default(),
            policy_reevaluation: Reevaluation::default(),
        }
    }
}

/// What every pod's proxies share: the state, certificates, metrics, load balancer.
#[derive(Clone)]
pub struct Shared {
    pub state: StateReader,
    pub certs: CertManager,
    pub metrics: Metrics,
    pub balancer: Balancer,
    pub settings: Arc<ProxySettings>,
    /// The node's connection and handshake budgets.
    pub limits: NodeLimits,
    /// Bounds the lines of refusals and failures, node-wide, per cause.
    pub throttle: Arc<LogThrottle>,
    /// The DNS proxy's settings.
    pub dns: Arc<crate::dns::DnsSettings>,
}

/// One enrolled pod as its proxies see it.
pub struct PodProxy {
    /// The pod uid: the key into the state (the workload is looked up per connection, so
    /// policy and label changes apply without re-enrolling).
    pub uid: Arc<str>,
    /// `namespace/name`, for logs.
    pub name: Arc<str>,
    /// The pod IP it was enrolled with.
    pub ip: IpAddr,
    /// The identity the pod's tunnels carry.
    pub identity: Identity,
    /// The pod's capture (socket factory, namespace).
    pub capture: Arc<CapturedPod>,
    /// HBONE connections from this pod, made with sockets inside it.
    pub pool: Pool,
    /// The identity's certificate and TLS configs.
    pub credentials: Credentials,
    /// The pod's connection and handshake budgets.
    pub limits: PodLimits,
    /// Open inbound connections, for policy re-evaluation.
    pub inbound: Arc<Registry>,
    /// The pod's DNS proxy state, when DNS is captured.
    pub dns: Option<Arc<dns::DnsPod>>,
}

impl PodProxy {
    /// The proxy state of `workload`, captured as `capture`.
    pub fn new(
        shared: &Shared,
        workload: &Workload,
        ip: IpAddr,
        capture: Arc<CapturedPod>,
    ) -> Self {
        let factory = Arc::new(PodSockets(capture.sockets().clone()));
        let dns = shared.dns.enabled.then(|| {
            let upstreams = crate::dns::upstream::for_pod(&shared.dns, capture.netns().path());
            Arc::new(dns::DnsPod::new(
                &shared.dns,
                Arc::from(format!("{}/{}", workload.namespace, workload.name)),
                workload.workload_name.clone(),
                workload.namespace.clone(),
                upstreams,
                capture.sockets().clone(),
            ))
        });
        PodProxy {
            dns,
            uid: workload.uid.clone(),
            name: Arc::from(format!("{}/{}", workload.namespace, workload.name)),
            ip,
            identity: workload.identity.clone(),
            pool: Pool::with_socket_factory(shared.settings.pool.clone(), factory),
            credentials: Credentials::new(
                shared.certs.clone(),
                workload.identity.clone(),
                shared.settings.trust_domain.clone(),
                shared.settings.cert_wait,
            ),
            capture,
            limits: shared.limits.pod(),
            inbound: Arc::new(Registry::default()),
        }
    }
}

/// The HBONE pool's sockets for one pod: marked, inside the pod's namespace.
struct PodSockets(crate::capture::SocketFactory);

impl ambit_hbone::client::SocketFactory for PodSockets {
    fn new_socket(
        &self,
        _source: &Identity,
        peer: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpSocket> {
        self.0
            .outbound_blocking(peer)
            .map_err(|e| std::io::Error::other(crate::telemetry::error_chain(&e)))
    }
}

/// Starts the pod's three proxies on `listeners`, once per address family (the families
/// share the pod's pool, limits and registry). They stop accepting when `drain` fires; every
/// connection holds a clone of it, so the pod's drain trigger waits for them.
pub fn spawn(
    shared: &Shared,
    pod: Arc<PodProxy>,
    mut listeners: PodListeners,
    drain: DrainWatcher,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let dns = std::mem::take(&mut listeners.dns);
    for socket in std::mem::take(&mut listeners.udp) {
        tasks.spawn(udp::serve_outbound(
            shared.clone(),
            pod.clone(),
            socket,
            drain.clone(),
        ));
    }
    if let Some(dns_pod) = &pod.dns {
        dns::spawn(shared, dns_pod.clone(), dns, drain.clone(), &mut tasks);
    }
    for [outbound, inbound, hbone] in listeners.by_family() {
        tasks.spawn(outbound::serve(
            shared.clone(),
            pod.clone(),
            outbound,
            drain.clone(),
        ));
        tasks.spawn(inbound_plaintext::serve(
            shared.clone(),
            pod.clone(),
            inbound,
            drain.clone(),
        ));
        tasks.spawn(inbound::serve(
            shared.clone(),
            pod.clone(),
            hbone,
            drain.clone(),
        ));
    }
    if shared.settings.policy_reevaluation == Reevaluation::Close {
        tasks.spawn(registry::reevaluate(shared.clone(), pod, drain));
    }
    tasks
}

/// Accept-loop back-off after a failed `accept` (usually EMFILE or a reset before accept).
pub(crate) const ACCEPT_BACKOFF: Duration = ambit_hbone::server::ACCEPT_BACKOFF;

/// After a failed `accept`: log (throttled) and pause, so an accept loop out of descriptors
/// neither spins nor gives up.
pub(crate) async fn accept_failed(
    shared: &Shared,
    pod: &PodProxy,
    listener: &'static str,
    e: std::io::Error,
) {
    if let Some(suppressed) = shared.throttle.admit(listener) {
        tracing::warn!(pod = %pod.name, listener, error = %e, suppressed, "accept failed");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Refuses a new connection before serving it: reset at once, counted, logged (throttled).
pub(crate) fn refuse_new(
    shared: &Shared,
    pod: &PodProxy,
    stream: TcpStream,
    peer: SocketAddr,
    why: Refused,
) {
    ambit_hbone::server::reset(stream);
    refused_count(shared, pod, peer, why);
}

/// Counts and logs (throttled) a refusal whose socket the caller closes.
pub(crate) fn refused_count(shared: &Shared, pod: &PodProxy, peer: SocketAddr, why: Refused) {
    shared.metrics.connection_refused(why.as_str());
    if let Some(suppressed) = shared.throttle.admit(why.as_str()) {
        tracing::warn!(
            pod = %pod.name,
            %peer,
            reason = why.as_str(),
            suppressed,
            "connection refused"
        );
    }
}

/// How long a served connection may stay silent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// No byte either way since accept.
    pub first_byte: Duration,
    /// No byte either way since the last one; `None`: no idle timeout.
    pub idle: Option<Duration>,
}

impl Timeouts {
    /// The first-byte timeout only.
    pub fn first_byte(shared: &Shared) -> Self {
        Timeouts {
            first_byte: shared.limits.limits().first_byte_timeout,
            idle: None,
        }
    }

    /// First-byte and idle: plaintext inbound, where the peer is unauthenticated.
    pub fn plaintext(shared: &Shared) -> Self {
        Timeouts {
            first_byte: shared.limits.limits().first_byte_timeout,
            idle: Some(shared.limits.limits().plaintext_idle_timeout),
        }
    }
}

/// Metric labels of one connection. `source_principal` / `destination_principal` come from
/// proven identities only (else `unknown`, as Istio reports plaintext). The workload labels
/// name the workload behind a proven identity or, for a peer nothing proves, the one owning
/// its address: that is what Istio's ambient dashboards draw edges with, and such a series
/// says `connection_security_policy="none"` and an `unknown` principal beside it.
pub(crate) fn labels(
    reporter: Reporter,
    src: &PeerIdentity,
    dst: &PeerIdentity,
    service: Option<&Service>,
    mtls: bool,
    flags: ResponseFlags,
) -> ConnectionLabels {
    let mut l = ConnectionLabels::unknown(reporter);
    if let Some(w) = src.workload().or(src.workload_by_ip()) {
        l.source_workload = w.workload_name.clone();
        l.source_workload_namespace = w.namespace.clone();
    }
    if let Some(id) = src.identity() {
        l.source_principal = Arc::from(id.to_string());
    }
    if let Some(w) = dst.workload().or(dst.workload_by_ip()) {
        l.destination_workload = w.workload_name.clone();
        l.destination_workload_namespace = w.namespace.clone();
    }
    if let Some(id) = dst.identity() {
        l.destination_principal = Arc::from(id.to_string());
    }
    if let Some(s) = service {
        l.destination_service = s.hostname.clone();
        l.destination_service_namespace = s.namespace.clone();
    }
    l.connection_security_policy = if mtls {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::None
    };
    l.response_flags = flags;
    l
}

/// How a finished connection is reported: the labels and log fields that do not change.
pub(crate) struct Report {
    pub labels: ConnectionLabels,
    pub src: Peer,
    pub dst: Peer,
    pub service: Option<Arc<str>>,
    pub direction: Direction,
    pub protocol: Protocol,
    pub started: Instant,
}

impl Report {
    /// The report of a connection between `src` and `dst`; its metric labels follow from
    /// the peers (HBONE is mutual TLS, TCP is not).
    pub fn new(
        reporter: Reporter,
        src: Peer,
        dst: Peer,
        service: Option<&Service>,
        direction: Direction,
        protocol: Protocol,
        started: Instant,
    ) -> Self {
        Report {
            labels: labels(
                reporter,
                &src.identity,
                &dst.identity,
                service,
                matches!(protocol, Protocol::Hbone | Protocol::ConnectUdp),
                ResponseFlags::None,
            ),
            src,
            dst,
            service: service.map(|s| s.hostname.clone()),
            direction,
            protocol,
            started,
        }
    }

    /// The destination did not prove the identity expected of it (the handshake failed):
    /// the line and the labels stop naming it.
    pub fn destination_unproven(mut self) -> Self {
        self.dst.identity = self.dst.identity.into_unverified();
        self.labels.destination_principal = Arc::from(crate::metrics::UNKNOWN);
        self
    }

    /// Records a connection that never carried bytes (refused, or failed to connect). A
    /// peer can cause these at line rate, so the line is throttled per (direction, flags):
    /// the first of a kind is written at once, then one per interval with the count skipped.
    pub fn refused(mut self, shared: &Shared, flags: ResponseFlags, outcome: Outcome) {
        self.labels.response_flags = flags;
        drop(shared.metrics.connection_opened(&self.labels));
        let cause = refusal_cause(self.direction, flags);
        if let Some(suppressed) = shared.throttle.admit(cause) {
            if suppressed > 0 {
                tracing::info!(
                    target: access_log::TARGET,
                    cause,
                    suppressed,
                    "similar refusals were not logged since the last line"
                );
            }
            self.log(Transferred::default(), flags, outcome);
        }
    }

    /// Records an inbound connection the destination's decision refused with `status`:
    /// counted against the policy that denied it, if one did, then as [`Report::refused`].
    pub fn refused_inbound(
        self,
        shared: &Shared,
        status: u16,
        reason: &str,
        denied_by: Option<&str>,
    ) {
        if let Some(policy) = denied_by {
            shared.metrics.policy_denied(&self.labels, policy);
        }
        let flags = match status {
            401 | 403 => ResponseFlags::Denied,
            _ => ResponseFlags::NoHealthyUpstream,
        };
        self.refused(
            shared,
            flags,
            Outcome::Refused {
                reason: format!("{status}: {reason}").into(),
            },
        );
    }

    /// Copies between the two sides until both close or the connection stays silent past
    /// `timeouts`, then records bytes and writes the log line. `a` is the client side, `b`
    /// the destination side; `activity` started at accept.
    pub async fn copy<A, B>(
        self,
        metrics: &Metrics,
        a: &mut A,
        b: &mut B,
        activity: Activity,
        timeouts: Timeouts,
    ) where
        A: ambit_hbone::copy::Pipe + ?Sized,
        B: ambit_hbone::copy::Pipe + ?Sized,
    {
        self.copy_until(metrics, a, b, activity, timeouts, std::future::pending())
            .await
    }

    /// [`Report::copy`] for an inbound connection in its pod's registry: when a policy
    /// change denies it, the copy stops, the line says `revoked` with the new decision's
    /// reason, and returning lets the caller drop (close) both sides.
    pub async fn copy_registered<A, B>(
        self,
        metrics: &Metrics,
        a: &mut A,
        b: &mut B,
        activity: Activity,
        timeouts: Timeouts,
        mut registration: Registration,
    ) where
        A: ambit_hbone::copy::Pipe + ?Sized,
        B: ambit_hbone::copy::Pipe + ?Sized,
    {
        self.copy_until(metrics, a, b, activity, timeouts, registration.revoked())
            .await
    }

    #[allow(clippy::too_many_arguments)] // one connection's whole context; a struct would only rename it
    async fn copy_until<A, B>(
        self,
        metrics: &Metrics,
        a: &mut A,
        b: &mut B,
        activity: Activity,
        timeouts: Timeouts,
        stop: impl std::future::Future<Output = Revocation>,
    ) where
        A: ambit_hbone::copy::Pipe + ?Sized,
        B: ambit_hbone::copy::Pipe + ?Sized,
    {
        let conn = metrics.connection_opened(&self.labels);
        let mut a = Tracked::new(a, activity.clone());
        let mut b = Tracked::new(b, activity.clone());
        let copied = tokio::select! {
            copied = ambit_hbone::copy::copy_bidirectional_until(&mut a, &mut b, stop) => Ok(copied),
            expired = activity.expired(timeouts.first_byte, timeouts.idle) => Err(expired),
        };
        let (moved, flags, outcome) = match copied {
            Ok(Ok(Copied::Finished(moved))) => (moved, ResponseFlags::None, Outcome::Ok),
            Ok(Ok(Copied::Stopped { transferred, by })) => {
                metrics.connection_revoked(&self.labels);
                (
                    transferred,
                    ResponseFlags::Denied,
                    Outcome::Revoked {
                        reason: format!("policy changed: {}: {}", by.status, by.reason),
                    },
                )
            }
            Ok(Err(e)) => (
                e.transferred(),
                ResponseFlags::None,
                Outcome::Error {
                    error: crate::telemetry::error_chain(&ProxyError::Copy(e)),
                },
            ),
            Err(expired) => (
                Transferred {
                    a_to_b: a.bytes_read(),
                    b_to_a: b.bytes_read(),
                },
                ResponseFlags::Timeout,
                Outcome::Error {
                    error: format!("closed: {expired}"),
                },
            ),
        };
        conn.record_request_bytes(moved.a_to_b);
        conn.record_response_bytes(moved.b_to_a);
        drop(conn);
        self.log(moved, flags, outcome);
    }

    fn log(self, moved: Transferred, flags: ResponseFlags, outcome: Outcome) {
        self.log_datagrams(moved, None, flags, outcome)
    }

    /// The labels' `request_protocol` becomes `udp`: the report is of a UDP flow.
    pub fn udp(mut self) -> Self {
        self.labels.request_protocol = crate::metrics::RequestProtocol::Udp;
        self
    }

    /// Writes the log line, with datagram counts for a UDP flow.
    pub(crate) fn log_datagrams(
        self,
        moved: Transferred,
        datagrams: Option<(u64, u64)>,
        flags: ResponseFlags,
        outcome: Outcome,
    ) {
        access_log::log(&ConnectionLog {
            src: self.src,
            dst: self.dst,
            service: self.service,
            direction: self.direction,
            protocol: self.protocol,
            bytes_sent: moved.a_to_b,
            bytes_received: moved.b_to_a,
            duration: self.started.elapsed(),
            outcome,
            response_flags: flags,
            datagrams,
        });
    }
}

/// The throttle cause of a refusal line: fixed strings, one per (direction, flags).
fn refusal_cause(direction: Direction, flags: ResponseFlags) -> &'static str {
    match (direction, flags) {
        (Direction::Outbound, ResponseFlags::None) => "outbound refused",
        (Direction::Outbound, ResponseFlags::UpstreamConnectionFailure) => "outbound UF",
        (Direction::Outbound, ResponseFlags::NoHealthyUpstream) => "outbound UH",
        (Direction::Outbound, ResponseFlags::Denied) => "outbound RBAC",
        (Direction::Outbound, ResponseFlags::Timeout) => "outbound UT",
        (Direction::Inbound, ResponseFlags::None) => "inbound refused",
        (Direction::Inbound, ResponseFlags::UpstreamConnectionFailure) => "inbound UF",
        (Direction::Inbound, ResponseFlags::NoHealthyUpstream) => "inbound UH",
        (Direction::Inbound, ResponseFlags::Denied) => "inbound RBAC",
        (Direction::Inbound, ResponseFlags::Timeout) => "inbound UT",
    }
}

/// An error as an access-log outcome, with its causes.
/// Opens a tunnel as `pod` to `authority` through `peer`, requiring `expected` of it: the
/// pod's certificate, then a stream of `protocol` on its pool. A failure is reported on
/// `report` and gives `None`.
pub(crate) async fn open_tunnel(
    shared: &Shared,
    pod: &PodProxy,
    report: Report,
    (peer, authority, expected): (SocketAddr, SocketAddr, Identity),
    protocol: TunnelProtocol,
) -> Option<(TunnelStream, Report)> {
    let tls = match pod.credentials.client_config(&expected).await {
        Ok(tls) => tls,
        Err(e) => {
            report.destination_unproven().refused(
                shared,
                ResponseFlags::UpstreamConnectionFailure,
                error_outcome(&e),
            );
            return None;
        }
    };
    let target = ConnectTarget {
        source: pod.identity.clone(),
        tls,
        peer,
        expected_identity: expected,
        authority,
        headers: hyper::HeaderMap::new(),
    };
    let opened = match protocol {
        TunnelProtocol::Tcp => pod.pool.connect(target).await,
        TunnelProtocol::Udp => pod.pool.connect_udp(target).await,
    };
    match opened {
        Ok(stream) => Some((stream, report)),
        Err(e) => {
            // Without a status the handshake may not have completed: the destination did not
            // prove anything. With one, it did, and 401/403 is its policy speaking: a
            // refusal, not a failure.
            let report = if e.status().is_some() {
                report
            } else {
                report.destination_unproven()
            };
            let (flags, outcome) = match e.status().map(|s| s.as_u16()) {
                Some(401 | 403) => (
                    ResponseFlags::Denied,
                    Outcome::Refused {
                        reason: crate::telemetry::error_chain(&e).into(),
                    },
                ),
                _ => (
                    ResponseFlags::UpstreamConnectionFailure,
                    error_outcome(&ProxyError::Tunnel(e)),
                ),
            };
            report.refused(shared, flags, outcome);
            None
        }
    }
}

pub(crate) fn error_outcome(e: &ProxyError) -> Outcome {
    Outcome::Error {
        error: crate::telemetry::error_chain(e),
    }
}
