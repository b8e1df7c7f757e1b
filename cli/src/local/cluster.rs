//! Building and tearing down a local cluster: namespaces (via [`net`]), the mesh root, the
//! controller in the fabric namespace (on the bridge address, so every node reaches it), one
//! ztunnel per node, then the pods, each made as a node makes one: its namespace, its node's
//! CNI chain (ADD, via [`cni`]), and only then its app ([`pods`]). So ztunnels run before any
//! pod exists, and `ambit-cni` captures every enrolled pod before its first process.
//! [`down`] undoes all of it from the recorded state (DEL for each pod it recorded) *and* from
//! what it can find without it (namespaces with our prefix, the processes inside them,
//! pidfiles), so it also cleans up after a crash.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ambit_proto::ports;

use super::admin;
use super::cni::{self, CniError};
use super::net::{self, NetError};
use super::objects::{self, Layout, ObjectsError, Sample, SampleSpec};
use super::pods::{self, AppKind, PodError};
use super::procs::{self, ProcError};
use super::state::{ClusterState, ControllerReplica, NodeState, StateError};

/// The controller's discovery/CA port.
pub const CONTROLLER_PORT: u16 = ports::DISCOVERY;
/// ztunnel's readiness port.
pub const ZTUNNEL_READINESS_PORT: u16 = ports::READINESS;
/// ztunnel's metrics port.
pub const ZTUNNEL_METRICS_PORT: u16 = ports::METRICS;
/// ztunnel's admin port, on loopback.
pub const ZTUNNEL_ADMIN_PORT: u16 = ports::ADMIN;
pub use super::pods::WAYPOINT_HBONE_PORT;
/// The controller's metrics and readiness port.
pub const CONTROLLER_OPS_PORT: u16 = ports::CONTROLLER_OPS;
/// How far apart the ports of successive controller replicas are (replica `i` serves on
/// `15012 + 100 i` and `15014 + 100 i`), all on the fabric's address.
pub const CONTROLLER_PORT_STEP: u16 = 100;
/// Most controller replicas `up` runs.
pub const MAX_CONTROLLERS: usize = 5;

/// Why the cluster could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A component binary is not where we look for it.
    #[error(
        "{name} not found at {} (it is looked for next to ambitctl); build it with: \
         cargo build -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni{release}",
        path.display(),
        release = if path.components().any(|c| c.as_os_str() == "release") { " --release" } else { "" }
    )]
    Binary { name: &'static str, path: PathBuf },
    /// Our own executable cannot be found.
    #[error("cannot find ambitctl's own executable")]
    SelfExe(#[source] std::io::Error),
    /// A cluster is already running with this state directory.
    #[error("a local cluster is already running with state dir {} (controller pid {pid}); run `ambitctl down --state-dir {}` first", dir.display(), dir.display())]
    AlreadyRunning { dir: PathBuf, pid: i32 },
    /// A directory or file of the state dir could not be made.
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
    /// A pod could not be made, found or started.
    #[error(transparent)]
    Pod(#[from] PodError),
}

/// The executables a cluster runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ambitctl: PathBuf,
    pub controller: PathBuf,
    pub ztunnel: PathBuf,
    pub waypoint: PathBuf,
    /// The chained CNI plugin the pods are made with.
    pub cni: PathBuf,
}

impl Binaries {
    /// `ambit-controller` and `ztunnel` next to ambitctl's own executable (one target dir).
    pub fn locate() -> Result<Self, ClusterError> {
        let me = std::env::current_exe().map_err(ClusterError::SelfExe)?;
        let dir = me.parent().unwrap_or(Path::new("."));
        let find = |name: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ClusterError::Binary { name, path })
            }
        };
        Ok(Binaries {
            controller: find("ambit-controller")?,
            ztunnel: find("ztunnel")?,
            waypoint: find("waypoint")?,
            cni: find("ambit-cni")?,
            ambitctl: me,
        })
    }
}

/// What `up` is asked to build.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub state_dir: PathBuf,
    pub prefix: String,
    /// A user's folder of objects; `None` writes the sample under the state dir.
    pub objects: Option<PathBuf>,
    pub sample: SampleSpec,
    /// Controller replicas (1 to [`MAX_CONTROLLERS`]): each serves discovery and the CA,
    /// one of them (elected with a lock file in the state dir) does the writes.
    pub controllers: usize,
    /// Whether the ztunnels capture the pods' UDP to the pod networks ([`udp_networks`]).
    pub udp_capture: bool,
}

