//! Where a connection goes, and whether it may: pure functions from state to a decision.
//!
//! The proxies' rule, "decide, then do": the proxy code computes an [`Outbound`] or [`Inbound`] value
//! from a [`State`] snapshot and then performs the I/O it describes. Nothing here touches a
//! socket, so every routing and refusal rule is covered by table tests on fixtures.
//!
//! Status codes of inbound refusals (what the HBONE server answers to `CONNECT`):
//!
//! | status | when |
//! | --- | --- |
//! | 400 | malformed authority, authority not the pod behind this listener (spoofing), or one of ztunnel's own ports (a loop) |
//! | 401 | no peer identity on an HBONE stream; plaintext to a port whose mTLS mode is STRICT (a PeerAuthentication, or `--strict-inbound` where none sets a mode) |
//! | 403 | L4 policy denies; the pod has a waypoint and the peer is not a waypoint |
//! | 503 | the pod is not in the mesh (not enrolled) |

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use ambit_hbone::Identity;
use ambit_policy::{effective_mode, MtlsDecision, MtlsMode, Observer, Unobserved};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::state::external::{ExternalPort, ExternalService, OutboundPolicy, Resolution};
use crate::state::policy::{authorize_observed, ConnectionInfo};
use crate::state::service::{Endpoint, LoadBalancing, Service};
use crate::state::workload::{GatewayAddress, TunnelProtocol, Workload, HBONE_PORT};
use crate::state::State;

/// ztunnel's own ports (the root ARCHITECTURE.md, "Ports"): a connection addressed to one of them on a pod is a
/// loop or a probe of the proxy itself, never application traffic.
pub const ZTUNNEL_PORTS: [u16; 7] = [15001, 15006, 15008, 15000, 15020, 15021, 15053];

/// The listeners ztunnel opens inside every pod (outbound, inbound plaintext, HBONE, DNS). A
/// connection from the pod to one of them on loopback or on the pod's own address reaches
/// ztunnel itself, un-NATed: its "original destination" is the listener, and dialling it again
/// would loop until the node runs out of descriptors.
pub const POD_LISTENER_PORTS: [u16; 4] = [15001, 15006, 15008, 15053];

/// What to do with a connection an enrolled pod opened (captured on 15001).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outbound {
    /// Not a mesh destination (an unknown IPv4 address, or a workload outside the mesh, of
    /// either family): connect to `destination` with plain TCP. An unknown IPv6 address is
    /// refused instead (see [`outbound`]).
    Passthrough {
        destination: SocketAddr,
        /// Why, for the access log.
        reason: &'static str,
    },
    /// Tunnel to a mesh workload. While the connection lives, the proxy holds a
    /// [`Balancer::track`] guard for `workload.uid` so least-connections sees it.
    Hbone {
        /// Where the HBONE connection goes: in in-pod mode, the destination pod's IP on 15008.
        peer: SocketAddr,
        /// `CONNECT` authority: the pod IP and target port.
        authority: SocketAddr,
        /// Identity the peer's certificate must carry.
        expected_identity: Identity,
        workload: Arc<Workload>,
        /// The service, when the connection was addressed to a VIP.
        service: Option<Arc<Service>>,
    },
    /// Tunnel to the waypoint that guards the destination.
    Waypoint {
        /// The waypoint's HBONE address (a waypoint pod on 15008).
        peer: SocketAddr,
        /// `CONNECT` authority: the original VIP:port, the pod IP:port for a workload
        /// waypoint, or what the client dialled of an external service bound to it.
        authority: SocketAddr,
        /// Identity the waypoint must present.
        expected_identity: Identity,
        service: Option<Arc<Service>>,
        workload: Option<Arc<Workload>>,
    },
    /// A declared external service: plain TCP from the pod to `destination` (the address
    /// dialled, or one of the service's STATIC endpoints when the client dialled one of its
    /// `addresses`), allowed under either outbound policy.
    External {
        destination: SocketAddr,
        service: Arc<ExternalService>,
    },
    /// A declared external service with resolution DNS, dialled at one of its VIPs: resolve
    /// `host` (ztunnel's own resolver) and connect to `port` there with plain TCP from the pod.
    ExternalDns {
        host: Arc<str>,
        port: u16,
        service: Arc<ExternalService>,
    },
    /// The source's namespace is `REGISTRY_ONLY` and `destination` is neither a mesh
    /// address nor a declared external service: close the connection, log and count it.
    Blocked {
        destination: SocketAddr,
        /// Why, for the access log.
        reason: String,
    },
    /// Close the connection: the destination cannot be served.
    Refuse(String),
    /// Reset the connection at once: it is addressed to one of ztunnel's own listeners in the
    /// pod, so serving it would dial that listener again (a loop).
    SelfDial { destination: SocketAddr },
}

