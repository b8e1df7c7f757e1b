//! What a running local cluster is made of, recorded in `<state-dir>/cluster.json` so that
//! `ambitctl down`, `status` and `proxy-config` (other processes, possibly after a crash of
//! `up`) find its processes, namespaces and files. Written after every step of the build, so
//! a half-built cluster is described too.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::objects::Sample;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ambit/local";
/// The default prefix of every namespace the local cluster makes.
pub const DEFAULT_PREFIX: &str = "ambitlm";

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No cluster.json: nothing is running with this state directory.
    #[error("no local cluster recorded in {} (is `ambitctl up` running with this --state-dir?)", path.display())]
    Missing { path: PathBuf },
    /// The file cannot be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not what we write.
    #[error("{} is not a cluster state file", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A process we started.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Proc {
    pub pid: i32,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// A controller replica beyond the first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ControllerReplica {
    /// Its name in the leader election (`controller-<i>`).
    pub name: String,
    /// `https://ip:port` of its discovery and CA.
    pub url: String,
    /// Its metrics and readiness address.
    pub ops: std::net::SocketAddr,
    pub process: Option<Proc>,
}

/// One node: a namespace with a ztunnel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ztunnel: Option<Proc>,
}

/// One pod: a namespace, made by its node's CNI chain, with the sample app.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID` as the chain was called with.
    #[serde(default)]
    pub uid: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub sample: Option<Sample>,
    pub process: Option<Proc>,
    /// The CNI result of its ADD, which its DEL is given (as runtimes cache it); `None` while
    /// the ADD has not completed (DEL then runs without it, as the spec allows).
    #[serde(default)]
    pub cni_result: Option<serde_json::Value>,
}

/// The whole cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterState {
    /// Prefix of every namespace name.
    pub prefix: String,
    pub state_dir: PathBuf,
    /// The folder the controller watches.
    pub objects_dir: PathBuf,
    /// Whether `objects_dir` is ours (under the state dir) or the user's.
    pub objects_are_ours: bool,
    /// Symlinks to exactly this cluster's pod namespaces (what the ztunnels scan).
    pub netns_dir: PathBuf,
    /// Every namespace made, in creation order.
    pub namespaces: Vec<String>,
    /// `CNI_PATH`: where the pods' CNI plugins were found (`ambit-cni`'s directory, the
    /// reference plugins'), so `down` runs DEL with the same plugins as ADD.
    #[serde(default)]
    pub cni_path: Vec<PathBuf>,
    pub fabric: String,
    /// `http(s)://ip:port` of the controller, as the ztunnels reach it.
    pub controller_url: String,
    pub controller: Option<Proc>,
    /// Further controller replicas (`up --controllers N`), beside `controller` over the same
    /// state dir: each serves discovery and the CA, one of them leads.
    #[serde(default)]
    pub more_controllers: Vec<ControllerReplica>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// PEM root of the mesh.
    pub root_cert: PathBuf,
    /// The networks whose UDP every ztunnel captures (`--udp-capture-cidrs`): fixed at `up`,
    /// so a ztunnel started by `upgrade` captures the same (and adopts the rules). Empty in a
    /// record written before there was UDP capture, or with `up --udp-capture false`.
    #[serde(default)]
    pub udp_capture: Vec<String>,
}

/// `<state-dir>/cluster.json`.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("cluster.json")
}

impl ClusterState {
    /// Reads `<state-dir>/cluster.json`.
    pub fn load(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_file(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing { path })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|source| StateError::Json { path, source })
    }

    /// Writes `<state-dir>/cluster.json` (atomically: a reader never sees half a file).
    pub fn save(&self) -> Result<(), StateError> {
        let path = state_file(&self.state_dir);
        let text = serde_json::to_string_pretty(self).map_err(|source| StateError::Json {
            path: path.clone(),
            source,
        })?;
        ambit_runtime::fs::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|source| StateError::Io { path, source })
    }

    /// Every controller replica's URL, comma-separated, as the proxies' `--controller` takes
    /// them: the first replica first.
    pub fn controller_urls(&self) -> String {
        std::iter::once(self.controller_url.as_str())
            .chain(self.more_controllers.iter().map(|c| c.url.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every controller replica's process: `(name, process)`, the first replica first.
    pub fn controller_procs(&self) -> Vec<(String, &Proc)> {
        self.controller
            .iter()
            .map(|p| ("controller-0".to_owned(), p))
            .chain(
                self.more_controllers
                    .iter()
                    .filter_map(|c| c.process.as_ref().map(|p| (c.name.clone(), p))),
            )
            .collect()
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
