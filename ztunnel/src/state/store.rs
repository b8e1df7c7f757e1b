//! The state store: one writer applies pushes, any number of readers look things up.
//!
//! # Why snapshots (arc-swap) rather than a lock
//!
//! Readers are on the per-connection path and make several lookups per decision (workload
//! by source IP, service by VIP, endpoints' workloads, policies). With [`arc_swap`] each
//! reader loads one immutable [`State`] snapshot, lock-free, and every lookup of that
//! decision sees the same version of the mesh; a writer rebuilding indexes never blocks a
//! connection, and a connection never sees half a push.
//!
//! The single writer ([`Store`]) builds the next state off to the side: it converts every
//! resource of the push first, and only then copies the current maps (pointer copies: values
//! are `Arc`s), applies the changes, rebuilds the indexes and swaps the snapshot in. A push
//! that fails conversion is refused as a whole and the previous snapshot stays: the proxy
//! keeps its last good state. Rebuilding indexes per push is O(state), which is fine at the
//! rate pushes arrive (changes, not connections) and keeps the indexes trivially consistent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_hbone::Identity;
use ambit_proto::discovery as pb;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::service::{Service, ServicePort};
use super::workload::Workload;
use super::{Authorization, ConvertError, ExternalService, PeerAuthentication, PolicyScope};

/// Why a push was refused (the NACK reason is this error's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A resource of the push could not be converted; nothing was applied.
    #[error(transparent)]
    Rejected(#[from] ConvertError),
}

/// Workloads of this ztunnel's node, by uid: what the capture layer must serve.
pub type LocalWorkloads = BTreeMap<Arc<str>, Arc<Workload>>;

/// Lookup indexes, derived from the primary maps on every push.
#[derive(Debug, Default, Clone)]
struct Indexes {
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    service_by_hostname: HashMap<Arc<str>, Arc<Service>>,
    workloads_by_node: HashMap<Arc<str>, Vec<Arc<Workload>>>,
    global_policies: Vec<Arc<Authorization>>,
    namespace_policies: HashMap<Arc<str>, Vec<Arc<Authorization>>>,
    global_peer_auth: Vec<Arc<PeerAuthentication>>,
    /// Namespace-wide and selector policies, by their namespace.
    namespace_peer_auth: HashMap<Arc<str>, Vec<Arc<PeerAuthentication>>>,
    waypoint_identities: HashSet<Identity>,
    /// External services by allocated VIP, and their VIPs by host.
    external_by_vip: HashMap<IpAddr, Arc<ExternalService>>,
    external_vips_by_host: HashMap<Arc<str>, Vec<IpAddr>>,
    /// External services by each single address they declare (a /32 or /128 network, or
    /// an endpoint's IP), in key order; and those declaring a wider network, in key order.
    /// A connection outside the mesh looks up its address instead of scanning them all.
    external_by_ip: HashMap<IpAddr, Vec<Arc<ExternalService>>>,
    external_wide: Vec<Arc<ExternalService>>,
}

/// One immutable version of the mesh as this proxy knows it. `Serialize` is the admin
/// config dump; `Deserialize` reads such a dump back, indexes rebuilt, so that tools
/// (`ambitctl explain`) run ztunnel's decisions on the very snapshot a proxy serves.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(from = "Snapshot")]
pub struct State {
    version: u64,
    /// By uid.
    workloads: BTreeMap<Arc<str>, Arc<Workload>>,
    /// By "namespace/hostname".
    services: BTreeMap<Arc<str>, Arc<Service>>,
    /// By "namespace/name".
    policies: BTreeMap<Arc<str>, Arc<Authorization>>,
    /// By "namespace/name".
    peer_authentications: BTreeMap<Arc<str>, Arc<PeerAuthentication>>,
    /// By "namespace/name".
    #[serde(default)]
    external_services: BTreeMap<Arc<str>, Arc<ExternalService>>,
    /// PEM roots of the mesh's trust bundle.
    trust_roots: Vec<Arc<str>>,
    #[serde(skip)]
    idx: Indexes,
}