/// A cluster this process started (children to reap in the foreground).
#[derive(Debug)]
pub struct Running {
    pub state: ClusterState,
    pub children: Vec<Child>,
}

fn mkdir(path: &Path) -> Result<(), ClusterError> {
    std::fs::create_dir_all(path).map_err(|source| ClusterError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), ClusterError> {
    std::fs::write(path, text).map_err(|source| ClusterError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Builds and starts everything. On error, what was made stays recorded: call [`down`].
pub fn up(
    opts: &UpOptions,
    bins: &Binaries,
    running: &mut Option<Running>,
) -> Result<(), ClusterError> {
    let dir = &opts.state_dir;
    if let Ok(old) = ClusterState::load(dir) {
        if let Some(c) = old.controller.as_ref().filter(|c| procs::alive(c.pid)) {
            return Err(ClusterError::AlreadyRunning {
                dir: dir.clone(),
                pid: c.pid,
            });
        }
        // A stale record (crashed run): clean it up before building anew.
        down(dir, &old.prefix);
    }
    // Before anything is made: without the CNI plugins no pod can be.
    let cni_path = cni::plugin_path(&bins.cni, &cni::PLUGIN_DIRS)?;
    // Leftovers of a crash without a record.
    down(dir, &opts.prefix);
    for sub in ["logs", "netns", "ca", "pids", "examples"] {
        mkdir(&dir.join(sub))?;
    }
    let (objects_dir, objects_are_ours) = match &opts.objects {
        Some(d) => (d.clone(), false),
        None => {
            let d = dir.join("objects");
            mkdir(&d)?;
            objects::write_sample(&d, &opts.sample)?;
            (d, true)
        }
    };
    write_file(
        &dir.join("examples/deny-client.yaml"),
        objects::deny_example(),
    )?;
    let layout = objects::read_layout(&objects_dir)?;

    // The controller generates the mesh root and the node credentials under the state dir
    // (its `--state-dir`), where the ztunnels read them.
    let root_cert = dir.join("ca/root-cert.pem");

    let state = ClusterState {
        prefix: opts.prefix.clone(),
        state_dir: dir.clone(),
        objects_dir,
        objects_are_ours,
        netns_dir: dir.join("netns"),
        namespaces: Vec::new(),
        cni_path,
        fabric: format!("{}-fabric", opts.prefix),
        controller_url: format!("https://{}:{CONTROLLER_PORT}", net::FABRIC_IP),
        controller: None,
        more_controllers: Vec::new(),
        nodes: Vec::new(),
        pods: Vec::new(),
        root_cert: root_cert.clone(),
        udp_capture: if opts.udp_capture {
            udp_networks(layout.nodes.len())?
        } else {
            Vec::new()
        },
    };
    state.save()?;
    let run = running.insert(Running {
        state,
        children: Vec::new(),
    });
    build_network(&mut run.state, &layout)?;
    start_processes(run, bins, &layout, opts.controllers)?;
    Ok(())
}

fn add_netns(state: &mut ClusterState, name: String) -> Result<String, ClusterError> {
    // Recorded first: a failure halfway through still leaves it for `down`.
    state.namespaces.push(name.clone());
    state.save()?;
    net::add_netns(&name)?;
    Ok(name)
}

fn build_network(state: &mut ClusterState, layout: &Layout) -> Result<(), ClusterError> {
    let fabric = add_netns(state, state.fabric.clone())?;
    net::make_fabric_bridge(&fabric, true)?;
    for (i, name) in layout.nodes.iter().enumerate() {
        let netns = add_netns(state, format!("{}-{name}", state.prefix))?;
        let ip = net::attach_node(&fabric, &netns, i + 1)?;
        state.nodes.push(NodeState {
            name: name.clone(),
            netns,
            ip,
            ztunnel: None,
        });
    }
    let indexed: Vec<(&str, usize)> = state
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.netns.as_str(), i + 1))
        .collect();
    net::route_between_nodes(&indexed)?;
    net::route_fabric_to_pods(&fabric, &indexed)?;
    // Each node hosts its pods as a Kubernetes node does: a CNI configuration of its own.
    for (i, node) in state.nodes.iter().enumerate() {
        net::prepare_cni_host(&node.netns)?;
        cni::write_conflist(
            &state.state_dir,
            &node.name,
            i + 1,
            &ztunnel_data_dir(state, &node.name),
        )?;
    }
    state.save()?;
    Ok(())
}

fn start_processes(
    run: &mut Running,
    bins: &Binaries,
    layout: &Layout,
    controllers: usize,
) -> Result<(), ClusterError> {
    let state = &mut run.state;
    let logs = state.state_dir.join("logs");
    // The first replica starts alone: it takes the leader lock and generates the root and
    // the node credentials; the others start as followers and load them.
    for i in 0..controllers.max(1) {
        let offset = CONTROLLER_PORT_STEP * u16::try_from(i).unwrap_or(0);
        let listen = SocketAddr::from((net::FABRIC_IP, CONTROLLER_PORT + offset));
        let ops = SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT + offset));
        let name = format!("controller-{i}");
        let (log, label) = if i == 0 {
            (logs.join("controller.log"), "controller".to_owned())
        } else {
            (logs.join(format!("{name}.log")), name.clone())
        };
        let (child, proc) = procs::spawn_in(
            &state.state_dir,
            &label,
            &state.fabric,
            &bins.controller,
            &[
                "--local-dir".into(),
                state.objects_dir.display().to_string(),
                "--listen".into(),
                listen.to_string(),
                "--ops-listen".into(),
                ops.to_string(),
                "--state-dir".into(),
                state.state_dir.display().to_string(),
                "--leader-identity".into(),
                name.clone(),
                "--nodes".into(),
                state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                "--log-format".into(),
                "json".into(),
            ]
            .into_iter()
            .chain(waypoint_credentials(layout))
            .collect::<Vec<_>>(),
            &log,
        )?;
        run.children.push(child);
        if i == 0 {
            state.controller = Some(proc.clone());
        } else {
            state.more_controllers.push(ControllerReplica {
                name,
                url: format!("https://{listen}"),
                ops,
                process: Some(proc.clone()),
            });
        }
        state.save()?;
        pods::wait_listening(&state.fabric, listen, &proc, "the controller")?;
    }

    for i in 0..state.nodes.len() {
        let node = state.nodes[i].clone();
        let log = logs.join(format!("ztunnel-{}.log", node.name));
        let args = ztunnel_args(state, &node.name);
        let label = format!("ztunnel-{}", node.name);
        let (child, proc) = procs::spawn_in(
            &state.state_dir,
            &label,
            &node.netns,
            &bins.ztunnel,
            &args,
            &log,
        )?;
        run.children.push(child);
        state.nodes[i].ztunnel = Some(proc);
        state.save()?;
    }

    // Pods only once every ztunnel serves its node: `ambit-cni` asks it whether a new pod is
    // in the mesh, and the pod's app starts captured.
    wait_ready(state);
    for pod in &layout.pods {
        pods::create_sandbox(state, pod)?;
    }
    // Waypoints first (clients' calls may go through them), then servers, listening, before
    // any client calls them, so the sample's first results mean something.
    for pass in [AppKind::Waypoint, AppKind::Server, AppKind::Client] {
        for i in 0..run.state.pods.len() {
            if pods::app_kind(&run.state.pods[i]) == Some(pass) {
                if let Some(child) =
                    pods::start_app(&mut run.state, i, &bins.ambitctl, &bins.waypoint)?
                {
                    run.children.push(child);
                }
            }
        }
    }
    Ok(())
}

