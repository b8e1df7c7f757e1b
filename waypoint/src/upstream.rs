//! Sending requests to endpoints: an HBONE tunnel to the endpoint's ztunnel (`pod ip:15008`,
//! `:authority` = `pod ip:target port`, the waypoint's own certificate, the endpoint's identity
//! expected), or for an external service's instance a TCP connection straight to it (its
//! name resolved first, for resolution DNS) with TLS on top when the port originates it;
//! then hyper's HTTP/1.1 or HTTP/2 client, pooled per endpoint.
//!
//! HTTP/2 (and gRPC) share one hyper connection per endpoint (multiplexed, reopened when it
//! closes). HTTP/1.1 keeps idle connections per endpoint for reuse; a connection goes back to
//! the pool when its response head arrives and is handed out again only once hyper says it
//! is ready (its previous response body finished), and it is retired after
//! `maxRequestsPerConnection` requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ambit_hbone::client::{ConnectError, ConnectTarget};
use ambit_hbone::copy::{Pipe, Plain};
use ambit_hbone::pool::Pool;
use ambit_hbone::tls::{self, RotatingCert, TrustBundle};
use ambit_hbone::Identity;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::state::{Direct, Peer, Upstream};
use crate::Body;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 64;
/// Endpoints tracked before those with nothing pooled are forgotten.
const MAX_ENDPOINTS: usize = 1024;

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The HBONE tunnel could not be opened (flag `UF`).
    #[error("opening HBONE tunnel to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: ConnectError,
    },
    /// No TLS client config for the endpoint's identity.
    #[error("TLS config for {identity}: {source}")]
    Tls {
        identity: Identity,
        #[source]
        source: tls::TlsError,
    },
    /// The HTTP handshake over the tunnel failed (flag `UF`).
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The attempt exceeded the route's per-try timeout (`timeouts.backendRequest`).
    #[error("request to {addr} timed out after {after:?}")]
    Timeout {
        addr: SocketAddr,
        after: std::time::Duration,
    },
    /// An external instance's name did not resolve (flag `UF`).
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// No connection to an external instance (flag `UF`).
    #[error("connecting to {dest}: {source}")]
    Dial {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake originated to an external instance failed (flag `UF`).
    #[error("TLS to {dest}: {source}")]
    OriginateTls {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    /// The request failed after the connection was up (flag `UC`: reset or closed).
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// True when no connection was made, so nothing reached the application.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::Resolve { .. }
                | UpstreamError::Dial { .. }
                | UpstreamError::OriginateTls { .. }
        )
    }
}

/// The HTTP version spoken to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// A connection to an endpoint, of whichever kind (a tunnel keeps its own zero-copy
/// [`Pipe`] for the opaque TCP copy).
pub trait Io: Pipe + Send {}
impl<T: Pipe + Send> Io for T {}

/// How long dialling an external instance may take (each resolved address).
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pooled connections are per endpoint: its address, and its name when it is resolved
/// when dialled (such endpoints share an unspecified address).
type ConnKey = (SocketAddr, Option<String>);

fn conn_key(up: &Upstream) -> ConnKey {
    match &up.peer {
        Peer::External(d) => (up.addr, d.host.clone()),
        Peer::Mesh { .. } => (up.addr, None),
    }
}

#[derive(Default)]
struct Conns {
    h1: Vec<(http1::SendRequest<Body>, u32)>,
    h2: Option<http2::SendRequest<Body>>,
    /// Held while an HTTP/2 connection is being opened, so concurrent first requests share
    /// one connection instead of each opening its own.
    h2_opening: Arc<tokio::sync::Mutex<()>>,
}

