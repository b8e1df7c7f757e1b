//! One pod of the local mesh, made and run as a node makes and runs it: its namespace (the
//! sandbox), ADD through its node's CNI chain ([`super::cni`]), then its app (a sample server
//! or client, or the `waypoint` binary). [`super::cluster`] builds whole clusters and deletes
//! pods with these; they never import it back.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ambit_proto::ports;

use super::cni::{self, Chain, CniError, Sandbox};
use super::net::{self, NetError};
use super::objects::{self, ObjectsError, PodLayout, Sample};
use super::procs::{self, ProcError};
use super::state::{ClusterState, PodState, Proc, StateError};

/// Where a waypoint accepts HBONE.
pub const WAYPOINT_HBONE_PORT: u16 = ports::HBONE;

/// Why a pod could not be made, found or started.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A pod or node the cluster (or the objects folder) lacks, or an address taken.
    #[error("{what}")]
    Pod { what: String },
    /// A file of the state dir could not be made.
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Cni(#[from] CniError),
    /// A process never accepted connections.
    #[error("{what} did not listen on {addr} within {secs}s; see {}", log.display())]
    ListenTimeout {
        what: String,
        addr: SocketAddr,
        secs: u64,
        log: PathBuf,
    },
    /// A process exited during start-up.
    #[error("{what} exited during start-up; see {}", log.display())]
    Exited { what: String, log: PathBuf },
}

/// `ambitctl pod create`: makes pod `namespace/name` of the objects folder in a running
/// cluster, as a node does when a pod is scheduled to it: its namespace, ADD through its
/// node's CNI chain, then its app (which outlives this process, in its own process group).
/// A pod that cannot be made is torn down again (DEL, namespace deleted).
pub fn create_pod(
    state: &mut ClusterState,
    ambitctl: &Path,
    waypoint: &Path,
    namespace: &str,
    name: &str,
) -> Result<PodState, PodError> {
    if state
        .pods
        .iter()
        .any(|p| p.namespace == namespace && p.name == name)
    {
        return Err(PodError::Pod {
            what: format!(
                "pod {namespace}/{name} already runs; `ambitctl pod delete {namespace}/{name}` first"
            ),
        });
    }
    let layout = objects::read_layout(&state.objects_dir)?;
    let Some(pod) = layout
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name)
    else {
        return Err(PodError::Pod {
            what: format!(
                "no pod {namespace}/{name} in {}: add it there first (ambitctl apply -f), with \
                 spec.nodeName and status.podIP",
                state.objects_dir.display()
            ),
        });
    };
    if let Some(other) = state.pods.iter().find(|p| p.ip == pod.ip) {
        return Err(PodError::Pod {
            what: format!(
                "pod {namespace}/{name}'s address {} is pod {}/{}'s",
                pod.ip, other.namespace, other.name
            ),
        });
    }
    let made = create_sandbox(state, pod).and_then(|i| {
        // The child is not reaped here: it runs on after this command returns.
        start_app(state, i, ambitctl, waypoint).map(|_| i)
    });
    match made {
        Ok(i) => Ok(state.pods[i].clone()),
        Err(e) => {
            if let Err(cleanup) = delete_pod(state, namespace, name) {
                eprintln!("ambitctl: removing the half-made pod {namespace}/{name}: {cleanup}");
            }
            Err(e)
        }
    }
}

