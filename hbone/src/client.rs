//! The HBONE client side of one connection and one stream: what a caller asks for
//! ([`ConnectTarget`]), what can go wrong ([`ConnectError`]), where sockets come from
//! ([`SocketFactory`]), setting up an mTLS HTTP/2 connection to a peer, and sending one
//! `CONNECT` on it. Pooling those connections is [`crate::pool`]'s job.
//!
//! Sockets come from a [`SocketFactory`] so the node proxy can create them inside a pod's
//! network namespace, or mark them (SO_MARK) so its own traffic is not captured again.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::connect_udp::{self, TunnelProtocol};
use crate::server::{BufferedTcp, H2Settings, TLS_READ_BUFFER};
use crate::stream::{Guard, TunnelStream};
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
    /// A UDP tunnel was asked of a peer whose SETTINGS do not enable extended `CONNECT`
    /// (RFC 8441), so it cannot take CONNECT-UDP.
    #[error("HBONE peer {peer} does not accept CONNECT-UDP (no SETTINGS_ENABLE_CONNECT_PROTOCOL)")]
    UdpUnsupported { peer: SocketAddr },
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

/// The HTTP/2 connection type the client drives.
pub(crate) type ClientConnection =
    h2::client::Connection<tokio_rustls::client::TlsStream<BufferedTcp>, Bytes>;

/// A connection ready for streams: the peer's SETTINGS are applied.
pub(crate) struct Established {
    pub(crate) send: SendRequest<Bytes>,
    /// Must be polled (by a task) for anything to move.
    pub(crate) connection: ClientConnection,
    /// For keepalive PINGs.
    pub(crate) ping_pong: Option<h2::PingPong>,
}

/// How a new connection is set up (the pool's [`PoolConfig`](crate::pool::PoolConfig) says).
pub(crate) struct ConnectionSettings<'a> {
    /// TCP, TLS, HTTP/2 and the peer's SETTINGS must all arrive within this.
    pub(crate) connect_timeout: Duration,
    /// Streams we assume the peer takes until its SETTINGS say otherwise.
    pub(crate) max_streams: usize,
    /// Flow control and framing.
    pub(crate) h2: &'a H2Settings,
}

/// TCP, TLS, HTTP/2, and the peer's SETTINGS, all within `settings.connect_timeout`.
pub(crate) async fn establish(
    target: &ConnectTarget,
    factory: &dyn SocketFactory,
    settings: ConnectionSettings<'_>,
) -> Result<Established, ConnectError> {
    let peer = target.peer;
    let after = settings.connect_timeout;
    let deadline = Instant::now() + after;
    let timeout = |phase| ConnectError::Timeout { peer, phase, after };

    let socket = factory
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

    let h2 = settings.h2.clamped();
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_send_buffer_size(h2.max_send_buffer)
        // Until the peer's SETTINGS arrive, assume it takes what we would send anyway.
        .initial_max_send_streams(settings.max_streams)
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
    Ok(Established {
        send,
        connection,
        ping_pong,
    })
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

/// Outcome of one attempt to open a stream.
pub(crate) enum Attempt {
    Open(TunnelStream),
    /// The peer never processed the request: safe to retry on another connection.
    Retry(ConnectError),
    Fail(ConnectError),
}

/// Sends the `CONNECT` (or, for UDP, the CONNECT-UDP) on a connection and waits for the
/// answer. `mark_dead` is called when the connection turned out to be unusable; `guard`
/// lives as long as the tunnel.
pub(crate) async fn open_stream(
    send: SendRequest<Bytes>,
    target: &ConnectTarget,
    protocol: TunnelProtocol,
    response_timeout: Duration,
    mark_dead: &(dyn Fn() + Sync),
    guard: Guard,
) -> Attempt {
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
    let ready = tokio::time::timeout_at(deadline, send.ready()).await;
    let mut send = match ready {
        Err(_) => return Attempt::Fail(timed_out),
        Ok(Err(e)) => {
            mark_dead();
            return Attempt::Retry(http2(e));
        }
        Ok(Ok(send)) => send,
    };

    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    let uri = match protocol {
        TunnelProtocol::Tcp => http::uri::Authority::try_from(target.authority.to_string())
            .ok()
            .map(http::Uri::from),
        // Extended CONNECT (RFC 8441) carries a scheme and a path; the target is in the path.
        TunnelProtocol::Udp => http::Uri::builder()
            .scheme("https")
            .authority(target.authority.to_string())
            .path_and_query(connect_udp::path(target.authority))
            .build()
            .ok(),
    };
    *request.uri_mut() = match uri {
        Some(uri) => uri,
        // A SocketAddr always prints as a valid authority; kept total rather than unwrapped.
        None => {
            return Attempt::Fail(ConnectError::InvalidAuthority {
                authority: target.authority,
            })
        }
    };
    *request.headers_mut() = target.headers.clone();
    if protocol == TunnelProtocol::Udp {
        // The peer's SETTINGS have been applied (see `establish`), so this is its answer.
        if !send.is_extended_connect_protocol_enabled() {
            return Attempt::Fail(ConnectError::UdpUnsupported { peer });
        }
        request
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static(connect_udp::PROTOCOL));
        request.headers_mut().insert(
            connect_udp::CAPSULE_PROTOCOL,
            connect_udp::CAPSULE_PROTOCOL_TRUE,
        );
    }

    let (response, send_stream) = match send.send_request(request, false) {
        Ok(sent) => sent,
        // The connection was closed or went away under us: the request was not sent.
        Err(e) if e.is_go_away() || e.is_io() => {
            mark_dead();
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
                mark_dead();
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
    // The TLS configuration admitted only a peer proving the expected identity.
    Attempt::Open(TunnelStream::new(
        send_stream,
        response.into_body(),
        target.expected_identity.clone(),
        peer,
        Some(guard),
    ))
}
