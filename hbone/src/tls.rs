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

/// The check [`client_config`] makes of a server (chain to `bundle`, exactly `expected`),
/// for clients that present no certificate of their own: the controller connection in
/// [`crate::control`], where proxies authenticate with a bearer token instead.
pub(crate) fn server_verifier(
    bundle: &TrustBundle,
    expected: &Identity,
) -> Arc<dyn ServerCertVerifier> {
    Arc::new(SpiffeServerVerifier {
        roots: bundle.store.clone(),
        trust_domain: bundle.trust_domain.clone(),
        expected: expected.clone(),
        algorithms: provider().signature_verification_algorithms,
    })
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

pub(crate) fn provider() -> Arc<CryptoProvider> {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::testing::TestPki;

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> Identity {
        Identity::new(TD, "default", sa).unwrap()
    }

    /// What each side of one handshake over loopback saw.
    struct Outcome {
        /// The server's view: the client identity it would hand to policy, or why the
        /// handshake failed.
        server: Result<Identity, String>,
        /// The client's view: the server identity and the bytes the server sent.
        client: Result<(Identity, Vec<u8>), String>,
    }

    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
            tls.write_all(b"hello").await.unwrap();
            tls.shutdown().await.unwrap();
            Ok(peer)
        });
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = TlsConnector::from(client)
                .connect(server_name(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
            // TLS 1.3 clients finish before the server has checked their certificate:
            // a refusal shows up as an alert on the first read.
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
            Ok((peer, got))
        }
        .await;
        let server = server_task.await.unwrap();
        Outcome { server, client }
    }

    async fn connect(
        server_cert: &WorkloadCertificate,
        client_cert: &WorkloadCertificate,
        server_bundle: &TrustBundle,
        client_bundle: &TrustBundle,
        expected: &Identity,
    ) -> Outcome {
        handshake(
            server_config(server_cert, server_bundle).unwrap(),
            client_config(client_cert, client_bundle, expected).unwrap(),
        )
        .await
    }

    fn assert_server_refused(outcome: &Outcome, want: &str) {
        let err = outcome.server.as_ref().unwrap_err();
        assert!(err.contains(want), "server error {err:?} lacks {want:?}");
        let client = outcome.client.as_ref().unwrap_err();
        assert!(
            client.contains("received fatal alert"),
            "client error {client:?}"
        );
    }

    #[tokio::test]
    async fn mutual_tls_proves_both_identities() {
        let pki = TestPki::new(TD);
        let (server, client) = (pki.issue(&id("server")), pki.issue(&id("client")));
        let bundle = pki.bundle();
        let outcome = connect(&server, &client, &bundle, &bundle, &id("server")).await;
        assert_eq!(outcome.server.unwrap(), id("client"));
        assert_eq!(outcome.client.unwrap(), (id("server"), b"hello".to_vec()));
    }

    #[tokio::test]
    async fn chains_through_an_intermediate() {
        let ca = crate::ca::CertificateAuthority::from_pem(
            TD,
            include_str!("../tests/fixtures/pki/intermediate-rsa.pem"),
            include_str!("../tests/fixtures/pki/intermediate-rsa.key"),
            Some(include_str!("../tests/fixtures/pki/root-ec.pem")),
        )
        .unwrap();
        let pki = TestPki { ca };
        let (server, client) = (pki.issue(&id("server")), pki.issue(&id("client")));
        assert_eq!(server.chain().len(), 2);
        let bundle = TrustBundle::for_workload(&server).unwrap();
        let outcome = connect(&server, &client, &bundle, &bundle, &id("server")).await;
        assert_eq!(outcome.server.unwrap(), id("client"));
        assert_eq!(outcome.client.unwrap().0, id("server"));
    }

    #[tokio::test]
    async fn server_refuses_client_of_another_trust_domain() {
        let pki = TestPki::new(TD);
        let foreign = TestPki::new("other.example");
        let server = pki.issue(&id("server"));
        let client = foreign.issue_for("default", "client");
        // Both roots trusted (as during a root migration): the chain verifies, so only
        // the trust-domain check stands between this client and policy.
        let mut roots = pki.ca.trust_roots();
        roots.extend(foreign.ca.trust_roots());
        let server_bundle = TrustBundle::new(TD, roots).unwrap();
        let outcome = connect(
            &server,
            &client,
            &server_bundle,
            &pki.bundle(),
            &id("server"),
        )
        .await;
        assert_server_refused(
            &outcome,
            "peer identity spiffe://other.example/ns/default/sa/client is outside trust domain \"cluster.local\"",
        );
    }

    #[tokio::test]
    async fn server_refuses_client_of_another_root() {
        let pki = TestPki::new(TD);
        let impostor = TestPki {
            ca: crate::ca::CertificateAuthority::from_pem(
                TD,
                include_str!("../tests/fixtures/pki/root-ec.pem"),
                include_str!("../tests/fixtures/pki/root-ec.key"),
                None,
            )
            .unwrap(),
        };
        let server = pki.issue(&id("server"));
        let client = impostor.issue(&id("client"));
        let outcome = connect(
            &server,
            &client,
            &pki.bundle(),
            &pki.bundle(),
            &id("server"),
        )
        .await;
        assert_server_refused(&outcome, "invalid peer certificate: UnknownIssuer");
    }

    #[tokio::test]
    async fn server_refuses_expired_client() {
        let pki = TestPki::new(TD);
        let server = pki.issue(&id("server"));
        let hour = Duration::from_secs(3600);
        let now = SystemTime::now();
        let client = pki.issue_between(&id("client"), now - 2 * hour, now - hour);
        let outcome = connect(
            &server,
            &client,
            &pki.bundle(),
            &pki.bundle(),
            &id("server"),
        )
        .await;
        assert_server_refused(&outcome, "invalid peer certificate: certificate expired");
    }

    /// A certificate from the mesh's own CA but with only a DNS SAN, as a misconfigured
    /// (or hostile) issuer might produce.
    fn dns_only_cert(pki: &TestPki) -> RotatingCert {
        let stored = pki.ca.to_pem();
        let ca_key = rcgen::KeyPair::from_pem(&stored.key_pem).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&stored.cert_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client.default.svc".into()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let certified = CertifiedKey::from_der(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap();
        RotatingCert::from_certified_key(Arc::new(certified))
    }

    #[tokio::test]
    async fn server_refuses_client_without_spiffe_san() {
        let pki = TestPki::new(TD);
        let server = pki.issue(&id("server"));
        let client =
            client_config_rotating(&dns_only_cert(&pki), &pki.bundle(), &id("server")).unwrap();
        let outcome = handshake(server_config(&server, &pki.bundle()).unwrap(), client).await;
        assert_server_refused(
            &outcome,
            "peer certificate does not name a SPIFFE identity: certificate subjectAltName \
             DNS name \"client.default.svc\" is not allowed",
        );
    }

    #[tokio::test]
    async fn server_refuses_client_without_certificate() {
        let pki = TestPki::new(TD);
        let server = pki.issue(&id("server"));
        let mut anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: pki.bundle().store.clone(),
                trust_domain: TD.into(),
                expected: id("server"),
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
        let outcome = handshake(
            server_config(&server, &pki.bundle()).unwrap(),
            Arc::new(anonymous),
        )
        .await;
        assert_server_refused(&outcome, "peer sent no certificates");
    }

    #[tokio::test]
    async fn client_refuses_unexpected_server_identity() {
        let pki = TestPki::new(TD);
        let (server, client) = (pki.issue(&id("impostor")), pki.issue(&id("client")));
        let bundle = pki.bundle();
        let outcome = connect(&server, &client, &bundle, &bundle, &id("server")).await;
        let err = outcome.client.unwrap_err();
        assert_eq!(
            err,
            "invalid peer certificate: Other(OtherError(server identity is \
             spiffe://cluster.local/ns/default/sa/impostor, expected \
             spiffe://cluster.local/ns/default/sa/server))"
        );
        assert!(
            outcome.server.unwrap_err().contains("received fatal alert"),
            "the server is told"
        );
    }

    #[tokio::test]
    async fn client_refuses_server_of_another_root() {
        let pki = TestPki::new(TD);
        let impostor = TestPki::new(TD);
        let server = impostor.issue(&id("server"));
        let client = pki.issue(&id("client"));
        let outcome = connect(
            &server,
            &client,
            &pki.bundle(),
            &pki.bundle(),
            &id("server"),
        )
        .await;
        // Both generated roots are named "Ambit root CA": the issuer is found by name and
        // refused on its signature.
        assert_eq!(
            outcome.client.unwrap_err(),
            "invalid peer certificate: BadSignature"
        );
    }

    #[tokio::test]
    async fn tls12_is_never_negotiated() {
        let pki = TestPki::new(TD);
        let server = pki.issue(&id("server"));
        let client = pki.issue(&id("client"));
        let mut old = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: pki.bundle().store.clone(),
                trust_domain: TD.into(),
                expected: id("server"),
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_client_cert_resolver(Arc::new(RotatingCert::new(&client)));
        old.alpn_protocols = vec![ALPN_H2.to_vec()];
        let outcome = handshake(
            server_config(&server, &pki.bundle()).unwrap(),
            Arc::new(old),
        )
        .await;
        let err = outcome.server.unwrap_err();
        assert!(err.contains("peer is incompatible"), "{err}");
    }

    #[tokio::test]
    async fn rotated_certificate_applies_to_new_handshakes() {
        let pki = TestPki::new(TD);
        let first = pki.issue(&id("server"));
        let slot = RotatingCert::new(&first);
        let server = server_config_rotating(&slot, &pki.bundle()).unwrap();
        let client_cert = pki.issue(&id("client"));
        let client = client_config(&client_cert, &pki.bundle(), &id("server")).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = TlsAcceptor::from(server.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // Echo, so an old connection can prove it still works.
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let open = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            TlsConnector::from(client.clone())
                .connect(server_name(), tcp)
                .await
                .unwrap()
        };
        let leaf_of = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        };

        let mut before = open().await;
        assert_eq!(&leaf_of(&before), first.leaf());

        let second = pki.issue(&id("server"));
        assert_ne!(second.leaf(), first.leaf());
        slot.set(&second);

        let after = open().await;
        assert_eq!(
            &leaf_of(&after),
            second.leaf(),
            "new handshakes see the new cert"
        );

        before.write_all(b"still here").await.unwrap();
        let mut echo = [0u8; 10];
        before.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"still here", "old connections keep working");
    }

    #[test]
    fn bundles_refuse_empty_or_invalid_input() {
        assert!(matches!(
            TrustBundle::new(TD, vec![]),
            Err(TlsError::EmptyBundle)
        ));
        assert!(matches!(
            TrustBundle::from_pem(TD, ""),
            Err(TlsError::EmptyBundle)
        ));
        assert!(matches!(
            TrustBundle::new("Not Valid", TestPki::new(TD).ca.trust_roots()),
            Err(TlsError::TrustDomainName(_))
        ));
        let pki = TestPki::new(TD);
        let bundle = TrustBundle::from_pem(TD, &pki.ca.roots_pem().concat()).unwrap();
        assert_eq!(bundle.roots(), pki.ca.trust_roots().as_slice());
        assert_eq!(bundle.trust_domain(), TD);
    }

    #[test]
    fn peer_identity_needs_a_certificate() {
        assert!(matches!(
            peer_identity_from_certs(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        let cert = TestPki::new(TD).issue(&id("alice"));
        assert_eq!(peer_identity_from_certs(cert.chain()).unwrap(), id("alice"));
    }
}
