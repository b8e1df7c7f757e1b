//! The CA client ztunnel uses in a mesh: `CreateCertificate` on the controller's
//! `CertificateService` (gRPC, port 15012).
//!
//! Each request carries `authorization: Bearer <credential>`. The credential (a projected
//! service-account token in Kubernetes, the node credential in local mode) is read from
//! its file on every request, because the kubelet rotates projected tokens in place and
//! a cached copy would start failing an hour later. The channel is built by the caller,
//! which decides on TLS and the controller's address.

use std::path::PathBuf;
use std::time::Duration;

use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::CreateCertificateRequest;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::{CaClient, CertsError, SignedChain};

/// Signs CSRs through the controller's CA service.
#[derive(Debug, Clone)]
pub struct GrpcCaClient {
    client: CertificateServiceClient<Channel>,
    credential: Option<PathBuf>,
}

impl GrpcCaClient {
    /// A client over `channel`; with `credential`, each request is authenticated with
    /// the token in that file.
    pub fn new(channel: Channel, credential: Option<PathBuf>) -> Self {
        GrpcCaClient {
            client: CertificateServiceClient::new(channel),
            credential,
        }
    }

    async fn authorization(
        &self,
    ) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, CertsError> {
        let Some(path) = &self.credential else {
            return Ok(None);
        };
        let token =
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| CertsError::Credential {
                    path: path.clone(),
                    source,
                })?;
        let token = token.trim();
        let bad = || CertsError::BadCredential { path: path.clone() };
        if token.is_empty() {
            return Err(bad());
        }
        let mut value: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| bad())?;
        // Keep the token out of any debug output of the request.
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

impl CaClient for GrpcCaClient {
    async fn sign(&self, csr_pem: String, validity: Duration) -> Result<SignedChain, CertsError> {
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr: csr_pem,
            validity_seconds: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
        });
        if let Some(auth) = self.authorization().await? {
            request.metadata_mut().insert("authorization", auth);
        }
        // Clones of a tonic client share the channel; `create_certificate` needs `&mut`.
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(rpc_error)?
            .into_inner();
        Ok(SignedChain {
            cert_chain: response.cert_chain,
            trust_roots: response.trust_roots,
        })
    }
}

/// Folds a status and its transport causes ("connection refused"...) into one error.
fn rpc_error(status: tonic::Status) -> CertsError {
    let mut message = status.message().to_string();
    let mut cause = std::error::Error::source(&status);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    CertsError::Rpc {
        code: status.code(),
        message,
    }
}
