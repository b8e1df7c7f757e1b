//! Resilience from `TrafficPolicy` (`traffic.ambit.dev/v1`): the spec as the controller
//! forwards it (our own serde types, unknown fields ignored), compiled into checked settings,
//! and the runtime pieces: circuit breaking ([`circuit`]), outlier detection ([`outlier`]),
//! local rate limits ([`ratelimit`]), fault injection ([`fault`]) and endpoint selection
//! ([`lb`]).

pub mod circuit;
pub mod fault;
pub mod lb;
pub mod outlier;
pub mod ratelimit;

use serde::{Deserialize, Serialize};

use crate::duration;

/// Why a traffic policy could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum ResilienceError {
    /// The spec JSON does not have the TrafficPolicy shape.
    #[error("traffic policy {policy}: invalid spec: {source}")]
    Spec {
        policy: String,
        #[source]
        source: serde_json::Error,
    },
    /// A duration is not Go-style.
    #[error("traffic policy {policy}: {source}")]
    Duration {
        policy: String,
        #[source]
        source: duration::DurationError,
    },
    /// A value outside its range (percentages, status codes, zero intervals).
    #[error("traffic policy {policy}: {field}: {reason}")]
    Range {
        policy: String,
        field: &'static str,
        reason: String,
    },
}

/// The `TrafficPolicy` spec.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    #[serde(alias = "circuitBreaker")]
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierSpec>,
    pub rate_limit: Option<RateLimitSpec>,
    pub fault_injection: Option<FaultSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutlierSpec {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub tokens_per_fill: u32,
    pub fill_interval: String,
    pub max_tokens: u32,
    pub per_source_identity: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultSpec {
    pub delay: Option<DelaySpec>,
    pub abort: Option<AbortSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DelaySpec {
    pub fixed_delay: String,
    pub percentage: f64,
}

impl Default for DelaySpec {
    fn default() -> Self {
        DelaySpec {
            fixed_delay: "0s".into(),
            percentage: 100.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AbortSpec {
    pub http_status: u16,
    pub percentage: f64,
}

impl Default for AbortSpec {
    fn default() -> Self {
        AbortSpec {
            http_status: 503,
            percentage: 100.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`.
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    pub http_header_name: String,
}

/// A traffic policy as delivered by discovery or the static file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicyResource {
    pub name: String,
    pub namespace: String,
    /// `namespace/hostname`.
    pub target_service: String,
    pub spec: serde_json::Value,
}

/// Checked settings for one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub circuit: Option<circuit::Limits>,
    pub outlier: Option<outlier::Config>,
    pub rate_limit: Option<ratelimit::Config>,
    pub fault: fault::Config,
    pub lb: lb::Algorithm,
}

impl TrafficPolicyResource {
    /// Compiles and checks the spec.
    pub fn compile(&self) -> Result<Settings, ResilienceError> {
        let policy = format!("{}/{}", self.namespace, self.name);
        let spec: TrafficPolicySpec =
            serde_json::from_value(self.spec.clone()).map_err(|source| ResilienceError::Spec {
                policy: policy.clone(),
                source,
            })?;
        let dur = |s: &str| {
            duration::parse(s).map_err(|source| ResilienceError::Duration {
                policy: policy.clone(),
                source,
            })
        };
        let range = |field: &'static str, reason: String| ResilienceError::Range {
            policy: policy.clone(),
            field,
            reason,
        };
        let pct = |field: &'static str, p: f64| {
            if (0.0..=100.0).contains(&p) {
                Ok(p)
            } else {
                Err(range(field, format!("{p} is not within 0..=100")))
            }
        };
        let circuit = spec.connection_pool.map(|c| circuit::Limits {
            max_connections: c.max_connections,
            max_pending_requests: c.max_pending_requests,
            max_requests_per_connection: c.max_requests_per_connection,
        });
        let outlier = match spec.outlier_detection {
            None => None,
            Some(o) => Some(outlier::Config {
                consecutive_5xx: o.consecutive_5xx_errors,
                consecutive_gateway: o.consecutive_gateway_errors,
                base_ejection: dur(o.base_ejection_time.as_deref().unwrap_or("30s"))?,
                max_ejection_percent: pct(
                    "outlierDetection.maxEjectionPercent",
                    f64::from(o.max_ejection_percent.unwrap_or(10)),
                )? as u32,
            }),
        };
        let rate_limit = match spec.rate_limit {
            None => None,
            Some(r) => {
                let interval = dur(&r.fill_interval)?;
                if interval.is_zero() || r.max_tokens == 0 {
                    return Err(range(
                        "rateLimit",
                        "fillInterval and maxTokens must be positive".into(),
                    ));
                }
                Some(ratelimit::Config {
                    tokens_per_fill: r.tokens_per_fill,
                    fill_interval: interval,
                    max_tokens: r.max_tokens,
                    per_source_identity: r.per_source_identity,
                })
            }
        };
        let mut fault = fault::Config::default();
        if let Some(f) = spec.fault_injection {
            if let Some(d) = f.delay {
                fault.delay = Some((
                    dur(&d.fixed_delay)?,
                    pct("faultInjection.delay.percentage", d.percentage)?,
                ));
            }
            if let Some(a) = f.abort {
                if !(200..=599).contains(&a.http_status) {
                    return Err(range(
                        "faultInjection.abort.httpStatus",
                        format!("{} is not within 200..=599", a.http_status),
                    ));
                }
                fault.abort = Some((
                    a.http_status,
                    pct("faultInjection.abort.percentage", a.percentage)?,
                ));
            }
        }
        let lb = match spec.load_balancer {
            None => lb::Algorithm::RoundRobin,
            Some(LoadBalancerSpec {
                consistent_hash: Some(h),
                ..
            }) => lb::Algorithm::HeaderHash(h.http_header_name.to_ascii_lowercase()),
            Some(LoadBalancerSpec { simple, .. }) => match simple.as_deref() {
                Some("LEAST_REQUEST") | Some("LEAST_CONN") => lb::Algorithm::LeastRequest,
                Some("RANDOM") => lb::Algorithm::Random,
                _ => lb::Algorithm::RoundRobin,
            },
        };
        Ok(Settings {
            circuit,
            outlier,
            rate_limit,
            fault,
            lb,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn compile(spec: serde_json::Value) -> Result<Settings, ResilienceError> {
        TrafficPolicyResource {
            name: "tp".into(),
            namespace: "demo".into(),
            target_service: "demo/web".into(),
            spec,
        }
        .compile()
    }

    #[test]
    fn full_spec_and_errors() {
        let s = compile(serde_json::json!({
            "targetRef": {"name": "web"},
            "connectionPool": {"maxConnections": 2, "maxPendingRequests": 1},
            "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "1s"},
            "rateLimit": {"tokensPerFill": 5, "fillInterval": "1s", "maxTokens": 10},
            "faultInjection": {"delay": {"fixedDelay": "50ms", "percentage": 10}, "abort": {"httpStatus": 418}},
            "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}},
            "somethingNew": true,
        }))
        .expect("compile");
        assert_eq!(s.lb, lb::Algorithm::HeaderHash("x-user".into()));
        assert_eq!(s.fault.abort, Some((418, 100.0)));
        assert_eq!(
            s.outlier.map(|o| o.base_ejection),
            Some(Duration::from_secs(1))
        );
        for bad in [
            serde_json::json!({"faultInjection": {"abort": {"httpStatus": 99}}}),
            serde_json::json!({"faultInjection": {"delay": {"fixedDelay": "1s", "percentage": 150}}}),
            serde_json::json!({"rateLimit": {"tokensPerFill": 1, "fillInterval": "soon", "maxTokens": 1}}),
            serde_json::json!({"connectionPool": {"maxConnections": "many"}}),
        ] {
            assert!(compile(bad.clone()).is_err(), "{bad}");
        }
    }
}
