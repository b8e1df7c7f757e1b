//! The HBONE server: accepts mTLS HTTP/2 connections on port 15008 and turns each
//! `CONNECT ip:port` stream into a [`TunnelStream`] for a caller-supplied [`Handler`].
//!
//! Per connection: TCP accept -> server TLS config from the caller's [`ServerConfigSource`]
//! (fetched per connection so rotated certificates apply to new connections) -> TLS 1.3
//! handshake -> ALPN must be `h2` -> HTTP/2 handshake, all under one handshake deadline so a
//! slow or hostile peer cannot hold a socket and a task for free. Then per stream, decide then
//! do: the request is checked (method, strict `ip:port` authority), the handler's
//! [`Handler::accept`] decides, and every refusal becomes a status in one place
//! ([`Refusal::status`]) with its reason logged; only after `200` is sent does
//! [`Handler::serve`] get the stream.
//!
//! We use `h2` directly rather than hyper: a CONNECT tunnel is the only thing this server
//! speaks, h2 lets us size the flow-control windows and hand each stream's `SendStream` /
//! `RecvStream` straight to the tunnel type (hyper's upgrade path adds a buffering layer and
//! a body type we do not need), and h2 exposes GOAWAY (`graceful_shutdown`) directly.
//!
//! Admission: before any TLS, [`Handler::admit`] may refuse a new TCP connection (a node
//! proxy over its connection or handshake limits); the server then resets it at once (RST,
//! no TIME_WAIT, no bytes read). Failed handshakes and accepts are logged through a
//! [`LogThrottle`], so a flood of junk costs a few lines per cause, not one per connection.
//!
//! Draining: when the drain future given to [`Server::run`] completes, the listener closes,
//! every open connection sends GOAWAY (no new streams, open ones continue), and after
//! [`ServerSettings::drain_deadline`] whatever is left is cut.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::connect_udp::{self, TunnelProtocol};
use crate::stream::TunnelStream;
use crate::throttle::LogThrottle;
use crate::tls::{self, ALPN_H2};
use crate::Identity;

/// Read buffer under TLS. rustls asks the socket for at most 4 KiB per read, so without a
/// buffer a 16 KiB TLS record costs four `recvmsg` calls; with it, one call fetches many
/// records. Per connection, not per stream. Measured with the bulk test of
/// `bench/src/bin/hbone_tunnel.rs`.
pub(crate) const TLS_READ_BUFFER: usize = 64 * 1024;

/// A TCP stream with a read buffer (writes pass straight through).
pub(crate) type BufferedTcp = tokio::io::BufReader<TcpStream>;

/// Why the server, or one of its connections, failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Accepting a TCP connection failed in a way that is not per-connection.
    #[error("accepting HBONE connections failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The configuration source had no TLS configuration to offer (e.g. no certificate yet).
    #[error("no TLS server configuration available: {0}")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The TLS handshake failed (bad or untrusted client certificate, protocol error).
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The client did not negotiate ALPN `h2`.
    #[error("{peer} negotiated ALPN {alpn:?}, HBONE requires h2")]
    Alpn {
        peer: SocketAddr,
        alpn: Option<String>,
    },
    /// The client's certificate did not carry a usable SPIFFE identity.
    #[error("client {peer} has no usable identity: {source}")]
    Identity {
        peer: SocketAddr,
        #[source]
        source: tls::TlsError,
    },
    /// The HTTP/2 handshake or connection failed.
    #[error("HTTP/2 with {peer} failed: {source}")]
    Http2 {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    /// TLS plus HTTP/2 handshakes did not finish within the handshake timeout.
    #[error("handshake with {peer} did not finish within {timeout:?}")]
    HandshakeTimeout { peer: SocketAddr, timeout: Duration },
}

impl ServerError {
    /// A short fixed name of the failure, for metric labels and log throttling.
    pub fn cause(&self) -> &'static str {
        match self {
            ServerError::Accept(_) => "accept",
            ServerError::Config(_) => "no_tls_config",
            ServerError::Tls { .. } => "tls",
            ServerError::Alpn { .. } => "alpn",
            ServerError::Identity { .. } => "identity",
            ServerError::Http2 { .. } => "http2",
            ServerError::HandshakeTimeout { .. } => "handshake_timeout",
        }
    }
}

