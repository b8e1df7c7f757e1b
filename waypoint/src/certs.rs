//! The waypoint's own certificate from the controller's CA (`CreateCertificate`), for when
//! it is not given as files: a fresh key and CSR for the waypoint's identity, the bearer
//! token of its service account, and rotation at half-life into the [`RotatingCert`] that
//! both HBONE sides read at each handshake, so open connections are never dropped.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ambit_hbone::cert::{self, WorkloadCertificate};
use ambit_hbone::tls::RotatingCert;
use ambit_hbone::{csr, Identity};
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::CreateCertificateRequest;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng as _;
use tonic::transport::Channel;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// `ambit_certificates_expiry_seconds{identity}`: the unix time at which the waypoint's
/// current certificate expires, under the name and label ztunnel uses for its own, so the
/// controller's dashboard (and alerts) read both alike. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ExpiryMetric(Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>);

impl ExpiryMetric {
    /// Registers the gauge in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ambit_certificates_expiry_seconds",
            "Unix time (seconds) at which the current certificate of each local identity expires",
            self.0.clone(),
        );
    }

    /// Publishes `cert`'s expiry.
    pub fn set(&self, cert: &WorkloadCertificate) {
        let secs = cert
            .not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.0
            .get_or_create(&IdentityLabels {
                identity: cert.identity().to_string(),
            })
            .set(secs);
    }
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Generating the key or CSR failed.
    #[error("creating a CSR for {identity}: {source}")]
    Csr {
        identity: Identity,
        #[source]
        source: csr::CsrError,
    },
    /// The token file could not be read or is empty.
    #[error("reading the token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    /// The CA refused or could not be reached.
    #[error("CreateCertificate: {0}")]
    Rpc(#[source] tonic::Status),
    /// The CA's answer is not a usable certificate for us.
    #[error("the CA's certificate is unusable: {0}")]
    Chain(#[source] cert::CertError),
    /// The CA signed another identity than ours.
    #[error("the CA signed {got}, not {want}")]
    WrongIdentity { want: Identity, got: Identity },
}

/// How to ask the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub channel: Channel,
    pub identity: Identity,
    pub token_file: Option<PathBuf>,
    /// Requested lifetime (the CA may shorten it).
    pub validity: Duration,
}

/// One signed certificate for `config.identity`.
pub async fn fetch(config: &CaConfig) -> Result<WorkloadCertificate, CertsError> {
    let request = csr::new_csr(&config.identity).map_err(|source| CertsError::Csr {
        identity: config.identity.clone(),
        source,
    })?;
    let mut rpc = tonic::Request::new(CreateCertificateRequest {
        csr: request.csr_pem.clone(),
        validity_seconds: i64::try_from(config.validity.as_secs()).unwrap_or(i64::MAX),
    });
    if let Some(path) = &config.token_file {
        let bad = |reason: String| CertsError::Token {
            path: path.clone(),
            reason,
        };
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| bad(e.to_string()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| bad("not a valid header value".into()))?;
        rpc.metadata_mut().insert("authorization", value);
    }
    let response = CertificateServiceClient::new(config.channel.clone())
        .create_certificate(rpc)
        .await
        .map_err(CertsError::Rpc)?
        .into_inner();
    let chain = cert::parse_pem_certs(&response.cert_chain.concat()).map_err(CertsError::Chain)?;
    let roots = cert::parse_pem_certs(&response.trust_roots.concat()).map_err(CertsError::Chain)?;
    let signed =
        WorkloadCertificate::new(chain, request.private_key(), roots).map_err(CertsError::Chain)?;
    if signed.identity() != &config.identity {
        return Err(CertsError::WrongIdentity {
            want: config.identity.clone(),
            got: signed.identity().clone(),
        });
    }
    Ok(signed)
}

/// Replaces `rotating`'s certificate at each half-life, forever, publishing each one's
/// expiry in `expiry`; failures are retried with jittered back-off while the current
/// certificate stays in use.
pub async fn rotate(
    config: CaConfig,
    rotating: RotatingCert,
    mut current: WorkloadCertificate,
    expiry: ExpiryMetric,
) {
    expiry.set(&current);
    loop {
        let wait = current
            .refresh_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let mut delay = Duration::from_millis(500);
        loop {
            match fetch(&config).await {
                Ok(next) => {
                    rotating.set(&next);
                    expiry.set(&next);
                    tracing::info!(identity = %config.identity, not_after = ?next.not_after(), "certificate rotated");
                    current = next;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "certificate rotation failed; keeping the current one");
                    let jitter = rand::rng().random_range(0.5..1.0);
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}
