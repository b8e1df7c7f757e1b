//! The certificate manager as its callers see it: what `current`, `wait_ready` and the
//! admin status report while the CA works, fails, comes back or misbehaves. Rotation and
//! back-off run on tokio's paused clock, with a CA that signs on that same clock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::ca::{CertificateAuthority, DEFAULT_ROOT_VALIDITY};
use ambit_hbone::Identity;
use ambit_ztunnel::certs::local::InProcessCa;
use ambit_ztunnel::certs::{
    CaClient, CertConfig, CertManager, CertsError, Clock, SignedChain, TokioClock,
};
use ambit_ztunnel::metrics::Metrics;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("identity")
}

/// A CA that signs on the test clock, and can be taken down or made to lie.
#[derive(Clone)]
struct TestCa {
    inner: InProcessCa,
    clock: TokioClock,
    calls: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    /// When set, answers every CSR with a certificate for this identity instead (same
    /// key, so only the identity check can catch it).
    impersonate: Arc<Mutex<Option<Identity>>>,
    /// When set, certificates start this long before now (so may arrive past half-life).
    backdate: Arc<Mutex<Option<Duration>>>,
}

impl TestCa {
    fn new() -> Self {
        let clock = TokioClock::new();
        let ca =
            CertificateAuthority::generate("cluster.local", DEFAULT_ROOT_VALIDITY).expect("CA");
        TestCa {
            inner: InProcessCa::new(Arc::new(ca), clock),
            clock,
            calls: Arc::default(),
            down: Arc::default(),
            impersonate: Arc::default(),
            backdate: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn manager(&self, config: CertConfig, metrics: Option<Metrics>) -> CertManager {
        CertManager::new(self.clone(), self.clock, config, metrics)
    }

    fn sign_as(
        &self,
        csr_pem: &str,
        other: &Identity,
        backdate: Duration,
        validity: Duration,
    ) -> SignedChain {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
        let uri = rcgen::string::Ia5String::try_from(other.to_string()).expect("uri");
        csr.params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let now = self.clock.now();
        csr.params.not_before = (now - backdate).into();
        csr.params.not_after = (now + validity).into();
        let pem = self.inner.authority().to_pem();
        let key = rcgen::KeyPair::from_pem(&pem.key_pem).expect("CA key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&pem.cert_pem, key).expect("issuer");
        let leaf = csr.signed_by(&issuer).expect("sign");
        SignedChain {
            cert_chain: vec![leaf.pem()],
            trust_roots: self.inner.authority().roots_pem(),
        }
    }
}

impl CaClient for TestCa {
    async fn sign(&self, csr_pem: String, validity: Duration) -> Result<SignedChain, CertsError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(CertsError::Rpc {
                code: tonic::Code::Unavailable,
                message: "CA is down".into(),
            });
        }
        let impersonate = self.impersonate.lock().expect("lock").clone();
        let backdate = *self.backdate.lock().expect("lock");
        match (impersonate, backdate) {
            (None, None) => self.inner.sign_now(&csr_pem, validity),
            (other, backdate) => {
                let identity = match other {
                    Some(other) => other,
                    None => ambit_hbone::csr::validate(&csr_pem, "cluster.local", None)
                        .expect("valid CSR")
                        .identity()
                        .clone(),
                };
                Ok(self.sign_as(&csr_pem, &identity, backdate.unwrap_or_default(), validity))
            }
        }
    }
}

fn csr_pem_for(identity: &Identity) -> String {
    ambit_hbone::csr::new_csr(identity).expect("csr").csr_pem
}

fn one_hour() -> CertConfig {
    CertConfig {
        validity: HOUR,
        initial_backoff: Duration::from_secs(1),
        max_backoff: MINUTE,
        request_timeout: Duration::from_secs(10),
    }
}

fn serial(m: &CertManager, identity: &Identity) -> Option<String> {
    m.current(identity).map(|c| c.summary().serial)
}

fn status_of(m: &CertManager, identity: &Identity) -> ambit_ztunnel::certs::CertStatus {
    m.status()
        .into_iter()
        .find(|s| s.identity == *identity)
        .expect("identity in status")
}

#[tokio::test(start_paused = true)]
async fn certificate_is_fetched_on_ensure() {
    let ca = TestCa::new();
    let metrics = Metrics::new();
    let m = ca.manager(one_hour(), Some(metrics.clone()));
    let sleep = id("sleep");
    assert!(m.current(&sleep).is_none());
    assert!(matches!(
        m.wait_ready(&sleep).await,
        Err(CertsError::NotManaged(_))
    ));

    m.ensure(&sleep);
    let cert = tokio::time::timeout(MINUTE, m.wait_ready(&sleep))
        .await
        .expect("issued promptly")
        .expect("issued");
    assert_eq!(cert.identity(), &sleep);
    assert_eq!(serial(&m, &sleep), Some(cert.summary().serial));
    assert_eq!(ca.calls(), 1);
    let status = status_of(&m, &sleep);
    assert_eq!(status.state, "ready");
    assert_eq!(status.workloads, 1);
    assert!(status.last_error.is_none());
    let exposition = metrics.encode().expect("metrics");
    assert!(
        exposition.contains(&format!(
            "ambit_certificates_expiry_seconds{{identity=\"{sleep}\"}}"
        )),
        "{exposition}"
    );
}

#[tokio::test(start_paused = true)]
async fn workloads_sharing_an_identity_share_one_certificate() {
    let ca = TestCa::new();
    let m = ca.manager(one_hour(), None);
    let (sleep, echo) = (id("sleep"), id("echo"));
    m.ensure(&sleep);
    m.ensure(&sleep);
    let a = m.wait_ready(&sleep).await.expect("cert");
    let b = m.wait_ready(&sleep).await.expect("cert");
    assert!(Arc::ptr_eq(&a, &b));
    m.ensure(&echo);
    m.wait_ready(&echo).await.expect("cert");
    tokio::time::sleep(10 * MINUTE).await;
    assert_eq!(ca.calls(), 2, "one CSR per identity");
    assert_eq!(status_of(&m, &sleep).workloads, 2);
    assert_eq!(m.identities(), vec![echo, sleep]);
}

#[tokio::test(start_paused = true)]
async fn readiness_waits_for_every_local_identity() {
    use ambit_ztunnel::readiness::Ready;
    let ca = TestCa::new();
    ca.set_down(true);
    let m = ca.manager(one_hour(), None);
    let ids = [id("sleep"), id("echo")];
    for i in &ids {
        m.ensure(i);
    }
    let ready = Ready::new();
    let block = ready.register("certificates for local workloads");
    tokio::spawn({
        let m = m.clone();
        async move {
            if m.wait_all_ready(&ids).await.is_ok() {
                block.done();
            }
        }
    });
    tokio::time::sleep(MINUTE).await;
    assert_eq!(ready.pending(), ["certificates for local workloads"]);
    ca.set_down(false);
    tokio::time::sleep(2 * MINUTE).await;
    assert!(ready.is_ready(), "{:?}", ready.pending());
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_without_touching_holders() {
    let ca = TestCa::new();
    let m = ca.manager(one_hour(), None);
    let sleep = id("sleep");
    m.ensure(&sleep);
    let first = m.wait_ready(&sleep).await.expect("cert");
    // The CA backdates by a minute for clock skew: 61 minutes of life, half of it is
    // 30.5 minutes from not-before, 29.5 minutes from now.
    assert_eq!(
        first.refresh_at(),
        first.not_before() + Duration::from_secs(1830)
    );

    tokio::time::sleep(29 * MINUTE).await;
    assert_eq!(ca.calls(), 1, "not rotated before half-life");
    assert_eq!(serial(&m, &sleep), Some(first.summary().serial));

    tokio::time::sleep(MINUTE).await;
    assert_eq!(ca.calls(), 2, "rotated at half-life");
    let second = m.current(&sleep).expect("current");
    assert_ne!(second.summary().serial, first.summary().serial);
    assert_eq!(second.identity(), &sleep);
    // A connection that handshook with the first certificate still holds a valid one.
    assert!(!first.is_expired(ca.clock.now()));
    assert_eq!(first.identity(), &sleep);

    // And so on, every half-life, for as long as the workload stays.
    tokio::time::sleep(HOUR).await;
    assert_eq!(ca.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn ca_outage_keeps_the_old_certificate_and_backs_off() {
    let ca = TestCa::new();
    let m = ca.manager(one_hour(), None);
    let sleep = id("sleep");
    m.ensure(&sleep);
    let first = m.wait_ready(&sleep).await.expect("cert");
    ca.set_down(true);

    // Rotation is due at 29.5 minutes and fails; the old certificate stays in use.
    tokio::time::sleep(30 * MINUTE).await;
    let failing_since = ca.calls();
    assert!(failing_since >= 2, "rotation attempted");
    assert_eq!(serial(&m, &sleep), Some(first.summary().serial));
    let status = status_of(&m, &sleep);
    assert_eq!(status.state, "ready");
    let error = status.last_error.expect("failure reported");
    assert!(error.contains("CA is down"), "{error}");

    // Back-off: doubling from 1 s to at most a minute (with jitter down to half), so a
    // ten-minute outage costs a couple of dozen attempts, not hundreds.
    tokio::time::sleep(10 * MINUTE).await;
    let attempts = ca.calls() - failing_since;
    assert!(
        (8..=30).contains(&attempts),
        "{attempts} attempts in 10 minutes"
    );
    assert!(status_of(&m, &sleep).consecutive_failures as usize >= attempts);

    // Past not-after, an expired certificate is never handed out.
    tokio::time::sleep(25 * MINUTE).await;
    assert!(first.is_expired(ca.clock.now()));
    assert!(m.current(&sleep).is_none());
    assert_eq!(status_of(&m, &sleep).state, "expired");
    let waiting = tokio::time::timeout(5 * MINUTE, m.wait_ready(&sleep)).await;
    assert!(
        waiting.is_err(),
        "wait_ready must not return an expired certificate"
    );

    // The CA comes back: the next retry (at most a minute away) recovers.
    ca.set_down(false);
    let recovered = tokio::time::timeout(2 * MINUTE, m.wait_ready(&sleep))
        .await
        .expect("recovered within the back-off cap")
        .expect("cert");
    assert_ne!(recovered.summary().serial, first.summary().serial);
    let status = status_of(&m, &sleep);
    assert_eq!(status.state, "ready");
    assert!(status.last_error.is_none());
    assert_eq!(status.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn releasing_the_last_workload_forgets_the_certificate() {
    let ca = TestCa::new();
    let metrics = Metrics::new();
    let m = ca.manager(one_hour(), Some(metrics.clone()));
    let sleep = id("sleep");
    m.ensure(&sleep);
    m.ensure(&sleep);
    let held = m.wait_ready(&sleep).await.expect("cert");

    m.release(&sleep);
    assert!(m.current(&sleep).is_some(), "one workload still uses it");

    m.release(&sleep);
    assert!(m.current(&sleep).is_none());
    assert!(m.identities().is_empty());
    assert!(matches!(
        m.wait_ready(&sleep).await,
        Err(CertsError::NotManaged(_))
    ));
    assert!(!metrics
        .encode()
        .expect("metrics")
        .contains("ambit_certificates_expiry_seconds{"));
    // Its worker stopped: no more CSRs for it, however long we wait.
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(ca.calls(), 1);
    // Open connections keep what they handshook with.
    assert_eq!(held.identity(), &sleep);

    // A waiter is woken (with an error) when the identity goes away under it.
    ca.set_down(true);
    m.ensure(&sleep);
    let waiter = tokio::spawn({
        let m = m.clone();
        let sleep = sleep.clone();
        async move { m.wait_ready(&sleep).await }
    });
    tokio::time::sleep(MINUTE).await;
    m.release(&sleep);
    let result = waiter.await.expect("join");
    assert!(
        matches!(result, Err(CertsError::NotManaged(_))),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_refused() {
    let ca = TestCa::new();
    let m = ca.manager(one_hour(), None);
    let (sleep, admin) = (id("sleep"), id("admin"));
    *ca.impersonate.lock().expect("lock") = Some(admin.clone());

    m.ensure(&sleep);
    let waited = tokio::time::timeout(5 * MINUTE, m.wait_ready(&sleep)).await;
    assert!(waited.is_err(), "no certificate for the wrong identity");
    assert!(m.current(&sleep).is_none());
    assert!(ca.calls() > 1, "kept retrying");
    let status = status_of(&m, &sleep);
    assert_eq!(status.state, "pending");
    let error = status.last_error.expect("refusal reported");
    assert!(
        error.contains(&format!(
            "asked the CA for {sleep} but got a certificate for {admin}"
        )),
        "{error}"
    );

    *ca.impersonate.lock().expect("lock") = None;
    let cert = tokio::time::timeout(2 * MINUTE, m.wait_ready(&sleep))
        .await
        .expect("recovers")
        .expect("cert");
    assert_eq!(cert.identity(), &sleep);
}

#[tokio::test(start_paused = true)]
async fn a_certificate_past_half_life_on_arrival_does_not_spin() {
    let ca = TestCa::new();
    // Started three hours ago, ends in one: half-life was an hour ago.
    *ca.backdate.lock().expect("lock") = Some(3 * HOUR);
    let m = ca.manager(one_hour(), None);
    let sleep = id("sleep");
    m.ensure(&sleep);
    let cert = m.wait_ready(&sleep).await.expect("usable all the same");
    assert!(cert.refresh_at() < ca.clock.now());
    tokio::time::sleep(10 * MINUTE).await;
    let calls = ca.calls();
    assert!((5..=30).contains(&calls), "{calls} requests in 10 minutes");
    assert!(m.current(&sleep).is_some());

    // Once the CA behaves, rotation goes back to the half-life schedule.
    *ca.backdate.lock().expect("lock") = None;
    tokio::time::sleep(2 * MINUTE).await;
    let settled = ca.calls();
    tokio::time::sleep(20 * MINUTE).await;
    assert_eq!(ca.calls(), settled);
}

/// The gRPC client against a real tonic server: the bearer credential is read from its
/// file on every request, so a rotated token is used as soon as it is written.
#[tokio::test]
async fn grpc_client_sends_the_current_credential() {
    use ambit_proto::ca::certificate_service_server::{
        CertificateService, CertificateServiceServer,
    };
    use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
    use ambit_ztunnel::certs::grpc::GrpcCaClient;
    use ambit_ztunnel::certs::SystemClock;

    struct Service {
        ca: InProcessCa,
        seen: Arc<Mutex<Vec<Option<String>>>>,
    }

    #[tonic::async_trait]
    impl CertificateService for Service {
        async fn create_certificate(
            &self,
            request: tonic::Request<CreateCertificateRequest>,
        ) -> Result<tonic::Response<CreateCertificateResponse>, tonic::Status> {
            let auth = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            self.seen.lock().expect("lock").push(auth.clone());
            if !matches!(auth.as_deref(), Some("Bearer token-1" | "Bearer token-2")) {
                return Err(tonic::Status::unauthenticated("unknown token"));
            }
            let req = request.into_inner();
            let validity = Duration::from_secs(req.validity_seconds as u64);
            let signed = self
                .ca
                .sign_now(&req.csr, validity)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            Ok(tonic::Response::new(CreateCertificateResponse {
                cert_chain: signed.cert_chain,
                trust_roots: signed.trust_roots,
            }))
        }
    }

    let ca = CertificateAuthority::generate("cluster.local", DEFAULT_ROOT_VALIDITY).expect("CA");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = Service {
        ca: InProcessCa::new(Arc::new(ca), SystemClock),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy();

    let dir = std::env::temp_dir().join(format!("ambit-ztunnel-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token = dir.join("token");
    std::fs::write(&token, "token-1\n").expect("write token");
    let client = GrpcCaClient::new(channel, Some(token.clone()));

    let m = CertManager::new(client.clone(), SystemClock, CertConfig::default(), None);
    let sleep = id("sleep");
    m.ensure(&sleep);
    let cert = tokio::time::timeout(Duration::from_secs(30), m.wait_ready(&sleep))
        .await
        .expect("issued in time")
        .expect("issued");
    assert_eq!(cert.identity(), &sleep);
    let validity = cert
        .not_after()
        .duration_since(cert.not_before())
        .expect("ordered");
    assert_eq!(
        validity,
        ambit_hbone::ca::DEFAULT_CERT_VALIDITY + ambit_hbone::ca::CLOCK_SKEW
    );

    // The kubelet rotates the token in place: the next request carries the new one.
    std::fs::write(&token, "token-2").expect("rotate token");
    client
        .sign(csr_pem_for(&sleep), HOUR)
        .await
        .expect("signed with the rotated token");
    assert_eq!(
        seen.lock().expect("lock").clone(),
        vec![
            Some("Bearer token-1".to_string()),
            Some("Bearer token-2".to_string())
        ]
    );

    std::fs::write(&token, "stolen").expect("write");
    let err = client
        .sign(csr_pem_for(&sleep), HOUR)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &err,
            CertsError::Rpc {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("unknown token"), "{err}");

    std::fs::write(&token, "  \n").expect("write");
    let err = client
        .sign(csr_pem_for(&sleep), HOUR)
        .await
        .expect_err("empty");
    assert!(matches!(err, CertsError::BadCredential { .. }), "{err:?}");

    std::fs::remove_file(&token).expect("remove");
    let err = client
        .sign(csr_pem_for(&sleep), HOUR)
        .await
        .expect_err("missing");
    assert!(matches!(err, CertsError::Credential { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&token.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