/// Where the server gets its TLS configuration, once per accepted connection (so a rotated
/// certificate applies to the next connection without a restart).
pub trait ServerConfigSource: Send + Sync + 'static {
    /// The configuration for a connection accepted on `local` (a node proxy serving several
    /// workloads may pick the certificate by destination address).
    fn server_config(
        &self,
        local: SocketAddr,
    ) -> impl Future<
        Output = Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>>,
    > + Send;
}

/// A fixed configuration (tests, benchmarks, or a caller that rotates by swapping servers).
impl ServerConfigSource for Arc<rustls::ServerConfig> {
    async fn server_config(
        &self,
        _local: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.clone())
    }
}

/// A `CONNECT` request that passed the protocol checks, as the handler sees it.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The client's identity, from its verified certificate.
    pub peer_identity: Identity,
    /// The client's socket address (the far end of the HBONE TCP connection).
    pub peer_addr: SocketAddr,
    /// The local address the connection was accepted on.
    pub local_addr: SocketAddr,
    /// The tunnel's destination: `:authority` for TCP, the path's target for CONNECT-UDP
    /// (which must agree with `:authority`).
    pub authority: SocketAddr,
    /// What the tunnel carries.
    pub protocol: TunnelProtocol,
    /// The request headers (pseudo-headers excluded).
    pub headers: HeaderMap,
}

/// Why a `CONNECT` is refused. [`Refusal::status`] is the one place these become statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client is not authenticated well enough for this destination (401).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Policy denies the connection (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The destination cannot be reached (503).
    #[error("destination unreachable: {0}")]
    Unreachable(String),
    /// The request is malformed, e.g. `:authority` is not an `ip:port` (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The method is not `CONNECT` (405).
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    /// An extended `CONNECT` for a protocol this server does not carry (501).
    #[error("not implemented: {0}")]
    NotImplemented(String),
}

impl Refusal {
    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A fixed name of the kind of refusal, for log throttling.
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "connect_401",
            Refusal::Forbidden(_) => "connect_403",
            Refusal::Unreachable(_) => "connect_503",
            Refusal::BadRequest(_) => "connect_400",
            Refusal::MethodNotAllowed(_) => "connect_405",
            Refusal::NotImplemented(_) => "connect_501",
        }
    }
}

/// What [`Handler::admit`] lets a new connection hold: guards (typically semaphore permits)
/// dropped when the handshake ends, and when the connection closes.
#[derive(Default)]
pub struct Admission {
    /// Held from accept until the TLS and HTTP/2 handshakes end (either way).
    pub handshake: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Held for the whole life of the connection.
    pub connection: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// What the server does with each well-formed `CONNECT`: decide, then serve.
pub trait Handler: Send + Sync + 'static {
    /// Whatever `accept` learned or opened (e.g. the connected upstream socket) that `serve`
    /// needs.
    type Accepted: Send + 'static;

    /// Decides whether to open the tunnel. Anything that can fail before the tunnel opens
    /// (policy, connecting upstream) belongs here, so the client gets a precise status.
    fn accept(
        &self,
        request: &ConnectRequest,
    ) -> impl Future<Output = Result<Self::Accepted, Refusal>> + Send;

    /// Carries the tunnel; called after `200` was sent. The stream is dropped (reset if not
    /// closed) when this returns.
    fn serve(
        &self,
        accepted: Self::Accepted,
        stream: TunnelStream,
    ) -> impl Future<Output = ()> + Send;

    /// Whether this handler carries UDP (CONNECT-UDP, [`TunnelProtocol::Udp`]). Only then
    /// does the server enable extended `CONNECT` (RFC 8441) in its SETTINGS; otherwise a
    /// CONNECT-UDP gets 501. Default: TCP only.
    fn carries_udp(&self) -> bool {
        false
    }

