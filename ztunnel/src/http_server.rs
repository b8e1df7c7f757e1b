//! The small HTTP/1 server behind ztunnel's operations ports (admin 15000, metrics 15020,
//! readiness 15021).
//!
//! These ports answer a handful of tiny GETs from kubelet, Prometheus and operators, so
//! one plain HTTP/1.1 loop serves them all: it stops accepting when drain starts, asks
//! open keep-alive connections to close after their current request, and drops whatever
//! is left at the drain deadline. Data-plane traffic never goes through here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain::DrainWatcher;
use crate::handover::{Handover, Owner, Registered, Role};

/// Response body of every operations endpoint: small and fully buffered.
pub type Body = Full<Bytes>;

/// Why an operations server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound (port in use, no permission...).
    #[error("cannot listen on {addr} for {name}")]
    Bind {
        /// Which server (admin, metrics, readiness).
        name: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet serving, listener. Binding first lets callers (and tests using port
/// 0) learn the real address before anything is served.
#[derive(Debug)]
pub struct Listener {
    name: &'static str,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// In the hand-over registry while it serves.
    registered: Option<Registered>,
}

impl Listener {
    /// Binds `addr`; `name` labels logs and errors.
    pub async fn bind(name: &'static str, addr: SocketAddr) -> Result<Self, ServerError> {
        Self::bind_with(name, Role::Admin, addr, &Handover::default()).await
    }

    /// Takes the listener for `role` a previous ztunnel handed over, or binds `addr` (with
    /// SO_REUSEPORT, so a successor can bind beside it); registers it for a successor.
    pub async fn bind_with(
        name: &'static str,
        role: Role,
        addr: SocketAddr,
        handover: &Handover,
    ) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::Bind { name, addr, source };
        let netns = crate::handover::own_netns()
            .inspect_err(|e| tracing::warn!(server = name, error = %e, "cannot identify our network namespace; not taking or offering this listener"))
            .ok();
        let inherited = netns.and_then(|n| handover.inherited.take_ops(n, role, addr));
        let std = match inherited {
            Some(l) => {
                tracing::info!(server = name, %addr, "listener handed over by the previous ztunnel");
                l
            }
            None => crate::handover::bind_reuseport(addr, 1024)
                .map_err(bind_err)?
                .into(),
        };
        std.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(std).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let registered = netns.and_then(|netns| {
            handover
                .registry
                .register(Owner::Ops { netns }, role, &listener)
                .inspect_err(|e| tracing::warn!(server = name, error = %e, "listener not registered for a successor"))
                .ok()
        });
        Ok(Listener {
            name,
            listener,
            local_addr,
            registered,
        })
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `handler` until drain starts; the returned future ends once the listener is
    /// closed (open connections carry on under their own watcher clones).
    pub async fn serve<H, F>(self, drain: DrainWatcher, handler: H)
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let Listener {
            name,
            listener,
            local_addr,
            registered,
        } = self;
        tracing::info!(%local_addr, server = name, "listening");
        loop {
            let accepted = tokio::select! {
                _ = drain.signaled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Per-connection accept errors (aborted handshakes, fd exhaustion)
                    // must not take the port down; back off briefly so fd exhaustion
                    // does not become a busy loop.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            let watcher = drain.clone();
            tokio::spawn(drain.clone().run(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = watcher.signaled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(server = name, %peer, error = %e, "connection ended with an error");
                }
            }));
        }
        drop(registered);
        tracing::info!(%local_addr, server = name, "stopped accepting (draining)");
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

/// A JSON response, pretty-printed because people read these.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}

/// A response with an explicit content type.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// The value of `key` in a URL query string (`a=1&b=two`), percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (space); malformed escapes are kept literally.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A minimal HTTP/1 client for tests of the operations servers.
#[cfg(test)]
pub(crate) mod test_client {
    use http_body_util::{BodyExt, Empty};
    use hyper::{HeaderMap, Method, Request, StatusCode};
    use hyper_util::rt::TokioIo;

    /// One request on a fresh connection: status, headers and body as text.
    pub async fn request(
        addr: std::net::SocketAddr,
        method: Method,
        path: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).expect("utf-8 body"),
        )
    }

    pub async fn get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
        request(addr, Method::GET, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = Some("level=ambit_ztunnel%3Ddebug%2Cinfo&x=a+b&bad=%zz%4");
        assert_eq!(
            query_param(q, "level").as_deref(),
            Some("ambit_ztunnel=debug,info")
        );
        assert_eq!(query_param(q, "x").as_deref(), Some("a b"));
        assert_eq!(query_param(q, "bad").as_deref(), Some("%zz%4"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "level"), None);
    }
}