/// Upstream connections of the waypoint.
#[derive(Clone)]
pub struct Upstreams {
    pool: Pool,
    source: Identity,
    cert: RotatingCert,
    bundle: TrustBundle,
    hbone_port: u16,
    tls: Arc<Mutex<HashMap<Identity, Arc<rustls::ClientConfig>>>>,
    conns: Arc<Mutex<HashMap<ConnKey, Conns>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("source", &self.source)
            .field("hbone_port", &self.hbone_port)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Upstreams {
    /// Tunnels as `source` (whose certificate `cert` holds) to peers on `hbone_port`.
    pub fn new(
        pool: Pool,
        source: Identity,
        cert: RotatingCert,
        bundle: TrustBundle,
        hbone_port: u16,
    ) -> Self {
        Upstreams {
            pool,
            source,
            cert,
            bundle,
            hbone_port,
            tls: Arc::default(),
            conns: Arc::default(),
        }
    }

    /// A connection to `up`, for raw TCP or for a new HTTP connection: an HBONE tunnel to
    /// a mesh endpoint, TCP (and TLS when originating) to an external one.
    pub async fn connect(&self, up: &Upstream) -> Result<Box<dyn Io>, UpstreamError> {
        match &up.peer {
            Peer::Mesh { identity, .. } => Ok(Box::new(self.tunnel(up.addr, identity).await?)),
            Peer::External(d) => self.dial(up, d).await,
        }
    }

    async fn tunnel(
        &self,
        addr: SocketAddr,
        identity: &Identity,
    ) -> Result<ambit_hbone::stream::TunnelStream, UpstreamError> {
        let tls = {
            let mut cache = lock(&self.tls);
            match cache.get(identity) {
                Some(c) => c.clone(),
                None => {
                    let c = tls::client_config_rotating(&self.cert, &self.bundle, identity)
                        .map_err(|source| UpstreamError::Tls {
                            identity: identity.clone(),
                            source,
                        })?;
                    cache.insert(identity.clone(), c.clone());
                    c
                }
            }
        };
        let target = ConnectTarget {
            source: self.source.clone(),
            tls,
            peer: SocketAddr::new(addr.ip(), self.hbone_port),
            expected_identity: identity.clone(),
            authority: addr,
            headers: http::HeaderMap::new(),
        };
        self.pool
            .connect(target)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })
    }

    /// TCP to an external instance (each address its name resolves to, in order, until
    /// one answers), then TLS if the port originates it.
    async fn dial(&self, up: &Upstream, d: &Direct) -> Result<Box<dyn Io>, UpstreamError> {
        let dest = up.describe();
        let addrs: Vec<SocketAddr> = match &d.host {
            Some(host) => tokio::net::lookup_host((host.as_str(), up.addr.port()))
                .await
                .map_err(|source| UpstreamError::Resolve {
                    host: host.clone(),
                    source,
                })?
                .collect(),
            None => vec![up.addr],
        };
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            }
        }
        let tcp = tcp.ok_or(UpstreamError::Dial {
            dest: dest.clone(),
            source: last,
        })?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &d.tls else {
            return Ok(Box::new(tcp));
        };
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|source| UpstreamError::OriginateTls { dest, source })?;
        Ok(Box::new(Plain(stream)))
    }

    /// Sends `req` to `up` over `version`; `max_uses` retires HTTP/1.1 connections.
    pub async fn send(
        &self,
        up: &Upstream,
        version: Version,
        req: Request<Body>,
        max_uses: Option<u32>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match version {
            Version::Http2 => self.send_h2(up, req).await,
            Version::Http1 => self.send_h1(up, req, max_uses).await,
        }
    }

    /// Over the endpoint's one multiplexed HTTP/2 connection, opened if needed.
    async fn send_h2(
        &self,
        up: &Upstream,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = up.addr;
        let key = conn_key(up);
        let req_err = |source| UpstreamError::Request { addr, source };
        let current = |conns: &Mutex<HashMap<ConnKey, Conns>>| {
            lock(conns)
                .get(&key)
                .and_then(|c| c.h2.clone())
                .filter(|s| !s.is_closed())
        };
        let mut sender = match current(&self.conns) {
            Some(s) => s,
            None => {
                let opening = lock(&self.conns)
                    .entry(key.clone())
                    .or_default()
                    .h2_opening
                    .clone();
                let _opening = opening.lock().await;
                match current(&self.conns) {
                    // Another request opened it while we waited.
                    Some(s) => s,
                    None => {
                        let io = TokioIo::new(self.connect(up).await?);
                        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                            .await
                            .map_err(|source| UpstreamError::Handshake { addr, source })?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                            }
                        });
                        lock(&self.conns).entry(key.clone()).or_default().h2 = Some(sender.clone());
                        sender
                    }
                }
            }
        };
        sender.ready().await.map_err(req_err)?;
        sender.send_request(req).await.map_err(req_err)
    }

    /// Over an idle pooled HTTP/1.1 connection that is ready, else a new one.
    async fn send_h1(
        &self,
        up: &Upstream,
        req: Request<Body>,
        max_uses: Option<u32>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = up.addr;
        let key = conn_key(up);
        let req_err = |source| UpstreamError::Request { addr, source };
        let reused = {
            let mut map = lock(&self.conns);
            if map.len() > MAX_ENDPOINTS {
                // Endpoints come and go; forget those with nothing pooled.
                map.retain(|_, c| {
                    !c.h1.is_empty() || c.h2.as_ref().is_some_and(|s| !s.is_closed())
                });
            }
            let conns = map.entry(key.clone()).or_default();
            conns.h1.retain(|(s, _)| !s.is_closed());
            conns
                .h1
                .iter()
                .position(|(s, _)| s.is_ready())
                .map(|i| conns.h1.swap_remove(i))
        };
        let upgrading = req.headers().contains_key(http::header::UPGRADE);
        let (sender, uses, resp) = match reused {
            Some((mut sender, uses)) => {
                match sender.try_send_request(req).await {
                    Ok(resp) => (sender, uses, resp),
                    // The pooled connection closed under us (the peer's idle timeout)
                    // before taking the request: nothing was sent, so a fresh
                    // connection may carry it.
                    Err(mut e) => match e.take_message() {
                        Some(req) => {
                            let mut fresh = self.new_h1(up).await?;
                            fresh.ready().await.map_err(req_err)?;
                            let resp = fresh.send_request(req).await.map_err(req_err)?;
                            (fresh, 0, resp)
                        }
                        None => return Err(req_err(e.into_error())),
                    },
                }
            }
            None => {
                let mut sender = self.new_h1(up).await?;
                sender.ready().await.map_err(req_err)?;
                let resp = sender.send_request(req).await.map_err(req_err)?;
                (sender, 0, resp)
            }
        };
        let uses = uses + 1;
        let keep = !upgrading && max_uses.is_none_or(|m| uses < m);
        if keep && !sender.is_closed() {
            let mut map = lock(&self.conns);
            let conns = map.entry(key).or_default();
            if conns.h1.len() < MAX_IDLE_H1 {
                conns.h1.push((sender, uses));
            }
        }
        // Otherwise dropping the sender closes the connection after this response.
        Ok(resp)
    }

    async fn new_h1(&self, up: &Upstream) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = TokioIo::new(self.connect(up).await?);
        let (sender, conn) =
            http1::handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake {
                    addr: up.addr,
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }
}
