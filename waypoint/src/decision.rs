//! What to do with one HTTP request: a synchronous function of a [`State`] snapshot, the
//! caller, the request head and random draws handed in as values ([`Draws`]), returning a
//! [`Decision`]. Nothing here sleeps, sends or draws a random number, so every rule of the
//! request chain is covered by table tests; [`crate::proxy`] then carries the decision out.
//!
//! The chain, in order; the first step that refuses ends it:
//!
//! | step | refusal ([`Refusal`]: status, flag) |
//! | --- | --- |
//! | destination: the tunnel's `:authority` as a service VIP, a workload address, or an external service bound to this waypoint (its VIP or address) | 503 `NR` |
//! | request authentication: the token, if any, against the RequestAuthentications bound to the Gateway or the service ([`crate::authn`]) | 401 `-` |
//! | L7 authorization (policies bound to the Gateway or the service), with the token's principal and claims | 403 `RBAC` |
//! | local rate limit of the service (the one piece of runtime state read, through [`RateLimits`]) | 429 `RL` |
//! | fault injection: a delay to wait first (`DI`), an abort | configured status, `FI` |
//! | route: rule match, redirect, rewrite, weighted backend | 404 / 500 `NR` |
//!
//! A workload address skips routing (routes attach to services); a service without routes
//! goes to its own endpoints; an external service goes to where it resolves
//! ([`crate::external`]), dialled directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_policy::{Observer, Unobserved};
use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode, Uri};

use crate::authn::jwks::JwksSource;
use crate::authn::validate::{authenticate, Authenticated};
use crate::policy::{self, Attributes, HttpAttributes, Verdict};
use crate::refusal::Refusal;
use crate::resilience::{ratelimit, Settings};
use crate::route::matching::{self, PathCond};
use crate::route::retry::RetryPolicy;
use crate::route::{filters, Filter, Rule};
use crate::state::{Service, State, Target, Upstream};

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

/// The parts of a request a decision reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    /// The `Host` header, else the URI's authority, else the tunnel's authority.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The random numbers a decision may use, drawn by the caller so that tests fix them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Draws {
    /// Uniform in `[0, 100)`: the fault delay applies when below its percentage.
    pub fault_delay: f64,
    /// Uniform in `[0, 100)`: the fault abort applies when below its percentage.
    pub fault_abort: f64,
    /// Uniform: the weighted backend is the one whose weight range holds
    /// `backend % total weight`.
    pub backend: u64,
    /// Uniform: mirror number `i` of a rule fires when base-100 digit `i % 9` of this is below
    /// its percent (a uniform `u64` has nine nearly independent such digits).
    pub mirror: u64,
}

impl Draws {
    /// Fresh draws from `rng`.
    pub fn random(rng: &mut impl rand::Rng) -> Self {
        Draws {
            fault_delay: rng.random_range(0.0..100.0),
            fault_abort: rng.random_range(0.0..100.0),
            backend: rng.random(),
            mirror: rng.random(),
        }
    }

    /// The draw, in `0..100`, of mirror number `i`.
    fn mirror(&self, i: usize) -> u32 {
        // At most 99, so the cast keeps the value.
        ((self.mirror / 100u64.pow((i % 9) as u32)) % 100) as u32
    }
}

/// The local rate limits a decision consults: the only runtime state it reads, behind a
/// trait so that tests answer for it (as ztunnel's decisions take a `Chooser`).
pub trait RateLimits {
    /// Takes a token of service `service_key` for `principal`, if the service limits rates.
    fn check(&self, service_key: &str, principal: &str) -> ratelimit::Decision;
}

/// What validating a token reads besides the state: the key sets fetched so far and the
/// time, handed in so that tests fix both.
#[derive(Clone, Copy)]
pub struct AuthnInput<'a> {
    pub keys: &'a dyn JwksSource,
    /// Unix seconds.
    pub now: u64,
}

