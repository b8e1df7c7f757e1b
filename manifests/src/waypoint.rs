//! The waypoint template: the ServiceAccount, Deployment and Service the controller creates for a
//! `Gateway` of class `ambit-waypoint`.
//!
//! A typed function rather than a text template: the controller passes the Gateway's name,
//! namespace and uid and gets k8s-openapi objects back, ready for server-side apply. Names are
//! checked (a Gateway name may be a DNS subdomain, a Service name must be a DNS label), and nothing
//! a user writes can change the objects' structure.
//!
//! The waypoint gets its own ServiceAccount, named after the Gateway, so its identity is
//! `spiffe://<td>/ns/<namespace>/sa/<gateway>`. Its pods are labelled out of capture
//! (`ambit.dev/dataplane-mode=none`): a waypoint speaks HBONE itself. All three objects are owned
//! by the Gateway, so deleting the Gateway deletes them (the controller needs no `delete` verb).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, ProjectedVolumeSource, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::container::{env, env_field, http_probe, port, resources};
use crate::ztunnel::{ROOT_CERT_DIR, TOKEN_DIR, TOKEN_FILE};
use crate::{meta, ports, CA_TOKEN_AUDIENCE, ROOT_CERT_CONFIGMAP};

/// The label Gateway API implementations put on a Gateway's generated objects.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The pod label that keeps a pod out of ztunnel's capture.
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
const NONROOT: i64 = 65532;

/// What the controller knows when it deploys a waypoint.
#[derive(Clone, Debug)]
pub struct WaypointParams<'a> {
    /// The Gateway's name (also the name of the generated objects).
    pub name: &'a str,
    /// The Gateway's namespace.
    pub namespace: &'a str,
    /// The Gateway's uid, for the owner references.
    pub gateway_uid: &'a str,
    /// The waypoint image (the controller's `AMBIT_WAYPOINT_IMAGE`).
    pub image: &'a str,
    /// The trust domain.
    pub trust_domain: &'a str,
    /// The controller's URL, `https://host:port`.
    pub controller_address: &'a str,
}

/// The objects of one waypoint, in apply order.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointObjects {
    /// The waypoint's identity.
    pub service_account: ServiceAccount,
    /// The proxy.
    pub deployment: Deployment,
    /// Where ztunnels send traffic bound for the waypoint (HBONE on 15008).
    pub service: Service,
}

/// Why a Gateway cannot be turned into a waypoint.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    /// The name would not make a valid Service name.
    #[error("Gateway name {0:?} is not a DNS-1123 label (a waypoint's Service is named after it)")]
    InvalidName(String),
    /// The namespace is not a valid namespace name.
    #[error("namespace {0:?} is not a DNS-1123 label")]
    InvalidNamespace(String),
    /// No uid: the Gateway must be read from the API server first.
    #[error("Gateway {0} has no uid")]
    NoUid(String),
}

