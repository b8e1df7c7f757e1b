//! The controller's namespace, Deployment, Service and PodDisruptionBudget, and the
//! Secret/ConfigMap of a plugged-in root.
//!
//! [`REPLICAS`] replicas, spread over nodes when the cluster has several: every replica serves
//! discovery and the CA behind the one Service, so a proxy whose replica goes away reconnects
//! through the Service to another. One of them, elected with the `ambit-controller` Lease (its
//! pod name is its identity in it), does the writes: it generates and stores the root in the
//! `ambit-ca` Secret (the others wait for it and load it), publishes the trust root and deploys
//! waypoints. The PodDisruptionBudget keeps one replica up through voluntary disruptions
//! (node drains).
//!
//! Configuration reaches the controller as its command-line flags; a plugged-in root is mounted
//! at [`CA_DIR`] (`ca.crt`, `ca.key`) for the CA to load.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    Namespace, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use crate::container::{env, http_probe, port, resources};
use crate::{meta, ports, InstallOptions, Object, CA_TOKEN_AUDIENCE, ROOT_CERT_CONFIGMAP};

/// Name of the controller's Deployment, Service and ServiceAccount.
pub const NAME: &str = "ambit-controller";
/// Secret holding a plugged-in signing certificate (`ca.crt`) and key (`ca.key`).
pub const CA_SECRET: &str = "ambit-ca";
/// Where the controller finds the CA Secret's files.
pub const CA_DIR: &str = "/etc/ambit/ca";
/// The Lease the replicas elect their leader with.
pub const LEASE: &str = "ambit-controller";
/// How many controller replicas run.
pub const REPLICAS: i32 = 2;
/// The UID/GID the controller runs as: any non-root id works; 65532 is the distroless "nonroot".
const NONROOT: i64 = 65532;

/// The install namespace.
pub fn namespace(opts: &InstallOptions) -> Namespace {
    let mut metadata = meta::cluster_meta(&opts.namespace, "ambit");
    // ztunnel needs NET_ADMIN/SYS_ADMIN, which the "baseline" Pod Security level forbids; this
    // namespace holds only Ambit's own pods.
    metadata.labels.get_or_insert_with(BTreeMap::new).insert(
        "pod-security.kubernetes.io/enforce".to_owned(),
        "privileged".to_owned(),
    );
    Namespace {
        metadata,
        ..Namespace::default()
    }
}

/// The plugged-in root's Secret and ConfigMap (if any), the Deployment and the Service.
pub fn objects(opts: &InstallOptions) -> Vec<Object> {
    let mut objects = Vec::new();
    if let Some(ca) = &opts.root_ca {
        objects.push(Object::Secret(Secret {
            metadata: meta::namespaced_meta(CA_SECRET, &opts.namespace, NAME),
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([
                (
                    "ca.crt".to_owned(),
                    ByteString(ca.cert_chain_pem.clone().into_bytes()),
                ),
                (
                    "ca.key".to_owned(),
                    ByteString(ca.key_pem.clone().into_bytes()),
                ),
            ])),
            ..Secret::default()
        }));
        objects.push(Object::ConfigMap(ConfigMap {
            metadata: meta::namespaced_meta(ROOT_CERT_CONFIGMAP, &opts.namespace, NAME),
            data: Some(BTreeMap::from([(
                "root-cert.pem".to_owned(),
                ca.trust_anchor_pem.clone(),
            )])),
            ..ConfigMap::default()
        }));
    }
    objects.push(Object::Deployment(deployment(opts)));
    objects.push(Object::Service(service(opts)));
    objects.push(Object::PodDisruptionBudget(disruption_budget(opts)));
    objects
}

