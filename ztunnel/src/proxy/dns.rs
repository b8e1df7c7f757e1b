//! The DNS proxy's side of one pod: its listeners' loops (the UDP socket and TCP listener on
//! its loopback port 15053, per family, where the capture rules redirect the pod's queries to
//! port 53). What a query gets is decided in `crate::dns`; this module only acts.
//!
//! Every query, UDP or TCP, goes the same way ([`answer`]): the pod's token bucket first
//! (over it: REFUSED, counted), then [`decide`] on one state snapshot, then either the
//! decided reply, or the query forwarded to the pod's upstream resolvers from inside the pod
//! (a marked socket: the rules let it out) over the transport it came on, and the upstream's
//! answer relayed ([`decision::relay`]); no usable answer within the timeout from any of them
//! is SERVFAIL. Every query is counted in `istio_dns_requests_total{outcome}`.
//!
//! UDP answers are sent from the socket the query arrived on, bound to the loopback address
//! the rules REDIRECT to, so conntrack rewrites their source back to the resolver the pod
//! addressed (its stub resolver accepts nothing else). A forwarded query runs in its own task
//! so a slow upstream never holds up the pod's other queries; the rate limit bounds how many
//! run at once. TCP connections carry any number of length-prefixed queries in turn
//! (RFC 7766), at most [`MAX_TCP_CONNECTIONS`] per pod at once, each closed after
//! [`TCP_IDLE`] without a query.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Shared;
use crate::capture::SocketFactory;
use crate::dns::decision::{self, decide, Asker, Decision, Outcome};
use crate::dns::{DnsListeners, DnsSettings, TokenBucket};
use crate::drain::DrainWatcher;
use crate::telemetry::error_chain;

/// Open DNS-over-TCP connections one pod may hold; more are closed at once. Resolvers open
/// one per lookup that needs it (a truncated answer, `use-vc`), and keep none open for long.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A DNS-over-TCP connection without a new query for this long is closed (RFC 7766 asks
/// servers to close idle connections within seconds).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest DNS message (a TCP length prefix is 16 bits).
const MAX_MESSAGE: usize = 65535;

/// Why a forwarded query got no usable answer from one upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream resolver is known for the pod.
    #[error("no upstream resolver is known for the pod")]
    NoUpstream,
    /// The socket inside the pod could not be made or connected.
    #[error("cannot reach upstream {upstream} from the pod")]
    Socket {
        /// The resolver.
        upstream: SocketAddr,
        #[source]
        source: crate::capture::sockets::SocketError,
    },
    /// Sending or receiving failed.
    #[error("exchange with upstream {upstream} failed")]
    Io {
        /// The resolver.
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        /// The resolver.
        upstream: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// The answer was not a response to the query.
    #[error("upstream {upstream} answered unusably")]
    Relay {
        /// The resolver.
        upstream: SocketAddr,
        #[source]
        source: decision::RelayError,
    },
}

/// The transport a query came on (and is forwarded on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// One enrolled pod as its DNS listeners see it.
#[derive(Debug)]
pub struct DnsPod {
    /// `namespace/name`, for logs.
    pub name: Arc<str>,
    /// The pod's workload name and namespace, for metrics.
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// Who is asking, for the decision.
    pub asker: Asker,
    /// The resolvers forwarded queries go to, in order.
    pub upstreams: Vec<SocketAddr>,
    /// Marked sockets inside the pod.
    pub sockets: SocketFactory,
    bucket: Mutex<TokenBucket>,
    tcp_connections: Arc<Semaphore>,
    timeout: Duration,
}

impl DnsPod {
    /// The DNS state of a pod in `namespace` whose forwarded queries go to `upstreams`.
    pub fn new(
        settings: &DnsSettings,
        name: Arc<str>,
        workload: Arc<str>,
        namespace: Arc<str>,
        upstreams: Vec<SocketAddr>,
        sockets: SocketFactory,
    ) -> Self {
        DnsPod {
            name,
            workload,
            asker: Asker {
                namespace: namespace.clone(),
                cluster_domain: settings.cluster_domain.clone(),
            },
            namespace,
            upstreams,
            sockets,
            bucket: Mutex::new(TokenBucket::new(
                settings.query_rate,
                settings.query_burst,
                Instant::now(),
            )),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            timeout: settings.upstream_timeout,
        }
    }

