//! Who is calling the controller: the bearer token of a request turned into a [`Caller`].
//!
//! Two ways to prove who you are, one per mode of running (the root ARCHITECTURE.md, "Wire formats"):
//! - Kubernetes: a projected service-account token for the `ambit-ca` audience, checked
//!   with a TokenReview. The ztunnel ServiceAccount's token stands for the node its pod is
//!   bound to (the `authentication.kubernetes.io/node-name` extra the API server adds to
//!   bound tokens); any other service account stands for itself (a waypoint).
//! - Local: node credentials this controller issues at start, random 256-bit tokens
//!   written one per file under the state directory (0600) for the local mesh to hand to
//!   each node's ztunnel. They are reissued at every start, so a file from a previous run
//!   stops working, and compared in constant time.
//!
//! Tokens are secrets: they are never logged, and no error here quotes one.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambit_hbone::identity::IdentityError;
use ambit_hbone::Identity;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

/// The audience CA tokens are projected for.
pub const DEFAULT_AUDIENCE: &str = "ambit-ca";
/// TokenReview extra naming the node a bound token's pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// TokenReview extra naming the pod a bound token belongs to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Random bytes in a local credential.
const TOKEN_BYTES: usize = 32;

/// Who a request comes from, once its token checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The node proxy (ztunnel) of a node: may act for the pods scheduled there.
    Node {
        /// The Kubernetes node name.
        node: String,
    },
    /// A workload that proved its own service account (a waypoint): may act for itself.
    Workload {
        /// The identity of its service account.
        identity: Identity,
        /// The pod the token is bound to, when the API server said.
        pod: Option<String>,
    },
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node { node } => write!(f, "node {node}"),
            Caller::Workload { identity, .. } => write!(
                f,
                "service account {}/{}",
                identity.namespace(),
                identity.service_account()
            ),
        }
    }
}

/// Why a caller could not be authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The request carries no `authorization` metadata.
    #[error("no credential: send \"authorization: Bearer <token>\"")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("authorization metadata is not \"Bearer <token>\"")]
    Malformed,
    /// The token is none of the credentials this controller issued.
    #[error("unknown credential (not issued by this controller, or issued before it restarted)")]
    UnknownCredential,
    /// The API server did not authenticate the token (expired, forged, revoked...).
    #[error("token rejected by the Kubernetes API server: {0}")]
    Rejected(String),
    /// The token is valid, but not for our audience.
    #[error("token is not valid for audience {audience:?}")]
    Audience {
        /// The audience we require.
        audience: String,
    },
    /// The token belongs to a user that is not a service account.
    #[error("{user:?} is not a service account")]
    NotServiceAccount {
        /// The authenticated user name.
        user: String,
    },
    /// A ztunnel token that is not bound to a pod on a node, so it names no node.
    #[error("token of {user} is not bound to a node; use a projected service-account token")]
    NoNode {
        /// The authenticated user name.
        user: String,
    },
    /// The service account does not make a valid SPIFFE identity.
    #[error("{user:?} does not form a valid identity")]
    Identity {
        /// The authenticated user name.
        user: String,
        /// What is wrong with it.
        #[source]
        source: IdentityError,
    },
    /// The TokenReview itself failed (API server unreachable, RBAC...).
    #[error("TokenReview failed")]
    Review(#[source] kube::Error),
}

impl AuthError {
    /// The gRPC status a caller gets: we could not check the token (Unavailable, try
    /// again) or the token does not prove anything (Unauthenticated).
    pub fn to_status(&self) -> tonic::Status {
        let message = crate::model::error_chain(self);
        match self {
            AuthError::Review(_) => tonic::Status::unavailable(message),
            _ => tonic::Status::unauthenticated(message),
        }
    }
}

/// Why local credentials could not be issued or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A node name that is not a DNS-1123 subdomain, so not a safe file name either.
    #[error("{0:?} is not a valid node name")]
    NodeName(String),
    /// Reading a credential another replica issued failed.
    #[error("cannot read credential {path} (issued by the leading controller)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a credential file failed.
    #[error("cannot write credential {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Turns request tokens into callers. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// Local mode: the credentials issued at start.
    Local(LocalCredentials),
    /// Kubernetes mode: TokenReview.
    Kubernetes(TokenReviewer),
}

