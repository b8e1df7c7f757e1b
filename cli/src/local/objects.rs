//! The local cluster's objects: the default sample written as Kubernetes YAML into the folder
//! the controller watches, and the cluster layout (nodes, pods, sample roles) read back from any
//! such folder with the controller's own parser, so a user's `--objects DIR` and our default
//! go through one path.
//!
//! The sample: namespace `demo` (enrolled by default) runs `echo` servers behind service
//! `echo` (VIP 10.96.0.10:80 -> 8080) and `client` pods calling it; namespace `legacy` (not
//! enrolled) runs a client calling the same VIP (plaintext into the mesh) and a `web` server
//! (10.96.0.20:80) that a demo client calls (out of the mesh). Pods are spread round-robin so
//! the first client and server sit on different nodes (HBONE between ztunnels).
//!
//! Which sample process a pod runs is said by annotations, so user-written pods can use them
//! too: `ambit.dev/sample-server: "<port>"`, `ambit.dev/sample-client: "<ip:port>"`. A pod
//! labelled `gateway.networking.k8s.io/gateway-name: <gw>`, where `<gw>` is a Gateway of
//! class `ambit-waypoint` in its namespace, runs that waypoint.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ambit_controller::crd::gateway::WAYPOINT_CLASS;
use ambit_controller::model::{Object, SourceEvent, GATEWAY_NAME_LABEL};
use ambit_controller::source::local::Scanner;

use super::net;

/// Pod annotation: run the sample server on this port.
pub const SAMPLE_SERVER: &str = "ambit.dev/sample-server";
/// Pod annotation: run the sample client against this `ip:port`.
pub const SAMPLE_CLIENT: &str = "ambit.dev/sample-client";
/// The enrollment label.
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";

const ECHO_VIP: &str = "10.96.0.10";
const WEB_VIP: &str = "10.96.0.20";
const APP_PORT: u16 = 8080;
/// Where the first pod (an echo server on node1) always is.
const FIRST_POD: &str = "10.77.1.2";

/// Why the folder does not describe a cluster we can build.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The folder's files do not parse (each problem is listed).
    #[error("{} has errors:\n  {}", dir.display(), problems.join("\n  "))]
    Invalid { dir: PathBuf, problems: Vec<String> },
    /// A pod lacks what local mode needs (no kubelet fills these in).
    #[error("pod {pod}: {problem}")]
    Pod { pod: String, problem: String },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The requested size does not fit the address plan.
    #[error(transparent)]
    Plan(#[from] net::NetError),
}

/// What a pod runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Sample {
    /// `ambitctl sample server --port`.
    Server { port: u16 },
    /// `ambitctl sample client --target`.
    Client { target: String },
    /// The `waypoint` binary for this Gateway (of class `ambit-waypoint`, in the pod's
    /// namespace): the pod carries the label `gateway.networking.k8s.io/gateway-name`.
    Waypoint { gateway: String },
}

/// One pod of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLayout {
    pub namespace: String,
    pub name: String,
    /// What the controller keys the pod's workload by: `metadata.uid`, else `namespace/name`
    /// (the CNI chain passes it as `K8S_POD_UID`, as a kubelet passes the pod's uid).
    pub uid: String,
    /// Index of its node in [`Layout::nodes`] (0-based).
    pub node: usize,
    pub ip: Ipv4Addr,
    pub sample: Option<Sample>,
}

/// Nodes and pods, as the folder describes them.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Node names, sorted; node k (1-based) is `nodes[k-1]`.
    pub nodes: Vec<String>,
    pub pods: Vec<PodLayout>,
}

/// Sizes and enrollment of the default sample.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Namespaces labelled for the mesh.
    pub enroll: Vec<String>,
}

struct SamplePod {
    namespace: &'static str,
    app: &'static str,
    sa: &'static str,
    sample: Sample,
}

/// The sample's pods in placement order (pod i goes to node i % nodes): with two nodes the
/// servers land on node1 and the clients on node2, so every sample call crosses nodes.
fn sample_pods(total: usize) -> Vec<(String, SamplePod)> {
    let has_web = total >= 6;
    let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
    (0..total)
        .map(|i| {
            let server = |namespace, app, sa| SamplePod {
                namespace,
                app,
                sa,
                sample: Sample::Server { port: APP_PORT },
            };
            let client = |namespace, app, sa, target: String| SamplePod {
                namespace,
                app,
                sa,
                sample: Sample::Client { target },
            };
            let pod = match i % 6 {
                0 | 2 => server("demo", "echo", "echo"),
                1 => client("demo", "client", "client", format!("{ECHO_VIP}:80")),
                // Not enrolled, and no kube-proxy here to translate VIPs: it calls the first
                // echo pod directly (plaintext into the mesh, ztunnel's inbound capture).
                3 => client(
                    "legacy",
                    "legacy-client",
                    "default",
                    format!("{}:{APP_PORT}", FIRST_POD),
                ),
                4 if has_web => server("legacy", "web", "default"),
                4 => server("demo", "echo", "echo"),
                _ => client(
                    "demo",
                    "client",
                    "client",
                    format!("{}:80", if has_web { WEB_VIP } else { ECHO_VIP }),
                ),
            };
            let n = counters.entry(pod.app).or_default();
            *n += 1;
            (format!("{}-{n}", pod.app), pod)
        })
        .collect()
}