/// What to do with a request.
#[derive(Debug)]
pub struct Decision {
    /// `destination_service` label: the hostname of the service the request goes to (the
    /// backend a route picked), else the tunnel's authority; empty when unknown.
    pub destination: String,
    /// AUDIT policies that matched an allowed request (logged by the proxy).
    pub audited: Vec<String>,
    /// The request's token, validated; what its rule says to do with it towards the
    /// destination (remove it, copy its payload to a header).
    pub authn: Option<Authenticated>,
    /// Fault delay to wait before acting (response flag `DI`).
    pub delay: Option<Duration>,
    /// The rule that matched, shared with the state (its route names the access-log line).
    pub rule: Option<Arc<Rule>>,
    pub action: Action,
}

/// The outcome of the chain.
#[derive(Debug)]
pub enum Action {
    /// Send the request on.
    Forward(Forward),
    /// Answer with a redirect from the matched rule (flag `-`).
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// Answer with the refusal's status.
    Refuse(Refusal),
}

/// How to send a request on.
#[derive(Debug)]
pub struct Forward {
    /// Key of the service whose runtime (breaker, budget, outlier detection, load balancing)
    /// governs the attempts: the picked backend, else the destination; empty for a workload
    /// that is no service's endpoint.
    pub service: String,
    /// The endpoints to pick from per attempt (shared with the state).
    pub endpoints: Arc<[Upstream]>,
    /// Index of the picked backend in the rule's `backends`.
    pub backend: Option<usize>,
    /// URL rewrite of the matched rule.
    pub rewrite: Rewrite,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// One attempt.
    pub try_timeout: Option<Duration>,
    /// Buffer a small body so it can be retried or mirrored.
    pub buffer_body: bool,
    /// One endpoint per mirror that fires (sent only when the body was buffered).
    pub mirrors: Vec<Upstream>,
}

/// A URL rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub path_and_query: Option<PathAndQuery>,
    pub host: Option<HeaderValue>,
}

impl Decision {
    /// Route and backend filters, in that order.
    pub fn filters(&self) -> impl Iterator<Item = &Filter> {
        let backend = match (&self.action, &self.rule) {
            (Action::Forward(f), Some(rule)) => f.backend.and_then(|i| rule.backends.get(i)),
            _ => None,
        };
        self.rule
            .iter()
            .flat_map(|r| r.filters.iter())
            .chain(backend.into_iter().flat_map(|b| b.filters.iter()))
    }

    /// The matched rule's retry policy.
    pub fn retry(&self) -> Option<&RetryPolicy> {
        self.rule.as_ref().and_then(|r| r.retry.as_ref())
    }
}

/// Decides on a request from `caller` through the waypoint `gateway` (`namespace/name`).
pub fn decide(
    state: &State,
    gateway: &str,
    caller: &Caller,
    req: &RequestHead<'_>,
    draws: Draws,
    limits: &dyn RateLimits,
    authn: AuthnInput<'_>,
) -> Decision {
    decide_observed(
        state,
        gateway,
        caller,
        req,
        draws,
        (limits, authn),
        &mut Unobserved,
    )
}

/// [`decide`], reporting each step of L7 policy evaluation to `observer` (`ambitctl
/// explain` records them; the proxy observes nothing).
pub fn decide_observed(
    state: &State,
    gateway: &str,
    caller: &Caller,
    req: &RequestHead<'_>,
    draws: Draws,
    (limits, authn): (&dyn RateLimits, AuthnInput<'_>),
    observer: &mut dyn Observer,
) -> Decision {
    let mut d = Decision {
        destination: String::new(),
        audited: Vec::new(),
        authn: None,
        delay: None,
        rule: None,
        action: Action::Refuse(Refusal::UnknownDestination {
            authority: caller.authority,
        }),
    };
    let Some(target) = state.resolve(caller.authority) else {
        return d;
    };
    let input = Input {
        state,
        gateway,
        caller,
        req,
        draws,
        limits,
        authn,
    };
    d.action = match input.chain(target, &mut d, observer) {
        Ok(action) => action,
        Err(refusal) => Action::Refuse(refusal),
    };
    d
}

/// What [`decide`] was given.
struct Input<'a> {
    state: &'a State,
    gateway: &'a str,
    caller: &'a Caller,
    req: &'a RequestHead<'a>,
    draws: Draws,
    limits: &'a dyn RateLimits,
    authn: AuthnInput<'a>,
}

