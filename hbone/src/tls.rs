//! rustls configurations for HBONE: mutual TLS 1.3 where each side proves a SPIFFE
//! identity and checks the other's.
//!
//! Certificates carry only a URI SAN, so hostname verification does not apply. Instead:
//! - the server requires a client certificate that chains to the trust bundle (clientAuth
//!   usage) and whose only SAN is a SPIFFE identity of the bundle's trust domain; the
//!   identity is then read with [`peer_identity`] and handed to policy;
//! - the client verifies the server's chain (serverAuth usage), ignores the TLS server
//!   name (any placeholder works, see [`server_name`]), and requires the server's
//!   identity to be exactly the one expected for the destination.
//!
//! Every refusal happens during the handshake, so a peer with the wrong certificate
//! never gets to send a byte of HTTP/2. TLS 1.3 only, ALPN `h2`, ring as the provider.
//! Session resumption is off on both sides: a resumed session skips certificate
//! verification, and every server shares one placeholder server name, so a cached
//! ticket must never stand in for checking who the server is.
//!
//! Certificates are served through [`RotatingCert`], so a renewed certificate applies to
//! new handshakes without rebuilding listeners or connection pools.

use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::cert::{self, CertError, WorkloadCertificate};
use crate::identity::{self, Identity, IdentityError};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Placeholder TLS server name clients send. Servers ignore it and clients do not check
/// it against the certificate (identities are URI SANs, checked separately).
pub const SERVER_NAME: &str = "hbone";

/// Why a TLS configuration could not be built, or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain")]
    TrustDomainName(#[source] IdentityError),
    /// A trust root could not be read.
    #[error("trust bundle certificate is unreadable")]
    Root(#[source] CertError),
    /// A trust root was refused by the verifier (not a usable trust anchor).
    #[error("trust bundle certificate is not a usable root")]
    Anchor(#[source] rustls::Error),
    /// The bundle holds no root, so nobody could be verified.
    #[error("trust bundle is empty")]
    EmptyBundle,
    /// rustls refused the configuration (protocol versions, verifier).
    #[error("could not build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("could not build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The handshake has not produced a peer certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate does not carry exactly one SPIFFE identity.
    #[error("peer certificate does not name a SPIFFE identity")]
    PeerIdentity(#[source] CertError),
    /// The peer's identity belongs to another trust domain.
    #[error("peer identity {identity} is outside trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The identity the peer proved.
        identity: Identity,
        /// The trust domain we accept.
        trust_domain: String,
    },
    /// The server proved another identity than the one expected for the destination.
    #[error("server identity is {presented}, expected {expected}")]
    UnexpectedIdentity {
        /// What the client expected.
        expected: Identity,
        /// What the server's certificate says.
        presented: Identity,
    },
}

/// The roots of one trust domain: what peers' chains must lead to, and the trust
/// domain their identities must be in. Cheap to clone.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: Arc<str>,
    roots: Arc<[CertificateDer<'static>]>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// A bundle of DER roots for `trust_domain`.
    pub fn new(trust_domain: &str, roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        identity::validate_trust_domain(trust_domain).map_err(TlsError::TrustDomainName)?;
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            cert::parse(root).map_err(TlsError::Root)?;
            store.add(root.clone()).map_err(TlsError::Anchor)?;
        }
        Ok(TrustBundle {
            trust_domain: trust_domain.into(),
            roots: roots.into(),
            store: Arc::new(store),
        })
    }

    /// A bundle from PEM (one or more concatenated `CERTIFICATE` blocks).
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, TlsError> {
        Self::new(
            trust_domain,
            cert::parse_pem_certs(pem).map_err(TlsError::Root)?,
        )
    }

    /// The roots and trust domain delivered with a workload's own certificate.
    pub fn for_workload(cert: &WorkloadCertificate) -> Result<Self, TlsError> {
        Self::new(cert.identity().trust_domain(), cert.roots().to_vec())
    }

    /// The trust domain peers' identities must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// A certificate slot that handshakes read and rotation writes: cloning shares the slot,
/// and [`RotatingCert::set`] makes every config built over it present the new
/// certificate on its next handshake.
#[derive(Clone)]
pub struct RotatingCert {
    current: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl RotatingCert {
    /// A slot holding `cert`.
    pub fn new(cert: &WorkloadCertificate) -> Self {
        Self::from_certified_key(cert.certified_key())
    }

    pub(crate) fn from_certified_key(key: Arc<CertifiedKey>) -> Self {
        RotatingCert {
            current: Arc::new(RwLock::new(key)),
        }
    }

    /// Replaces the certificate for handshakes that start from now on; established
    /// connections keep the one they were made with.
    pub fn set(&self, cert: &WorkloadCertificate) {
        // A panic while holding this lock cannot leave the Arc half-written, so a
        // poisoned lock still holds a usable value.
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = cert.certified_key();
    }

    /// The certificate new handshakes present.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        let identity = current
            .end_entity_cert()
            .ok()
            .and_then(|c| cert::identity_of(c).ok());
        f.debug_struct("RotatingCert")
            .field("identity", &identity)
            .finish()
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The placeholder server name clients connect with (see [`SERVER_NAME`]).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME)
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// Server side of HBONE mTLS presenting `cert`, accepting clients of `bundle`.
pub fn server_config(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_rotating(&RotatingCert::new(cert), bundle)
}

/// [`server_config`] presenting whatever `cert` holds at each handshake.
pub fn server_config_rotating(
    cert: &RotatingCert,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        bundle.store.clone(),
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let verifier = SpiffeClientVerifier {
        inner,
        trust_domain: bundle.trust_domain.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(cert.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE mTLS presenting `cert`, accepting only a server of `bundle`
/// that proves `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_rotating(&RotatingCert::new(cert), bundle, expected)
}

/// [`client_config`] presenting whatever `cert` holds at each handshake.
pub fn client_config_rotating(
    cert: &RotatingCert,
    bundle: &TrustBundle,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: bundle.store.clone(),
        trust_domain: bundle.trust_domain.clone(),
        expected: expected.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(cert.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The identity the peer proved during the handshake (its certificate was verified by
/// the configs above), for the server to hand to policy.
pub fn peer_identity(state: &CommonState) -> Result<Identity, TlsError> {
    peer_identity_from_certs(state.peer_certificates().unwrap_or_default())
}

/// [`peer_identity`] from the peer's chain (leaf first).
pub fn peer_identity_from_certs(certs: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    cert::identity_of(leaf).map_err(TlsError::PeerIdentity)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity of a verified leaf, which must be in `trust_domain`.
fn identity_in(leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<Identity, TlsError> {
    let identity = cert::identity_of(leaf).map_err(TlsError::PeerIdentity)?;
    if identity.trust_domain() != trust_domain {
        return Err(TlsError::ForeignTrustDomain {
            identity,
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(identity)
}

/// Carries a [`TlsError`] through rustls as a certificate error, so the peer gets a
/// `bad_certificate` alert and the local handshake error says exactly why.
fn refuse(err: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(err)))))
}

/// rustls prints `CertificateError::Other` with `{:?}`; this makes that output the
/// error's readable message, causes included.
struct Refusal(TlsError);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// rustls' WebPKI client verifier (chain, validity, clientAuth usage) plus the SPIFFE
/// identity check.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: Arc<str>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_in(end_entity, &self.trust_domain).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain verification without hostname checks, plus the expected-identity check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: Arc<str>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identity_in(end_entity, &self.trust_domain).map_err(refuse)?;
        if presented != self.expected {
            return Err(refuse(TlsError::UnexpectedIdentity {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never reached (TLS 1.3 only), but correct if the protocol list ever widens.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
