//! `Object`: one rendered Kubernetes object of a kind the install uses, kept typed until the last
//! moment, and read back from YAML by its `apiVersion`/`kind` (which is how tests prove that a file
//! holds nothing its k8s-openapi type would drop).

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::Serialize;
use serde_json::Value;

use crate::gateway::GatewayClass;
use crate::RenderError;

/// One object of the install.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // a handful of objects, built once
pub enum Object {
    /// `v1/Namespace`
    Namespace(Namespace),
    /// `v1/ServiceAccount`
    ServiceAccount(ServiceAccount),
    /// `v1/Secret`
    Secret(Secret),
    /// `v1/ConfigMap`
    ConfigMap(ConfigMap),
    /// `v1/Service`
    Service(Service),
    /// `rbac.authorization.k8s.io/v1/Role`
    Role(Role),
    /// `rbac.authorization.k8s.io/v1/RoleBinding`
    RoleBinding(RoleBinding),
    /// `rbac.authorization.k8s.io/v1/ClusterRole`
    ClusterRole(ClusterRole),
    /// `rbac.authorization.k8s.io/v1/ClusterRoleBinding`
    ClusterRoleBinding(ClusterRoleBinding),
    /// `apps/v1/Deployment`
    Deployment(Deployment),
    /// `apps/v1/DaemonSet`
    DaemonSet(DaemonSet),
    /// `policy/v1/PodDisruptionBudget`
    PodDisruptionBudget(PodDisruptionBudget),
    /// `apiextensions.k8s.io/v1/CustomResourceDefinition`
    CustomResourceDefinition(CustomResourceDefinition),
    /// `gateway.networking.k8s.io/v1/GatewayClass`
    GatewayClass(GatewayClass),
}

/// Why a JSON/YAML document is not an `Object`.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The document has no string `apiVersion` or `kind`.
    #[error("document has no apiVersion/kind")]
    NoKind,
    /// The kind is not one the install uses.
    #[error("unexpected kind {api_version}/{kind}")]
    UnknownKind {
        /// The document's `apiVersion`.
        api_version: String,
        /// The document's `kind`.
        kind: String,
    },
    /// The document does not fit its kind's type.
    #[error("{kind} does not fit its type")]
    Invalid {
        /// The document's `kind`.
        kind: String,
        /// serde's complaint, with the path of the field.
        #[source]
        source: serde_json::Error,
    },
}

fn typed<T: serde::de::DeserializeOwned>(value: Value, kind: &str) -> Result<T, ObjectError> {
    serde_json::from_value(value).map_err(|source| ObjectError::Invalid {
        kind: kind.to_owned(),
        source,
    })
}

/// `(apiVersion, kind)` of a k8s-openapi type.
fn key<T: Resource>() -> (&'static str, &'static str) {
    (T::API_VERSION, T::KIND)
}

impl Object {
    /// Reads one document by its `apiVersion` and `kind`.
    pub fn from_value(value: Value) -> Result<Self, ObjectError> {
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind = value.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            return Err(ObjectError::NoKind);
        };
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());
        let k = (api_version.as_str(), kind.as_str());
        Ok(match k {
            _ if k == key::<Namespace>() => Self::Namespace(typed(value, &kind)?),
            _ if k == key::<ServiceAccount>() => Self::ServiceAccount(typed(value, &kind)?),
            _ if k == key::<Secret>() => Self::Secret(typed(value, &kind)?),
            _ if k == key::<ConfigMap>() => Self::ConfigMap(typed(value, &kind)?),
            _ if k == key::<Service>() => Self::Service(typed(value, &kind)?),
            _ if k == key::<Role>() => Self::Role(typed(value, &kind)?),
            _ if k == key::<RoleBinding>() => Self::RoleBinding(typed(value, &kind)?),
            _ if k == key::<ClusterRole>() => Self::ClusterRole(typed(value, &kind)?),
            _ if k == key::<ClusterRoleBinding>() => Self::ClusterRoleBinding(typed(value, &kind)?),
            _ if k == key::<Deployment>() => Self::Deployment(typed(value, &kind)?),
            _ if k == key::<DaemonSet>() => Self::DaemonSet(typed(value, &kind)?),
            _ if k == key::<PodDisruptionBudget>() => {
                Self::PodDisruptionBudget(typed(value, &kind)?)
            }
            _ if k == key::<CustomResourceDefinition>() => {
                Self::CustomResourceDefinition(typed(value, &kind)?)
            }
            (GatewayClass::API_VERSION, GatewayClass::KIND) => {
                Self::GatewayClass(typed(value, &kind)?)
            }
            _ => return Err(ObjectError::UnknownKind { api_version, kind }),
        })
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => o.metadata(),
            Self::ServiceAccount(o) => o.metadata(),
            Self::Secret(o) => o.metadata(),
            Self::ConfigMap(o) => o.metadata(),
            Self::Service(o) => o.metadata(),
            Self::Role(o) => o.metadata(),
            Self::RoleBinding(o) => o.metadata(),
            Self::ClusterRole(o) => o.metadata(),
            Self::ClusterRoleBinding(o) => o.metadata(),
            Self::Deployment(o) => o.metadata(),
            Self::DaemonSet(o) => o.metadata(),
            Self::PodDisruptionBudget(o) => o.metadata(),
            Self::CustomResourceDefinition(o) => o.metadata(),
            Self::GatewayClass(o) => &o.metadata,
        }
    }

    /// The object's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Namespace(_) => Namespace::KIND,
            Self::ServiceAccount(_) => ServiceAccount::KIND,
            Self::Secret(_) => Secret::KIND,
            Self::ConfigMap(_) => ConfigMap::KIND,
            Self::Service(_) => Service::KIND,
            Self::Role(_) => Role::KIND,
            Self::RoleBinding(_) => RoleBinding::KIND,
            Self::ClusterRole(_) => ClusterRole::KIND,
            Self::ClusterRoleBinding(_) => ClusterRoleBinding::KIND,
            Self::Deployment(_) => Deployment::KIND,
            Self::DaemonSet(_) => DaemonSet::KIND,
            Self::PodDisruptionBudget(_) => PodDisruptionBudget::KIND,
            Self::CustomResourceDefinition(_) => CustomResourceDefinition::KIND,
            Self::GatewayClass(_) => GatewayClass::KIND,
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(&self) -> bool {
        matches!(
            self,
            Self::ServiceAccount(_)
                | Self::Secret(_)
                | Self::ConfigMap(_)
                | Self::Service(_)
                | Self::Role(_)
                | Self::RoleBinding(_)
                | Self::Deployment(_)
                | Self::DaemonSet(_)
                | Self::PodDisruptionBudget(_)
        )
    }

    /// The object as a JSON value (what YAML and JSON output are made from).
    pub fn to_value(&self) -> Result<Value, RenderError> {
        serde_json::to_value(self).map_err(|source| RenderError::Serialize {
            kind: self.kind().to_owned(),
            name: self.metadata().name.clone().unwrap_or_default(),
            source,
        })
    }
}
