//! Carrying out a request's [`Decision`]: [`Proxy::handle`] starts the request's metrics,
//! access log and span, asks [`decide`] what to do, then does it and nothing else: waits out
//! a fault delay, answers a refusal or redirect, or shapes the request for the destination,
//! takes a circuit-breaker slot (503 `UO`), buffers a small body when retries or mirrors
//! need it, fires the mirrors, runs the attempts ([`crate::attempt`]) within the route
//! timeout (504 `UT`), and applies the response filters. Metrics and the access log are
//! written when the response body ends.
//!
//! Headers added towards the destination (documented in `ARCHITECTURE.md`): the caller's
//! identity in `x-ambit-peer-identity` (any value sent by the client is removed first, so it
//! cannot be forged), the caller's address appended to `Forwarded: for=`, and `traceparent`
//! with a new span id (a new trace when absent or malformed); that span is exported over
//! OTLP when a collector is configured ([`crate::otlp`]).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use crate::attempt::{build_request, version_of, Attempts};
use crate::authn::jwks::Jwks;
use crate::authn::validate::Authenticated;
use crate::authn::Location;
pub use crate::decision::Caller;
use crate::decision::{decide, Action, AuthnInput, Decision, Draws, Forward, RequestHead, Rewrite};
use crate::metrics::{Counted, Metrics, Recorded, Recorder};
use crate::otlp::{PendingSpan, SpanSink, TraceContext};
use crate::refusal::{redirect, Refusal, DELAY_INJECTED, NO_FLAG};
use crate::route::filters;
use crate::runtime::Runtimes;
use crate::state::{State, StateHandle, Upstream};
use crate::upstream::Upstreams;
use crate::Body;

/// The header carrying the caller's SPIFFE identity to the destination.
pub const PEER_IDENTITY_HEADER: &str = "x-ambit-peer-identity";
/// Request bodies up to this size are buffered so they can be retried or mirrored.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Everything the request chain needs.
#[derive(Clone)]
pub struct Proxy {
    pub state: StateHandle,
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    /// `namespace/name` of this waypoint's Gateway.
    pub gateway: String,
    runtimes: Runtimes,
    /// Where finished spans go, when an OTLP collector is configured.
    spans: Option<SpanSink>,
    /// Key sets fetched for RequestAuthentication (see [`crate::authn::jwks::run`]).
    jwks: Jwks,
}

