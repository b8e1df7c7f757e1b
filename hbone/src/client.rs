//! The HBONE client: a pool of mTLS HTTP/2 connections to HBONE peers, each carrying many
//! `CONNECT` streams, one per tunnelled user connection.
//!
//! Connections are pooled by (source identity, peer address, expected peer identity). The
//! source identity is part of the key because the client certificate *is* the source's
//! identity to the peer's policy: a connection opened with workload A's certificate must
//! never carry workload B's traffic, so connections are never shared across source
//! identities.
//!
//! A connection carries at most `min(PoolConfig::max_streams_per_connection, the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS)` streams; when every connection of a key is full, another
//! one is opened. Callers arriving for a key while a connection is being opened wait for it
//! (one per-key async mutex) instead of each opening their own, and if that attempt fails
//! they get its error instead of retrying one by one. Dead connections (closed by the peer,
//! GOAWAY, I/O errors) are evicted by the task that drives them; a stream that failed on a
//! dead connection is retried once on a fresh one, but only when the peer never processed it
//! (the connection was already unusable, REFUSED_STREAM, or not covered by a GOAWAY).
//! Connections without streams for [`PoolConfig::idle_timeout`] are closed.
//!
//! Sockets come from a [`SocketFactory`] so the node proxy can create them inside a pod's
//! network namespace, or mark them (SO_MARK) so its own traffic is not captured again.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::server::{keepalive_failed, BufferedTcp, H2Settings, Keepalive, TLS_READ_BUFFER};
use crate::stream::TunnelStream;
use crate::tls::ALPN_H2;
use crate::Identity;

/// Where to open a tunnel, and as whom.
#[derive(Clone)]
pub struct ConnectTarget {
    /// The workload the traffic comes from; its certificate is in `tls`.
    pub source: Identity,
    /// Client TLS configuration presenting `source`'s certificate and verifying that the
    /// peer is `expected_identity` (see `tls::client_config`).
    pub tls: Arc<rustls::ClientConfig>,
    /// The HBONE peer (a node proxy or waypoint, usually port 15008).
    pub peer: SocketAddr,
    /// The identity the peer must prove.
    pub expected_identity: Identity,
    /// The tunnel's destination, sent as the `CONNECT` `:authority`.
    pub authority: SocketAddr,
    /// Extra request headers (e.g. trace context, forwarded client address).
    pub headers: HeaderMap,
}

impl fmt::Debug for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectTarget")
            .field("source", &self.source)
            .field("peer", &self.peer)
            .field("expected_identity", &self.expected_identity)
            .field("authority", &self.authority)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// The step that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect to the peer.
    Tcp,
    /// TLS handshake.
    Tls,
    /// HTTP/2 connection preface.
    Http2,
    /// Waiting for the `CONNECT` response (the peer may be connecting to the destination).
    Response,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Tcp => "TCP connect",
            Phase::Tls => "TLS handshake",
            Phase::Http2 => "HTTP/2 handshake",
            Phase::Response => "CONNECT response",
        })
    }
}

