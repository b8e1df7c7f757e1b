//! Ambit's CustomResourceDefinitions: `AuthorizationPolicy` (security.ambit.dev/v1) and
//! `TrafficPolicy` (traffic.ambit.dev/v1), with structural schemas that make the API server refuse
//! bad objects at admission instead of leaving the controller to discover them.
//!
//! Written by hand for now: the controller's Rust types are being written alongside, and a schema
//! generated from them (`kube::CustomResourceExt::crd()`) would not carry the enums, patterns and
//! bounds below unless the types say so. `manifests/tests/crd_schema.rs` checks these schemas
//! against the fixtures in `manifests/examples/`; once the types exist, the same fixtures should
//! deserialize into them (or the CRDs should be generated from them), so the two cannot drift.
//!
//! What is checked, and why it is safe to check:
//! - `action` is one of ALLOW/DENY/AUDIT (DESIGN.md), ports are decimal 1..65535, ipBlocks are IPv4
//!   or IPv6 addresses or CIDRs with a valid prefix length, principals and namespaces have at most
//!   one leading or trailing `*` (the Istio matching rules), paths start with `/` or `*`.
//! - `targetRefs` name a `Service` (core group) or a `Gateway` (gateway.networking.k8s.io), and
//!   cannot be combined with `selector` (they pick the enforcement point in exclusive ways).
//! - A TrafficPolicy must target a Service.
//! - NOT checked: "L7 fields need targetRefs". DESIGN.md gives such a policy a meaning (ztunnel
//!   fails closed on it), so rejecting it at admission would change the semantics, not enforce them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{json, Value};

/// Why a CRD could not be built (a bug in this file; the tests build every CRD).
#[derive(Debug, thiserror::Error)]
#[error("CRD {name} does not fit CustomResourceDefinition")]
pub struct CrdError {
    /// The CRD's name.
    pub name: String,
    /// serde's complaint, with the path of the field.
    #[source]
    pub source: serde_json::Error,
}

/// Ports: decimal 1..65535, as strings (the Istio convention operators know).
const PORT: &str =
    "^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";
/// An IPv4 address, optionally with a /0../32 prefix length.
const IPV4_CIDR: &str = "^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?$";
/// An IPv6 address (loosely: hex groups and colons, optional embedded IPv4), optionally with a
/// /0../128 prefix length. Exact IPv6 syntax is left to the controller.
const IPV6_CIDR: &str =
    "^[0-9a-fA-F:]*:[0-9a-fA-F:]*(:[0-9.]+)?(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$";
/// A principal (`<trust-domain>/ns/<ns>/sa/<sa>`, optionally `spiffe://`-prefixed) or a pattern
/// with one `*` at the start or end, or `*` alone.
const PRINCIPAL: &str = "^(\\*|\\*?[^*\\s]+|[^*\\s]+\\*)$";
/// A namespace name, or a pattern with one `*` at the start or end, or `*` alone.
const NAMESPACE: &str = "^(\\*|\\*?[a-z0-9-]+|[a-z0-9-]+\\*)$";
/// An HTTP method (upper case, as on the wire) or `*`.
const METHOD: &str = "^(\\*|[A-Z]+)$";
/// A path (exact, or with one `*` at the start or end).
const PATH: &str = "^[/*]\\S*$";
/// A host (no whitespace; `*` patterns allowed).
const HOST: &str = "^\\S+$";
/// A Gateway API duration: `1h`, `500ms`, `1m30s`.
const DURATION: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

fn strings(pattern: &str) -> Value {
    json!({ "type": "array", "items": { "type": "string", "pattern": pattern } })
}

fn ip_blocks() -> Value {
    json!({
        "type": "array",
        "items": {
            "type": "string",
            "anyOf": [ { "pattern": IPV4_CIDR }, { "pattern": IPV6_CIDR } ]
        }
    })
}

fn duration(description: &str) -> Value {
    json!({ "type": "string", "pattern": DURATION, "description": description })
}

