//! The HBONE connection pool: mTLS HTTP/2 connections to HBONE peers, each carrying many
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
//! GOAWAY, I/O errors, unanswered keepalive PINGs) are evicted by the task that drives them;
//! a stream that failed on a dead connection is retried once on another one, but only when
//! the peer never processed it (the connection was already unusable, REFUSED_STREAM, or not
//! covered by a GOAWAY). Connections without streams for [`PoolConfig::idle_timeout`] are
//! closed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::client::{
    self, open_stream, Attempt, ClientConnection, ConnectError, ConnectTarget, ConnectionSettings,
    DefaultSocketFactory, Established, SocketFactory,
};
use crate::connect_udp::TunnelProtocol;
use crate::server::{keepalive_failed, H2Settings, Keepalive};
use crate::stream::TunnelStream;
use crate::Identity;

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
        self.open(target, TunnelProtocol::Tcp).await
    }

    /// Opens a CONNECT-UDP tunnel to `target.authority` (RFC 9298), in the same pooled
    /// connections as TCP tunnels; the stream then carries DATAGRAM capsules
    /// ([`crate::capsule`]). Fails with [`ConnectError::UdpUnsupported`] when the peer does
    /// not enable extended `CONNECT`.
    pub async fn connect_udp(&self, target: ConnectTarget) -> Result<TunnelStream, ConnectError> {
        self.open(target, TunnelProtocol::Udp).await
    }

    async fn open(
        &self,
        target: ConnectTarget,
        protocol: TunnelProtocol,
    ) -> Result<TunnelStream, ConnectError> {
        let key = Key {
            source: target.source.clone(),
            peer: target.peer,
            expected: target.expected_identity.clone(),
        };
        let entry = self.entry(&key);
        let result = self.connect_with(&key, &entry, &target, protocol).await;
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
        protocol: TunnelProtocol,
    ) -> Result<TunnelStream, ConnectError> {
        let mut retried = false;
        loop {
            let slot = self.checkout(key, entry, target).await?;
            let conn = slot.conn.clone();
            let attempt = open_stream(
                conn.send.clone(),
                target,
                protocol,
                self.inner.config.response_timeout,
                &|| conn.mark_dead(),
                Box::new(slot),
            )
            .await;
            match attempt {
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

    /// Opens a connection for `key` and starts the task that drives it until it ends or
    /// idles out.
    async fn establish(
        &self,
        key: &Key,
        target: &ConnectTarget,
    ) -> Result<Arc<Conn>, ConnectError> {
        let config = &self.inner.config;
        let peer = target.peer;
        let Established {
            send,
            connection,
            ping_pong,
        } = client::establish(
            target,
            &*self.inner.factory,
            ConnectionSettings {
                connect_timeout: config.connect_timeout,
                max_streams: config.max_streams_per_connection,
                h2: &config.h2,
            },
        )
        .await?;
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            dead: AtomicBool::new(false),
            limit: config.max_streams_per_connection,
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

/// Drives one connection's I/O until it ends, stays idle too long or stops answering
/// keepalive PINGs, then evicts it.
async fn drive(
    pool: Weak<Inner>,
    key: Key,
    conn: Weak<Conn>,
    mut connection: ClientConnection,
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
