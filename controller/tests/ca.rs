//! The CA and the control-plane TLS end to end: a real tonic server on loopback behind the
//! controller's own TLS (certificate from its CA), real clients over
//! `ambit_hbone::control::channel`, and assertions on what a proxy sees: certificates that
//! verify, gRPC codes with their reasons, discovery refusals, metrics.

// Helpers panic as test failures do.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_controller::ca::auth::LocalCredentials;
use ambit_controller::ca::setup::credentials_dir;
use ambit_controller::ca::store::{CaFiles, ROOT_CERT_FILE};
use ambit_controller::ca::{AuthConfig, Security, SecurityConfig};
use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService};
use ambit_controller::model::{Model, ModelBuilder, ModelConfig, SourceEvent};
use ambit_controller::ops::{Ops, Readiness};
use ambit_controller::server::GrpcServer;
use ambit_controller::source::local::parse_file;
use ambit_hbone::ca::{CertificateAuthority, DEFAULT_ROOT_VALIDITY};
use ambit_hbone::cert;
use ambit_hbone::csr;
use ambit_hbone::Identity;
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{subscribe_request, Hello, ProxyKind, Push, SubscribeRequest};
use ambit_testing::http_get_async;
use ambit_testing::net::body;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use tonic::Code;

const TD: &str = "cluster.local";
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: web, containers: []}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: demo}
spec: {nodeName: node-b, serviceAccountName: db, containers: []}
status: {podIP: 10.1.0.2}
"#;

/// A controller's gRPC and operations servers on loopback, fed `MESH`.
pub struct Plane {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub security: Security,
    closing: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), ambit_controller::server::ServerError>>,
}

impl Plane {
    pub async fn start(state: &Path, auth: AuthConfig, ca_files: Option<CaFiles>) -> Plane {
        let mut builder = ModelBuilder::new(ModelConfig::default());
        let sink = builder.sink("test");
        let model = builder.spawn();
        let objects = parse_file(Path::new("mesh.yaml"), MESH).expect("mesh parses");
        let mut events: Vec<_> = objects
            .into_iter()
            .map(|l| SourceEvent::Apply(l.object))
            .collect();
        events.push(SourceEvent::Synced);
        sink.send(events).await.expect("send");
        // The model ends when its last sink is dropped; keep it for the test's lifetime.
        std::mem::forget(sink);
        model.wait_for(|s| s.ready).await.expect("model loads");
        Self::serve(model, state, auth, ca_files).await
    }

    pub async fn serve(
        model: Model,
        state: &Path,
        auth: AuthConfig,
        ca_files: Option<CaFiles>,
    ) -> Plane {
        let security = Security::start(SecurityConfig {
            state_dir: state.to_path_buf(),
            trust_domain: TD.into(),
            namespace: "ambit-system".into(),
            ca_files,
            cert_validity: Duration::from_secs(24 * 3600),
            auth,
        })
        .expect("security");
        let readiness = Readiness::new(model.clone());
        readiness.set_ca_loaded();
        let (closing, closing_rx) = watch::channel(false);
        let (_roots_tx, roots) = watch::channel(Arc::new(security.roots_pem()));
        std::mem::forget(_roots_tx);
        let discovery = DiscoveryService::new(model.clone(), roots, DiscoveryOptions::default())
            .with_authenticator(security.authenticator.clone())
            .with_shutdown(closing_rx.clone());
        let ops = Ops::new(discovery.registry(), &security.metrics, readiness.clone());
        let mut server = GrpcServer::new(discovery).with_tls(security.tls.clone());
        server
            .routes_mut()
            .add_service(security.ca_service(model).into_server());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        readiness.set_listening();
        let mut stop = closing_rx.clone();
        let server = tokio::spawn(server.serve(listener, async move {
            let _ = stop.wait_for(|c| *c).await;
        }));
        let ops_listener = ambit_runtime::http::Listener::bind("ops", ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let ops_addr = ops_listener.local_addr();
        tokio::spawn(ops.serve(ops_listener, closing_rx));
        Plane {
            addr,
            ops_addr,
            security,
            closing,
            server,
        }
    }

    pub fn roots(&self) -> String {
        self.security.roots_pem().concat()
    }

    pub fn channel(&self) -> tonic::transport::Channel {
        ambit_hbone::control::channel(
            &self.addr.to_string(),
            &self.roots(),
            &self.security.identity,
        )
        .expect("channel")
    }

    /// Shuts down and waits for the server to finish.
    pub async fn stop(self) {
        let _ = self.closing.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server");
    }
}

pub fn local(nodes: &[&str], workloads: &[Identity]) -> AuthConfig {
    AuthConfig::Local {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        workloads: workloads.to_vec(),
    }
}

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa).unwrap()
}

