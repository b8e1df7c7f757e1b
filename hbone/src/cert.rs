//! A workload's certificate as a proxy holds it: identity, key, chain and trust roots,
//! checked once when it arrives so the rest of the proxy can rely on it.
//!
//! Construction checks what would otherwise fail later and obscurely, on a peer's
//! handshake: that the leaf carries exactly one SPIFFE URI SAN (which becomes the
//! certificate's identity) and that the private key is the leaf's key. Validity dates are
//! parsed once for rotation scheduling ([`WorkloadCertificate::refresh_at`]: half-life,
//! as ambient meshes do). The summary serialised for the admin config dump never
//! includes the key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::identity::{Identity, IdentityError};

/// Why a certificate, key or chain is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The input is not PEM of the expected kind.
    #[error("not a PEM {what}")]
    Pem {
        /// What was expected ("certificate", "private key").
        what: &'static str,
        /// The PEM decoder's complaint.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The chain is empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The DER is not an X.509 certificate.
    #[error("not an X.509 certificate")]
    Parse(#[source] X509Error),
    /// Bytes follow the certificate inside its DER, which a strict parser would refuse.
    #[error("trailing bytes after the X.509 certificate")]
    TrailingData,
    /// The leaf has no subjectAltName.
    #[error("certificate has no subjectAltName; a spiffe:// URI SAN is required")]
    NoSan,
    /// The subjectAltName extension is malformed or duplicated.
    #[error("certificate subjectAltName is malformed")]
    BadSan(#[source] X509Error),
    /// The leaf has something other than one URI in its SAN.
    #[error("certificate subjectAltName {kind} {value:?} is not allowed; exactly one spiffe:// URI is required")]
    NonUriSan {
        /// Which kind of name ("DNS name", "IP address", ...).
        kind: &'static str,
        /// The name as found.
        value: String,
    },
    /// The leaf has several URI SANs, so its identity is ambiguous.
    #[error("certificate has {count} URI SANs ({uris}); exactly one is required")]
    TooManyUris {
        /// How many.
        count: usize,
        /// The URIs, comma separated.
        uris: String,
    },
    /// The URI SAN is not an Ambit SPIFFE identity.
    #[error("certificate URI SAN {uri:?} is not an Ambit SPIFFE identity")]
    Identity {
        /// The URI found.
        uri: String,
        /// What is wrong with it.
        #[source]
        source: IdentityError,
    },
    /// The private key cannot be loaded by the TLS stack.
    #[error("private key is unusable")]
    Key(#[source] rustls::Error),
    /// The private key is not the key of the leaf certificate.
    #[error("private key does not match the certificate for {identity}")]
    KeyMismatch {
        /// The leaf's identity.
        identity: Identity,
        /// rustls' finding.
        #[source]
        source: rustls::Error,
    },
    /// No trust roots were given.
    #[error("no trust roots")]
    NoRoots,
}

/// A workload's certificate, key, chain and roots. Cheap to clone.
#[derive(Clone)]
pub struct WorkloadCertificate {
    identity: Identity,
    key: Arc<PrivateKeyDer<'static>>,
    certified: Arc<CertifiedKey>,
    roots: Arc<[CertificateDer<'static>]>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    issuer: String,
}

impl WorkloadCertificate {
    /// Checks and assembles a workload certificate: `chain` is leaf first, then
    /// intermediates; `roots` are the trust roots of the mesh.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf_der = chain.first().ok_or(CertError::EmptyChain)?;
        let leaf = parse(leaf_der)?;
        let identity = identity_of_parsed(&leaf)?;
        let not_before = to_system_time(leaf.validity().not_before);
        let not_after = to_system_time(leaf.validity().not_after);
        let serial = leaf.raw_serial_as_string();
        let issuer = leaf.issuer().to_string();
        if roots.is_empty() {
            return Err(CertError::NoRoots);
        }
        for root in &roots {
            parse(root)?;
        }

        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(CertError::Key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        // Strict: "cannot tell" is a refusal too, since a wrong key only shows up later
        // as every peer failing the handshake.
        certified
            .keys_match()
            .map_err(|source| CertError::KeyMismatch {
                identity: identity.clone(),
                source,
            })?;
        Ok(WorkloadCertificate {
            identity,
            key: Arc::new(key),
            certified: Arc::new(certified),
            roots: roots.into(),
            not_before,
            not_after,
            serial,
            issuer,
        })
    }

    /// [`Self::new`] from PEM: the chain (leaf first), the private key (PKCS#8, SEC1 or
    /// PKCS#1) and the roots.
    pub fn from_pem(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, CertError> {
        let chain = parse_pem_certs(chain_pem)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| CertError::Pem {
                what: "private key",
                source,
            })?;
        let roots = parse_pem_certs(roots_pem)?;
        Self::new(chain, key, roots)
    }

    /// The identity from the leaf's URI SAN.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The chain to present: leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// The private key. Keep it in the process: it never leaves the proxy.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The private key as PEM, for the one place it is written down: ztunnel's node
    /// directory, owner-only, so a restart can serve before the CA answers.
    pub fn private_key_pem(&self) -> String {
        match &*self.key {
            PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(k) => pem_encode("EC PRIVATE KEY", k.secret_sec1_der()),
            PrivateKeyDer::Pkcs1(k) => pem_encode("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            // `PrivateKeyDer` is non-exhaustive; a kind we cannot name is written as PKCS#8,
            // which `from_pem` then refuses: the cache is skipped, never misread.
            other => pem_encode("PRIVATE KEY", other.secret_der()),
        }
    }

    /// The trust roots delivered with this certificate.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The chain and loaded signing key, as rustls wants them.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to fetch a replacement: half-way through the leaf's life, so a controller
    /// outage of up to half a lifetime costs nothing.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    /// Whether the leaf is past its not-after at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Time left before expiry; zero once expired.
    pub fn expires_in(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// What the admin config dump shows about this certificate.
    pub fn summary(&self) -> CertificateSummary {
        CertificateSummary {
            identity: self.identity.clone(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            issuer: self.issuer.clone(),
            chain_length: self.certified.cert.len(),
        }
    }
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately absent: Debug output ends up in logs.
        std::fmt::Debug::fmt(&self.summary(), f)
    }
}

impl serde::Serialize for WorkloadCertificate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.summary().serialize(s)
    }
}

/// A certificate as shown in the admin config dump: no key material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateSummary {
    /// The leaf's SPIFFE identity.
    pub identity: Identity,
    /// The leaf's serial, hex bytes separated by ':'.
    pub serial: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// The leaf issuer's distinguished name.
    pub issuer: String,
    /// Certificates presented: leaf plus intermediates.
    pub chain_length: usize,
}

/// The identity a certificate proves: its one and only subjectAltName, a SPIFFE URI.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, CertError> {
    identity_of_parsed(&parse(cert)?)
}

fn identity_of_parsed(cert: &X509Certificate<'_>) -> Result<Identity, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(CertError::BadSan)?
        .ok_or(CertError::NoSan)?;
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push(*uri),
            GeneralName::DNSName(d) => {
                return Err(CertError::NonUriSan {
                    kind: "DNS name",
                    value: d.to_string(),
                })
            }
            GeneralName::RFC822Name(e) => {
                return Err(CertError::NonUriSan {
                    kind: "email",
                    value: e.to_string(),
                })
            }
            GeneralName::IPAddress(ip) => {
                return Err(CertError::NonUriSan {
                    kind: "IP address",
                    value: format!("{ip:02x?}"),
                })
            }
            other => {
                return Err(CertError::NonUriSan {
                    kind: "name",
                    value: other.to_string(),
                })
            }
        }
    }
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|source| CertError::Identity {
            uri: uri.to_string(),
            source,
        }),
        [] => Err(CertError::NoSan),
        _ => Err(CertError::TooManyUris {
            count: uris.len(),
            uris: uris.join(", "),
        }),
    }
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CertError> {
    let (rest, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| {
        CertError::Parse(match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    if !rest.is_empty() {
        return Err(CertError::TrailingData);
    }
    Ok(cert)
}

/// Every `CERTIFICATE` block of a PEM string, in order (other blocks are skipped).
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            what: "certificate",
            source,
        })
}