impl Authenticator {
    /// Authenticates the caller of a request from its `authorization` metadata.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let token = bearer(metadata)?;
        match self {
            Authenticator::Local(c) => c.authenticate(token),
            Authenticator::Kubernetes(r) => r.review(token).await,
        }
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The credentials of local mode. Cheap to clone.
#[derive(Clone)]
pub struct LocalCredentials {
    entries: Arc<Vec<(String, Caller)>>,
}

impl fmt::Debug for LocalCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Callers only: the tokens are secrets.
        f.debug_list()
            .entries(self.entries.iter().map(|(_, c)| c))
            .finish()
    }
}

impl LocalCredentials {
    /// Issues a fresh credential for each node (`<dir>/<node>.token`) and each workload
    /// identity (`<dir>/serviceaccounts/<ns>/<sa>.token`), replacing older files.
    pub fn issue(
        dir: &Path,
        nodes: &[String],
        workloads: &[Identity],
    ) -> Result<Self, CredentialError> {
        let mut entries = Vec::new();
        for node in nodes {
            if !is_dns_subdomain(node) {
                return Err(CredentialError::NodeName(node.clone()));
            }
            let token = new_token();
            write_secret(&dir.join(format!("{node}.token")), &token)?;
            entries.push((token, Caller::Node { node: node.clone() }));
        }
        for identity in workloads {
            let token = new_token();
            let path = Self::workload_path(dir, identity);
            write_secret(&path, &token)?;
            entries.push((
                token,
                Caller::Workload {
                    identity: identity.clone(),
                    pod: None,
                },
            ));
        }
        Ok(LocalCredentials {
            entries: Arc::new(entries),
        })
    }

    /// Loads the credentials another replica (the leader) issued with [`Self::issue`] in
    /// the same directory, so that every replica accepts the same tokens.
    pub fn load(
        dir: &Path,
        nodes: &[String],
        workloads: &[Identity],
    ) -> Result<Self, CredentialError> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .map(|t| t.trim().to_string())
                .map_err(|source| CredentialError::Read { path, source })
        };
        let mut entries = Vec::new();
        for node in nodes {
            if !is_dns_subdomain(node) {
                return Err(CredentialError::NodeName(node.clone()));
            }
            entries.push((
                read(Self::node_path(dir, node))?,
                Caller::Node { node: node.clone() },
            ));
        }
        for identity in workloads {
            entries.push((
                read(Self::workload_path(dir, identity))?,
                Caller::Workload {
                    identity: identity.clone(),
                    pod: None,
                },
            ));
        }
        Ok(LocalCredentials {
            entries: Arc::new(entries),
        })
    }

    /// Where [`Self::issue`] writes the credential of a node.
    pub fn node_path(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("{node}.token"))
    }

    /// Where [`Self::issue`] writes the credential of a workload identity.
    pub fn workload_path(dir: &Path, identity: &Identity) -> PathBuf {
        dir.join("serviceaccounts")
            .join(identity.namespace())
            .join(format!("{}.token", identity.service_account()))
    }

    fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        // Compare with every credential, each in constant time, so timing reveals
        // neither how much of a token was right nor whether one matched early.
        let mut found = None;
        for (known, caller) in self.entries.iter() {
            if bool::from(known.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(AuthError::UnknownCredential)
    }
}

fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    // ThreadRng is a CSPRNG seeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `contents` to `path` readable by the owner only, atomically (a reader never
/// sees half a token, and a crash leaves the old one): a 0600 file written whole, then
/// renamed over the old one.
pub(crate) fn write_secret(path: &Path, contents: &str) -> Result<(), CredentialError> {
    let err = |source| CredentialError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
    }
    ambit_runtime::fs::write_atomic(path, contents.as_bytes(), 0o600).map_err(err)
}

/// RFC 1123 subdomain, as Kubernetes requires of node names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Kubernetes-mode authentication with TokenReview. Cheap to clone.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    trust_domain: String,
    /// `(namespace, name)` of the ztunnel ServiceAccount.
    ztunnel: (String, String),
}