    /// Called for every accepted TCP connection before anything is read from it. `None`
    /// refuses it: the server resets it at once. The handler counts and logs its refusals
    /// (it knows which limit was hit). Default: admit, holding nothing.
    fn admit(&self, _peer: SocketAddr) -> Option<Admission> {
        Some(Admission::default())
    }

    /// A connection failed before HTTP/2 was up (the server has counted it in
    /// [`ServerStats`] and logged it, throttled); for the caller's own metrics.
    fn handshake_failed(&self, _error: &ServerError) {}
}

/// HTTP/2 flow-control and framing settings, shared by the server and the client pool.
///
/// Picked with `bench/src/bin/hbone_tunnel.rs` (1 GiB one way through one tunnel on
/// loopback, 2 cores shared with other builds, so ± 15% between runs):
///
/// | stream / connection window | max frame | tunnel MB/s |
/// | --- | --- | --- |
/// | 64 KiB / 64 KiB (HTTP/2 defaults) | 16 KiB | 280 |
/// | 1 MiB / 4 MiB | 1 MiB | 660 |
/// | 4 MiB / 16 MiB | 16 KiB | 485 |
/// | 4 MiB / 16 MiB | 64 KiB | 610 |
/// | 4 MiB / 16 MiB | 1 MiB | 615 |
///
/// Windows: even on loopback the 64 KiB default halves throughput (the sender stalls for
/// WINDOW_UPDATEs); beyond 1 MiB loopback cannot tell the difference, so the size comes from
/// real links: a 4 MiB stream window keeps a 10 Gb/s x 3 ms path full with one tunnel. The
/// connection window is four streams' worth, so one bulk stream cannot take a shared
/// connection's whole window, and it bounds what one connection can make us buffer.
///
/// Frames: 16 KiB frames cost a fifth of the throughput in per-frame work; 64 KiB reach the
/// plateau. Larger frames gain nothing measurable, make the receiver allocate frame-sized
/// buffers, and hold a shared connection for longer per frame (a 1 MiB frame delays other
/// streams' small frames by ~1 ms at 1 GB/s), so 64 KiB.
///
/// Send buffer: as large as the stream window. That loopback benchmark could not tell 256 KiB,
/// 1 MiB and 4 MiB apart, but two ztunnels on two cores can: with 1 MiB a bulk stream ran out
/// of send room long before its window, so its copy task parked until the connection task
/// had written, and the two tasks woke each other across the runtime's two workers. In the
/// side-by-side harness (`target/release/ztunnel_peer`, one 5 s round each, alternated three
/// times) 4 MiB cut the proxies' futex calls during the 1-stream run from 4,400-5,700 to
/// 830-860 and their context switches from 27-33k to 18-20k (Istio's ztunnel, whose client
/// uses the same size: 19k), with single-stream throughput 3.41-3.77 Gb/s against 2.97-3.63.
/// What one stream may queue is still bounded, at the 4 MiB a peer can already make us hold
/// per stream on the receiving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Settings {
    /// SETTINGS_INITIAL_WINDOW_SIZE: how much a peer may send on one stream before we read.
    pub stream_window: u32,
    /// The connection-level receive window (sum over all streams).
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE we accept.
    pub max_frame_size: u32,
    /// How much one stream may have queued in h2 for sending (bounds memory per stream).
    pub max_send_buffer: usize,
}

impl H2Settings {
    /// The settings clamped to what HTTP/2 allows (RFC 9113 6.5.2; h2 panics beyond them),
    /// so a bad configuration value degrades instead of crashing the proxy.
    pub(crate) fn clamped(self) -> Self {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        H2Settings {
            stream_window: self.stream_window.min(MAX_WINDOW),
            connection_window: self.connection_window.min(MAX_WINDOW),
            max_frame_size: self.max_frame_size.clamp(16 * 1024, (1 << 24) - 1),
            max_send_buffer: self.max_send_buffer.min(u32::MAX as usize),
        }
    }
}