/// One endpoint a connection to a VIP may go to.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub workload: &'a Arc<Workload>,
    pub endpoint: &'a Endpoint,
}

/// Picks one endpoint among equally near candidates (never called with none).
pub trait Chooser {
    /// Index into `candidates`.
    fn choose(&self, service: &Service, candidates: &[Candidate<'_>]) -> usize;

    /// Index among `n` endpoints of an external service (`n` > 0); the first by default.
    fn choose_external(&self, _n: usize) -> usize {
        0
    }
}

impl<F: Fn(&Service, &[Candidate<'_>]) -> usize> Chooser for F {
    fn choose(&self, service: &Service, candidates: &[Candidate<'_>]) -> usize {
        self(service, candidates)
    }
}

/// The proxy's load balancer: random, least-connections or round-robin as each service
/// asks, with the per-endpoint connection counts least-connections needs. Cheap to clone;
/// the proxy keeps one.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<BalancerInner>,
}

struct BalancerInner {
    /// Open connections by workload uid, kept by [`ConnectionGuard`]s.
    connections: Mutex<HashMap<Arc<str>, usize>>,
    /// Next index by service hostname, for round-robin.
    turns: Mutex<HashMap<Arc<str>, usize>>,
    rng: Mutex<StdRng>,
}

/// Counts one connection to an endpoint for as long as it lives.
pub struct ConnectionGuard {
    inner: Arc<BalancerInner>,
    uid: Arc<str>,
}

/// Critical sections here are a few instructions and cannot panic half-way, so a poisoned
/// lock still holds consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Balancer {
    /// A balancer seeded from the operating system.
    pub fn new() -> Self {
        Self::with_rng(StdRng::from_os_rng())
    }

    /// A balancer with a given random source (tests make it deterministic).
    pub fn with_rng(rng: StdRng) -> Self {
        Balancer {
            inner: Arc::new(BalancerInner {
                connections: Mutex::new(HashMap::new()),
                turns: Mutex::new(HashMap::new()),
                rng: Mutex::new(rng),
            }),
        }
    }

    /// Starts counting a connection to workload `uid`; the count drops with the guard.
    pub fn track(&self, uid: Arc<str>) -> ConnectionGuard {
        *lock(&self.inner.connections)
            .entry(uid.clone())
            .or_default() += 1;
        ConnectionGuard {
            inner: self.inner.clone(),
            uid,
        }
    }

    /// Connections currently open to workload `uid`.
    pub fn connections(&self, uid: &str) -> usize {
        lock(&self.inner.connections).get(uid).copied().unwrap_or(0)
    }

    fn random(&self, n: usize) -> usize {
        lock(&self.inner.rng).random_range(0..n)
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut conns = lock(&self.inner.connections);
        if let Some(n) = conns.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&self.uid);
            }
        }
    }
}

impl Chooser for Balancer {
    fn choose_external(&self, n: usize) -> usize {
        if n <= 1 {
            0
        } else {
            self.random(n)
        }
    }

