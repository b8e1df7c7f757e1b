//! Upstream attempts of one request: pick an endpoint (load balancing over endpoints not
//! ejected by outlier detection), build the request for the upstream HTTP version, send it
//! over HBONE, feed the outcome to outlier detection, and retry with back-off while the
//! route's policy and the service's retry budget allow.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use rand::Rng as _;
use tokio::time::Instant;

use crate::metrics::Recorder;
use crate::proxy::{lock, Proxy, ServiceRuntime};
use crate::resilience::{lb, outlier};
use crate::route::{retry, Rule};
use crate::state::{State, Upstream};
use crate::upstream::Version;
use crate::Body;

impl Proxy {
    /// Attempts until a response is final: retries, budget, outlier detection, LB.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn attempts(
        &self,
        _state: &State,
        runtime: &Arc<ServiceRuntime>,
        upstreams: &[Upstream],
        parts: &http::request::Parts,
        buffered: Option<Bytes>,
        streaming: &mut Option<Body>,
        rule: Option<&Rule>,
        grpc: bool,
        rec: &mut Recorder,
    ) -> Result<Response<Incoming>, (StatusCode, &'static str, String)> {
        if upstreams.is_empty() {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                "no healthy upstream".into(),
            ));
        }
        let retry_policy = rule
            .and_then(|r| r.retry.clone())
            .filter(|_| buffered.is_some());
        let per_try = rule.and_then(|r| r.backend_timeout);
        let max_uses = runtime
            .settings
            .circuit
            .and_then(|c| c.max_requests_per_connection);
        let mut attempt = 0u32;
        let mut _retry_slot: Option<retry::RetryGuard> = None;
        loop {
            let up = self.pick(runtime, upstreams, &parts.headers);
            rec.log.upstream = up.addr.to_string();
            rec.labels.destination_workload = up.workload.metrics_name().to_string();
            rec.labels.destination_workload_namespace = up.workload.namespace.clone();
            rec.labels.destination_principal = up.identity.to_string();
            let body = match (&buffered, streaming.take()) {
                (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
                (None, Some(s)) => s,
                (None, None) => Full::new(Bytes::new())
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            };
            let req = build_request(parts, body, &up, grpc);
            let version = version_of(grpc, &req);
            inc_active(runtime, up.addr, 1);
            let sent = self.upstreams.send(&up, version, req, max_uses);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent).await.unwrap_or(Err(
                    crate::upstream::UpstreamError::Timeout {
                        addr: up.addr,
                        after: t,
                    },
                )),
                None => sent.await,
            };
            inc_active(runtime, up.addr, -1);
            let (outcome, failure) = match &result {
                Ok(r) => (retry::Outcome::Status(r.status().as_u16()), None),
                Err(e) if e.is_connect_failure() => (
                    retry::Outcome::ConnectFailure,
                    Some((StatusCode::SERVICE_UNAVAILABLE, "UF", e.to_string())),
                ),
                Err(e) => (
                    retry::Outcome::Reset,
                    Some((StatusCode::SERVICE_UNAVAILABLE, "UC", e.to_string())),
                ),
            };
            if let Some(d) = &runtime.outlier {
                let obs = match outcome {
                    retry::Outcome::Status(s) => outlier::Observation::Status(s),
                    _ => outlier::Observation::ConnectFailure,
                };
                if d.observe(up.addr, obs, upstreams.len(), Instant::now()) {
                    tracing::info!(endpoint = %up.addr, "outlier ejected");
                }
            }
            let again = retry_policy
                .as_ref()
                .filter(|p| p.should_retry(outcome, attempt))
                .and_then(|_| runtime.budget.try_retry());
            match again {
                Some(slot) => {
                    _retry_slot = Some(slot);
                    attempt += 1;
                    rec.labels.response_flags = "URX".into();
                    let backoff = retry_policy
                        .as_ref()
                        .map(|p| p.backoff(attempt, rand::rng().random_range(0.0..1.0)))
                        .unwrap_or_default();
                    tokio::time::sleep(backoff).await;
                }
                None => {
                    if attempt > 0 && matches!(outcome, retry::Outcome::Status(200..=499)) {
                        rec.labels.response_flags = "-".into();
                    }
                    return match (result, failure) {
                        (Ok(r), _) => Ok(r),
                        (Err(_), Some(f)) => Err(f),
                        (Err(e), None) => {
                            Err((StatusCode::SERVICE_UNAVAILABLE, "UC", e.to_string()))
                        }
                    };
                }
            }
        }
    }

    fn pick(
        &self,
        runtime: &ServiceRuntime,
        upstreams: &[Upstream],
        headers: &HeaderMap,
    ) -> Upstream {
        let now = Instant::now();
        let healthy: Vec<&Upstream> = match &runtime.outlier {
            Some(d) => upstreams
                .iter()
                .filter(|u| !d.is_ejected(u.addr, now))
                .collect(),
            None => upstreams.iter().collect(),
        };
        // All ejected: use them all rather than fail (Envoy's panic mode).
        let pool: Vec<&Upstream> = if healthy.is_empty() {
            upstreams.iter().collect()
        } else {
            healthy
        };
        let active = lock(&runtime.active);
        let candidates: Vec<lb::Candidate> = pool
            .iter()
            .map(|u| lb::Candidate {
                addr: u.addr,
                active: active.get(&u.addr).copied().unwrap_or(0),
            })
            .collect();
        drop(active);
        let key = match &runtime.settings.lb {
            lb::Algorithm::HeaderHash(h) => headers.get(h.as_str()).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        let draws = {
            let mut rng = rand::rng();
            (rng.random::<u32>() as usize, rng.random::<u32>() as usize)
        };
        let i = lb::pick(
            &runtime.settings.lb,
            &candidates,
            &runtime.rr,
            draws,
            key.as_deref(),
        );
        pool.get(i)
            .map(|u| (*u).clone())
            .unwrap_or_else(|| upstreams[0].clone())
    }
}

/// Copies bytes between both sides of an upgraded (e.g. WebSocket) connection.
pub(crate) async fn splice_upgraded(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    if let Err(e) = ambit_hbone::copy::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

fn inc_active(runtime: &ServiceRuntime, addr: SocketAddr, delta: isize) {
    let mut map = lock(&runtime.active);
    let e = map.entry(addr).or_insert(0);
    *e = e.saturating_add_signed(delta);
    if *e == 0 {
        map.remove(&addr);
    }
}

pub(crate) fn version_of(grpc: bool, req: &Request<Body>) -> Version {
    if grpc || req.version() == http::Version::HTTP_2 {
        Version::Http2
    } else {
        Version::Http1
    }
}

/// The upstream request: same head, URI in the form the upstream version needs.
pub(crate) fn build_request(
    parts: &http::request::Parts,
    body: Body,
    up: &Upstream,
    grpc: bool,
) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let h2 = grpc || parts.version == http::Version::HTTP_2;
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if h2 {
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| up.addr.to_string());
        *req.version_mut() = http::Version::HTTP_2;
        *req.uri_mut() = format!("http://{authority}{pq}")
            .parse()
            .unwrap_or_else(|_| parts.uri.clone());
        req.headers_mut().remove(header::HOST);
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        *req.uri_mut() = pq.parse().unwrap_or_else(|_| parts.uri.clone());
        if !req.headers().contains_key(header::HOST) {
            if let Some(a) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, a);
            }
        }
    }
    req
}
