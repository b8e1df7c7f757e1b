//! The HTTP request chain, in phases that each know their status, response flag and log
//! reason: resolve the destination (503 `NR`) → L7 authorization (403, naming the policy)
//! → rate limit (429 `RL`) → fault injection (`DI`/`FI`) → route (404 `NR`, redirect) →
//! circuit breaker (503 `UO`) → attempts with retries, budget, outlier detection and the
//! route timeout (504 `UT`; 503 `UF`/`UC` when no response) → response filters → metrics and
//! the access log when the body ends.
//!
//! Headers added towards the destination (documented in `ARCHITECTURE.md`): the caller's
//! identity in `x-ambit-peer-identity` (any value sent by the client is removed first, so it
//! cannot be forged), the caller's address appended to `Forwarded: for=`, and `traceparent`
//! with a new span id (a new trace when absent or malformed); that span is exported over
//! OTLP when a collector is configured ([`crate::otlp`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Incoming};
use rand::Rng as _;
use tokio::time::Instant;

use crate::attempt::{build_request, splice_upgraded, version_of};
use crate::metrics::{Counted, Metrics, Recorded, Recorder};
use crate::otlp::{PendingSpan, SpanSink, TraceContext};
use crate::policy::{self, Attributes, HttpAttributes, Verdict};
use crate::resilience::{circuit, fault, outlier, ratelimit, Settings};
use crate::route::{filters, matching, retry, BackendRef, Rule};
use crate::state::{Service, State, StateHandle, Target, Upstream};
use crate::upstream::Upstreams;
use crate::Body;

/// The header carrying the caller's SPIFFE identity to the destination.
pub const PEER_IDENTITY_HEADER: &str = "x-ambit-peer-identity";
/// Per-service runtime states kept before those of vanished services are dropped.
const MAX_RUNTIMES: usize = 4096;
/// Request bodies up to this size are buffered so they can be retried or mirrored.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Runtime state of one destination service, kept across state updates while its traffic
/// policy is unchanged.
#[derive(Debug)]
pub(crate) struct ServiceRuntime {
    pub(crate) settings: Arc<Settings>,
    pub(crate) breaker: circuit::Breaker,
    pub(crate) limiter: Option<ratelimit::Limiter>,
    pub(crate) outlier: Option<outlier::Detector>,
    pub(crate) budget: Arc<retry::Budget>,
    pub(crate) rr: AtomicUsize,
    pub(crate) active: Mutex<HashMap<SocketAddr, usize>>,
}

impl ServiceRuntime {
    fn new(settings: Arc<Settings>) -> Self {
        ServiceRuntime {
            breaker: circuit::Breaker::new(settings.circuit.as_ref()),
            limiter: settings.rate_limit.clone().map(ratelimit::Limiter::new),
            outlier: settings.outlier.clone().map(outlier::Detector::new),
            budget: Arc::default(),
            rr: AtomicUsize::new(0),
            active: Mutex::default(),
            settings,
        }
    }
}

/// Who is calling, for one downstream connection.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's identity, proven by its HBONE client certificate.
    pub identity: ambit_hbone::Identity,
    /// SPIFFE URI of the caller (`identity`, as labels and policy read it).
    pub principal: String,
    pub namespace: String,
    /// Original source address.
    pub addr: SocketAddr,
    /// The tunnel's `:authority`.
    pub authority: SocketAddr,
}

/// Everything the request chain needs.
#[derive(Clone)]
pub struct Proxy {
    pub state: StateHandle,
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    /// `namespace/name` of this waypoint's Gateway.
    pub gateway: String,
    runtimes: Arc<Mutex<HashMap<String, Arc<ServiceRuntime>>>>,
    /// Where finished spans go, when an OTLP collector is configured.
    spans: Option<SpanSink>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A locally generated response.
fn local(status: StatusCode, body: String) -> Response<Body> {
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

/// Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        if keep_upgrade && (h == "connection" || h == "upgrade") {
            continue;
        }
        // gRPC needs `te: trailers` end to end.
        if h == "te" && headers.get(h).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(h);
    }
}

/// The outcome of the chain before upstream I/O.
enum Plan {
    Respond(Response<Body>, &'static str, String),
    Forward {
        upstreams: Vec<Upstream>,
        runtime: Arc<ServiceRuntime>,
        rule: Option<Rule>,
        backend: Option<BackendRef>,
    },
}

impl Proxy {
    pub fn new(
        state: StateHandle,
        upstreams: Upstreams,
        metrics: Metrics,
        gateway: String,
    ) -> Self {
        Proxy {
            state,
            upstreams,
            metrics,
            gateway,
            runtimes: Arc::default(),
            spans: None,
        }
    }

    /// Exports a span per sampled request through `sink` (see [`crate::otlp`]).
    pub fn with_spans(mut self, sink: SpanSink) -> Self {
        self.spans = Some(sink);
        self
    }

