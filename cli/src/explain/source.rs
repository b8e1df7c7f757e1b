//! Where `explain` reads the live state from. The decisions are re-run on the very
//! snapshots the proxies serve: each node's ztunnel `/config_dump` (its state and local
//! pods) and each waypoint's `/config_dump`, plus their access logs. A [`MeshSource`] says
//! how to reach them; [`LocalMesh`] reads a local mesh (admin ports inside the namespaces,
//! log files under the state dir). A Kubernetes source would port-forward to the same
//! admin ports through the API server and read pod logs.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ambitctl::local::admin;
use ambitctl::local::cluster::ZTUNNEL_ADMIN_PORT;
use ambitctl::local::objects::Sample;
use ambitctl::local::state::ClusterState;
use anyhow::{bail, Context};
use serde_json::Value;

/// A proxy whose access log to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// The ztunnel of this node.
    Ztunnel { node: String },
    /// The waypoint of this Gateway (`namespace/name`).
    Waypoint { gateway: String },
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proxy::Ztunnel { node } => write!(f, "ztunnel on {node}"),
            Proxy::Waypoint { gateway } => write!(f, "waypoint {gateway}"),
        }
    }
}

/// A waypoint pod's config dump.
#[derive(Debug, Clone)]
pub struct WaypointDump {
    /// Its Gateway, `namespace/name`.
    pub gateway: String,
    /// `/config_dump`: the waypoint's state file shape.
    pub dump: Value,
}

/// The live state of a mesh, read from its proxies.
pub trait MeshSource {
    /// The nodes that run a ztunnel.
    fn nodes(&self) -> Vec<String>;
    /// Node `node`'s ztunnel `/config_dump` (`state` and `local_pods`).
    fn ztunnel_dump(&self, node: &str) -> anyhow::Result<Value>;
    /// The config dump of the waypoint pod at `ip`.
    fn waypoint_dump(&self, ip: IpAddr) -> anyhow::Result<WaypointDump>;
    /// The recent access-log events of `proxy`, oldest first.
    fn access_log(&self, proxy: &Proxy) -> anyhow::Result<Vec<Value>>;
}

/// A local mesh made by `ambitctl up`.
pub struct LocalMesh {
    pub state: ClusterState,
}

/// How much of a log's end is read: the last events, not the whole history.
const LOG_TAIL_BYTES: u64 = 1 << 20;

/// The JSON access-log events in the last [`LOG_TAIL_BYTES`] of `path`.
fn access_events(path: &Path) -> anyhow::Result<Vec<Value>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))
        .and_then(|_| {
            let mut raw = Vec::new();
            file.read_to_end(&mut raw).map(|_| raw)
        })
        .with_context(|| format!("reading {}", path.display()))
        .map(|raw| {
            let text = String::from_utf8_lossy(&raw);
            // A tail may start in the middle of a line: that line is not JSON and is skipped.
            text.lines()
                .filter(|l| l.contains("\"target\":\"access\""))
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
}

impl MeshSource for LocalMesh {
    fn nodes(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn ztunnel_dump(&self, node: &str) -> anyhow::Result<Value> {
        let Some(n) = self.state.node(node) else {
            bail!("no node {node:?} in the local mesh");
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_ADMIN_PORT));
        admin_json(&n.netns, addr).with_context(|| format!("ztunnel on {node}"))
    }

    fn waypoint_dump(&self, ip: IpAddr) -> anyhow::Result<WaypointDump> {
        let found = self.state.pods.iter().find_map(|p| match &p.sample {
            Some(Sample::Waypoint { gateway }) if IpAddr::V4(p.ip) == ip => {
                Some((p, gateway.clone()))
            }
            _ => None,
        });
        let Some((pod, gateway)) = found else {
            bail!("no waypoint pod at {ip} in the local mesh");
        };
        // The waypoint's admin port, like ztunnel's, listens on loopback in its own pod.
        let addr = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_ADMIN_PORT));
        let dump = admin_json(&pod.netns, addr).with_context(|| format!("waypoint {gateway}"))?;
        Ok(WaypointDump { gateway, dump })
    }

    fn access_log(&self, proxy: &Proxy) -> anyhow::Result<Vec<Value>> {
        let name = match proxy {
            Proxy::Ztunnel { node } => format!("ztunnel-{node}.log"),
            Proxy::Waypoint { gateway } => {
                format!("waypoint-{}.log", gateway.replacen('/', "-", 1))
            }
        };
        access_events(&self.state.state_dir.join("logs").join(name))
    }
}

/// GET `/config_dump` from `addr` inside `netns`, as JSON.
fn admin_json(netns: &str, addr: SocketAddr) -> anyhow::Result<Value> {
    match admin::get(netns, addr, "/config_dump")? {
        (200, body) => serde_json::from_str(&body).context("/config_dump is not JSON"),
        (status, body) => bail!("/config_dump: HTTP {status}: {}", body.trim()),
    }
}
