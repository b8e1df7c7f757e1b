//! A CA of its own and the server certificates it signs, for TLS servers that stand outside
//! the mesh in tests and benchmarks (a key-set server, an external HTTPS service): unlike
//! the mesh's SPIFFE certificates, these name DNS hosts.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A self-signed CA (ECDSA P-256).
pub struct WebCa {
    /// The CA certificate, PEM, as a client is given its roots.
    pub pem: String,
    /// The CA certificate, DER.
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate the CA signed and its key.
pub struct Leaf {
    /// DER.
    pub cert: Vec<u8>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
}

impl WebCa {
    pub fn new() -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(WebCa {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for DNS name `name`.
    pub fn leaf(&self, name: &str) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
        })
    }
}