/// `namespace/gateway` of every waypoint pod: also its service account, since a waypoint's
/// identity is named after its Gateway.
fn waypoint_gateways(layout: &Layout) -> impl Iterator<Item = &str> {
    layout.pods.iter().filter_map(|p| match &p.sample {
        Some(Sample::Waypoint { gateway }) => Some(gateway.as_str()),
        _ => None,
    })
}

/// The controller's flag issuing credentials for the waypoints' identities, if any.
fn waypoint_credentials(layout: &Layout) -> Vec<String> {
    let gateways: Vec<&str> = waypoint_gateways(layout).collect();
    if gateways.is_empty() {
        return Vec::new();
    }
    vec!["--waypoint-service-accounts".into(), gateways.join(",")]
}

/// One node directory per node: the local nodes share this machine's filesystem.
fn ztunnel_data_dir(state: &ClusterState, node: &str) -> PathBuf {
    state.state_dir.join("ztunnel").join(node)
}

/// The networks whose UDP the ztunnels capture: every node's pod subnets, both families
/// (10.77.k.0/24 and fd77:k::/64), so UDP between pods of the mesh is carried over
/// CONNECT-UDP like their TCP. Service VIPs are left out: the sample's services are TCP.
fn udp_networks(nodes: usize) -> Result<Vec<String>, NetError> {
    let mut networks = Vec::with_capacity(2 * nodes);
    for k in 1..=nodes {
        networks.push(net::pod_subnet(k)?);
        networks.push(net::pod_subnet6(k)?);
    }
    Ok(networks)
}