/// What carrying out a forward decision reads.
struct Exchange<'a> {
    caller: &'a Caller,
    state: &'a State,
    decision: &'a Decision,
    forward: &'a Forward,
    grpc: bool,
    traceparent: String,
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
            runtimes: Runtimes::default(),
            spans: None,
            jwks: Jwks::default(),
        }
    }

    /// Reads fetched key sets from `jwks` (filled by [`crate::authn::jwks::run`]).
    pub fn with_jwks(mut self, jwks: Jwks) -> Self {
        self.jwks = jwks;
        self
    }

    /// Exports a span per sampled request through `sink` (see [`crate::otlp`]).
    pub fn with_spans(mut self, sink: SpanSink) -> Self {
        self.spans = Some(sink);
        self
    }

    /// Serves one request from `caller`: decides, then carries the decision out.
    pub async fn handle(&self, caller: &Caller, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        // Taken before the request is consumed; resolved only if the upstream agrees (101).
        let downstream_upgrade = (req.version() == http::Version::HTTP_11
            && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let state = self.state.load();
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| caller.authority.to_string());
        let (mut rec, traceparent) = self.record(start, caller, &state, &parts, &host, grpc);
        let head = RequestHead {
            method: &parts.method,
            uri: &parts.uri,
            host: &host,
            headers: &parts.headers,
        };
        let draws = Draws::random(&mut rand::rng());
        let decision = decide(
            &state,
            &self.gateway,
            caller,
            &head,
            draws,
            &self.runtimes.limits(&state),
            AuthnInput {
                keys: &self.jwks,
                now: unix_now(),
            },
        );
        rec.labels.destination_service = decision.destination.clone();
        if let Some(rule) = &decision.rule {
            rec.log.route = rule.route.clone();
        }
        if let Some(a) = &decision.authn {
            rec.log.request_principal = a.auth.principal.clone();
        }
        if !decision.audited.is_empty() {
            tracing::info!(target: "audit", policies = ?decision.audited, principal = %caller.principal, path = %parts.uri.path(), "audited request");
        }
        if let Some(delay) = decision.delay {
            tokio::time::sleep(delay).await;
            rec.labels.response_flags = DELAY_INJECTED.into();
        }
        match &decision.action {
            Action::Refuse(refusal) => refuse(refusal, rec),
            Action::Redirect { status, location } => {
                finish(redirect(*status, location), rec, NO_FLAG, "redirect".into())
            }
            Action::Forward(forward) => {
                let x = Exchange {
                    caller,
                    state: &state,
                    decision: &decision,
                    forward,
                    grpc,
                    traceparent,
                };
                self.forward(x, parts, body, downstream_upgrade, rec).await
            }
        }
    }

    /// The request's metrics labels, access-log fields and span, started; and the
    /// `traceparent` to send onward.
    fn record(
        &self,
        start: Instant,
        caller: &Caller,
        state: &State,
        parts: &Parts,
        host: &str,
        grpc: bool,
    ) -> (Recorder, String) {
        let mut rec = Recorder::new(self.metrics.clone(), start);
        rec.labels.request_protocol = match (grpc, parts.version) {
            (true, _) => "grpc",
            (false, http::Version::HTTP_2) => "http2",
            _ => "http",
        }
        .into();
        // Named only when the workload at the caller's address is the one its certificate
        // proved; otherwise `unknown` (an address is no identity).
        let src = state.workload_proving(caller.addr.ip(), &caller.identity);
        rec.labels.source_principal = caller.principal.clone();
        rec.labels.source_workload = src
            .map(|w| w.metrics_name().to_string())
            .unwrap_or_default();
        rec.labels.source_workload_namespace = caller.namespace.clone();
        rec.log.method = parts.method.to_string();
        rec.log.path = parts.uri.path().to_string();
        rec.log.authority = host.to_string();
        let incoming = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let trace = TraceContext::next(incoming, &mut rand::rng());
        rec.log.trace_id = trace.trace_id_hex();
        if let Some(sink) = &self.spans {
            rec.span = PendingSpan::start(sink, &trace);
        }
        (rec, trace.header())
    }

    /// Sends the request on as `x.forward` says, and shapes the response.
    async fn forward(
        &self,
        x: Exchange<'_>,
        mut parts: Parts,
        body: Incoming,
        downstream_upgrade: Option<OnUpgrade>,
        mut rec: Recorder,
    ) -> Response<Body> {
        let f = x.forward;
        rewrite(&mut parts, &f.rewrite);
        let upgrading =
            parts.version == http::Version::HTTP_11 && parts.headers.contains_key(header::UPGRADE);
        towards_destination(
            &mut parts.headers,
            x.caller,
            &x.traceparent,
            upgrading,
            f.leaves_mesh(),
        );
        if let Some(a) = &x.decision.authn {
            token_towards_destination(&mut parts.headers, a);
        }
        filters::apply_request_headers(x.decision.filters(), &mut parts.headers);

        let runtime = self.runtimes.get(x.state, &f.service);
        let slot = match runtime.breaker.acquire().await {
            Ok(slot) => slot,
            Err(e) => return refuse(&Refusal::Overflow(e), rec),
        };
        rec.hold.push(Box::new(slot));
        rec.hold.push(Box::new(runtime.budget.enter()));

        let count = rec.request_bytes.clone();
        let (buffered, streaming) = match read_body(body, f.buffer_body && !upgrading, count).await
        {
            Ok(b) => b,
            Err(refusal) => return refuse(&refusal, rec),
        };
        if let Some(bytes) = &buffered {
            self.mirror(&f.mirrors, &parts, bytes, x.grpc);
        }
        let attempts = Attempts {
            upstreams: &self.upstreams,
            runtime: &runtime,
            endpoints: &f.endpoints,
            parts: &parts,
            retry: x.decision.retry(),
            try_timeout: f.try_timeout,
            grpc: x.grpc,
        };
        let run = attempts.run(buffered, streaming, &mut rec);
        let result = match f.request_timeout {
            Some(after) => tokio::time::timeout(after, run)
                .await
                .unwrap_or(Err(Refusal::Timeout { after })),
            None => run.await,
        };
        match result {
            Ok(resp) => respond(resp, x.decision, downstream_upgrade, rec),
            Err(refusal) => refuse(&refusal, rec),
        }
    }

    /// Fire and forget: a copy of the request to each mirror endpoint.
    fn mirror(&self, mirrors: &[Upstream], parts: &Parts, bytes: &Bytes, grpc: bool) {
        for up in mirrors {
            let body = Full::new(bytes.clone())
                .map_err(|e| match e {})
                .boxed_unsync();
            let req = build_request(parts, body, up, grpc);
            let ups = self.upstreams.clone();
            let up = up.clone();
            tokio::spawn(async move {
                let _ = ups.send(&up, version_of(&req), req, None).await;
            });
        }
    }
}