/// At most one replica down at a time for voluntary disruptions: the other keeps serving.
pub fn disruption_budget(opts: &InstallOptions) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta::namespaced_meta(NAME, &opts.namespace, NAME),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(meta::selector_labels(NAME)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The controller Deployment.
pub fn deployment(opts: &InstallOptions) -> Deployment {
    let args = vec![
        format!("--listen=0.0.0.0:{}", ports::DISCOVERY),
        format!("--trust-domain={}", opts.trust_domain),
        format!("--root-namespace={}", opts.namespace),
        "--log-format=json".to_owned(),
        // A plugged-in CA (the optional Secret below) is used when the directory holds one;
        // otherwise the controller generates a root under its state dir (`/tmp`).
        format!("--ca-dir={CA_DIR}"),
        format!("--token-audience={CA_TOKEN_AUDIENCE}"),
        format!("--ztunnel-service-account={}", crate::ztunnel::NAME),
    ];
    let mounts = vec![
        VolumeMount {
            name: "ca".to_owned(),
            mount_path: CA_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    let volumes = vec![
        Volume {
            name: "ca".to_owned(),
            // Optional: without a plugged-in root the controller generates one.
            secret: Some(SecretVolumeSource {
                secret_name: Some(CA_SECRET.to_owned()),
                optional: Some(true),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let container = Container {
        name: "controller".to_owned(),
        image: Some(opts.image("controller")),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        // The controller's own flags (controller/src/main.rs). `--root-namespace` is the install
        // namespace: policies placed there apply mesh-wide.
        args: Some(args),
        // Read by the waypoint deployer (the image it fills into the waypoint template).
        // The pod's name is its identity in the leader election's Lease.
        env: Some(vec![
            env("AMBIT_WAYPOINT_IMAGE", opts.image("waypoint")),
            EnvVar {
                name: "POD_NAME".to_owned(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".to_owned(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![
            port("grpc", ports::DISCOVERY),
            port("http-monitoring", ports::CONTROLLER_HTTP),
        ]),
        // Ready once its stores have synced (it must not hand proxies a partial world); alive
        // while its operations server answers. The startup probe gives a large cluster's first
        // sync five minutes before liveness may restart it.
        startup_probe: Some(Probe {
            failure_threshold: Some(60),
            ..http_probe("/healthz/live", ports::CONTROLLER_HTTP, 5)
        }),
        readiness_probe: Some(http_probe("/healthz/ready", ports::CONTROLLER_HTTP, 5)),
        liveness_probe: Some(http_probe("/healthz/live", ports::CONTROLLER_HTTP, 10)),
        resources: Some(resources("100m", "128Mi", "1Gi")),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(NAME.to_owned()),
        containers: vec![container],
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT),
            run_as_group: Some(NONROOT),
            // Mounted Secrets and projected tokens are group-owned by fsGroup, so the non-root
            // user can read them.
            fs_group: Some(NONROOT),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        node_selector: Some(BTreeMap::from([(
            "kubernetes.io/os".to_owned(),
            "linux".to_owned(),
        )])),
        volumes: Some(volumes),
        // Replicas on different nodes where possible, so one node's loss leaves one serving.
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(meta::selector_labels(NAME)),
                                ..LabelSelector::default()
                            }),
                            topology_key: "kubernetes.io/hostname".to_owned(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        ..PodSpec::default()
    };
    Deployment {
        metadata: meta::namespaced_meta(NAME, &opts.namespace, NAME),
        spec: DeploymentSpec {
            replicas: Some(REPLICAS),
            selector: LabelSelector {
                match_labels: Some(meta::selector_labels(NAME)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(meta::labels(NAME)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

/// The controller Service: discovery + CA for proxies, metrics for Prometheus.
pub fn service(opts: &InstallOptions) -> Service {
    Service {
        metadata: meta::namespaced_meta(NAME, &opts.namespace, NAME),
        spec: Some(ServiceSpec {
            selector: Some(meta::selector_labels(NAME)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".to_owned()),
                    port: ports::DISCOVERY,
                    target_port: Some(IntOrString::String("grpc".to_owned())),
                    app_protocol: Some("grpc".to_owned()),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("http-monitoring".to_owned()),
                    port: ports::CONTROLLER_HTTP,
                    target_port: Some(IntOrString::String("http-monitoring".to_owned())),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
