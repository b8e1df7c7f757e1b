//! The node directory (`--data-dir`): what ztunnel keeps on its node so that a restart does not
//! depend on the controller being reachable.
//!
//! Layout, all owned by ztunnel's user and nobody else (directories 0700, files 0600):
//!
//! ```text
//! <data-dir>/state.pb           the last discovery state ztunnel ACKed, as one full-state push
//! <data-dir>/certs/<name>.json  one workload certificate per local identity: chain, key, roots
//! ```
//!
//! Every file carries a format version and the node it was written for. A file of another
//! version or node is ignored with a log line that says so, never read as if it were ours; a
//! corrupt file is an error naming its path, and the caller falls back to waiting for the
//! controller. Writes are atomic: a temporary file in the same directory, `fsync`, `rename`,
//! then `fsync` of the directory, so a crash leaves the old file or the new one, never half.
//!
//! [`LastAcked`] rebuilds the full state from the pushes as they are ACKed (full or
//! incremental), so the file always holds a complete state the store can apply on its own.
//!
//! Not for: deciding when the cache is trusted (the app and certificate manager do that), or
//! the CNI and hand-over sockets, which will live beside these files.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ambit_hbone::cert::{chain_to_pem, WorkloadCertificate};
use ambit_hbone::Identity;
use ambit_proto::discovery as pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// Default `--data-dir` (a hostPath on Kubernetes).
pub const DEFAULT_DIR: &str = "/var/lib/ambit/ztunnel";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// First bytes of the state file, so anything else is recognised as not ours.
const STATE_MAGIC: &[u8] = b"AMBIT-ZTUNNEL-STATE\n";
const STATE_FILE: &str = "state.pb";
const CERTS_DIR: &str = "certs";
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// What went wrong with the node directory. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum NodeDirError {
    /// A directory could not be created or restricted to its owner.
    #[error("cannot create the node directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written (or renamed into place, or synced).
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not in any format this or another version writes (truncated, garbage).
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A file of a format version this build does not know (written by a newer ztunnel).
    #[error("{path} has format version {found}; this ztunnel reads version {FORMAT_VERSION}")]
    UnknownVersion { path: PathBuf, found: u32 },
    /// A file written for another node (a data directory moved or shared by mistake).
    #[error("{path} was written for node {found:?}, not {expected:?}")]
    OtherNode {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// A certificate file for another identity than its name says.
    #[error("{path} holds a certificate for {found}, not {expected}")]
    OtherIdentity {
        path: PathBuf,
        found: String,
        expected: Identity,
    },
    /// A cached certificate that is no longer valid; it is never used.
    #[error("the certificate in {path} expired at {not_after:?}")]
    Expired {
        path: PathBuf,
        not_after: SystemTime,
    },
}

/// The node directory of one ztunnel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeDir {
    root: Arc<Path>,
    node: Arc<str>,
}

/// The state file: the envelope around the last ACKed state.
#[derive(Clone, PartialEq, prost::Message)]
struct StateFile {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(string, tag = "2")]
    node: String,
    /// When it was written (Unix milliseconds), for the log line that uses it.
    #[prost(uint64, tag = "3")]
    saved_unix_ms: u64,
    #[prost(message, optional, tag = "4")]
    push: Option<pb::Push>,
}

/// Only the version, read first so a newer layout is never decoded as ours.
#[derive(Clone, PartialEq, prost::Message)]
struct FormatOnly {
    #[prost(uint32, tag = "1")]
    format: u32,
}

/// A certificate file (JSON, so an operator can read what is there; keys stay 0600).
#[derive(Serialize, Deserialize)]
struct CertFile {
    format: u32,
    node: String,
    identity: String,
    /// Leaf first, then intermediates.
    chain_pem: String,
    /// PKCS#8 (or SEC1/PKCS#1) private key.
    key_pem: String,
    roots_pem: String,
}

#[derive(Deserialize)]
struct CertFormatOnly {
    format: u32,
}