/// The serialised part of a [`State`]: what the config dump holds.
#[derive(Deserialize)]
struct Snapshot {
    #[serde(default)]
    version: u64,
    #[serde(default)]
    workloads: BTreeMap<Arc<str>, Arc<Workload>>,
    #[serde(default)]
    services: BTreeMap<Arc<str>, Arc<Service>>,
    #[serde(default)]
    policies: BTreeMap<Arc<str>, Arc<Authorization>>,
    #[serde(default)]
    peer_authentications: BTreeMap<Arc<str>, Arc<PeerAuthentication>>,
    #[serde(default)]
    external_services: BTreeMap<Arc<str>, Arc<ExternalService>>,
    #[serde(default)]
    trust_roots: Vec<Arc<str>>,
}

impl From<Snapshot> for State {
    fn from(s: Snapshot) -> Self {
        let mut state = State {
            version: s.version,
            workloads: s.workloads,
            services: s.services,
            policies: s.policies,
            peer_authentications: s.peer_authentications,
            external_services: s.external_services,
            trust_roots: s.trust_roots,
            idx: Indexes::default(),
        };
        state.reindex();
        state
    }
}

impl State {
    /// Model version of the last push applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    pub fn peer_authentications(&self) -> impl Iterator<Item = &Arc<PeerAuthentication>> {
        self.peer_authentications.values()
    }

    pub fn external_services(&self) -> impl Iterator<Item = &Arc<ExternalService>> {
        self.external_services.values()
    }

    /// The external service a connection to `dst` is for (the first by key when several
    /// declare it; they only differ in name then).
    pub fn external_service_for(&self, dst: SocketAddr) -> Option<&Arc<ExternalService>> {
        let exact = self
            .idx
            .external_by_ip
            .get(&dst.ip().to_canonical())
            .into_iter()
            .flatten();
        exact
            .chain(&self.idx.external_wide)
            .filter(|x| x.matches(dst))
            .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    }

    /// The external service owning allocated VIP `ip`, whatever the port.
    pub fn external_service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ExternalService>> {
        self.idx.external_by_vip.get(&ip.to_canonical())
    }

    /// The VIPs allocated to external host `host` (lower case, no trailing dot).
    pub fn external_vips(&self, host: &str) -> Option<&[IpAddr]> {
        self.idx.external_vips_by_host.get(host).map(Vec::as_slice)
    }

    pub fn trust_roots(&self) -> &[Arc<str>] {
        &self.trust_roots
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload owning `ip` (IPv4 or IPv6; IPv4-mapped IPv6 is the IPv4 address).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.idx.workload_by_ip.get(&ip.to_canonical())
    }

    /// The service owning VIP `ip`, whatever the port.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.idx.service_by_vip.get(&ip.to_canonical())
    }

    /// The service at `addr` and the port entry for `addr`'s port. `Some((svc, None))` says
    /// the VIP is known but does not expose that port.
    pub fn service_by_addr(
        &self,
        addr: SocketAddr,
    ) -> Option<(&Arc<Service>, Option<&ServicePort>)> {
        let svc = self.service_by_vip(addr.ip())?;
        Some((svc, svc.port(addr.port())))
    }

    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        self.idx.service_by_hostname.get(hostname)
    }

    /// A policy by "namespace/name".
    pub fn policy(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.policies.get(key)
    }

    /// Workloads scheduled on `node`, ordered by uid.
    pub fn workloads_on_node(&self, node: &str) -> &[Arc<Workload>] {
        self.idx
            .workloads_by_node
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// `identity` belongs to a waypoint (a workload marked as one, or one named as a
    /// waypoint by some service or workload).
    pub fn is_waypoint_identity(&self, identity: &Identity) -> bool {
        self.idx.waypoint_identities.contains(identity)
    }

    /// Policies ztunnel enforces for `dst`: global ones, its namespace's, and those selecting
    /// it, in a stable order (global, namespace, selected; each by key). Policies bound to a
    /// waypoint are left to the waypoint. A selector reference to a policy the state lacks
    /// is skipped, as Istio does: pushes are atomic, so that is a controller bug, logged there.
    pub fn policies_for(&self, dst: &Workload) -> Vec<Arc<Authorization>> {
        // Scopes are disjoint (a policy has one), so only selector references can repeat.
        let mut out: Vec<Arc<Authorization>> = self.idx.global_policies.clone();
        if let Some(ps) = self.idx.namespace_policies.get(&dst.namespace) {
            out.extend(ps.iter().cloned());
        }
        let first_selected = out.len();
        for key in &dst.authorization_policies {
            let Some(p) = self.policies.get(key) else {
                continue;
            };
            let selectable = p.scope == PolicyScope::WorkloadSelector && !p.for_waypoint();
            if selectable && !out[first_selected..].iter().any(|q| Arc::ptr_eq(p, q)) {
                out.push(p.clone());
            }
        }
        out
    }

    /// The PeerAuthentications that may apply to `dst`: the mesh's and those of its
    /// namespace (namespace-wide and selector ones), by key within each group. Which of
    /// them select it, and which level wins, is the engine's business
    /// ([`ambit_policy::effective_mode`]).
    pub fn peer_authentications_for(&self, dst: &Workload) -> Vec<Arc<PeerAuthentication>> {
        let mut out = self.idx.global_peer_auth.clone();
        if let Some(ps) = self.idx.namespace_peer_auth.get(&dst.namespace) {
            out.extend(ps.iter().cloned());
        }
        out
    }

    /// Workloads on `node`, as the local-workloads watch publishes them.
    fn local(&self, node: &str) -> LocalWorkloads {
        self.workloads_on_node(node)
            .iter()
            .map(|w| (w.uid.clone(), w.clone()))
            .collect()
    }

    fn reindex(&mut self) {
        let mut idx = Indexes::default();
        // BTreeMap order makes the winner of an address clash deterministic (lowest uid);
        // clashes only happen with host-network pods, which are not in the mesh anyway.
        for w in self.workloads.values() {
            for ip in &w.addresses {
                if let Some(prev) = idx.workload_by_ip.get(ip) {
                    tracing::debug!(%ip, kept = %prev.uid, ignored = %w.uid, "two workloads share an address");
                    continue;
                }
                idx.workload_by_ip.insert(*ip, w.clone());
            }
            idx.workloads_by_node
                .entry(w.node.clone())
                .or_default()
                .push(w.clone());
            if w.is_waypoint {
                idx.waypoint_identities.insert(w.identity.clone());
            }
            if let Some(wp) = &w.waypoint {
                idx.waypoint_identities.insert(wp.identity.clone());
            }
        }
        for s in self.services.values() {
            for vip in &s.vips {
                idx.service_by_vip.entry(*vip).or_insert_with(|| s.clone());
            }
            idx.service_by_hostname
                .entry(s.hostname.clone())
                .or_insert_with(|| s.clone());
            if let Some(wp) = &s.waypoint {
                idx.waypoint_identities.insert(wp.identity.clone());
            }
        }
        for p in self.policies.values() {
            if p.for_waypoint() {
                continue;
            }
            match p.scope {
                PolicyScope::Global => idx.global_policies.push(p.clone()),
                PolicyScope::Namespace => idx
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                PolicyScope::WorkloadSelector => {}
            }
        }
        for p in self.peer_authentications.values() {
            match p.scope {
                PolicyScope::Global => idx.global_peer_auth.push(p.clone()),
                PolicyScope::Namespace | PolicyScope::WorkloadSelector => idx
                    .namespace_peer_auth
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
            }
        }
        for x in self.external_services.values() {
            let mut singles: Vec<IpAddr> = x
                .addresses
                .iter()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr())
                .chain(
                    x.endpoints
                        .iter()
                        .filter_map(|e| e.address.parse::<IpAddr>().ok()),
                )
                .map(|ip| ip.to_canonical())
                .collect();
            singles.sort();
            singles.dedup();
            for ip in singles {
                idx.external_by_ip.entry(ip).or_default().push(x.clone());
            }
            if x.addresses
                .iter()
                .any(|n| n.prefix_len() < n.max_prefix_len())
            {
                idx.external_wide.push(x.clone());
            }
            for v in &x.vips {
                idx.external_by_vip
                    .entry(v.address)
                    .or_insert_with(|| x.clone());
                let vips = idx.external_vips_by_host.entry(v.host.clone()).or_default();
                if !vips.contains(&v.address) {
                    vips.push(v.address);
                }
            }
        }
        self.idx = idx;
    }
}

