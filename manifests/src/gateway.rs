//! The one Gateway API object Ambit installs: the `ambit-waypoint` `GatewayClass`.
//!
//! k8s-openapi has no Gateway API types and Ambit does not own that API (users install the upstream
//! CRDs, standard channel), so this is a minimal typed mirror of `GatewayClass` with only the fields
//! we set. `deny_unknown_fields` makes reading a document with any other field an error, so the
//! round-trip tests catch a misspelling here as they do for the k8s-openapi types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::{meta, WAYPOINT_CLASS, WAYPOINT_CONTROLLER_NAME};

/// `gateway.networking.k8s.io/v1` `GatewayClass`, reduced to what we write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayClass {
    /// Always [`GatewayClass::API_VERSION`].
    pub api_version: String,
    /// Always [`GatewayClass::KIND`].
    pub kind: String,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// Which controller implements the class.
    pub spec: GatewayClassSpec,
}

impl GatewayClass {
    /// The Gateway API group/version (v1 is in the standard channel since Gateway API v1.0).
    pub const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
    /// The kind.
    pub const KIND: &'static str = "GatewayClass";
}

/// `GatewayClass.spec`, reduced to what we write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayClassSpec {
    /// The controller that reconciles `Gateway`s of this class.
    pub controller_name: String,
    /// Shown by `kubectl describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The `ambit-waypoint` class: a `Gateway` of this class is a waypoint the controller deploys.
pub fn waypoint_class() -> GatewayClass {
    GatewayClass {
        api_version: GatewayClass::API_VERSION.to_owned(),
        kind: GatewayClass::KIND.to_owned(),
        metadata: meta::cluster_meta(WAYPOINT_CLASS, "waypoint"),
        spec: GatewayClassSpec {
            controller_name: WAYPOINT_CONTROLLER_NAME.to_owned(),
            description: Some(
                "Ambit waypoint: an L7 proxy for the namespace or service that names it with \
                 ambit.dev/use-waypoint"
                    .to_owned(),
            ),
        },
    }
}
