//! The walk: from a source and a destination to what each proxy on the way decides, by
//! running the proxies' own decision functions on their live snapshots, in the order a
//! connection meets them:
//!
//! 1. capture: is the source pod enrolled (its node's ztunnel serves it)?
//! 2. outbound: the source ztunnel's [`decision::outbound`]: an endpoint, a waypoint,
//!    passthrough, or a refusal;
//! 3. waypoint (when the destination has one): [`decide_observed`] for a request, or
//!    [`decide_tcp`] for a connection, with its L7 policy traced and its route named;
//! 4. inbound: the destination ztunnel's [`decision::inbound_observed`] with its L4 policy
//!    traced.
//!
//! Policy steps carry the engine's [`Trace`], recorded by the evaluation itself, so the
//! rule and field named are the ones that decided. Nothing here evaluates a policy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_policy::Trace;
use ambit_waypoint::decision::{
    decide_observed, decide_tcp, Action, AuthnInput, Caller, Draws, RateLimits, RequestHead,
    TcpDecision,
};
use ambit_waypoint::resilience::ratelimit;
use ambit_waypoint::route::matching::{mismatches, RequestView};
use ambit_waypoint::state::{State as WaypointState, StateFile, Upstream};
use ambit_ztunnel::decision::{self, Candidate, Inbound, Outbound};
use ambit_ztunnel::state::{Service, State, TunnelProtocol, Workload};
use anyhow::{bail, Context};
use serde_json::Value;

use super::report::{step, Explanation, LogEvents, Outcome, PolicyStep, SourceInfo, Step};
use super::resolve::{find_destination, find_source};
use super::source::{MeshSource, Proxy};

/// What to explain.
#[derive(Debug, Clone)]
pub struct Query {
    /// A pod (`name` or `namespace/name`), or a service account (`namespace/sa`).
    pub source: String,
    /// A service (`name.namespace[.svc.cluster.local]`, `namespace/name`), a pod
    /// (`namespace/name`) or an address, with `:port` or not.
    pub destination: String,
    pub port: Option<u16>,
    /// An HTTP request when set; a TCP connection otherwise.
    pub method: Option<String>,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// The ztunnel snapshots, by node.
struct Nodes {
    dumps: BTreeMap<String, (State, Value)>,
    errors: Vec<String>,
}

impl Nodes {
    fn load(mesh: &dyn MeshSource) -> Self {
        let mut dumps = BTreeMap::new();
        let mut errors = Vec::new();
        for node in mesh.nodes() {
            let parsed = mesh.ztunnel_dump(&node).and_then(|mut v| {
                let pods = v["local_pods"].take();
                let state: State = serde_json::from_value(v["state"].take())
                    .context("the config dump's state does not read back")?;
                Ok((state, pods))
            });
            match parsed {
                Ok(d) => {
                    dumps.insert(node, d);
                }
                Err(e) => errors.push(format!("ztunnel on {node}: {e:#}")),
            }
        }
        Nodes { dumps, errors }
    }

    /// Any node's state: every ztunnel holds every workload and service.
    fn any(&self) -> anyhow::Result<&State> {
        match self.dumps.values().next() {
            Some((s, _)) => Ok(s),
            None => bail!("no ztunnel answered: {}", self.errors.join("; ")),
        }
    }

    fn node(&self, node: &str) -> anyhow::Result<&(State, Value)> {
        self.dumps.get(node).with_context(|| {
            format!(
                "the ztunnel on {node} did not answer ({})",
                self.errors.join("; ")
            )
        })
    }
}

/// The explanation so far; the walk appends steps and ends with one outcome.
struct Walk<'a> {
    mesh: &'a dyn MeshSource,
    nodes: Nodes,
    steps: Vec<Step>,
    /// Proxies whose access log to show.
    proxies: Vec<Proxy>,
    /// Addresses the connection is sent to on the way (destination, waypoint, endpoint):
    /// what a ztunnel's access-log event must name to be about it.
    addrs: Vec<IpAddr>,
    /// Services it is for: what a waypoint's event must name.
    services: Vec<String>,
    /// Waypoints on the way, by address.
    waypoints: Vec<IpAddr>,
}