impl Default for H2Settings {
    fn default() -> Self {
        let stream_window = 4 * 1024 * 1024;
        H2Settings {
            stream_window,
            connection_window: 4 * stream_window,
            max_frame_size: 64 * 1024,
            // Sized by the window, not beside it: see the type's documentation.
            max_send_buffer: stream_window as usize,
        }
    }
}

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// TLS + HTTP/2 handshakes must finish within this.
    pub handshake_timeout: Duration,
    /// After the drain signal, open streams get this long before connections are cut.
    pub drain_deadline: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised per connection. Clients pool up to 100
    /// streams per connection by default; this leaves room and still bounds one client.
    pub max_concurrent_streams: u32,
    /// Flow control and framing.
    pub h2: H2Settings,
    /// PINGs that find clients which vanished without closing; `None` disables them.
    pub keepalive: Option<Keepalive>,
    /// Bounds the lines written for failed handshakes and accepts (share one per process).
    pub log_throttle: Arc<LogThrottle>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            handshake_timeout: Duration::from_secs(10),
            drain_deadline: Duration::from_secs(30),
            max_concurrent_streams: 1000,
            h2: H2Settings::default(),
            keepalive: Some(Keepalive::default()),
            log_throttle: Arc::default(),
        }
    }
}

/// HTTP/2 PING keepalive. A peer that disappears without a FIN or RST (node lost, network
/// partition) otherwise leaves its connection, every tunnel on it, and their upstream
/// sockets open until TCP gives up many minutes later; a PING that goes unanswered
/// closes them after `interval + timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between PINGs.
    pub interval: Duration,
    /// How long the peer has to answer one.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        // Detects a dead peer within 30 s; one 17-byte frame per 20 s is free.
        Keepalive {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Completes when the peer fails to answer a keepalive PING in time; never completes when
/// keepalive is off or h2 gave no ping handle.
pub(crate) async fn keepalive_failed(
    ping_pong: Option<&mut h2::PingPong>,
    keepalive: Option<Keepalive>,
) {
    let (Some(ping_pong), Some(keepalive)) = (ping_pong, keepalive) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(keepalive.interval).await;
        let pong = tokio::time::timeout(keepalive.timeout, ping_pong.ping(h2::Ping::opaque()));
        match pong.await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                debug!(error = %err, "keepalive PING failed");
                return;
            }
            Err(_) => {
                debug!(timeout = ?keepalive.timeout, "keepalive PING unanswered");
                return;
            }
        }
    }
}

/// Counters for what the server did; cheap to read at any time (metrics, tests).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections that failed or timed out before HTTP/2 was up.
    pub handshakes_failed: AtomicU64,
    /// Connections fully established (TLS + HTTP/2).
    pub connections_established: AtomicU64,
    /// Tunnels opened (200 sent).
    pub streams_opened: AtomicU64,
    /// `CONNECT`s refused with a status.
    pub streams_refused: AtomicU64,
}

