//! The certificate authority the controller runs: it turns validated CSRs into short-lived
//! workload certificates.
//!
//! The CA is either generated (a self-signed ECDSA P-256 root, good for local meshes and
//! first installs) or plugged in from files, as operators do when the mesh must chain to
//! their own PKI: a root, or an intermediate plus the chain up to its root. Loading is
//! strict (the certificate must be a CA, the key must be its key, the chain must link
//! up to a self-signed root) because a CA that signs with the wrong key fails much later,
//! on every handshake of every workload, where it is far harder to diagnose.
//!
//! Leaves carry exactly one URI SAN (the SPIFFE identity) and an empty subject, like
//! SPIFFE X.509-SVIDs, with both serverAuth and clientAuth since every HBONE peer is both.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use crate::cert::{self, CertError};
use crate::csr::{self, CsrError, ValidCsr};
use crate::identity::{self, IdentityError};

/// Lifetime of a generated root, long enough that nobody rotates it by surprise.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a workload certificate when the caller does not ask for one.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// How far not-before is backdated, so peers whose clocks run a little behind accept
/// a certificate the moment it is issued.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Common name of a generated root.
pub const ROOT_COMMON_NAME: &str = "Ambit root CA";

/// Why a CA could not be created, loaded or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain")]
    TrustDomain(#[source] IdentityError),
    /// Generating the root key or certificate failed.
    #[error("could not generate the CA")]
    Generate(#[source] rcgen::Error),
    /// A certificate file could not be read as PEM or X.509.
    #[error("CA {what} is unreadable")]
    Certificate {
        /// Which input ("certificate", "chain").
        what: &'static str,
        /// What was wrong (boxed: X.509 errors are large, and this path is cold).
        #[source]
        source: Box<CertError>,
    },
    /// The CA certificate input holds no certificate.
    #[error("CA certificate PEM holds no certificate")]
    NoCertificate,
    /// The key is unreadable or of a type rcgen/ring cannot sign with.
    #[error("CA private key is unreadable (a PKCS#8 \"PRIVATE KEY\" PEM is required; convert with `openssl pkcs8 -topk8 -nocrypt`)")]
    Key(#[source] rcgen::Error),
    /// rcgen cannot sign with this CA certificate (unsupported name or extension).
    #[error("CA certificate {subject} cannot be used to sign")]
    Issuer {
        /// The CA certificate's subject.
        subject: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A test leaf signed at load did not chain to the CA certificate.
    #[error("CA self-test failed: a leaf signed by {subject} does not chain to it ({why})")]
    SelfTest {
        /// The CA certificate's subject.
        subject: String,
        /// What went wrong.
        why: String,
    },
    /// The key is not the one the CA certificate certifies.
    #[error("CA private key does not match the CA certificate (subject {subject})")]
    KeyMismatch {
        /// The CA certificate's subject.
        subject: String,
    },
    /// A certificate that cannot sign certificates was given as the CA or in its chain.
    #[error("certificate {subject} is not a CA ({why})")]
    NotCa {
        /// The certificate's subject.
        subject: String,
        /// Which constraint is missing.
        why: &'static str,
    },
    /// Consecutive certificates of the chain do not link (issuer name or signature).
    #[error("chain is broken: {child} is not signed by {parent} ({why})")]
    BrokenChain {
        /// Subject of the certificate that should be signed by `parent`.
        child: String,
        /// Subject of the next certificate in the chain.
        parent: String,
        /// What did not match.
        why: String,
    },
    /// The chain stops before a self-signed root, so nobody could be told what to trust.
    #[error("chain ends at {subject}, which is not a self-signed root; include the root certificate in the chain")]
    NoRoot {
        /// Subject of the last certificate.
        subject: String,
    },
    /// A certificate of the CA's chain is outside its validity period.
    #[error("CA certificate {subject} is not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        /// The certificate's subject.
        subject: String,
        /// Start of validity, RFC 3339.
        not_before: String,
        /// End of validity, RFC 3339.
        not_after: String,
    },
    /// The CSR was refused (for a [`ValidCsr`]: it names another trust domain).
    #[error("CSR refused")]
    Csr(#[source] Box<CsrError>),
    /// The validity window is empty once capped at the CA's own expiry.
    #[error("requested validity is empty: not_before {not_before} is not before not_after {not_after} (capped at the CA's expiry)")]
    EmptyValidity {
        /// Start of validity, RFC 3339.
        not_before: String,
        /// End of validity, RFC 3339.
        not_after: String,
    },
    /// A validity bound falls outside the years X.509 can express (1-9999).
    #[error("validity bound outside the years X.509 can express")]
    ValidityOutOfRange,
    /// rcgen could not produce the leaf.
    #[error("could not sign the certificate")]
    Sign(#[source] rcgen::Error),
}

/// The CA's material in PEM, for storing a generated CA and loading it again with
/// [`CertificateAuthority::from_pem`].
#[derive(Clone)]
pub struct CaPem {
    /// The CA certificate.
    pub cert_pem: String,
    /// The CA's PKCS#8 private key. Secret.
    pub key_pem: String,
    /// The certificates above the CA up to and including the root; empty for a root CA.
    pub chain_pem: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem")
            .field("cert_pem", &self.cert_pem)
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

/// Signs workload certificates for one trust domain. Cheap to share behind an `Arc`;
/// signing takes `&self`.
pub struct CertificateAuthority {
    trust_domain: Arc<str>,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Certificates above `cert`, up to and including the root (empty for a root CA).
    chain: Vec<CertificateDer<'static>>,
    /// Sent after each leaf: the CA certificate and intermediates, never the root.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    /// The earliest expiry along the chain: no leaf may outlive it.
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &cert::rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a self-signed root (ECDSA P-256, CA:true, keyCertSign) named
    /// [`ROOT_COMMON_NAME`], valid for `validity` (use [`DEFAULT_ROOT_VALIDITY`]).
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        identity::validate_trust_domain(trust_domain).map_err(CaError::TrustDomain)?;
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, ROOT_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let not_after = now
            .checked_add(validity)
            .and_then(cert::to_offset)
            .ok_or(CaError::ValidityOutOfRange)?;
        params.not_before = cert::to_offset(now - CLOCK_SKEW).ok_or(CaError::ValidityOutOfRange)?;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let der = cert.der().clone();
        let not_after = cert::parse(&der)
            .map(|c| cert::to_system_time(c.validity().not_after))
            .map_err(|source| CaError::Certificate {
                what: "certificate",
                source: Box::new(source),
            })?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.into(),
            issuer: Issuer::new(params, key),
            cert: der.clone(),
            chain: Vec::new(),
            intermediates: Vec::new(),
            root: der,
            not_after,
        })
    }

    /// Loads a CA from PEM: its certificate, its PKCS#8 key (ECDSA, Ed25519 or RSA),
    /// and, for an intermediate, the certificates above it up to and including the root.
    ///
    /// Extra certificates after the first in `cert_pem` are treated as the start of
    /// the chain, since operators often keep the whole chain in one file.
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
    ) -> Result<Self, CaError> {
        identity::validate_trust_domain(trust_domain).map_err(CaError::TrustDomain)?;
        let mut certs = cert::parse_pem_certs(cert_pem).map_err(|source| CaError::Certificate {
            what: "certificate",
            source: Box::new(source),
        })?;
        if certs.is_empty() {
            return Err(CaError::NoCertificate);
        }
        if let Some(chain_pem) = chain_pem {
            certs.extend(cert::parse_pem_certs(chain_pem).map_err(|source| {
                CaError::Certificate {
                    what: "chain",
                    source: Box::new(source),
                }
            })?);
        }
        let parsed = certs
            .iter()
            .map(cert::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CaError::Certificate {
                what: "chain",
                source: Box::new(source),
            })?;

        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let ca = &parsed[0];
        if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                subject: ca.subject().to_string(),
            });
        }

        let now = SystemTime::now();
        let mut not_after: Option<SystemTime> = None;
        for c in &parsed {
            check_is_ca(c)?;
            let (nb, na) = (
                cert::to_system_time(c.validity().not_before),
                cert::to_system_time(c.validity().not_after),
            );
            if now < nb || now > na {
                return Err(CaError::NotValidNow {
                    subject: c.subject().to_string(),
                    not_before: cert::rfc3339(nb),
                    not_after: cert::rfc3339(na),
                });
            }
            not_after = Some(not_after.map_or(na, |t| t.min(na)));
        }
        for pair in parsed.windows(2) {
            check_link(&pair[0], &pair[1])?;
        }
        let (Some(last), Some(not_after)) = (parsed.last(), not_after) else {
            return Err(CaError::NoCertificate);
        };
        if last.subject().as_raw() != last.issuer().as_raw() || last.verify_signature(None).is_err()
        {
            return Err(CaError::NoRoot {
                subject: last.subject().to_string(),
            });
        }

        let issuer =
            Issuer::from_ca_cert_der(&certs[0], key).map_err(|source| CaError::Issuer {
                subject: ca.subject().to_string(),
                source,
            })?;
        // rcgen re-encodes the issuer name from its parsed form; if that ever differs
        // from the CA's own encoding, every leaf would fail chain building at every
        // handshake. Sign a throw-away leaf now so that shows up here, at load.
        probe(&issuer, ca)?;
        let root = certs[certs.len() - 1].clone();
        let intermediates = if certs.len() > 1 {
            certs[..certs.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        let chain = certs[1..].to_vec();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.into(),
            issuer,
            cert: certs[0].clone(),
            chain,
            intermediates,
            root,
            not_after,
        })
    }

    /// The trust domain whose identities this CA signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When the CA (or anything above it) expires; leaves are capped at this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The roots workloads must trust (today one), DER.
    pub fn trust_roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }

    /// [`Self::trust_roots`] as PEM strings, as the CA service returns them.
    pub fn roots_pem(&self) -> Vec<String> {
        self.trust_roots()
            .iter()
            .map(|c| cert::to_pem(c.as_ref()))
            .collect()
    }

    /// The CA's certificate, key and chain as PEM, to store and reload with
    /// [`Self::from_pem`].
    pub fn to_pem(&self) -> CaPem {
        CaPem {
            cert_pem: cert::to_pem(self.cert.as_ref()),
            key_pem: self.issuer.key().serialize_pem(),
            chain_pem: self
                .chain
                .iter()
                .map(|c| cert::to_pem(c.as_ref()))
                .collect(),
        }
    }

    /// Validates a PEM CSR for this CA's trust domain (see [`csr::validate`]).
    pub fn validate_csr(
        &self,
        csr_pem: &str,
        expected: Option<&crate::Identity>,
    ) -> Result<ValidCsr, CsrError> {
        csr::validate(csr_pem, &self.trust_domain, expected)
    }

    /// Signs a leaf valid from a minute ago ([`CLOCK_SKEW`]) for `validity` (capped at the
    /// CA's expiry). Returns the chain to present: leaf first, then intermediates, never
    /// the root.
    pub fn sign(
        &self,
        csr: &ValidCsr,
        validity: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let now = SystemTime::now();
        // The validity may come from a peer's request: saturate rather than overflow,
        // the CA's own expiry caps it anyway.
        let not_after = now.checked_add(validity).unwrap_or(self.not_after);
        self.sign_between(csr, now - CLOCK_SKEW, not_after)
    }

    /// [`Self::sign`] with an explicit validity window, for callers that control the
    /// clock (and tests that need certificates that are expired or not yet valid).
    pub fn sign_between(
        &self,
        csr: &ValidCsr,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        // ValidCsr was checked against the trust domain its caller named; make sure it
        // was ours, so no code path can mint identities of another mesh.
        if csr.identity().trust_domain() != &*self.trust_domain {
            return Err(CaError::Csr(Box::new(CsrError::TrustDomain {
                identity: csr.identity().clone(),
                trust_domain: self.trust_domain.to_string(),
            })));
        }
        let not_after = not_after.min(self.not_after);
        if not_after <= not_before {
            return Err(CaError::EmptyValidity {
                not_before: cert::rfc3339(not_before),
                not_after: cert::rfc3339(not_after),
            });
        }
        let mut params = CertificateParams::default();
        // SPIFFE SVIDs identify by URI SAN only; rcgen marks the SAN critical when the
        // subject is empty, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(csr.identity().to_string())
            .map_err(CaError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = cert::to_offset(not_before).ok_or(CaError::ValidityOutOfRange)?;
        params.not_after = cert::to_offset(not_after).ok_or(CaError::ValidityOutOfRange)?;
        params.serial_number = Some(random_serial());
        let leaf = params
            .signed_by(csr.public_key(), &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(leaf.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(chain)
    }
}

/// Signs a throw-away leaf with `issuer` and checks it links to `ca` (name and signature).
fn probe(issuer: &Issuer<'static, KeyPair>, ca: &X509Certificate<'_>) -> Result<(), CaError> {
    let failed = |why: String| CaError::SelfTest {
        subject: ca.subject().to_string(),
        why,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| failed(format!("key generation: {e}")))?;
    let mut params = CertificateParams::default();
    params.not_before = ca.validity().not_before.to_datetime();
    params.not_after = ca.validity().not_after.to_datetime();
    let leaf = params
        .signed_by(&key, issuer)
        .map_err(|e| failed(format!("signing: {e}")))?;
    let parsed = cert::parse(leaf.der()).map_err(|e| failed(e.to_string()))?;
    check_link(&parsed, ca).map_err(|e| failed(e.to_string()))
}

fn check_is_ca(c: &X509Certificate<'_>) -> Result<(), CaError> {
    let not_ca = |why| CaError::NotCa {
        subject: c.subject().to_string(),
        why,
    };
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(Some(_)) => return Err(not_ca("basicConstraints has CA:FALSE")),
        Ok(None) => return Err(not_ca("no basicConstraints extension")),
        Err(_) => return Err(not_ca("basicConstraints is malformed")),
    }
    match c.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(not_ca("keyUsage lacks keyCertSign")),
        Ok(_) => Ok(()),
        Err(_) => Err(not_ca("keyUsage is malformed")),
    }
}

