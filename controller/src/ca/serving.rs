//! The controller's own certificate for 15012, issued by its own CA and rotated at
//! half-life.
//!
//! The controller proves `spiffe://<td>/ns/<root-ns>/sa/ambit-controller` like any mesh
//! workload proves its identity, so proxies need only the mesh root to trust it, and the
//! same SPIFFE check HBONE uses ([`ambit_hbone::control`]). Clients present no
//! certificate here: a proxy's first request is for its certificate, so proxies
//! authenticate with bearer tokens in request metadata instead. Rotation swaps the
//! certificate in a [`RotatingCert`]: new handshakes get the new one, and established
//! discovery streams are not disturbed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_hbone::ca::{CaError, CertificateAuthority};
use ambit_hbone::cert::{CertError, WorkloadCertificate};
use ambit_hbone::csr::{self, CsrError};
use ambit_hbone::identity::IdentityError;
use ambit_hbone::tls::{RotatingCert, ALPN_H2};
use ambit_hbone::Identity;
use rustls::ServerConfig;

/// The controller's service account name (its identity's last part).
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "ambit-controller";
/// How soon to retry after a failed renewal.
const RETRY: Duration = Duration::from_secs(30);

/// Why the controller's certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The identity is not a valid SPIFFE identity.
    #[error("invalid controller identity")]
    Identity(#[source] IdentityError),
    /// Making the key or CSR failed.
    #[error("cannot create the controller's key")]
    Csr(#[source] CsrError),
    /// The CA refused to sign.
    #[error("the CA cannot sign the controller's certificate")]
    Sign(#[source] CaError),
    /// The signed certificate does not fit the key or roots.
    #[error("the controller's certificate is unusable")]
    Certificate(#[source] CertError),
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/ambit-controller`.
pub fn controller_identity(trust_domain: &str, namespace: &str) -> Result<Identity, ServingError> {
    Identity::new(trust_domain, namespace, CONTROLLER_SERVICE_ACCOUNT)
        .map_err(ServingError::Identity)
}

/// Issues a certificate for `identity` from `ca`, valid for `validity`.
pub fn issue(
    ca: &CertificateAuthority,
    identity: &Identity,
    validity: Duration,
) -> Result<WorkloadCertificate, ServingError> {
    let request = csr::new_csr(identity).map_err(ServingError::Csr)?;
    let valid = ca
        .validate_csr(&request.csr_pem, Some(identity))
        .map_err(ServingError::Csr)?;
    let chain = ca.sign(&valid, validity).map_err(ServingError::Sign)?;
    WorkloadCertificate::new(chain, request.private_key(), ca.trust_roots())
        .map_err(ServingError::Certificate)
}

/// Server TLS for 15012: TLS 1.3, ALPN `h2`, no client certificate, presenting whatever
/// `cert` holds at each handshake.
pub fn server_config(cert: &RotatingCert) -> Result<Arc<ServerConfig>, ServingError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServingError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The controller's serving certificate and the task that renews it.
pub struct ServingCert {
    /// What the TLS config presents.
    pub cert: RotatingCert,
    /// The renewal task; abort it to stop renewing.
    pub renewal: tokio::task::JoinHandle<()>,
}

impl ServingCert {
    /// Issues the first certificate now (failing if the CA cannot) and renews it at
    /// half-life from then on.
    pub fn start(
        ca: Arc<CertificateAuthority>,
        identity: Identity,
        validity: Duration,
    ) -> Result<Self, ServingError> {
        let first = issue(&ca, &identity, validity)?;
        let cert = RotatingCert::new(&first);
        let slot = cert.clone();
        let renewal = tokio::spawn(async move {
            let mut refresh_at = first.refresh_at();
            loop {
                let wait = refresh_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
                match issue(&ca, &identity, validity) {
                    Ok(next) => {
                        tracing::info!(%identity, not_after = ?next.not_after(), "controller certificate renewed");
                        slot.set(&next);
                        refresh_at = next.refresh_at();
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::model::error_chain(&e), "cannot renew the controller certificate; retrying");
                        refresh_at = SystemTime::now() + RETRY;
                    }
                }
            }
        });
        Ok(ServingCert { cert, renewal })
    }
}