/// The flags of `node`'s ztunnel: the same for every process of the node, so a successor
/// finds its predecessor's hand-over socket and ports.
fn ztunnel_args(state: &ClusterState, node: &str) -> Vec<String> {
    // The controller is also the CA; the node credential is how it knows this ztunnel may
    // obtain certificates for this node's pods (and subscribe as this node).
    let credential = state
        .state_dir
        .join("credentials")
        .join(format!("{node}.token"));
    let mut args = vec![
        "--node".into(),
        node.to_owned(),
        // Every replica: a ztunnel whose replica goes away resumes with another.
        "--controller".into(),
        state.controller_urls(),
        "--ca-root-file".into(),
        state.root_cert.display().to_string(),
        "--credential-file".into(),
        credential.display().to_string(),
        "--netns-dir".into(),
        state.netns_dir.display().to_string(),
        "--data-dir".into(),
        ztunnel_data_dir(state, node).display().to_string(),
        "--log-format".into(),
        "json".into(),
        "--drain-seconds".into(),
        "1".into(),
    ];
    if !state.udp_capture.is_empty() {
        args.push("--udp-capture-cidrs".into());
        args.push(state.udp_capture.join(","));
    }
    args
}

/// Why `ambitctl upgrade` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// No node of that name.
    #[error("no node {node} in this cluster (nodes: {known})")]
    NoNode { node: String, known: String },
    /// The binary to run is not a file.
    #[error("{} is not a file", path.display())]
    Binary { path: PathBuf },
    /// Starting it failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Recording it failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// It exited before serving.
    #[error("the new ztunnel (pid {pid}) exited before it served; see {}", log.display())]
    Exited { pid: i32, log: PathBuf },
    /// It did not take over in time; it keeps trying, and the old one keeps serving.
    #[error(
        "the new ztunnel (pid {pid}) did not take over within {secs}s (the old one keeps \
         serving until it does); see {}",
        log.display()
    )]
    Timeout { pid: i32, secs: u64, log: PathBuf },
}

/// What `ambitctl upgrade` did.
#[derive(Debug)]
pub struct Upgraded {
    pub node: String,
    /// The ztunnel it replaced, if one was recorded and running.
    pub old_pid: Option<i32>,
    pub new_pid: i32,
    pub binary: PathBuf,
    /// From start to serving (it owns the hand-over socket and answers ready).
    pub took: Duration,
    pub log: PathBuf,
}

/// The inode of a node's hand-over socket: a new ztunnel renames its own into place only
/// once it serves everything and has told the old one to stop accepting.
fn handover_inode(state: &ClusterState, node: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(ztunnel_data_dir(state, node).join("handover.sock"))
        .ok()
        .map(|m| m.ino())
}

