//! The ztunnel DaemonSet: one node proxy per node, in "in-pod" mode.
//!
//! Why it looks the way it does:
//! - Not `hostNetwork`: ztunnel lives in its own pod network namespace and does its work inside
//!   each enrolled pod's namespace, entering it with `setns` from a dedicated thread (the root ARCHITECTURE.md,
//!   "Wire formats", capture). So its capture listeners (15001, 15006, 15008) open *in the pods*, not in
//!   ztunnel's own pod, and are not container ports here; the admin port (15000) is bound to
//!   localhost and is not declared either. Only metrics (15020) and readiness (15021) are.
//! - The host's netns directory `/var/run/netns` (where CNI plugins bind-mount each pod's network
//!   namespace) is mounted read-only with `HostToContainer` propagation, so namespaces created after
//!   ztunnel started show up inside it. Host `/proc` is NOT mounted and `hostPID` is off: the netns
//!   files are all ztunnel needs, and host `/proc` would expose every process on the node.
//! - Capabilities, everything else dropped:
//!   - `NET_ADMIN`: program iptables rules in the pod's namespace, set `IP_TRANSPARENT` (original
//!     source address) and `SO_MARK` (so its own sockets are never captured again);
//!   - `NET_RAW`: iptables talks to the kernel over a raw socket (legacy backend);
//!   - `SYS_ADMIN`: `setns(CLONE_NEWNET)` requires it over the target namespace;
//!   - not `SYS_PTRACE`: only needed to open `/proc/<pid>/ns/net` of other processes, which we
//!     don't (see above).
//! - `privileged: false`, but `allowPrivilegeEscalation: true` and `runAsUser: 0`: capabilities
//!   added to a container only reach the process's effective set when it runs as root, and the API
//!   server rejects `allowPrivilegeEscalation: false` together with `SYS_ADMIN` (the Pod Security
//!   Standards define SYS_ADMIN as implying escalation).
//! - The ServiceAccount token is not mounted (ztunnel has no API permissions); a projected token for
//!   the `ambit-ca` audience is, and ztunnel presents it to the controller's CA, which checks it with
//!   a TokenReview for that audience (so the token is useless to the API server or anyone else).
//! - Tolerates every taint and runs as `system-node-critical`: a node whose ztunnel is missing has
//!   enrolled pods with no connectivity.
//! - Upgrades surge: `RollingUpdate` with `maxSurge: 1, maxUnavailable: 0`, so a node's new
//!   ztunnel pod starts beside the old one and takes its listening sockets over the hand-over
//!   socket in the node directory (or binds beside them with SO_REUSEPORT). It reports ready
//!   only once it serves every pod the old one served and has told it to stop accepting; only
//!   then does the DaemonSet delete the old pod, which by then drains: no listener closes, no
//!   connection is reset.
//! - `terminationGracePeriodSeconds` covers the longer of the two drains: a plain stop
//!   (`AMBIT_DRAIN_SECONDS`; pods stay captured and are refused until the next ztunnel adopts
//!   them) and an old ztunnel after an upgrade, which keeps its open connections until they
//!   end or `AMBIT_UPGRADE_DRAIN_SECONDS` passes (a SIGTERM then does not cut them short),
//!   exiting as soon as the last one ends.
//! - The node directory `/var/lib/ambit/ztunnel` is a hostPath (`DirectoryOrCreate`), read-write:
//!   the last acknowledged state and the workload certificates with their keys (owner-only files)
//!   survive a restart, so ztunnel serves before the controller answers; `handover.sock`, the
//!   Unix socket through which a new ztunnel takes over from the old one, lives there too. The
//!   root filesystem stays read-only.
//! - An init container, `install-cni`, runs `ambit-cni install` from the same image: it copies
//!   the `ambit-cni` binary into the node's CNI bin directory and appends the plugin to the
//!   node's first conflist (idempotent, atomic writes), so every pod sandbox created afterwards
//!   is captured before its containers start (`cni/ARCHITECTURE.md`). It is an init container,
//!   not a sidecar, so the plugin stays installed while ztunnel restarts or rolls: a pod created
//!   then is captured and refused until the new ztunnel adopts it, never started outside the
//!   mesh. Only it mounts the host's CNI directories; it runs as root (the files are root's)
//!   with every capability dropped. Uninstalling is explicit: `ambit-cni uninstall` on each
//!   node (see `manifests/README.md`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, HostPathVolumeSource, PodSpec, PodTemplateSpec,
    ProjectedVolumeSource, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
    Toleration, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::container::{env, env_field, http_probe, port, resources};
