//! The `CertificateService` gRPC service: authenticate, check the CSR, authorize, sign.
//!
//! The order matters. Authentication comes first, so an anonymous caller learns nothing
//! about the mesh (not even whether its CSR would have been well formed); the CSR is
//! validated before authorization so the identity being authorized is the one that would
//! be signed, read from the CSR itself, never from a separate request field. Every refusal
//! is a gRPC status whose message says exactly why, is logged without the token, and is
//! counted by reason.

use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::ca::{CaError, CertificateAuthority};
use ambit_hbone::cert;
use ambit_hbone::csr::CsrError;
use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::{Request, Response, Status};

use super::auth::{AuthError, Authenticator, Caller};
use super::authz::{self, AuthzError};
use crate::model::{error_chain, Model};

/// Labels of `ambit_certificates_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `unauthenticated`, `permission_denied`, `invalid_csr`, `unavailable` or `internal`.
    pub reason: &'static str,
}

/// The CA's counters. Cheap to clone (clones share the values).
#[derive(Clone, Debug, Default)]
pub struct CaMetrics {
    /// Certificates issued.
    pub signed: Counter,
    /// Requests refused, by reason.
    pub refused: Family<RefusedLabels, Counter>,
}

impl CaMetrics {
    /// Registers the counters as `ambit_certificates_signed_total` and
    /// `ambit_certificates_refused_total{reason}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ambit_certificates_signed",
            "Workload certificates issued by the CA",
            self.signed.clone(),
        );
        registry.register(
            "ambit_certificates_refused",
            "Certificate requests refused, by reason",
            self.refused.clone(),
        );
    }
}

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaServiceError {
    /// The caller is not authenticated.
    #[error("unauthenticated")]
    Auth(#[source] AuthError),
    /// The CSR is malformed or asks for something we never sign.
    #[error("bad CSR")]
    Csr(#[source] CsrError),
    /// A negative validity was asked for.
    #[error("validity_seconds must not be negative (0 means the CA's default), got {0}")]
    Validity(i64),
    /// The caller may not obtain the identity.
    #[error("not authorized")]
    Authz(#[source] AuthzError),
    /// Signing failed on our side.
    #[error("signing failed")]
    Sign(#[source] CaError),
}

impl CaServiceError {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            CaServiceError::Auth(AuthError::Review(_)) => "unavailable",
            CaServiceError::Auth(_) => "unauthenticated",
            CaServiceError::Csr(_) | CaServiceError::Validity(_) => "invalid_csr",
            CaServiceError::Authz(AuthzError::NotReady) => "unavailable",
            CaServiceError::Authz(_) => "permission_denied",
            CaServiceError::Sign(_) => "internal",
        }
    }

    /// The one place these errors become gRPC statuses.
    pub fn to_status(&self) -> Status {
        match self {
            CaServiceError::Auth(e) => e.to_status(),
            CaServiceError::Authz(e) => e.to_status(),
            CaServiceError::Csr(e) => Status::invalid_argument(error_chain(e)),
            CaServiceError::Validity(_) => Status::invalid_argument(self.to_string()),
            CaServiceError::Sign(e) => Status::internal(error_chain(e)),
        }
    }
}

/// The CA service. Cheap to clone.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authenticator: Authenticator,
    model: Model,
    validity: Duration,
    metrics: CaMetrics,
}

impl CaService {
    /// Signs with `ca` for callers `authenticator` recognises, authorizing against
    /// `model`; certificates last `validity` unless the caller asks for less.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authenticator: Authenticator,
        model: Model,
        validity: Duration,
        metrics: CaMetrics,
    ) -> Self {
        CaService {
            ca,
            authenticator,
            model,
            validity,
            metrics,
        }
    }

    /// The tonic service to mount on the gRPC server.
    pub fn into_server(self) -> CertificateServiceServer<Self> {
        CertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        request: Request<CreateCertificateRequest>,
        caller_out: &mut Option<Caller>,
    ) -> Result<CreateCertificateResponse, CaServiceError> {
        let caller = self
            .authenticator
            .authenticate(request.metadata())
            .await
            .map_err(CaServiceError::Auth)?;
        *caller_out = Some(caller.clone());
        let request = request.into_inner();
        let csr = self
            .ca
            .validate_csr(&request.csr, None)
            .map_err(CaServiceError::Csr)?;
        let validity = match request.validity_seconds {
            s if s < 0 => return Err(CaServiceError::Validity(s)),
            0 => self.validity,
            s => Duration::from_secs(s.unsigned_abs()).min(self.validity),
        };
        authz::authorize(&caller, csr.identity(), &self.model.current())
            .map_err(CaServiceError::Authz)?;
        let chain = self.ca.sign(&csr, validity).map_err(CaServiceError::Sign)?;
        tracing::info!(%caller, identity = %csr.identity(), validity_secs = validity.as_secs(), "certificate issued");
        Ok(CreateCertificateResponse {
            cert_chain: chain.iter().map(|c| cert::to_pem(c.as_ref())).collect(),
            trust_roots: self.ca.roots_pem(),
        })
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let peer = crate::conn::peer_addr(&request);
        let mut caller = None;
        match self.handle(request, &mut caller).await {
            Ok(response) => {
                self.metrics.signed.inc();
                Ok(Response::new(response))
            }
            Err(e) => {
                let reason = e.reason();
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels { reason })
                    .inc();
                let status = e.to_status();
                let caller = caller.map(|c| c.to_string());
                tracing::warn!(?peer, caller = caller.as_deref().unwrap_or("unauthenticated"), reason, message = %status.message(), "certificate request refused");
                Err(status)
            }
        }
    }
}
