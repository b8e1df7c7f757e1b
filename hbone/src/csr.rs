//! Certificate signing requests: how a proxy asks for a workload certificate, and how the
//! CA decides whether a request deserves one.
//!
//! The proxy generates its key locally and sends only a PKCS#10 request, so private keys
//! never cross the network. The CA's side is deliberately strict: a CSR names exactly one
//! thing, a SPIFFE URI in the CA's trust domain, with a key we are willing to vouch for.
//! Anything else (DNS names, e-mail addresses, a second URI, small RSA keys, curves we
//! do not support) is refused with an error that says precisely what was wrong, because
//! the person reading it is usually debugging a misconfigured client.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::identity::{Identity, IdentityError};

/// Smallest RSA modulus we sign: below this, keys are factorable by a motivated attacker.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused, or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The input holds no PEM `CERTIFICATE REQUEST` block.
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\"")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// The DER inside the PEM is not a PKCS#10 request.
    #[error("CSR is not a valid PKCS#10 request")]
    Parse(#[source] X509Error),
    /// The request's self-signature does not verify with its own public key, so whoever
    /// sent it may not hold the private key.
    #[error("CSR signature does not verify with the CSR's own public key")]
    Signature(#[source] X509Error),
    /// The public key is of a type we do not sign.
    #[error("CSR key type {algorithm} is not accepted (use ECDSA P-256/P-384, Ed25519 or RSA >= {MIN_RSA_BITS} bits)")]
    UnsupportedKey {
        /// The key's algorithm (and curve), as an OID or a name.
        algorithm: String,
    },
    /// An RSA key below [`MIN_RSA_BITS`].
    #[error("CSR RSA key has {bits} bits; at least {MIN_RSA_BITS} are required")]
    WeakRsaKey {
        /// The modulus size.
        bits: usize,
    },
    /// The public key could not be decoded.
    #[error("CSR public key is malformed")]
    PublicKey(#[source] X509Error),
    /// The requested extensions could not be decoded.
    #[error("CSR extensions are malformed")]
    Extensions(#[source] X509Error),
    /// The request has no subjectAltName, so it names no identity.
    #[error("CSR has no subjectAltName; it must carry exactly one spiffe:// URI SAN")]
    NoSan,
    /// The subjectAltName holds something other than a URI.
    #[error("CSR subjectAltName {kind} {value:?} is not allowed; only one spiffe:// URI may be requested")]
    NonUriSan {
        /// Which kind of name ("DNS", "IP", "email", ...).
        kind: &'static str,
        /// The name as found in the request.
        value: String,
    },
    /// More than one URI SAN (or more than one SAN extension).
    #[error("CSR has {count} URI SANs ({uris}); exactly one is allowed")]
    TooManyUris {
        /// How many URIs were found.
        count: usize,
        /// The URIs, comma separated.
        uris: String,
    },
    /// The URI SAN is not an Ambit SPIFFE identity.
    #[error("CSR URI SAN {uri:?} is not an Ambit SPIFFE identity")]
    Identity {
        /// The URI as found in the request.
        uri: String,
        /// What is wrong with it.
        #[source]
        source: IdentityError,
    },
    /// The identity belongs to another trust domain than the CA's.
    #[error("CSR asks for {identity}, outside this CA's trust domain {trust_domain:?}")]
    TrustDomain {
        /// The identity requested.
        identity: Identity,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The identity differs from the one the caller was entitled to.
    #[error("CSR asks for {requested}, but the caller asked for {expected}")]
    IdentityMismatch {
        /// The identity in the CSR.
        requested: Identity,
        /// The identity the caller said it wanted (and was authorised for).
        expected: Identity,
    },
    /// Generating a key or encoding a CSR failed (local crypto failure).
    #[error("could not generate a key or CSR")]
    Generate(#[source] rcgen::Error),
}

/// A key type the CA accepts, as found in a validated CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with a modulus of this many bits.
    Rsa(usize),
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyType::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyType::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyType::Ed25519 => f.write_str("Ed25519"),
            KeyType::Rsa(bits) => write!(f, "RSA {bits}"),
        }
    }
}

/// A CSR that passed every check: the identity it names and the public key to certify.
///
/// Only [`validate`] makes one, so holding a `ValidCsr` means the checks were done.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    identity: Identity,
    key_type: KeyType,
    public_key: CsrPublicKey,
}

impl ValidCsr {
    /// The identity the certificate will carry.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The requester's key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub(crate) fn public_key(&self) -> &CsrPublicKey {
        &self.public_key
    }
}