impl ServerStats {
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An HBONE server bound to a listener. Build with [`Server::new`], start with [`Server::run`].
pub struct Server<C, H> {
    listener: TcpListener,
    configs: Arc<C>,
    handler: Arc<H>,
    settings: Arc<ServerSettings>,
    stats: Arc<ServerStats>,
}

impl<C: ServerConfigSource, H: Handler> Server<C, H> {
    /// A server on an already bound listener (the caller binds, possibly inside a pod's
    /// network namespace).
    pub fn new(listener: TcpListener, configs: C, handler: H, settings: ServerSettings) -> Self {
        Server {
            listener,
            configs: Arc::new(configs),
            handler: Arc::new(handler),
            settings: Arc::new(settings),
            stats: Arc::default(),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Counters, shared with the running server.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Serves until `drain` completes, then drains: stops accepting, sends GOAWAY on every
    /// connection, waits up to the drain deadline for open streams, and cuts the rest.
    pub async fn run(self, drain: impl Future<Output = ()> + Send) {
        let Server {
            listener,
            configs,
            handler,
            settings,
            stats,
        } = self;
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(drain);
        loop {
            tokio::select! {
                () = &mut drain => break,
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            // Usually a per-connection failure (the peer reset before accept)
                            // or a transient lack of file descriptors; back off briefly rather
                            // than spin or give up.
                            let err = ServerError::Accept(err);
                            if let Some(suppressed) = settings.log_throttle.admit("hbone_accept") {
                                warn!(error = %err, suppressed, "accept failed");
                            }
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    ServerStats::inc(&stats.connections_accepted);
                    let Some(admission) = handler.admit(peer) else {
                        reset(tcp);
                        continue;
                    };
                    let conn = Connection {
                        configs: configs.clone(),
                        handler: handler.clone(),
                        settings: settings.clone(),
                        stats: stats.clone(),
                        drain: drain_rx.clone(),
                        peer,
                    };
                    connections.spawn(conn.serve(tcp, admission));
                }
                // Reap finished connection tasks so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let open = connections.len();
        info!(open, deadline = ?settings.drain_deadline, "HBONE server draining");
        let _ = drain_tx.send(true);
        let drained = tokio::time::timeout(settings.drain_deadline, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = connections.len(),
                "drain deadline passed, closing remaining HBONE connections"
            );
            connections.shutdown().await;
        }
    }
}

/// Pause after a failed `accept`: long enough not to spin on EMFILE, short enough that
/// serving resumes as soon as descriptors are free again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Closes a refused connection with RST: `SO_LINGER 0` makes the close abortive, so the
/// refusal costs no TIME_WAIT entry and the client learns at once.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// One accepted connection and what it needs.
struct Connection<C, H> {
    configs: Arc<C>,
    handler: Arc<H>,
    settings: Arc<ServerSettings>,
    stats: Arc<ServerStats>,
    drain: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl<C: ServerConfigSource, H: Handler> Connection<C, H> {
    async fn serve(mut self, tcp: TcpStream, admission: Admission) {
        let Admission {
            handshake: handshake_guard,
            connection: _connection_guard,
        } = admission;
        let peer = self.peer;
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(err) => {
                debug!(%peer, error = %err, "connection gone before handshake");
                return;
            }
        };
        // Tunnelled traffic is often request/response; do not let Nagle hold small writes.
        let _ = tcp.set_nodelay(true);
        let timeout = self.settings.handshake_timeout;
        let handshake = tokio::time::timeout(timeout, self.handshake(tcp, local)).await;
        drop(handshake_guard);
        let (mut h2, identity) = match handshake {
            Ok(Ok(established)) => established,
            Ok(Err(err)) => return self.handshake_failed(err),
            Err(_) => {
                return self.handshake_failed(ServerError::HandshakeTimeout { peer, timeout })
            }
        };
        ServerStats::inc(&self.stats.connections_established);
        debug!(%peer, %identity, "HBONE connection established");

        // Stream tasks live in this set so that when the connection is cut (drain deadline)
        // its streams go with it.
        let mut streams = JoinSet::new();
        let mut draining = *self.drain.borrow();
        if draining {
            h2.graceful_shutdown();
        }
        let mut ping_pong = h2.ping_pong();
        let keepalive = keepalive_failed(ping_pong.as_mut(), self.settings.keepalive);
        tokio::pin!(keepalive);
        loop {
            tokio::select! {
                // `accept` also drives the connection's I/O, for all streams; it returns None
                // once the connection is closed (after GOAWAY, once streams are done).
                next = h2.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let stream = StreamContext {
                            handler: self.handler.clone(),
                            stats: self.stats.clone(),
                            throttle: self.settings.log_throttle.clone(),
                            peer_identity: identity.clone(),
                            peer_addr: peer,
                            local_addr: local,
                        };
                        streams.spawn(stream.handle(request, respond));
                    }
                    Some(Err(err)) => {
                        debug!(%peer, error = %ServerError::Http2 { peer, source: err }, "HBONE connection ended");
                        break;
                    }
                    None => break,
                },
                changed = self.drain.changed(), if !draining => {
                    // Either drain was signalled or the server is gone: send GOAWAY, let
                    // open streams finish.
                    let _ = changed;
                    draining = true;
                    h2.graceful_shutdown();
                }
                Some(done) = streams.join_next(), if !streams.is_empty() => {
                    if let Err(err) = done {
                        if err.is_panic() {
                            warn!(%peer, %identity, "HBONE stream handler panicked");
                        }
                    }
                }
                () = &mut keepalive => {
                    info!(%peer, %identity, "HBONE client stopped answering PINGs, closing");
                    break;
                }
            }
        }
        // Dropping the connection fails whatever its streams still wait for, so their tasks
        // (and the upstream sockets they hold) end too.
        drop(h2);
        while streams.join_next().await.is_some() {}
    }

