//! Everything the controller's security needs at start, assembled in one place so the
//! binary and the tests build it the same way: the CA (plugged in, reloaded or
//! generated), the authenticator (local node credentials or TokenReview), and the
//! controller's own rotating certificate with the TLS configuration for 15012.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::ca::CertificateAuthority;
use ambit_hbone::Identity;

use super::auth::{Authenticator, CredentialError, LocalCredentials, TokenReviewer};
use super::service::{CaMetrics, CaService};
use super::serving::{self, ServingCert, ServingError};
use super::store::{self, CaFiles, CaOrigin, StoreError};
use crate::model::Model;

/// How callers authenticate.
#[derive(Clone)]
pub enum AuthConfig {
    /// Local mode: issue credentials for these nodes and workload identities under
    /// `<state>/credentials/`.
    Local {
        /// Node names.
        nodes: Vec<String>,
        /// Workload (waypoint) identities.
        workloads: Vec<Identity>,
    },
    /// Kubernetes mode: TokenReview.
    Kubernetes {
        /// The API server client.
        client: kube::Client,
        /// The audience tokens must be for.
        audience: String,
        /// `(namespace, name)` of the ztunnel ServiceAccount.
        ztunnel_service_account: (String, String),
    },
}

/// The settings of the controller's security.
#[derive(Clone)]
pub struct SecurityConfig {
    /// Where the generated root, credentials and trust bundle live.
    pub state_dir: PathBuf,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The controller's namespace (its identity's namespace).
    pub namespace: String,
    /// A plugged-in CA, if any.
    pub ca_files: Option<CaFiles>,
    /// Lifetime of issued certificates (callers may ask for less).
    pub cert_validity: Duration,
    /// How callers authenticate.
    pub auth: AuthConfig,
}

/// Why the controller's security could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The CA could not be loaded, generated or stored.
    #[error("CA")]
    Store(#[source] StoreError),
    /// Local credentials could not be issued.
    #[error("node credentials")]
    Credentials(#[source] CredentialError),
    /// The controller's own certificate could not be made.
    #[error("controller certificate")]
    Serving(#[source] ServingError),
}

/// The assembled security of a running controller.
pub struct Security {
    /// The CA.
    pub ca: Arc<CertificateAuthority>,
    /// How the CA was obtained (for the startup log).
    pub origin: CaOrigin,
    /// Checks callers' tokens (CA and discovery).
    pub authenticator: Authenticator,
    /// The controller's identity, which proxies expect on 15012.
    pub identity: Identity,
    /// The controller's certificate, renewed at half-life.
    pub serving: ServingCert,
    /// TLS for 15012.
    pub tls: Arc<rustls::ServerConfig>,
    /// The CA's counters.
    pub metrics: CaMetrics,
    /// Lifetime of issued certificates.
    pub cert_validity: Duration,
}

/// Where local credentials are written, under the state directory.
pub fn credentials_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("credentials")
}

impl Security {
    /// Loads or creates everything; must run inside a tokio runtime (the renewal task).
    pub fn start(config: SecurityConfig) -> Result<Self, SetupError> {
        let (ca, origin) = store::load_or_generate(
            &config.state_dir,
            &config.trust_domain,
            config.ca_files.as_ref(),
        )
        .map_err(SetupError::Store)?;
        Self::from_ca(config, ca, origin)
    }

    /// [`Self::start`] for a replica that follows a leader over the same state directory:
    /// the root is reloaded (never generated: the leader did) and the node credentials the
    /// leader issued are loaded instead of issuing new ones, so either replica accepts
    /// every proxy.
    pub fn start_following(config: SecurityConfig) -> Result<Self, SetupError> {
        let (ca, origin) = store::load_or_generate(
            &config.state_dir,
            &config.trust_domain,
            config.ca_files.as_ref(),
        )
        .map_err(SetupError::Store)?;
        Self::build(config, ca, origin, true)
    }

    /// [`Self::start`] with a CA obtained elsewhere (Kubernetes mode: the `ambit-ca`
    /// Secret, see [`super::kube_store`]); `config.ca_files` is ignored.
    pub fn from_ca(
        config: SecurityConfig,
        ca: CertificateAuthority,
        origin: CaOrigin,
    ) -> Result<Self, SetupError> {
        Self::build(config, ca, origin, false)
    }

    fn build(
        config: SecurityConfig,
        ca: CertificateAuthority,
        origin: CaOrigin,
        following: bool,
    ) -> Result<Self, SetupError> {
        let ca = Arc::new(ca);
        let authenticator = match config.auth {
            AuthConfig::Local { nodes, workloads } => {
                let dir = credentials_dir(&config.state_dir);
                let credentials = if following {
                    LocalCredentials::load(&dir, &nodes, &workloads)
                } else {
                    LocalCredentials::issue(&dir, &nodes, &workloads)
                };
                Authenticator::Local(credentials.map_err(SetupError::Credentials)?)
            }
            AuthConfig::Kubernetes {
                client,
                audience,
                ztunnel_service_account: (ns, name),
            } => Authenticator::Kubernetes(TokenReviewer::new(
                client,
                &audience,
                &config.trust_domain,
                &ns,
                &name,
            )),
        };
        let identity = serving::controller_identity(&config.trust_domain, &config.namespace)
            .map_err(SetupError::Serving)?;
        let serving = ServingCert::start(ca.clone(), identity.clone(), config.cert_validity)
            .map_err(SetupError::Serving)?;
        let tls = serving::server_config(&serving.cert).map_err(SetupError::Serving)?;
        Ok(Security {
            ca,
            origin,
            authenticator,
            identity,
            serving,
            tls,
            metrics: CaMetrics::default(),
            cert_validity: config.cert_validity,
        })
    }

    /// The mesh's trust roots, PEM, one per certificate.
    pub fn roots_pem(&self) -> Vec<String> {
        self.ca.roots_pem()
    }

    /// The CA service, authorizing against `model`.
    pub fn ca_service(&self, model: Model) -> CaService {
        CaService::new(
            self.ca.clone(),
            self.authenticator.clone(),
            model,
            self.cert_validity,
            self.metrics.clone(),
        )
    }
}

impl Drop for Security {
    fn drop(&mut self) {
        self.serving.renewal.abort();
    }
}
