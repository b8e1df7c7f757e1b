//! The waypoint in a real mesh: network namespaces, in-process ztunnels (in-pod capture,
//! iptables, TLS), and the waypoint itself running inside its own pod's namespace.
//!
//! client pod (n1) → captured by ztunnel n1 → HBONE to the waypoint pod (the server is
//! behind it) → waypoint: L7 policy, then HBONE as the waypoint to the server pod's
//! ztunnel (n2), which only accepts it because it comes from the waypoint → server pod.
//! The waypoint also validates JWTs there (RequestAuthentication): a valid token meets a
//! rule on `requestPrincipals`, an expired one gets 401, a missing one 403.
//! A second test sends HTTP/2 and gRPC the same way, with a weighted route and an L7 deny
//! by method. A third sends egress through the waypoint: a pod of a REGISTRY_ONLY namespace
//! reaches ExternalServices bound to the waypoint, which applies L7 policy and dials them
//! itself (one in plain HTTP, one with TLS originated by the waypoint). Needs root; see
//! `ambit_tests::require_root`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{Server, ServerSettings};
use ambit_hbone::tls::{self, RotatingCert, TrustBundle};
use ambit_hbone::Identity;
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_tests::ztunnel::*;
use ambit_tests::Topology;
use ambit_waypoint::metrics::Metrics;
use ambit_waypoint::proxy::Proxy;
use ambit_waypoint::server::{Limits, Waypoint};
use ambit_waypoint::state::{State, StateFile, StateHandle};
use ambit_waypoint::upstream::Upstreams;
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// A blocking HTTP/1.1 server inside `pod` answering with the request head it received.
fn http_server(pod: &ambit_tests::Pod, port: u16) -> anyhow::Result<SocketAddr> {
    Ok(http_server_logged(pod, port)?.0)
}