impl Input<'_> {
    /// The steps after the destination is known; fills in `d` as they go.
    fn chain(
        &self,
        target: Target,
        d: &mut Decision,
        observer: &mut dyn Observer,
    ) -> Result<Action, Refusal> {
        let Input {
            state,
            gateway,
            caller,
            req,
            draws,
            limits,
            authn,
        } = *self;
        // The key policies and runtime state are bound by (empty for a pod that is no
        // service's endpoint), and the `destination_service` label.
        let (key, destination) = match &target {
            Target::Service { service, .. }
            | Target::Workload {
                service: Some(service),
                ..
            } => (service.key(), service.hostname.clone()),
            Target::Workload { service: None, .. } => (String::new(), caller.authority.to_string()),
            Target::External { service, host, .. } => (service.key().to_string(), host.clone()),
        };
        d.destination = destination;
        let service_key = (!key.is_empty()).then_some(key.as_str());
        let rules = state.jwt_rules_for(gateway, service_key);
        if !rules.is_empty() {
            d.authn = authenticate(&rules, req.headers, req.uri.query(), authn.keys, authn.now)
                .map_err(Refusal::Unauthenticated)?;
        }
        let token = d.authn.as_ref().map(|a| &a.auth);
        d.audited = authorize(state, gateway, service_key, (caller, req, token), observer)?;
        let settings = state.settings(&key);
        rate_limit(settings, &key, caller, limits)?;
        // The delay is waited out even when the abort follows (the client sees both).
        let faults = settings.map(|s| s.fault.decide(draws.fault_delay, draws.fault_abort));
        d.delay = faults.and_then(|f| f.delay);
        if let Some(code) = faults.and_then(|f| f.abort) {
            // Compiling the traffic policy checked the range; 503 is the fallback all the same.
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(Refusal::FaultAbort { status });
        }
        match target {
            Target::Workload { upstream, .. } => {
                Ok(Action::Forward(Forward::to(key, Arc::from([upstream]))))
            }
            Target::Service { service, port } => route(state, &service, &key, port, req, draws, d),
            // Routes attach to Services; an external service goes where it resolves.
            Target::External { upstreams, .. } => Ok(Action::Forward(Forward::to(key, upstreams))),
        }
    }
}

/// What to do with a connection that is not HTTP (opaque TCP).
#[derive(Debug)]
pub enum TcpDecision {
    /// The tunnel's `:authority` is no service VIP or workload the state knows.
    UnknownDestination,
    /// L4 policy denies it (rules needing HTTP fail closed); `by` names the policy, or the
    /// ALLOW policies that did not match.
    Denied { by: String },
    /// Copy bytes to the first of these endpoints that answers.
    Forward { upstreams: Arc<[Upstream]> },
}

/// Decides on an opaque TCP connection from `caller` through the waypoint `gateway`: the
/// destination, then the bound policies without HTTP attributes. `observer` sees each
/// step of the evaluation.
pub fn decide_tcp(
    state: &State,
    gateway: &str,
    caller: &Caller,
    observer: &mut dyn Observer,
) -> TcpDecision {
    let (key, upstreams) = match state.resolve(caller.authority) {
        None => return TcpDecision::UnknownDestination,
        Some(Target::Service { service, port }) => {
            (Some(service.key()), state.upstreams(&service, port))
        }
        Some(Target::Workload { upstream, service }) => {
            (service.map(|s| s.key()), Arc::from([upstream]))
        }
        Some(Target::External {
            service, upstreams, ..
        }) => (Some(service.key().to_string()), upstreams),
    };
    let policies = state.policies_for(gateway, key.as_deref());
    let attrs = Attributes {
        principal: Some(&caller.principal),
        namespace: Some(&caller.namespace),
        source_ip: caller.addr.ip(),
        destination_ip: caller.authority.ip(),
        destination_port: caller.authority.port(),
        http: None,
    };
    match policy::evaluate_observed(&policies, &attrs, observer) {
        Verdict::Deny { by, .. } => TcpDecision::Denied { by },
        Verdict::Allow { .. } => TcpDecision::Forward { upstreams },
    }
}