use crate::{meta, ports, InstallOptions, CA_TOKEN_AUDIENCE, ROOT_CERT_CONFIGMAP};

/// Name of the DaemonSet and its ServiceAccount.
pub const NAME: &str = "ambit-ztunnel";
/// The capabilities ztunnel adds (everything else is dropped); see the module docs for why.
pub const CAPABILITIES: &[&str] = &["NET_ADMIN", "NET_RAW", "SYS_ADMIN"];
/// The host directory holding pods' network namespaces, mounted at the same path.
pub const NETNS_DIR: &str = "/var/run/netns";
/// The node directory on the host, mounted at the same path (ztunnel's `--data-dir`).
pub const DATA_DIR: &str = "/var/lib/ambit/ztunnel";
/// Where the projected CA token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// File name of the projected CA token in [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "ambit-ca-token";
/// Where the trust anchor (`root-cert.pem`, from the `ambit-root-cert` ConfigMap) is mounted; ztunnel
/// verifies the controller's TLS certificate with it.
pub const ROOT_CERT_DIR: &str = "/var/run/secrets/ambit";
/// Seconds a ztunnel that handed over to its successor keeps its open connections.
pub const UPGRADE_DRAIN_SECONDS: i64 = 3600;
/// Seconds ztunnel gets to drain before it is killed: the upgrade drain, plus time to exit.
pub const TERMINATION_GRACE_SECONDS: i64 = UPGRADE_DRAIN_SECONDS + 30;
/// Seconds ztunnel lets open connections finish once told to stop: less than the grace period,
/// so it exits on its own (with its "drained" log line) before the kubelet's SIGKILL.
pub const DRAIN_SECONDS: i64 = 20;
/// The node's CNI bin directory (where the runtime finds plugins), from the host.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The node's CNI configuration directory (its conflists), from the host.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where the init container mounts the host's CNI directories: under `/host`, so the
/// container's own paths are never confused with the node's.
const HOST_PREFIX: &str = "/host";
/// Lifetime of the projected CA token; the kubelet refreshes it at 80 %.
const TOKEN_EXPIRY_SECONDS: i64 = 43_200;

