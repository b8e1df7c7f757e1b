//! The controller at scale: the real `ambit-controller` binary in local mode, fed a
//! generated folder of YAML (by default 10,000 pods on 100 nodes in 50 namespaces, 1,000
//! services of ~10 pods, namespace-wide, selector and mesh-wide AuthorizationPolicies),
//! serving 100 ztunnel subscribers that live in this process. Each subscriber is what a
//! node's ztunnel is on the wire: its own TLS connection to 15012 (the controller's SPIFFE
//! identity checked against the mesh root), its node's credential from
//! `<state-dir>/credentials/`, a `Hello` for its node. It applies pushes minimally (keeps
//! the set of resource keys, the version) and ACKs each one at once, so the figures are
//! the controller's, not a slow proxy's.
//!
//! What it measures and how to read it:
//! - time to full state: from spawning the controller to each subscriber's ACK of its
//!   first (full-state) push, p50/p99/max over subscribers. It includes process start,
//!   the CA, reading and parsing the folder, deriving the model and 100 full pushes.
//! - propagation under churn: pods added, removed and relabelled, and a policy changed
//!   every few seconds, written to the folder at a fixed rate (write-then-rename, as
//!   tools do). Each change carries a marker (a label value, a policy principal, or the
//!   removed pod's uid); the latency of a change is from the rename that put it on disk to
//!   the ACK of the *last* subscriber that had to receive it: p50/p99/max over changes.
//!   It includes the local source's debounce (10 ms) and its reading of the changed file.
//! - controller CPU over the churn period (utime+stime from `/proc/<pid>/stat` → cores),
//!   RSS at rest (after the full state, before churn) and peak (sampled VmRSS, and VmHWM),
//!   pushes per second and protobuf bytes pushed (summed over subscribers; TLS and HTTP/2
//!   framing not included).
//! - this process's own CPU, because on a small machine the 100 subscribers compete with
//!   the controller for the same cores: read the controller's figures with that in mind.
//!
//! A measurement, not a test: nothing asserts on timing. Build the controller first in
//! the same profile:
//! `cargo build --release -p ambit-controller && cargo run --release -p ambit-bench --bin controller_scale`
//! (`--quick` for a small run; every size is a flag).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_bench::{proc_cpu_seconds, proc_status_kib, Samples};
use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{
    resource, string_match, subscribe_request, Ack, Authorization, Hello, ProxyKind, Push,
    ResourceKind, SubscribeRequest,
};
use ambit_testing::free_port;
use anyhow::{bail, Context};
use clap::Parser;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

#[derive(Parser, Debug)]
struct Args {
    /// A small run (1,000 pods, 100 services, 10 nodes, 10 namespaces, 10 s of churn);
    /// explicit flags still win.
    #[arg(long)]
    quick: bool,
    /// Pods in the generated mesh.
    #[arg(long)]
    pods: Option<usize>,
    /// Services, each selecting about pods/services pods.
    #[arg(long)]
    services: Option<usize>,
    /// Nodes, one subscriber (ztunnel) each.
    #[arg(long)]
    nodes: Option<usize>,
    /// Namespaces; every tenth one is not enrolled in the mesh.
    #[arg(long)]
    namespaces: Option<usize>,
    /// How long changes are written.
    #[arg(long)]
    churn_seconds: Option<u64>,
    /// Changes per second (pod add / remove / relabel in turn, plus a policy change every
    /// `--policy-every-seconds`).
    #[arg(long)]
    changes_per_second: Option<f64>,
    /// File writes per second the changes are grouped into. The local source reads the
    /// files a burst of writes touched once it has been quiet for 10 ms (at most 1 s after
    /// the burst began), so at more than ~100 writes/s changes wait for that cap; the
    /// default is the rate the figures in the controller's ARCHITECTURE.md were taken at.
    #[arg(long, default_value_t = 4.0)]
    writes_per_second: f64,
    /// Seconds between policy changes.
    #[arg(long, default_value_t = 3.0)]
    policy_every_seconds: f64,
    /// How long to wait after churn for the last changes to reach every subscriber.
    #[arg(long, default_value_t = 20)]
    grace_seconds: u64,
    /// The controller binary (default: `ambit-controller` beside this binary).
    #[arg(long)]
    controller: Option<PathBuf>,
}

/// The sizes of one run, after `--quick` and explicit flags.
#[derive(Clone, Debug)]
struct Config {
    pods: usize,
    services: usize,
    nodes: usize,
    namespaces: usize,
    churn: Duration,
    changes_per_second: f64,
    writes_per_second: f64,
    policy_every: Duration,
    grace: Duration,
}