/// What a push did, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    pub version: u64,
    pub full_state: bool,
    pub upserts: usize,
    pub removals: usize,
    /// Resources ztunnel does not use (routes, traffic policies), skipped.
    pub ignored: usize,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub peer_authentications: usize,
    pub external_services: usize,
}

/// A push converted to domain types, before anything is applied.
#[derive(Default)]
struct Converted {
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: Vec<Authorization>,
    peer_authentications: Vec<PeerAuthentication>,
    external_services: Vec<ExternalService>,
    removals: Vec<(pb::ResourceKind, String)>,
    ignored: usize,
}

fn convert(push: pb::Push) -> Result<Converted, ConvertError> {
    use pb::resource::Kind;
    let mut out = Converted::default();
    let mut seen: HashSet<(&'static str, String)> = HashSet::new();
    let mut check_dup = |kind: &'static str, key: String| {
        if seen.insert((kind, key.clone())) {
            Ok(())
        } else {
            Err(ConvertError::Duplicate { kind, key })
        }
    };
    for (index, r) in push.upserts.into_iter().enumerate() {
        match r.kind {
            Some(Kind::Workload(w)) => {
                let w = Workload::try_from(w)?;
                check_dup("workload", w.uid.to_string())?;
                out.workloads.push(w);
            }
            Some(Kind::Service(s)) => {
                let s = Service::try_from(s)?;
                check_dup("service", s.key())?;
                out.services.push(s);
            }
            Some(Kind::Authorization(a)) => {
                let a = Authorization::try_from(a)?;
                check_dup("authorization", a.key())?;
                out.policies.push(a);
            }
            Some(Kind::PeerAuthentication(p)) => {
                let p = PeerAuthentication::try_from(p)?;
                check_dup("peer authentication", p.key())?;
                out.peer_authentications.push(p);
            }
            Some(Kind::ExternalService(x)) => {
                let x = ExternalService::try_from(x)?;
                check_dup("external service", x.key())?;
                out.external_services.push(x);
            }
            // The waypoint's business; a controller may send them to everyone.
            Some(Kind::Route(_))
            | Some(Kind::TrafficPolicy(_))
            | Some(Kind::RequestAuthentication(_)) => out.ignored += 1,
            None => return Err(ConvertError::EmptyResource { index }),
        }
    }
    for (index, k) in push.removals.into_iter().enumerate() {
        match pb::ResourceKind::try_from(k.kind) {
            Ok(pb::ResourceKind::Unspecified) | Err(_) => {
                return Err(ConvertError::UnknownRemovalKind {
                    index,
                    name: k.name,
                    kind: k.kind,
                })
            }
            Ok(kind) => out.removals.push((kind, k.name)),
        }
    }
    Ok(out)
}

