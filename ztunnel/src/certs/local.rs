//! A CA client that signs in-process with an [`ambit_hbone::ca::CertificateAuthority`]:
//! for tests (with the injected clock, so paused time moves validity windows) and for
//! single-process setups that hold the mesh's CA themselves.

use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::ca::{CertificateAuthority, CLOCK_SKEW};

use super::{CaClient, CertsError, Clock, SignedChain};
use crate::telemetry::error_chain;

/// Signs CSRs with a local CA, validity measured on the injected clock.
#[derive(Clone)]
pub struct InProcessCa {
    ca: Arc<CertificateAuthority>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for InProcessCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessCa")
            .field("trust_domain", &self.ca.trust_domain())
            .finish()
    }
}

impl InProcessCa {
    pub fn new(ca: Arc<CertificateAuthority>, clock: impl Clock) -> Self {
        InProcessCa {
            ca,
            clock: Arc::new(clock),
        }
    }

    /// The CA behind this client.
    pub fn authority(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Signs synchronously (what [`CaClient::sign`] does), for wrappers in tests.
    pub fn sign_now(&self, csr_pem: &str, validity: Duration) -> Result<SignedChain, CertsError> {
        let refused = |e: &dyn std::error::Error| CertsError::Refused {
            reason: error_chain(e),
        };
        let csr = self
            .ca
            .validate_csr(csr_pem, None)
            .map_err(|e| refused(&e))?;
        let now = self.clock.now();
        let chain = self
            .ca
            .sign_between(&csr, now - CLOCK_SKEW, now + validity)
            .map_err(|e| refused(&e))?;
        Ok(SignedChain {
            cert_chain: chain
                .iter()
                .map(|c| ambit_hbone::cert::to_pem(c.as_ref()))
                .collect(),
            trust_roots: self.ca.roots_pem(),
        })
    }
}

impl CaClient for InProcessCa {
    async fn sign(&self, csr_pem: String, validity: Duration) -> Result<SignedChain, CertsError> {
        self.sign_now(&csr_pem, validity)
    }
}