/// Why a tunnel could not be opened. Causes are behind `Arc` so one failed connection
/// attempt can be reported to every caller that was waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The socket factory could not create a socket.
    #[error("creating a socket to reach {peer} failed: {source}")]
    Socket {
        peer: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    /// The TCP connection to the HBONE peer failed (refused, unreachable...).
    #[error("TCP connect to HBONE peer {peer} failed: {source}")]
    Tcp {
        peer: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    /// The TLS handshake failed, e.g. the peer is not `expected` or does not trust us.
    #[error("TLS handshake with HBONE peer {peer} (expected {expected}) failed: {source}")]
    Tls {
        peer: SocketAddr,
        expected: Identity,
        #[source]
        source: Arc<io::Error>,
    },
    /// The peer did not negotiate ALPN `h2`.
    #[error("HBONE peer {peer} negotiated ALPN {alpn:?} instead of h2")]
    Alpn {
        peer: SocketAddr,
        alpn: Option<String>,
    },
    /// HTTP/2 failed (handshake, connection, or the stream before a response).
    #[error("HTTP/2 with HBONE peer {peer} failed: {source}")]
    Http2 {
        peer: SocketAddr,
        #[source]
        source: Arc<h2::Error>,
    },
    /// The peer answered 401: the source is not authenticated for this destination.
    #[error("HBONE peer {peer} refused CONNECT {authority}: 401 unauthenticated")]
    Unauthenticated {
        peer: SocketAddr,
        authority: SocketAddr,
    },
    /// The peer answered 403: policy denies the connection.
    #[error("HBONE peer {peer} refused CONNECT {authority}: 403 forbidden")]
    Forbidden {
        peer: SocketAddr,
        authority: SocketAddr,
    },
    /// The peer answered 503: it could not reach the destination.
    #[error("HBONE peer {peer} refused CONNECT {authority}: 503 destination unreachable")]
    Unreachable {
        peer: SocketAddr,
        authority: SocketAddr,
    },
    /// The peer answered with another non-200 status (400 for a malformed request, ...).
    #[error("HBONE peer {peer} refused CONNECT {authority}: {status}")]
    Refused {
        peer: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    /// The destination cannot be written as a `CONNECT` authority (e.g. an IPv6 scope id).
    #[error("{authority} cannot be sent as a CONNECT authority")]
    InvalidAuthority { authority: SocketAddr },
    /// A step did not finish in time.
    #[error("{phase} with HBONE peer {peer} timed out after {after:?}")]
    Timeout {
        peer: SocketAddr,
        phase: Phase,
        after: Duration,
    },
}

impl ConnectError {
    /// The status the peer answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Unauthenticated { .. } => Some(StatusCode::UNAUTHORIZED),
            ConnectError::Forbidden { .. } => Some(StatusCode::FORBIDDEN),
            ConnectError::Unreachable { .. } => Some(StatusCode::SERVICE_UNAVAILABLE),
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn from_status(peer: SocketAddr, authority: SocketAddr, status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => ConnectError::Unauthenticated { peer, authority },
            StatusCode::FORBIDDEN => ConnectError::Forbidden { peer, authority },
            StatusCode::SERVICE_UNAVAILABLE => ConnectError::Unreachable { peer, authority },
            status => ConnectError::Refused {
                peer,
                authority,
                status,
            },
        }
    }
}

/// Makes the sockets the pool connects with.
pub trait SocketFactory: Send + Sync + 'static {
    /// A fresh, unconnected socket to reach `peer` on behalf of `source` (the node proxy
    /// picks the pod's network namespace by source).
    fn new_socket(&self, source: &Identity, peer: SocketAddr) -> io::Result<TcpSocket>;
}

/// Plain sockets in the current network namespace, with TCP_NODELAY.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultSocketFactory;

impl SocketFactory for DefaultSocketFactory {
    fn new_socket(&self, _source: &Identity, peer: SocketAddr) -> io::Result<TcpSocket> {
        let socket = if peer.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // HTTP/2 frames small writes (a request, a ping-pong) on their own: Nagle would only
        // add latency.
        socket.set_nodelay(true)?;
        Ok(socket)
    }
}

/// Pool tuning.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened (lowered to the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS when that is lower). Many streams per connection save
    /// handshakes; too many put unrelated tunnels behind one TCP congestion window.
    pub max_streams_per_connection: usize,
    /// TCP connect + TLS + HTTP/2 handshakes must finish within this.
    pub connect_timeout: Duration,
    /// How long to wait for the `CONNECT` response (the peer connects to the destination
    /// before answering).
    pub response_timeout: Duration,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Flow control and framing.
    pub h2: H2Settings,
    /// PINGs that find peers which vanished without closing; `None` disables them.
    pub keepalive: Option<Keepalive>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            h2: H2Settings::default(),
            keepalive: Some(Keepalive::default()),
        }
    }
}

/// Counters for what the pool did.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// HTTP/2 connections established.
    pub connections_opened: AtomicU64,
    /// Connection attempts that failed.
    pub connections_failed: AtomicU64,
    /// Tunnels opened (200 received).
    pub streams_opened: AtomicU64,
    /// Streams retried on a fresh connection because the peer never processed them.
    pub retries: AtomicU64,
}

/// The pool. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: PoolConfig,
    factory: Arc<dyn SocketFactory>,
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
    next_id: AtomicU64,
    stats: PoolStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Identity,
    peer: SocketAddr,
    expected: Identity,
}

