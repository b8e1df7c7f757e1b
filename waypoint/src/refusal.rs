//! Why the waypoint answers a request itself instead of passing on the destination's
//! response, and the one place where each reason becomes a status code, an Envoy-style
//! response flag (what dashboards filter on), a body and an access-log reason. The flags of
//! forwarded responses live here too, so every flag the waypoint writes is in this file.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use crate::authn::validate::AuthnError;
use crate::resilience::circuit::CircuitError;
use crate::upstream::UpstreamError;
use crate::Body;

/// Flag of a response that went as planned.
pub const NO_FLAG: &str = "-";
/// Flag of a response a fault delay held back.
pub const DELAY_INJECTED: &str = "DI";
/// Flag of a response after which retries ran out (the last attempt's answer is returned).
pub const RETRIED: &str = "URX";

/// A request answered by the waypoint. Its `Display` is the access log's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The tunnel's `:authority` is no service VIP or workload the state knows.
    #[error("unknown destination")]
    UnknownDestination { authority: SocketAddr },
    /// The request's token failed validation (RequestAuthentication).
    #[error("jwt rejected: {0}")]
    Unauthenticated(AuthnError),
    /// An AuthorizationPolicy denied the request (`by` names it, or the ALLOW policies that
    /// did not match).
    #[error("denied by {by}")]
    Denied { by: String },
    /// The service's local rate limit is spent; a token comes back after `retry_after`.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// Fault injection aborts the request with this status.
    #[error("fault injected")]
    FaultAbort { status: StatusCode },
    /// The service has routes and none of their rules matches.
    #[error("no route matched")]
    NoRoute {
        service: String,
        method: Method,
        path: String,
    },
    /// The matched rule lists backends, all of weight 0.
    #[error("all backend weights are zero")]
    NoBackendWeight,
    /// The picked backend names no known service.
    #[error("unknown backend")]
    UnknownBackend { namespace: String, name: String },
    /// The service's circuit breaker has no slot and its queue is full.
    #[error(transparent)]
    Overflow(CircuitError),
    /// The request body, buffered for retries or mirrors, could not be read.
    #[error("{0}")]
    BodyRead(String),
    /// The destination has no endpoint to send to.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// No connection to the endpoint could be made: nothing reached the application.
    #[error(transparent)]
    ConnectFailure(Box<UpstreamError>),
    /// The connection or stream broke before a response (or the try timed out).
    #[error(transparent)]
    Reset(Box<UpstreamError>),
    /// The route's request timeout passed before a response, retries included.
    #[error("route timeout {after:?}")]
    Timeout { after: Duration },
}

