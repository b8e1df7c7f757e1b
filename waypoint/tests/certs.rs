//! The waypoint's certificate from a CA over gRPC (a real tonic server signing with a real
//! CA, plaintext on loopback): the first certificate is for the waypoint's identity, a
//! refused request is an error naming the RPC, and rotation at half-life swaps what the
//! HBONE sides present.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_hbone::testing::TestPki;
use ambit_hbone::tls::RotatingCert;
use ambit_hbone::{cert, Identity};
use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_waypoint::certs::{self, CaConfig};

struct Ca {
    pki: Arc<TestPki>,
    refuse: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl CertificateService for Ca {
    async fn create_certificate(
        &self,
        request: tonic::Request<CreateCertificateRequest>,
    ) -> Result<tonic::Response<CreateCertificateResponse>, tonic::Status> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(tonic::Status::permission_denied("not today"));
        }
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if auth != "Bearer sa-token" {
            return Err(tonic::Status::unauthenticated(format!(
                "bad token {auth:?}"
            )));
        }
        let valid = self
            .pki
            .ca
            .validate_csr(&request.get_ref().csr, None)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let now = SystemTime::now();
        // Two seconds of life: rotation is due after one.
        let chain = self
            .pki
            .ca
            .sign_between(
                &valid,
                now - Duration::from_secs(1),
                now + Duration::from_secs(1),
            )
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(CreateCertificateResponse {
            cert_chain: chain.iter().map(|c| cert::to_pem(c.as_ref())).collect(),
            trust_roots: vec![cert::chain_to_pem(&self.pki.ca.trust_roots())],
        }))
    }
}

#[tokio::test]
async fn fetches_and_rotates() {
    let pki = Arc::new(TestPki::new("cluster.local"));
    let refuse = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(Ca {
                pki: pki.clone(),
                refuse: refuse.clone(),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = std::env::temp_dir().join(format!("waypoint-certs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "sa-token\n").unwrap();
    let identity = Identity::new("cluster.local", "demo", "waypoint").unwrap();
    let config = CaConfig {
        channel: tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
        identity: identity.clone(),
        token_file: Some(dir.join("token")),
        validity: Duration::from_secs(3600),
    };
    let first = certs::fetch(&config).await.unwrap();
    assert_eq!(first.identity(), &identity);

    let mut no_token = config.clone();
    no_token.token_file = None;
    let err = certs::fetch(&no_token).await.unwrap_err();
    assert!(err.to_string().contains("bad token"), "{err}");

    let rotating = RotatingCert::new(&first);
    let leaf = |r: &RotatingCert| r.current().cert[0].as_ref().to_vec();
    let original = leaf(&rotating);
    let expiry = certs::ExpiryMetric::default();
    let first_expiry = first
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    tokio::spawn(certs::rotate(
        config,
        rotating.clone(),
        first,
        expiry.clone(),
    ));
    let mut rotated = false;
    for _ in 0..100 {
        if leaf(&rotating) != original {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
        "certificate not rotated within 10 s of a 2 s lifetime"
    );
    // The expiry gauge follows the certificate in use, as ztunnel's does.
    let mut registry = prometheus_client::registry::Registry::default();
    expiry.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("ambit_certificates_expiry_seconds{identity=\"spiffe://"))
        .unwrap_or_else(|| panic!("no expiry gauge:\n{text}"));
    let published: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        published >= first_expiry,
        "{line} (first expired at {first_expiry})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