    fn choose(&self, service: &Service, candidates: &[Candidate<'_>]) -> usize {
        let n = candidates.len();
        if n <= 1 {
            return 0;
        }
        match service.load_balancing {
            LoadBalancing::Random => self.random(n),
            LoadBalancing::RoundRobin => {
                let mut turns = lock(&self.inner.turns);
                let t = turns.entry(service.hostname.clone()).or_default();
                let i = *t % n;
                *t = t.wrapping_add(1);
                i
            }
            LoadBalancing::LeastConnections => {
                let counts: Vec<usize> = {
                    let conns = lock(&self.inner.connections);
                    candidates
                        .iter()
                        .map(|c| conns.get(&c.workload.uid).copied().unwrap_or(0))
                        .collect()
                };
                let min = counts.iter().copied().min().unwrap_or(0);
                // Ties are broken at random so that idle endpoints share the load.
                let tied: Vec<usize> = (0..n).filter(|&i| counts[i] == min).collect();
                tied[self.random(tied.len())]
            }
        }
    }
}

/// True when `source` is the waypoint `wp` (so its traffic must not loop back to itself).
fn is_waypoint(source: &Workload, wp: &GatewayAddress) -> bool {
    source.has_address(wp.address) || (source.is_waypoint && source.identity == wp.identity)
}

/// Ready endpoints of `svc` whose workload the state knows and can address.
fn ready_candidates<'a>(state: &'a State, svc: &'a Service) -> Vec<Candidate<'a>> {
    svc.endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let w = state.workload_by_uid(&e.workload_uid)?;
            (!w.addresses.is_empty()).then_some(Candidate {
                workload: w,
                endpoint: e,
            })
        })
        .collect()
}

/// Nearest candidates first: same node, else same zone, else all of them.
fn nearest<'a>(source: &Workload, all: Vec<Candidate<'a>>) -> Vec<Candidate<'a>> {
    let same_node: Vec<_> = all
        .iter()
        .copied()
        .filter(|c| !source.node.is_empty() && c.workload.node == source.node)
        .collect();
    if !same_node.is_empty() {
        return same_node;
    }
    let same_zone: Vec<_> = all
        .iter()
        .copied()
        .filter(|c| source.zone.is_some() && c.workload.zone == source.zone)
        .collect();
    if !same_zone.is_empty() {
        return same_zone;
    }
    all
}

/// Where to send the tunnel for waypoint `wp`: a waypoint addressed by its Service VIP is
/// resolved to one of its pods here, since HBONE goes to a pod's 15008.
fn waypoint_peer(
    state: &State,
    source: &Workload,
    wp: &GatewayAddress,
    chooser: &dyn Chooser,
) -> Option<SocketAddr> {
    let Some(svc) = state.service_by_vip(wp.address) else {
        return Some(wp.hbone_addr());
    };
    let near = nearest(source, ready_candidates(state, svc));
    if near.is_empty() {
        return None;
    }
    let c = near[chooser.choose(svc, &near).min(near.len() - 1)];
    let ip = c.workload.address_like(wp.address)?;
    Some(SocketAddr::new(ip, wp.hbone_port))
}

fn to_waypoint(
    state: &State,
    source: &Workload,
    wp: &GatewayAddress,
    authority: SocketAddr,
    service: Option<Arc<Service>>,
    workload: Option<Arc<Workload>>,
    chooser: &dyn Chooser,
) -> Outbound {
    match waypoint_peer(state, source, wp, chooser) {
        Some(peer) => Outbound::Waypoint {
            peer,
            authority,
            expected_identity: wp.identity.clone(),
            service,
            workload,
        },
        None => Outbound::Refuse(format!(
            "waypoint {} ({}) has no ready endpoint",
            wp.address, wp.identity
        )),
    }
}

