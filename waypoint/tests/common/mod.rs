//! A real mesh on loopback for the waypoint's tests: a client with its own certificate opens
//! HBONE tunnels to the waypoint; the waypoint tunnels (HBONE, real mTLS) to "destination
//! ztunnels" made with the real HBONE server, one per pod address (127.0.0.x), each
//! connecting to a real HTTP backend on that address. Only the state is static.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::client::ConnectTarget;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{ConnectRequest, Handler, Refusal, Server, ServerSettings};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::testing::TestPki;
use ambit_hbone::tls::{self, RotatingCert};
use ambit_hbone::Identity;
use ambit_waypoint::metrics::Metrics;
use ambit_waypoint::proxy::Proxy;
use ambit_waypoint::server::{Limits, Waypoint};
use ambit_waypoint::state::{State, StateFile, StateHandle};
use ambit_waypoint::upstream::Upstreams;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

/// How a backend answers.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Answer 503 to this many requests first.
    pub fail_first: AtomicUsize,
    /// Always answer with this status when non-zero.
    pub always: AtomicUsize,
    /// Delay each answer by this many ms.
    pub delay_ms: AtomicU64,
    pub hits: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Close every connection after one response (no keep-alive).
    pub no_keepalive: AtomicBool,
}

/// Stand-in destination ztunnel: connect to the authority, copy.
struct DestZtunnel;

impl Handler for DestZtunnel {
    type Accepted = TcpStream;
    async fn accept(&self, request: &ConnectRequest) -> Result<TcpStream, Refusal> {
        TcpStream::connect(request.authority)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))
    }
    async fn serve(&self, mut tcp: TcpStream, mut stream: TunnelStream) {
        let _ = ambit_hbone::copy::copy_bidirectional(&mut stream, &mut tcp).await;
    }
}

async fn backend_reply(
    name: String,
    b: Arc<Behaviour>,
    mut req: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    b.hits.fetch_add(1, Ordering::SeqCst);
    // `upgrade: echo`: switch protocols and echo bytes back (a WebSocket stand-in).
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = http::Response::new(Full::new(Bytes::new()));
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", http::HeaderValue::from_static("echo"));
        r.headers_mut()
            .insert("connection", http::HeaderValue::from_static("upgrade"));
        return r;
    }
    let delay = b.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut status = 200u16;
    if b.fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        status = 503;
    }
    let always = b.always.load(Ordering::SeqCst);
    if always != 0 {
        status = always as u16;
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let body = format!(
        "backend={name}\nidentity={}\nforwarded={}\ntraceparent={}\npath={}\nversion={:?}\nx-added={}\nauthorization={}\nx-jwt-payload={}\n",
        h("x-ambit-peer-identity"),
        h("forwarded"),
        h("traceparent"),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        req.version(),
        h("x-added"),
        h("authorization"),
        h("x-jwt-payload"),
    );
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r
}