    fn admit(&self) -> bool {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now())
    }
}

/// Starts the pod's DNS loops on `listeners` (one pair per family) in `tasks`. They stop
/// when `drain` fires.
pub fn spawn(
    shared: &Shared,
    pod: Arc<DnsPod>,
    listeners: Vec<DnsListeners>,
    drain: DrainWatcher,
    tasks: &mut JoinSet<()>,
) {
    for DnsListeners { udp, tcp } in listeners {
        tasks.spawn(serve_udp(shared.clone(), pod.clone(), udp, drain.clone()));
        tasks.spawn(serve_tcp(shared.clone(), pod.clone(), tcp, drain.clone()));
    }
}

async fn serve_udp(shared: Shared, pod: Arc<DnsPod>, socket: UdpSocket, drain: DrainWatcher) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = tokio::select! {
            _ = drain.signaled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors of earlier replies surface here; the socket is fine.
                    if let Some(suppressed) = shared.throttle.admit("dns udp receive") {
                        tracing::debug!(pod = %pod.name, error = %e, suppressed, "dns receive failed");
                    }
                    continue;
                }
            },
        };
        let query = buf[..len].to_vec();
        match respond(&shared, &pod, &query) {
            Respond::Now(Some(reply)) => send_udp(&shared, &pod, &socket, &reply, client).await,
            Respond::Now(None) => {}
            Respond::Forward(forward) => {
                let (shared, pod, socket) = (shared.clone(), pod.clone(), socket.clone());
                let watcher = drain.clone();
                tokio::spawn(async move {
                    let reply = forwarded(&shared, &pod, &query, &forward, Transport::Udp).await;
                    if let Some(reply) = reply {
                        send_udp(&shared, &pod, &socket, &reply, client).await;
                    }
                    drop(watcher);
                });
            }
        }
    }
}

async fn send_udp(shared: &Shared, pod: &DnsPod, socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(reply, to).await {
        if let Some(suppressed) = shared.throttle.admit("dns udp send") {
            tracing::debug!(pod = %pod.name, error = %e, suppressed, "dns reply not sent");
        }
    }
}

async fn serve_tcp(shared: Shared, pod: Arc<DnsPod>, listener: TcpListener, drain: DrainWatcher) {
    loop {
        let stream = tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(suppressed) = shared.throttle.admit("dns tcp accept") {
                        tracing::warn!(pod = %pod.name, error = %e, suppressed, "dns accept failed");
                    }
                    tokio::time::sleep(super::ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = pod.tcp_connections.clone().try_acquire_owned() else {
            ambit_hbone::server::reset(stream);
            shared.metrics.connection_refused("dns tcp limit");
            continue;
        };
        let (shared, pod, watcher) = (shared.clone(), pod.clone(), drain.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = watcher.signaled() => {}
                () = serve_tcp_connection(&shared, &pod, stream) => {}
            }
            drop(permit);
        });
    }
}

/// Answers length-prefixed queries on one connection, in turn, until the client closes, it
/// stays idle past [`TCP_IDLE`], or it breaks.
async fn serve_tcp_connection(shared: &Shared, pod: &DnsPod, mut stream: TcpStream) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let read = tokio::time::timeout(TCP_IDLE, async {
            let len = usize::from(stream.read_u16().await?);
            stream.read_exact(&mut buf[..len]).await?;
            Ok::<_, std::io::Error>(len)
        })
        .await;
        let Ok(Ok(len)) = read else { return };
        let query = &buf[..len];
        let reply = match respond(shared, pod, query) {
            Respond::Now(reply) => reply,
            Respond::Forward(forward) => {
                forwarded(shared, pod, query, &forward, Transport::Tcp).await
            }
        };
        // Nothing to answer to (no header): the stream cannot be trusted further.
        let Some(reply) = reply else { return };
        let Ok(prefix) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&prefix.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