/// L7 authorization; the AUDIT policies that matched when allowed.
fn authorize(
    state: &State,
    gateway: &str,
    service_key: Option<&str>,
    (caller, req, token): (
        &Caller,
        &RequestHead<'_>,
        Option<&ambit_policy::RequestAuth>,
    ),
    observer: &mut dyn Observer,
) -> Result<Vec<String>, Refusal> {
    let policies = state.policies_for(gateway, service_key);
    let attrs = Attributes {
        principal: Some(&caller.principal),
        namespace: Some(&caller.namespace),
        source_ip: caller.addr.ip(),
        destination_ip: caller.authority.ip(),
        destination_port: caller.authority.port(),
        http: Some(HttpAttributes {
            method: req.method.as_str(),
            path: req.uri.path(),
            host: req.host,
            headers: req.headers,
            auth: token,
        }),
    };
    match policy::evaluate_observed(&policies, &attrs, observer) {
        Verdict::Deny { by, .. } => Err(Refusal::Denied { by }),
        Verdict::Allow { audited } => Ok(audited),
    }
}

fn rate_limit(
    settings: Option<&Arc<Settings>>,
    key: &str,
    caller: &Caller,
    limits: &dyn RateLimits,
) -> Result<(), Refusal> {
    if settings.is_none_or(|s| s.rate_limit.is_none()) {
        return Ok(());
    }
    match limits.check(key, &caller.principal) {
        ratelimit::Decision::Allowed => Ok(()),
        ratelimit::Decision::Limited { retry_after } => Err(Refusal::RateLimited { retry_after }),
    }
}

impl Forward {
    /// True when the request goes outside the mesh (an external service's instances).
    pub fn leaves_mesh(&self) -> bool {
        self.endpoints
            .first()
            .is_some_and(|u| matches!(u.peer, crate::state::Peer::External(_)))
    }

    /// Straight to `endpoints` of service `service`, as no route shapes it.
    fn to(service: String, endpoints: Arc<[Upstream]>) -> Self {
        Forward {
            service,
            endpoints,
            backend: None,
            rewrite: Rewrite::default(),
            request_timeout: None,
            try_timeout: None,
            buffer_body: false,
            mirrors: Vec::new(),
        }
    }
}

/// Routing for a request to `service` on service port `port`.
fn route(
    state: &State,
    service: &Arc<Service>,
    key: &str,
    port: u16,
    req: &RequestHead<'_>,
    draws: Draws,
    d: &mut Decision,
) -> Result<Action, Refusal> {
    let Some(rules) = state.rules(key).filter(|r| !r.is_empty()) else {
        let endpoints = state.upstreams(service, port);
        return Ok(Action::Forward(Forward::to(key.to_string(), endpoints)));
    };
    let view = matching::RequestView {
        method: req.method.as_str(),
        path: req.uri.path(),
        query: req.uri.query(),
        headers: req.headers,
    };
    let rule = matching::select(rules, &view).ok_or_else(|| Refusal::NoRoute {
        service: service.hostname.clone(),
        method: req.method.clone(),
        path: req.uri.path().to_string(),
    })?;
    d.rule = Some(rule.clone());
    // Rewrites relative to a prefix use the first alternative of the rule that matched.
    let matched = rule
        .matches
        .iter()
        .find(|m| m.matches(&view))
        .map(|m| &m.path);
    if let Some((status, location)) = filters::redirect(&rule.filters, req.uri, req.host, matched) {
        return Ok(Action::Redirect { status, location });
    }
    let mut forward = match pick_backend(state, rule, draws.backend)? {
        None => Forward::to(key.to_string(), state.upstreams(service, port)),
        Some(b) => {
            d.destination = b.service.hostname.clone();
            let mut f = Forward::to(
                b.service.key(),
                state.upstreams(b.service, b.port.unwrap_or(port)),
            );
            f.backend = Some(b.index);
            f
        }
    };
    forward.rewrite = rewrite(&rule.filters, req.uri, matched);
    forward.request_timeout = rule.request_timeout;
    forward.try_timeout = rule.backend_timeout;
    let filters = rule.filters.iter().chain(
        forward
            .backend
            .and_then(|i| rule.backends.get(i))
            .into_iter()
            .flat_map(|b| b.filters.iter()),
    );
    let (mirrors, configured) = mirrors(state, rule, filters, port, draws);
    forward.mirrors = mirrors;
    forward.buffer_body = rule.retry.is_some() || configured;
    Ok(Action::Forward(forward))
}