    fn runtime(&self, state: &State, key: &str) -> Arc<ServiceRuntime> {
        let settings = state.settings(key).cloned().unwrap_or_default();
        let mut map = lock(&self.runtimes);
        if map.len() > MAX_RUNTIMES {
            // Services come and go; drop the runtime state of those no longer known.
            map.retain(|k, _| state.service(k).is_some());
        }
        match map.get(key) {
            Some(rt) if rt.settings == settings => rt.clone(),
            _ => {
                let rt = Arc::new(ServiceRuntime::new(settings));
                map.insert(key.to_string(), rt.clone());
                rt
            }
        }
    }

    /// Serves one request from `caller`.
    pub async fn handle(&self, caller: &Caller, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        // Taken before the request is consumed; resolved only if the upstream agrees (101).
        let downstream_upgrade = (req.version() == http::Version::HTTP_11
            && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
        let mut rec = Recorder::new(self.metrics.clone(), start);
        let (mut parts, body) = req.into_parts();
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        rec.labels.request_protocol = match (grpc, parts.version) {
            (true, _) => "grpc",
            (false, http::Version::HTTP_2) => "http2",
            _ => "http",
        }
        .into();
        let state = self.state.load();
        // Named only when the workload at the caller's address is the one its certificate
        // proved; otherwise `unknown` (an address is no identity).
        let src = state.workload_proving(caller.addr.ip(), &caller.identity);
        rec.labels.source_principal = caller.principal.clone();
        rec.labels.source_workload = src
            .map(|w| w.metrics_name().to_string())
            .unwrap_or_default();
        rec.labels.source_workload_namespace = caller.namespace.clone();
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| caller.authority.to_string());
        rec.log.method = parts.method.to_string();
        rec.log.path = parts.uri.path().to_string();
        rec.log.authority = host.clone();
        let trace = {
            let incoming = parts
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok());
            TraceContext::next(incoming, &mut rand::rng())
        };
        rec.log.trace_id = trace.trace_id_hex();
        if let Some(sink) = &self.spans {
            rec.span = PendingSpan::start(sink, &trace);
        }
        let traceparent = trace.header();

        let plan = self.plan(&state, caller, &mut parts, &host, &mut rec).await;
        let (upstreams, runtime, rule, backend) = match plan {
            Plan::Respond(resp, flag, reason) => return finish(resp, rec, flag, reason),
            Plan::Forward {
                upstreams,
                runtime,
                rule,
                backend,
            } => (upstreams, runtime, rule, backend),
        };

        // Headers towards the destination.
        let upgrading =
            parts.version == http::Version::HTTP_11 && parts.headers.contains_key(header::UPGRADE);
        strip_hop_by_hop(&mut parts.headers, upgrading);
        if let Ok(v) = HeaderValue::from_str(&caller.principal) {
            parts.headers.insert(PEER_IDENTITY_HEADER, v);
        }
        let for_value = match caller.addr.ip() {
            std::net::IpAddr::V4(ip) => format!("for={ip}"),
            std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        };
        if let Ok(v) = HeaderValue::from_str(&for_value) {
            parts.headers.append(header::FORWARDED, v);
        }
        if let Ok(v) = HeaderValue::from_str(&traceparent) {
            parts.headers.insert("traceparent", v);
        }
        let route_filters: Vec<_> = rule
            .iter()
            .flat_map(|r| r.filters.iter())
            .chain(backend.iter().flat_map(|b| b.filters.iter()))
            .cloned()
            .collect();
        filters::apply_request_headers(&route_filters, &mut parts.headers);

        // Circuit breaker.
        let slot = match runtime.breaker.acquire().await {
            Ok(slot) => slot,
            Err(e) => {
                return finish(
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("upstream overflow: {e}\n"),
                    ),
                    rec,
                    "UO",
                    e.to_string(),
                )
            }
        };
        rec.hold.push(Box::new(slot));
        rec.hold.push(Box::new(runtime.budget.enter()));