/// Explains `q` on the live state `mesh` gives.
pub fn explain(mesh: &dyn MeshSource, q: &Query) -> anyhow::Result<Explanation> {
    let nodes = Nodes::load(mesh);
    let any = nodes.any()?;
    let (source, by_sa) = find_source(any, &q.source)?;
    let (dst, kind) = find_destination(any, &source, &q.destination, q.port)?;
    let src_ip = source
        .address_like(dst.ip())
        .with_context(|| format!("{} has no address", source.describe()))?;
    let services = any
        .service_by_vip(dst.ip())
        .map(|s| vec![s.hostname.to_string()])
        .unwrap_or_default();
    let mut walk = Walk {
        mesh,
        nodes,
        steps: Vec::new(),
        proxies: Vec::new(),
        addrs: vec![dst.ip()],
        services,
        waypoints: Vec::new(),
    };
    walk.walk_from(&source, src_ip, dst, q)?;
    let last = walk.steps.last().context("no step")?;
    let (outcome, decided_at, reason) = (
        last.outcome,
        format!("{} ({})", last.step, last.proxy),
        last.policy
            .as_ref()
            .map_or_else(|| last.summary.clone(), |p| p.reason.clone()),
    );
    let access_log = walk.access_log(&source);
    Ok(Explanation {
        source: SourceInfo {
            pod: format!("{}/{}", source.namespace, source.name),
            node: source.node.to_string(),
            ip: src_ip,
            identity: source.identity.to_string(),
            by_service_account: by_sa,
        },
        destination: dst,
        destination_kind: kind,
        request: q.method.as_ref().map(|m| format!("{m} {}", q.path)),
        steps: walk.steps,
        outcome,
        decided_at,
        reason,
        access_log,
    })
}

/// Never limits: a rate limit is runtime state, not something a snapshot can answer.
struct NoLimits;

impl RateLimits for NoLimits {
    fn check(&self, _service_key: &str, _principal: &str) -> ratelimit::Decision {
        ratelimit::Decision::Allowed
    }
}