impl Config {
    fn from_args(a: &Args) -> anyhow::Result<Config> {
        let (pods, services, nodes, namespaces, churn, cps) = if a.quick {
            (1_000, 100, 10, 10, 10, 10.0)
        } else {
            (10_000, 1_000, 100, 50, 30, 20.0)
        };
        let c = Config {
            pods: a.pods.unwrap_or(pods),
            services: a.services.unwrap_or(services),
            nodes: a.nodes.unwrap_or(nodes),
            namespaces: a.namespaces.unwrap_or(namespaces),
            churn: Duration::from_secs(a.churn_seconds.unwrap_or(churn)),
            changes_per_second: a.changes_per_second.unwrap_or(cps),
            writes_per_second: a.writes_per_second,
            policy_every: Duration::from_secs_f64(a.policy_every_seconds.max(0.1)),
            grace: Duration::from_secs(a.grace_seconds),
        };
        if c.nodes == 0 || c.namespaces == 0 || c.services == 0 || c.pods < c.services {
            bail!("need at least one node, namespace and service, and pods >= services");
        }
        if c.nodes > 1000 || c.pods > 1_000_000 {
            bail!("at most 1,000 nodes and 1,000,000 pods (node names and 10.x addresses)");
        }
        if c.writes_per_second <= 0.0 || c.changes_per_second < 0.0 {
            bail!("--writes-per-second must be positive, --changes-per-second not negative");
        }
        Ok(c)
    }
}

// ---- the generated mesh -----------------------------------------------------------

/// The label that carries a change's sequence number to the subscribers.
const CHANGE_LABEL: &str = "bench.ambit.dev/change";
/// The mesh-wide policies' namespace (the controller's default root namespace).
const ROOT_NS: &str = "ambit-system";

struct PodRec {
    name: String,
    node: usize,
    /// Index of the service whose selector matches it.
    app: usize,
    ip: String,
    /// Sequence number of the change that added or relabelled it.
    change: Option<u64>,
    /// Added during churn (never picked for removal or relabelling, so a marker is never
    /// undone by a later change before it is pushed).
    churned: bool,
}

/// The objects folder's content, kept in memory so a change rewrites one file.
struct Mesh {
    cfg: Config,
    /// Pods per namespace index.
    pods: Vec<Vec<PodRec>>,
    /// Namespace index of each service.
    service_ns: Vec<usize>,
    /// Per enrolled namespace: the change that last rewrote its namespace-wide policy.
    policy_change: Vec<Option<u64>>,
    next_pod: usize,
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:02}")
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn enrolled(ns: usize) -> bool {
    ns % 10 != 9
}

/// A unique 10.x address for pod number `n` (data only: nothing is ever routed to it).
fn pod_ip(n: usize) -> String {
    let n = n + 1;
    format!("10.{}.{}.{}", (n >> 16) & 0x3f, (n >> 8) & 0xff, n & 0xff)
}

impl Mesh {
    fn new(cfg: Config) -> Mesh {
        let (p, s, n) = (cfg.pods, cfg.services, cfg.namespaces);
        // Namespaces and services are contiguous blocks of pods, and pod i runs on node
        // i % nodes: every namespace spans every node (given pods/namespaces >= nodes),
        // as in a cluster where the scheduler spreads each deployment.
        let mut pods: Vec<Vec<PodRec>> = (0..n).map(|_| Vec::new()).collect();
        for i in 0..p {
            pods[i * n / p].push(PodRec {
                name: format!("pod-{i}"),
                node: i % cfg.nodes,
                app: i * s / p,
                ip: pod_ip(i),
                change: None,
                churned: false,
            });
        }
        let service_ns = (0..s).map(|j| (j * p / s) * n / p).collect();
        Mesh {
            policy_change: vec![None; n],
            next_pod: p,
            cfg,
            pods,
            service_ns,
        }
    }