/// The writer. Not `Clone`: exactly one task (the discovery client, or a static file
/// loader) owns it.
pub struct Store {
    current: Arc<ArcSwap<State>>,
    node: Option<Arc<str>>,
    local_tx: watch::Sender<Arc<LocalWorkloads>>,
    version_tx: watch::Sender<u64>,
}

/// A cheap, cloneable read handle on the store.
#[derive(Clone)]
pub struct StateReader {
    current: Arc<ArcSwap<State>>,
    local_rx: watch::Receiver<Arc<LocalWorkloads>>,
    version_rx: watch::Receiver<u64>,
}

impl Store {
    /// An empty store. `node` is the node this ztunnel serves, for the local-workloads watch
    /// (`None`: no workload is local).
    pub fn new(node: Option<&str>) -> Self {
        let (local_tx, _) = watch::channel(Arc::new(LocalWorkloads::new()));
        let (version_tx, _) = watch::channel(0);
        Store {
            current: Arc::new(ArcSwap::from_pointee(State::default())),
            node: node.map(Into::into),
            local_tx,
            version_tx,
        }
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            current: self.current.clone(),
            local_rx: self.local_tx.subscribe(),
            version_rx: self.version_tx.subscribe(),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Applies a push atomically: a full state replaces everything; an incremental push
    /// applies its removals, then its upserts. On error nothing changes.
    pub fn apply(&mut self, push: pb::Push) -> Result<ApplyOutcome, StoreError> {
        let full_state = push.full_state;
        let version = push.version;
        let trust_roots: Vec<Arc<str>> =
            push.trust_roots.iter().map(|r| r.as_str().into()).collect();
        let conv = convert(push)?;
        let current = self.current.load_full();
        let mut next = if full_state {
            State::default()
        } else {
            // Pointer copies of the primary maps; the indexes are rebuilt below.
            State {
                version: current.version,
                workloads: current.workloads.clone(),
                services: current.services.clone(),
                policies: current.policies.clone(),
                peer_authentications: current.peer_authentications.clone(),
                external_services: current.external_services.clone(),
                trust_roots: current.trust_roots.clone(),
                idx: Indexes::default(),
            }
        };
        next.version = version;
        // An incremental push without roots leaves the bundle as it was.
        if full_state || !trust_roots.is_empty() {
            next.trust_roots = trust_roots;
        }
        let mut outcome = ApplyOutcome {
            version,
            full_state,
            upserts: conv.workloads.len()
                + conv.services.len()
                + conv.policies.len()
                + conv.peer_authentications.len()
                + conv.external_services.len(),
            removals: 0,
            ignored: conv.ignored,
            ..Default::default()
        };
        // Removals in a full state are meaningless: everything not sent is gone already.
        if !full_state {
            for (kind, name) in &conv.removals {
                let removed = match kind {
                    pb::ResourceKind::Workload => next.workloads.remove(name.as_str()).is_some(),
                    pb::ResourceKind::Service => next.services.remove(name.as_str()).is_some(),
                    pb::ResourceKind::Authorization => {
                        next.policies.remove(name.as_str()).is_some()
                    }
                    pb::ResourceKind::PeerAuthentication => {
                        next.peer_authentications.remove(name.as_str()).is_some()
                    }
                    pb::ResourceKind::ExternalService => {
                        next.external_services.remove(name.as_str()).is_some()
                    }
                    _ => {
                        outcome.ignored += 1;
                        false
                    }
                };
                outcome.removals += usize::from(removed);
            }
        }
        for w in conv.workloads {
            next.workloads.insert(w.uid.clone(), Arc::new(w));
        }
        for s in conv.services {
            next.services.insert(s.key().into(), Arc::new(s));
        }
        for p in conv.policies {
            next.policies.insert(p.key().into(), Arc::new(p));
        }
        for p in conv.peer_authentications {
            next.peer_authentications
                .insert(p.key().into(), Arc::new(p));
        }
        for x in conv.external_services {
            next.external_services.insert(x.key().into(), Arc::new(x));
        }
        next.reindex();
        outcome.workloads = next.workloads.len();
        outcome.services = next.services.len();
        outcome.policies = next.policies.len();
        outcome.peer_authentications = next.peer_authentications.len();
        outcome.external_services = next.external_services.len();
        let local = self
            .node
            .as_deref()
            .map(|n| next.local(n))
            .unwrap_or_default();
        self.current.store(Arc::new(next));
        // Only a real change wakes the capture layer (Workload equality covers enrollment).
        self.local_tx.send_if_modified(|cur| {
            if **cur == local {
                false
            } else {
                *cur = Arc::new(local);
                true
            }
        });
        self.version_tx.send_replace(version);
        Ok(outcome)
    }
}

impl StateReader {
    /// The current snapshot: take one per decision and make every lookup on it.
    pub fn snapshot(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Notified whenever the set of this node's workloads (or any of them) changes.
    pub fn watch_local(&self) -> watch::Receiver<Arc<LocalWorkloads>> {
        self.local_rx.clone()
    }

    /// Notified after every applied push, with its version.
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.version_rx.clone()
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