/// Applies a URL rewrite; a rewrite that makes no valid URI leaves the URI as it was.
fn rewrite(parts: &mut Parts, rewrite: &Rewrite) {
    if let Some(pq) = &rewrite.path_and_query {
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = Some(pq.clone());
        if let Ok(uri) = http::Uri::from_parts(uri) {
            parts.uri = uri;
        }
    }
    if let Some(h) = &rewrite.host {
        parts.headers.insert(header::HOST, h.clone());
    }
}

/// Hop-by-hop headers out; the caller's identity, address and the trace in. A destination
/// outside the mesh (`external`) gets the trace only: the mesh's identities and pod
/// addresses are not its business.
fn towards_destination(
    headers: &mut HeaderMap,
    caller: &Caller,
    traceparent: &str,
    upgrading: bool,
    external: bool,
) {
    strip_hop_by_hop(headers, upgrading);
    if external {
        headers.remove(PEER_IDENTITY_HEADER);
    } else if let Ok(v) = HeaderValue::from_str(&caller.principal) {
        headers.insert(PEER_IDENTITY_HEADER, v);
    }
    let for_value = match caller.addr.ip() {
        _ if external => String::new(),
        std::net::IpAddr::V4(ip) => format!("for={ip}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if !for_value.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&for_value) {
            headers.append(header::FORWARDED, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", v);
    }
}

/// The token is removed unless its rule forwards it (a query parameter stays: the URI is
/// the application's); its payload goes in the rule's output header when it names one.
fn token_towards_destination(headers: &mut HeaderMap, a: &Authenticated) {
    if !a.rule.forward_original_token {
        if let Location::Header { name, .. } = &a.location {
            headers.remove(name);
        }
    }
    if let Some(name) = &a.rule.output_payload_to_header {
        if let Ok(v) = HeaderValue::from_str(&a.payload) {
            headers.insert(name.clone(), v);
        }
    }
}

/// Seconds since the Unix epoch; 0 if the clock is before it (every token then looks
/// not yet valid, which refuses rather than accepts).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request body: buffered (replayable) when `buffer` asks and it is small enough,
/// streamed otherwise; its bytes are counted into `count` either way.
async fn read_body(
    body: Incoming,
    buffer: bool,
    count: Arc<AtomicU64>,
) -> Result<(Option<Bytes>, Option<Body>), Refusal> {
    let small = body.is_end_stream()
        || body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_BUFFERED_BODY as u64);
    if !(buffer && small) {
        return Ok((None, Some(Counted::new(body, count).boxed_unsync())));
    }
    match Limited::new(Counted::new(body, count), MAX_BUFFERED_BODY)
        .collect()
        .await
    {
        Ok(c) => Ok((Some(c.to_bytes()), None)),
        Err(e) => Err(Refusal::BodyRead(e.to_string())),
    }
}

/// The destination's response, on its way back: upgrade spliced, hop-by-hop headers out,
/// response filters applied, recorded when its body ends.
fn respond(
    mut resp: Response<Incoming>,
    decision: &Decision,
    downstream_upgrade: Option<OnUpgrade>,
    mut rec: Recorder,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice_upgraded(down, up));
        }
    }
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    filters::apply_response_headers(decision.filters(), &mut parts.headers);
    if let Some(s) = parts
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        rec.labels.grpc_response_status = s.to_string();
    }
    rec.labels.response_code = parts.status.as_u16().to_string();
    if rec.labels.response_flags.is_empty() {
        rec.labels.response_flags = NO_FLAG.into();
    }
    let body = body.map_err(Into::into).boxed_unsync();
    Response::from_parts(parts, Recorded::new(body, rec).boxed())
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
    let mut down = ambit_hbone::copy::Plain(hyper_util::rt::TokioIo::new(down));
    let mut up = ambit_hbone::copy::Plain(hyper_util::rt::TokioIo::new(up));
    if let Err(e) = ambit_hbone::copy::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

fn refuse(refusal: &Refusal, rec: Recorder) -> Response<Body> {
    if let Refusal::Denied { by } = refusal {
        rec.count_denial(by);
    }
    finish(refusal.response(), rec, refusal.flag(), refusal.to_string())
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