    fn namespaces_yaml(&self) -> String {
        let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ROOT_NS}\n");
        for ns in 0..self.cfg.namespaces {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
                ns_name(ns)
            );
            if enrolled(ns) {
                out.push_str("  labels:\n    ambit.dev/dataplane-mode: ambient\n");
            }
        }
        out
    }

    fn pods_yaml(&self, ns: usize) -> String {
        let mut out = String::with_capacity(self.pods[ns].len() * 400);
        for pod in &self.pods[ns] {
            let change = pod
                .change
                .map(|c| format!(", {CHANGE_LABEL}: \"{c}\""))
                .unwrap_or_default();
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {name}\n  labels: {{app: svc-{app}, version: v1{change}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: svc-{app}\n  containers:\n  - name: app\n    image: registry.example/app:1\n    ports: [{{containerPort: 8080}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n",
                name = pod.name,
                ns = ns_name(ns),
                app = pod.app,
                node = node_name(pod.node),
                ip = pod.ip,
            );
        }
        out
    }

    fn services_yaml(&self) -> String {
        let mut out = String::new();
        for (j, ns) in self.service_ns.iter().enumerate() {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{j}\n  namespace: {ns}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: svc-{j}}}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n",
                (j >> 8) & 0xff,
                j & 0xff,
                ns = ns_name(*ns),
            );
        }
        out
    }

    fn policies_yaml(&self) -> String {
        // Mesh-wide: deny a documentation range, as operators block known-bad sources.
        let mut out = format!(
            "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-blocked\n  namespace: {ROOT_NS}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [192.0.2.0/24]\n"
        );
        for ns in (0..self.cfg.namespaces).filter(|n| enrolled(*n)) {
            let name = ns_name(ns);
            // Namespace-wide: the namespace itself and the root namespace may call in; a
            // change names a new principal, which is its marker.
            let principal = match self.policy_change[ns] {
                Some(c) => format!("cluster.local/ns/{name}/sa/change-{c}"),
                None => format!("cluster.local/ns/{name}/sa/default"),
            };
            let _ = write!(
                out,
                "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-namespace\n  namespace: {name}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [{name}, {ROOT_NS}]\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
            );
            // Selector-scoped: the first two services of the namespace admit only the
            // service accounts of their neighbours, on the target port.
            let svcs = self
                .service_ns
                .iter()
                .enumerate()
                .filter(|(_, n)| **n == ns);
            for (j, _) in svcs.take(2) {
                let _ = write!(
                    out,
                    "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-svc-{j}\n  namespace: {name}\nspec:\n  selector:\n    matchLabels: {{app: svc-{j}}}\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{name}/sa/svc-{}\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
                    j + 1
                );
            }
        }
        out
    }

    /// Writes every file of the folder; returns their number and total size.
    fn write_all(&self, dir: &Path) -> anyhow::Result<(usize, u64)> {
        std::fs::create_dir_all(dir.join("workloads"))?;
        let mut files = vec![
            ("namespaces.yaml".to_string(), self.namespaces_yaml()),
            ("services.yaml".to_string(), self.services_yaml()),
            ("policies.yaml".to_string(), self.policies_yaml()),
        ];
        for ns in 0..self.cfg.namespaces {
            files.push((Self::pods_file(ns), self.pods_yaml(ns)));
        }
        let mut bytes = 0;
        for (name, text) in &files {
            bytes += text.len() as u64;
            write_file(dir, name, text)?;
        }
        Ok((files.len(), bytes))
    }

    fn pods_file(ns: usize) -> String {
        format!("workloads/{}.yaml", ns_name(ns))
    }

    /// Nodes with a pod in namespace `ns` (the ztunnels a namespace-wide policy goes to).
    fn nodes_in(&self, ns: usize) -> usize {
        self.pods[ns]
            .iter()
            .map(|p| p.node)
            .collect::<HashSet<_>>()
            .len()
    }
}

/// Write-then-rename, as editors and deploy tools do: the controller never reads half a
/// file. The temporary name is hidden, which the local source skips.
fn write_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

// ---- churn -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ChangeKind {
    PodAdd,
    PodRemove,
    PodRelabel,
    Policy,
}

impl ChangeKind {
    fn name(self) -> &'static str {
        match self {
            ChangeKind::PodAdd => "pod added",
            ChangeKind::PodRemove => "pod removed",
            ChangeKind::PodRelabel => "pod relabelled",
            ChangeKind::Policy => "policy changed",
        }
    }
}

/// One change as written.
struct Change {
    seq: u64,
    kind: ChangeKind,
    /// When the rename that put it on disk returned.
    written: Instant,
    /// Subscribers that must receive it.
    expected: usize,
}

/// Uids of removed pods by the change that removed them: a removal's marker.
type Removed = Arc<Mutex<HashMap<String, u64>>>;

/// What the subscribers have reached so far, for the run to know when to move on.
#[derive(Default)]
struct Progress {
    /// Subscribers that ACKed their full state.
    full: std::sync::atomic::AtomicUsize,
    /// Subscribers that failed.
    failed: std::sync::atomic::AtomicUsize,
    /// Per change: subscribers that ACKed a push carrying it.
    delivered: Mutex<HashMap<u64, usize>>,
}