/// [`http_server`], also keeping each request head it received.
fn http_server_logged(
    pod: &ambit_tests::Pod,
    port: u16,
) -> anyhow::Result<(SocketAddr, Arc<Mutex<Vec<String>>>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = SocketAddr::new(pod.ip.into(), port);
    let ns = pod.netns.clone();
    let listener = ambit_tests::in_netns(&ns, move || std::net::TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let body = format!("peer={peer}\n{}", String::from_utf8_lossy(&head));
                if let Ok(mut seen) = log.lock() {
                    seen.push(body.clone());
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok((addr, seen))
}

/// Sends one HTTP/1.1 request from `pod` to `dst` and returns the whole response.
async fn http_from(
    pod: &ambit_tests::Pod,
    dst: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> anyhow::Result<String> {
    http_from_with(pod, dst, method, host, path, "").await
}

/// [`http_from`] with extra header lines (`name: value\r\n` each).
async fn http_from_with(
    pod: &ambit_tests::Pod,
    dst: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &str,
) -> anyhow::Result<String> {
    let request =
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n{headers}connection: close\r\n\r\n");
    let pod = pod.clone();
    blocking(move || {
        let mut s = ambit_tests::connect_from(&pod, dst)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .await
}

/// The waypoint, on its own runtime in the waypoint pod's namespace, fed a static state.
struct RunningWaypoint {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>,
    registry: prometheus_client::registry::Registry,
}

impl RunningWaypoint {
    fn start(
        wp: &ambit_tests::Pod,
        wp_id: &Identity,
        ca: &TestCa,
        state_yaml: &str,
    ) -> anyhow::Result<Self> {
        let file: StateFile = serde_yaml::from_str(state_yaml)?;
        let handle = StateHandle::new(State::build(file)?);
        let cert = ca.issue(wp_id);
        let bundle = TrustBundle::new("cluster.local", ca.ca.trust_roots())?;
        let rotating = RotatingCert::new(&cert);
        let listen = SocketAddr::new(wp.ip.into(), 15008);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ns, wp_id) = (wp.netns.clone(), wp_id.clone());
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            ambit_tests::in_netns(&ns, move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let upstreams = Upstreams::new(
                        Pool::new(PoolConfig::default()),
                        wp_id.clone(),
                        rotating.clone(),
                        bundle.clone(),
                        15008,
                    );
                    let proxy = Proxy::new(handle, upstreams, metrics, "app/waypoint".into());
                    let listener = tokio::net::TcpListener::bind(listen).await?;
                    let _ = bound_tx.send(());
                    let server = Server::new(
                        listener,
                        tls::server_config_rotating(&rotating, &bundle)?,
                        Waypoint {
                            proxy,
                            limits: Limits::default(),
                        },
                        ServerSettings::default(),
                    );
                    server
                        .run(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                    anyhow::Ok(())
                })
            })
        });
        bound_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the waypoint did not bind 15008 in its pod")?;
        Ok(RunningWaypoint {
            stop,
            thread,
            registry,
        })
    }

    /// The waypoint's Prometheus text.
    fn metrics(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let joined = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("waypoint thread panicked"))?;
        joined?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cross_the_waypoint_with_l7_policy() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("wp_mesh")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("waypoint", "n1")
        .pod("server", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, wp, server) = (topo.pod("client"), topo.pod("waypoint"), topo.pod("server"));
    let wp_id = Identity::new("cluster.local", "app", "waypoint")?;
    let state = format!(
        "workloads:\n{}{}  - name: {}\n    namespace: app\n    serviceAccount: server\n    node: n2\n    addresses: [{}]\n    protocol: HBONE\n    waypoint: {{address: {}, identity: \"{wp_id}\"}}\n",
        workload(client, "app", "client", "n1", true),
        // The waypoint pod is not captured: it speaks HBONE itself.
        workload(wp, "app", "waypoint", "n1", false).replace(
            "    protocol: TCP\n",
            "    protocol: TCP\n    isWaypoint: true\n"
        ),
        server.name,
        server.ip,
        wp.ip,
    );
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1", "n2"], &state, ca.clone(), |_, _| {}).await?;
    for (node, pod) in [("n1", client), ("n2", server)] {
        mesh.wait_enrolled(node, &uid("app", pod), true).await?;
    }
    let server_addr = http_server(server, 8080)?;

    // The waypoint, on its own runtime in the waypoint pod's namespace. `/jwt/*` needs a
    // token of the issuer whose key is generated here.
    let issuer_key = ambit_waypoint::authn::mint::SigningKey::es256("k1")?;
    let jwks = ambit_waypoint::authn::mint::jwks(&[&issuer_key]);
    let waypoint_state = format!(
        r#"
workloads:
  - {{uid: client, name: client, namespace: app, serviceAccount: client, addresses: [{}]}}
  - {{uid: server, name: server, namespace: app, serviceAccount: server, addresses: [{}]}}
policies:
  - name: no-admin
    namespace: app
    action: DENY
    targetGateway: app/waypoint
    rules: [{{to: [{{paths: ["/admin/*"]}}]}}]
  - name: jwt-area
    namespace: app
    action: ALLOW
    targetGateway: app/waypoint
    rules:
      - from: [{{requestPrincipals: ["https://idp.example/*"]}}]
        to: [{{paths: ["/jwt/*"]}}]
      - to: [{{notPaths: ["/jwt/*"]}}]
requestAuthentications:
  - name: idp
    namespace: app
    targetGateway: app/waypoint
    spec: {{jwtRules: [{{issuer: "https://idp.example", jwks: '{jwks}'}}]}}
"#,
        client.ip, server.ip
    );
    let waypoint = RunningWaypoint::start(wp, &wp_id, &ca, &waypoint_state)?;
    mesh.wait_certs("n1").await?;
    mesh.wait_certs("n2").await?;
    let ok = http_from(client, server_addr, "GET", "server", "/hello")
        .await
        .context("allowed request")?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("x-ambit-peer-identity: spiffe://cluster.local/ns/app/sa/client"),
        "{ok}"
    );
    assert!(
        ok.contains(&format!("forwarded: for={}", client.ip)),
        "{ok}"
    );
    let denied = http_from(client, server_addr, "GET", "server", "/admin/users")
        .await
        .context("denied request")?;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.ends_with("RBAC: access denied by app/no-admin\n"),
        "{denied}"
    );

    // Request authentication at the waypoint: a valid token meets the rule on
    // requestPrincipals (and is not passed on), an expired one is refused with 401, and
    // without one the rule that requires a principal does not match.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = |exp: u64| {
        issuer_key
            .token(&serde_json::json!({"iss": "https://idp.example", "sub": "alice", "exp": exp}))
    };
    let bearer = format!("authorization: Bearer {}\r\n", token(now + 600)?);
    let ok = http_from_with(client, server_addr, "GET", "server", "/jwt/orders", &bearer)
        .await
        .context("request with a valid token")?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(!ok.to_ascii_lowercase().contains("authorization:"), "{ok}");
    let expired = format!("authorization: Bearer {}\r\n", token(now - 3600)?);
    let refused = http_from_with(
        client,
        server_addr,
        "GET",
        "server",
        "/jwt/orders",
        &expired,
    )
    .await
    .context("request with an expired token")?;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused.contains("JWT rejected: token expired at"),
        "{refused}"
    );
    let anonymous = http_from(client, server_addr, "GET", "server", "/jwt/orders")
        .await
        .context("request without a token")?;
    assert!(anonymous.starts_with("HTTP/1.1 403"), "{anonymous}");
    assert!(anonymous.contains("app/jwt-area"), "{anonymous}");

    waypoint.stop()?;
    mesh.shutdown().await;
    Ok(())
}