impl Refusal {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::UnknownDestination { .. }
            | Refusal::Overflow(_)
            | Refusal::NoHealthyUpstream
            | Refusal::ConnectFailure(_)
            | Refusal::Reset(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Denied { .. } => StatusCode::FORBIDDEN,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::FaultAbort { status } => *status,
            Refusal::NoRoute { .. } => StatusCode::NOT_FOUND,
            Refusal::NoBackendWeight | Refusal::UnknownBackend { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Refusal::BodyRead(_) => StatusCode::BAD_REQUEST,
            Refusal::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The response flag (`response_flags` label, access log), Envoy's names.
    pub fn flag(&self) -> &'static str {
        match self {
            Refusal::UnknownDestination { .. }
            | Refusal::NoRoute { .. }
            | Refusal::NoBackendWeight
            | Refusal::UnknownBackend { .. } => "NR",
            // Envoy's JWT filter sets no flag either; the reason says what failed.
            Refusal::Unauthenticated(_) => NO_FLAG,
            Refusal::Denied { .. } => "RBAC",
            Refusal::RateLimited { .. } => "RL",
            Refusal::FaultAbort { .. } => "FI",
            Refusal::Overflow(_) => "UO",
            Refusal::BodyRead(_) => "DPE",
            Refusal::NoHealthyUpstream => "UH",
            Refusal::ConnectFailure(_) => "UF",
            Refusal::Reset(_) => "UC",
            Refusal::Timeout { .. } => "UT",
        }
    }

    /// The response body: a line that explains the status to whoever called.
    pub fn body(&self) -> String {
        match self {
            Refusal::UnknownDestination { authority } => {
                format!("no service or workload known at {authority}\n")
            }
            Refusal::Unauthenticated(e) => format!("JWT rejected: {e}\n"),
            Refusal::Denied { by } => format!("RBAC: access denied by {by}\n"),
            Refusal::RateLimited { .. } => "local rate limit exceeded\n".into(),
            Refusal::FaultAbort { .. } => "fault filter abort\n".into(),
            Refusal::NoRoute {
                service,
                method,
                path,
            } => format!("no route of {service} matches {method} {path}\n"),
            Refusal::NoBackendWeight => "route has no backend with weight\n".into(),
            Refusal::UnknownBackend { namespace, name } => {
                format!("route backend {namespace}/{name} is not a known service\n")
            }
            Refusal::BodyRead(e) => format!("reading request body: {e}\n"),
            Refusal::Timeout { .. } => "upstream request timeout\n".into(),
            Refusal::Overflow(_)
            | Refusal::NoHealthyUpstream
            | Refusal::ConnectFailure(_)
            | Refusal::Reset(_) => format!("{self}\n"),
        }
    }

    /// The whole response.
    pub fn response(&self) -> Response<Body> {
        let mut r = local(self.status(), self.body());
        if let Refusal::Unauthenticated(_) = self {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        if let Refusal::RateLimited { retry_after } = self {
            // Whole seconds, rounded up and at least 1: a client retrying sooner is refused.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        r
    }
}

/// A response made by the waypoint (refusals, redirects).
pub fn local(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A redirect a route answers with.
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut r = local(status, String::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_status_flag_body_and_reason() {
        let addr: SocketAddr = "10.0.1.1:8080".parse().expect("addr");
        let timed_out = || {
            Box::new(UpstreamError::Timeout {
                addr,
                after: Duration::from_millis(500),
            })
        };
        #[rustfmt::skip]
        let cases: Vec<(Refusal, u16, &str, &str, &str)> = vec![
            (Refusal::UnknownDestination { authority: addr }, 503, "NR",
                "no service or workload known at 10.0.1.1:8080\n", "unknown destination"),
            (Refusal::Unauthenticated(AuthnError::Expired { exp: 10, now: 100 }), 401, "-",
                "JWT rejected: token expired at 10 (now 100, leeway 60s)\n", "jwt rejected: token expired at 10 (now 100, leeway 60s)"),
            (Refusal::Denied { by: "demo/no-admin".into() }, 403, "RBAC",
                "RBAC: access denied by demo/no-admin\n", "denied by demo/no-admin"),
            (Refusal::RateLimited { retry_after: Duration::from_secs(1) }, 429, "RL",
                "local rate limit exceeded\n", "rate limited"),
            (Refusal::FaultAbort { status: StatusCode::IM_A_TEAPOT }, 418, "FI",
                "fault filter abort\n", "fault injected"),
            (Refusal::NoRoute { service: "web".into(), method: Method::GET, path: "/x".into() }, 404, "NR",
                "no route of web matches GET /x\n", "no route matched"),
            (Refusal::NoBackendWeight, 500, "NR",
                "route has no backend with weight\n", "all backend weights are zero"),
            (Refusal::UnknownBackend { namespace: "demo".into(), name: "gone".into() }, 500, "NR",
                "route backend demo/gone is not a known service\n", "unknown backend"),
            (Refusal::Overflow(CircuitError::Overflow { in_flight: 2, pending: 1 }), 503, "UO",
                "upstream overflow: 2 in flight, 1 pending\n", "upstream overflow: 2 in flight, 1 pending"),
            (Refusal::BodyRead("length limit exceeded".into()), 400, "DPE",
                "reading request body: length limit exceeded\n", "length limit exceeded"),
            (Refusal::NoHealthyUpstream, 503, "UH",
                "no healthy upstream\n", "no healthy upstream"),
            (Refusal::ConnectFailure(timed_out()), 503, "UF",
                "request to 10.0.1.1:8080 timed out after 500ms\n", "request to 10.0.1.1:8080 timed out after 500ms"),
            (Refusal::Reset(timed_out()), 503, "UC",
                "request to 10.0.1.1:8080 timed out after 500ms\n", "request to 10.0.1.1:8080 timed out after 500ms"),
            (Refusal::Timeout { after: Duration::from_secs(2) }, 504, "UT",
                "upstream request timeout\n", "route timeout 2s"),
        ];
        for (refusal, status, flag, body, reason) in cases {
            assert_eq!(refusal.status().as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.flag(), flag, "{refusal:?}");
            assert_eq!(refusal.body(), body, "{refusal:?}");
            assert_eq!(refusal.to_string(), reason, "{refusal:?}");
            let r = refusal.response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(
                r.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
                Some(&b"text/plain; charset=utf-8"[..])
            );
        }
    }

    #[test]
    fn rate_limited_says_when_to_come_back() {
        for (after, want) in [
            (Duration::from_millis(1), "1"),
            (Duration::from_millis(1500), "2"),
            (Duration::from_secs(3), "3"),
            (Duration::ZERO, "1"),
        ] {
            let r = Refusal::RateLimited { retry_after: after }.response();
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
                Some(want.as_bytes()),
                "{after:?}"
            );
        }
    }
}
