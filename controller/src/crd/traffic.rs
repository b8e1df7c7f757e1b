//! `TrafficPolicy` in `traffic.ambit.dev/v1`: the resilience knobs Gateway API lacks
//! (circuit breaking, outlier detection, local rate limits, fault injection and the
//! load-balancing algorithm), attached to one Service and enforced by its waypoint.
//!
//! Durations are Go-style strings (`"10s"`, `"250ms"`) as in Istio; the model checks them.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Resilience settings for traffic to one Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "traffic.ambit.dev",
    version = "v1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service these settings apply to, in the policy's namespace.
    pub target_ref: ServiceReference,
    /// Limits on connections and requests to the service (circuit breaking).
    #[serde(
        default,
        alias = "circuitBreaker",
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejects endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Local (per-waypoint) token-bucket rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Delays or aborts a share of requests, for testing resilience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
    /// How the waypoint (and ztunnel, as a hint) picks an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// A reference to a Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// Empty (the core group) for a Service.
    #[serde(default)]
    pub group: String,
    /// `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Name of the Service, in the policy's namespace.
    pub name: String,
}

fn service_kind() -> String {
    "Service".to_string()
}

/// Circuit-breaking limits. Unset means unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Maximum concurrent connections to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Maximum requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests per connection before it is recycled (1 disables keep-alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// Passive health checking.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses before an endpoint is ejected.
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 or connect failures before an endpoint is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are evaluated, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Minimum ejection time, multiplied by the number of ejections, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Upper bound on the share of endpoints ejected at once, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// Token-bucket rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Tokens added at every fill.
    pub tokens_per_fill: u32,
    /// Time between fills, e.g. `1s`.
    pub fill_interval: String,
    /// Bucket size (burst).
    pub max_tokens: u32,
    /// One bucket per source identity rather than one for everyone.
    #[serde(default)]
    pub per_source_identity: bool,
}

/// Fault injection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjection {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Fail a share of requests with a status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long to wait before forwarding, e.g. `5s`.
    pub fixed_delay: String,
    /// Share of requests delayed, 0 to 100.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

/// Injected failure.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status returned, 200 to 599.
    pub http_status: u16,
    /// Share of requests aborted, 0 to 100.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

fn hundred() -> f64 {
    100.0
}

/// Endpoint selection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// A simple algorithm; ignored when `consistentHash` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    /// Sticky selection by a request attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

/// Simple load-balancing algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Each endpoint in turn.
    RoundRobin,
    /// The endpoint with fewer outstanding requests of two picked at random.
    LeastRequest,
    /// Uniformly at random.
    Random,
}

/// Consistent hashing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash on the value of this request header.
    pub http_header_name: String,
}