/// The decision for a connection to workload `w` at `addr`.
fn to_workload(
    state: &State,
    source: &Workload,
    w: &Arc<Workload>,
    addr: SocketAddr,
    service: Option<Arc<Service>>,
    chooser: &dyn Chooser,
) -> Outbound {
    if w.protocol == TunnelProtocol::Tcp {
        return Outbound::Passthrough {
            destination: addr,
            reason: "destination workload is not in the mesh",
        };
    }
    if let Some(wp) = &w.waypoint {
        if !is_waypoint(source, wp) {
            return to_waypoint(state, source, wp, addr, service, Some(w.clone()), chooser);
        }
    }
    Outbound::Hbone {
        peer: SocketAddr::new(addr.ip(), HBONE_PORT),
        authority: addr,
        expected_identity: w.identity.clone(),
        workload: w.clone(),
        service,
    }
}

/// An external service bound to a waypoint is reached through it (authority: what the
/// client dialled, which the waypoint resolves as ztunnel would), unless the source is that
/// waypoint dialling out.
fn through_waypoint(
    state: &State,
    source: &Workload,
    x: &ExternalService,
    dst: SocketAddr,
    chooser: &dyn Chooser,
) -> Option<Outbound> {
    let wp = x.waypoint.as_ref()?;
    (!is_waypoint(source, wp)).then(|| to_waypoint(state, source, wp, dst, None, None, chooser))
}

/// The decision for a connection to external service `x`, dialled at `dst`: the dialled
/// address, unless the service is STATIC and `dst` is one of its `addresses` rather than an
/// endpoint, in which case an endpoint (on its own port for `dst`'s port, if it has one).
fn to_external(x: &Arc<ExternalService>, dst: SocketAddr, chooser: &dyn Chooser) -> Outbound {
    let is_endpoint = x
        .endpoints
        .iter()
        .any(|e| e.address.parse::<IpAddr>().ok() == Some(dst.ip()));
    let destination = match x.resolution {
        Resolution::Static if !is_endpoint && !x.endpoints.is_empty() => {
            let e = &x.endpoints[chooser
                .choose_external(x.endpoints.len())
                .min(x.endpoints.len() - 1)];
            let port = x.ports.iter().find(|p| p.number == dst.port());
            let target = port
                .and_then(|p| e.ports.get(&p.name).copied().or(p.target_port))
                .unwrap_or(dst.port());
            match e.address.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, target),
                // The store keeps STATIC endpoints to IP addresses.
                Err(_) => dst,
            }
        }
        _ => dst,
    };
    Outbound::External {
        destination,
        service: x.clone(),
    }
}

/// The decision for a connection to one of external service `x`'s allocated VIPs: a STATIC
/// endpoint, or (DNS) the endpoint's or the VIP's host resolved; NONE has nowhere to go. `port` is
/// the declared port `dst` is on (the caller refused an undeclared one).
fn to_external_vip(
    x: &Arc<ExternalService>,
    port: &ExternalPort,
    dst: SocketAddr,
    chooser: &dyn Chooser,
) -> Outbound {
    let target = port.target_port.unwrap_or(port.number);
    let endpoint = (!x.endpoints.is_empty()).then(|| {
        let e = &x.endpoints[chooser
            .choose_external(x.endpoints.len())
            .min(x.endpoints.len() - 1)];
        (e, e.ports.get(&port.name).copied().unwrap_or(target))
    });
    let host = x
        .vips
        .iter()
        .find(|v| v.address == dst.ip())
        .map(|v| v.host.clone());
    match (x.resolution, endpoint, host) {
        (Resolution::Static | Resolution::Dns, Some((e, p)), _) => {
            match e.address.parse::<IpAddr>() {
                Ok(ip) => Outbound::External {
                    destination: SocketAddr::new(ip, p),
                    service: x.clone(),
                },
                Err(_) => Outbound::ExternalDns {
                    host: e.address.clone(),
                    port: p,
                    service: x.clone(),
                },
            }
        }
        (Resolution::Dns, None, Some(host)) => Outbound::ExternalDns {
            host,
            port: target,
            service: x.clone(),
        },
        _ => Outbound::Refuse(format!(
            "external service {} has resolution NONE and no endpoint: its VIP {} leads nowhere \
             (declare addresses, or use resolution STATIC or DNS)",
            x.key(),
            dst.ip()
        )),
    }
}