pub fn node_token(state: &Path, node: &str) -> String {
    std::fs::read_to_string(LocalCredentials::node_path(&credentials_dir(state), node)).unwrap()
}

/// Sends a CSR for `identity` (or `csr_pem` if given) with `token`.
pub async fn request(
    plane: &Plane,
    token: Option<&str>,
    csr_pem: String,
) -> Result<CreateCertificateResponse, tonic::Status> {
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr: csr_pem,
        validity_seconds: 0,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    CertificateServiceClient::new(plane.channel())
        .create_certificate(req)
        .await
        .map(|r| r.into_inner())
}

pub fn csr_for(identity: &Identity) -> String {
    csr::new_csr(identity).unwrap().csr_pem
}

/// Verifies the chain against the roots with webpki (as a TLS peer would, clientAuth),
/// and returns the leaf's identity.
pub fn verify(response: &CreateCertificateResponse, roots_pem: &str) -> Identity {
    let chain: Vec<CertificateDer<'static>> = response
        .cert_chain
        .iter()
        .flat_map(|p| cert::parse_pem_certs(p).unwrap())
        .collect();
    let roots = cert::parse_pem_certs(roots_pem).unwrap();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("chain verifies against the mesh root");
    cert::identity_of(&chain[0]).expect("exactly one SPIFFE URI SAN")
}

async fn metrics(plane: &Plane) -> String {
    http_get(plane.ops_addr, "/metrics").await.1
}

/// `GET path` on the ops port: the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, whole) = http_get_async(addr, path).await.unwrap();
    (status, body(&whole).to_string())
}

fn hello_ztunnel(node: &str) -> SubscribeRequest {
    SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(Hello {
            kind: ProxyKind::Ztunnel as i32,
            node: node.into(),
            ..Hello::default()
        })),
    }
}

/// Subscribes with `token`, saying `hello`; the stream stays open until dropped.
async fn subscribe(
    plane: &Plane,
    token: &str,
    hello: SubscribeRequest,
) -> Result<
    (
        tonic::Streaming<Push>,
        tokio::sync::mpsc::Sender<SubscribeRequest>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = DiscoveryClient::new(plane.channel())
        .subscribe(req)
        .await?
        .into_inner();
    Ok((stream, tx))
}

