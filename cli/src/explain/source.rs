//! Where `explain` reads the live state from. The decisions are re-run on the very
//! snapshots the proxies serve: each node's ztunnel `/config_dump` (its state and local
//! pods) and each waypoint's `/config_dump`, plus their access logs. A [`MeshSource`] says
//! how to reach them; [`LocalMesh`] reads a local mesh (admin ports inside the namespaces,
//! log files under the state dir), [`KubeMesh`] a cluster (the same admin ports through the
//! API server's port-forward, and the pods' logs).

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
            // A tail may start in the middle of a line: that line is not JSON and is skipped.
            access_lines(&String::from_utf8_lossy(&raw))
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

/// A mesh on Kubernetes, read through its API server: ztunnel pods by their name label and
/// node, waypoint pods by their Gateway label and IP, each one's admin port (15000) through
/// port-forward, and access-log events from the tail of its pod's log. The pods are listed
/// once, at [`KubeMesh::connect`]: one explanation reads one view of the cluster.
pub struct KubeMesh {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    /// Where Ambit is installed (its ztunnels).
    namespace: String,
    /// Each node's ztunnel pod, by node.
    ztunnels: std::collections::BTreeMap<String, String>,
    waypoints: Vec<WaypointPod>,
}

/// A waypoint pod found through the API server.
struct WaypointPod {
    /// Its Gateway, `namespace/name`.
    gateway: String,
    namespace: String,
    pod: String,
    ip: Option<String>,
}

/// Lines of a proxy's pod log read for its access-log events.
const LOG_TAIL_LINES: i64 = 5_000;

impl KubeMesh {
    pub fn connect(kubeconfig: Option<&Path>, namespace: &str) -> anyhow::Result<Self> {
        use k8s_openapi::api::core::v1::Pod;
        let runtime = crate::cluster::runtime()?;
        let client = runtime.block_on(crate::cluster::client(kubeconfig))?;
        let selector = format!("{}={}", crate::cluster::NAME_LABEL, crate::cluster::ZTUNNEL);
        let ztunnels = runtime
            .block_on(crate::cluster::pods(&client, namespace, &selector))?
            .into_iter()
            .filter_map(|p| Some((p.spec?.node_name?, p.metadata.name?)))
            .collect();
        let label = ambit_manifests::waypoint::GATEWAY_NAME_LABEL;
        let waypoints = runtime
            .block_on(
                kube::Api::<Pod>::all(client.clone())
                    .list(&kube::api::ListParams::default().labels(label)),
            )
            .with_context(|| format!("listing waypoint pods ({label})"))?
            .items
            .into_iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.clone()?;
                let gateway = p.metadata.labels.as_ref()?.get(label)?.clone();
                let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
                Some(WaypointPod {
                    gateway: format!("{ns}/{gateway}"),
                    namespace: ns,
                    pod: p.metadata.name?,
                    ip,
                })
            })
            .collect();
        Ok(KubeMesh {
            runtime,
            client,
            namespace: namespace.to_owned(),
            ztunnels,
            waypoints,
        })
    }

    fn ztunnel_pod(&self, node: &str) -> anyhow::Result<&str> {
        self.ztunnels
            .get(node)
            .map(String::as_str)
            .with_context(|| {
                format!(
                    "no ztunnel pod on node {node:?} in {} (ztunnels run on: {})",
                    self.namespace,
                    self.ztunnels.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })
    }

    fn admin_json(&self, namespace: &str, pod: &str) -> anyhow::Result<Value> {
        let got = self.runtime.block_on(crate::cluster::get(
            &self.client,
            namespace,
            pod,
            ZTUNNEL_ADMIN_PORT,
            "/config_dump",
        ))?;
        match got {
            (200, body) => serde_json::from_str(&body)
                .with_context(|| format!("/config_dump of {namespace}/{pod} is not JSON")),
            (status, body) => bail!(
                "/config_dump of {namespace}/{pod}: HTTP {status}: {}",
                body.trim()
            ),
        }
    }
}

impl MeshSource for KubeMesh {
    fn nodes(&self) -> Vec<String> {
        self.ztunnels.keys().cloned().collect()
    }

    fn ztunnel_dump(&self, node: &str) -> anyhow::Result<Value> {
        let pod = self.ztunnel_pod(node)?;
        self.admin_json(&self.namespace, pod)
            .with_context(|| format!("ztunnel on {node}"))
    }

    fn waypoint_dump(&self, ip: IpAddr) -> anyhow::Result<WaypointDump> {
        let want = ip.to_string();
        let Some(wp) = self
            .waypoints
            .iter()
            .find(|wp| wp.ip.as_deref() == Some(want.as_str()))
        else {
            bail!("no waypoint pod at {ip} in the cluster");
        };
        let dump = self
            .admin_json(&wp.namespace, &wp.pod)
            .with_context(|| format!("waypoint {}", wp.gateway))?;
        Ok(WaypointDump {
            gateway: wp.gateway.clone(),
            dump,
        })
    }

    fn access_log(&self, proxy: &Proxy) -> anyhow::Result<Vec<Value>> {
        use k8s_openapi::api::core::v1::Pod;
        let (ns, pod) = match proxy {
            Proxy::Ztunnel { node } => (self.namespace.as_str(), self.ztunnel_pod(node)?),
            Proxy::Waypoint { gateway } => {
                let Some(wp) = self.waypoints.iter().find(|wp| &wp.gateway == gateway) else {
                    bail!("no pod of waypoint {gateway} in the cluster");
                };
                (wp.namespace.as_str(), wp.pod.as_str())
            }
        };
        let params = kube::api::LogParams {
            tail_lines: Some(LOG_TAIL_LINES),
            ..Default::default()
        };
        let text = self
            .runtime
            .block_on(kube::Api::<Pod>::namespaced(self.client.clone(), ns).logs(pod, &params))
            .with_context(|| format!("reading the log of pod {ns}/{pod}"))?;
        Ok(access_lines(&text))
    }
}

/// The JSON access-log events among a log's lines.
fn access_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