/// The connections of one key.
#[derive(Default)]
struct Entry {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while opening a connection for this key; holds the error of the last attempt
    /// so that callers who waited for a failed attempt share its outcome.
    connecting: tokio::sync::Mutex<Option<ConnectError>>,
    /// Connection attempts finished for this key (success or failure).
    attempts: AtomicU64,
}

/// `Conn::active` value of a connection closed for idleness: no stream may be added.
const CLOSED: usize = usize::MAX;

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Streams open on this connection, or [`CLOSED`].
    active: AtomicUsize,
    /// When `active` last dropped to 0.
    idle_since: Mutex<Instant>,
    /// The driver task saw the connection end, or a request found it unusable.
    dead: AtomicBool,
    limit: usize,
    peer: SocketAddr,
    peer_identity: Identity,
}

/// One reserved stream on a connection; released when the tunnel is dropped.
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
        }
    }
}

/// Locks a mutex; a panic elsewhere while holding it leaves plain data that is still
/// consistent (counters, lists), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    fn try_reserve(self: &Arc<Self>) -> Option<Slot> {
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        let limit = self.limit.min(self.send.current_max_send_streams());
        let mut current = self.active.load(Ordering::Acquire);
        loop {
            if current == CLOSED || current >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Slot { conn: self.clone() }),
                Err(actual) => current = actual,
            }
        }
    }

    fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }
}

impl Entry {
    /// A stream on an existing connection with room, dropping dead ones on the way.
    fn try_reserve(&self) -> Option<Slot> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| {
            !c.dead.load(Ordering::Acquire) && c.active.load(Ordering::Acquire) != CLOSED
        });
        // Oldest first: fill existing connections so that spare ones go idle and close.
        conns.iter().find_map(|c| c.try_reserve())
    }
}

/// Outcome of one attempt to open a stream.
enum Attempt {
    Open(TunnelStream),
    /// The peer never processed the request: safe to retry on another connection.
    Retry(ConnectError),
    Fail(ConnectError),
}

impl Pool {
    /// A pool with plain sockets ([`DefaultSocketFactory`]).
    pub fn new(config: PoolConfig) -> Self {
        Pool::with_socket_factory(config, Arc::new(DefaultSocketFactory))
    }