/// `ambitctl pod delete`: removes pod `namespace/name` of a running cluster as a node does:
/// stops its processes, runs DEL through its node's CNI chain (`ambit-cni` removes the
/// capture rules and tells ztunnel; `bridge` and `host-local` release the veth and the
/// addresses), then deletes its namespace. A failed DEL keeps the pod recorded, to retry.
pub fn delete_pod(
    state: &mut ClusterState,
    namespace: &str,
    name: &str,
) -> Result<PodState, PodError> {
    let Some(i) = state
        .pods
        .iter()
        .position(|p| p.namespace == namespace && p.name == name)
    else {
        return Err(PodError::Pod {
            what: format!(
                "no pod {namespace}/{name} in this cluster (pods: {})",
                state
                    .pods
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    };
    let pod = state.pods[i].clone();
    let exists = net::list_netns()?.contains(&pod.netns);
    if exists {
        let mut pids: Vec<i32> = pod
            .process
            .iter()
            .map(|p| p.pid)
            .filter(|p| procs::ours(*p))
            .collect();
        pids.extend(net::netns_pids(&pod.netns).unwrap_or_default());
        procs::stop_all(&pids, Duration::from_secs(5));
    }
    release(state, &pod)?;
    let _ = std::fs::remove_file(state.netns_dir.join(&pod.netns));
    if exists {
        net::del_netns(&pod.netns)?;
    }
    state.pods.remove(i);
    state.namespaces.retain(|n| *n != pod.netns);
    state.save()?;
    Ok(pod)
}

/// Makes one pod as a node does: its namespace (the sandbox), recorded before anything else
/// so `down` finds a half-made pod; then ADD through its node's CNI chain, which gives it
/// `eth0` and its addresses and, in an enrolled namespace, installs its capture rules and
/// tells the node's ztunnel. Returns its index in `state.pods`. Its app is not started here.
pub fn create_sandbox(state: &mut ClusterState, pod: &PodLayout) -> Result<usize, PodError> {
    let node_name = pod_node_name(state, pod)?;
    let Some(k) = state.nodes.iter().position(|n| n.name == node_name) else {
        return Err(PodError::Pod {
            what: format!(
                "pod {}/{} is on node {node_name}, which this cluster does not have",
                pod.namespace, pod.name
            ),
        });
    };
    let node = state.nodes[k].clone();
    let netns = format!("{}-{}-{}", state.prefix, pod.namespace, pod.name);
    state.namespaces.push(netns.clone());
    state.pods.push(PodState {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        netns: netns.clone(),
        ip: pod.ip,
        node: node.name.clone(),
        sample: pod.sample.clone(),
        process: None,
        cni_result: None,
    });
    let i = state.pods.len() - 1;
    state.save()?;
    net::add_sandbox(&netns)?;
    let link = state.netns_dir.join(&netns);
    // ztunnel's scan by address (after a restart, when the CNI's hints are gone) looks here.
    std::os::unix::fs::symlink(Path::new(net::NETNS_RUN_DIR).join(&netns), &link).map_err(
        |source| PodError::Io {
            path: link.clone(),
            source,
        },
    )?;
    let chain = node_chain(state, &node.name)?;
    let result = chain.add(&sandbox(&state.pods[i])?, pod.ip)?;
    state.pods[i].cni_result = Some(result);
    state.save()?;
    Ok(i)
}

/// The node a pod of the folder runs on: `layout.nodes` is only known to `up`, so the
/// address's node number says it (the folder's check guarantees they agree).
fn pod_node_name(state: &ClusterState, pod: &PodLayout) -> Result<String, PodError> {
    let k = usize::from(pod.ip.octets()[2]);
    state
        .nodes
        .get(k.wrapping_sub(1))
        .map(|n| n.name.clone())
        .ok_or_else(|| PodError::Pod {
            what: format!(
                "pod {}/{} has address {}, on node {k} of the plan; this cluster has {} node(s)",
                pod.namespace,
                pod.name,
                pod.ip,
                state.nodes.len()
            ),
        })
}

/// The CNI chain of node `node`, as written by `up`.
fn node_chain(state: &ClusterState, node: &str) -> Result<Chain, PodError> {
    let netns = state
        .node(node)
        .map(|n| n.netns.clone())
        .ok_or_else(|| PodError::Pod {
            what: format!("no node {node} in this cluster"),
        })?;
    Ok(Chain::load(
        &cni::conflist_path(&state.state_dir, node),
        &netns,
        state.cni_path.clone(),
    )?)
}

/// DEL for `pod` through its node's chain, with the result of its ADD: its capture rules,
/// veth and addresses released. Its namespace and processes are the caller's.
pub fn release(state: &ClusterState, pod: &PodState) -> Result<(), PodError> {
    let chain = node_chain(state, &pod.node)?;
    chain.del(&sandbox(pod)?, pod.cni_result.as_ref())?;
    Ok(())
}

/// How the chain sees `pod`: its namespace as `CNI_NETNS`, its addresses (IPv4 and the IPv6
/// twin) requested.
fn sandbox(pod: &PodState) -> Result<Sandbox, NetError> {
    let [_, _, k, n] = pod.ip.octets();
    let ip6 = net::pod_ip6(usize::from(k), usize::from(n).saturating_sub(2))?;
    Ok(Sandbox {
        container_id: pod.netns.clone(),
        netns: Path::new(net::NETNS_RUN_DIR).join(&pod.netns),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: if pod.uid.is_empty() {
            format!("{}/{}", pod.namespace, pod.name)
        } else {
            pod.uid.clone()
        },
        ips: vec![pod.ip.into(), ip6.into()],
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    Waypoint,
    Server,
    Client,
}

pub fn app_kind(pod: &PodState) -> Option<AppKind> {
    match pod.sample.as_ref()? {
        Sample::Waypoint { .. } => Some(AppKind::Waypoint),
        Sample::Server { .. } => Some(AppKind::Server),
        Sample::Client { .. } => Some(AppKind::Client),
    }
}

/// Starts pod `i`'s app (sample server or client, or the `waypoint` binary), records it, and
/// for a server or waypoint waits until it listens. `None`: the pod runs nothing.
pub fn start_app(
    state: &mut ClusterState,
    i: usize,
    ambitctl: &Path,
    waypoint: &Path,
) -> Result<Option<Child>, PodError> {
    let pod = state.pods[i].clone();
    let Some(sample) = &pod.sample else {
        return Ok(None);
    };
    let name = format!("{}/{}", pod.namespace, pod.name);
    let (program, args, label) = match sample {
        Sample::Waypoint { gateway } => {
            let (args, label) = waypoint_args(state, &pod, gateway);
            (waypoint, args, label)
        }
        Sample::Server { port } => (
            ambitctl,
            vec![
                "sample".into(),
                "server".into(),
                "--port".into(),
                port.to_string(),
                "--name".into(),
                name.clone(),
            ],
            format!("sample-{}-{}", pod.namespace, pod.name),
        ),
        Sample::Client { target } => (
            ambitctl,
            vec![
                "sample".into(),
                "client".into(),
                "--target".into(),
                target.clone(),
                "--every".into(),
                "1s".into(),
                "--name".into(),
                name.clone(),
            ],
            format!("sample-{}-{}", pod.namespace, pod.name),
        ),
    };
    let log = state.state_dir.join("logs").join(format!("{label}.log"));
    let (child, proc) =
        procs::spawn_in(&state.state_dir, &label, &pod.netns, program, &args, &log)?;
    state.pods[i].process = Some(proc.clone());
    state.save()?;
    match sample {
        Sample::Server { port } => {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            wait_listening(&pod.netns, addr, &proc, &format!("sample server {name}"))?;
        }
        // It binds its HBONE port once it holds a certificate from the CA.
        Sample::Waypoint { gateway } => {
            let addr = SocketAddr::from((pod.ip, WAYPOINT_HBONE_PORT));
            wait_listening(&pod.netns, addr, &proc, &format!("waypoint {gateway}"))?;
        }
        Sample::Client { .. } => {}
    }
    Ok(Some(child))
}

/// The `waypoint` binary's flags in its pod, with its discovery and certificate from the
/// controller, as the controller's Deployment runs it on Kubernetes; and its label.
fn waypoint_args(state: &ClusterState, pod: &PodState, gateway: &str) -> (Vec<String>, String) {
    let (ns, name) = gateway.split_once('/').unwrap_or((&pod.namespace, gateway));
    let token = state
        .state_dir
        .join("credentials/serviceaccounts")
        .join(ns)
        .join(format!("{name}.token"));
    let args = vec![
        "--identity".into(),
        // The controller's trust domain in local mode; the identity it derives for a
        // waypoint is named after the Gateway.
        format!(
            "spiffe://{}/ns/{ns}/sa/{name}",
            ambit_hbone::identity::DEFAULT_TRUST_DOMAIN
        ),
        "--gateway".into(),
        gateway.to_owned(),
        "--controller".into(),
        state.controller_urls(),
        "--ca-root-file".into(),
        state.root_cert.display().to_string(),
        "--credential-file".into(),
        token.display().to_string(),
        "--log-format".into(),
        "json".into(),
        "--drain-seconds".into(),
        "1".into(),
    ];
    (args, format!("waypoint-{ns}-{name}"))
}

/// Waits until something accepts connections on `addr` inside `netns`.
pub fn wait_listening(
    netns: &str,
    addr: SocketAddr,
    proc: &Proc,
    what: &str,
) -> Result<(), PodError> {
    let secs = 30;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ok = net::in_netns(netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if !procs::alive(proc.pid) {
            return Err(PodError::Exited {
                what: what.to_owned(),
                log: proc.log.clone(),
            });
        }
        if Instant::now() > deadline {
            return Err(PodError::ListenTimeout {
                what: what.to_owned(),
                addr,
                secs,
                log: proc.log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
