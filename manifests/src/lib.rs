//! Ambit's Kubernetes install, as typed objects.
//!
//! Every object that `ambitctl install` prints (and that `manifests/install/*.yaml` holds) is built
//! here with `k8s-openapi` types rather than text templates: a misspelled field does not compile,
//! user input (namespace, image, trust domain) can only ever land in a string value, never in the
//! YAML structure, and tests can inspect the objects field by field. The same goes for the waypoint
//! template ([`waypoint`]), which the controller fills per `Gateway`.
//!
//! Not here: talking to a cluster (nothing in this crate does I/O beyond reading the CA files the
//! operator names), and the Gateway API CRDs, which users install from upstream.

mod container;
pub mod controller;
pub mod crds;
pub mod gateway;
mod meta;
mod object;
pub mod pki;
pub mod rbac;
pub mod waypoint;
mod yaml;
pub mod ztunnel;

pub use object::{Object, ObjectError};

/// The namespace Ambit installs into unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "ambit-system";
/// The trust domain of SPIFFE identities unless told otherwise.
pub use ambit_proto::DEFAULT_TRUST_DOMAIN;
/// Where images come from unless told otherwise: a bare name, as `kind load` / local builds tag them.
pub const DEFAULT_IMAGE_REGISTRY: &str = "ambit";
/// The audience of the projected tokens proxies present to the CA (checked with TokenReview).
pub const CA_TOKEN_AUDIENCE: &str = "ambit-ca";
/// ConfigMap holding the trust anchor (`root-cert.pem`): the controller publishes it, proxies
/// mount it to verify the controller.
pub const ROOT_CERT_CONFIGMAP: &str = "ambit-root-cert";
/// The `GatewayClass` whose `Gateway`s are Ambit waypoints.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";
/// The `controllerName` of that class.
pub const WAYPOINT_CONTROLLER_NAME: &str = "ambit.dev/waypoint-controller";

/// The ports (the root ARCHITECTURE.md, "Ports") that the objects here mention, as the `i32`
/// Kubernetes objects carry; the numbers are [`ambit_proto::ports`].
pub mod ports {
    use ambit_proto::ports as p;

    /// Inbound HBONE (ztunnel in each pod's netns, and waypoints).
    pub const HBONE: i32 = p::HBONE as i32;
    /// Admin, localhost only: never exposed by a Service or containerPort.
    pub const ADMIN: i32 = p::ADMIN as i32;
    /// Prometheus metrics of every proxy.
    pub const METRICS: i32 = p::METRICS as i32;
    /// Readiness of every proxy.
    pub const READINESS: i32 = p::READINESS as i32;
    /// Controller: discovery and CA (gRPC over TLS).
    pub const DISCOVERY: i32 = p::DISCOVERY as i32;
    /// Controller: metrics, health and dashboard.
    pub const CONTROLLER_HTTP: i32 = p::CONTROLLER_OPS as i32;
}

/// What `ambitctl install` lets an operator choose.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Namespace of the controller and the ztunnel DaemonSet.
    pub namespace: String,
    /// Registry (and path) the images live under: `<registry>/<component>:<tag>`.
    pub image_registry: String,
    /// Image tag of all components.
    pub tag: String,
    /// SPIFFE trust domain of every identity.
    pub trust_domain: String,
    /// A root the operator plugs in; without one the controller generates its own.
    pub root_ca: Option<pki::RootCa>,
    /// Install the waypoint `GatewayClass` and the permissions to run waypoints.
    pub enable_waypoints: bool,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            image_registry: DEFAULT_IMAGE_REGISTRY.to_owned(),
            tag: env!("CARGO_PKG_VERSION").to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            root_ca: None,
            enable_waypoints: false,
        }
    }
}

impl InstallOptions {
    /// The image reference of one component (`controller`, `ztunnel`, `waypoint`).
    pub fn image(&self, component: &str) -> String {
        format!(
            "{}/{}:{}",
            self.image_registry.trim_end_matches('/'),
            component,
            self.tag
        )
    }

    /// The controller's in-cluster URL, as proxies dial it (`--controller` / `AMBIT_CONTROLLER`).
    pub fn controller_address(&self) -> String {
        format!(
            "https://{}.{}.svc:{}",
            controller::NAME,
            self.namespace,
            ports::DISCOVERY
        )
    }