/// Decides where a UDP flow (one 5-tuple) from `source` to `original_dst` goes: as
/// [`outbound`], but a destination guarded by a waypoint is refused, because a waypoint
/// carries TCP only (its server offers no CONNECT-UDP) and sending the flow straight to the
/// pod would bypass the waypoint's policy. `Hbone` then means a CONNECT-UDP stream.
pub fn outbound_udp(
    state: &State,
    source: &Workload,
    original_dst: SocketAddr,
    chooser: &dyn Chooser,
) -> Outbound {
    match outbound(state, source, original_dst, chooser) {
        Outbound::Waypoint { authority, .. } => Outbound::Refuse(format!(
            "UDP to {authority} is not carried: its destination is behind a waypoint, which carries TCP only"
        )),
        // A declared address goes out as passthrough does; a VIP of a DNS-resolved service
        // would need ztunnel to resolve per flow, which UDP does not do yet.
        Outbound::External { destination, .. } => Outbound::Passthrough {
            destination,
            reason: "declared external service",
        },
        Outbound::ExternalDns { host, .. } => Outbound::Refuse(format!(
            "UDP to external host {host} is not carried: a service of resolution DNS is reached over TCP only"
        )),
        other => other,
    }
}

/// True when `dst` is one of ztunnel's listeners in `source`'s own namespace: loopback, the
/// unspecified address (which connects locally) or one of the pod's addresses.
fn is_self_dial(source: &Workload, dst: SocketAddr) -> bool {
    let ip = dst.ip();
    POD_LISTENER_PORTS.contains(&dst.port())
        && (ip.is_loopback() || ip.is_unspecified() || source.has_address(ip))
}

/// Decides where a connection from `source` to `original_dst` (its original destination,
/// as captured) goes. `chooser` picks among equally near endpoints of a VIP.
///
/// Both families are decided alike (an IPv6 pod address or VIP gives HBONE to the pod's IPv6
/// address, authority `[addr]:port`), but for one rule: an IPv6 destination the mesh does not
/// know is refused, not passed through, since IPv6 that cannot be meshed must not leave the
/// pod. IPv4-mapped addresses are read as IPv4.
pub fn outbound(
    state: &State,
    source: &Workload,
    original_dst: SocketAddr,
    chooser: &dyn Chooser,
) -> Outbound {
    let dst = SocketAddr::new(original_dst.ip().to_canonical(), original_dst.port());
    if is_self_dial(source, dst) {
        return Outbound::SelfDial { destination: dst };
    }
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        let describe = || format!("service {}/{}", svc.namespace, svc.name);
        let Some(port) = svc.port(dst.port()) else {
            return Outbound::Refuse(format!(
                "{} does not expose port {}",
                describe(),
                dst.port()
            ));
        };
        if let Some(wp) = &svc.waypoint {
            if !is_waypoint(source, wp) {
                return to_waypoint(state, source, wp, dst, Some(svc.clone()), None, chooser);
            }
        }
        let near = nearest(source, ready_candidates(state, svc));
        if near.is_empty() {
            return Outbound::Refuse(format!(
                "{} has no ready endpoint for port {}",
                describe(),
                dst.port()
            ));
        }
        let c = near[chooser.choose(svc, &near).min(near.len() - 1)];
        let target = svc.target_port(c.endpoint, port);
        let Some(ip) = c.workload.address_like(dst.ip()) else {
            // ready_candidates only keeps workloads with an address.
            return Outbound::Refuse(format!(
                "{}: endpoint {} has no address",
                describe(),
                c.workload.describe()
            ));
        };
        return to_workload(
            state,
            source,
            c.workload,
            SocketAddr::new(ip, target),
            Some(svc.clone()),
            chooser,
        );
    }
    if let Some(w) = state.workload_by_ip(dst.ip()) {
        return to_workload(state, source, w, dst, None, chooser);
    }
    if let Some(x) = state.external_service_by_vip(dst.ip()) {
        let Some(port) = x.ports.iter().find(|p| p.number == dst.port()) else {
            return Outbound::Refuse(format!(
                "external service {} does not declare port {}",
                x.key(),
                dst.port()
            ));
        };
        if let Some(out) = through_waypoint(state, source, x, dst, chooser) {
            return out;
        }
        return to_external_vip(x, port, dst, chooser);
    }
    if let Some(x) = state.external_service_for(dst) {
        if let Some(out) = through_waypoint(state, source, x, dst, chooser) {
            return out;
        }
        return to_external(x, dst, chooser);
    }
    if source.outbound_policy == OutboundPolicy::RegistryOnly && !dst.ip().is_loopback() {
        return Outbound::Blocked {
            destination: dst,
            reason: format!(
                "outbound policy REGISTRY_ONLY of namespace {}: {dst} is neither a mesh \
                 destination nor a declared ExternalService",
                source.namespace
            ),
        };
    }
    if dst.is_ipv6() && !dst.ip().is_loopback() {
        // IPv6 that cannot be meshed is not let out: an address the mesh does not know may
        // be a meshed pod's that the mesh has no record of (its inbound could not be
        // checked), and the pod's IPv4 is how it reaches the rest of the world.
        return Outbound::Refuse(format!(
            "{} is not an IPv6 address the mesh knows: IPv6 that cannot be meshed is not let out",
            dst.ip()
        ));
    }
    Outbound::Passthrough {
        destination: dst,
        reason: "destination is not a mesh address",
    }
}

