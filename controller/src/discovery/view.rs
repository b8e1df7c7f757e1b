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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{content_hash, derive, ModelConfig, Store};
    use crate::source::local::parse_file;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ambit-system}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec: {gatewayClassName: ambit-waypoint, addresses: [{value: 10.0.9.9}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, labels: {app: a}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: demo, labels: {ambit.dev/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: global, namespace: ambit-system}
spec: {}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: sel, namespace: demo}
spec: {selector: {matchLabels: {app: a}}}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: on-svc, namespace: demo}
spec: {targetRefs: [{kind: Service, name: a}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec: {parentRefs: [{kind: Service, name: a}]}
"#;

    fn snapshot() -> Snapshot {
        let objects = parse_file(Path::new("mesh.yaml"), MESH).expect("fixture");
        let store = Store::from_objects(objects.into_iter().map(|l| l.object));
        let derived = derive(&store, &ModelConfig::default());
        assert!(derived.errors.is_empty(), "{:?}", derived.errors);
        let resources = derived
            .resources
            .into_iter()
            .map(|(k, d)| {
                let hash = content_hash(&d.resource);
                (
                    k,
                    Arc::new(Entry {
                        resource: d.resource,
                        hash,
                        version: 1,
                        waypoint: d.waypoint,
                    }),
                )
            })
            .collect();
        Snapshot {
            version: 1,
            ready: true,
            resources,
            errors: Arc::default(),
        }
    }

    fn names(view: &BTreeMap<Key, Arc<Entry>>) -> Vec<String> {
        view.keys()
            .filter(|k| !matches!(k.kind, ResourceKind::Workload | ResourceKind::Service))
            .map(|k| format!("{:?} {}", k.kind, k.name))
            .collect()
    }

    #[test]
    fn each_proxy_sees_what_it_needs() {
        let snap = snapshot();
        let ztunnel = |node: &str| Proxy::Ztunnel { node: node.into() };
        let waypoint = |gw: &str| Proxy::Waypoint {
            gateway: gw.into(),
            identity: String::new(),
        };
        let cases: Vec<(Proxy, Vec<&str>)> = vec![
            (
                ztunnel("n1"),
                vec![
                    "Authorization ambit-system/global",
                    "Authorization demo/sel",
                ],
            ),
            (ztunnel("n2"), vec!["Authorization ambit-system/global"]),
            (
                waypoint("demo/wp"),
                vec!["Authorization demo/on-svc", "Route demo/r"],
            ),
            (waypoint("demo/other"), vec![]),
        ];
        for (proxy, want) in cases {
            let view = view(&snap, &proxy);
            assert_eq!(names(&view), want, "{proxy}");
            // Everyone can reach everything.
            assert_eq!(
                view.keys()
                    .filter(|k| k.kind == ResourceKind::Workload)
                    .count(),
                1
            );
            assert_eq!(
                view.keys()
                    .filter(|k| k.kind == ResourceKind::Service)
                    .count(),
                1
            );
        }
    }

    #[test]
    fn diff_sends_changes_and_removals_only() {
        let snap = snapshot();
        let view = view(&snap, &Proxy::Ztunnel { node: "n1".into() });
        let (all, removals, sent) = diff(&view, None);
        assert_eq!((all.len(), removals.len()), (view.len(), 0));
        let (none, removals, _) = diff(&view, Some(&sent));
        assert!(none.is_empty() && removals.is_empty());

        let mut stale = sent.clone();
        let workload = Key {
            kind: ResourceKind::Workload,
            name: "demo/a".into(),
        };
        stale.insert(workload, 0);
        let gone = Key {
            kind: ResourceKind::Route,
            name: "demo/old".into(),
        };
        stale.insert(gone.clone(), 1);
        let (upserts, removals, next) = diff(&view, Some(&stale));
        assert_eq!(upserts.len(), 1);
        assert!(matches!(&upserts[0].kind, Some(resource::Kind::Workload(w)) if w.uid == "demo/a"));
        assert_eq!(removals, vec![gone.to_proto()]);
        assert_eq!(next, sent);
    }

    #[test]
    fn hellos_are_checked() {
        let hello = |kind: ProxyKind, node: &str, gateway: &str| Hello {
            kind: kind as i32,
            node: node.into(),
            gateway: gateway.into(),
            identity: String::new(),
        };
        assert!(Proxy::try_from(&hello(ProxyKind::Ztunnel, "n1", "")).is_ok());
        assert!(Proxy::try_from(&hello(ProxyKind::Ztunnel, "", "")).is_err());
        assert!(Proxy::try_from(&hello(ProxyKind::Waypoint, "", "demo/wp")).is_ok());
        for bad in ["", "wp", "/wp", "demo/", "a/b/c"] {
            assert!(
                Proxy::try_from(&hello(ProxyKind::Waypoint, "", bad)).is_err(),
                "{bad}"
            );
        }
        assert!(Proxy::try_from(&hello(ProxyKind::Unspecified, "n1", "")).is_err());
    }
}