/// A backend a route picked.
struct Backend<'s> {
    /// In the rule's `backends`.
    index: usize,
    service: &'s Arc<Service>,
    /// Its port, when the reference names one (else the request's service port).
    port: Option<u16>,
}

/// The weighted backend `draw` falls on; `None` when the rule names no backend (the
/// destination serves it).
fn pick_backend<'s>(
    state: &'s State,
    rule: &Rule,
    draw: u64,
) -> Result<Option<Backend<'s>>, Refusal> {
    if rule.backends.is_empty() {
        return Ok(None);
    }
    let weight = |b: &crate::route::BackendRef| u64::from(b.weight.unwrap_or(1));
    let total: u64 = rule.backends.iter().map(weight).sum();
    if total == 0 {
        return Err(Refusal::NoBackendWeight);
    }
    let mut left = draw % total;
    let mut chosen = 0;
    for (i, b) in rule.backends.iter().enumerate() {
        if left < weight(b) {
            chosen = i;
            break;
        }
        left -= weight(b);
    }
    let b = &rule.backends[chosen];
    let namespace = b.namespace.as_deref().unwrap_or(&rule.namespace);
    match state.service_by_name(namespace, &b.name) {
        Some(service) => Ok(Some(Backend {
            index: chosen,
            service,
            port: b.port,
        })),
        None => Err(Refusal::UnknownBackend {
            namespace: namespace.to_string(),
            name: b.name.clone(),
        }),
    }
}

/// The path and host a URLRewrite filter asks for, in the forms the request takes.
fn rewrite(filters: &[Filter], uri: &Uri, matched: Option<&PathCond>) -> Rewrite {
    let (path, host) = filters::rewrite(filters, uri, matched);
    Rewrite {
        path_and_query: path.and_then(|p| p.parse().ok()),
        host: host.and_then(|h| HeaderValue::from_str(&h).ok()),
    }
}

/// One endpoint of each mirror that fires, and whether any mirror is configured at all (the
/// body is buffered either way, as the draw is per request).
fn mirrors<'a>(
    state: &State,
    rule: &Rule,
    filters: impl Iterator<Item = &'a Filter>,
    port: u16,
    draws: Draws,
) -> (Vec<Upstream>, bool) {
    let mut configured = false;
    let mut out = Vec::new();
    for (i, m) in filters::mirrors(filters).enumerate() {
        configured = true;
        if draws.mirror(i) >= m.percent.unwrap_or(100) {
            continue;
        }
        let r = &m.backend_ref;
        let namespace = r.namespace.as_deref().unwrap_or(&rule.namespace);
        let Some(svc) = state.service_by_name(namespace, &r.name) else {
            continue;
        };
        if let Some(up) = state.upstreams(svc, r.port.unwrap_or(port)).first() {
            out.push(up.clone());
        }
    }
    (out, configured)
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
