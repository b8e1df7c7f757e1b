//! Upstream attempts of one request: pick an endpoint (load balancing over endpoints not
//! ejected by outlier detection), build the request for the upstream HTTP version, send it
//! over HBONE, feed the outcome to outlier detection, and retry with back-off while the
//! route's policy and the service's retry budget allow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::MutexGuard;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use rand::Rng as _;
use tokio::time::Instant;

use crate::metrics::Recorder;
use crate::refusal::{Refusal, NO_FLAG, RETRIED};
use crate::resilience::{lb, outlier};
use crate::route::retry::{self, RetryPolicy};
use crate::runtime::{lock, ServiceRuntime};
use crate::state::{Peer, Upstream};
use crate::upstream::{UpstreamError, Upstreams, Version};
use crate::Body;

/// What the attempts of one request share.
pub(crate) struct Attempts<'a> {
    pub(crate) upstreams: &'a Upstreams,
    pub(crate) runtime: &'a ServiceRuntime,
    pub(crate) endpoints: &'a [Upstream],
    pub(crate) parts: &'a http::request::Parts,
    /// The route's retry policy (used only when the body was buffered).
    pub(crate) retry: Option<&'a RetryPolicy>,
    pub(crate) try_timeout: Option<std::time::Duration>,
    pub(crate) grpc: bool,
}

impl Attempts<'_> {
    /// Attempts until a response is final: retries, budget, outlier detection, LB. The body
    /// is `buffered` (replayable) or `streaming` (sent once).
    pub(crate) async fn run(
        &self,
        buffered: Option<Bytes>,
        mut streaming: Option<Body>,
        rec: &mut Recorder,
    ) -> Result<Response<Incoming>, Refusal> {
        if self.endpoints.is_empty() {
            return Err(Refusal::NoHealthyUpstream);
        }
        let retry_policy = self.retry.filter(|_| buffered.is_some());
        let max_uses = self
            .runtime
            .settings
            .circuit
            .and_then(|c| c.max_requests_per_connection);
        let mut attempt = 0u32;
        let mut _retry_slot: Option<retry::RetryGuard> = None;
        loop {
            let up = self.pick(&self.parts.headers);
            rec.log.upstream = up.describe();
            if let Peer::Mesh { identity, workload } = &up.peer {
                rec.labels.destination_workload = workload.metrics_name().to_string();
                rec.labels.destination_workload_namespace = workload.namespace.clone();
                rec.labels.destination_principal = identity.to_string();
            }
            let body = match (&buffered, streaming.take()) {
                (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
                (None, Some(s)) => s,
                (None, None) => Full::new(Bytes::new())
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            };
            let result = self.send(up, body, max_uses).await;
            let outcome = match &result {
                Ok(r) => retry::Outcome::Status(r.status().as_u16()),
                Err(e) if e.is_connect_failure() => retry::Outcome::ConnectFailure,
                Err(_) => retry::Outcome::Reset,
            };
            if let Some(d) = &self.runtime.outlier {
                let obs = match outcome {
                    retry::Outcome::Status(s) => outlier::Observation::Status(s),
                    _ => outlier::Observation::ConnectFailure,
                };
                if d.observe(up.addr, obs, self.endpoints.len(), Instant::now()) {
                    tracing::info!(endpoint = %up.addr, "outlier ejected");
                }
            }
            let again = retry_policy
                .filter(|p| p.should_retry(outcome, attempt))
                .and_then(|_| self.runtime.budget.try_retry());
            let Some(slot) = again else {
                if attempt > 0 && matches!(outcome, retry::Outcome::Status(200..=499)) {
                    rec.labels.response_flags = NO_FLAG.into();
                }
                return result.map_err(|e| match outcome {
                    retry::Outcome::ConnectFailure => Refusal::ConnectFailure(Box::new(e)),
                    _ => Refusal::Reset(Box::new(e)),
                });
            };
            _retry_slot = Some(slot);
            attempt += 1;
            rec.labels.response_flags = RETRIED.into();
            let backoff = retry_policy
                .map(|p| p.backoff(attempt, rand::rng().random_range(0.0..1.0)))
                .unwrap_or_default();
            tokio::time::sleep(backoff).await;
        }
    }

    /// One attempt to `up`, within the per-try timeout, counted as in flight to it.
    async fn send(
        &self,
        up: &Upstream,
        body: Body,
        max_uses: Option<u32>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let req = build_request(self.parts, body, up, self.grpc);
        let version = version_of(&req);
        // A guard, not a decrement after the await: the route timeout may drop this future
        // mid-attempt, and the endpoint must not stay counted as busy.
        let _active = InFlight::new(self.runtime, up.addr);
        let sent = self.upstreams.send(up, version, req, max_uses);
        match self.try_timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or(Err(UpstreamError::Timeout {
                    addr: up.addr,
                    after: t,
                })),
            None => sent.await,
        }
    }

    /// The endpoint of the next attempt: load balancing over those not ejected.
    fn pick(&self, headers: &HeaderMap) -> &Upstream {
        let (runtime, upstreams) = (self.runtime, self.endpoints);
        let now = Instant::now();
        // Listed only when outlier detection has ejected some but not all: with none
        // ejected the state's list serves as it is, and with all ejected it is used whole
        // rather than fail (Envoy's panic mode).
        let healthy = runtime.outlier.as_ref().and_then(|d| {
            let healthy: Vec<usize> = (0..upstreams.len())
                .filter(|&i| !d.is_ejected(upstreams[i].addr, now))
                .collect();
            (!healthy.is_empty() && healthy.len() < upstreams.len()).then_some(healthy)
        });
        let key = match &runtime.settings.lb {
            lb::Algorithm::HeaderHash(h) => headers.get(h.as_str()).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        let draws = {
            let mut rng = rand::rng();
            (rng.random::<u32>() as usize, rng.random::<u32>() as usize)
        };
        let pool = Pool {
            endpoints: upstreams,
            healthy: healthy.as_deref(),
            active: lock(&runtime.active),
        };
        let i = lb::pick(
            &runtime.settings.lb,
            &pool,
            &runtime.rr,
            draws,
            key.as_deref(),
        );
        upstreams.get(pool.index(i)).unwrap_or(&upstreams[0])
    }
}