impl Mesh {
    /// Applies change `seq` in memory; returns its kind, the file it touches, and how many
    /// subscribers must receive it. `None` when there is nothing left to change.
    fn change(
        &mut self,
        seq: u64,
        policy: bool,
        removed: &Removed,
    ) -> Option<(ChangeKind, String, usize)> {
        let n = self.cfg.namespaces;
        if policy {
            let enrolled_ns: Vec<usize> = (0..n).filter(|x| enrolled(*x)).collect();
            let ns = *enrolled_ns.get(seq as usize % enrolled_ns.len().max(1))?;
            self.policy_change[ns] = Some(seq);
            return Some((
                ChangeKind::Policy,
                "policies.yaml".into(),
                self.nodes_in(ns),
            ));
        }
        // Rotate namespaces so no file is rewritten twice in a row.
        let ns = (seq as usize / 3) % n;
        let all = self.cfg.nodes;
        let kind = match seq % 3 {
            0 => {
                let app = self.pods[ns].first()?.app;
                let i = self.next_pod;
                self.next_pod += 1;
                self.pods[ns].push(PodRec {
                    name: format!("churn-{seq}"),
                    node: i % all,
                    app,
                    ip: pod_ip(i),
                    change: Some(seq),
                    churned: true,
                });
                ChangeKind::PodAdd
            }
            1 => {
                // From the back: relabelling takes from the front, so a pod is never
                // relabelled and removed in one coalesced push.
                let pos = self.pods[ns]
                    .iter()
                    .rposition(|p| !p.churned && p.change.is_none())?;
                let pod = self.pods[ns].remove(pos);
                if let Ok(mut r) = removed.lock() {
                    r.insert(pod.name, seq);
                }
                ChangeKind::PodRemove
            }
            _ => {
                let pod = self.pods[ns]
                    .iter_mut()
                    .find(|p| !p.churned && p.change.is_none())?;
                pod.change = Some(seq);
                ChangeKind::PodRelabel
            }
        };
        // Every ztunnel receives every workload.
        Some((kind, Self::pods_file(ns), all))
    }
}

/// Writes changes at a fixed rate until `duration` has passed (runs on its own thread:
/// file writes block).
fn churn(mesh: &mut Mesh, dir: &Path, removed: &Removed) -> anyhow::Result<Vec<Change>> {
    let cfg = mesh.cfg.clone();
    let tick = Duration::from_secs_f64(1.0 / cfg.writes_per_second);
    let per_write = cfg.changes_per_second / cfg.writes_per_second;
    let start = Instant::now();
    let mut next_policy = start + cfg.policy_every;
    let mut owed = 0.0;
    let mut seq = 0u64;
    let mut changes = Vec::new();
    let mut next = start;
    while next < start + cfg.churn {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += tick;
        owed += per_write;
        // The changes of this write, by the file each touches.
        let mut touched: BTreeMap<String, Vec<(u64, ChangeKind, usize)>> = BTreeMap::new();
        while owed >= 1.0 {
            owed -= 1.0;
            let policy = Instant::now() >= next_policy;
            if policy {
                next_policy += cfg.policy_every;
            }
            seq += 1;
            if let Some((kind, file, expected)) = mesh.change(seq, policy, removed) {
                touched.entry(file).or_default().push((seq, kind, expected));
            }
        }
        for (file, list) in touched {
            let text = if file == "policies.yaml" {
                mesh.policies_yaml()
            } else {
                let ns = list
                    .first()
                    .map(|(s, _, _)| (*s as usize / 3) % cfg.namespaces)
                    .context("empty change list")?;
                mesh.pods_yaml(ns)
            };
            write_file(dir, &file, &text)?;
            let written = Instant::now();
            changes.extend(list.into_iter().map(|(seq, kind, expected)| Change {
                seq,
                kind,
                written,
                expected,
            }));
        }
    }
    Ok(changes)
}

// ---- subscribers ---------------------------------------------------------------------

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    node: String,
    /// When the first (full-state) push was ACKed.
    full_state: Option<Instant>,
    /// Resources in the full state, by kind: workloads, services, authorizations.
    full_counts: [usize; 3],
    /// Resources held at the end.
    held: usize,
    version: u64,
    /// Each push: when it was ACKed, its protobuf size.
    pushes: Vec<(Instant, usize)>,
    /// Each change's marker: when the push carrying it was ACKed.
    markers: HashMap<u64, Instant>,
    error: Option<String>,
}

/// The change sequence number a policy carries in a principal, if any.
fn policy_marker(a: &Authorization) -> Option<u64> {
    a.rules
        .iter()
        .flat_map(|r| &r.from)
        .flat_map(|s| &s.principals)
        .find_map(|m| match &m.r#match {
            Some(string_match::Match::Exact(p)) => p.rsplit_once("/sa/change-")?.1.parse().ok(),
            _ => None,
        })
}