fn check_link(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> Result<(), CaError> {
    let broken = |why: String| CaError::BrokenChain {
        child: child.subject().to_string(),
        parent: parent.subject().to_string(),
        why,
    };
    if child.issuer().as_raw() != parent.subject().as_raw() {
        return Err(broken(format!("its issuer is {}", child.issuer())));
    }
    child
        .verify_signature(Some(parent.public_key()))
        .map_err(|e| broken(format!("signature: {e}")))
}

/// A random, positive, 16-byte serial: serials must be unique per issuer, and a rotated
/// certificate for the same key must not repeat its predecessor's.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let filled = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes);
    if filled.is_err() {
        // ring's SystemRandom only fails if the OS has no entropy source, in which case
        // nothing else here works either; a time-based serial is still unique enough.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    // Positive and without a leading zero byte, so DER keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::WorkloadCertificate;
    use crate::Identity;
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    const TD: &str = "cluster.local";
    const ROOT_PEM: &str = include_str!("../tests/fixtures/pki/root-ec.pem");
    const ROOT_KEY: &str = include_str!("../tests/fixtures/pki/root-ec.key");
    const INTERMEDIATE_PEM: &str = include_str!("../tests/fixtures/pki/intermediate-rsa.pem");
    const INTERMEDIATE_KEY: &str = include_str!("../tests/fixtures/pki/intermediate-rsa.key");

    fn alice() -> Identity {
        Identity::new(TD, "default", "alice").unwrap()
    }

    /// Signs a fresh CSR for alice, returning the chain and the key.
    fn issue(ca: &CertificateAuthority) -> (Vec<CertificateDer<'static>>, csr::WorkloadCsr) {
        let request = csr::new_csr(&alice()).unwrap();
        let valid = ca.validate_csr(&request.csr_pem, Some(&alice())).unwrap();
        (ca.sign(&valid, DEFAULT_CERT_VALIDITY).unwrap(), request)
    }

    /// What a peer does: verify the chain against the roots, for both usages.
    fn verify(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) {
        let anchors: Vec<_> = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
            .collect();
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            leaf.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &chain[1..],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .unwrap();
        }
    }

    fn secs(t: SystemTime) -> i64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn generated_root_signs_verifiable_spiffe_leaves() {
        let ca = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let roots = ca.trust_roots();
        let root = cert::parse(&roots[0]).unwrap();
        assert_eq!(
            root.subject().to_string(),
            "O=cluster.local, CN=Ambit root CA"
        );
        assert!(root.is_ca());
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        let root_life =
            root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert_eq!(root_life, DEFAULT_ROOT_VALIDITY.as_secs() as i64 + 60);

        let before = secs(SystemTime::now());
        let (chain, request) = issue(&ca);
        assert_eq!(chain.len(), 1, "a root CA sends the leaf alone");
        verify(&chain, &roots);

        let leaf = cert::parse(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/alice"
            )]
        );
        assert!(san.critical, "empty subject requires a critical SAN");
        assert!(leaf.subject().as_raw().len() <= 2, "subject is empty");
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let nb = leaf.validity().not_before.timestamp();
        let na = leaf.validity().not_after.timestamp();
        assert!(
            (before - 61..=before - 59).contains(&nb),
            "not_before {nb} vs now {before}"
        );
        assert!(
            (before + 86399..=before + 86402).contains(&na),
            "not_after {na} vs now {before}"
        );

        let workload =
            WorkloadCertificate::new(chain.clone(), request.private_key(), roots).unwrap();
        assert_eq!(workload.identity(), &alice());

        let (again, _) = issue(&ca);
        assert_ne!(
            cert::parse(&again[0]).unwrap().raw_serial(),
            leaf.raw_serial(),
            "serials must be unique"
        );
    }

    #[test]
    fn requested_extensions_other_than_the_san_are_ignored() {
        // A CSR asking to become a CA (or for extra usages) gets a plain leaf: the CA
        // decides every extension itself and only takes the identity from the request.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/default/sa/alice"
                .try_into()
                .unwrap(),
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();

        let ca = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let valid = ca.validate_csr(&pem, Some(&alice())).unwrap();
        let chain = ca.sign(&valid, DEFAULT_CERT_VALIDITY).unwrap();
        let leaf = cert::parse(&chain[0]).unwrap();
        assert!(!leaf.is_ca());
        assert!(!leaf.key_usage().unwrap().unwrap().value.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(!eku.code_signing && eku.server_auth && eku.client_auth);
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let ca = CertificateAuthority::generate(TD, Duration::from_secs(3600)).unwrap();
        let (chain, _) = issue(&ca);
        let leaf = cert::parse(&chain[0]).unwrap();
        assert_eq!(leaf.validity().not_after.timestamp(), secs(ca.not_after()));

        // A peer asking for an absurd lifetime gets the CA's, not a panic.
        let valid = ca
            .validate_csr(&csr::new_csr(&alice()).unwrap().csr_pem, None)
            .unwrap();
        let chain = ca.sign(&valid, Duration::MAX).unwrap();
        let leaf = cert::parse(&chain[0]).unwrap();
        assert_eq!(leaf.validity().not_after.timestamp(), secs(ca.not_after()));
        assert!(matches!(
            CertificateAuthority::generate(TD, Duration::MAX),
            Err(CaError::ValidityOutOfRange)
        ));

        let now = SystemTime::now();
        let err = ca
            .sign_between(&valid, now, now - Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, CaError::EmptyValidity { .. }), "{err:?}");
    }

    #[test]
    fn refuses_to_sign_for_another_trust_domain() {
        let ca = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let other = Identity::new("other.example", "default", "alice").unwrap();
        // Validated for the wrong trust domain by a confused caller: the CA still says no.
        let valid = csr::validate(
            &csr::new_csr(&other).unwrap().csr_pem,
            "other.example",
            None,
        )
        .unwrap();
        let err = ca.sign(&valid, DEFAULT_CERT_VALIDITY).unwrap_err();
        let CaError::Csr(inner) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            inner.to_string(),
            "CSR asks for spiffe://other.example/ns/default/sa/alice, \
             outside this CA's trust domain \"cluster.local\""
        );
    }

    #[test]
    fn generated_ca_survives_a_reload() {
        let ca = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let stored = ca.to_pem();
        assert!(stored.chain_pem.is_empty());
        assert!(!format!("{stored:?}").contains("PRIVATE KEY"));
        let reloaded =
            CertificateAuthority::from_pem(TD, &stored.cert_pem, &stored.key_pem, Some(""))
                .unwrap();
        assert_eq!(reloaded.roots_pem(), ca.roots_pem());
        let (chain, _) = issue(&reloaded);
        verify(&chain, &ca.trust_roots());
    }

    #[test]
    fn plugged_in_ecdsa_root_signs() {
        let ca = CertificateAuthority::from_pem(TD, ROOT_PEM, ROOT_KEY, None).unwrap();
        assert_eq!(ca.roots_pem(), vec![ROOT_PEM.to_string()]);
        let (chain, _) = issue(&ca);
        assert_eq!(chain.len(), 1);
        verify(&chain, &cert::parse_pem_certs(ROOT_PEM).unwrap());
        let leaf = cert::parse(&chain[0]).unwrap();
        assert_eq!(
            leaf.issuer().to_string(),
            "O=Example Corp, CN=Example Root CA"
        );
    }

    #[test]
    fn plugged_in_rsa_intermediate_signs_and_sends_itself() {
        let ca =
            CertificateAuthority::from_pem(TD, INTERMEDIATE_PEM, INTERMEDIATE_KEY, Some(ROOT_PEM))
                .unwrap();
        assert_eq!(ca.roots_pem(), vec![ROOT_PEM.to_string()]);
        let (chain, request) = issue(&ca);
        let intermediate = cert::parse_pem_certs(INTERMEDIATE_PEM).unwrap();
        assert_eq!(chain.len(), 2, "leaf, then the intermediate, not the root");
        assert_eq!(chain[1], intermediate[0]);
        verify(&chain, &ca.trust_roots());
        let leaf = cert::parse(&chain[0]).unwrap();
        assert_eq!(
            leaf.issuer().to_string(),
            "O=Example Corp, CN=Example Mesh Intermediate"
        );
        WorkloadCertificate::new(chain, request.private_key(), ca.trust_roots()).unwrap();

        // And an RSA requester works too.
        let rsa_csr = include_str!("../tests/fixtures/pki/csr-rsa2048.pem");
        let valid = ca.validate_csr(rsa_csr, None).unwrap();
        let chain = ca.sign(&valid, DEFAULT_CERT_VALIDITY).unwrap();
        verify(&chain, &ca.trust_roots());

        // Reloading keeps the chain.
        let stored = ca.to_pem();
        assert_eq!(stored.chain_pem, ROOT_PEM);
        let reloaded = CertificateAuthority::from_pem(
            TD,
            &stored.cert_pem,
            &stored.key_pem,
            Some(&stored.chain_pem),
        )
        .unwrap();
        assert_eq!(issue(&reloaded).0.len(), 2);
    }

    #[test]
    fn refuses_bad_plugged_in_material() {
        let load = |cert: &str, key: &str, chain: Option<&str>| {
            CertificateAuthority::from_pem(TD, cert, key, chain)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            load(ROOT_PEM, INTERMEDIATE_KEY, None),
            "CA private key does not match the CA certificate (subject O=Example Corp, CN=Example Root CA)"
        );
        assert_eq!(
            load(
                include_str!("../tests/fixtures/pki/not-ca.pem"),
                include_str!("../tests/fixtures/pki/not-ca.key"),
                Some(ROOT_PEM)
            ),
            "certificate CN=Not A CA is not a CA (basicConstraints has CA:FALSE)"
        );
        assert_eq!(
            load(INTERMEDIATE_PEM, INTERMEDIATE_KEY, None),
            "chain ends at O=Example Corp, CN=Example Mesh Intermediate, which is not a \
             self-signed root; include the root certificate in the chain"
        );
        let stranger = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let msg = load(
            INTERMEDIATE_PEM,
            INTERMEDIATE_KEY,
            Some(&stranger.roots_pem()[0]),
        );
        assert!(
            msg.starts_with(
                "chain is broken: O=Example Corp, CN=Example Mesh Intermediate is not signed by \
                 O=cluster.local, CN=Ambit root CA"
            ),
            "{msg}"
        );
        assert!(load("", ROOT_KEY, None).contains("holds no certificate"));
        assert!(load(ROOT_PEM, "nope", None).starts_with("CA private key is unreadable"));
        assert!(matches!(
            CertificateAuthority::generate("Bad Domain", DEFAULT_ROOT_VALIDITY),
            Err(CaError::TrustDomain(_))
        ));
    }
}
