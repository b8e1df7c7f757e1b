//! Minting tokens and publishing their key sets, for tests and tools that stand in for an
//! identity provider. Nothing on a request's path uses it.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use serde_json::{json, Value};

use super::crypto;

/// Why a key could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The key could not be generated or read.
    #[error("key: {0}")]
    Key(String),
    /// Signing failed.
    #[error("signing")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// A signing key with the JWK that publishes its public half.
#[derive(Clone)]
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// A new ECDSA P-256 key (ES256) named `kid`.
    pub fn es256(kid: &str) -> Result<Self, MintError> {
        let rng = SystemRandom::new();
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| MintError::Key(e.to_string()))?;
        let pair = sig::EcdsaKeyPair::from_pkcs8(
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .map_err(|e| MintError::Key(e.to_string()))?;
        // Uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return Err(MintError::Key("unexpected P-256 point length".into()));
        }
        Ok(SigningKey {
            alg: Algorithm::ES256,
            kid: kid.into(),
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..]),
            }),
        })
    }

    /// An RSA key (RS256) named `kid`, from a PKCS#8 PEM.
    pub fn rs256_pem(kid: &str, pem: &str) -> Result<Self, MintError> {
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| MintError::Key(e.to_string()))?;
        let pair = sig::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| MintError::Key(e.to_string()))?;
        let sig::RsaPublicKeyComponents { n, e } =
            sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        Ok(SigningKey {
            alg: Algorithm::RS256,
            kid: kid.into(),
            key: EncodingKey::from_rsa_der(der.secret_pkcs8_der()),
            jwk: json!({
                "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                "n": b64(&n), "e": b64(&e),
            }),
        })
    }

    /// The same key under another `kid`.
    pub fn with_kid(mut self, kid: &str) -> Self {
        self.kid = kid.into();
        self.jwk["kid"] = json!(kid);
        self
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// A signed token carrying `claims`, naming this key's `kid`.
    pub fn token(&self, claims: &Value) -> Result<String, MintError> {
        crypto::install();
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(MintError::Sign)
    }
}

/// The key set (JSON) publishing `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}