/// Writes the default sample into `dir` (one file per namespace, plus `00-namespaces.yaml`).
pub fn write_sample(dir: &Path, spec: &SampleSpec) -> Result<(), ObjectsError> {
    let mut namespaces: BTreeSet<String> = ["demo", "legacy"].map(String::from).into();
    namespaces.extend(spec.enroll.iter().cloned());
    let mut ns_yaml = String::from("# Namespaces: the label enrolls a namespace in the mesh.\n");
    for ns in &namespaces {
        let labels = if spec.enroll.contains(ns) {
            format!("\n  labels:\n    {DATAPLANE_MODE}: ambient")
        } else {
            String::new()
        };
        let _ = write!(
            ns_yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n"
        );
    }
    write(&dir.join("00-namespaces.yaml"), &ns_yaml)?;

    let mut per_ns: BTreeMap<&str, String> = BTreeMap::new();
    let mut sas: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut per_node = vec![0usize; spec.nodes.max(1)];
    for (i, (name, pod)) in sample_pods(spec.nodes * spec.pods_per_node)
        .into_iter()
        .enumerate()
    {
        let k = i % spec.nodes.max(1);
        let ip = net::pod_ip(k + 1, per_node[k])?;
        // The pod's namespace gets both families; the mesh carries the IPv6 of a pod whose
        // IPv6 address it knows (a pod listing only `podIP` has its IPv6 closed).
        let ip6 = net::pod_ip6(k + 1, per_node[k])?;
        per_node[k] += 1;
        let (key, value) = match &pod.sample {
            Sample::Server { port } => (SAMPLE_SERVER, port.to_string()),
            Sample::Client { target } => (SAMPLE_CLIENT, target.clone()),
            // The sample has no waypoint; a user's folder may (see `read_layout`).
            Sample::Waypoint { .. } => continue,
        };
        sas.insert((pod.namespace, pod.sa));
        let out = per_ns.entry(pod.namespace).or_default();
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
             labels:\n    app: {app}\n  annotations:\n    {key}: \"{value}\"\nspec:\n  \
             nodeName: node{node}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    \
             image: ambitctl-sample\nstatus:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  - ip: \"{ip6}\"\n",
            ns = pod.namespace,
            app = pod.app,
            node = k + 1,
            sa = pod.sa,
        );
    }
    for (ns, sa) in &sas {
        if *sa != "default" {
            let out = per_ns.entry(ns).or_default();
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n"
            );
        }
    }
    for (ns, app, vip) in [("demo", "echo", ECHO_VIP), ("legacy", "web", WEB_VIP)] {
        let out = per_ns.entry(ns).or_default();
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  namespace: {ns}\n\
             spec:\n  clusterIP: {vip}\n  selector:\n    app: {app}\n  ports:\n  - name: tcp\n    \
             port: 80\n    targetPort: {APP_PORT}\n"
        );
    }
    for (ns, text) in per_ns {
        write(&dir.join(format!("10-{ns}.yaml")), &text)?;
    }
    Ok(())
}

/// An example policy for the user to apply (kept outside the watched folder so it is inactive).
pub fn deny_example() -> &'static str {
    "# Deny demo's clients access to the echo servers: ambitctl apply -f this file.\n\
     apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
     name: deny-client\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      \
     app: echo\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
     principals: [\"cluster.local/ns/demo/sa/client\"]\n"
}