    /// Counts and reports a failed handshake; logs it, at most once per interval per cause
    /// (junk floods reach this at line rate).
    fn handshake_failed(&self, err: ServerError) {
        ServerStats::inc(&self.stats.handshakes_failed);
        self.handler.handshake_failed(&err);
        if let Some(suppressed) = self.settings.log_throttle.admit(err.cause()) {
            info!(peer = %self.peer, error = %err, suppressed, "HBONE handshake failed");
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        local: SocketAddr,
    ) -> Result<
        (
            h2::server::Connection<tokio_rustls::server::TlsStream<BufferedTcp>, Bytes>,
            Identity,
        ),
        ServerError,
    > {
        let peer = self.peer;
        let config = self
            .configs
            .server_config(local)
            .await
            .map_err(ServerError::Config)?;
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(BufferedTcp::with_capacity(TLS_READ_BUFFER, tcp))
            .await
            .map_err(|source| ServerError::Tls { peer, source })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(ServerError::Alpn {
                peer,
                alpn: session
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
            });
        }
        let identity =
            tls::peer_identity(session).map_err(|source| ServerError::Identity { peer, source })?;
        let h2 = self
            .h2_builder()
            .handshake(tls)
            .await
            .map_err(|source| ServerError::Http2 { peer, source })?;
        Ok((h2, identity))
    }

    fn h2_builder(&self) -> h2::server::Builder {
        let h2 = self.settings.h2.clamped();
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame_size)
            .max_send_buffer_size(h2.max_send_buffer)
            .max_concurrent_streams(self.settings.max_concurrent_streams)
            .max_local_error_reset_streams(Some(MAX_PEER_STREAM_ERRORS));
        if self.handler.carries_udp() {
            builder.enable_connect_protocol();
        }
        builder
    }
}

/// Streams h2 may reset on one connection because the peer sent them malformed (a `CONNECT`
/// without `:authority`, a bad `content-length`) before it ends that connection with GOAWAY
/// ENHANCE_YOUR_CALM. Each reset costs the server work the peer chose (the "made you reset"
/// floods); no HBONE client sends a malformed stream, so a peer over this is hostile and loses
/// only its own connection. h2's default, written here so that a change of default is ours.
pub const MAX_PEER_STREAM_ERRORS: usize = 1024;

