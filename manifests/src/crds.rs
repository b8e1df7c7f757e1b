//! Ambit's CustomResourceDefinitions: `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication` (security.ambit.dev/v1), `TrafficPolicy` (traffic.ambit.dev/v1) and
//! `ExternalService` (networking.ambit.dev/v1), with structural schemas that make the API server refuse
//! bad objects at admission instead of leaving the controller to discover them.
//!
//! Written by hand, field for field after the controller's types (`controller/src/crd/`): a schema
//! generated from them (`kube::CustomResourceExt::crd()`) would not carry the patterns and bounds
//! below, since the types keep ports, CIDRs and durations as strings. `manifests/tests/crd_schema.rs` checks these schemas
//! against the fixtures in `manifests/examples/`; once the types exist, the same fixtures should
//! deserialize into them (or the CRDs should be generated from them), so the two cannot drift.
//!
//! What is checked, and why it is safe to check:
//! - `action` is one of ALLOW/DENY/AUDIT, ports are decimal 1..65535, ipBlocks are IPv4
//!   or IPv6 addresses or CIDRs with a valid prefix length, principals and namespaces have at most
//!   one leading or trailing `*` (the Istio matching rules), paths start with `/` or `*`.
//! - `targetRefs` name a `Service` (core group), a `Gateway` (gateway.networking.k8s.io) or an
//!   `ExternalService` (networking.ambit.dev, egress through its waypoint), and cannot be combined with `selector` (they pick the enforcement point in exclusive ways).
//! - A TrafficPolicy must target a Service; percentages are 0..100, abort statuses 200..599,
//!   durations are Go-style (`250ms`, `1m30s`), counts fit the controller's `u32`.
//! - A PeerAuthentication's modes are UNSET/DISABLE/PERMISSIVE/STRICT, its `portLevelMtls` keys
//!   are ports 1..65535 and need a `selector` (as Istio validates them).
//! - A RequestAuthentication's `targetRefs` and `jwtRules` are not empty when given; each rule
//!   has an issuer and exactly one of `jwksUri` (http or https) and `jwks`. That both lists
//!   are there and that `jwks` parses as a key set is the controller's check (the types keep
//!   them optional, as Istio's do, and CEL cannot parse JSON).
//! - An ExternalService's hosts are DNS names (a leading `*.` allowed), its addresses IPs or
//!   CIDRs, its ports 1..65535 with Istio's protocol names, its resolution NONE/STATIC/DNS, and
//!   STATIC needs endpoints. That hosts and ports are there, unique, and that endpoints fit
//!   the resolution is the controller's check, naming the field.
//! - NOT checked: "L7 fields need targetRefs". The root ARCHITECTURE.md gives such a policy a meaning (ztunnel
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
/// A Go-style duration, as Istio writes them: `10s`, `250ms`, `1m30s`, `1.5s`.
const DURATION: &str = "^([0-9]+(\\.[0-9]+)?(h|m|s|ms|us|ns))+$";

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

/// A `u32` in the controller's types.
fn count(description: &str) -> Value {
    json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": 4_294_967_295_u32,
            "description": description })
}

fn crd(
    group: &str,
    kind: &str,
    plural: &str,
    short_name: &str,
    printer_columns: Value,
    spec: Value,
) -> Value {
    let name = format!("{plural}.{group}");
    json!({
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
                "shortNames": [short_name],
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
    })
}