/// What to do with a connection arriving for a pod (HBONE `CONNECT`, or plaintext on 15006).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Inbound {
    /// Connect to `destination` (the pod) from the client's address.
    Accept {
        destination: SocketAddr,
        /// An AUDIT policy matched: the access log marks the connection.
        audit: bool,
        /// Which policy allowed it (or that none applies), for the access log.
        reason: String,
    },
    /// Refuse with `status` (the `CONNECT` response; for plaintext, the access-log code).
    Refuse {
        status: u16,
        reason: String,
        /// The policy that denied (see [`crate::state::policy::Verdict::denied_by`]);
        /// `None` when no policy did (an unknown destination, mTLS required...).
        denied_by: Option<String>,
    },
}

impl Inbound {
    fn refuse(status: u16, reason: impl Into<String>) -> Self {
        Inbound::Refuse {
            status,
            reason: reason.into(),
            denied_by: None,
        }
    }
}

/// Checks shared by both inbound paths: the address is the pod's, and not a loop.
fn check_destination(pod: &Workload, dst: SocketAddr) -> Result<(), Inbound> {
    if !pod.has_address(dst.ip()) {
        return Err(Inbound::refuse(
            400,
            format!(
                "{} is not the pod behind this listener ({})",
                dst.ip(),
                pod.describe()
            ),
        ));
    }
    if ZTUNNEL_PORTS.contains(&dst.port()) {
        return Err(Inbound::refuse(
            400,
            format!("port {} is one of ztunnel's own ports (loop)", dst.port()),
        ));
    }
    if pod.protocol != TunnelProtocol::Hbone {
        return Err(Inbound::refuse(
            503,
            format!("{} is not in the mesh", pod.describe()),
        ));
    }
    Ok(())
}

fn policy(
    state: &State,
    pod: &Workload,
    conn: ConnectionInfo<'_>,
    dst: SocketAddr,
    observer: &mut dyn Observer,
) -> Inbound {
    let verdict = authorize_observed(state, pod, &conn, observer);
    if verdict.allowed {
        Inbound::Accept {
            destination: dst,
            audit: verdict.audit,
            reason: verdict.reason,
        }
    } else {
        Inbound::Refuse {
            status: 403,
            reason: verdict.reason,
            denied_by: verdict.denied_by,
        }
    }
}