/// The requester's public key, in the form rcgen needs to certify it.
#[derive(Debug, Clone)]
pub(crate) struct CsrPublicKey {
    /// The whole SubjectPublicKeyInfo, so key identifiers match what the requester computes.
    spki: Vec<u8>,
    /// The BIT STRING contents of the SubjectPublicKeyInfo.
    key: Vec<u8>,
    /// Only used by rcgen to write the SPKI's algorithm identifier, which for the
    /// algorithms below is the key's type (rsaEncryption, ecPublicKey+curve, Ed25519).
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki.clone()
    }

    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// Checks a PEM CSR for the CA of `trust_domain`.
///
/// When `expected` is given (the identity the authenticated caller asked for and may
/// obtain), the CSR must name exactly that identity.
pub fn validate(
    csr_pem: &str,
    trust_domain: &str,
    expected: Option<&Identity>,
) -> Result<ValidCsr, CsrError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(CsrError::Pem)?;
    validate_der(&der, trust_domain, expected)
}

/// [`validate`] for a DER-encoded CSR.
pub fn validate_der(
    der: &CertificateSigningRequestDer<'_>,
    trust_domain: &str,
    expected: Option<&Identity>,
) -> Result<ValidCsr, CsrError> {
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| {
        CsrError::Parse(match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    let info = &csr.certification_request_info;

    // Key first: ring refuses to verify signatures of small RSA keys, and "your key is
    // too small" is a far better error than "bad signature".
    let (key_type, public_key) = accepted_key(&info.subject_pki)?;
    csr.verify_signature().map_err(CsrError::Signature)?;

    let identity = requested_identity(&csr)?;
    if identity.trust_domain() != trust_domain {
        return Err(CsrError::TrustDomain {
            identity,
            trust_domain: trust_domain.to_string(),
        });
    }
    if let Some(expected) = expected {
        if *expected != identity {
            return Err(CsrError::IdentityMismatch {
                requested: identity,
                expected: expected.clone(),
            });
        }
    }
    Ok(ValidCsr {
        identity,
        key_type,
        public_key,
    })
}

fn accepted_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(KeyType, CsrPublicKey), CsrError> {
    let alg = &spki.algorithm.algorithm;
    let (key_type, rcgen_alg) = if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => (KeyType::EcdsaP256, &rcgen::PKCS_ECDSA_P256_SHA256),
            Some(c) if c == OID_NIST_EC_P384 => {
                (KeyType::EcdsaP384, &rcgen::PKCS_ECDSA_P384_SHA384)
            }
            Some(c) => {
                return Err(CsrError::UnsupportedKey {
                    algorithm: format!("ECDSA on curve {}", c.to_id_string()),
                })
            }
            None => {
                return Err(CsrError::UnsupportedKey {
                    algorithm: "ECDSA without a named curve".to_string(),
                })
            }
        }
    } else if *alg == OID_SIG_ED25519 {
        (KeyType::Ed25519, &rcgen::PKCS_ED25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed().map_err(CsrError::PublicKey)? {
            x509_parser::public_key::PublicKey::RSA(rsa) => modulus_bits(rsa.modulus),
            _ => 0,
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsaKey { bits });
        }
        (KeyType::Rsa(bits), &rcgen::PKCS_RSA_SHA256)
    } else {
        return Err(CsrError::UnsupportedKey {
            algorithm: alg.to_id_string(),
        });
    };
    Ok((
        key_type,
        CsrPublicKey {
            spki: spki.raw.to_vec(),
            key: spki.subject_public_key.data.to_vec(),
            alg: rcgen_alg,
        },
    ))
}

/// Size of an RSA modulus in bits, ignoring DER's leading zero bytes.
fn modulus_bits(modulus: &[u8]) -> usize {
    let trimmed = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    trimmed.len() * 8 - trimmed[0].leading_zeros() as usize
}

fn requested_identity(csr: &X509CertificationRequest<'_>) -> Result<Identity, CsrError> {
    let mut uris = Vec::new();
    // x509-parser drops the extension request silently when it is malformed, so check
    // for parse errors explicitly rather than mistaking them for "no SAN".
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        other => {
                            let (kind, value) = describe_name(other);
                            return Err(CsrError::NonUriSan { kind, value });
                        }
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Extensions(match error {
                    x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => {
                        X509Error::Der(e.clone())
                    }
                    x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidExtensions,
                }))
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [] => Err(CsrError::NoSan),
        [uri] => uri.parse().map_err(|source| CsrError::Identity {
            uri: uri.clone(),
            source,
        }),
        _ => Err(CsrError::TooManyUris {
            count: uris.len(),
            uris: uris.join(", "),
        }),
    }
}

