//! The control plane across crates: ztunnel's real CA client (`GrpcCaClient`, reading its
//! node credential from a file) over `ambit_hbone::control::channel` to the controller's
//! real CA service behind the controller's own TLS. No root or namespaces needed: the
//! controller and the client share one process and talk over loopback.

// Helpers panic as test failures do.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_controller::ca::auth::LocalCredentials;
use ambit_controller::ca::setup::credentials_dir;
use ambit_controller::ca::store::ROOT_CERT_FILE;
use ambit_controller::ca::{AuthConfig, Security, SecurityConfig};
use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService};
use ambit_controller::model::{ModelBuilder, ModelConfig, SourceEvent};
use ambit_controller::server::GrpcServer;
use ambit_controller::source::local::parse_file;
use ambit_hbone::cert::WorkloadCertificate;
use ambit_hbone::{csr, Identity};
use ambit_ztunnel::certs::grpc::GrpcCaClient;
use ambit_ztunnel::certs::{CaClient, CertsError};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: cart, containers: []}
status: {podIP: 10.2.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: pay, containers: []}
status: {podIP: 10.2.0.2}
"#;

/// Starts a controller (model, CA, discovery, TLS) on loopback; returns its address and
/// security, and keeps it running until the test's runtime ends.
async fn controller(state: &Path) -> (std::net::SocketAddr, Security) {
    let mut builder = ModelBuilder::new(ModelConfig::default());
    let sink = builder.sink("test");
    let model = builder.spawn();
    let mut events: Vec<_> = parse_file(Path::new("mesh.yaml"), MESH)
        .unwrap()
        .into_iter()
        .map(|l| SourceEvent::Apply(l.object))
        .collect();
    events.push(SourceEvent::Synced);
    sink.send(events).await.unwrap();
    std::mem::forget(sink);
    model.wait_for(|s| s.ready).await.unwrap();

    let security = Security::start(SecurityConfig {
        state_dir: state.to_path_buf(),
        trust_domain: "cluster.local".into(),
        namespace: "ambit-system".into(),
        ca_files: None,
        cert_validity: Duration::from_secs(24 * 3600),
        auth: AuthConfig::Local {
            nodes: vec!["node-a".into(), "node-b".into()],
            workloads: Vec::new(),
        },
    })
    .unwrap();
    let (roots_tx, roots) = tokio::sync::watch::channel(Arc::new(security.roots_pem()));
    std::mem::forget(roots_tx);
    let discovery = DiscoveryService::new(model.clone(), roots, DiscoveryOptions::default())
        .with_authenticator(security.authenticator.clone());
    let mut server = GrpcServer::new(discovery).with_tls(security.tls.clone());
    server
        .routes_mut()
        .add_service(security.ca_service(model).into_server());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));
    (addr, security)
}

#[tokio::test]
async fn ztunnel_ca_client_gets_a_certificate_from_the_controller() {
    let state = tempfile::tempdir().unwrap();
    let (addr, security) = controller(state.path()).await;
    // What a local ztunnel is given: the root file and its node's credential file.
    let root = std::fs::read_to_string(state.path().join(ROOT_CERT_FILE)).unwrap();
    let credential = LocalCredentials::node_path(&credentials_dir(state.path()), "node-a");
    let channel =
        ambit_hbone::control::channel(&addr.to_string(), &root, &security.identity).unwrap();
    let client = GrpcCaClient::new(channel.clone(), Some(credential.clone()));

    let cart = Identity::new("cluster.local", "shop", "cart").unwrap();
    let request = csr::new_csr(&cart).unwrap();
    let signed = client
        .sign(request.csr_pem.clone(), Duration::from_secs(3600))
        .await
        .expect("node-a may obtain its own pod's identity");
    let cert = WorkloadCertificate::from_pem(
        &signed.cert_chain.concat(),
        &request.private_key_pem(),
        &signed.trust_roots.concat(),
    )
    .expect("the chain fits the key and roots");
    assert_eq!(cert.identity(), &cart);
    assert_eq!(signed.trust_roots.concat(), root);
    // The request asked for an hour; the CA honours shorter lifetimes.
    assert!(cert.expires_in() <= Duration::from_secs(3600));
    // It is a usable HBONE certificate: a TLS server with it verifies against the root.
    let bundle = ambit_hbone::tls::TrustBundle::from_pem("cluster.local", &root).unwrap();
    ambit_hbone::tls::server_config(&cert, &bundle).unwrap();

    // node-a may not obtain node-b's pod identity; the reason travels to the client.
    let pay = Identity::new("cluster.local", "shop", "pay").unwrap();
    let e = client
        .sign(csr::new_csr(&pay).unwrap().csr_pem, Duration::ZERO)
        .await
        .unwrap_err();
    match e {
        CertsError::Rpc { code, message } => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(message.contains("node node-a may not obtain"), "{message}");
        }
        other => panic!("expected a PermissionDenied RPC error, got {other:?}"),
    }

    // A client that expects another controller identity never gets to send the request.
    let impostor = Identity::new("cluster.local", "ambit-system", "not-the-controller").unwrap();
    let wrong = ambit_hbone::control::channel(&addr.to_string(), &root, &impostor).unwrap();
    let e = GrpcCaClient::new(wrong, Some(credential))
        .sign(request.csr_pem, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CertsError::Rpc {
                code: tonic::Code::Unavailable,
                ..
            }
        ),
        "{e:?}"
    );
}
