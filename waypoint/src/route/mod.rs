//! Routing: the Gateway API `HTTPRoute`/`GRPCRoute` specs the controller forwards as JSON
//! ([`spec`]), compiled per parent Service into an ordered rule list ([`matching`]), the
//! filters they apply ([`filters`]) and the retry policy with its budget ([`retry`]).

pub mod filters;
pub mod matching;
pub mod retry;
pub mod spec;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;
pub use spec::*;

/// A route as delivered by discovery or the static file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RouteResource {
    pub name: String,
    pub namespace: String,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// `namespace/hostname` of each parent Service.
    pub parent_services: Vec<String>,
    /// The spec as JSON.
    pub spec: serde_json::Value,
}

/// A compiled rule, ready to match.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `namespace/name` of the route, for logs.
    pub route: String,
    /// The route's namespace: where backend references without a namespace point.
    pub namespace: String,
    pub matches: Vec<matching::Match>,
    pub filters: Vec<Filter>,
    pub backends: Vec<BackendRef>,
    /// Whole request including retries.
    pub request_timeout: Option<Duration>,
    /// One attempt.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<retry::RetryPolicy>,
}

impl matching::Alternatives for Rule {
    fn alternatives(&self) -> &[matching::Match] {
        &self.matches
    }
}

impl RouteResource {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Compiles the rules of this route.
    pub fn compile(&self) -> Result<Vec<Rule>, RouteError> {
        let key = self.key();
        let spec_err = |source| RouteError::Spec {
            route: key.clone(),
            source,
        };
        let dur = |s: &Option<String>| -> Result<Option<Duration>, RouteError> {
            s.as_deref()
                .map(duration::parse)
                .transpose()
                .map_err(|source| RouteError::Duration {
                    route: key.clone(),
                    source,
                })
        };
        match self.kind.as_str() {
            "HTTPRoute" | "" => {
                let spec: HttpRouteSpec =
                    serde_json::from_value(self.spec.clone()).map_err(spec_err)?;
                spec.rules
                    .iter()
                    .map(|r| {
                        let matches = matching::compile_http(&key, &r.matches)?;
                        let timeouts = r.timeouts.clone().unwrap_or_default();
                        let retry = match &r.retry {
                            Some(spec) => Some(retry::RetryPolicy {
                                codes: spec.codes.clone(),
                                attempts: spec.attempts.unwrap_or(1),
                                backoff: dur(&spec.backoff)?.unwrap_or(Duration::from_millis(25)),
                            }),
                            None => None,
                        };
                        Ok(Rule {
                            route: key.clone(),
                            namespace: self.namespace.clone(),
                            matches,
                            filters: r.filters.clone(),
                            backends: r.backend_refs.clone(),
                            request_timeout: dur(&timeouts.request)?,
                            backend_timeout: dur(&timeouts.backend_request)?,
                            retry,
                        })
                    })
                    .collect()
            }
            "GRPCRoute" => {
                let spec: GrpcRouteSpec =
                    serde_json::from_value(self.spec.clone()).map_err(spec_err)?;
                spec.rules
                    .iter()
                    .map(|r| {
                        Ok(Rule {
                            route: key.clone(),
                            namespace: self.namespace.clone(),
                            matches: matching::compile_grpc(&key, &r.matches)?,
                            filters: r.filters.clone(),
                            backends: r.backend_refs.clone(),
                            request_timeout: None,
                            backend_timeout: None,
                            retry: None,
                        })
                    })
                    .collect()
            }
            other => Err(RouteError::Kind {
                route: key,
                kind: other.to_string(),
            }),
        }
    }
}
