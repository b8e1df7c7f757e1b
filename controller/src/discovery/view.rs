//! What each proxy receives: the slice of a model snapshot a ztunnel or a waypoint needs,
//! and the difference between two such slices.
//!
//! Pure functions of a snapshot, so the rules are tested without a server:
//! - ztunnel: every workload and service (it may route to any), and the authorization
//!   policies that can apply to its node's pods: global ones, namespace-wide ones for
//!   namespaces with a pod on the node, and selector ones a local pod references. Never
//!   routes or traffic policies: it does not parse HTTP.
//! - waypoint: every workload and service, the policies targeting its Gateway or a service
//!   it fronts, and the routes and traffic policies of those services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ambit_proto::discovery::{
    resource, Hello, PolicyScope, ProxyKind, Resource, ResourceKey, ResourceKind,
};

use crate::model::{Entry, Key, Snapshot};

/// Who is subscribing, checked from its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// The node proxy of one node.
    Ztunnel { node: String },
    /// A waypoint, by its Gateway's `namespace/name`.
    Waypoint { gateway: String, identity: String },
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proxy::Ztunnel { node } => write!(f, "ztunnel node={node}"),
            Proxy::Waypoint { gateway, .. } => write!(f, "waypoint gateway={gateway}"),
        }
    }
}

impl TryFrom<&Hello> for Proxy {
    type Error = &'static str;

    fn try_from(hello: &Hello) -> Result<Self, Self::Error> {
        match hello.kind() {
            ProxyKind::Ztunnel if hello.node.is_empty() => Err("a ztunnel must name its node"),
            ProxyKind::Ztunnel => Ok(Proxy::Ztunnel {
                node: hello.node.clone(),
            }),
            ProxyKind::Waypoint => match hello.gateway.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(Proxy::Waypoint {
                        gateway: hello.gateway.clone(),
                        identity: hello.identity.clone(),
                    })
                }
                _ => Err("a waypoint must name its Gateway as namespace/name"),
            },
            ProxyKind::Unspecified => Err("hello.kind must be ZTUNNEL or WAYPOINT"),
        }
    }
}

/// The resources a proxy needs from a snapshot.
pub fn view(snapshot: &Snapshot, proxy: &Proxy) -> BTreeMap<Key, Arc<Entry>> {
    let mut out = BTreeMap::new();
    let of_kind = |kind: ResourceKind| {
        let start = Key {
            kind,
            name: String::new(),
        };
        snapshot
            .resources
            .range(start..)
            .take_while(move |(k, _)| k.kind == kind)
    };
    // Everyone gets every workload and service.
    for kind in [ResourceKind::Workload, ResourceKind::Service] {
        out.extend(of_kind(kind).map(|(k, e)| (k.clone(), e.clone())));
    }
    match proxy {
        Proxy::Ztunnel { node } => {
            let mut namespaces = BTreeSet::new();
            let mut referenced = BTreeSet::new();
            for (_, e) in of_kind(ResourceKind::Workload) {
                if let Some(resource::Kind::Workload(w)) = &e.resource.kind {
                    if &w.node == node {
                        namespaces.insert(w.namespace.as_str());
                        referenced.extend(w.authorization_policies.iter().map(String::as_str));
                    }
                }
            }
            for (k, e) in of_kind(ResourceKind::Authorization) {
                let Some(resource::Kind::Authorization(a)) = &e.resource.kind else {
                    continue;
                };
                let wanted = match a.scope() {
                    PolicyScope::Global => true,
                    PolicyScope::Namespace => namespaces.contains(a.namespace.as_str()),
                    PolicyScope::WorkloadSelector => referenced.contains(k.name.as_str()),
                };
                if wanted {
                    out.insert(k.clone(), e.clone());
                }
            }
        }
        Proxy::Waypoint { gateway, .. } => {
            // The services this waypoint fronts, by their key ("namespace/hostname").
            let services: BTreeSet<&str> = of_kind(ResourceKind::Service)
                .filter(|(_, e)| e.waypoint.as_deref() == Some(gateway.as_str()))
                .map(|(k, _)| k.name.as_str())
                .collect();
            for (k, e) in of_kind(ResourceKind::Authorization) {
                if let Some(resource::Kind::Authorization(a)) = &e.resource.kind {
                    if &a.target_gateway == gateway || services.contains(a.target_service.as_str())
                    {
                        out.insert(k.clone(), e.clone());
                    }
                }
            }
            for (k, e) in of_kind(ResourceKind::Route) {
                if let Some(resource::Kind::Route(r)) = &e.resource.kind {
                    if r.parent_services
                        .iter()
                        .any(|p| services.contains(p.as_str()))
                    {
                        out.insert(k.clone(), e.clone());
                    }
                }
            }
            for (k, e) in of_kind(ResourceKind::TrafficPolicy) {
                if let Some(resource::Kind::TrafficPolicy(t)) = &e.resource.kind {
                    if services.contains(t.target_service.as_str()) {
                        out.insert(k.clone(), e.clone());
                    }
                }
            }
        }
    }
    out
}

/// What a proxy holds: each resource's content hash.
pub type Sent = HashMap<Key, u64>;

/// The change from `sent` (what the proxy holds) to `view`: upserts and removals, and the
/// new `sent`. With no `sent` (a new stream) everything is an upsert.
pub fn diff(
    view: &BTreeMap<Key, Arc<Entry>>,
    sent: Option<&Sent>,
) -> (Vec<Resource>, Vec<ResourceKey>, Sent) {
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    let mut next = Sent::with_capacity(view.len());
    for (k, e) in view {
        if sent.and_then(|s| s.get(k)) != Some(&e.hash) {
            upserts.push(e.resource.clone());
        }
        next.insert(k.clone(), e.hash);
    }
    if let Some(sent) = sent {
        let mut gone: Vec<&Key> = sent.keys().filter(|k| !view.contains_key(*k)).collect();
        gone.sort();
        removals = gone.into_iter().map(Key::to_proto).collect();
    }
    (upserts, removals, next)
}