/// Builds the waypoint objects for a Gateway.
pub fn render(p: &WaypointParams<'_>) -> Result<WaypointObjects, WaypointError> {
    if !meta::is_dns1123_label(p.name) {
        return Err(WaypointError::InvalidName(p.name.to_owned()));
    }
    if !meta::is_dns1123_label(p.namespace) {
        return Err(WaypointError::InvalidNamespace(p.namespace.to_owned()));
    }
    if p.gateway_uid.is_empty() {
        return Err(WaypointError::NoUid(p.name.to_owned()));
    }
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), p.name.to_owned())]);
    let metadata = || {
        let mut m = meta::namespaced_meta(p.name, p.namespace, "waypoint");
        m.labels
            .get_or_insert_with(BTreeMap::new)
            .extend(selector.clone());
        m.owner_references = Some(vec![OwnerReference {
            api_version: crate::gateway::GatewayClass::API_VERSION.to_owned(),
            kind: "Gateway".to_owned(),
            name: p.name.to_owned(),
            uid: p.gateway_uid.to_owned(),
            controller: Some(true),
            // blockOwnerDeletion would need `update` on gateways/finalizers; GC works without it.
            ..OwnerReference::default()
        }]);
        m
    };

    let mut pod_labels = meta::labels("waypoint");
    pod_labels.extend(selector.clone());
    pod_labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());

    let container = Container {
        name: "waypoint".to_owned(),
        image: Some(p.image.to_owned()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        // The same variable names as ztunnel's flags, plus who this waypoint is.
        env: Some(vec![
            env_field("NODE_NAME", "spec.nodeName"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("AMBIT_WAYPOINT_NAME", p.name),
            env("AMBIT_CONTROLLER", p.controller_address),
            env(
                "AMBIT_CA_ROOT_FILE",
                format!("{ROOT_CERT_DIR}/root-cert.pem"),
            ),
            env("AMBIT_CREDENTIAL_FILE", format!("{TOKEN_DIR}/{TOKEN_FILE}")),
            env("AMBIT_TRUST_DOMAIN", p.trust_domain),
            env("AMBIT_LOG_FORMAT", "json"),
        ]),
        ports: Some(vec![
            port("hbone", ports::HBONE),
            port("http-metrics", ports::METRICS),
            port("http-ready", ports::READINESS),
        ]),
        readiness_probe: Some(http_probe("/healthz/ready", ports::READINESS, 5)),
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
        volume_mounts: Some(vec![
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
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(p.name.to_owned()),
        // The waypoint talks to the controller only, with the ambit-ca token below.
        automount_service_account_token: Some(false),
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
        termination_grace_period_seconds: Some(30),
        volumes: Some(vec![
            Volume {
                name: "ca-token".to_owned(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(CA_TOKEN_AUDIENCE.to_owned()),
                            expiration_seconds: Some(43_200),
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
                config_map: Some(ConfigMapVolumeSource {
                    name: ROOT_CERT_CONFIGMAP.to_owned(),
                    optional: Some(true),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };

    Ok(WaypointObjects {
        service_account: ServiceAccount {
            metadata: metadata(),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        deployment: Deployment {
            metadata: metadata(),
            spec: DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(selector.clone()),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(pod),
                },
                ..DeploymentSpec::default()
            },
            ..Deployment::default()
        },
        service: Service {
            metadata: metadata(),
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(vec![ServicePort {
                    name: Some("mesh".to_owned()),
                    port: ports::HBONE,
                    target_port: Some(IntOrString::Int(ports::HBONE)),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(name: &'a str) -> WaypointParams<'a> {
        WaypointParams {
            name,
            namespace: "bookinfo",
            gateway_uid: "0b7e6c0e-1111-2222-3333-444455556666",
            image: "ambit/waypoint:0.1.0",
            trust_domain: "cluster.local",
            controller_address: "https://ambit-controller.ambit-system.svc:15012",
        }
    }

    #[test]
    fn waypoint_objects_are_owned_named_and_not_captured() {
        let w = render(&params("waypoint")).unwrap();
        for m in [
            &w.service_account.metadata,
            &w.deployment.metadata,
            &w.service.metadata,
        ] {
            assert_eq!(m.name.as_deref(), Some("waypoint"));
            assert_eq!(m.namespace.as_deref(), Some("bookinfo"));
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.kind, "Gateway");
            assert_eq!(owner.controller, Some(true));
        }
        let pod = w.deployment.spec.template;
        let labels = pod.metadata.unwrap().labels.unwrap();
        assert_eq!(labels[DATAPLANE_MODE_LABEL], "none");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("waypoint"));
        let svc = w.service.spec.unwrap();
        assert_eq!(svc.ports.unwrap()[0].port, 15008);
        assert_eq!(svc.selector.unwrap()[GATEWAY_NAME_LABEL], "waypoint");
    }

    #[test]
    fn hostile_names_are_refused() {
        assert!(matches!(
            render(&params("a\nkind: Secret")),
            Err(WaypointError::InvalidName(_))
        ));
        assert!(matches!(
            render(&params("Upper")),
            Err(WaypointError::InvalidName(_))
        ));
        let mut p = params("ok");
        p.gateway_uid = "";
        assert!(matches!(render(&p), Err(WaypointError::NoUid(_))));
    }
}