    /// A pool whose sockets come from `factory`.
    pub fn with_socket_factory(config: PoolConfig, factory: Arc<dyn SocketFactory>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                config,
                factory,
                entries: Mutex::default(),
                next_id: AtomicU64::new(0),
                stats: PoolStats::default(),
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Live pooled connections, all keys together.
    pub fn connection_count(&self) -> usize {
        let entries: Vec<Arc<Entry>> = lock(&self.inner.entries).values().cloned().collect();
        entries
            .iter()
            .map(|e| {
                lock(&e.conns)
                    .iter()
                    .filter(|c| {
                        !c.dead.load(Ordering::Acquire)
                            && c.active.load(Ordering::Acquire) != CLOSED
                    })
                    .count()
            })
            .sum()
    }

    /// Opens a tunnel to `target.authority` through `target.peer`, reusing a pooled
    /// connection for the same (source, peer, expected identity) when one has room.
    pub async fn connect(&self, target: ConnectTarget) -> Result<TunnelStream, ConnectError> {
        let key = Key {
            source: target.source.clone(),
            peer: target.peer,
            expected: target.expected_identity.clone(),
        };
        let entry = self.entry(&key);
        let result = self.connect_with(&key, &entry, &target).await;
        if result.is_err() {
            // A key whose every attempt failed has no connection whose driver would ever
            // remove it; do it here so unreachable peers do not accumulate.
            drop(entry);
            self.inner.forget_if_unused(&key);
        }
        result
    }

    async fn connect_with(
        &self,
        key: &Key,
        entry: &Arc<Entry>,
        target: &ConnectTarget,
    ) -> Result<TunnelStream, ConnectError> {
        let mut retried = false;
        loop {
            let slot = self.checkout(key, entry, target).await?;
            match open_stream(slot, target, self.inner.config.response_timeout).await {
                Attempt::Open(stream) => {
                    self.inner
                        .stats
                        .streams_opened
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Attempt::Retry(err) if !retried => {
                    debug!(peer = %target.peer, error = %err, "stream not processed by the peer, retrying on another connection");
                    self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                    retried = true;
                }
                Attempt::Retry(err) | Attempt::Fail(err) => return Err(err),
            }
        }
    }

    /// Keys currently in the pool (with connections, or callers waiting for one).
    pub fn key_count(&self) -> usize {
        lock(&self.inner.entries).len()
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        lock(&self.inner.entries)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Reserves a stream on a pooled connection, opening a connection if all are full.
    async fn checkout(
        &self,
        key: &Key,
        entry: &Arc<Entry>,
        target: &ConnectTarget,
    ) -> Result<Slot, ConnectError> {
        if let Some(slot) = entry.try_reserve() {
            return Ok(slot);
        }
        let attempts_seen = entry.attempts.load(Ordering::Acquire);
        let mut last_error = entry.connecting.lock().await;
        // Someone else may have opened a connection (or failed to) while we waited.
        if let Some(slot) = entry.try_reserve() {
            return Ok(slot);
        }
        if entry.attempts.load(Ordering::Acquire) != attempts_seen {
            if let Some(err) = last_error.as_ref() {
                return Err(err.clone());
            }
        }
        let result = self.establish(key, target).await;
        entry.attempts.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(conn) => {
                *last_error = None;
                let slot = conn.try_reserve();
                lock(&entry.conns).push(conn);
                match slot {
                    Some(slot) => Ok(slot),
                    // Only when the peer allows zero streams; a fresh connection otherwise
                    // always has room.
                    None => Err(ConnectError::Http2 {
                        peer: target.peer,
                        source: Arc::new(h2::Error::from(Reason::REFUSED_STREAM)),
                    }),
                }
            }
            Err(err) => {
                self.inner
                    .stats
                    .connections_failed
                    .fetch_add(1, Ordering::Relaxed);
                *last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    /// TCP, TLS, HTTP/2; then a task drives the connection until it ends or idles out.
    async fn establish(
        &self,
        key: &Key,
        target: &ConnectTarget,
    ) -> Result<Arc<Conn>, ConnectError> {
        let config = &self.inner.config;
        let peer = target.peer;
        let after = config.connect_timeout;
        let deadline = Instant::now() + after;
        let timeout = |phase| ConnectError::Timeout { peer, phase, after };

        let socket = self
            .inner
            .factory
            .new_socket(&target.source, peer)
            .map_err(|e| ConnectError::Socket {
                peer,
                source: Arc::new(e),
            })?;
        let tcp: TcpStream = tokio::time::timeout_at(deadline, socket.connect(peer))
            .await
            .map_err(|_| timeout(Phase::Tcp))?
            .map_err(|e| ConnectError::Tcp {
                peer,
                source: Arc::new(e),
            })?;
        let _ = tcp.set_nodelay(true);

        // The server name is not what is verified (the TLS configuration checks the peer's
        // SPIFFE identity); every peer gets the same placeholder.
        let server_name = crate::tls::server_name();
        let tls = tokio::time::timeout_at(
            deadline,
            tokio_rustls::TlsConnector::from(target.tls.clone()).connect(
                server_name,
                BufferedTcp::with_capacity(TLS_READ_BUFFER, tcp),
            ),
        )
        .await
        .map_err(|_| timeout(Phase::Tls))?
        .map_err(|e| ConnectError::Tls {
            peer,
            expected: target.expected_identity.clone(),
            source: Arc::new(e),
        })?;
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn != Some(ALPN_H2) {
            return Err(ConnectError::Alpn {
                peer,
                alpn: alpn.map(|p| String::from_utf8_lossy(p).into_owned()),
            });
        }

        let h2 = config.h2.clamped();
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame_size)
            .max_send_buffer_size(h2.max_send_buffer)
            // Until the peer's SETTINGS arrive, assume it takes what we would send anyway.
            .initial_max_send_streams(config.max_streams_per_connection)
            .enable_push(false);
        let (send, mut connection) = tokio::time::timeout_at(deadline, builder.handshake(tls))
            .await
            .map_err(|_| timeout(Phase::Http2))?
            .map_err(|e| ConnectError::Http2 {
                peer,
                source: Arc::new(e),
            })?;
        // Wait for the peer's SETTINGS before handing out streams: until they arrive we do
        // not know its SETTINGS_MAX_CONCURRENT_STREAMS, and streams beyond it would queue
        // inside h2 (stalling their callers) instead of going to another connection. The
        // peer sends SETTINGS first, so once it answered a PING they have been applied.
        // Costs one round trip per new connection, not per stream. It is also where a
        // server that refused our certificate says so: in TLS 1.3 the client's handshake
        // completes before the server has checked the client.
        let mut ping_pong = connection.ping_pong();
        let settled = async {
            let ping = async {
                match ping_pong.as_mut() {
                    Some(ping_pong) => ping_pong.ping(h2::Ping::opaque()).await.map(drop),
                    None => Ok(()),
                }
            };
            tokio::select! {
                pong = ping => pong,
                // The connection must be polled for the PONG to arrive; it ending first
                // means the peer closed it.
                ended = &mut connection => Err(ended
                    .err()
                    .unwrap_or_else(|| h2::Error::from(Reason::REFUSED_STREAM))),
            }
        };
        tokio::time::timeout_at(deadline, settled)
            .await
            .map_err(|_| timeout(Phase::Http2))?
            .map_err(|e| setup_error(peer, &target.expected_identity, e))?;

        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            dead: AtomicBool::new(false),
            limit: config.max_streams_per_connection,
            peer,
            peer_identity: target.expected_identity.clone(),
        });
        tokio::spawn(drive(
            Arc::downgrade(&self.inner),
            key.clone(),
            Arc::downgrade(&conn),
            connection,
            ping_pong,
            config.idle_timeout,
            config.keepalive,
        ));
        self.inner
            .stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        debug!(%peer, source = %key.source, id = conn.id, "HBONE connection established");
        Ok(conn)
    }
}

/// An HTTP/2 error while a connection is being set up, as a TLS error when it is one: a
/// TLS 1.3 server reports a refused client certificate with an alert after the client's
/// handshake already completed, so it surfaces here rather than in the handshake.
/// tokio-rustls reports every TLS failure (alerts included) as `InvalidData`, which TCP
/// never produces, and h2 keeps only the kind and message of I/O errors, so the kind is
/// what tells them apart.
fn setup_error(peer: SocketAddr, expected: &Identity, err: h2::Error) -> ConnectError {
    let is_tls = err
        .get_io()
        .is_some_and(|io| io.kind() == io::ErrorKind::InvalidData);
    if !is_tls {
        return ConnectError::Http2 {
            peer,
            source: Arc::new(err),
        };
    }
    match err.into_io() {
        Some(io) => ConnectError::Tls {
            peer,
            expected: expected.clone(),
            source: Arc::new(io),
        },
        // Not reached: `is_tls` saw an I/O error.
        None => ConnectError::Http2 {
            peer,
            source: Arc::new(h2::Error::from(Reason::PROTOCOL_ERROR)),
        },
    }
}

/// Drives one connection's I/O until it ends, stays idle too long or stops answering
/// keepalive PINGs, then evicts it.
async fn drive(
    pool: Weak<Inner>,
    key: Key,
    conn: Weak<Conn>,
    mut connection: h2::client::Connection<tokio_rustls::client::TlsStream<BufferedTcp>, Bytes>,
    mut ping_pong: Option<h2::PingPong>,
    idle_timeout: Duration,
    keepalive: Option<Keepalive>,
) {
    let id = conn.upgrade().map(|c| c.id);
    let ended = tokio::select! {
        result = &mut connection => {
            debug!(peer = %key.peer, ?id, ?result, "HBONE connection ended");
            true
        }
        () = wait_idle(conn.clone(), idle_timeout) => {
            debug!(peer = %key.peer, ?id, "closing idle HBONE connection");
            false
        }
        () = keepalive_failed(ping_pong.as_mut(), keepalive) => {
            // Dropping the connection below fails its streams at once.
            info!(peer = %key.peer, ?id, "HBONE peer stopped answering PINGs, closing");
            true
        }
    };
    if let Some(conn) = conn.upgrade() {
        conn.mark_dead();
    }
    if let (Some(pool), Some(id)) = (pool.upgrade(), id) {
        pool.evict(&key, id);
    }
    if !ended {
        // Out of the pool and without streams, nothing references the connection any more:
        // h2 sends GOAWAY and the connection future completes. Bounded in case the peer
        // stops reading.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }
}

/// Returns once the connection has had no stream for `idle_timeout` and was marked
/// [`CLOSED`] (atomically, so no stream can be added after the decision), or is gone.
async fn wait_idle(conn: Weak<Conn>, idle_timeout: Duration) {
    loop {
        let wait = {
            let Some(conn) = conn.upgrade() else { return };
            if conn.active.load(Ordering::Acquire) == 0 {
                let deadline = *lock(&conn.idle_since) + idle_timeout;
                let now = Instant::now();
                if now < deadline {
                    deadline - now
                } else if conn
                    .active
                    .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return;
                } else {
                    idle_timeout
                }
            } else {
                idle_timeout
            }
        };
        tokio::time::sleep(wait).await;
    }
}

impl Inner {
    fn evict(&self, key: &Key, id: u64) {
        self.remove_and_forget(key, Some(id));
    }

    fn forget_if_unused(&self, key: &Key) {
        self.remove_and_forget(key, None);
    }

    /// Removes connection `id` from `key`, then forgets the key if it has no connection
    /// left and no caller (each holds a clone of the entry) is using it.
    fn remove_and_forget(&self, key: &Key, id: Option<u64>) {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get(key) {
            let empty = {
                let mut conns = lock(&entry.conns);
                if let Some(id) = id {
                    conns.retain(|c| c.id != id);
                }
                conns.is_empty()
            };
            if empty && Arc::strong_count(entry) == 1 {
                entries.remove(key);
            }
        }
    }
}

/// Sends the `CONNECT` on the reserved connection and waits for the answer.
async fn open_stream(slot: Slot, target: &ConnectTarget, response_timeout: Duration) -> Attempt {
    let conn = slot.conn.clone();
    let peer = target.peer;
    let http2 = |e: h2::Error| ConnectError::Http2 {
        peer,
        source: Arc::new(e),
    };
    let deadline = Instant::now() + response_timeout;
    let timed_out = ConnectError::Timeout {
        peer,
        phase: Phase::Response,
        after: response_timeout,
    };

    // `ready` fails only when the connection is already unusable: nothing was sent.
    let ready = tokio::time::timeout_at(deadline, conn.send.clone().ready()).await;
    let mut send = match ready {
        Err(_) => return Attempt::Fail(timed_out),
        Ok(Err(e)) => {
            conn.mark_dead();
            return Attempt::Retry(http2(e));
        }
        Ok(Ok(send)) => send,
    };

    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = match http::uri::Authority::try_from(target.authority.to_string()) {
        Ok(authority) => http::Uri::from(authority),
        // A SocketAddr always prints as a valid authority; kept total rather than unwrapped.
        Err(_) => {
            return Attempt::Fail(ConnectError::InvalidAuthority {
                authority: target.authority,
            })
        }
    };
    *request.headers_mut() = target.headers.clone();

    let (response, send_stream) = match send.send_request(request, false) {
        Ok(sent) => sent,
        // The connection was closed or went away under us: the request was not sent.
        Err(e) if e.is_go_away() || e.is_io() => {
            conn.mark_dead();
            return Attempt::Retry(http2(e));
        }
        // Anything else is about the request itself (e.g. a header HTTP/2 forbids).
        Err(e) => return Attempt::Fail(http2(e)),
    };

    let response = match tokio::time::timeout_at(deadline, response).await {
        Err(_) => return Attempt::Fail(timed_out),
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            // REFUSED_STREAM, and streams above a graceful GOAWAY's last stream id, were
            // never processed by the peer (RFC 9113 8.7), so another connection may try.
            let unprocessed = e.reason() == Some(Reason::REFUSED_STREAM)
                || (e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR));
            if e.is_go_away() || e.is_io() {
                conn.mark_dead();
            }
            return if unprocessed {
                Attempt::Retry(http2(e))
            } else {
                Attempt::Fail(http2(e))
            };
        }
    };
    if response.status() != StatusCode::OK {
        return Attempt::Fail(ConnectError::from_status(
            peer,
            target.authority,
            response.status(),
        ));
    }
    let peer_identity = conn.peer_identity.clone();
    let peer_addr = conn.peer;
    Attempt::Open(TunnelStream::new(
        send_stream,
        response.into_body(),
        peer_identity,
        peer_addr,
        Some(Box::new(slot)),
    ))
}