/// A tokio listener on the pod's address, bound inside its namespace (the socket stays
/// there; any runtime can accept on it).
fn listener_in(pod: &ambit_tests::Pod, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::new(pod.ip.into(), port);
    let listener = ambit_tests::in_netns(&pod.netns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        std::io::Result::Ok(l)
    })??;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

/// An HTTP/1.1 and HTTP/2 (prior knowledge) server inside `pod`: each answer names the
/// backend, the HTTP version it arrived in and the caller identity the waypoint forwarded.
fn versatile_server(pod: &ambit_tests::Pod, port: u16, name: &'static str) -> anyhow::Result<()> {
    let listener = listener_in(pod, port)?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service =
                hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
                    let who = req
                        .headers()
                        .get("x-ambit-peer-identity")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!(
                        "backend={name}\nversion={:?}\nidentity={who}\n",
                        req.version()
                    );
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(())
}

/// A gRPC service (the CA's, for its generated code) answering with the caller identity.
struct WhoAmI;

#[tonic::async_trait]
impl CertificateService for WhoAmI {
    async fn create_certificate(
        &self,
        request: tonic::Request<CreateCertificateRequest>,
    ) -> Result<tonic::Response<CreateCertificateResponse>, tonic::Status> {
        if request.get_ref().csr == "refuse" {
            return Err(tonic::Status::permission_denied("refused by the backend"));
        }
        let who = request
            .metadata()
            .get("x-ambit-peer-identity")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok(tonic::Response::new(CreateCertificateResponse {
            cert_chain: vec![who],
            trust_roots: vec![],
        }))
    }
}

fn grpc_server(pod: &ambit_tests::Pod, port: u16) -> anyhow::Result<()> {
    let listener = listener_in(pod, port)?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(WhoAmI))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(())
}