/// Decides on an HBONE `CONNECT` to `authority` arriving on the listener of `pod`, from a
/// peer that presented `peer` and connected from `source_ip`.
///
/// Only a waypoint set on the workload itself is enforced here: a service's waypoint guards
/// the service's VIP, and dialling a pod IP directly is, as in Istio, the pod's own policy's
/// business.
pub fn inbound(
    state: &State,
    pod: &Workload,
    peer: Option<&Identity>,
    source_ip: IpAddr,
    authority: &str,
) -> Inbound {
    inbound_observed(state, pod, peer, source_ip, authority, &mut Unobserved)
}

/// [`inbound`], reporting each step of L4 policy evaluation to `observer` (`ambitctl
/// explain` records them; the proxy observes nothing).
pub fn inbound_observed(
    state: &State,
    pod: &Workload,
    peer: Option<&Identity>,
    source_ip: IpAddr,
    authority: &str,
    observer: &mut dyn Observer,
) -> Inbound {
    let Ok(dst) = authority.parse::<SocketAddr>() else {
        return Inbound::refuse(400, format!("authority {authority:?} is not an ip:port"));
    };
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if let Err(refusal) = check_destination(pod, dst) {
        return refusal;
    }
    let Some(peer) = peer else {
        return Inbound::refuse(401, "HBONE stream without a peer identity");
    };
    // Traffic for a pod behind a waypoint must have gone through one, or L7 policy would
    // be bypassed by dialling the pod directly.
    if let Some(wp) = &pod.waypoint {
        if *peer != wp.identity && !state.is_waypoint_identity(peer) {
            return Inbound::refuse(
                403,
                format!(
                    "{} must be reached through its waypoint ({}), not from {peer}",
                    pod.describe(),
                    wp.identity
                ),
            );
        }
    }
    let conn = ConnectionInfo {
        src_identity: Some(peer),
        src_ip: source_ip.to_canonical(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    policy(state, pod, conn, dst, observer)
}

/// ztunnel's own mTLS mode, where no PeerAuthentication sets one at any level:
/// `--strict-inbound` makes it STRICT, else PERMISSIVE (Istio's default).
pub fn default_mtls(strict_inbound: bool) -> MtlsMode {
    if strict_inbound {
        MtlsMode::Strict
    } else {
        MtlsMode::Permissive
    }
}

/// The mTLS mode of `pod`'s port `port`: the PeerAuthentications of the state, resolved by
/// the shared engine (port > workload > namespace > mesh, UNSET inherits), over `default`.
pub fn mtls_mode(state: &State, pod: &Workload, port: u16, default: MtlsMode) -> MtlsDecision {
    let policies = state.peer_authentications_for(pod);
    effective_mode(
        policies.iter().map(|p| &**p),
        &pod.namespace,
        &pod.labels,
        port,
        default,
    )
}

/// Decides on a plaintext connection to `dst` captured on 15006 for `pod`. A port whose
/// mTLS mode is STRICT refuses plaintext (401, the reason naming the PeerAuthentication
/// and level that set it, or ztunnel's default); otherwise policy runs without a source
/// identity (so principal and namespace rules cannot match it).
pub fn inbound_plaintext(
    state: &State,
    pod: &Workload,
    source_ip: IpAddr,
    dst: SocketAddr,
    default_mode: MtlsMode,
) -> Inbound {
    inbound_plaintext_observed(state, pod, source_ip, dst, default_mode, &mut Unobserved)
}

/// [`inbound_plaintext`], reporting each step of L4 policy evaluation to `observer`.
pub fn inbound_plaintext_observed(
    state: &State,
    pod: &Workload,
    source_ip: IpAddr,
    dst: SocketAddr,
    default_mode: MtlsMode,
    observer: &mut dyn Observer,
) -> Inbound {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if let Err(refusal) = check_destination(pod, dst) {
        return refusal;
    }
    let mtls = mtls_mode(state, pod, dst.port(), default_mode);
    if !mtls.allows_plaintext() {
        return Inbound::refuse(401, format!("plaintext refused: mTLS {mtls}"));
    }
    let conn = ConnectionInfo {
        src_identity: None,
        src_ip: source_ip.to_canonical(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    policy(state, pod, conn, dst, observer)
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