/// `authorizationpolicies.security.ambit.dev`, as JSON.
pub fn authorization_policy() -> Value {
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
            "requestPrincipals": strings(PRINCIPAL),
            "notRequestPrincipals": strings(PRINCIPAL),
            "remoteIpBlocks": ip_blocks(),
            "notRemoteIpBlocks": ip_blocks(),
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
                                Service or ExternalService; without targetRefs or selector it applies to the whole \
                                namespace, enforced by ztunnel.",
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "properties": {
                        "group": { "type": "string", "maxLength": 253 },
                        "kind": { "type": "string", "enum": ["Gateway", "Service", "ExternalService"] },
                        "name": { "type": "string", "minLength": 1, "maxLength": 253 },
                    },
                    "x-kubernetes-validations": [{
                        "rule": "self.kind == 'Gateway' ? (has(self.group) && self.group == 'gateway.networking.k8s.io') : self.kind == 'ExternalService' ? (has(self.group) && self.group == 'networking.ambit.dev') : (!has(self.group) || self.group == '')",
                        "message": "a Gateway is in group gateway.networking.k8s.io, an ExternalService in networking.ambit.dev, a Service in the core group (\"\")",
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
        "ap",
        columns,
        spec,
    )
}

/// `trafficpolicies.traffic.ambit.dev`, as JSON.
pub fn traffic_policy() -> Value {
    let connection_pool = json!({
        "type": "object",
        "description": "Limits on connections and requests to the service (circuit breaking). \
                        Unset means unlimited.",
        "properties": {
            "maxConnections": count("Maximum concurrent connections to the service."),
            "maxPendingRequests": count("Maximum requests waiting for a connection."),
            "maxRequestsPerConnection":
                count("Requests per connection before it is recycled (1 disables keep-alive)."),
        },
    });
    let spec = json!({
        "type": "object",
        "description": "Resilience settings Gateway API lacks, for traffic to one Service.",
        "required": ["targetRef"],
        "properties": {
            "targetRef": {
                "type": "object",
                "description": "The Service these settings apply to, in the policy's namespace.",
                "required": ["name"],
                "properties": {
                    "group": { "type": "string", "enum": [""], "default": "" },
                    "kind": { "type": "string", "enum": ["Service"], "default": "Service" },
                    "name": { "type": "string", "minLength": 1, "maxLength": 63 },
                },
            },
            // `circuitBreaker` is an accepted alias of `connectionPool` (the controller's type
            // reads either); both are in the schema so the API server does not prune either.
            "connectionPool": connection_pool.clone(),
            "circuitBreaker": connection_pool,
            "outlierDetection": {
                "type": "object",
                "description": "Ejects endpoints that keep failing.",
                "properties": {
                    "consecutive5xxErrors":
                        count("Consecutive 5xx responses before an endpoint is ejected."),
                    "consecutiveGatewayErrors":
                        count("Consecutive 502/503/504 or connect failures before ejection."),
                    "interval": duration("How often ejections are evaluated, e.g. 10s."),
                    "baseEjectionTime":
                        duration("Minimum ejection time, multiplied by the number of ejections."),
                    "maxEjectionPercent": {
                        "type": "integer", "format": "int32", "minimum": 0, "maximum": 100,
                        "description": "Upper bound on the share of endpoints ejected at once.",
                    },
                },
            },
            "rateLimit": {
                "type": "object",
                "description": "Local (per-waypoint) token-bucket rate limit.",
                "required": ["tokensPerFill", "fillInterval", "maxTokens"],
                "properties": {
                    "tokensPerFill": count("Tokens added at every fill."),
                    "fillInterval": duration("Time between fills, e.g. 1s."),
                    "maxTokens": count("Bucket size (burst)."),
                    "perSourceIdentity": {
                        "type": "boolean",
                        "description": "One bucket per source identity rather than one for all.",
                    },
                },
            },
            "faultInjection": {
                "type": "object",
                "description": "Delays or aborts a share of requests, for testing resilience.",
                "properties": {
                    "delay": {
                        "type": "object",
                        "required": ["fixedDelay"],
                        "properties": {
                            "fixedDelay": duration("How long to wait before forwarding."),
                            "percentage": percentage(),
                        },
                    },
                    "abort": {
                        "type": "object",
                        "required": ["httpStatus"],
                        "properties": {
                            "httpStatus": {
                                "type": "integer", "format": "int32",
                                "minimum": 200, "maximum": 599,
                                "description": "HTTP status returned.",
                            },
                            "percentage": percentage(),
                        },
                    },
                },
            },
            "loadBalancer": {
                "type": "object",
                "description": "How the waypoint picks an endpoint.",
                "properties": {
                    "simple": {
                        "type": "string",
                        "enum": ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"],
                    },
                    "consistentHash": {
                        "type": "object",
                        "required": ["httpHeaderName"],
                        "properties": {
                            "httpHeaderName": { "type": "string", "minLength": 1 },
                        },
                    },
                },
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!(has(self.connectionPool) && has(self.circuitBreaker))",
            "message": "circuitBreaker is another name for connectionPool: set one of them",
        }],
    });
    let columns = json!([
        { "name": "Service", "type": "string", "jsonPath": ".spec.targetRef.name" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "traffic.ambit.dev",
        "TrafficPolicy",
        "trafficpolicies",
        "tp",
        columns,
        spec,
    )
}

/// `peerauthentications.security.ambit.dev`, as JSON.
pub fn peer_authentication() -> Value {
    let mtls = json!({
        "type": "object",
        "properties": {
            "mode": {
                "type": "string",
                "enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"],
                "default": "UNSET",
                "description": "UNSET inherits (port, workload, namespace, mesh, then \
                                ztunnel's --strict-inbound); DISABLE and PERMISSIVE accept \
                                plaintext; STRICT refuses it.",
            },
        },
    });
    let spec = json!({
        "type": "object",
        "description": "Istio-style peer authentication: the mTLS mode of the selected \
                        workloads (no selector: the namespace; in the root namespace: the mesh).",
        "properties": {
            "selector": {
                "type": "object",
                "description": "Apply to the workloads of this namespace whose labels match.",
                "properties": {
                    "matchLabels": {
                        "type": "object",
                        "additionalProperties": { "type": "string" },
                    },
                },
            },
            "mtls": mtls.clone(),
            "portLevelMtls": {
                "type": "object",
                "description": "Modes by the workload's own (target) port; they win over mtls. \
                                Only with a selector.",
                "additionalProperties": mtls,
                "x-kubernetes-validations": [{
                    "rule": format!("self.all(k, k.matches('{PORT}'))"),
                    "message": "portLevelMtls keys are port numbers 1-65535",
                }],
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || (has(self.selector) && has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0)",
            "message": "portLevelMtls needs a selector",
        }],
    });
    let columns = json!([
        { "name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "security.ambit.dev",
        "PeerAuthentication",
        "peerauthentications",
        "pa",
        columns,
        spec,
    )
}

/// `requestauthentications.security.ambit.dev`, as JSON.
pub fn request_authentication() -> Value {
    let spec = json!({
        "type": "object",
        "description": "JWT validation at waypoints (Istio's RequestAuthentication): a request \
                        with a bad token is refused (401); one without a token goes on without \
                        a request principal, for AuthorizationPolicy to decide on.",
        "properties": {
            "targetRefs": {
                "type": "array",
                "description": "The waypoint (Gateway) or Service whose requests are \
                                authenticated. The controller refuses an object without it \
                                (tokens are validated by waypoints), naming the field.",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "properties": {
                        "group": { "type": "string", "maxLength": 253 },
                        "kind": { "type": "string", "enum": ["Gateway", "Service", "ExternalService"] },
                        "name": { "type": "string", "minLength": 1, "maxLength": 253 },
                    },
                    "x-kubernetes-validations": [{
                        "rule": "self.kind == 'Gateway' ? (has(self.group) && self.group == 'gateway.networking.k8s.io') : self.kind == 'ExternalService' ? (has(self.group) && self.group == 'networking.ambit.dev') : (!has(self.group) || self.group == '')",
                        "message": "a Gateway is in group gateway.networking.k8s.io, an ExternalService in networking.ambit.dev, a Service in the core group (\"\")",
                    }],
                },
            },
            "selector": {
                "type": "object",
                "description": "Accepted for Istio's YAML, refused by the controller: Ambit \
                                validates tokens at waypoints only, so use targetRefs.",
                "properties": {
                    "matchLabels": {
                        "type": "object",
                        "additionalProperties": { "type": "string" },
                    },
                },
            },
            "jwtRules": {
                "type": "array",
                "description": "One rule per accepted issuer.",
                "minItems": 1,
                "maxItems": 64,
                "items": {
                    "type": "object",
                    "required": ["issuer"],
                    "properties": {
                        "issuer": {
                            "type": "string", "minLength": 1,
                            "description": "The token's iss, exactly.",
                        },
                        "audiences": {
                            "type": "array", "items": { "type": "string", "minLength": 1 },
                            "description": "Accepted aud values; empty accepts any.",
                        },
                        "jwksUri": {
                            "type": "string", "pattern": "^https?://[^/\\s]+(/\\S*)?$",
                            "description": "URL of the issuer's JSON Web Key Set (fetched and \
                                            refreshed by the waypoint).",
                        },
                        "jwks": {
                            "type": "string", "minLength": 2,
                            "description": "The issuer's JSON Web Key Set itself, as JSON text.",
                        },
                        "fromHeaders": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": { "type": "string", "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$" },
                                    "prefix": { "type": "string" },
                                },
                            },
                        },
                        "fromParams": {
                            "type": "array", "items": { "type": "string", "minLength": 1 },
                        },
                        "forwardOriginalToken": { "type": "boolean" },
                        "outputPayloadToHeader": {
                            "type": "string", "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
                        },
                    },
                    "x-kubernetes-validations": [{
                        "rule": "has(self.jwksUri) != has(self.jwks)",
                        "message": "give jwksUri or jwks, exactly one",
                    }],
                },
            },
        },
    });
    let columns = json!([
        { "name": "Issuer", "type": "string", "jsonPath": ".spec.jwtRules[0].issuer" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "security.ambit.dev",
        "RequestAuthentication",
        "requestauthentications",
        "ra",
        columns,
        spec,
    )
}

/// A DNS name as RFC 1123 writes one, optionally with a `*.` prefix (a wildcard).
const DNS_NAME: &str = "^(\\*\\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

/// A port number 1..65535, as an integer.
fn port_number(description: &str) -> Value {
    json!({ "type": "integer", "format": "int64", "minimum": 1, "maximum": 65535,
            "description": description })
}

/// `externalservices.networking.ambit.dev`, as JSON.
pub fn external_service() -> Value {
    let spec = json!({
        "type": "object",
        "description": "A destination outside the mesh declared to it (the fields of Istio's \
                        ServiceEntry): its workloads may reach it even under a namespace's \
                        REGISTRY_ONLY outbound policy.",
        "properties": {
            "hosts": {
                "type": "array",
                "description": "DNS names of the service; at least one (the controller \
                                refuses an object without, naming the field). A leading \
                                '*.' wildcard is allowed except with resolution DNS.",
                "minItems": 1,
                "items": { "type": "string", "maxLength": 253, "pattern": DNS_NAME },
            },
            "addresses": {
                "description": "IP addresses or CIDRs the service answers on.",
                "type": "array",
                "items": ip_blocks()["items"].clone(),
            },
            "ports": {
                "type": "array",
                "description": "The ports the service listens on; at least one.",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["number"],
                    "properties": {
                        "number": port_number("The port number clients dial."),
                        "name": { "type": "string", "maxLength": 63 },
                        "protocol": {
                            "type": "string",
                            "enum": ["HTTP", "HTTPS", "GRPC", "HTTP2", "TLS", "TCP",
                                     "http", "https", "grpc", "http2", "tls", "tcp"],
                        },
                        "targetPort": port_number("The port the instances listen on, when it differs."),
                        "tls": {
                            "type": "object",
                            "description": "TLS origination: the waypoint the service is bound to \
                                            opens TLS to the instances on this port (the client \
                                            speaks plain HTTP to the mesh).",
                            "properties": {
                                "sni": {
                                    "type": "string", "maxLength": 253, "pattern": DNS_NAME,
                                    "description": "Server name sent and verified; by default \
                                                    the host the client asked for.",
                                },
                                "caCertificates": {
                                    "type": "string", "maxLength": 65536,
                                    "description": "PEM roots that verify the destination; by \
                                                    default the web's public roots.",
                                },
                            },
                        },
                    },
                },
            },
            "resolution": {
                "type": "string",
                "enum": ["NONE", "STATIC", "DNS"],
                "default": "NONE",
                "description": "NONE: the address the client dialled; STATIC: the endpoints; \
                                DNS: the hosts (or the endpoints' names) resolved.",
            },
            "endpoints": {
                "type": "array",
                "description": "The service's instances: IP addresses for STATIC, IPs or \
                                host names for DNS.",
                "items": {
                    "type": "object",
                    "required": ["address"],
                    "properties": {
                        "address": { "type": "string", "minLength": 1, "maxLength": 253 },
                        "ports": {
                            "type": "object",
                            "description": "Instance ports by the service port's name.",
                            "additionalProperties": port_number("An instance port."),
                        },
                    },
                },
            },
        },
        "x-kubernetes-validations": [{
            "rule": "!has(self.resolution) || self.resolution != 'STATIC' || (has(self.endpoints) && size(self.endpoints) > 0)",
            "message": "resolution STATIC needs at least one endpoint",
        }],
    });
    let columns = json!([
        { "name": "Hosts", "type": "string", "jsonPath": ".spec.hosts" },
        { "name": "Resolution", "type": "string", "jsonPath": ".spec.resolution" },
        { "name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp" },
    ]);
    crd(
        "networking.ambit.dev",
        "ExternalService",
        "externalservices",
        "xs",
        columns,
        spec,
    )
}

/// Every CRD as written here, before they pass through the k8s-openapi type. Tests compare these
/// with their typed round trip: a field the type does not know (a misspelling) would be dropped
/// silently by `all`, and the comparison catches it.
pub fn all_values() -> Vec<Value> {
    vec![
        authorization_policy(),
        peer_authentication(),
        traffic_policy(),
        request_authentication(),
        external_service(),
    ]
}

/// Every CRD.
pub fn all() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    all_values()
        .into_iter()
        .map(|value| {
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            serde_json::from_value(value).map_err(|source| CrdError { name, source })
        })
        .collect()
}