/// Applies a push to `held` (resource keys) and returns the change markers it carries.
fn apply(
    push: &Push,
    held: &mut HashSet<(i32, String)>,
    removed: &Removed,
    counts: &mut [usize; 3],
) -> Vec<u64> {
    if push.full_state {
        held.clear();
    }
    let mut markers = Vec::new();
    for r in &push.upserts {
        let key = match &r.kind {
            Some(resource::Kind::Workload(w)) => {
                counts[0] += 1;
                if let Some(c) = w.labels.get(CHANGE_LABEL).and_then(|v| v.parse().ok()) {
                    markers.push(c);
                }
                (ResourceKind::Workload as i32, w.uid.clone())
            }
            Some(resource::Kind::Service(s)) => {
                counts[1] += 1;
                (
                    ResourceKind::Service as i32,
                    format!("{}/{}", s.namespace, s.hostname),
                )
            }
            Some(resource::Kind::Authorization(a)) => {
                counts[2] += 1;
                markers.extend(policy_marker(a));
                (
                    ResourceKind::Authorization as i32,
                    format!("{}/{}", a.namespace, a.name),
                )
            }
            Some(resource::Kind::Route(x)) => (
                ResourceKind::Route as i32,
                format!("{}/{}", x.namespace, x.name),
            ),
            Some(resource::Kind::TrafficPolicy(x)) => (
                ResourceKind::TrafficPolicy as i32,
                format!("{}/{}", x.namespace, x.name),
            ),
            Some(resource::Kind::PeerAuthentication(x)) => (
                ResourceKind::PeerAuthentication as i32,
                format!("{}/{}", x.namespace, x.name),
            ),
            Some(resource::Kind::RequestAuthentication(x)) => (
                ResourceKind::RequestAuthentication as i32,
                format!("{}/{}", x.namespace, x.name),
            ),
            Some(resource::Kind::ExternalService(x)) => (
                ResourceKind::ExternalService as i32,
                format!("{}/{}", x.namespace, x.name),
            ),
            None => continue,
        };
        held.insert(key);
    }
    if !push.removals.is_empty() {
        let removed = removed.lock().ok();
        for k in &push.removals {
            if k.kind == ResourceKind::Workload as i32 {
                markers.extend(removed.as_ref().and_then(|r| r.get(&k.name)).copied());
            }
            held.remove(&(k.kind, k.name.clone()));
        }
    }
    markers
}

/// One ztunnel's discovery stream: subscribe as `node`, apply and ACK every push until
/// `stop`.
async fn subscriber(
    node: String,
    channel: tonic::transport::Channel,
    token: String,
    removed: Removed,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen {
        node: node.clone(),
        ..Seen::default()
    };
    if let Err(e) = subscribe_loop(
        &node, channel, &token, &removed, &progress, &mut stop, &mut seen,
    )
    .await
    {
        progress.failed.fetch_add(1, Ordering::Relaxed);
        seen.error = Some(format!("{e:#}"));
    }
    seen
}