    /// Checks the options before anything is built. Typed objects keep input out of the YAML
    /// structure, but an invalid name would still only fail at `kubectl apply`, far from its cause.
    pub fn validate(&self) -> Result<(), RenderError> {
        if !meta::is_dns1123_label(&self.namespace) {
            return Err(RenderError::InvalidOption {
                option: "namespace",
                value: self.namespace.clone(),
                reason: "must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)",
            });
        }
        if !meta::is_trust_domain(&self.trust_domain) {
            return Err(RenderError::InvalidOption {
                option: "trust-domain",
                value: self.trust_domain.clone(),
                reason:
                    "must be lower-case letters, digits, '.', '-' and '_' (a SPIFFE trust domain)",
            });
        }
        if !meta::is_image_registry(&self.image_registry) {
            return Err(RenderError::InvalidOption {
                option: "image-registry",
                value: self.image_registry.clone(),
                reason: "must be a non-empty registry/path without whitespace or '@'",
            });
        }
        if !meta::is_image_tag(&self.tag) {
            return Err(RenderError::InvalidOption {
                option: "tag",
                value: self.tag.clone(),
                reason: "must be an image tag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
            });
        }
        Ok(())
    }
}

/// Why the install could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// An option has a value Kubernetes would refuse.
    #[error("--{option} {value:?}: {reason}")]
    InvalidOption {
        /// The option's command-line name.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
    /// Serializing an object failed (a bug: every object here is serializable).
    #[error("serializing {kind} {name}")]
    Serialize {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The serializer's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A CRD literal does not fit its type (a bug, caught by the tests).
    #[error(transparent)]
    Crd(#[from] crds::CrdError),
}

/// One file of the install: `kubectl apply -f DIR` applies them in name order, so the namespace and
/// CRDs come first.
#[derive(Clone, Debug)]
pub struct ManifestFile {
    /// File name, e.g. `02-rbac.yaml`.
    pub name: &'static str,
    /// Its objects, in apply order.
    pub objects: Vec<Object>,
}

/// Builds the whole install.
pub fn render(opts: &InstallOptions) -> Result<Vec<ManifestFile>, RenderError> {
    opts.validate()?;
    let mut files = vec![
        ManifestFile {
            name: "00-namespace.yaml",
            objects: vec![Object::Namespace(controller::namespace(opts))],
        },
        ManifestFile {
            name: "01-crds.yaml",
            objects: crds::all()?
                .into_iter()
                .map(Object::CustomResourceDefinition)
                .collect(),
        },
        ManifestFile {
            name: "02-rbac.yaml",
            objects: rbac::objects(opts),
        },
        ManifestFile {
            name: "03-controller.yaml",
            objects: controller::objects(opts),
        },
        ManifestFile {
            name: "04-ztunnel.yaml",
            objects: vec![Object::DaemonSet(ztunnel::daemonset(opts))],
        },
    ];
    if opts.enable_waypoints {
        // Kept in a file of its own: it needs the Gateway API CRDs, and the files before it are the
        // same with or without waypoints.
        let mut objects = vec![Object::GatewayClass(gateway::waypoint_class())];
        objects.extend(rbac::waypoint_objects(opts));
        files.push(ManifestFile {
            name: "05-waypoints.yaml",
            objects,
        });
    }
    Ok(files)
}

/// Every object of `files` as one YAML stream (`---` between documents).
pub fn to_yaml(files: &[ManifestFile]) -> Result<String, RenderError> {
    let mut out = String::new();
    for file in files {
        out.push_str(&file_to_yaml(file)?);
    }
    Ok(out)
}

/// One file as a YAML stream, one document per object.
pub fn file_to_yaml(file: &ManifestFile) -> Result<String, RenderError> {
    let mut out = String::new();
    for object in &file.objects {
        let value = object.to_value()?;
        out.push_str("---\n");
        out.push_str(&yaml::to_string(&value));
    }
    Ok(out)
}

/// Every object of `files` as one JSON `v1/List`, which `kubectl apply -f -` accepts.
pub fn to_json(files: &[ManifestFile]) -> Result<String, RenderError> {
    let items = files
        .iter()
        .flat_map(|f| &f.objects)
        .map(Object::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
    serde_json::to_string_pretty(&list).map_err(|source| RenderError::Serialize {
        kind: "List".to_owned(),
        name: String::new(),
        source,
    })
}