fn describe_name(name: &GeneralName<'_>) -> (&'static str, String) {
    match name {
        GeneralName::DNSName(d) => ("DNS name", d.to_string()),
        GeneralName::RFC822Name(e) => ("email", e.to_string()),
        GeneralName::IPAddress(ip) => ("IP address", format!("{ip:02x?}")),
        GeneralName::URI(u) => ("URI", u.to_string()),
        other => ("name", other.to_string()),
    }
}

/// A freshly generated workload key and the CSR for it.
///
/// The key stays with the proxy; only [`WorkloadCsr::csr_pem`] is sent to the CA.
pub struct WorkloadCsr {
    /// The PKCS#10 request, PEM encoded, to send to the CA.
    pub csr_pem: String,
    key: PrivatePkcs8KeyDer<'static>,
}

impl WorkloadCsr {
    /// The private key (PKCS#8 DER), to pair with the certificate the CA returns.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The private key as PEM (`PRIVATE KEY`).
    pub fn private_key_pem(&self) -> String {
        crate::cert::pem_encode("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
}

impl std::fmt::Debug for WorkloadCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key, even in debug logs.
        f.debug_struct("WorkloadCsr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR whose only SAN is `identity`'s URI.
///
/// The subject is left empty, as SPIFFE X.509-SVIDs do: the URI SAN is the identity.
pub fn new_csr(identity: &Identity) -> Result<WorkloadCsr, CsrError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CsrError::Generate)?;
    let csr_pem = csr_for(identity, &key)?;
    Ok(WorkloadCsr {
        csr_pem,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

/// A CSR naming `identity` with an existing key (also used by tests to make odd CSRs).
pub(crate) fn csr_for(identity: &Identity, key: &KeyPair) -> Result<String, CsrError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri =
        rcgen::string::Ia5String::try_from(identity.to_string()).map_err(CsrError::Generate)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(CsrError::Generate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> Identity {
        Identity::new(TD, "default", sa).unwrap()
    }

    /// A CSR with arbitrary SANs, to exercise what `new_csr` would never produce.
    fn csr_with(sans: Vec<SanType>, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn refusal(pem: &str, expected: Option<&Identity>) -> (CsrError, String) {
        let err = validate(pem, TD, expected).unwrap_err();
        let msg = err.to_string();
        (err, msg)
    }

    #[test]
    fn new_csr_validates_and_names_only_the_identity() {
        let alice = id("alice");
        let request = new_csr(&alice).unwrap();
        let valid = validate(&request.csr_pem, TD, Some(&alice)).unwrap();
        assert_eq!(valid.identity(), &alice);
        assert_eq!(valid.key_type(), KeyType::EcdsaP256);
        // The key is PKCS#8 and is the CSR's key.
        let key = KeyPair::from_pem(&request.private_key_pem()).unwrap();
        assert_eq!(valid.public_key().der_bytes(), key.public_key_raw());
        assert!(request
            .private_key_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!format!("{request:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn accepts_other_key_types() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let valid = validate(&csr_for(&id("ed"), &ed).unwrap(), TD, None).unwrap();
        assert_eq!(valid.key_type(), KeyType::Ed25519);

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let valid = validate(&csr_for(&id("p"), &p384).unwrap(), TD, None).unwrap();
        assert_eq!(valid.key_type(), KeyType::EcdsaP384);

        let rsa = include_str!("../tests/fixtures/pki/csr-rsa2048.pem");
        let valid = validate(rsa, TD, Some(&id("rsa"))).unwrap();
        assert_eq!(valid.key_type(), KeyType::Rsa(2048));
    }

    #[test]
    fn refuses_other_identity_than_asked() {
        let request = new_csr(&id("alice")).unwrap();
        let (err, msg) = refusal(&request.csr_pem, Some(&id("bob")));
        assert!(matches!(err, CsrError::IdentityMismatch { .. }), "{err:?}");
        assert_eq!(
            msg,
            "CSR asks for spiffe://cluster.local/ns/default/sa/alice, \
             but the caller asked for spiffe://cluster.local/ns/default/sa/bob"
        );
    }

    #[test]
    fn refuses_extra_or_missing_sans() {
        let key = KeyPair::generate().unwrap();
        let alice = "spiffe://cluster.local/ns/default/sa/alice";
        let cases: Vec<(Vec<SanType>, &str)> = vec![
            (vec![], "CSR has no subjectAltName"),
            (
                vec![
                    uri(alice),
                    SanType::DnsName("alice.default".try_into().unwrap()),
                ],
                "CSR subjectAltName DNS name \"alice.default\" is not allowed",
            ),
            (
                vec![SanType::IpAddress([10, 0, 0, 1].into()), uri(alice)],
                "CSR subjectAltName IP address",
            ),
            (
                vec![
                    uri(alice),
                    SanType::Rfc822Name("a@example.com".try_into().unwrap()),
                ],
                "CSR subjectAltName email \"a@example.com\" is not allowed",
            ),
            (
                vec![uri(alice), uri("spiffe://cluster.local/ns/default/sa/bob")],
                "CSR has 2 URI SANs (spiffe://cluster.local/ns/default/sa/alice, \
                 spiffe://cluster.local/ns/default/sa/bob); exactly one is allowed",
            ),
            (
                vec![uri("https://alice.example.com/")],
                "CSR URI SAN \"https://alice.example.com/\" is not an Ambit SPIFFE identity",
            ),
            (
                vec![uri("spiffe://cluster.local/alice")],
                "CSR URI SAN \"spiffe://cluster.local/alice\" is not an Ambit SPIFFE identity",
            ),
        ];
        for (sans, want) in cases {
            let desc = format!("{sans:?}");
            let (_, msg) = refusal(&csr_with(sans, &key), None);
            assert!(msg.contains(want), "{desc}: {msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn refuses_other_trust_domain() {
        let other = Identity::new("other.example", "default", "alice").unwrap();
        let request = new_csr(&other).unwrap();
        let (err, msg) = refusal(&request.csr_pem, None);
        assert!(matches!(err, CsrError::TrustDomain { .. }), "{err:?}");
        assert_eq!(
            msg,
            "CSR asks for spiffe://other.example/ns/default/sa/alice, \
             outside this CA's trust domain \"cluster.local\""
        );
    }

    #[test]
    fn refuses_weak_and_unsupported_keys() {
        let (err, msg) = refusal(include_str!("../tests/fixtures/pki/csr-rsa1024.pem"), None);
        assert!(
            matches!(err, CsrError::WeakRsaKey { bits: 1024 }),
            "{err:?}"
        );
        assert_eq!(msg, "CSR RSA key has 1024 bits; at least 2048 are required");

        let (err, msg) = refusal(include_str!("../tests/fixtures/pki/csr-p521.pem"), None);
        assert!(matches!(err, CsrError::UnsupportedKey { .. }), "{err:?}");
        assert!(
            msg.starts_with("CSR key type ECDSA on curve 1.3.132.0.35 is not accepted"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_tampered_signature() {
        let request = new_csr(&id("alice")).unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(request.csr_pem.as_bytes()).unwrap();
        // Swap the identity for another of the same length: still well-formed, and
        // exactly what an attacker replaying someone else's CSR would try.
        let mut bytes = der.as_ref().to_vec();
        let at = bytes
            .windows(5)
            .position(|w| w == b"alice")
            .expect("URI in CSR");
        bytes[at..at + 5].copy_from_slice(b"mallo");
        let tampered = crate::cert::pem_encode("CERTIFICATE REQUEST", &bytes);
        let (err, msg) = refusal(&tampered, None);
        assert!(matches!(err, CsrError::Signature(_)), "{err:?}");
        assert_eq!(
            msg,
            "CSR signature does not verify with the CSR's own public key"
        );
    }

    #[test]
    fn refuses_garbage() {
        let (err, _) = refusal("hello", None);
        assert!(matches!(err, CsrError::Pem(_)), "{err:?}");
        let junk = crate::cert::pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
        let (err, msg) = refusal(&junk, None);
        assert!(matches!(err, CsrError::Parse(_)), "{err:?}");
        assert_eq!(msg, "CSR is not a valid PKCS#10 request");
    }

    #[test]
    fn modulus_bits_ignores_leading_zeroes() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        assert_eq!(modulus_bits(&[0x00]), 0);
    }
}