fn percentage() -> Value {
    json!({
        "type": "number", "minimum": 0, "maximum": 100,
        "description": "Share of requests affected, 0 to 100."
    })
}

fn count(description: &str, minimum: i64) -> Value {
    json!({ "type": "integer", "format": "int32", "minimum": minimum, "maximum": 2147483647_i64,
            "description": description })
}

fn crd(
    group: &str,
    kind: &str,
    plural: &str,
    printer_columns: Value,
    spec: Value,
) -> Result<CustomResourceDefinition, CrdError> {
    let name = format!("{plural}.{group}");
    let value = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "ambit-controller",
                "app.kubernetes.io/part-of": "ambit",
                "app.kubernetes.io/version": env!("CARGO_PKG_VERSION"),
            },
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_lowercase(),
                "categories": ["ambit"],
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "additionalPrinterColumns": printer_columns,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": { "type": "string" },
                        "kind": { "type": "string" },
                        "metadata": { "type": "object" },
                        "spec": spec,
                    },
                }},
            }],
        },
    });
    serde_json::from_value(value).map_err(|source| CrdError { name, source })
}

/// `authorizationpolicies.security.ambit.dev`.
pub fn authorization_policy() -> Result<CustomResourceDefinition, CrdError> {
    let source = json!({
        "type": "object",
        "description": "Who the peer is. All fields set must match; within a field, any item.",
        "properties": {
            "principals": strings(PRINCIPAL),
            "notPrincipals": strings(PRINCIPAL),
            "namespaces": strings(NAMESPACE),
            "notNamespaces": strings(NAMESPACE),
            "ipBlocks": ip_blocks(),
            "notIpBlocks": ip_blocks(),
        },
    });
    let operation = json!({
        "type": "object",
        "description": "What the request does. ports are L4; methods, paths and hosts are L7 \
                        (enforced by a waypoint; on ztunnel a rule with them fails closed).",
        "properties": {
            "ports": strings(PORT),
            "notPorts": strings(PORT),
            "methods": strings(METHOD),
            "notMethods": strings(METHOD),
            "paths": strings(PATH),
            "notPaths": strings(PATH),
            "hosts": strings(HOST),
            "notHosts": strings(HOST),
        },
    });
    let spec = json!({
        "type": "object",
        "description": "Istio-style authorization: action applies when any rule matches.",
        "properties": {
            "targetRefs": {
                "type": "array",
                "description": "Bind the policy to a waypoint (Gateway) or to the waypoint of a \
                                Service; without targetRefs or selector it applies to the whole \
                                namespace, enforced by ztunnel.",
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "properties": {
                        "group": { "type": "string", "maxLength": 253 },
                        "kind": { "type": "string", "enum": ["Gateway", "Service"] },
                        "name": { "type": "string", "minLength": 1, "maxLength": 253 },
                    },
                    "x-kubernetes-validations": [{
                        "rule": "self.kind == 'Gateway' ? (has(self.group) && self.group == 'gateway.networking.k8s.io') : (!has(self.group) || self.group == '')",
                        "message": "a Gateway is in group gateway.networking.k8s.io, a Service in the core group (\"\")",
                    }],
                },
            },
            "selector": {
                "type": "object",
                "description": "Apply to the workloads whose labels match (enforced by ztunnel).",
                "properties": {
                    "matchLabels": {
                        "type": "object",
                        "additionalProperties": { "type": "string" },
                    },
                },
            },
            "action": {
                "type": "string",
                "enum": ["ALLOW", "DENY", "AUDIT"],
                "default": "ALLOW",
            },
            "rules": {
                "type": "array",
                "description": "A rule matches when all of its from, to and when match.",
                "items": {
                    "type": "object",
                    "properties": {
                        "from": {
                            "type": "array",
                            "items": {
                                "type": "object", "required": ["source"],
                                "properties": { "source": source },
                            },
                        },
                        "to": {
                            "type": "array",
                            "items": {
                                "type": "object", "required": ["operation"],
                                "properties": { "operation": operation },
                            },
                        },
                        "when": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["key"],
                                "properties": {
                                    "key": { "type": "string", "minLength": 1 },
                                    "values": { "type": "array", "items": { "type": "string" } },
                                    "notValues": { "type": "array", "items": { "type": "string" } },
                                },
                            },
                        },
                    },
                },
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!(has(self.targetRefs) && has(self.selector))",
            "message": "set targetRefs or selector, not both",
        }],
    });
    let columns = json!([
        { "name": "Action", "type": "string", "jsonPath": ".spec.action" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "security.ambit.dev",
        "AuthorizationPolicy",
        "authorizationpolicies",
        columns,
        spec,
    )
}

/// `trafficpolicies.traffic.ambit.dev`.
pub fn traffic_policy() -> Result<CustomResourceDefinition, CrdError> {
    let spec = json!({
        "type": "object",
        "description": "Resilience settings Gateway API lacks, for traffic to one Service.",
        "required": ["targetRef"],
        "properties": {
            "targetRef": {
                "type": "object",
                "required": ["kind", "name"],
                "properties": {
                    "group": { "type": "string", "enum": [""] },
                    "kind": { "type": "string", "enum": ["Service"] },
                    "name": { "type": "string", "minLength": 1, "maxLength": 63 },
                },
            },
            "loadBalancer": {
                "type": "object",
                "required": ["algorithm"],
                "properties": {
                    "algorithm": {
                        "type": "string",
                        "enum": ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"],
                    },
                },
            },
            "circuitBreaker": {
                "type": "object",
                "description": "Limits beyond which new requests fail fast (503).",
                "properties": {
                    "maxConnections": count("Connections to the Service.", 1),
                    "maxPendingRequests": count("Requests waiting for a connection.", 1),
                    "maxRequests": count("Requests in flight.", 1),
                    "maxRetries": count("Retries in flight.", 0),
                },
            },
            "outlierDetection": {
                "type": "object",
                "description": "Eject endpoints that keep failing.",
                "properties": {
                    "consecutiveErrors": count("Consecutive 5xx/connect errors that eject.", 1),
                    "interval": duration("How often endpoints are evaluated."),
                    "baseEjectionTime": duration("Ejection time, multiplied by ejection count."),
                    "maxEjectionPercent": {
                        "type": "integer", "format": "int32", "minimum": 0, "maximum": 100,
                        "description": "Most endpoints ever ejected at once (%).",
                    },
                },
            },
            "rateLimit": {
                "type": "object",
                "description": "A local token bucket per proxy; requests beyond it get 429.",
                "required": ["maxTokens", "tokensPerFill", "fillInterval"],
                "properties": {
                    "maxTokens": count("Bucket size.", 1),
                    "tokensPerFill": count("Tokens added per interval.", 1),
                    "fillInterval": duration("Interval between fills."),
                },
            },
            "faultInjection": {
                "type": "object",
                "properties": {
                    "delay": {
                        "type": "object",
                        "required": ["fixedDelay"],
                        "properties": {
                            "percentage": percentage(),
                            "fixedDelay": duration("Delay added before forwarding."),
                        },
                    },
                    "abort": {
                        "type": "object",
                        "required": ["httpStatus"],
                        "properties": {
                            "percentage": percentage(),
                            "httpStatus": {
                                "type": "integer", "format": "int32",
                                "minimum": 200, "maximum": 599,
                            },
                        },
                    },
                },
            },
        },
    });
    let columns = json!([
        { "name": "Service", "type": "string", "jsonPath": ".spec.targetRef.name" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "traffic.ambit.dev",
        "TrafficPolicy",
        "trafficpolicies",
        columns,
        spec,
    )
}

/// Both CRDs.
pub fn all() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    Ok(vec![authorization_policy()?, traffic_policy()?])
}
