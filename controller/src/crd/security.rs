//! `AuthorizationPolicy` in `security.ambit.dev/v1`: Istio's schema, so operators can
//! bring the policies they already have.
//!
//! Everything is kept as written (strings for ports, CIDRs and principals); conversion to
//! the wire form and its validation happen in the model, which can name the offending
//! object and field.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Who may do what to the selected workloads.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads (pods) in the policy's namespace this policy applies to, by labels. When
    /// neither `selector` nor `targetRefs` is set the policy applies to the whole namespace
    /// (or to the whole mesh when it lives in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Gateways (waypoints) or Services the policy is bound to; such a policy is enforced
    /// by the waypoint, with its L7 parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// What to do when a rule matches. Defaults to ALLOW.
    #[serde(default)]
    pub action: Action,
    /// Rules are ORed. An ALLOW policy with no rules matches nothing; a rule with no
    /// clauses matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// Label selector for workloads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// A workload is selected when it carries every one of these labels.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to the object a policy is bound to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group of the target: `gateway.networking.k8s.io` for a Gateway, empty for a Service.
    #[serde(default)]
    pub group: String,
    /// `Gateway` or `Service`.
    pub kind: String,
    /// Name of the target, in the policy's namespace.
    pub name: String,
}

/// The action a matching rule triggers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow the request when a rule matches; with any ALLOW policy present, requests that
    /// match none are denied.
    #[default]
    Allow,
    /// Deny the request when a rule matches. DENY policies are evaluated first.
    Deny,
    /// Record the match without changing the decision.
    Audit,
}

/// One rule: a request matches when it matches any `from`, any `to` and every `when`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources, ORed. Empty matches any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    /// Operations, ORed. Empty matches any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    /// Extra conditions, ANDed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Wrapper kept for compatibility with Istio's YAML (`from: [{source: {...}}]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct From {
    /// The source a request must come from.
    pub source: Source,
}

/// Wrapper kept for compatibility with Istio's YAML (`to: [{operation: {...}}]`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct To {
    /// The operation a request must perform.
    pub operation: Operation,
}

/// Properties of the request's source. Fields are ANDed, values within a field ORed.
/// String values accept `*` as a whole value (present), a prefix (`*suffix`) or a
/// suffix (`prefix*`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities, `<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Peer identities that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces of the peer identity that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source IPs or CIDRs of the connection, e.g. `10.1.0.0/16` or `10.1.2.3`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Source IPs or CIDRs that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// JWT principals (`iss/sub`). L7 only: on ztunnel a rule using it fails closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// JWT principals that must not match. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Original client IPs (X-Forwarded-For aware). L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Original client IPs that must not match. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Properties of the request itself. Fields are ANDed, values within a field ORed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// HTTP `Host` values. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Hosts that must not match. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings as in Istio (`"8080"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Destination ports that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (gRPC requests are POST). L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Methods that must not match. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// URL paths (gRPC: `/package.Service/Method`). L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths that must not match. L7 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An extra condition on an attribute named by `key` (Istio's keys: `source.ip`,
/// `request.headers[x-name]`, ...).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute, e.g. `destination.port` or `request.headers[x-token]`.
    pub key: String,
    /// The attribute must equal one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// The attribute must equal none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}