/// Replaces `node`'s ztunnel live: starts `binary` with the node's flags (and `extra`), which
/// takes the running one's listening sockets (or binds beside them), waits until it serves
/// (it owns the hand-over socket and answers ready), and records it. The old process stops
/// accepting and exits by itself once its open connections end.
pub fn upgrade(
    state: &mut ClusterState,
    node: &str,
    binary: &Path,
    extra: &[String],
) -> Result<Upgraded, UpgradeError> {
    let Some(i) = state.nodes.iter().position(|n| n.name == node) else {
        return Err(UpgradeError::NoNode {
            node: node.to_owned(),
            known: state
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if !binary.is_file() {
        return Err(UpgradeError::Binary {
            path: binary.to_owned(),
        });
    }
    let netns = state.nodes[i].netns.clone();
    let old_pid = state.nodes[i]
        .ztunnel
        .as_ref()
        .map(|p| p.pid)
        .filter(|p| procs::alive(*p));
    let before = handover_inode(state, node);
    let log = state
        .state_dir
        .join("logs")
        .join(format!("ztunnel-{node}.log"));
    let mut args = ztunnel_args(state, node);
    args.extend(extra.iter().cloned());
    let started = Instant::now();
    // The child runs in its own process group and outlives us; its parent becomes init.
    let (_child, proc) = procs::spawn_in(
        &state.state_dir,
        &format!("ztunnel-{node}"),
        &netns,
        binary,
        &args,
        &log,
    )?;
    let secs = 60;
    let deadline = started + Duration::from_secs(secs);
    let readiness = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_READINESS_PORT));
    loop {
        let owns_socket = handover_inode(state, node).is_some_and(|i| Some(i) != before);
        if owns_socket
            && matches!(
                admin::get(&netns, readiness, "/healthz/ready"),
                Ok((200, _))
            )
        {
            break;
        }
        if !procs::alive(proc.pid) {
            return Err(UpgradeError::Exited { pid: proc.pid, log });
        }
        if Instant::now() > deadline {
            return Err(UpgradeError::Timeout {
                pid: proc.pid,
                secs,
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    state.nodes[i].ztunnel = Some(proc.clone());
    state.save()?;
    Ok(Upgraded {
        node: node.to_owned(),
        old_pid,
        new_pid: proc.pid,
        binary: binary.to_owned(),
        took,
        log,
    })
}

/// Waits (bounded) for each ztunnel's readiness; reports, never fails: a user learns more
/// from a running mesh and its logs than from an aborted start.
fn wait_ready(state: &ClusterState) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_READINESS_PORT));
    for node in &state.nodes {
        loop {
            if matches!(
                admin::get(&node.netns, addr, "/healthz/ready"),
                Ok((200, _))
            ) {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "ambitctl: ztunnel on {} is not ready yet; see {}",
                    node.name,
                    node.ztunnel
                        .as_ref()
                        .map_or_else(String::new, |z| z.log.display().to_string())
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// What [`down`] did.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Processes stopped (SIGTERM, or SIGKILL when they did not exit in time).
    pub stopped: Vec<(String, i32)>,
    pub killed: Vec<i32>,
    pub namespaces: Vec<String>,
    /// Pods whose CNI DEL ran (`namespace/name`).
    pub released: Vec<String>,
    pub removed: Vec<PathBuf>,
    /// What could not be undone, in words.
    pub problems: Vec<String>,
}

/// Removes everything a cluster with this state dir and namespace prefix made: processes
/// (recorded, in pidfiles, or found inside our namespaces), namespaces named `<prefix>-*`
/// (their links, routes and iptables rules go with them), and the state dir's files. Never
/// fails: it does all it can and reports the rest.
pub fn down(state_dir: &Path, prefix: &str) -> DownReport {
    let mut report = DownReport::default();
    let state = ClusterState::load(state_dir).ok();
    let prefix = state
        .as_ref()
        .map_or(prefix, |s| s.prefix.as_str())
        .to_owned();
    let mut namespaces: Vec<String> = state
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    match net::list_netns() {
        Ok(all) => {
            for n in all {
                if n.starts_with(&format!("{prefix}-")) && !namespaces.contains(&n) {
                    namespaces.push(n);
                }
            }
            // Only what exists (a record may name namespaces a crash never made).
            let existing: Vec<String> = net::list_netns().unwrap_or_default();
            namespaces.retain(|n| existing.contains(n));
        }
        Err(e) => report.problems.push(format!("listing namespaces: {e}")),
    }

    let mut pids: Vec<(String, i32)> = Vec::new();
    if let Some(s) = &state {
        let recorded = s
            .controller_procs()
            .into_iter()
            .chain(s.nodes.iter().filter_map(|n| {
                n.ztunnel
                    .as_ref()
                    .map(|p| (format!("ztunnel {}", n.name), p))
            }))
            .chain(s.pods.iter().filter_map(|p| {
                p.process
                    .as_ref()
                    .map(|pr| (format!("sample {}/{}", p.namespace, p.name), pr))
            }));
        pids.extend(recorded.map(|(l, p)| (l, p.pid)));
    }
    pids.extend(procs::recorded_pids(state_dir));
    pids.retain(|(_, pid)| procs::ours(*pid));
    for ns in &namespaces {
        for pid in net::netns_pids(ns).unwrap_or_default() {
            pids.push((format!("process in {ns}"), pid));
        }
    }
    pids.sort_by_key(|(_, p)| *p);
    pids.dedup_by_key(|(_, p)| *p);
    let all: Vec<i32> = pids.iter().map(|(_, p)| *p).collect();
    report.killed = procs::stop_all(&all, Duration::from_secs(5));
    report.stopped = pids;

    // As a node does for each pod it removes: DEL through its CNI chain (capture rules, veth,
    // addresses) before its namespace goes. Without a record (a crash), deleting the
    // namespaces and the state dir releases the same.
    if let Some(s) = state.as_ref().filter(|s| !s.cni_path.is_empty()) {
        for pod in s.pods.iter().filter(|p| namespaces.contains(&p.netns)) {
            match pods::release(s, pod) {
                Ok(()) => report
                    .released
                    .push(format!("{}/{}", pod.namespace, pod.name)),
                Err(e) => report.problems.push(format!(
                    "CNI DEL of pod {}/{}: {e}",
                    pod.namespace, pod.name
                )),
            }
        }
    }

    // Reverse creation order: pods, then nodes, then the fabric.
    for ns in namespaces.iter().rev() {
        match net::del_netns(ns) {
            Ok(()) => report.namespaces.push(ns.clone()),
            Err(e) => report.problems.push(e.to_string()),
        }
    }

    let objects_ours = state.as_ref().is_none_or(|s| s.objects_are_ours);
    let mut entries = vec![
        "cluster.json",
        "cluster.json.tmp",
        "pids",
        "logs",
        "netns",
        "ca",
        "credentials",
        "examples",
        "ztunnel",
        "cni",
        // The controllers' leader election (lock file and leader record).
        ambit_controller::leader::LOCK_FILE,
        ambit_controller::leader::RECORD_FILE,
    ];
    if objects_ours {
        entries.push("objects");
    }
    for entry in entries {
        let path = state_dir.join(entry);
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => report.removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report
                .problems
                .push(format!("removing {}: {e}", path.display())),
        }
    }
    // Only if empty: a --state-dir may hold things that are not ours.
    if std::fs::remove_dir(state_dir).is_ok() {
        report.removed.push(state_dir.to_owned());
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ztunnels_capture_the_udp_of_every_nodes_pod_subnets_in_both_families() {
        let nets = udp_networks(2).unwrap();
        assert_eq!(
            nets,
            ["10.77.1.0/24", "fd77:1::/64", "10.77.2.0/24", "fd77:2::/64"]
        );
        // A record written before UDP capture existed: its ztunnels (and successors) get no
        // flag, so an upgrade keeps the rules they run with.
        let old = serde_json::json!({
            "prefix": "t", "state_dir": "/s", "objects_dir": "/o", "objects_are_ours": true,
            "netns_dir": "/n", "namespaces": [], "fabric": "t-fabric",
            "controller_url": "https://10.77.0.1:15012", "controller": null,
            "nodes": [], "pods": [], "root_cert": "/s/ca/root-cert.pem",
        });
        let mut state: ClusterState = serde_json::from_value(old).unwrap();
        assert!(!ztunnel_args(&state, "node1").contains(&"--udp-capture-cidrs".to_owned()));
        state.udp_capture = nets;
        let args = ztunnel_args(&state, "node1");
        let at = args
            .iter()
            .position(|a| a == "--udp-capture-cidrs")
            .unwrap();
        assert_eq!(
            args[at + 1],
            "10.77.1.0/24,fd77:1::/64,10.77.2.0/24,fd77:2::/64"
        );
    }

    #[test]
    fn a_missing_binary_names_its_path_and_the_build_command() {
        let err = ClusterError::Binary {
            name: "ztunnel",
            path: PathBuf::from("/src/target/release/ztunnel"),
        };
        let text = err.to_string();
        assert!(
            text.contains("ztunnel not found at /src/target/release/ztunnel"),
            "{text}"
        );
        assert!(
            text.contains(
                "cargo build -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni --release"
            ),
            "{text}"
        );
    }
}