/// A DER certificate as PEM.
pub fn to_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// A chain as one PEM string (leaf first), as files and the admin API carry it.
pub fn chain_to_pem(chain: &[CertificateDer<'_>]) -> String {
    chain.iter().map(|c| to_pem(c.as_ref())).collect()
}

pub(crate) fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    to_offset(t)
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{t:?}"))
}

/// `t` to whole seconds as a calendar date, or `None` outside the years 1-9999 that
/// X.509 can express (`OffsetDateTime::from` would panic there).
pub(crate) fn to_offset(t: SystemTime) -> Option<time::OffsetDateTime> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok()?,
        Err(before) => {
            // Round towards the past, as the non-negative branch does.
            let d = before.duration();
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            -(i64::try_from(secs).ok()?)
        }
    };
    let t = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    (1..=9999).contains(&t.year()).then_some(t)
}

/// PEM-encodes one DER block with 64-column lines, as OpenSSL does.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(TABLE[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn pki_and_cert() -> (TestPki, WorkloadCertificate) {
        let pki = TestPki::new("cluster.local");
        let cert = pki.issue_for("default", "alice");
        (pki, cert)
    }

    #[test]
    fn pem_round_trip_keeps_identity_and_dates() {
        let (_pki, cert) = pki_and_cert();
        let chain_pem = chain_to_pem(cert.chain());
        let key_pem = cert.private_key_pem();
        let roots_pem = chain_to_pem(cert.roots());
        let again = WorkloadCertificate::from_pem(&chain_pem, &key_pem, &roots_pem).unwrap();
        assert_eq!(
            again.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/alice"
        );
        assert_eq!(again.not_after(), cert.not_after());
        assert_eq!(again.summary(), cert.summary());
    }

    #[test]
    fn rotation_schedule_is_half_life() {
        let pki = TestPki::new("cluster.local");
        let id = Identity::new("cluster.local", "default", "alice").unwrap();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let cert = pki.issue_between(&id, start, start + Duration::from_secs(24 * 3600));
        assert_eq!(cert.not_before(), start);
        assert_eq!(
            cert.refresh_at(),
            start + Duration::from_secs(12 * 3600),
            "refresh half-way"
        );
        assert!(!cert.is_expired(start + Duration::from_secs(24 * 3600)));
        assert!(cert.is_expired(start + Duration::from_secs(24 * 3600 + 1)));

        let (_, fresh) = pki_and_cert();
        let left = fresh.expires_in();
        assert!(
            left > Duration::from_secs(24 * 3600 - 60) && left <= Duration::from_secs(24 * 3600),
            "{left:?}"
        );
        let expired = pki.issue_between(
            &id,
            SystemTime::now() - Duration::from_secs(7200),
            SystemTime::now() - Duration::from_secs(3600),
        );
        assert_eq!(expired.expires_in(), Duration::ZERO);
        assert!(expired.is_expired(SystemTime::now()));
    }

    #[test]
    fn summary_shows_what_an_operator_needs_and_no_key() {
        let pki = TestPki::new("cluster.local");
        let id = Identity::new("cluster.local", "default", "alice").unwrap();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let cert = pki.issue_between(&id, start, start + Duration::from_secs(3600));
        let summary = cert.summary();
        assert_eq!(summary.identity, id);
        assert_eq!(summary.not_before, "2033-05-18T03:33:20Z");
        assert_eq!(summary.not_after, "2033-05-18T04:33:20Z");
        assert_eq!(summary.issuer, "O=cluster.local, CN=Ambit root CA");
        assert_eq!(summary.chain_length, 1);
        assert_eq!(summary.serial.split(':').count(), 16, "{}", summary.serial);
        let debug = format!("{cert:?}");
        assert!(debug.contains("spiffe://cluster.local/ns/default/sa/alice"));
        assert!(!debug.to_lowercase().contains("key"), "{debug}");
    }

    #[test]
    fn refuses_key_of_another_certificate() {
        let (pki, alice) = pki_and_cert();
        let bob = pki.issue_for("default", "bob");
        let err = WorkloadCertificate::new(
            alice.chain().to_vec(),
            bob.private_key(),
            alice.roots().to_vec(),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "private key does not match the certificate for spiffe://cluster.local/ns/default/sa/alice"
        );
    }

    #[test]
    fn refuses_leaves_without_exactly_one_spiffe_uri() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cases: Vec<(Vec<rcgen::SanType>, &str)> = vec![
            (
                vec![rcgen::SanType::DnsName("alice.default".try_into().unwrap())],
                "certificate subjectAltName DNS name \"alice.default\" is not allowed",
            ),
            (vec![], "certificate has no subjectAltName"),
            (
                vec![
                    rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
                    rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/c".try_into().unwrap()),
                ],
                "certificate has 2 URI SANs",
            ),
            (
                vec![rcgen::SanType::URI(
                    "https://example.com".try_into().unwrap(),
                )],
                "certificate URI SAN \"https://example.com\" is not an Ambit SPIFFE identity",
            ),
        ];
        for (sans, want) in cases {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            let der = params.self_signed(&key).unwrap().der().clone();
            let err = WorkloadCertificate::new(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                vec![der],
            )
            .unwrap_err()
            .to_string();
            assert!(err.starts_with(want), "{err:?} is not {want:?}");
        }
    }

    #[test]
    fn dates_outside_x509_are_refused_not_panicked_on() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(epoch - Duration::from_millis(1500)),
            "1969-12-31T23:59:58Z"
        );
        assert!(to_offset(epoch + Duration::from_secs(300_000_000_000)).is_none());
        assert!(to_offset(epoch - Duration::from_secs(70_000_000_000)).is_none());
    }

    #[test]
    fn refuses_empty_inputs() {
        let (_pki, cert) = pki_and_cert();
        let err = WorkloadCertificate::new(vec![], cert.private_key(), cert.roots().to_vec());
        assert!(matches!(err, Err(CertError::EmptyChain)));
        let err = WorkloadCertificate::new(cert.chain().to_vec(), cert.private_key(), vec![]);
        assert!(matches!(err, Err(CertError::NoRoots)));
        let err = WorkloadCertificate::from_pem(&chain_to_pem(cert.chain()), "junk", "");
        assert_eq!(err.unwrap_err().to_string(), "not a PEM private key");
    }
}