async fn subscribe_loop(
    node: &str,
    channel: tonic::transport::Channel,
    token: &str,
    removed: &Removed,
    progress: &Progress,
    stop: &mut watch::Receiver<bool>,
    seen: &mut Seen,
) -> anyhow::Result<()> {
    // A full state of a big mesh is larger than tonic's 4 MiB default.
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(usize::MAX);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (acks, mut pushes) = loop {
        let (tx, rx) = mpsc::channel(4);
        tx.send(SubscribeRequest {
            message: Some(subscribe_request::Message::Hello(Hello {
                kind: ProxyKind::Ztunnel as i32,
                node: node.to_string(),
                ..Hello::default()
            })),
        })
        .await?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        match client.subscribe(request).await {
            Ok(r) => break (tx, r.into_inner()),
            // Not listening yet: the controller is still starting.
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => bail!("subscribing: {s}"),
        }
    };
    let mut held = HashSet::new();
    loop {
        let push = tokio::select! {
            p = pushes.message() => match p? {
                Some(p) => p,
                None => bail!("the controller ended the stream"),
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut counts = [0; 3];
        let markers = apply(&push, &mut held, removed, &mut counts);
        acks.send(SubscribeRequest {
            message: Some(subscribe_request::Message::Ack(Ack {
                nonce: push.nonce.clone(),
            })),
        })
        .await?;
        let acked = Instant::now();
        if push.full_state && seen.full_state.is_none() {
            seen.full_state = Some(acked);
            seen.full_counts = counts;
            progress.full.fetch_add(1, Ordering::Relaxed);
        }
        seen.version = seen.version.max(push.version);
        seen.pushes.push((acked, push.encoded_len()));
        let mut first = Vec::new();
        for m in markers {
            if let std::collections::hash_map::Entry::Vacant(e) = seen.markers.entry(m) {
                e.insert(acked);
                first.push(m);
            }
        }
        if !first.is_empty() {
            if let Ok(mut d) = progress.delivered.lock() {
                for m in first {
                    *d.entry(m).or_default() += 1;
                }
            }
        }
    }
    seen.held = held.len();
    Ok(())
}

// ---- the controller process ------------------------------------------------------------

/// The controller child process; killed when dropped, also on an early error.
struct Controller {
    child: std::process::Child,
    log: PathBuf,
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of its log, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails with the log's tail when the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "ambit-controller exited ({status}); its log ends with:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 20 ms until it holds, the controller dies, or `limit` passes.
async fn wait_for<T>(
    what: &str,
    controller: &mut Controller,
    limit: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        controller.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{what}: not within {limit:?}; the controller's log ends with:\n{}",
                controller.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the run ---------------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::from_args(&args)?;
    let bin = ambit_bench::binary(
        "--controller",
        args.controller.as_deref(),
        "ambit-controller",
        "cargo build --release -p ambit-controller",
    )?;
    // Two workers: the subscribers should not be the bottleneck, but on a small machine
    // they share the cores with the controller (their CPU is reported).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(cfg, bin))
}

async fn run(cfg: Config, bin: PathBuf) -> anyhow::Result<()> {
    let objects = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut mesh = Mesh::new(cfg.clone());
    let (files, bytes) = mesh.write_all(objects.path())?;
    let policies = mesh
        .policies_yaml()
        .matches("kind: AuthorizationPolicy")
        .count();
    println!(
        "mesh: {} pods on {} nodes, {} namespaces ({} enrolled), {} services, {} authorization policies; {files} files, {:.1} MB of YAML",
        cfg.pods,
        cfg.nodes,
        cfg.namespaces,
        (0..cfg.namespaces).filter(|n| enrolled(*n)).count(),
        cfg.services,
        policies,
        bytes as f64 / 1e6,
    );

    let nodes: Vec<String> = (0..cfg.nodes).map(node_name).collect();
    let listen = format!("127.0.0.1:{}", free_port()?);
    let ops = format!("127.0.0.1:{}", free_port()?);
    let log = state.path().join("controller.log");
    let started = Instant::now();
    let mut controller = Controller {
        child: Command::new(&bin)
            .args(["--local-dir"])
            .arg(objects.path())
            .args(["--listen", &listen, "--ops-listen", &ops, "--state-dir"])
            .arg(state.path().join("state"))
            .args(["--nodes", &nodes.join(","), "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
        log,
    };
    let pid = controller.pid();

    // The controller writes the mesh root and fresh node credentials before it listens.
    let state_dir = state.path().join("state");
    let root = wait_for(
        "mesh root",
        &mut controller,
        Duration::from_secs(30),
        || std::fs::read_to_string(state_dir.join("ca/root-cert.pem")).ok(),
    )
    .await?;
    let last_token = state_dir.join(format!("credentials/{}.token", nodes[nodes.len() - 1]));
    wait_for(
        "node credentials",
        &mut controller,
        Duration::from_secs(30),
        || last_token.is_file().then_some(()),
    )
    .await?;
    let identity: ambit_hbone::Identity =
        format!("spiffe://cluster.local/ns/{ROOT_NS}/sa/ambit-controller").parse()?;
    let tls = ambit_hbone::control::client_config(&root, &identity)?;

    let removed: Removed = Arc::default();
    let progress: Arc<Progress> = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let mut subscribers = Vec::new();
    for node in &nodes {
        let token = std::fs::read_to_string(state_dir.join(format!("credentials/{node}.token")))
            .with_context(|| format!("reading {node}'s credential"))?;
        // Its own channel, so its own TLS connection, as each node's ztunnel has.
        let channel = ambit_hbone::control::channel_with_config(&listen, tls.clone())?;
        subscribers.push(tokio::spawn(subscriber(
            node.clone(),
            channel,
            token.trim().to_string(),
            removed.clone(),
            progress.clone(),
            stop.clone(),
        )));
    }

    // Time to full state: the subscribers record it; here we only wait for it.
    let all_full = wait_for(
        "full state at every subscriber",
        &mut controller,
        Duration::from_secs(150),
        || {
            let done =
                progress.full.load(Ordering::Relaxed) + progress.failed.load(Ordering::Relaxed);
            (done >= cfg.nodes).then_some(())
        },
    )
    .await;
    let full_wait = started.elapsed();
    if let Err(e) = &all_full {
        eprintln!("warning: not every subscriber reached full state: {e:#}");
    }
    // Let allocations settle before measuring memory at rest.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_rest = proc_status_kib(pid, "VmRSS")?;
    let hwm_start = proc_status_kib(pid, "VmHWM")?;
    let cpu_start = proc_cpu_seconds(pid)?;

    // Churn: changes written from a blocking thread; RSS sampled meanwhile.
    println!(
        "full state reached in {}; churning for {:?} at {} changes/s in {} writes/s...",
        ms(full_wait),
        cfg.churn,
        cfg.changes_per_second,
        cfg.writes_per_second
    );
    let churn_started = Instant::now();
    let self_cpu_start = proc_cpu_seconds(std::process::id())?;
    let dir = objects.path().to_path_buf();
    let removed_w = removed.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let changes = churn(&mut mesh, &dir, &removed_w);
        (mesh, changes)
    });
    let mut rss_peak = rss_rest;
    let (mesh, changes) = {
        let mut writer = writer;
        loop {
            tokio::select! {
                r = &mut writer => break r?,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    rss_peak = rss_peak.max(proc_status_kib(pid, "VmRSS")?);
                }
            }
        }
    };
    let changes = changes?;
    let churn_written = churn_started.elapsed();
    // Give the last changes time to reach every subscriber that must receive them.
    let settled = wait_for("every change delivered", &mut controller, cfg.grace, || {
        rss_peak = rss_peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
        let d = progress.delivered.lock().ok()?;
        changes
            .iter()
            .all(|c| d.get(&c.seq).copied().unwrap_or(0) >= c.expected)
            .then_some(())
    })
    .await;
    let churn_period = churn_started.elapsed();
    let cpu_churn = proc_cpu_seconds(pid)? - cpu_start;
    let self_cpu = proc_cpu_seconds(std::process::id())? - self_cpu_start;
    let hwm = proc_status_kib(pid, "VmHWM")?;
    rss_peak = rss_peak.max(proc_status_kib(pid, "VmRSS")?);
    drop(mesh);

    let _ = stop_tx.send(true);
    let mut seen = Vec::new();
    for s in subscribers {
        seen.push(s.await?);
    }
    drop(controller);

    report(&Report {
        cfg: &cfg,
        started,
        seen: &seen,
        changes: &changes,
        churn_started,
        churn_written,
        churn_period,
        settled: settled.err().map(|e| format!("{e:#}")),
        cpu_churn,
        self_cpu,
        rss_rest,
        rss_peak,
        hwm_start,
        hwm,
    });
    Ok(())
}

// ---- the report ----------------------------------------------------------------------------

struct Report<'a> {
    cfg: &'a Config,
    started: Instant,
    seen: &'a [Seen],
    changes: &'a [Change],
    churn_started: Instant,
    churn_written: Duration,
    churn_period: Duration,
    /// Why not every change reached every subscriber, if so.
    settled: Option<String>,
    cpu_churn: f64,
    self_cpu: f64,
    rss_rest: u64,
    rss_peak: u64,
    hwm_start: u64,
    hwm: u64,
}

fn report(r: &Report<'_>) {
    let cfg = r.cfg;
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));

    let failed: Vec<&Seen> = r.seen.iter().filter(|s| s.error.is_some()).collect();
    let mut full = Samples::with_capacity(r.seen.len());
    for s in r.seen {
        if let Some(t) = s.full_state {
            full.record(t - r.started);
        }
    }
    row(
        "subscribers (full state / failed)",
        format!("{} / {}", full.len(), failed.len()),
    );
    row(
        "time to full state p50 / p99 / max",
        format!(
            "{} / {} / {}",
            ms(full.percentile(50.0)),
            ms(full.percentile(99.0)),
            ms(full.percentile(100.0))
        ),
    );
    let full_bytes: usize = r
        .seen
        .iter()
        .filter_map(|s| s.pushes.first().map(|(_, b)| *b))
        .sum();
    if let Some(s) = r.seen.iter().find(|s| s.full_state.is_some()) {
        row(
            "full state per subscriber",
            format!(
                "{} workloads, {} services, {} policies; {:.1} MB",
                s.full_counts[0],
                s.full_counts[1],
                s.full_counts[2],
                s.pushes.first().map_or(0.0, |(_, b)| *b as f64 / 1e6)
            ),
        );
    }
    row(
        "full state, all subscribers",
        format!("{:.0} MB", full_bytes as f64 / 1e6),
    );

    // Per change: the last expected subscriber's ACK.
    let mut last = Samples::with_capacity(r.changes.len());
    let mut by_kind: BTreeMap<ChangeKind, Samples> = BTreeMap::new();
    let mut undelivered = 0;
    for c in r.changes {
        let acks: Vec<Instant> = r
            .seen
            .iter()
            .filter_map(|s| s.markers.get(&c.seq).copied())
            .collect();
        if acks.len() < c.expected {
            undelivered += 1;
            continue;
        }
        let Some(latest) = acks.iter().max() else {
            continue;
        };
        let d = latest.saturating_duration_since(c.written);
        last.record(d);
        by_kind.entry(c.kind).or_default().record(d);
    }
    row(
        "changes written / reached all / not",
        format!("{} / {} / {undelivered}", r.changes.len(), last.len()),
    );
    row(
        "change on disk -> last ACK p50 / p99 / max",
        format!(
            "{} / {} / {}",
            ms(last.percentile(50.0)),
            ms(last.percentile(99.0)),
            ms(last.percentile(100.0))
        ),
    );
    for (kind, mut s) in by_kind {
        row(
            &format!("  {} (n={}) p50 / p99", kind.name(), s.len()),
            format!("{} / {}", ms(s.percentile(50.0)), ms(s.percentile(99.0))),
        );
    }

    let period = r.churn_period.as_secs_f64();
    let cores = r.cpu_churn / period;
    row(
        "controller CPU during churn",
        format!("{cores:.2} cores ({:.1} s over {period:.1} s)", r.cpu_churn),
    );
    row(
        "bench process CPU during churn",
        format!(
            "{:.2} cores ({} subscribers + writer)",
            r.self_cpu / period,
            cfg.nodes
        ),
    );
    row("controller RSS at rest", mib(r.rss_rest));
    row(
        "controller RSS peak (sampled / VmHWM)",
        format!("{} / {}", mib(r.rss_peak), mib(r.hwm)),
    );
    row("  VmHWM before churn (start-up peak)", mib(r.hwm_start));
    let (mut pushes, mut bytes) = (0usize, 0usize);
    for s in r.seen {
        for (at, b) in &s.pushes {
            if *at >= r.churn_started {
                pushes += 1;
                bytes += b;
            }
        }
    }
    row(
        "pushes during churn (all subscribers)",
        format!("{pushes} ({:.1}/s)", pushes as f64 / period),
    );
    row(
        "bytes pushed during churn",
        format!(
            "{:.1} MB ({:.2} MB/s)",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / period
        ),
    );

    println!();
    println!(
        "controller_scale: {} pods, {} services, {} nodes/subscribers, {} namespaces; churn {:.0} s written at {} changes/s in {} writes/s, measured over {period:.1} s",
        cfg.pods,
        cfg.services,
        cfg.nodes,
        cfg.namespaces,
        r.churn_written.as_secs_f64(),
        cfg.changes_per_second,
        cfg.writes_per_second,
    );
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(6);
    println!("{:<width$}  value", "metric");
    for (k, v) in &rows {
        println!("{k:<width$}  {v}");
    }
    let peak_gb = r.hwm.max(r.rss_peak) as f64 * 1024.0 / 1e9;
    println!();
    // The reference is Istio's published sizing (istiod, 1,000 services and 2,000 pods
    // with sidecars); our load differs, so say how.
    println!(
        "Istio's control plane is documented at 1 vCPU and 1.5 GB for 1,000 services and 2,000 pods"
    );
    println!(
        "ours: {cores:.2} cores ({:.2}x of 1 vCPU) and {peak_gb:.2} GB peak RSS ({:.2}x of 1.5 GB) for {} services and {} pods ({:.1}x that reference's pods) \
         pushed to {} node proxies, not 2,000 sidecars; under this run's churn, not theirs",
        cores / 1.0,
        peak_gb / 1.5,
        cfg.services,
        cfg.pods,
        cfg.pods as f64 / 2000.0,
        cfg.nodes,
    );
    if let Some(why) = &r.settled {
        println!("note: {why}");
    }
    for s in failed.iter().take(5) {
        println!(
            "subscriber {} failed: {}",
            s.node,
            s.error.as_deref().unwrap_or_default()
        );
    }
    let held: Vec<usize> = r.seen.iter().map(|s| s.held).collect();
    if let (Some(min), Some(max)) = (held.iter().min(), held.iter().max()) {
        let versions: Vec<u64> = r.seen.iter().map(|s| s.version).collect();
        println!(
            "subscribers hold {min}..{max} resources at the end, model versions {}..{}",
            versions.iter().min().copied().unwrap_or(0),
            versions.iter().max().copied().unwrap_or(0)
        );
    }
}
