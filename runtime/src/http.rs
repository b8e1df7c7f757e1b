//! The small HTTP/1 server behind every binary's operations ports (the proxies' admin 15000,
//! metrics 15020 and readiness 15021; the controller's 15014).
//!
//! These ports answer a handful of tiny GETs from kubelet, Prometheus and operators, so
//! one plain HTTP/1.1 loop serves them all, each binary passing only its handler: it stops
//! accepting when the binary's [`Shutdown`] fires, asks open keep-alive connections to close
//! after their current request, and runs each connection under the shutdown's own rules
//! (ztunnel's drain drops whatever is left at its deadline). Data-plane traffic never goes
//! through here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Response body of every operations endpoint: small and fully buffered.
pub type Body = Full<Bytes>;

/// Why an operations server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound (port in use, no permission...).
    #[error("cannot listen on {addr} for {name}")]
    Bind {
        /// Which server (admin, metrics, readiness, ops).
        name: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// When an operations server stops accepting and asks its connections to close. Every
/// connection task holds a clone while it runs, so a shutdown that counts its clones (ztunnel's
/// drain watcher) waits for them.
pub trait Shutdown: Clone + Send + Sync + 'static {
    /// Resolves when the server must stop accepting.
    fn stopped(&self) -> impl Future<Output = ()> + Send;

    /// Runs one connection's task (as is, unless the shutdown bounds it, e.g. by a deadline).
    fn run_connection<F>(self, connection: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        connection
    }
}

/// Stops once the value turns `true` (or the sender is gone).
impl Shutdown for watch::Receiver<bool> {
    async fn stopped(&self) {
        let mut rx = self.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Serves until the serving task is dropped (the process exits).
#[derive(Debug, Clone, Copy, Default)]
pub struct UntilDropped;

impl Shutdown for UntilDropped {
    async fn stopped(&self) {
        std::future::pending::<()>().await
    }
}

/// A bound, not yet serving, listener. Binding first lets callers (and tests using port
/// 0) learn the real address before anything is served.
pub struct Listener {
    name: &'static str,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Kept until the listener stops accepting (ztunnel's hand-over registration).
    guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("local_addr", &self.local_addr)
            .field("guard", &self.guard.is_some())
            .finish()
    }
}

impl Listener {
    /// Binds `addr`; `name` labels logs and errors.
    pub async fn bind(name: &'static str, addr: SocketAddr) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::Bind { name, addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        Self::from_listener(name, addr, listener)
    }

    /// A listener the caller bound (or was handed) for `addr`.
    pub fn from_listener(
        name: &'static str,
        addr: SocketAddr,
        listener: TcpListener,
    ) -> Result<Self, ServerError> {
        let local_addr =
            listener
                .local_addr()
                .map_err(|source| ServerError::Bind { name, addr, source })?;
        Ok(Listener {
            name,
            listener,
            local_addr,
            guard: None,
        })
    }

    /// Keeps `guard` alive until the listener stops accepting, then drops it.
    pub fn hold_while_serving(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `handler` until `shutdown` fires; the returned future ends once the listener
    /// is closed (open connections carry on under their own clones of `shutdown`).
    pub async fn serve<S, H, F>(self, shutdown: S, handler: H)
    where
        S: Shutdown,
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let Listener {
            name,
            listener,
            local_addr,
            guard,
        } = self;
        tracing::info!(%local_addr, server = name, "listening");
        loop {
            let accepted = tokio::select! {
                () = shutdown.stopped() => break,
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
            let watcher = shutdown.clone();
            tokio::spawn(shutdown.clone().run_connection(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = watcher.stopped() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(server = name, %peer, error = %e, "connection ended with an error");
                }
            }));
        }
        drop(guard);
        tracing::info!(%local_addr, server = name, "stopped accepting (shutting down)");
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

/// A minimal HTTP/1 client for tests of the operations servers (feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod test_client {
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

    /// A `GET` of `path`.
    pub async fn get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
        request(addr, Method::GET, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_handler_until_shutdown_then_refuses() {
        let listener = Listener::bind("test", SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(
            listener.serve(stopped, |req: Request<Incoming>| async move {
                match req.uri().path() {
                    "/json" => json(StatusCode::OK, &serde_json::json!({ "a": 1 })),
                    path => text(StatusCode::NOT_FOUND, format!("no {path}\n")),
                }
            }),
        );
        let (status, headers, body) = test_client::get(addr, "/json").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[hyper::header::CONTENT_TYPE], "application/json");
        assert_eq!(body, "{\n  \"a\": 1\n}\n");
        let (status, _, body) = test_client::get(addr, "/x").await;
        assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, "no /x\n"));

        stop.send_replace(true);
        server.await.expect("the accept loop ends at shutdown");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed after shutdown"
        );
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_in_the_error() {
        let first = Listener::bind("metrics", SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let err = Listener::bind("metrics", first.local_addr())
            .await
            .expect_err("port in use");
        let text = err.to_string();
        assert!(
            text.contains("metrics") && text.contains(&first.local_addr().to_string()),
            "{text}"
        );
    }

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