/// A plain HTTP/1.1 + HTTP/2 backend (sniffed like the waypoint does).
pub async fn backend(addr: SocketAddr, name: &str) -> Arc<Behaviour> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let behaviour = Arc::new(Behaviour::default());
    let b = behaviour.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let b = b.clone();
            b.connections.fetch_add(1, Ordering::SeqCst);
            let name = name.clone();
            tokio::spawn(async move {
                let keepalive = !b.no_keepalive.load(Ordering::SeqCst);
                let mut peek = [0u8; 3];
                let n = tcp.peek(&mut peek).await.unwrap_or(0);
                let svc = hyper::service::service_fn(move |req| {
                    let b = b.clone();
                    let name = name.clone();
                    async move { Ok::<_, std::convert::Infallible>(backend_reply(name, b, req).await) }
                });
                if n == 3 && &peek == b"PRI" {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keepalive)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    behaviour
}

pub struct Mesh {
    pub pki: TestPki,
    pub waypoint_addr: SocketAddr,
    pub waypoint_id: Identity,
    pub client_id: Identity,
    pub pool: Pool,
    pub state: StateHandle,
    pub registry: Arc<Mutex<Registry>>,
    pub backends: HashMap<String, Arc<Behaviour>>,
    /// The key sets the waypoint fetched (refreshed every second here).
    pub jwks: ambit_waypoint::authn::jwks::Jwks,
}

/// Pods: (name, ip, namespace). Each gets a backend on ip:8080 and an HBONE server on
/// ip:<shared port>.
///
/// Each mesh gets its own loopback /24 (`127.0.0.` in the arguments is rewritten), so tests
/// run in parallel without port clashes.
pub async fn start(pods: &[(&str, &str)], state_yaml: &str, limits: Limits) -> Mesh {
    start_with_prefix(pods, state_yaml, limits).await.0
}

/// [`start`], also returning the loopback prefix (`127.a.b.`) this mesh's pods use.
pub async fn start_with_prefix(
    pods: &[(&str, &str)],
    state_yaml: &str,
    limits: Limits,
) -> (Mesh, String) {
    let (mesh, prefix, _) = start_inner(pods, state_yaml, limits, None).await;
    (mesh, prefix)
}

/// [`start`] with span export to the OTLP collector at `endpoint`, as service `waypoint-test`.
pub async fn start_traced(
    pods: &[(&str, &str)],
    state_yaml: &str,
    endpoint: &str,
) -> (Mesh, ambit_waypoint::otlp::Exporter) {
    let (mesh, _, exporter) =
        start_inner(pods, state_yaml, Limits::default(), Some(endpoint)).await;
    (mesh, exporter.unwrap())
}

async fn start_inner(
    pods: &[(&str, &str)],
    state_yaml: &str,
    limits: Limits,
    otlp: Option<&str>,
) -> (Mesh, String, Option<ambit_waypoint::otlp::Exporter>) {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let prefix = format!(
        "127.{}.{}.",
        10 + std::process::id() % 200,
        NEXT.fetch_add(1, Ordering::SeqCst) % 250
    );
    let state_yaml = state_yaml.replace("127.0.0.", &prefix);
    let pods: Vec<(&str, String)> = pods
        .iter()
        .map(|(n, ip)| (*n, ip.replace("127.0.0.", &prefix)))
        .collect();
    let pki = TestPki::new(TD);
    let bundle = pki.bundle();
    let mut hbone_port = 0u16;
    let mut backends = HashMap::new();
    for (name, ip) in &pods {
        let ip: IpAddr = ip.parse().unwrap();
        let id = Identity::new(TD, "demo", name).unwrap();
        let server_tls = tls::server_config(&pki.issue(&id), &bundle).unwrap();
        let listener = TcpListener::bind(SocketAddr::new(ip, hbone_port))
            .await
            .unwrap();
        hbone_port = listener.local_addr().unwrap().port();
        let server = Server::new(listener, server_tls, DestZtunnel, ServerSettings::default());
        tokio::spawn(server.run(std::future::pending()));
        backends.insert(
            name.to_string(),
            backend(SocketAddr::new(ip, 8080), name).await,
        );
    }
    let file: StateFile = serde_yaml::from_str(&state_yaml).unwrap();
    let state = StateHandle::new(State::build(file).unwrap());
    let waypoint_id = Identity::new(TD, "demo", "waypoint").unwrap();
    let wcert = pki.issue(&waypoint_id);
    let rotating = RotatingCert::new(&wcert);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let upstreams = Upstreams::new(
        Pool::new(PoolConfig::default()),
        waypoint_id.clone(),
        rotating.clone(),
        bundle.clone(),
        hbone_port,
    );
    let jwks = ambit_waypoint::authn::jwks::Jwks::default();
    let mut fetching = ambit_waypoint::authn::jwks::FetchConfig::new("").unwrap();
    fetching.refresh = Duration::from_secs(1);
    fetching.retry = Duration::from_millis(500);
    tokio::spawn(ambit_waypoint::authn::jwks::run(
        state.clone(),
        jwks.clone(),
        fetching,
    ));
    let mut proxy = Proxy::new(state.clone(), upstreams, metrics, "demo/waypoint".into())
        .with_jwks(jwks.clone());
    let mut exporter = None;
    if let Some(endpoint) = otlp {
        let (sink, e) =
            ambit_waypoint::otlp::start(endpoint, "waypoint-test", &mut registry).unwrap();
        proxy = proxy.with_spans(sink);
        exporter = Some(e);
    }
    let server_tls = tls::server_config_rotating(&rotating, &bundle).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waypoint_addr = listener.local_addr().unwrap();
    let server = Server::new(
        listener,
        server_tls,
        Waypoint { proxy, limits },
        ServerSettings::default(),
    );
    tokio::spawn(server.run(std::future::pending()));
    let mesh = Mesh {
        pki,
        waypoint_addr,
        waypoint_id,
        client_id: Identity::new(TD, "client", "curl").unwrap(),
        pool: Pool::new(PoolConfig::default()),
        state,
        registry: Arc::new(Mutex::new(registry)),
        backends,
        jwks,
    };
    (mesh, prefix, exporter)
}

impl Mesh {
    /// A tunnel to `authority` through the waypoint, as the client.
    pub async fn tunnel(&self, authority: &str) -> TunnelStream {
        let cert = self.pki.issue(&self.client_id);
        let tls = tls::client_config(&cert, &self.pki.bundle(), &self.waypoint_id).unwrap();
        self.pool
            .connect(ConnectTarget {
                source: self.client_id.clone(),
                tls,
                peer: self.waypoint_addr,
                expected_identity: self.waypoint_id.clone(),
                authority: authority.parse().unwrap(),
                headers: http::HeaderMap::new(),
            })
            .await
            .unwrap()
    }

    /// An HTTP/1.1 client connection to `authority` through the waypoint.
    pub async fn h1(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let io = TokioIo::new(self.tunnel(authority).await);
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    /// An HTTP/2 client connection.
    pub async fn h2(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let io = TokioIo::new(self.tunnel(authority).await);
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// Metrics text.
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        s
    }
}

/// GET over HTTP/1.1; (status, headers, body).
pub async fn get(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    send(c, "GET", path, headers).await
}

pub async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.demo.svc.cluster.local");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.ready().await.unwrap();
    let resp = c
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The standard state: service `web` (VIP 10.96.0.10:80 → pods on 8080) with pods web-a,
/// web-b; service `canary` with pod canary-a. Extra YAML (policies, routes, traffic
/// policies) is appended.
pub fn state_yaml(extra: &str) -> String {
    format!(
        r#"
workloads:
  - {{uid: web-a, name: web-a, namespace: demo, serviceAccount: web-a, addresses: [127.0.0.2]}}
  - {{uid: web-b, name: web-b, namespace: demo, serviceAccount: web-b, addresses: [127.0.0.3]}}
  - {{uid: canary-a, name: canary-a, namespace: demo, serviceAccount: canary-a, addresses: [127.0.0.4]}}
services:
  - name: web
    namespace: demo
    hostname: web.demo.svc.cluster.local
    vips: [10.96.0.10]
    ports: [{{servicePort: 80, targetPort: 8080}}]
    endpoints: [{{workloadUid: web-a}}, {{workloadUid: web-b}}]
  - name: canary
    namespace: demo
    hostname: canary.demo.svc.cluster.local
    vips: [10.96.0.11]
    ports: [{{servicePort: 80, targetPort: 8080}}]
    endpoints: [{{workloadUid: canary-a}}]
{extra}
"#
    )
}

pub const PODS: [(&str, &str); 3] = [
    ("web-a", "127.0.0.2"),
    ("web-b", "127.0.0.3"),
    ("canary-a", "127.0.0.4"),
];
pub const WEB: &str = "10.96.0.10:80";