/// A TCP connection opened from inside `pod` (so the pod's capture rules apply to it).
async fn tcp_from(
    pod: &ambit_tests::Pod,
    dst: SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let pod = pod.clone();
    let std = blocking(move || {
        let s = ambit_tests::connect_from(&pod, dst)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    Ok(tokio::net::TcpStream::from_std(std)?)
}

async fn read_body(resp: http::Response<Incoming>) -> anyhow::Result<(u16, String)> {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

const WEB_VIP: &str = "10.96.0.20:80";
const WEB_HOST: &str = "web.app.svc.cluster.local";
const GRPC_VIP: &str = "10.96.0.22:9090";

/// HTTP/2 and gRPC through client ztunnel → waypoint → server ztunnel, a 90/10 weighted
/// route over two pods, an L7 deny by method over HTTP/1.1, and the waypoint's metrics
/// naming who called whom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_grpc_split_and_method_deny_cross_the_waypoint() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("wp_l7")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("waypoint", "n1")
        .pod("web", "n2")
        .pod("canary", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, wp) = (topo.pod("client"), topo.pod("waypoint"));
    let (web, canary) = (topo.pod("web"), topo.pod("canary"));
    let wp_id = Identity::new("cluster.local", "app", "waypoint")?;
    let waypoint_ref = format!("{{address: {}, identity: \"{wp_id}\"}}", wp.ip);
    // The services use the waypoint; their pods accept what the waypoint sends them.
    let state = format!(
        "workloads:\n{}{}{}{}services:\n  - name: web\n    namespace: app\n    vips: [10.96.0.20]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [{{workloadUid: app/web}}]\n    waypoint: {waypoint_ref}\n  - name: grpc\n    namespace: app\n    vips: [10.96.0.22]\n    ports: [{{port: 9090, targetPort: 9090}}]\n    endpoints: [{{workloadUid: app/web}}]\n    waypoint: {waypoint_ref}\n",
        workload(client, "app", "client", "n1", true),
        workload(wp, "app", "waypoint", "n1", false).replace(
            "    protocol: TCP\n",
            "    protocol: TCP\n    isWaypoint: true\n"
        ),
        workload(web, "app", "web", "n2", true),
        workload(canary, "app", "canary", "n2", true),
    );
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1", "n2"], &state, ca.clone(), |_, _| {}).await?;
    for (node, pod) in [("n1", client), ("n2", web), ("n2", canary)] {
        mesh.wait_enrolled(node, &uid("app", pod), true).await?;
    }
    versatile_server(web, 8080, "web")?;
    versatile_server(canary, 8080, "canary")?;
    grpc_server(web, 9090)?;

    let waypoint_state = format!(
        r#"
workloads:
  - {{uid: client, name: client, namespace: app, serviceAccount: client, addresses: [{client}]}}
  - {{uid: web, name: web, namespace: app, serviceAccount: web, addresses: [{web}]}}
  - {{uid: canary, name: canary, namespace: app, serviceAccount: canary, addresses: [{canary}]}}
services:
  - {{name: web, namespace: app, hostname: web.app.svc.cluster.local, vips: [10.96.0.20], ports: [{{servicePort: 80, targetPort: 8080}}], endpoints: [{{workloadUid: web}}]}}
  - {{name: canary, namespace: app, hostname: canary.app.svc.cluster.local, vips: [10.96.0.21], ports: [{{servicePort: 80, targetPort: 8080}}], endpoints: [{{workloadUid: canary}}]}}
  - {{name: grpc, namespace: app, hostname: grpc.app.svc.cluster.local, vips: [10.96.0.22], ports: [{{servicePort: 9090, targetPort: 9090}}], endpoints: [{{workloadUid: web}}]}}
routes:
  - name: canary-split
    namespace: app
    kind: HTTPRoute
    parentServices: [app/web.app.svc.cluster.local]
    spec:
      rules:
        - backendRefs:
            - {{name: web, port: 80, weight: 90}}
            - {{name: canary, port: 80, weight: 10}}
policies:
  - name: no-delete
    namespace: app
    action: DENY
    targetGateway: app/waypoint
    rules: [{{to: [{{methods: [DELETE]}}]}}]
"#,
        client = client.ip,
        web = web.ip,
        canary = canary.ip,
    );
    let waypoint = RunningWaypoint::start(wp, &wp_id, &ca, &waypoint_state)?;
    mesh.wait_certs("n1").await?;
    mesh.wait_certs("n2").await?;

    // HTTP/2 with prior knowledge: 1,000 requests on one connection, split 90/10.
    let web_vip: SocketAddr = WEB_VIP.parse()?;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tcp_from(client, web_vip).await?),
    )
    .await
    .context("HTTP/2 handshake through ztunnel and the waypoint")?;
    tokio::spawn(conn);
    let mut canary_hits = 0;
    for i in 0..1000 {
        let req = http::Request::get("http://web.app.svc.cluster.local/")
            .body(Full::new(Bytes::new()))?;
        let (status, body) = read_body(h2.send_request(req).await?).await?;
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.contains("version=HTTP/2.0"), "{body}");
        assert!(
            body.contains("identity=spiffe://cluster.local/ns/app/sa/client"),
            "{body}"
        );
        if body.contains("backend=canary") {
            canary_hits += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, σ ≈ 9.5; ±4σ.
    assert!(
        (62..=138).contains(&canary_hits),
        "canary got {canary_hits} of 1000"
    );

    // gRPC: a real tonic client and server; the backend's own status comes back as is.
    let client_pod = client.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC_VIP}"))?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let pod = client_pod.clone();
            async move {
                let dst: SocketAddr = GRPC_VIP.parse()?;
                anyhow::Ok(TokioIo::new(tcp_from(&pod, dst).await?))
            }
        }))
        .await
        .context("gRPC channel through ztunnel and the waypoint")?;
    let mut grpc = CertificateServiceClient::new(channel);
    let reply = grpc
        .create_certificate(CreateCertificateRequest {
            csr: "hello".into(),
            validity_seconds: 0,
        })
        .await?
        .into_inner();
    assert_eq!(
        reply.cert_chain,
        vec!["spiffe://cluster.local/ns/app/sa/client".to_string()]
    );
    let refused = grpc
        .create_certificate(CreateCertificateRequest {
            csr: "refuse".into(),
            validity_seconds: 0,
        })
        .await
        .expect_err("the backend refuses");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // HTTP/1.1: DELETE is denied by the waypoint's policy, GET still served.
    let denied = http_from(client, web_vip, "DELETE", WEB_HOST, "/items/1").await?;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.ends_with("RBAC: access denied by app/no-delete\n"),
        "{denied}"
    );
    let ok = http_from(client, web_vip, "GET", WEB_HOST, "/items/1").await?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // What dashboards see: the caller, the service, the code, per protocol.
    let text = waypoint.metrics()?;
    let has = |parts: &[&str]| {
        text.lines()
            .any(|l| l.starts_with("istio_requests_total{") && parts.iter().all(|p| l.contains(p)))
    };
    for parts in [
        &[
            "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
            "destination_service=\"web.app.svc.cluster.local\"",
            "response_code=\"200\"",
        ][..],
        &["request_protocol=\"grpc\"", "grpc_response_status=\"7\""][..],
        &[
            "response_code=\"403\"",
            "destination_service=\"web.app.svc.cluster.local\"",
        ][..],
    ] {
        assert!(
            has(parts),
            "no istio_requests_total with {parts:?}:\n{text}"
        );
    }

    waypoint.stop()?;
    mesh.shutdown().await;
    Ok(())
}