enum Respond {
    /// Send this (or nothing).
    Now(Option<Vec<u8>>),
    /// Forward the query upstream.
    Forward(decision::Forward),
}

/// The rate limit, then the decision on one snapshot; counts what is answered here.
fn respond(shared: &Shared, pod: &DnsPod, query: &[u8]) -> Respond {
    if !pod.admit() {
        count(shared, pod, Outcome::RateLimited);
        if let Some(suppressed) = shared.throttle.admit("dns rate limited") {
            tracing::warn!(pod = %pod.name, suppressed, "dns query refused: over the pod's query rate");
        }
        return Respond::Now(decision::refuse(query));
    }
    let state = shared.state.snapshot();
    match decide(&state, &pod.asker, query) {
        Decision::Reply { message, outcome } => {
            count(shared, pod, outcome);
            Respond::Now(Some(message))
        }
        Decision::Drop => {
            count(shared, pod, Outcome::Malformed);
            Respond::Now(None)
        }
        Decision::Forward(forward) => Respond::Forward(forward),
    }
}

/// Forwards `query` to the pod's upstreams in turn; the first usable answer is relayed,
/// else SERVFAIL. Counts the outcome.
async fn forwarded(
    shared: &Shared,
    pod: &DnsPod,
    query: &[u8],
    forward: &decision::Forward,
    transport: Transport,
) -> Option<Vec<u8>> {
    let mut last = UpstreamError::NoUpstream;
    for &upstream in &pod.upstreams {
        let exchanged =
            tokio::time::timeout(pod.timeout, exchange(pod, upstream, query, transport))
                .await
                .unwrap_or(Err(UpstreamError::Timeout {
                    upstream,
                    timeout: pod.timeout,
                }));
        let relayed = exchanged.and_then(|answer| {
            decision::relay(forward, &answer)
                .map_err(|source| UpstreamError::Relay { upstream, source })
        });
        match relayed {
            Ok(reply) => {
                count(shared, pod, Outcome::Forwarded);
                return Some(reply);
            }
            Err(e) => last = e,
        }
    }
    count(shared, pod, Outcome::UpstreamFailed);
    if let Some(suppressed) = shared.throttle.admit("dns upstream failed") {
        tracing::warn!(pod = %pod.name, error = %error_chain(&last), suppressed, "dns query failed upstream; answered SERVFAIL");
    }
    decision::servfail(forward)
}

/// One query to one upstream over `transport`, from inside the pod; the raw answer.
async fn exchange(
    pod: &DnsPod,
    upstream: SocketAddr,
    query: &[u8],
    transport: Transport,
) -> Result<Vec<u8>, UpstreamError> {
    let io = |source| UpstreamError::Io { upstream, source };
    match transport {
        Transport::Udp => {
            let socket = pod
                .sockets
                .udp(upstream)
                .await
                .map_err(|source| UpstreamError::Socket { upstream, source })?;
            socket.send(query).await.map_err(io)?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            let len = socket.recv(&mut buf).await.map_err(io)?;
            buf.truncate(len);
            Ok(buf)
        }
        Transport::Tcp => {
            let mut stream = pod
                .sockets
                .connect(upstream)
                .await
                .map_err(|source| UpstreamError::Socket { upstream, source })?;
            // `query` came in a 16-bit length prefix, so it fits one.
            let prefix = u16::try_from(query.len()).unwrap_or(u16::MAX);
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&prefix.to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed).await.map_err(io)?;
            let len = usize::from(stream.read_u16().await.map_err(io)?);
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await.map_err(io)?;
            Ok(buf)
        }
    }
}

fn count(shared: &Shared, pod: &DnsPod, outcome: Outcome) {
    shared
        .metrics
        .dns_request(&pod.workload, &pod.namespace, outcome.as_str());
}
