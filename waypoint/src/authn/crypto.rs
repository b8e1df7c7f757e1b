//! JWT signatures with ring, through `jsonwebtoken`'s [`CryptoProvider`]: ring is already
//! the TLS provider of every Ambit binary, so checking tokens adds no second crypto stack.
//!
//! Verification covers what identity providers publish in a JWKS: RSA (RS256/384/512,
//! PS256/384/512, keys of 2048 to 8192 bits), ECDSA P-256 and P-384 (ES256, ES384) and
//! Ed25519 (EdDSA). HMAC is refused: a shared secret has no place in a published key set.
//! Signing is here for tests and tools that mint tokens (ECDSA and Ed25519 keys in PKCS#8,
//! RSA keys in PKCS#8 or PKCS#1).

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{ErrorKind, Result as JwtResult};
use jsonwebtoken::signature::{Error as SignatureError, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature as sig;

/// The provider `jsonwebtoken` uses in this process.
pub static RING: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    jwk_utils: JwkUtils::new_unimplemented(),
};

/// Makes [`RING`] the process's provider. Idempotent and cheap; called before any token is
/// decoded or signed, because `jsonwebtoken` otherwise settles on a provider that panics.
pub fn install() {
    // Already installed (by an earlier call) is the expected case.
    let _ = CryptoProvider::install_default(&RING);
}

fn family(alg: Algorithm) -> AlgorithmFamily {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => AlgorithmFamily::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => AlgorithmFamily::Ec,
        Algorithm::EdDSA => AlgorithmFamily::Ed,
        _ => AlgorithmFamily::Rsa,
    }
}

fn rsa_verify(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SignatureError> {
        let result = match (rsa_verify(self.alg), self.key.kind()) {
            (Some(params), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            (Some(params), DecodingKeyKind::SecretOrDer(der)) => {
                sig::UnparsedPublicKey::new(params, der).verify(msg, signature)
            }
            (None, DecodingKeyKind::SecretOrDer(public)) => {
                let alg: &dyn sig::VerificationAlgorithm = match self.alg {
                    Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
                    Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
                    Algorithm::EdDSA => &sig::ED25519,
                    _ => return Err(SignatureError::new()),
                };
                sig::UnparsedPublicKey::new(alg, public).verify(msg, signature)
            }
            (None, DecodingKeyKind::RsaModulusExponent { .. }) => return Err(SignatureError::new()),
        };
        result.map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> JwtResult<Box<dyn JwtVerifier>> {
    if family(*alg) == AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    if key.family() != family(*alg) {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

enum SigningKey {
    Ecdsa(sig::EcdsaKeyPair),
    Ed(sig::Ed25519KeyPair),
    Rsa(sig::RsaKeyPair, &'static dyn sig::RsaEncoding),
}

struct RingSigner {
    alg: Algorithm,
    key: SigningKey,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let rng = SystemRandom::new();
        match &self.key {
            SigningKey::Ecdsa(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignatureError::new()),
            SigningKey::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            SigningKey::Rsa(k, padding) => {
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(*padding, &rng, msg, &mut out)
                    .map_err(|_| SignatureError::new())?;
                Ok(out)
            }
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> JwtResult<Box<dyn JwtSigner>> {
    let der = key.inner();
    let rng = SystemRandom::new();
    let ecdsa = |a| {
        sig::EcdsaKeyPair::from_pkcs8(a, der, &rng)
            .map(SigningKey::Ecdsa)
            .map_err(|_| ErrorKind::InvalidEcdsaKey)
    };
    let rsa = |padding: &'static dyn sig::RsaEncoding| {
        sig::RsaKeyPair::from_pkcs8(der)
            .or_else(|_| sig::RsaKeyPair::from_der(der))
            .map(|k| SigningKey::Rsa(k, padding))
            .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))
    };
    let signing = match alg {
        Algorithm::ES256 => ecdsa(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)?,
        Algorithm::ES384 => ecdsa(&sig::ECDSA_P384_SHA384_FIXED_SIGNING)?,
        Algorithm::EdDSA => sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(SigningKey::Ed)
            .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        Algorithm::RS256 => rsa(&sig::RSA_PKCS1_SHA256)?,
        Algorithm::RS384 => rsa(&sig::RSA_PKCS1_SHA384)?,
        Algorithm::RS512 => rsa(&sig::RSA_PKCS1_SHA512)?,
        Algorithm::PS256 => rsa(&sig::RSA_PSS_SHA256)?,
        Algorithm::PS384 => rsa(&sig::RSA_PSS_SHA384)?,
        Algorithm::PS512 => rsa(&sig::RSA_PSS_SHA512)?,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return Err(ErrorKind::InvalidAlgorithm.into())
        }
    };
    Ok(Box::new(RingSigner {
        alg: *alg,
        key: signing,
    }))
}