/// The endpoints a pick chooses among: all of them, or those at `healthy`.
struct Pool<'a> {
    endpoints: &'a [Upstream],
    healthy: Option<&'a [usize]>,
    active: MutexGuard<'a, HashMap<SocketAddr, usize>>,
}

impl Pool<'_> {
    /// Index into `endpoints` of candidate `i`.
    fn index(&self, i: usize) -> usize {
        self.healthy.map_or(i, |h| h.get(i).copied().unwrap_or(0))
    }
}

impl lb::Candidates for Pool<'_> {
    fn count(&self) -> usize {
        self.healthy.map_or(self.endpoints.len(), <[usize]>::len)
    }
    fn addr(&self, i: usize) -> SocketAddr {
        self.endpoints
            .get(self.index(i))
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |u| u.addr)
    }
    fn active(&self, i: usize) -> usize {
        self.active.get(&self.addr(i)).copied().unwrap_or(0)
    }
}

/// Counts one request in flight to an endpoint (for least-request) while alive.
struct InFlight<'a> {
    runtime: &'a ServiceRuntime,
    addr: SocketAddr,
}

impl<'a> InFlight<'a> {
    fn new(runtime: &'a ServiceRuntime, addr: SocketAddr) -> Self {
        *lock(&runtime.active).entry(addr).or_insert(0) += 1;
        InFlight { runtime, addr }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.runtime.active);
        if let Some(n) = map.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.addr);
            }
        }
    }
}

/// The version [`build_request`] chose.
pub(crate) fn version_of(req: &Request<Body>) -> Version {
    if req.version() == http::Version::HTTP_2 {
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
    // An instance outside the mesh speaks what its port declares; a mesh endpoint, what
    // the client spoke.
    let h2 = match &up.peer {
        Peer::External(d) => d.h2,
        Peer::Mesh { .. } => grpc || parts.version == http::Version::HTTP_2,
    };
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_attempt_cut_by_the_route_timeout_is_no_longer_in_flight() {
        let runtime = ServiceRuntime::new(Arc::default());
        let addr: SocketAddr = "10.0.1.1:8080".parse().expect("addr");
        let held = InFlight::new(&runtime, addr);
        let attempt = async {
            let _active = InFlight::new(&runtime, addr);
            std::future::pending::<()>().await
        };
        // What the route timeout does to the attempts: drop them mid-flight.
        assert!(tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .is_err());
        assert_eq!(lock(&runtime.active).get(&addr), Some(&1));
        drop(held);
        assert!(lock(&runtime.active).is_empty());
    }

    #[test]
    fn picks_skip_ejected_endpoints_and_count_requests_in_flight() {
        let identity = ambit_hbone::Identity::new("cluster.local", "demo", "web").expect("id");
        let endpoints: Vec<Upstream> = (1..=3)
            .map(|i| {
                Upstream::mesh(
                    SocketAddr::from(([10, 0, 1, i], 8080)),
                    identity.clone(),
                    Arc::default(),
                )
            })
            .collect();
        let active = std::sync::Mutex::new(HashMap::from([(endpoints[0].addr, 5)]));
        // Endpoint 1 is ejected.
        let pool = Pool {
            endpoints: &endpoints,
            healthy: Some(&[0, 2]),
            active: lock(&active),
        };
        let rr = std::sync::atomic::AtomicUsize::new(0);
        let pick = |algorithm: &lb::Algorithm, draws| {
            let i = lb::pick(algorithm, &pool, &rr, draws, None);
            endpoints[pool.index(i)].addr.to_string()
        };
        let round_robin: Vec<String> = (0..3)
            .map(|_| pick(&lb::Algorithm::RoundRobin, (0, 0)))
            .collect();
        assert_eq!(
            round_robin,
            ["10.0.1.1:8080", "10.0.1.3:8080", "10.0.1.1:8080"]
        );
        // Of the first and the third, the one with fewer requests in flight.
        assert_eq!(pick(&lb::Algorithm::LeastRequest, (0, 1)), "10.0.1.3:8080");
    }
}