/// The ztunnel DaemonSet.
pub fn daemonset(opts: &InstallOptions) -> DaemonSet {
    let container = Container {
        name: "ztunnel".to_owned(),
        image: Some(opts.image("ztunnel")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        // ztunnel's flags, through the environment variables its clap options read.
        env: Some(vec![
            env_field("NODE_NAME", "spec.nodeName"),
            env("AMBIT_CONTROLLER", opts.controller_address()),
            env(
                "AMBIT_CA_ROOT_FILE",
                format!("{ROOT_CERT_DIR}/root-cert.pem"),
            ),
            env("AMBIT_CREDENTIAL_FILE", format!("{TOKEN_DIR}/{TOKEN_FILE}")),
            env("AMBIT_TRUST_DOMAIN", opts.trust_domain.clone()),
            env("AMBIT_NETNS_DIR", NETNS_DIR),
            env("AMBIT_DATA_DIR", DATA_DIR),
            env("AMBIT_DRAIN_SECONDS", DRAIN_SECONDS.to_string()),
            env(
                "AMBIT_UPGRADE_DRAIN_SECONDS",
                UPGRADE_DRAIN_SECONDS.to_string(),
            ),
            env("AMBIT_LOG_FORMAT", "json"),
        ]),
        ports: Some(vec![
            port("http-metrics", ports::METRICS),
            port("http-ready", ports::READINESS),
        ]),
        readiness_probe: Some(http_probe("/healthz/ready", ports::READINESS, 5)),
        resources: Some(resources("200m", "256Mi", "1Gi")),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(true),
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            // The runtime's default profile allows setns/unshare to a process holding SYS_ADMIN.
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "netns".to_owned(),
                mount_path: NETNS_DIR.to_owned(),
                mount_propagation: Some("HostToContainer".to_owned()),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "data".to_owned(),
                mount_path: DATA_DIR.to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "ca-token".to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "root-cert".to_owned(),
                mount_path: ROOT_CERT_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let install_cni = Container {
        name: "install-cni".to_owned(),
        image: Some(opts.image("ztunnel")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec![
            "/usr/local/bin/ambit-cni".to_owned(),
            "install".to_owned(),
        ]),
        env: Some(vec![
            env_field("NODE_NAME", "spec.nodeName"),
            env("AMBIT_CNI_BIN_DIR", format!("{HOST_PREFIX}{CNI_BIN_DIR}")),
            env("AMBIT_CNI_CONF_DIR", format!("{HOST_PREFIX}{CNI_CONF_DIR}")),
            // As the node sees it: the plugin runs on the host, not in this container.
            env("AMBIT_DATA_DIR", DATA_DIR),
        ]),
        resources: Some(resources("10m", "16Mi", "64Mi")),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "cni-bin".to_owned(),
                mount_path: format!("{HOST_PREFIX}{CNI_BIN_DIR}"),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "cni-conf".to_owned(),
                mount_path: format!("{HOST_PREFIX}{CNI_CONF_DIR}"),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(NAME.to_owned()),
        automount_service_account_token: Some(false),
        host_network: Some(false),
        host_pid: Some(false),
        priority_class_name: Some("system-node-critical".to_owned()),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        node_selector: Some(BTreeMap::from([(
            "kubernetes.io/os".to_owned(),
            "linux".to_owned(),
        )])),
        // Every node, whatever its taints (NoSchedule and NoExecute alike).
        tolerations: Some(vec![Toleration {
            operator: Some("Exists".to_owned()),
            ..Toleration::default()
        }]),
        init_containers: Some(vec![install_cni]),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "netns".to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: NETNS_DIR.to_owned(),
                    type_: Some("DirectoryOrCreate".to_owned()),
                }),
                ..Volume::default()
            },
            Volume {
                name: "data".to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: DATA_DIR.to_owned(),
                    type_: Some("DirectoryOrCreate".to_owned()),
                }),
                ..Volume::default()
            },
            Volume {
                name: "cni-bin".to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: CNI_BIN_DIR.to_owned(),
                    type_: Some("Directory".to_owned()),
                }),
                ..Volume::default()
            },
            Volume {
                name: "cni-conf".to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: CNI_CONF_DIR.to_owned(),
                    type_: Some("Directory".to_owned()),
                }),
                ..Volume::default()
            },
            Volume {
                name: "ca-token".to_owned(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(CA_TOKEN_AUDIENCE.to_owned()),
                            expiration_seconds: Some(TOKEN_EXPIRY_SECONDS),
                            path: TOKEN_FILE.to_owned(),
                            user: None,
                        }),
                        ..VolumeProjection::default()
                    }]),
                    ..ProjectedVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "root-cert".to_owned(),
                // Published by the controller (see `rbac::ca_rules`), or rendered by
                // `ambitctl install --ca-cert`; optional so ztunnel pods can be created first.
                config_map: Some(ConfigMapVolumeSource {
                    name: ROOT_CERT_CONFIGMAP.to_owned(),
                    optional: Some(true),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    DaemonSet {
        metadata: meta::namespaced_meta(NAME, &opts.namespace, NAME),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(meta::selector_labels(NAME)),
                ..LabelSelector::default()
            },
            // One node at a time, the new pod beside the old one: it takes over the old one's
            // listeners before the old one is deleted (see the module docs).
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(NAME)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    }
}