/// What one stream's task needs.
struct StreamContext<H> {
    handler: Arc<H>,
    stats: Arc<ServerStats>,
    throttle: Arc<LogThrottle>,
    peer_identity: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

impl<H: Handler> StreamContext<H> {
    async fn handle(self, request: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        let (parts, body) = request.into_parts();
        let checked = check_request(&parts.method, &parts.uri).and_then(|authority| {
            let protocol = parts.extensions.get::<h2::ext::Protocol>();
            check_protocol(
                protocol,
                &parts.uri,
                &parts.headers,
                self.handler.carries_udp(),
            )
            .map(|(authority_or_target, protocol)| {
                (authority_or_target.unwrap_or(authority), protocol)
            })
        });
        let decision = match checked {
            Ok((authority, protocol)) => {
                let request = ConnectRequest {
                    peer_identity: self.peer_identity.clone(),
                    peer_addr: self.peer_addr,
                    local_addr: self.local_addr,
                    authority,
                    protocol,
                    headers: parts.headers,
                };
                self.handler.accept(&request).await.map(|a| (a, request))
            }
            Err(refusal) => Err(refusal),
        };
        let (accepted, request) = match decision {
            Ok(ok) => ok,
            Err(refusal) => {
                ServerStats::inc(&self.stats.streams_refused);
                if let Some(suppressed) = self.throttle.admit(refusal.cause()) {
                    info!(
                        peer = %self.peer_addr,
                        identity = %self.peer_identity,
                        uri = %parts.uri,
                        status = refusal.status().as_u16(),
                        reason = %refusal,
                        suppressed,
                        "HBONE CONNECT refused"
                    );
                }
                let _ = respond.send_response(status_response(refusal.status()), true);
                return;
            }
        };
        let mut ok = status_response(StatusCode::OK);
        if request.protocol == TunnelProtocol::Udp {
            // RFC 9298 section 3.3: the response announces the capsule protocol too.
            ok.headers_mut().insert(
                connect_udp::CAPSULE_PROTOCOL,
                connect_udp::CAPSULE_PROTOCOL_TRUE,
            );
        }
        let send = match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(err) => {
                debug!(peer = %self.peer_addr, authority = %request.authority, error = %err, "client went away before the tunnel opened");
                return;
            }
        };
        ServerStats::inc(&self.stats.streams_opened);
        let stream = TunnelStream::new(send, body, self.peer_identity, self.peer_addr, None);
        self.handler.serve(accepted, stream).await;
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// The protocol checks every stream passes before the handler sees it: method `CONNECT`,
/// `:authority` a literal `ip:port` with a non-zero port. Host names are refused rather than
/// resolved: the client already chose the address, and resolving here would let a client
/// steer the server's DNS.
fn check_request(method: &Method, uri: &http::Uri) -> Result<SocketAddr, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::MethodNotAllowed(format!(
            "{method} (HBONE only accepts CONNECT)"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Refusal::BadRequest("CONNECT without :authority".into()))?;
    addr_of(authority)
}

/// Classic `CONNECT` (no `:protocol`) must be in authority form; an extended `CONNECT`
/// must be CONNECT-UDP, which this handler carries, with an `https` scheme, a path naming a
/// literal target that agrees with `:authority`, and `capsule-protocol: ?1`. Gives the
/// target (when the path names it) and the protocol.
fn check_protocol(
    protocol: Option<&h2::ext::Protocol>,
    uri: &http::Uri,
    headers: &HeaderMap,
    carries_udp: bool,
) -> Result<(Option<SocketAddr>, TunnelProtocol), Refusal> {
    let Some(protocol) = protocol else {
        if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
            return Err(Refusal::BadRequest(format!(
                "CONNECT target {uri} is not in authority form"
            )));
        }
        return Ok((None, TunnelProtocol::Tcp));
    };
    if protocol.as_str() != connect_udp::PROTOCOL || !carries_udp {
        return Err(Refusal::NotImplemented(format!(
            "extended CONNECT for protocol {:?}",
            protocol.as_str()
        )));
    }
    if uri.scheme_str() != Some("https") {
        return Err(Refusal::BadRequest(format!(
            "CONNECT-UDP with scheme {:?}, expected https",
            uri.scheme_str()
        )));
    }
    let target = connect_udp::parse_path(uri.path()).map_err(Refusal::BadRequest)?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if addr_of_str(authority) != Some(target) {
        return Err(Refusal::BadRequest(format!(
            "CONNECT-UDP path names {target} but :authority is {authority:?}"
        )));
    }
    if headers.get(connect_udp::CAPSULE_PROTOCOL) != Some(&connect_udp::CAPSULE_PROTOCOL_TRUE) {
        return Err(Refusal::BadRequest(
            "CONNECT-UDP without capsule-protocol: ?1".into(),
        ));
    }
    Ok((Some(target), TunnelProtocol::Udp))
}

fn addr_of_str(authority: &str) -> Option<SocketAddr> {
    authority.parse().ok()
}

fn addr_of(authority: &http::uri::Authority) -> Result<SocketAddr, Refusal> {
    let addr: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Refusal::BadRequest(format!("authority {authority:?} is not an ip:port")))?;
    if addr.port() == 0 {
        return Err(Refusal::BadRequest(format!(
            "authority {authority:?} has port 0"
        )));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_must_be_a_literal_ip_and_port() {
        let ok = |s: &str| {
            let uri: http::Uri = s.parse().unwrap();
            check_request(&Method::CONNECT, &uri).and_then(|addr| {
                check_protocol(None, &uri, &HeaderMap::new(), true).map(|(target, protocol)| {
                    assert_eq!((target, protocol), (None, TunnelProtocol::Tcp));
                    addr
                })
            })
        };
        // Targets that are not even a valid URI never reach us (h2 rejects the stream), so
        // these are the ones that parse as a URI but are not an ip:port.
        assert_eq!(ok("10.0.0.1:8080"), Ok("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(ok("[fd00::1]:443"), Ok("[fd00::1]:443".parse().unwrap()));
        for bad in [
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "010.0.0.1:80",
            "1.2.3:80",
            "http://10.0.0.1:80/",
        ] {
            let refusal = ok(bad).unwrap_err();
            assert_eq!(
                refusal.status(),
                StatusCode::BAD_REQUEST,
                "{bad}: {refusal}"
            );
        }
    }

    #[test]
    fn connect_udp_requests_are_checked() {
        let udp = h2::ext::Protocol::from_static("connect-udp");
        let mut capsules = HeaderMap::new();
        capsules.insert(
            connect_udp::CAPSULE_PROTOCOL,
            connect_udp::CAPSULE_PROTOCOL_TRUE,
        );
        let check = |protocol: &h2::ext::Protocol, uri: &str, headers: &HeaderMap, udp| {
            check_protocol(Some(protocol), &uri.parse().unwrap(), headers, udp)
        };
        let good = "https://10.0.0.1:53/.well-known/masque/udp/10.0.0.1/53/";
        assert_eq!(
            check(&udp, good, &capsules, true),
            Ok((Some("10.0.0.1:53".parse().unwrap()), TunnelProtocol::Udp))
        );
        let v6 = "https://[fd00::1]:53/.well-known/masque/udp/fd00%3A%3A1/53/";
        assert_eq!(
            check(&udp, v6, &capsules, true),
            Ok((Some("[fd00::1]:53".parse().unwrap()), TunnelProtocol::Udp))
        );
        let status = |r: Result<_, Refusal>| r.unwrap_err().status().as_u16();
        // A handler that carries only TCP, or another protocol.
        assert_eq!(status(check(&udp, good, &capsules, false)), 501);
        let ws = h2::ext::Protocol::from_static("websocket");
        assert_eq!(status(check(&ws, good, &capsules, true)), 501);
        // No capsule protocol, a path and authority that disagree, a host name, plain http.
        assert_eq!(status(check(&udp, good, &HeaderMap::new(), true)), 400);
        let other = "https://10.0.0.2:53/.well-known/masque/udp/10.0.0.1/53/";
        assert_eq!(status(check(&udp, other, &capsules, true)), 400);
        let named = "https://10.0.0.1:53/.well-known/masque/udp/dns.example/53/";
        assert_eq!(status(check(&udp, named, &capsules, true)), 400);
        let http = "http://10.0.0.1:53/.well-known/masque/udp/10.0.0.1/53/";
        assert_eq!(status(check(&udp, http, &capsules, true)), 400);
    }

    #[test]
    fn only_connect_is_allowed() {
        let refusal = check_request(&Method::GET, &"10.0.0.1:80".parse().unwrap()).unwrap_err();
        assert_eq!(refusal.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn refusals_map_to_their_statuses() {
        let cases = [
            (Refusal::Unauthenticated("x".into()), 401),
            (Refusal::Forbidden("x".into()), 403),
            (Refusal::Unreachable("x".into()), 503),
            (Refusal::BadRequest("x".into()), 400),
            (Refusal::MethodNotAllowed("x".into()), 405),
            (Refusal::NotImplemented("x".into()), 501),
        ];
        for (refusal, status) in cases {
            assert_eq!(refusal.status().as_u16(), status, "{refusal}");
        }
    }
}
