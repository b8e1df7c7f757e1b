//! A Pod as the model keeps it: the fields the mesh reads, nothing else.
//!
//! The model holds every pod for as long as it exists, and pods are most of what it holds.
//! Kept whole, a Kubernetes `Pod` costs about 5 KB before any of its strings: `PodSpec` and
//! each `Container` are over 2 KB of mostly empty optional fields, and the enum of objects
//! is as large as its largest variant, so every other object paid for the pod's size too.
//! At 10,000 pods that was about 50 MB of a controller resident at 140 MiB. Sources
//! therefore cut a pod down where it enters: a document deserialises as a whole `Pod` (so
//! its errors are the same) and only then becomes a [`MeshPod`]; the Kubernetes source
//! converts what its watcher lists.
//!
//! A field the model starts to read must be added here, or it is never there to read.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// The parts of a `v1` `Pod` the model derives workloads and endpoints from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshPod {
    /// Without managed fields, which nothing reads.
    pub metadata: ObjectMeta,
    /// `spec.serviceAccountName`.
    pub service_account_name: Option<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// The container ports that have a name, in the order the containers list them: a
    /// Service's `targetPort` may name one.
    pub named_ports: Vec<NamedPort>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `status.podIP`.
    pub pod_ip: Option<String>,
    /// `status.podIPs[*].ip`, in order.
    pub pod_ips: Vec<String>,
    /// Whether the `Ready` condition's status is `True`, when the pod has that condition.
    pub ready_condition: Option<bool>,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: i32,
}

impl From<Pod> for MeshPod {
    fn from(pod: Pod) -> Self {
        let Pod {
            mut metadata,
            spec,
            status,
        } = pod;
        metadata.managed_fields = None;
        let (service_account_name, node_name, named_ports) = match spec {
            Some(spec) => {
                let named_ports = spec
                    .containers
                    .into_iter()
                    .flat_map(|c| c.ports.into_iter().flatten())
                    .filter_map(|p| {
                        Some(NamedPort {
                            name: p.name?,
                            port: p.container_port,
                        })
                    })
                    .collect();
                (spec.service_account_name, spec.node_name, named_ports)
            }
            None => (None, None, Vec::new()),
        };
        let (phase, pod_ip, pod_ips, ready_condition) = match status {
            Some(status) => (
                status.phase,
                status.pod_ip,
                status.pod_ips.into_iter().flatten().map(|p| p.ip).collect(),
                status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| c.status == "True"),
            ),
            None => (None, None, Vec::new(), None),
        };
        MeshPod {
            metadata,
            service_account_name,
            node_name,
            named_ports,
            phase,
            pod_ip,
            pod_ips,
            ready_condition,
        }
    }
}

impl<'de> Deserialize<'de> for MeshPod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Pod::deserialize(d).map(MeshPod::from)
    }
}

impl MeshPod {
    /// The port named `name` in the pod's containers (the first, as Kubernetes resolves
    /// it).
    pub fn named_port(&self, name: &str) -> Option<i32> {
        self.named_ports
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_what_the_mesh_reads() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9-x2x
  namespace: demo
  uid: u-1
  labels: {app: web}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9, uid: r, controller: true}]
  managedFields: [{manager: kubectl, operation: Update}]
spec:
  serviceAccountName: web
  nodeName: n1
  containers:
    - name: app
      image: web:1
      env: [{name: A, value: b}]
      ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
    - name: sidecar
      ports: [{name: http, containerPort: 1}, {name: metrics, containerPort: 9100}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
  conditions: [{type: PodScheduled, status: "True"}, {type: Ready, status: "False"}]
"#;
        let pod: MeshPod = serde_yaml::from_str(yaml).expect("a valid pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-7d4b9-x2x"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        assert_eq!(pod.metadata.managed_fields, None);
        assert_eq!(pod.service_account_name.as_deref(), Some("web"));
        assert_eq!(pod.node_name.as_deref(), Some("n1"));
        // The first container's port of a repeated name wins; unnamed ones are not kept.
        assert_eq!(pod.named_port("http"), Some(8080));
        assert_eq!(pod.named_port("metrics"), Some(9100));
        assert_eq!(pod.named_ports.len(), 3);
        assert_eq!(pod.phase.as_deref(), Some("Running"));
        assert_eq!(pod.pod_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(pod.pod_ips, ["10.0.0.5", "fd00::5"]);
        assert_eq!(pod.ready_condition, Some(false));

        let bare: MeshPod = serde_yaml::from_str("metadata: {name: a}\n").expect("a bare pod");
        assert_eq!(
            bare,
            MeshPod {
                metadata: ObjectMeta {
                    name: Some("a".into()),
                    ..ObjectMeta::default()
                },
                ..MeshPod::default()
            }
        );
    }

    #[test]
    fn a_pod_that_does_not_parse_says_where_as_a_whole_pod_does() {
        let yaml = "metadata: {name: a}\nspec:\n  containers:\n    - name: c\n      ports: [{containerPort: http}]\n";
        let whole = serde_yaml::from_str::<Pod>(yaml).expect_err("a port must be a number");
        let cut = serde_yaml::from_str::<MeshPod>(yaml).expect_err("a port must be a number");
        assert_eq!(cut.to_string(), whole.to_string());
        assert!(cut.location().is_some(), "{cut}");
    }
}