impl fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("ztunnel", &self.ztunnel)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews tokens for `audience`; tokens of the ServiceAccount `ztunnel_namespace/
    /// ztunnel_name` stand for their node, others for themselves in `trust_domain`.
    pub fn new(
        client: kube::Client,
        audience: &str,
        trust_domain: &str,
        ztunnel_namespace: &str,
        ztunnel_name: &str,
    ) -> Self {
        TokenReviewer {
            client,
            audience: audience.to_string(),
            trust_domain: trust_domain.to_string(),
            ztunnel: (ztunnel_namespace.to_string(), ztunnel_name.to_string()),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(AuthError::Review)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".to_string()),
            ));
        }
        // An API server that ignores `spec.audiences` would accept any token; insist.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(AuthError::Audience {
                audience: self.audience.clone(),
            });
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        self.caller(&name, &extra)
    }

    fn caller(
        &self,
        user: &str,
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<Caller, AuthError> {
        let not_sa = || AuthError::NotServiceAccount {
            user: user.to_string(),
        };
        let rest = user
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(not_sa)?;
        let (ns, sa) = rest.split_once(':').ok_or_else(not_sa)?;
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        if (ns, sa) == (self.ztunnel.0.as_str(), self.ztunnel.1.as_str()) {
            let node = first(NODE_NAME_EXTRA).ok_or_else(|| AuthError::NoNode {
                user: user.to_string(),
            })?;
            return Ok(Caller::Node { node });
        }
        let identity =
            Identity::new(&self.trust_domain, ns, sa).map_err(|source| AuthError::Identity {
                user: user.to_string(),
                source,
            })?;
        Ok(Caller::Workload {
            identity,
            pod: first(POD_NAME_EXTRA),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn bearer_parsing() {
        assert!(matches!(bearer(&metadata(None)), Err(AuthError::Missing)));
        assert!(matches!(
            bearer(&metadata(Some("Basic abc"))),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            bearer(&metadata(Some("Bearer "))),
            Err(AuthError::Malformed)
        ));
        assert_eq!(bearer(&metadata(Some("Bearer abc"))).unwrap(), "abc");
        assert_eq!(bearer(&metadata(Some("bearer abc "))).unwrap(), "abc");
    }

    #[tokio::test]
    async fn local_credentials_are_private_files_and_match_exactly() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let wp = Identity::new("cluster.local", "ns1", "waypoint").unwrap();
        let creds = LocalCredentials::issue(
            dir.path(),
            &["node-a".to_string(), "node-b".to_string()],
            std::slice::from_ref(&wp),
        )
        .unwrap();
        let a = std::fs::read_to_string(LocalCredentials::node_path(dir.path(), "node-a")).unwrap();
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        let mode = std::fs::metadata(LocalCredentials::node_path(dir.path(), "node-a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let auth = Authenticator::Local(creds.clone());
        let caller = auth
            .authenticate(&metadata(Some(&format!("Bearer {a}"))))
            .await
            .unwrap();
        assert_eq!(
            caller,
            Caller::Node {
                node: "node-a".into()
            }
        );
        let w = std::fs::read_to_string(LocalCredentials::workload_path(dir.path(), &wp)).unwrap();
        assert!(matches!(
            auth.authenticate(&metadata(Some(&format!("Bearer {w}"))))
                .await
                .unwrap(),
            Caller::Workload { identity, .. } if identity == wp
        ));
        // One character off, a prefix, and a token from a previous issue all fail.
        let mut forged = a.clone().into_bytes();
        forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
        for bad in [String::from_utf8(forged).unwrap(), a[..32].to_string()] {
            assert!(matches!(
                auth.authenticate(&metadata(Some(&format!("Bearer {bad}"))))
                    .await,
                Err(AuthError::UnknownCredential)
            ));
        }
        let _reissued = LocalCredentials::issue(dir.path(), &["node-a".to_string()], &[]).unwrap();
        let again =
            std::fs::read_to_string(LocalCredentials::node_path(dir.path(), "node-a")).unwrap();
        assert_ne!(again, a);
        assert!(
            !format!("{creds:?}").contains(&a),
            "tokens must not be printed"
        );
        assert!(matches!(
            LocalCredentials::issue(dir.path(), &["../etc".to_string()], &[]),
            Err(CredentialError::NodeName(_))
        ));
    }
}