fn write(path: &Path, text: &str) -> Result<(), ObjectsError> {
    std::fs::write(path, text).map_err(|source| ObjectsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads the folder with the controller's parser and derives the layout: nodes are the pods'
/// `spec.nodeName`s (sorted), each pod must have `status.podIP` in its node's 10.77.k.0/24.
pub fn read_layout(dir: &Path) -> Result<Layout, ObjectsError> {
    let mut scanner = Scanner::new(dir);
    let scan = scanner.scan();
    if !scan.errors.is_empty() {
        return Err(ObjectsError::Invalid {
            dir: dir.to_owned(),
            problems: scan.errors.iter().map(|e| error_chain(e)).collect(),
        });
    }
    // Waypoints, by namespace/name: a pod labelled with one of them runs the waypoint.
    let waypoints: BTreeSet<String> = scan
        .events
        .iter()
        .flat_map(event_objects)
        .filter_map(|o| match o {
            Object::Gateway(gw) if gw.spec.gateway_class_name == WAYPOINT_CLASS => Some(format!(
                "{}/{}",
                gw.metadata.namespace.as_deref().unwrap_or("default"),
                gw.metadata.name.as_deref()?
            )),
            _ => None,
        })
        .collect();
    let mut pods = Vec::new();
    for object in scan.events.iter().flat_map(event_objects) {
        let Object::Pod(pod) = object else {
            continue;
        };
        let meta = &pod.metadata;
        let key = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("?")
        );
        let node = pod.node_name.clone().ok_or_else(|| {
            pod_error(
                &key,
                "spec.nodeName is missing (local mode has no scheduler)",
            )
        })?;
        let ip: Ipv4Addr = pod
            .pod_ip
            .as_deref()
            .ok_or_else(|| pod_error(&key, "status.podIP is missing (local mode has no kubelet)"))?
            .parse()
            .map_err(|_| pod_error(&key, "status.podIP is not an IPv4 address"))?;
        let annotations = meta.annotations.clone().unwrap_or_default();
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        let gateway = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .filter(|gw| waypoints.contains(&format!("{namespace}/{gw}")));
        let sample = if let Some(gw) = gateway {
            let sa = pod.service_account_name.as_deref().unwrap_or("default");
            // The controller names a waypoint's identity after its Gateway.
            if sa != gw {
                return Err(pod_error(
                    &key,
                    &format!(
                        "runs waypoint {namespace}/{gw}, so spec.serviceAccountName must be {gw:?} (a waypoint's identity is its Gateway's name), not {sa:?}"
                    ),
                ));
            }
            Some(Sample::Waypoint {
                gateway: format!("{namespace}/{gw}"),
            })
        } else if let Some(port) = annotations.get(SAMPLE_SERVER) {
            let port = port.parse().map_err(|_| {
                pod_error(
                    &key,
                    &format!("annotation {SAMPLE_SERVER}: {port:?} is not a port"),
                )
            })?;
            Some(Sample::Server { port })
        } else {
            annotations
                .get(SAMPLE_CLIENT)
                .map(|t| Sample::Client { target: t.clone() })
        };
        pods.push((key, meta.uid.clone(), node, ip, sample));
    }
    let nodes: Vec<String> = pods
        .iter()
        .map(|(_, _, n, _, _)| n.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut layout = Layout {
        nodes,
        pods: Vec::new(),
    };
    for (key, uid, node, ip, sample) in pods {
        let k = layout.nodes.iter().position(|n| *n == node).unwrap_or(0);
        let octets = ip.octets();
        let ok = octets[0] == 10
            && octets[1] == 77
            && usize::from(octets[2]) == k + 1
            && (2..250).contains(&octets[3]);
        if !ok {
            return Err(pod_error(
                &key,
                &format!(
                    "status.podIP {ip} is not in node {node}'s subnet 10.77.{}.2-249 \
                     (nodes are numbered by sorted name)",
                    k + 1
                ),
            ));
        }
        let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));
        layout.pods.push(PodLayout {
            uid: uid.unwrap_or_else(|| key.clone()),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: k,
            ip,
            sample,
        });
    }
    Ok(layout)
}

fn event_objects(event: &SourceEvent) -> &[Object] {
    match event {
        SourceEvent::Apply(o) => std::slice::from_ref(&**o),
        SourceEvent::Replace { objects, .. } => objects,
        _ => &[],
    }
}

fn pod_error(pod: &str, problem: &str) -> ObjectsError {
    ObjectsError::Pod {
        pod: pod.to_owned(),
        problem: problem.to_owned(),
    }
}

/// An error with its causes on one line (`a: b: c`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_round_trips_through_the_controller_parser() {
        let dir = std::env::temp_dir().join(format!("ambitctl-objects-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = SampleSpec {
            nodes: 2,
            pods_per_node: 3,
            enroll: vec!["demo".into(), "other".into()],
        };
        write_sample(&dir, &spec).unwrap();
        let layout = read_layout(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(layout.nodes, ["node1", "node2"]);
        assert_eq!(layout.pods.len(), 6);
        let echo = layout.pods.iter().find(|p| p.name == "echo-1").unwrap();
        assert_eq!((echo.node, echo.ip), (0, Ipv4Addr::new(10, 77, 1, 2)));
        let client = layout.pods.iter().find(|p| p.name == "client-1").unwrap();
        assert_eq!(client.node, 1, "client and server on different nodes");
        let legacy = layout
            .pods
            .iter()
            .find(|p| p.name == "legacy-client-1")
            .unwrap();
        assert_eq!(
            legacy.sample,
            Some(Sample::Client {
                target: "10.77.1.2:8080".into()
            })
        );
        assert_eq!(
            client.sample,
            Some(Sample::Client {
                target: "10.96.0.10:80".into()
            })
        );
    }
}
