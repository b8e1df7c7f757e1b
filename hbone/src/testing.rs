//! Test support: a throw-away PKI that issues real workload certificates through the
//! same CSR and signing path as production, so tests of other crates exercise the
//! certificates they will meet in a mesh.
//!
//! Only built for tests or with the `testing` feature. Helpers panic on failure: a
//! broken test PKI is a bug in the test setup, not a condition to handle.

use std::time::{Duration, SystemTime};

use crate::ca::{CertificateAuthority, DEFAULT_CERT_VALIDITY, DEFAULT_ROOT_VALIDITY};
use crate::cert::WorkloadCertificate;
use crate::csr;
use crate::identity::Identity;
use crate::tls::TrustBundle;

/// A generated root CA for one trust domain.
#[derive(Debug)]
pub struct TestPki {
    /// The CA; use it directly for unusual certificates.
    pub ca: CertificateAuthority,
}

impl TestPki {
    /// A fresh root CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let ca = CertificateAuthority::generate(trust_domain, DEFAULT_ROOT_VALIDITY)
            .expect("test CA generation");
        TestPki { ca }
    }

    /// The roots of this PKI as a trust bundle.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.ca.trust_domain(), self.ca.trust_roots()).expect("test bundle")
    }

    /// A 24-hour certificate for `identity`, via a real CSR.
    pub fn issue(&self, identity: &Identity) -> WorkloadCertificate {
        let now = SystemTime::now();
        self.issue_between(
            identity,
            now - crate::ca::CLOCK_SKEW,
            now + DEFAULT_CERT_VALIDITY,
        )
    }

    /// A certificate for `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub fn issue_for(&self, namespace: &str, service_account: &str) -> WorkloadCertificate {
        let identity = Identity::new(self.ca.trust_domain(), namespace, service_account)
            .expect("test identity");
        self.issue(&identity)
    }

    /// A certificate valid for `validity` from now.
    pub fn issue_for_duration(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> WorkloadCertificate {
        let now = SystemTime::now();
        self.issue_between(identity, now - crate::ca::CLOCK_SKEW, now + validity)
    }

    /// A certificate with an explicit validity window (e.g. already expired). The
    /// identity need not be in the CA's trust domain only if you sign it elsewhere: the
    /// CA refuses other trust domains.
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> WorkloadCertificate {
        let request = csr::new_csr(identity).expect("test CSR");
        let valid = self
            .ca
            .validate_csr(&request.csr_pem, Some(identity))
            .expect("test CSR validation");
        let chain = self
            .ca
            .sign_between(&valid, not_before, not_after)
            .expect("test signing");
        WorkloadCertificate::new(chain, request.private_key(), self.ca.trust_roots())
            .expect("test workload certificate")
    }
}
