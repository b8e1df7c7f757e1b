//! Where the CA's root comes from and where it is kept.
//!
//! Plugged in: operators pass `--ca-cert`/`--ca-key` (and `--ca-chain` for an intermediate)
//! and the CA signs with exactly that. Otherwise the controller generates a root once and
//! stores it in its state directory (`<state>/ca/root-cert.pem`, `root-key.pem` with mode
//! 0600), reloading it on every later start: a root that changed at each restart would
//! cut every proxy off from every other until all had renewed. Half a stored root (a
//! certificate without its key, or the reverse) is an error, never a reason to generate
//! a new one silently.
//!
//! Either way `<state>/ca/root-cert.pem` holds the mesh's trust roots, which local proxies
//! read with `--ca-root-file` to verify the controller on 15012: a generated root is its
//! own trust root, and a plugged-in CA's roots are written there at each start (without
//! a key next to them, so a later start that forgets `--ca-cert` stops with an error
//! instead of quietly replacing the operator's root).
//!
//! Kubernetes mode does not use the state directory for the root (it is an `emptyDir`
//! there): a generated root is kept in the `ambit-ca` Secret instead, see
//! [`super::kube_store`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_hbone::ca::{CaError, CertificateAuthority, DEFAULT_ROOT_VALIDITY};

use super::auth::write_secret;

/// Where a generated root's certificate is stored, under the state directory.
pub const ROOT_CERT_FILE: &str = "ca/root-cert.pem";
/// Where a generated root's key is stored (0600), under the state directory.
pub const ROOT_KEY_FILE: &str = "ca/root-key.pem";

/// Files of a plugged-in CA.
#[derive(Clone, Debug)]
pub struct CaFiles {
    /// The signing certificate (possibly followed by its chain).
    pub cert: PathBuf,
    /// Its PKCS#8 private key.
    pub key: PathBuf,
    /// The certificates above it up to the root, if not in `cert`.
    pub chain: Option<PathBuf>,
}

/// How the CA came to be, for the startup log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaOrigin {
    /// Loaded from operator-provided files.
    PluggedIn,
    /// Reloaded from the state directory.
    Reloaded,
    /// Generated now (and stored).
    Generated,
}

/// Why the CA could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The material was read but does not make a CA.
    #[error("CA from {origin} is unusable")]
    Ca {
        /// Where it came from (paths).
        origin: String,
        /// Why.
        #[source]
        source: CaError,
    },
    /// Only half of a stored root is there.
    #[error("{present} exists but {missing} does not; restore it (or pass --ca-cert/--ca-key again if the last run used a plugged-in CA), or remove both to generate a new root (every proxy must then renew)")]
    Partial {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
}

fn read(path: &Path) -> Result<String, StoreError> {
    std::fs::read_to_string(path).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the plugged-in CA when `files` is given, else reloads or generates the root kept
/// under `state_dir`; then publishes the trust roots to [`TRUST_ROOTS_FILE`].
pub fn load_or_generate(
    state_dir: &Path,
    trust_domain: &str,
    files: Option<&CaFiles>,
) -> Result<(CertificateAuthority, CaOrigin), StoreError> {
    let Some(f) = files else {
        return load_stored(state_dir, trust_domain, DEFAULT_ROOT_VALIDITY);
    };
    let ca = load_files(trust_domain, f)?;
    let roots = state_dir.join(ROOT_CERT_FILE);
    // Public, but written the same atomic way so a proxy never reads half a bundle.
    write_secret(&roots, &ca.roots_pem().concat()).map_err(|e| StoreError::Write {
        path: roots.clone(),
        source: std::io::Error::other(crate::model::error_chain(&e)),
    })?;
    Ok((ca, CaOrigin::PluggedIn))
}

fn load_files(trust_domain: &str, f: &CaFiles) -> Result<CertificateAuthority, StoreError> {
    let cert = read(&f.cert)?;
    let key = read(&f.key)?;
    let chain = f.chain.as_deref().map(read).transpose()?;
    CertificateAuthority::from_pem(trust_domain, &cert, &key, chain.as_deref()).map_err(|source| {
        StoreError::Ca {
            origin: format!("{} and {}", f.cert.display(), f.key.display()),
            source,
        }
    })
}

fn load_stored(
    state_dir: &Path,
    trust_domain: &str,
    validity: Duration,
) -> Result<(CertificateAuthority, CaOrigin), StoreError> {
    let cert_path = state_dir.join(ROOT_CERT_FILE);
    let key_path = state_dir.join(ROOT_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let files = CaFiles {
                cert: cert_path,
                key: key_path,
                chain: None,
            };
            Ok((load_files(trust_domain, &files)?, CaOrigin::Reloaded))
        }
        (true, false) => Err(StoreError::Partial {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(StoreError::Partial {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            let ca = CertificateAuthority::generate(trust_domain, validity).map_err(|source| {
                StoreError::Ca {
                    origin: "generation".to_string(),
                    source,
                }
            })?;
            let pem = ca.to_pem();
            // Key first: a certificate without its key would block the next start.
            for (path, contents) in [(&key_path, &pem.key_pem), (&cert_path, &pem.cert_pem)] {
                write_secret(path, contents).map_err(|e| StoreError::Write {
                    path: path.clone(),
                    source: std::io::Error::other(crate::model::error_chain(&e)),
                })?;
            }
            Ok((ca, CaOrigin::Generated))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const TD: &str = "cluster.local";

    #[test]
    fn a_generated_root_is_stored_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (first, origin) = load_or_generate(dir.path(), TD, None).unwrap();
        assert_eq!(origin, CaOrigin::Generated);
        let mode = std::fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, origin) = load_or_generate(dir.path(), TD, None).unwrap();
        assert_eq!(origin, CaOrigin::Reloaded);
        assert_eq!(first.roots_pem(), second.roots_pem());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap(),
            first.roots_pem().concat()
        );
    }

    #[test]
    fn half_a_stored_root_is_an_error_and_plugged_files_win() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path(), TD, None).unwrap();
        std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let e = load_or_generate(dir.path(), TD, None).unwrap_err();
        assert!(matches!(e, StoreError::Partial { .. }), "{e}");

        let other = CertificateAuthority::generate(TD, DEFAULT_ROOT_VALIDITY).unwrap();
        let pem = other.to_pem();
        let plug = tempfile::tempdir().unwrap();
        std::fs::write(plug.path().join("ca.crt"), &pem.cert_pem).unwrap();
        std::fs::write(plug.path().join("ca.key"), &pem.key_pem).unwrap();
        let files = CaFiles {
            cert: plug.path().join("ca.crt"),
            key: plug.path().join("ca.key"),
            chain: None,
        };
        let (ca, origin) = load_or_generate(dir.path(), TD, Some(&files)).unwrap();
        assert_eq!(origin, CaOrigin::PluggedIn);
        assert_eq!(ca.roots_pem(), other.roots_pem());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap(),
            other.roots_pem().concat()
        );
    }
}
