//! The waypoint's HBONE side: every `CONNECT` is accepted (the caller's identity comes from
//! its certificate; what it may do is decided per request, or per connection for TCP), then
//! the tunnel is sniffed ([`crate::protocol`]) and served by hyper (HTTP/1.1 with upgrades,
//! or HTTP/2) with bounded header sizes and a header-read timeout, or forwarded as TCP with
//! L4 policy only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::server::{ConnectRequest, Handler, Refusal};
use ambit_hbone::stream::TunnelStream;
use ambit_policy::Unobserved;
use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncReadExt as _;

use crate::decision::{self, Caller, TcpDecision};
use crate::protocol::{self, Detected, Rewind};
use crate::proxy::Proxy;
use crate::state::Target;

/// Limits on what a downstream client may make us hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request heads larger than this get 431 (HTTP/1) or a stream error (HTTP/2).
    pub max_header_bytes: usize,
    /// A client must send its request head within this (slow-loris protection).
    pub header_read_timeout: Duration,
    /// Silence before a tunnel is treated as TCP (server-first protocols).
    pub detect_timeout: Duration,
    /// HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1000,
        }
    }
}

/// The HBONE handler.
#[derive(Clone)]
pub struct Waypoint {
    pub proxy: Proxy,
    pub limits: Limits,
}

/// The client's address: the `Forwarded: for=` of the CONNECT if its ztunnel sent one, else
/// the HBONE peer address (in-pod mode, ztunnel's outbound socket is in the pod's netns, so
/// this is the pod IP).
fn source_addr(request: &ConnectRequest) -> SocketAddr {
    request
        .headers
        .get(http::header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split([';', ','])
                .filter_map(|p| p.trim().strip_prefix("for="))
                .next_back()
                .map(|s| {
                    s.trim_matches('"')
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string()
                })
        })
        .and_then(|s| s.parse().ok())
        .map(|ip| SocketAddr::new(ip, request.peer_addr.port()))
        .unwrap_or(request.peer_addr)
}

impl Handler for Waypoint {
    type Accepted = Caller;

    async fn accept(&self, request: &ConnectRequest) -> Result<Caller, Refusal> {
        Ok(Caller {
            identity: request.peer_identity.clone(),
            principal: request.peer_identity.to_string(),
            namespace: request.peer_identity.namespace().to_string(),
            addr: source_addr(request),
            authority: request.authority,
        })
    }

    async fn serve(&self, caller: Caller, mut stream: TunnelStream) {
        let mut buf = BytesMut::with_capacity(1024);
        // A port declared TCP is not sniffed: server-first protocols (the server speaks
        // first, e.g. SMTP, MySQL) would otherwise wait out the detection timeout.
        let declared_tcp = match self.proxy.state.load().resolve(caller.authority) {
            Some(Target::Service { service, port }) => service
                .ports
                .iter()
                .any(|p| p.service_port == port && p.app_protocol.eq_ignore_ascii_case("tcp")),
            _ => false,
        };
        let detected = loop {
            if declared_tcp {
                break Detected::Tcp;
            }
            match tokio::time::timeout(self.limits.detect_timeout, stream.read_buf(&mut buf)).await
            {
                Err(_) => break Detected::Tcp,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "reading from tunnel");
                    return;
                }
                Ok(Ok(0)) => {
                    if buf.is_empty() {
                        return;
                    }
                    break Detected::Tcp;
                }
                Ok(Ok(_)) => match protocol::detect(&buf) {
                    Detected::NeedMore => continue,
                    d => break d,
                },
            }
        };
        let io = TokioIo::new(Rewind::new(buf.freeze(), stream));
        let caller = Arc::new(caller);
        let proxy = self.proxy.clone();
        let svc_caller = caller.clone();
        let svc = service_fn(move |req| {
            let caller = svc_caller.clone();
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(&caller, req).await) }
        });
        let result = match detected {
            Detected::Http1 => {
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.limits.header_read_timeout)
                    .max_buf_size(self.limits.max_header_bytes.max(8192))
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
            }
            Detected::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(self.limits.max_header_bytes as u32)
                    .max_concurrent_streams(self.limits.max_concurrent_streams)
                    // HTTP/2 has no header-read timeout; PINGs find clients that went away.
                    .keep_alive_interval(Some(Duration::from_secs(20)))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .serve_connection(io, svc)
                    .await
            }
            _ => return self.forward_tcp(&caller, io.into_inner()).await,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "downstream HTTP connection ended");
        }
    }
}

impl Waypoint {
    /// Opaque TCP: L4 policy (rules needing HTTP fail closed), then the destination's first
    /// endpoint reachable, then a byte copy.
    async fn forward_tcp(&self, caller: &Caller, mut down: Rewind<TunnelStream>) {
        let state = self.proxy.state.load();
        let decided = decision::decide_tcp(&state, &self.proxy.gateway, caller, &mut Unobserved);
        drop(state);
        let upstreams = match decided {
            TcpDecision::UnknownDestination => {
                tracing::info!(target: "access", authority = %caller.authority, "tcp: unknown destination");
                return;
            }
            TcpDecision::Denied { by } => {
                tracing::info!(target: "access", principal = %caller.principal, authority = %caller.authority, denied_by = %by, "tcp: denied");
                return;
            }
            TcpDecision::Forward { upstreams } => upstreams,
        };
        for up in upstreams.iter() {
            match self.proxy.upstreams.connect(up).await {
                Ok(mut tunnel) => {
                    let result =
                        ambit_hbone::copy::copy_bidirectional(&mut down, &mut tunnel).await;
                    tracing::info!(target: "access", principal = %caller.principal, upstream = %up.describe(), ok = result.is_ok(), "tcp");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "tcp upstream failed; trying the next endpoint")
                }
            }
        }
        tracing::info!(target: "access", principal = %caller.principal, authority = %caller.authority, "tcp: no reachable endpoint");
    }
}