impl Walk<'_> {
    fn walk_from(
        &mut self,
        source: &Arc<Workload>,
        src_ip: IpAddr,
        dst: SocketAddr,
        q: &Query,
    ) -> anyhow::Result<()> {
        let node = source.node.to_string();
        let ztunnel = format!("ztunnel on {node}");
        let (state, pods) = self.nodes.node(&node)?;
        let state = state.clone();
        let local = &pods[&*source.uid];
        if source.protocol != TunnelProtocol::Hbone {
            self.steps.push(step(
                "capture",
                ztunnel,
                Outcome::Pass,
                format!(
                    "{} is not in the mesh (its namespace is not enrolled, or it opted out): its traffic is not captured and leaves as plain TCP",
                    source.describe()
                ),
            ));
            return self.plaintext_in(source, src_ip, dst);
        }
        if local["state"] != "enrolled" {
            self.steps.push(step(
                "capture",
                ztunnel,
                Outcome::Unknown,
                format!(
                    "{} belongs in the mesh but its node's ztunnel has not captured it ({}): {}",
                    source.describe(),
                    local["state"].as_str().unwrap_or("not seen yet"),
                    local["reason"].as_str().unwrap_or("no reason given")
                ),
            ));
            return Ok(());
        }
        self.proxies.push(Proxy::Ztunnel { node: node.clone() });
        if dst.is_ipv6() && !dst.ip().is_loopback() && !source.addresses.iter().any(IpAddr::is_ipv6)
        {
            // The capture rules close IPv6 for a pod the mesh knows no IPv6 address of
            // (only loopback and link-level ICMPv6 pass): nothing reaches ztunnel.
            self.steps.push(step(
                "capture",
                ztunnel,
                Outcome::Refused,
                format!(
                    "{} has no IPv6 address the mesh knows, so its capture rules drop IPv6 to {dst}",
                    source.describe()
                ),
            ));
            return Ok(());
        }
        self.steps.push(step(
            "capture",
            ztunnel.clone(),
            Outcome::Pass,
            format!(
                "{} is enrolled: its outbound connections are captured (15001) and leave as {}",
                source.describe(),
                source.identity
            ),
        ));
        // The proxy picks among equally near endpoints at random (or by load): the walk
        // follows the first and says how many there were.
        let candidates = std::cell::RefCell::new(Vec::<String>::new());
        let first = |_: &Service, c: &[Candidate<'_>]| {
            *candidates.borrow_mut() = c.iter().map(|c| c.workload.describe()).collect();
            0
        };
        let out = decision::outbound(&state, source, dst, &first);
        let among = {
            let c = candidates.borrow();
            if c.len() > 1 {
                format!(
                    " (one of {} equally near endpoints: {})",
                    c.len(),
                    c.join(", ")
                )
            } else {
                String::new()
            }
        };
        match out {
            Outbound::SelfDial { destination } => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Refused,
                    format!("{destination} is one of ztunnel's own listeners in the pod: reset (a loop)"),
                ));
                Ok(())
            }
            Outbound::Refuse(reason) => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Refused,
                    format!("refused: {reason}"),
                ));
                Ok(())
            }
            Outbound::External {
                destination,
                service,
            } => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Passthrough,
                    format!(
                        "plain TCP to {destination}: declared ExternalService {}",
                        service.key()
                    ),
                ));
                Ok(())
            }
            Outbound::ExternalDns {
                host,
                port,
                service,
            } => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Passthrough,
                    format!(
                        "plain TCP to {host}:{port} as ztunnel resolves it: declared ExternalService {}",
                        service.key()
                    ),
                ));
                Ok(())
            }
            Outbound::Blocked { reason, .. } => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Denied,
                    format!("refused: {reason}"),
                ));
                Ok(())
            }
            Outbound::Passthrough {
                destination,
                reason,
            } => {
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Passthrough,
                    format!("plain TCP to {destination}: {reason}"),
                ));
                Ok(())
            }
            Outbound::Hbone {
                peer,
                authority,
                expected_identity,
                workload,
                ..
            } => {
                self.addrs.extend([peer.ip(), authority.ip()]);
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Pass,
                    format!(
                        "HBONE to {peer} (authority {authority}) for {}{among}, expecting {expected_identity}",
                        workload.describe()
                    ),
                ));
                self.inbound(&workload, &source.identity, src_ip, authority)
            }
            Outbound::Waypoint {
                peer,
                authority,
                expected_identity,
                ..
            } => {
                self.addrs.extend([peer.ip(), authority.ip()]);
                self.waypoints.push(peer.ip());
                self.steps.push(step(
                    "outbound",
                    ztunnel,
                    Outcome::Pass,
                    format!(
                        "to the waypoint: HBONE to {peer} (authority {authority}){among}, expecting {expected_identity}"
                    ),
                ));
                let caller = Caller {
                    identity: source.identity.clone(),
                    principal: source.identity.to_string(),
                    namespace: source.namespace.to_string(),
                    addr: SocketAddr::new(src_ip, 0),
                    authority,
                };
                self.waypoint(peer, &expected_identity, &caller, q)
            }
        }
    }

    /// A source outside the mesh: plain TCP reaches the destination pod's inbound capture
    /// (15006) when that pod is in the mesh.
    fn plaintext_in(
        &mut self,
        source: &Workload,
        src_ip: IpAddr,
        dst: SocketAddr,
    ) -> anyhow::Result<()> {
        let state = self.nodes.any()?;
        let Some(pod) = state.workload_by_ip(dst.ip()).cloned() else {
            self.steps.push(step(
                "outbound",
                "none".into(),
                Outcome::Unknown,
                format!(
                    "{} is not a pod address: no mesh proxy sees {}'s connection to it",
                    dst,
                    source.describe()
                ),
            ));
            return Ok(());
        };
        let node = pod.node.to_string();
        let (state, _) = self.nodes.node(&node)?;
        let state = state.clone();
        let Some(pod) = state.workload_by_uid(&pod.uid).cloned() else {
            bail!("{} is not in {node}'s ztunnel state", pod.describe());
        };
        self.proxies.push(Proxy::Ztunnel { node: node.clone() });
        let mut trace = Trace::default();
        // PeerAuthentications are state and apply as ztunnel applies them; past the mesh
        // level ztunnel's --strict-inbound flag decides, which the state does not carry:
        // explained with the flag's default (PERMISSIVE).
        let d = decision::inbound_plaintext_observed(
            &state,
            &pod,
            src_ip,
            dst,
            decision::default_mtls(false),
            &mut trace,
        );
        self.push_inbound(
            format!("ztunnel on {node}"),
            &pod,
            d,
            trace,
            " (plaintext, 15006; where no PeerAuthentication sets a mode, assuming ztunnel runs without --strict-inbound)",
        );
        Ok(())
    }

    /// The destination ztunnel's decision on an HBONE `CONNECT` from `peer` at `src_ip`.
    fn inbound(
        &mut self,
        workload: &Workload,
        peer: &ambit_hbone::Identity,
        src_ip: IpAddr,
        authority: SocketAddr,
    ) -> anyhow::Result<()> {
        let node = workload.node.to_string();
        let (state, _) = self.nodes.node(&node)?;
        let state = state.clone();
        let Some(pod) = state.workload_by_uid(&workload.uid).cloned() else {
            bail!("{} is not in {node}'s ztunnel state", workload.describe());
        };
        self.proxies.push(Proxy::Ztunnel { node: node.clone() });
        let mut trace = Trace::default();
        let d = decision::inbound_observed(
            &state,
            &pod,
            Some(peer),
            src_ip,
            &authority.to_string(),
            &mut trace,
        );
        self.push_inbound(format!("ztunnel on {node}"), &pod, d, trace, "");
        Ok(())
    }

    fn push_inbound(&mut self, proxy: String, pod: &Workload, d: Inbound, trace: Trace, how: &str) {
        // Policy ran when the trace saw a verdict being made; refusals before it did not.
        let ran = |reason: &str| {
            trace
                .evaluated
                .then(|| PolicyStep::new(reason.to_string(), trace.clone()))
        };
        let s = match d {
            Inbound::Accept {
                destination,
                reason,
                audit,
            } => Step {
                status: Some(200),
                policy: ran(&reason),
                ..step(
                    "inbound",
                    proxy,
                    Outcome::Allowed,
                    format!(
                        "accepted for {}{how}: connects to {destination}; L4 policy: {reason}{}",
                        pod.describe(),
                        if audit { " (audited)" } else { "" }
                    ),
                )
            },
            Inbound::Refuse { status, reason, .. } => {
                let denied = status == 403 || status == 401;
                Step {
                    status: Some(status),
                    policy: ran(&reason),
                    ..step(
                        "inbound",
                        proxy,
                        if denied {
                            Outcome::Denied
                        } else {
                            Outcome::Refused
                        },
                        format!(
                            "refused with {status} for {}{how}: {reason}",
                            pod.describe()
                        ),
                    )
                }
            }
        };
        self.steps.push(s);
    }

    /// The waypoint at `peer`: its decision for the request (or connection), then the
    /// endpoint's ztunnel.
    fn waypoint(
        &mut self,
        peer: SocketAddr,
        identity: &ambit_hbone::Identity,
        caller: &Caller,
        q: &Query,
    ) -> anyhow::Result<()> {
        let wp = self.mesh.waypoint_dump(peer.ip())?;
        let file: StateFile = serde_json::from_value(wp.dump)
            .with_context(|| format!("waypoint {}: config dump", wp.gateway))?;
        let state = WaypointState::build(file)
            .with_context(|| format!("waypoint {}: its config dump does not build", wp.gateway))?;
        let proxy = format!("waypoint {}", wp.gateway);
        self.proxies.push(Proxy::Waypoint {
            gateway: wp.gateway.clone(),
        });
        let mut trace = Trace::default();
        let Some(method) = &q.method else {
            let d = decide_tcp(&state, &wp.gateway, caller, &mut trace);
            return match d {
                TcpDecision::UnknownDestination => {
                    self.steps.push(step(
                        "waypoint",
                        proxy,
                        Outcome::Refused,
                        format!(
                            "{} is no service or workload the waypoint knows",
                            caller.authority
                        ),
                    ));
                    Ok(())
                }
                TcpDecision::Denied { by } => {
                    let reason = format!("denied by {by}");
                    self.steps.push(Step {
                        policy: Some(PolicyStep::new(reason.clone(), trace)),
                        ..step(
                            "waypoint",
                            proxy,
                            Outcome::Denied,
                            format!("TCP (not HTTP): {reason}"),
                        )
                    });
                    Ok(())
                }
                TcpDecision::Forward { upstreams } => {
                    self.steps.push(Step {
                        policy: Some(PolicyStep::new("allowed".into(), trace)),
                        ..step(
                            "waypoint",
                            proxy,
                            Outcome::Pass,
                            format!(
                                "TCP (not HTTP): allowed, to the first reachable of {} endpoint(s)",
                                upstreams.len()
                            ),
                        )
                    });
                    self.after_waypoint(upstreams.first(), identity, peer.ip())
                }
            };
        };
        let method: http::Method = method
            .parse()
            .with_context(|| format!("{method:?} is not an HTTP method"))?;
        let uri: http::Uri = q
            .path
            .parse()
            .with_context(|| format!("{:?} is not a request path", q.path))?;
        let mut headers = http::HeaderMap::new();
        for (k, v) in &q.headers {
            let name: http::HeaderName = k.parse().with_context(|| format!("header name {k:?}"))?;
            let value: http::HeaderValue =
                v.parse().with_context(|| format!("header value {v:?}"))?;
            headers.append(name, value);
        }
        let authority = caller.authority.to_string();
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(&authority)
            .to_string();
        let head = RequestHead {
            method: &method,
            uri: &uri,
            host: &host,
            headers: &headers,
        };
        // Faults and weighted backends are drawn per request: explained with no fault
        // firing below 100% and the first backend.
        let draws = Draws {
            fault_delay: 100.0,
            fault_abort: 100.0,
            backend: 0,
            mirror: 0,
        };
        // No key set is fetched here: a token whose keys come from a URL is explained as
        // the waypoint's refusal until it has them; inline keys verify as they would there.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let authn = AuthnInput {
            keys: &ambit_waypoint::authn::jwks::Jwks::default(),
            now,
        };
        let d = decide_observed(
            &state,
            &wp.gateway,
            caller,
            &head,
            draws,
            (&NoLimits, authn),
            &mut trace,
        );
        // Routes attach to services; a workload address is not routed.
        let rules = match state.resolve(caller.authority) {
            Some(ambit_waypoint::state::Target::Service { service, .. }) => {
                state.rules(&service.key()).unwrap_or_default()
            }
            _ => &[],
        };
        let route =
            d.rule.as_ref().map(
                |rule| match rules.iter().position(|r| Arc::ptr_eq(r, rule)) {
                    Some(i) => format!("{} (rule {i} of the service's)", rule.route),
                    None => rule.route.clone(),
                },
            );
        let view = RequestView {
            method: method.as_str(),
            path: uri.path(),
            query: uri.query(),
            headers: &headers,
        };
        // Each rule's alternatives, from the same matching the decision ran.
        let route_matches: Vec<String> = mismatches(rules, &view)
            .iter()
            .zip(rules)
            .enumerate()
            .map(|(i, (alts, rule))| {
                let each: Vec<String> = alts
                    .iter()
                    .enumerate()
                    .map(|(j, m)| match m {
                        None => format!("match {j} matched"),
                        Some(m) => format!("match {j}: {m} did not match"),
                    })
                    .collect();
                format!("rule {i} ({}): {}", rule.route, each.join("; "))
            })
            .collect();
        let policy = trace.evaluated.then(|| {
            let reason = match &d.action {
                Action::Refuse(r @ ambit_waypoint::refusal::Refusal::Denied { .. }) => {
                    r.to_string()
                }
                _ => "allowed".to_string(),
            };
            PolicyStep::new(reason, trace)
        });
        match d.action {
            Action::Refuse(r) => {
                let denied = matches!(r, ambit_waypoint::refusal::Refusal::Denied { .. });
                self.steps.push(Step {
                    status: Some(r.status().as_u16()),
                    policy,
                    route,
                    route_matches,
                    ..step(
                        "waypoint",
                        proxy,
                        if denied {
                            Outcome::Denied
                        } else {
                            Outcome::Refused
                        },
                        format!(
                            "{method} {}: {} {} ({}): {r}",
                            q.path,
                            r.status().as_u16(),
                            r.flag(),
                            d.destination
                        ),
                    )
                });
                Ok(())
            }
            Action::Redirect { status, location } => {
                self.steps.push(Step {
                    status: Some(status.as_u16()),
                    policy,
                    route,
                    route_matches,
                    ..step(
                        "waypoint",
                        proxy,
                        Outcome::Allowed,
                        format!(
                            "{method} {}: answered with a redirect {status} to {location}",
                            q.path
                        ),
                    )
                });
                Ok(())
            }
            Action::Forward(f) => {
                self.steps.push(Step {
                    policy,
                    route,
                    route_matches,
                    ..step(
                        "waypoint",
                        proxy,
                        Outcome::Pass,
                        format!(
                            "{method} {}: allowed; to {} ({} ready endpoint(s){})",
                            q.path,
                            d.destination,
                            f.endpoints.len(),
                            f.endpoints
                                .first()
                                .map(|u| format!(", first {}", u.addr))
                                .unwrap_or_default()
                        ),
                    )
                });
                self.after_waypoint(f.endpoints.first(), identity, peer.ip())
            }
        }
    }

    /// The endpoint's ztunnel, reached from the waypoint as the waypoint's identity.
    fn after_waypoint(
        &mut self,
        upstream: Option<&Upstream>,
        waypoint: &ambit_hbone::Identity,
        waypoint_ip: IpAddr,
    ) -> anyhow::Result<()> {
        let Some(up) = upstream else {
            self.steps.push(step(
                "waypoint",
                "waypoint".into(),
                Outcome::Refused,
                "no ready endpoint: 503 UH".into(),
            ));
            return Ok(());
        };
        let workload = self
            .nodes
            .any()?
            .workload_by_ip(up.addr.ip())
            .cloned()
            .with_context(|| format!("endpoint {} is not in ztunnel's state", up.addr))?;
        self.addrs.push(up.addr.ip());
        self.inbound(&workload, waypoint, waypoint_ip, up.addr)
    }

    /// The last events of each proxy on the way from the source to where it goes.
    fn access_log(&self, source: &Workload) -> Vec<LogEvents> {
        const LAST: usize = 5;
        let identity = source.identity.to_string();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for proxy in &self.proxies {
            if seen.contains(proxy) {
                continue;
            }
            seen.push(proxy.clone());
            let addr = |e: &Value, key: &str| {
                e[key]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.ip().to_canonical())
            };
            let mine = |e: &Value| match proxy {
                // From the source, or from a waypoint on the way (which calls the endpoint
                // as itself), to an address on the way.
                Proxy::Ztunnel { .. } => {
                    addr(e, "dst.addr").is_some_and(|a| self.addrs.contains(&a))
                        && addr(e, "src.addr")
                            .is_some_and(|a| source.has_address(a) || self.waypoints.contains(&a))
                }
                Proxy::Waypoint { .. } => {
                    (e["src_principal"] == identity.as_str() || e["principal"] == identity.as_str())
                        && (self.services.is_empty()
                            || e["dst_service"]
                                .as_str()
                                .is_none_or(|s| self.services.iter().any(|h| h == s)))
                }
            };
            let (events, error) = match self.mesh.access_log(proxy) {
                Ok(all) => {
                    let mut m: Vec<Value> = all.into_iter().filter(|e| mine(e)).collect();
                    let skip = m.len().saturating_sub(LAST);
                    (m.split_off(skip), None)
                }
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            };
            out.push(LogEvents {
                proxy: proxy.to_string(),
                events,
                error,
            });
        }
        out
    }
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