/// An HTTPS server inside `pod` with a certificate for `name` from a CA of its own (the
/// CA's PEM is returned): each answer says it came over TLS, with the server name the
/// client sent and the request's path and host.
fn https_server(pod: &ambit_tests::Pod, port: u16, name: &str) -> anyhow::Result<String> {
    let ca = ambit_testing::pki::WebCa::new()?;
    let leaf = ca.leaf(name)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.cert.into()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf.key).into(),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = listener_in(pod, port)?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let body = format!("tls sni={sni} path={} host={host}\n", req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(ca.pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_through_the_waypoint_gets_l7_policy_and_tls_origination() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("wp_egress")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("waypoint", "n1")
        .pod("ext", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, wp, ext) = (topo.pod("client"), topo.pod("waypoint"), topo.pod("ext"));
    let wp_id = Identity::new("cluster.local", "eg", "waypoint")?;
    let bound = format!(
        "    waypoint: {{address: {}, identity: \"{wp_id}\"}}\n",
        wp.ip
    );
    // `ext` is outside the mesh (the state does not know it); the client's namespace may
    // only reach what is declared, and what is declared here goes through the waypoint.
    let state = format!(
        "workloads:\n{}    outboundPolicy: REGISTRY_ONLY\n{}externalServices:\n  - name: api\n    namespace: eg\n    hosts: [api.ext.example]\n    addresses: [{ip}/32]\n    ports: [{{number: 8080, name: http, protocol: HTTP}}]\n{bound}  - name: secure\n    namespace: eg\n    hosts: [secure.ext.example]\n    ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]\n    resolution: STATIC\n    endpoints: [{{address: {ip}}}]\n    vips: [{{host: secure.ext.example, address: 240.240.9.9}}]\n{bound}",
        workload(client, "eg", "client", "n1", true),
        workload(wp, "eg", "waypoint", "n1", false)
            .replace("    protocol: TCP\n", "    protocol: TCP\n    isWaypoint: true\n"),
        ip = ext.ip,
    );
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1", "n2"], &state, ca.clone(), |_, _| {}).await?;
    mesh.wait_enrolled("n1", &uid("eg", client), true).await?;
    let (plain, seen) = http_server_logged(ext, 8080)?;
    let ca_pem = https_server(ext, 8443, "secure.ext.example")?;

    // The waypoint knows the same services, the TLS origination of `secure`, and two
    // policies: one on every request through it (its Gateway, `app/waypoint` as
    // `RunningWaypoint` serves it), one bound to `api` alone.
    let waypoint_state = format!(
        r#"
workloads:
  - {{uid: client, name: client, namespace: eg, serviceAccount: client, addresses: [{client}]}}
policies:
  - name: no-admin
    namespace: eg
    action: DENY
    targetGateway: app/waypoint
    rules: [{{to: [{{paths: ["/admin/*"]}}]}}]
  - name: api-private
    namespace: eg
    action: DENY
    targetService: eg/api
    rules: [{{to: [{{paths: ["/private"]}}]}}]
externalServices:
  - name: api
    namespace: eg
    hosts: [api.ext.example]
    addresses: [{ip}/32]
    ports: [{{number: 8080, name: http, protocol: HTTP}}]
  - name: secure
    namespace: eg
    hosts: [secure.ext.example]
    ports:
      - number: 80
        name: http
        protocol: HTTP
        targetPort: 8443
        tls: {{sni: secure.ext.example, caCertificates: {pem}}}
    resolution: STATIC
    endpoints: [{{address: {ip}}}]
    vips: [{{host: secure.ext.example, address: 240.240.9.9}}]
"#,
        client = client.ip,
        ip = ext.ip,
        pem = serde_json::to_string(&ca_pem)?,
    );
    let waypoint = RunningWaypoint::start(wp, &wp_id, &ca, &waypoint_state)?;
    mesh.wait_certs("n1").await?;

    // Allowed: it reaches the server from the waypoint, never from the client, and carries
    // none of the mesh's identities or addresses out.
    let ok = http_from(client, plain, "GET", "api.ext.example", "/hello")
        .await
        .context("allowed egress")?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(&format!("peer={}:", wp.ip)), "{ok}");
    assert!(!ok.contains("x-ambit-peer-identity"), "{ok}");
    assert!(!ok.contains(&client.ip.to_string()), "{ok}");

    // Denied by path, by the waypoint-wide policy and by the one bound to `api`; neither
    // request reaches the server.
    let before = seen.lock().map(|s| s.len()).unwrap_or(0);
    let denied = http_from(client, plain, "GET", "api.ext.example", "/admin/users")
        .await
        .context("denied egress")?;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.ends_with("RBAC: access denied by eg/no-admin\n"),
        "{denied}"
    );
    let private = http_from(client, plain, "GET", "api.ext.example", "/private")
        .await
        .context("denied egress")?;
    assert!(private.starts_with("HTTP/1.1 403"), "{private}");
    assert!(
        private.ends_with("RBAC: access denied by eg/api-private\n"),
        "{private}"
    );
    let heads = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(heads.len(), before, "a denied request arrived: {heads:?}");

    // TLS origination: plain HTTP to the host's VIP, HTTPS with the right server name at
    // the destination, verified against the roots the service names.
    let secure = SocketAddr::from(([240, 240, 9, 9], 80));
    let tls = http_from(client, secure, "GET", "secure.ext.example", "/pay")
        .await
        .context("egress with TLS origination")?;
    assert!(tls.starts_with("HTTP/1.1 200"), "{tls}");
    assert!(
        tls.ends_with("tls sni=secure.ext.example path=/pay host=secure.ext.example\n"),
        "{tls}"
    );
    let denied = http_from(client, secure, "GET", "secure.ext.example", "/admin/x")
        .await
        .context("denied egress with TLS origination")?;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");

    // The waypoint counted them under the external host.
    let text = waypoint.metrics()?;
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("destination_service=\"secure.ext.example\"")
            && l.contains("response_code=\"200\"")),
        "{text}"
    );

    waypoint.stop()?;
    mesh.shutdown().await;
    Ok(())
}