#[tokio::test]
async fn a_node_gets_certificates_for_its_own_pods_only() {
    let state = tempfile::tempdir().unwrap();
    let plane = Plane::start(state.path(), local(&["node-a", "node-b"], &[]), None).await;
    let a = node_token(state.path(), "node-a");
    let web = id("demo", "web");

    let ok = request(&plane, Some(&a), csr_for(&web))
        .await
        .expect("signed");
    assert_eq!(ok.trust_roots, plane.security.roots_pem());
    assert_eq!(verify(&ok, &plane.roots()), web);

    // A pod of node-b: refused, naming both nodes.
    let e = request(&plane, Some(&a), csr_for(&id("demo", "db")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(
            "node node-a may not obtain spiffe://cluster.local/ns/demo/sa/db: no pod with that identity is scheduled on node-a"
        ) && e.message().contains("node-b"),
        "{}",
        e.message()
    );
    // An identity no pod has.
    let e = request(&plane, Some(&a), csr_for(&id("demo", "ghost")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("no pod with that identity"),
        "{}",
        e.message()
    );
    // node-b may have db.
    let b = node_token(state.path(), "node-b");
    let ok = request(&plane, Some(&b), csr_for(&id("demo", "db")))
        .await
        .unwrap();
    assert_eq!(verify(&ok, &plane.roots()), id("demo", "db"));

    let m = metrics(&plane).await;
    assert!(m.contains("ambit_certificates_signed_total 2"), "{m}");
    assert!(
        m.contains(r#"ambit_certificates_refused_total{reason="permission_denied"} 2"#),
        "{m}"
    );
    plane.stop().await;
}

#[tokio::test]
async fn unauthenticated_and_malformed_requests_say_why() {
    let state = tempfile::tempdir().unwrap();
    let plane = Plane::start(state.path(), local(&["node-a"], &[]), None).await;
    let a = node_token(state.path(), "node-a");
    let web = id("demo", "web");

    let e = request(&plane, None, csr_for(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no credential"), "{}", e.message());

    let mut forged = a.clone().into_bytes();
    forged[5] = if forged[5] == b'a' { b'b' } else { b'a' };
    let forged = String::from_utf8(forged).unwrap();
    let e = request(&plane, Some(&forged), csr_for(&web))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("unknown credential"),
        "{}",
        e.message()
    );

    // Wrong trust domain.
    let foreign = Identity::new("evil.local", "demo", "web").unwrap();
    let e = request(&plane, Some(&a), csr_for(&foreign))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("outside this CA's trust domain"),
        "{}",
        e.message()
    );

    // Two URI SANs.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = [web.to_string(), id("demo", "db").to_string()]
        .into_iter()
        .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
        .collect();
    let two = params.serialize_request(&key).unwrap().pem().unwrap();
    let e = request(&plane, Some(&a), two).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("2 URI SANs"), "{}", e.message());

    let e = request(&plane, Some(&a), "garbage".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let m = metrics(&plane).await;
    assert!(
        m.contains(r#"ambit_certificates_refused_total{reason="unauthenticated"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"ambit_certificates_refused_total{reason="invalid_csr"} 3"#),
        "{m}"
    );
    assert!(m.contains("ambit_certificates_signed_total 0"), "{m}");
    plane.stop().await;
}

#[tokio::test]
async fn credentials_and_roots_across_restarts() {
    let state = tempfile::tempdir().unwrap();
    let first = Plane::start(state.path(), local(&["node-a"], &[]), None).await;
    let old_token = node_token(state.path(), "node-a");
    let root = first.roots();
    assert_eq!(
        std::fs::read_to_string(state.path().join(ROOT_CERT_FILE)).unwrap(),
        root
    );
    first.stop().await;

    let second = Plane::start(state.path(), local(&["node-a"], &[]), None).await;
    assert_eq!(second.roots(), root, "a generated root survives a restart");
    // A credential from before the restart no longer works; the new file does.
    let e = request(&second, Some(&old_token), csr_for(&id("demo", "web")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let new_token = node_token(state.path(), "node-a");
    assert_ne!(new_token, old_token);
    let ok = request(&second, Some(&new_token), csr_for(&id("demo", "web")))
        .await
        .unwrap();
    assert_eq!(verify(&ok, &root), id("demo", "web"));
    second.stop().await;

    // A plugged-in root is used as given.
    let operator = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
    let pem = operator.to_pem();
    let files = tempfile::tempdir().unwrap();
    let (c, k): (PathBuf, PathBuf) = (files.path().join("ca.crt"), files.path().join("ca.key"));
    std::fs::write(&c, &pem.cert_pem).unwrap();
    std::fs::write(&k, &pem.key_pem).unwrap();
    let other_state = tempfile::tempdir().unwrap();
    let plugged = Plane::start(
        other_state.path(),
        local(&["node-a"], &[]),
        Some(CaFiles {
            cert: c,
            key: k,
            chain: None,
        }),
    )
    .await;
    assert_eq!(plugged.security.roots_pem(), operator.roots_pem());
    let token = node_token(other_state.path(), "node-a");
    let ok = request(&plugged, Some(&token), csr_for(&id("demo", "web")))
        .await
        .unwrap();
    assert_eq!(
        verify(&ok, &operator.roots_pem().concat()),
        id("demo", "web")
    );
    plugged.stop().await;
}

#[tokio::test]
async fn clients_refuse_a_controller_with_another_identity() {
    let state = tempfile::tempdir().unwrap();
    let plane = Plane::start(state.path(), local(&["node-a"], &[]), None).await;
    let a = node_token(state.path(), "node-a");
    let impostor_expected = id("ambit-system", "someone-else");
    let channel =
        ambit_hbone::control::channel(&plane.addr.to_string(), &plane.roots(), &impostor_expected)
            .unwrap();
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr: csr_for(&id("demo", "web")),
        validity_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {a}").parse().unwrap());
    let e = CertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Another mesh's root does not verify the controller either.
    let other = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
    let channel = ambit_hbone::control::channel(
        &plane.addr.to_string(),
        &other.roots_pem().concat(),
        &plane.security.identity,
    )
    .unwrap();
    let e = CertificateServiceClient::new(channel)
        .create_certificate(CreateCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Nothing reached the CA.
    let m = metrics(&plane).await;
    assert!(!m.contains("ambit_certificates_refused_total{"), "{m}");
    plane.stop().await;
}

#[tokio::test]
async fn discovery_subscribers_must_be_the_node_they_claim() {
    let state = tempfile::tempdir().unwrap();
    let wp = id("demo", "waypoint");
    let plane = Plane::start(
        state.path(),
        local(&["node-a", "node-b"], std::slice::from_ref(&wp)),
        None,
    )
    .await;
    let a = node_token(state.path(), "node-a");

    let e = subscribe(&plane, &a, hello_ztunnel("node-b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("node node-a may not subscribe as ztunnel node=node-b"),
        "{}",
        e.message()
    );
    let e = subscribe(&plane, "nope", hello_ztunnel("node-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A waypoint's credential may not pose as a ztunnel.
    let w = std::fs::read_to_string(LocalCredentials::workload_path(
        &credentials_dir(state.path()),
        &wp,
    ))
    .unwrap();
    let e = subscribe(&plane, &w, hello_ztunnel("node-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let (mut pushes, _tx) = subscribe(&plane, &a, hello_ztunnel("node-a"))
        .await
        .unwrap();
    let push = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await
        .unwrap()
        .unwrap()
        .expect("full state");
    assert!(push.full_state);
    assert_eq!(push.trust_roots, plane.security.roots_pem());

    let m = metrics(&plane).await;
    assert!(
        m.contains(r#"ambit_connected_proxies{kind="ztunnel"} 1"#),
        "{m}"
    );
    assert!(m.contains("ambit_pushes_total 1"), "{m}");
    let (code, body) = http_get(plane.ops_addr, "/ready").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));

    // Shutdown ends the subscriber's stream cleanly (OK, no error) and the server exits.
    let stop = tokio::spawn(plane.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await
        .expect("stream ends at shutdown");
    assert!(matches!(end, Ok(None)), "{end:?}");
    stop.await.unwrap();
}

#[tokio::test]
async fn readiness_waits_for_the_sources() {
    let state = tempfile::tempdir().unwrap();
    let mut builder = ModelBuilder::new(ModelConfig::default());
    let sink = builder.sink("slow");
    let model = builder.spawn();
    let plane = Plane::serve(model, state.path(), local(&["node-a"], &[]), None).await;
    let (code, body) = http_get(plane.ops_addr, "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("sources not synced"), "{body}");
    // Until then, a node's request is "retry", not a refusal.
    let a = node_token(state.path(), "node-a");
    let e = request(&plane, Some(&a), csr_for(&id("demo", "web")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    sink.send(vec![SourceEvent::Synced]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(http_get(plane.ops_addr, "/ready").await.0, 200);
    plane.stop().await;
}

/// Kubernetes mode: tokens checked by TokenReview against an API server speaking the real
/// wire format; the ztunnel ServiceAccount stands for its node, others for themselves.
#[tokio::test]
async fn kubernetes_tokens_are_reviewed_and_mapped_to_nodes() {
    use ambit_testing::apiserver::{FakeApiServer, TokenUser};
    let api = FakeApiServer::start().await.unwrap();
    let zt = |node: &str| {
        TokenUser::service_account("ambit-system", "ambit-ztunnel", "ztunnel-x", node)
            .with_audiences(&["ambit-ca"])
    };
    api.add_token("zt-a", zt("node-a"));
    api.add_token(
        "zt-default-audience",
        TokenUser::service_account("ambit-system", "ambit-ztunnel", "ztunnel-x", "node-a"),
    );
    api.add_token(
        "wp",
        TokenUser::service_account("demo", "waypoint", "wp-1", "node-b")
            .with_audiences(&["ambit-ca"]),
    );
    let state = tempfile::tempdir().unwrap();
    let auth = AuthConfig::Kubernetes {
        client: api.client().unwrap(),
        audience: "ambit-ca".into(),
        ztunnel_service_account: ("ambit-system".into(), "ambit-ztunnel".into()),
    };
    let plane = Plane::start(state.path(), auth, None).await;

    let ok = request(&plane, Some("zt-a"), csr_for(&id("demo", "web")))
        .await
        .unwrap();
    assert_eq!(verify(&ok, &plane.roots()), id("demo", "web"));
    let e = request(&plane, Some("zt-a"), csr_for(&id("demo", "db")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("node node-a may not obtain"),
        "{}",
        e.message()
    );

    // A waypoint gets its own identity, nothing else.
    let ok = request(&plane, Some("wp"), csr_for(&id("demo", "waypoint")))
        .await
        .unwrap();
    assert_eq!(verify(&ok, &plane.roots()), id("demo", "waypoint"));
    let e = request(&plane, Some("wp"), csr_for(&id("demo", "web")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("service account demo/waypoint may only obtain its own identity"),
        "{}",
        e.message()
    );

    for (token, why) in [
        ("forged", "token not recognised"),
        ("zt-default-audience", "audiences"),
    ] {
        let e = request(&plane, Some(token), csr_for(&id("demo", "web")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token}: {e:?}");
        assert!(e.message().contains(why), "{token}: {}", e.message());
    }
    // Every request was a TokenReview for our audience.
    let reviews = api
        .requests()
        .iter()
        .filter(|r| r.is(ambit_testing::apiserver::Verb::TokenReview, "tokenreviews"))
        .count();
    assert_eq!(reviews, 6);

    // Discovery: the node's token subscribes for its node only.
    let e = subscribe(&plane, "zt-a", hello_ztunnel("node-b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let (mut pushes, _tx) = subscribe(&plane, "zt-a", hello_ztunnel("node-a"))
        .await
        .unwrap();
    assert!(pushes.message().await.unwrap().unwrap().full_state);
    plane.stop().await;
}

/// Kubernetes mode keeps a generated root in the `ambit-ca` Secret (so a restarted pod
/// reloads it) and publishes the trust root in the `ambit-root-cert` ConfigMap.
#[tokio::test]
async fn kubernetes_root_lives_in_a_secret_and_is_published() {
    use ambit_controller::ca::kube_store;
    use ambit_controller::ca::store::CaOrigin;
    use ambit_testing::apiserver::FakeApiServer;
    let api = FakeApiServer::start().await.unwrap();
    api.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambit-system"}
    }))
    .unwrap();
    let (first, origin) = kube_store::load_or_generate(api.client().unwrap(), "ambit-system", TD)
        .await
        .unwrap();
    assert_eq!(origin, CaOrigin::Generated);
    assert!(api
        .get("v1", "Secret", "ambit-system", "ambit-ca")
        .is_some());
    let (again, origin) = kube_store::load_or_generate(api.client().unwrap(), "ambit-system", TD)
        .await
        .unwrap();
    assert_eq!(origin, CaOrigin::Reloaded);
    assert_eq!(again.roots_pem(), first.roots_pem());

    kube_store::publish_roots(
        api.client().unwrap(),
        "ambit-system",
        &first.roots_pem().concat(),
    )
    .await
    .unwrap();
    let cm = api
        .get("v1", "ConfigMap", "ambit-system", "ambit-root-cert")
        .expect("ConfigMap applied");
    assert_eq!(
        cm["data"]["root-cert.pem"].as_str(),
        Some(first.roots_pem().concat().as_str())
    );
    let applied = api.requests().iter().any(|r| {
        r.verb == ambit_testing::apiserver::Verb::Patch
            && r.path.ends_with("/configmaps/ambit-root-cert")
            && r.param("fieldManager") == Some("ambit-controller")
    });
    assert!(
        applied,
        "server-side apply with the ambit-controller field manager"
    );
}