        // Body: buffered when small enough to retry or mirror.
        let count = rec.request_bytes.clone();
        let wants_copy = rule.as_ref().is_some_and(|r| r.retry.is_some())
            || filters::mirrors(&route_filters).next().is_some();
        let small = body.is_end_stream()
            || body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_BUFFERED_BODY as u64);
        let (buffered, mut streaming): (Option<Bytes>, Option<Body>) =
            if wants_copy && small && !upgrading {
                match Limited::new(Counted::new(body, count), MAX_BUFFERED_BODY)
                    .collect()
                    .await
                {
                    Ok(c) => (Some(c.to_bytes()), None),
                    Err(e) => {
                        return finish(
                            local(
                                StatusCode::BAD_REQUEST,
                                format!("reading request body: {e}\n"),
                            ),
                            rec,
                            "DPE",
                            e.to_string(),
                        )
                    }
                }
            } else {
                (None, Some(Counted::new(body, count).boxed_unsync()))
            };

        // Mirrors: fire and forget.
        if let Some(bytes) = &buffered {
            for m in filters::mirrors(&route_filters) {
                let pct = m.percent.unwrap_or(100);
                if rand::rng().random_range(0..100) >= pct {
                    continue;
                }
                let ns = m.backend_ref.namespace.clone().unwrap_or_else(|| {
                    rule.as_ref()
                        .map(|r| r.namespace.clone())
                        .unwrap_or_default()
                });
                let Some(svc) = state.service_by_name(&ns, &m.backend_ref.name) else {
                    continue;
                };
                let port = m.backend_ref.port.unwrap_or(caller.authority.port());
                let Some(up) = state.upstreams(svc, port).into_iter().next() else {
                    continue;
                };
                let req = build_request(
                    &parts,
                    Full::new(bytes.clone())
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                    &up,
                    grpc,
                );
                let ups = self.upstreams.clone();
                tokio::spawn(async move {
                    let _ = ups.send(&up, version_of(grpc, &req), req, None).await;
                });
            }
        }

        let request_timeout = rule.as_ref().and_then(|r| r.request_timeout);
        let attempts = self.attempts(
            &state,
            &runtime,
            &upstreams,
            &parts,
            buffered,
            &mut streaming,
            rule.as_ref(),
            grpc,
            &mut rec,
        );
        let result = match request_timeout {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    return finish(
                        local(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout\n".into(),
                        ),
                        rec,
                        "UT",
                        format!("route timeout {t:?}"),
                    )
                }
            },
            None => attempts.await,
        };
        match result {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(down) = downstream_upgrade {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice_upgraded(down, up));
                    }
                }
                let (mut rparts, rbody) = resp.into_parts();
                if rparts.status != StatusCode::SWITCHING_PROTOCOLS {
                    strip_hop_by_hop(&mut rparts.headers, false);
                }
                filters::apply_response_headers(&route_filters, &mut rparts.headers);
                if let Some(s) = rparts
                    .headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                {
                    rec.labels.grpc_response_status = s.to_string();
                }
                rec.labels.response_code = rparts.status.as_u16().to_string();
                if rec.labels.response_flags.is_empty() {
                    rec.labels.response_flags = "-".into();
                }
                let body = rbody.map_err(Into::into).boxed_unsync();
                Response::from_parts(rparts, Recorded::new(body, rec).boxed())
            }
            Err((status, flag, reason)) => {
                finish(local(status, format!("{reason}\n")), rec, flag, reason)
            }
        }
    }

    /// Policy, rate limit, faults and routing: everything decided before upstream I/O.
    async fn plan(
        &self,
        state: &State,
        caller: &Caller,
        parts: &mut http::request::Parts,
        host: &str,
        rec: &mut Recorder,
    ) -> Plan {
        let Some(target) = state.resolve(caller.authority) else {
            return Plan::Respond(
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no service or workload known at {}\n", caller.authority),
                ),
                "NR",
                "unknown destination".into(),
            );
        };
        let (service, direct): (Option<Arc<Service>>, Option<Upstream>) = match &target {
            Target::Service { service, .. } => (Some(service.clone()), None),
            Target::Workload { upstream, service } => (service.clone(), Some(upstream.clone())),
        };
        let key = service.as_ref().map(|s| s.key());
        rec.labels.destination_service = service
            .as_ref()
            .map(|s| s.hostname.clone())
            .unwrap_or_else(|| caller.authority.to_string());

        // Authorization.
        let policies = state.policies_for(&self.gateway, key.as_deref());
        let attrs = Attributes {
            principal: Some(&caller.principal),
            namespace: Some(&caller.namespace),
            source_ip: caller.addr.ip(),
            destination_ip: caller.authority.ip(),
            destination_port: caller.authority.port(),
            http: Some(HttpAttributes {
                method: parts.method.as_str(),
                path: parts.uri.path(),
                host,
                headers: &parts.headers,
            }),
        };
        match policy::evaluate(&policies, &attrs) {
            Verdict::Deny { by, .. } => {
                return Plan::Respond(
                    local(
                        StatusCode::FORBIDDEN,
                        format!("RBAC: access denied by {by}\n"),
                    ),
                    "RBAC",
                    format!("denied by {by}"),
                )
            }
            Verdict::Allow { audited } if !audited.is_empty() => {
                tracing::info!(target: "audit", policies = ?audited, principal = %caller.principal, path = %parts.uri.path(), "audited request");
            }
            Verdict::Allow { .. } => {}
        }

        let runtime = self.runtime(state, key.as_deref().unwrap_or(""));
        if let Some(limiter) = &runtime.limiter {
            if let ratelimit::Decision::Limited { retry_after } =
                limiter.check(&caller.principal, Instant::now())
            {
                let mut r = local(
                    StatusCode::TOO_MANY_REQUESTS,
                    "local rate limit exceeded\n".into(),
                );
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                return Plan::Respond(r, "RL", "rate limited".into());
            }
        }
        if !runtime.settings.fault.is_empty() {
            let decision: fault::Decision = {
                let mut rng = rand::rng();
                runtime
                    .settings
                    .fault
                    .decide(rng.random_range(0.0..100.0), rng.random_range(0.0..100.0))
            };
            if let Some(d) = decision.delay {
                tokio::time::sleep(d).await;
                rec.labels.response_flags = "DI".into();
            }
            if let Some(status) = decision.abort {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Plan::Respond(
                    local(status, "fault filter abort\n".into()),
                    "FI",
                    "fault injected".into(),
                );
            }
        }

        if let Some(up) = direct {
            return Plan::Forward {
                upstreams: vec![up],
                runtime,
                rule: None,
                backend: None,
            };
        }
        let Some(service) = service else {
            return Plan::Respond(
                local(StatusCode::SERVICE_UNAVAILABLE, "no service\n".into()),
                "NR",
                "no service".into(),
            );
        };
        let port = caller.authority.port();
        let Some(rules) = state.rules(&service.key()).filter(|r| !r.is_empty()) else {
            return Plan::Forward {
                upstreams: state.upstreams(&service, port),
                runtime,
                rule: None,
                backend: None,
            };
        };
        let view = matching::RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let Some(rule) = matching::select(rules, &view).cloned() else {
            return Plan::Respond(
                local(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no route of {} matches {} {}\n",
                        service.hostname,
                        parts.method,
                        parts.uri.path()
                    ),
                ),
                "NR",
                "no route matched".into(),
            );
        };
        rec.log.route = rule.route.clone();
        let matched = rule
            .matches
            .iter()
            .find(|m| m.matches(&view))
            .map(|m| m.path.clone());
        if let Some((status, location)) =
            filters::redirect(&rule.filters, &parts.uri, host, matched.as_ref())
        {
            let mut r = local(status, String::new());
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return Plan::Respond(r, "-", "redirect".into());
        }
        let (new_path, new_host) = filters::rewrite(&rule.filters, &parts.uri, matched.as_ref());
        if let Some(p) = new_path.and_then(|p| p.parse::<http::uri::PathAndQuery>().ok()) {
            let mut up = parts.uri.clone().into_parts();
            up.path_and_query = Some(p);
            if let Ok(uri) = http::Uri::from_parts(up) {
                parts.uri = uri;
            }
        }
        if let Some(h) = new_host.and_then(|h| HeaderValue::from_str(&h).ok()) {
            parts.headers.insert(header::HOST, h);
        }
        if rule.backends.is_empty() {
            return Plan::Forward {
                upstreams: state.upstreams(&service, port),
                runtime,
                rule: Some(rule),
                backend: None,
            };
        }
        let total: u64 = rule
            .backends
            .iter()
            .map(|b| u64::from(b.weight.unwrap_or(1)))
            .sum();
        if total == 0 {
            return Plan::Respond(
                local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "route has no backend with weight\n".into(),
                ),
                "NR",
                "all backend weights are zero".into(),
            );
        }
        let mut draw = rand::rng().random_range(0..total);
        let mut chosen = &rule.backends[0];
        for b in &rule.backends {
            let w = u64::from(b.weight.unwrap_or(1));
            if draw < w {
                chosen = b;
                break;
            }
            draw -= w;
        }
        let ns = chosen
            .namespace
            .clone()
            .unwrap_or_else(|| rule.namespace.clone());
        let Some(backend_svc) = state.service_by_name(&ns, &chosen.name) else {
            return Plan::Respond(
                local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "route backend {ns}/{} is not a known service\n",
                        chosen.name
                    ),
                ),
                "NR",
                "unknown backend".into(),
            );
        };
        rec.labels.destination_service = backend_svc.hostname.clone();
        let backend_runtime = self.runtime(state, &backend_svc.key());
        Plan::Forward {
            upstreams: state.upstreams(backend_svc, chosen.port.unwrap_or(port)),
            runtime: backend_runtime,
            backend: Some(chosen.clone()),
            rule: Some(rule),
        }
    }
}

fn finish(
    resp: Response<Body>,
    mut rec: Recorder,
    flag: &'static str,
    reason: String,
) -> Response<Body> {
    rec.labels.response_code = resp.status().as_u16().to_string();
    rec.labels.response_flags = flag.to_string();
    rec.log.reason = reason;
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Recorded::new(body, rec).boxed())
}
