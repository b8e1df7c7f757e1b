//! Plugging in an operator's root: read the CA certificate and key files `ambitctl install
//! --ca-cert/--ca-key` names, and check them enough to fail at install time rather than when the
//! controller starts: both are PEM, the certificate is a CA, and the key is the certificate's key.
//! Not a full chain validation: the controller does that when it loads them.

use std::path::{Path, PathBuf};

use x509_parser::pem::Pem;

/// A root (or intermediate) CA the controller signs workload certificates with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootCa {
    /// The signing certificate, optionally followed by the rest of its chain, PEM.
    pub cert_chain_pem: String,
    /// The signing key, PKCS#8 PEM.
    pub key_pem: String,
    /// The last certificate of the chain (the trust anchor proxies verify against), PEM.
    pub trust_anchor_pem: String,
}

/// Why the CA files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM `CERTIFICATE` block.
    #[error("{path}: no PEM CERTIFICATE block found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A `CERTIFICATE` block is not a valid X.509 certificate.
    #[error("{path}: certificate {index} is not valid X.509: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Which block (0 is the first).
        index: usize,
        /// The parser's complaint.
        reason: String,
    },
    /// The first certificate may not sign others.
    #[error("{path}: the first certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable private key.
    #[error(
        "{path}: no PKCS#8 private key found ({reason}); convert with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key is not the certificate's key.
    #[error("{key} is not the private key of the first certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

impl RootCa {
    /// Reads and checks the certificate and key files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(read(cert)?, read(key)?, cert, key)
    }

    /// Checks PEM text; `cert_path` and `key_path` only name the inputs in errors.
    pub fn from_pem(
        cert_chain_pem: String,
        key_pem: String,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, PkiError> {
        let blocks: Vec<Pem> = Pem::iter_from_buffer(cert_chain_pem.as_bytes())
            .filter_map(Result::ok)
            .filter(|p| p.label == "CERTIFICATE")
            .collect();
        let Some(first) = blocks.first() else {
            return Err(PkiError::NoCertificate {
                path: cert_path.to_owned(),
            });
        };
        for (index, block) in blocks.iter().enumerate() {
            block.parse_x509().map_err(|e| PkiError::BadCertificate {
                path: cert_path.to_owned(),
                index,
                reason: e.to_string(),
            })?;
        }
        let signing = first.parse_x509().map_err(|e| PkiError::BadCertificate {
            path: cert_path.to_owned(),
            index: 0,
            reason: e.to_string(),
        })?;
        let is_ca = matches!(signing.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(PkiError::NotCa {
                path: cert_path.to_owned(),
            });
        }

        // ring (what the controller signs with) reads PKCS#8 only, so that is what we accept.
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        if key.public_key_raw() != signing.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }

        // Parsing found a block, so the text has one; the fallback only keeps this total.
        let trust_anchor_pem =
            last_certificate_block(&cert_chain_pem).unwrap_or_else(|| cert_chain_pem.clone());
        Ok(Self {
            cert_chain_pem,
            key_pem,
            trust_anchor_pem,
        })
    }
}

/// The text of the last `CERTIFICATE` block in `pem`, markers included (copied, not re-encoded,
/// so the anchor is byte-for-byte what the operator gave).
fn last_certificate_block(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.rfind(BEGIN)?;
    let end = start + pem[start..].find(END)? + END.len();
    Some(format!("{}\n", &pem[start..end]))
}