impl NodeDir {
    /// Opens (creating if needed) the node directory at `root` for `node`, and restricts it and
    /// its `certs/` subdirectory to their owner.
    pub fn open(root: &Path, node: &str) -> Result<Self, NodeDirError> {
        for dir in [root.to_path_buf(), root.join(CERTS_DIR)] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&dir)
                .and_then(|()| {
                    // An existing directory keeps its mode on create: tighten it.
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(DIR_MODE))
                })
                .map_err(|source| NodeDirError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(NodeDir {
            root: Arc::from(root),
            node: Arc::from(node),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.root.join(STATE_FILE)
    }

    /// Where `identity`'s certificate is kept: a readable name made of the identity's URI
    /// without the scheme, `/` as `_` (neither can appear in a valid identity's names), any
    /// other character escaped.
    pub fn cert_path(&self, identity: &Identity) -> PathBuf {
        let raw = identity.to_string();
        let raw = raw.strip_prefix("spiffe://").unwrap_or(&raw);
        let mut name = String::with_capacity(raw.len() + 5);
        for c in raw.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' => name.push(c),
                '/' => name.push('_'),
                other => name.push_str(&format!("%{:x}", u32::from(other))),
            }
        }
        name.push_str(".json");
        self.root.join(CERTS_DIR).join(name)
    }

    /// Writes `push` (a full state) as the last acknowledged state.
    pub fn save_state(&self, push: &pb::Push) -> Result<(), NodeDirError> {
        let file = StateFile {
            format: FORMAT_VERSION,
            node: self.node.to_string(),
            saved_unix_ms: unix_ms(SystemTime::now()),
            push: Some(push.clone()),
        };
        let mut bytes = Vec::with_capacity(STATE_MAGIC.len() + file.encoded_len());
        bytes.extend_from_slice(STATE_MAGIC);
        // Encoding into a Vec only fails when the buffer cannot grow, which a Vec can.
        file.encode(&mut bytes).map_err(|e| NodeDirError::Write {
            path: self.state_path(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.state_path(), &bytes)
    }

    /// The last acknowledged state (as a full-state push) and when it was saved; `None` when
    /// there is none.
    pub fn load_state(&self) -> Result<Option<(pb::Push, SystemTime)>, NodeDirError> {
        let path = self.state_path();
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| NodeDirError::Corrupt {
            path: path.clone(),
            reason,
        };
        let body = bytes
            .strip_prefix(STATE_MAGIC)
            .ok_or_else(|| corrupt("it does not start with the state file's header".into()))?;
        let format = FormatOnly::decode(body)
            .map_err(|e| corrupt(format!("undecodable: {e}")))?
            .format;
        if format != FORMAT_VERSION {
            return Err(NodeDirError::UnknownVersion {
                path,
                found: format,
            });
        }
        let file = StateFile::decode(body).map_err(|e| corrupt(format!("undecodable: {e}")))?;
        if *file.node != *self.node {
            return Err(NodeDirError::OtherNode {
                path,
                found: file.node,
                expected: self.node.to_string(),
            });
        }
        let mut push = file
            .push
            .ok_or_else(|| corrupt("it holds no state".into()))?;
        // Whatever was written, what is loaded replaces the store's state whole.
        push.full_state = true;
        let saved = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(file.saved_unix_ms);
        Ok(Some((push, saved)))
    }

    /// Writes `cert` (chain, private key, roots), readable by the owner only.
    pub fn save_cert(&self, cert: &WorkloadCertificate) -> Result<(), NodeDirError> {
        let path = self.cert_path(cert.identity());
        let file = CertFile {
            format: FORMAT_VERSION,
            node: self.node.to_string(),
            identity: cert.identity().to_string(),
            chain_pem: chain_to_pem(cert.chain()),
            key_pem: cert.private_key_pem(),
            roots_pem: chain_to_pem(cert.roots()),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| NodeDirError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &json)
    }

    /// `identity`'s certificate if one is kept and still valid at `now`; `None` when there is
    /// no file. An expired one is [`NodeDirError::Expired`]: never used.
    pub fn load_cert(
        &self,
        identity: &Identity,
        now: SystemTime,
    ) -> Result<Option<WorkloadCertificate>, NodeDirError> {
        let path = self.cert_path(identity);
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| NodeDirError::Corrupt {
            path: path.clone(),
            reason,
        };
        let format = serde_json::from_slice::<CertFormatOnly>(&bytes)
            .map_err(|e| corrupt(e.to_string()))?
            .format;
        if format != FORMAT_VERSION {
            return Err(NodeDirError::UnknownVersion {
                path,
                found: format,
            });
        }
        let file: CertFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if *file.node != *self.node {
            return Err(NodeDirError::OtherNode {
                path,
                found: file.node,
                expected: self.node.to_string(),
            });
        }
        let cert = WorkloadCertificate::from_pem(&file.chain_pem, &file.key_pem, &file.roots_pem)
            .map_err(|e| corrupt(crate::telemetry::error_chain(&e)))?;
        if cert.identity() != identity || file.identity != identity.to_string() {
            return Err(NodeDirError::OtherIdentity {
                path,
                found: cert.identity().to_string(),
                expected: identity.clone(),
            });
        }
        if cert.is_expired(now) {
            return Err(NodeDirError::Expired {
                path,
                not_after: cert.not_after(),
            });
        }
        Ok(Some(cert))
    }

    /// Forgets `identity`'s certificate (its last local workload left). Absent is fine.
    pub fn remove_cert(&self, identity: &Identity) -> Result<(), NodeDirError> {
        let path = self.cert_path(identity);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NodeDirError::Write { path, source }),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, NodeDirError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NodeDirError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Owner-only, whole or not at all ([`ambit_runtime::fs::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NodeDirError> {
    ambit_runtime::fs::write_atomic(path, bytes, FILE_MODE).map_err(|source| NodeDirError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The full state as ACKed so far, rebuilt from full and incremental pushes, ready to be
/// written as one full-state push.
#[derive(Debug, Default, Clone)]
pub struct LastAcked {
    version: u64,
    trust_roots: Vec<String>,
    /// By (kind, key), keys as the controller names removals.
    resources: BTreeMap<(i32, String), pb::Resource>,
}

/// The (kind, key) a removal would name `r` by.
fn resource_key(r: &pb::Resource) -> Option<(i32, String)> {
    use pb::resource::Kind;
    let ns = |namespace: &str, name: &str| format!("{namespace}/{name}");
    Some(match r.kind.as_ref()? {
        Kind::Workload(w) => (pb::ResourceKind::Workload as i32, w.uid.clone()),
        Kind::Service(s) => (
            pb::ResourceKind::Service as i32,
            ns(&s.namespace, &s.hostname),
        ),
        Kind::Authorization(a) => (
            pb::ResourceKind::Authorization as i32,
            ns(&a.namespace, &a.name),
        ),
        Kind::Route(x) => (pb::ResourceKind::Route as i32, ns(&x.namespace, &x.name)),
        Kind::TrafficPolicy(x) => (
            pb::ResourceKind::TrafficPolicy as i32,
            ns(&x.namespace, &x.name),
        ),
        Kind::PeerAuthentication(x) => (
            pb::ResourceKind::PeerAuthentication as i32,
            ns(&x.namespace, &x.name),
        ),
        Kind::RequestAuthentication(x) => (
            pb::ResourceKind::RequestAuthentication as i32,
            ns(&x.namespace, &x.name),
        ),
        Kind::ExternalService(x) => (
            pb::ResourceKind::ExternalService as i32,
            ns(&x.namespace, &x.name),
        ),
    })
}

impl LastAcked {
    /// Folds in a push the store accepted (and ztunnel ACKed).
    pub fn apply(&mut self, push: &pb::Push) {
        if push.full_state {
            self.resources.clear();
        }
        for r in &push.upserts {
            if let Some(key) = resource_key(r) {
                self.resources.insert(key, r.clone());
            }
        }
        for k in &push.removals {
            self.resources.remove(&(k.kind, k.name.clone()));
        }
        // The store replaces its roots whenever a push carries any.
        if push.full_state || !push.trust_roots.is_empty() {
            self.trust_roots = push.trust_roots.clone();
        }
        self.version = push.version;
    }

    /// Everything, as one full-state push.
    pub fn to_push(&self) -> pb::Push {
        pb::Push {
            nonce: String::new(),
            full_state: true,
            version: self.version,
            upserts: self.resources.values().cloned().collect(),
            removals: Vec::new(),
            trust_roots: self.trust_roots.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambit-node-dir-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn workload(uid: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "shop".into(),
                ..Default::default()
            })),
        }
    }

    fn push(full: bool, version: u64, upserts: &[&str], removals: &[&str]) -> pb::Push {
        pb::Push {
            nonce: format!("n{version}"),
            full_state: full,
            version,
            upserts: upserts.iter().map(|u| workload(u)).collect(),
            removals: removals
                .iter()
                .map(|u| pb::ResourceKey {
                    kind: pb::ResourceKind::Workload as i32,
                    name: (*u).into(),
                })
                .collect(),
            trust_roots: vec!["ROOT".into()],
        }
    }

    fn uids(p: &pb::Push) -> Vec<String> {
        p.upserts
            .iter()
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => Some(w.uid.clone()),
                _ => None,
            })
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn cert(identity: &Identity, validity: Duration, backdate: Duration) -> WorkloadCertificate {
        let ca = ambit_hbone::ca::CertificateAuthority::generate(
            "cluster.local",
            Duration::from_secs(86400),
        )
        .unwrap();
        let req = ambit_hbone::csr::new_csr(identity).unwrap();
        let csr = ca.validate_csr(&req.csr_pem, None).unwrap();
        let now = SystemTime::now();
        let chain = ca
            .sign_between(&csr, now - backdate, now - backdate + validity)
            .unwrap();
        WorkloadCertificate::new(chain, req.private_key(), ca.trust_roots()).unwrap()
    }

    #[test]
    fn last_acked_folds_full_and_incremental_pushes() {
        let mut acked = LastAcked::default();
        acked.apply(&push(true, 1, &["a", "b"], &[]));
        acked.apply(&push(false, 2, &["c"], &["a"]));
        let p = acked.to_push();
        assert!(p.full_state);
        assert_eq!((p.version, uids(&p)), (2, vec!["b".into(), "c".into()]));
        // A full state replaces everything.
        acked.apply(&push(true, 3, &["z"], &[]));
        assert_eq!(uids(&acked.to_push()), vec!["z".to_string()]);
    }

    #[test]
    fn state_round_trips_with_owner_only_permissions() {
        let root = tempdir("state");
        let dir = NodeDir::open(&root, "n1").unwrap();
        assert_eq!(dir.load_state().unwrap(), None);
        let mut acked = LastAcked::default();
        acked.apply(&push(true, 7, &["a"], &[]));
        dir.save_state(&acked.to_push()).unwrap();
        let (loaded, saved) = dir.load_state().unwrap().unwrap();
        assert_eq!(loaded, acked.to_push());
        assert!(saved <= SystemTime::now());
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("certs")), 0o700);
        assert_eq!(mode(&dir.state_path()), 0o600);
        // Another node's ztunnel never reads it as its own.
        let other = NodeDir::open(&root, "n2").unwrap();
        assert!(matches!(
            other.load_state(),
            Err(NodeDirError::OtherNode { .. })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writes_are_atomic_and_leave_no_temp_files() {
        let root = tempdir("atomic");
        let dir = NodeDir::open(&root, "n1").unwrap();
        dir.save_state(&push(true, 1, &["a"], &[])).unwrap();
        // A crash mid-write leaves a temp file beside the real one: the real one still reads
        // whole, and the next write replaces the leftover (keeping it owner-only).
        let leftover = root.join(format!("state.pb.tmp.{}", std::process::id()));
        std::fs::write(&leftover, b"half a wri").unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(uids(&dir.load_state().unwrap().unwrap().0), vec!["a"]);
        dir.save_state(&push(true, 2, &["b"], &[])).unwrap();
        assert_eq!(uids(&dir.load_state().unwrap().unwrap().0), vec!["b"]);
        assert!(!leftover.exists());
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.contains("tmp")).count(),
            0,
            "{names:?}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_unknown_version_is_refused_not_misread() {
        let root = tempdir("version");
        let dir = NodeDir::open(&root, "n1").unwrap();
        let future = StateFile {
            format: FORMAT_VERSION + 1,
            node: "n1".into(),
            saved_unix_ms: 0,
            push: Some(push(true, 1, &["a"], &[])),
        };
        let mut bytes = STATE_MAGIC.to_vec();
        bytes.extend(future.encode_to_vec());
        std::fs::write(dir.state_path(), bytes).unwrap();
        let err = dir.load_state().unwrap_err();
        assert!(
            matches!(err, NodeDirError::UnknownVersion { found: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("state.pb"), "{err}");

        let id = Identity::new("cluster.local", "shop", "client").unwrap();
        let path = dir.cert_path(&id);
        std::fs::write(&path, br#"{"format": 9, "anything": "else"}"#).unwrap();
        assert!(matches!(
            dir.load_cert(&id, SystemTime::now()),
            Err(NodeDirError::UnknownVersion { found: 9, .. })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_path() {
        let root = tempdir("corrupt");
        let dir = NodeDir::open(&root, "n1").unwrap();
        for bytes in [
            &b"not ours at all"[..],
            &b"AMBIT-ZTUNNEL-STATE\n\xff\xff\xff"[..],
        ] {
            std::fs::write(dir.state_path(), bytes).unwrap();
            let err = dir.load_state().unwrap_err();
            assert!(matches!(err, NodeDirError::Corrupt { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .contains(&*dir.state_path().to_string_lossy()),
                "{err}"
            );
        }
        // A truncated write of a real file.
        dir.save_state(&push(true, 1, &["a", "b", "c"], &[]))
            .unwrap();
        let whole = std::fs::read(dir.state_path()).unwrap();
        std::fs::write(dir.state_path(), &whole[..whole.len() - 5]).unwrap();
        assert!(matches!(
            dir.load_state(),
            Err(NodeDirError::Corrupt { .. })
        ));

        let id = Identity::new("cluster.local", "shop", "client").unwrap();
        std::fs::write(dir.cert_path(&id), b"{\"format\": 1, \"node\": \"n1\"").unwrap();
        assert!(matches!(
            dir.load_cert(&id, SystemTime::now()),
            Err(NodeDirError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn certificates_round_trip_owner_only_and_expired_ones_are_refused() {
        let root = tempdir("certs");
        let dir = NodeDir::open(&root, "n1").unwrap();
        let id = Identity::new("cluster.local", "shop", "client").unwrap();
        assert!(dir.load_cert(&id, SystemTime::now()).unwrap().is_none());
        let good = cert(&id, Duration::from_secs(3600), Duration::from_secs(1));
        dir.save_cert(&good).unwrap();
        let path = dir.cert_path(&id);
        assert_eq!(mode(&path), 0o600);
        assert!(path.starts_with(root.join("certs")));
        let loaded = dir.load_cert(&id, SystemTime::now()).unwrap().unwrap();
        assert_eq!(loaded.leaf(), good.leaf());
        assert_eq!(loaded.private_key(), good.private_key());
        // The same file read later than its not-after is never used.
        let later = good.not_after() + Duration::from_secs(1);
        assert!(matches!(
            dir.load_cert(&id, later),
            Err(NodeDirError::Expired { .. })
        ));
        let expired = cert(&id, Duration::from_secs(60), Duration::from_secs(120));
        dir.save_cert(&expired).unwrap();
        assert!(matches!(
            dir.load_cert(&id, SystemTime::now()),
            Err(NodeDirError::Expired { .. })
        ));
        // A file renamed to another identity's name is refused.
        let other = Identity::new("cluster.local", "shop", "server").unwrap();
        std::fs::copy(&path, dir.cert_path(&other)).unwrap();
        dir.save_cert(&good).unwrap();
        std::fs::copy(&path, dir.cert_path(&other)).unwrap();
        assert!(matches!(
            dir.load_cert(&other, SystemTime::now()),
            Err(NodeDirError::OtherIdentity { .. })
        ));
        dir.remove_cert(&id).unwrap();
        dir.remove_cert(&id).unwrap();
        assert!(dir.load_cert(&id, SystemTime::now()).unwrap().is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn certificate_file_names_are_readable() {
        let dir = NodeDir {
            root: Arc::from(Path::new("/d")),
            node: Arc::from("n1"),
        };
        assert_eq!(
            dir.cert_path(&Identity::new("cluster.local", "shop", "client").unwrap()),
            PathBuf::from("/d/certs/cluster.local_ns_shop_sa_client.json")
        );
    }
}
