//! What each proxy receives: the slice of a model snapshot a ztunnel or a waypoint needs,
//! and the difference between two such slices.
//!
//! Pure functions of a snapshot, so the rules are tested without a server:
//! - ztunnel: every workload and service (it may route to any), and the authorization
//!   policies that can apply to its node's pods: global ones, namespace-wide ones for
//!   namespaces with a pod on the node, and selector ones a local pod references. Never
//!   routes or traffic policies: it does not parse HTTP. PeerAuthentications (the mesh's, and
//!   those of namespaces with a pod on the node) only to a ztunnel whose `Hello` accepts
//!   them: an older one would NACK every push holding one. ExternalServices, every one,
//!   likewise only when its `Hello` accepts them.
//! - waypoint: every workload and service, the policies targeting its Gateway or a service
//!   it fronts, and the routes and traffic policies of those services; the
//!   RequestAuthentications targeting the same, only when its `Hello` accepts them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ambit_proto::discovery::{
    resource, Hello, PolicyScope, ProxyKind, Resource, ResourceKey, ResourceKind,
};

use crate::model::{changed_entries, Entry, Key, NodeScope, Snapshot};

/// Who is subscribing, checked from its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// The node proxy of one node; `peer_authentication`, `external_services`: its `Hello`
    /// accepts PeerAuthentication, ExternalService resources.
    Ztunnel {
        node: String,
        peer_authentication: bool,
        external_services: bool,
    },
    /// A waypoint, by its Gateway's `namespace/name`; `request_authentication`,
    /// `external_services`: its `Hello` accepts RequestAuthentication, ExternalService
    /// resources.
    Waypoint {
        gateway: String,
        identity: String,
        request_authentication: bool,
        external_services: bool,
    },
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proxy::Ztunnel { node, .. } => write!(f, "ztunnel node={node}"),
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
                peer_authentication: hello
                    .accepts
                    .contains(&(ResourceKind::PeerAuthentication as i32)),
                external_services: hello
                    .accepts
                    .contains(&(ResourceKind::ExternalService as i32)),
            }),
            ProxyKind::Waypoint => match hello.gateway.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(Proxy::Waypoint {
                        gateway: hello.gateway.clone(),
                        identity: hello.identity.clone(),
                        request_authentication: hello
                            .accepts
                            .contains(&(ResourceKind::RequestAuthentication as i32)),
                        external_services: hello
                            .accepts
                            .contains(&(ResourceKind::ExternalService as i32)),
                    })
                }
                _ => Err("a waypoint must name its Gateway as namespace/name"),
            },
            ProxyKind::Unspecified => Err("hello.kind must be ZTUNNEL or WAYPOINT"),
        }
    }
}

/// Which resources of one snapshot one proxy gets: the per-proxy facts the rules need,
/// computed once per snapshot so that selecting is a cheap test per resource. Two equal
/// selections want the same resources of any snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// A node's ztunnel: policies scoped to the namespaces of its pods, or referenced by them.
    Ztunnel {
        /// Shared with the snapshot's per-node index (empty for a node without workloads).
        scope: Arc<NodeScope>,
        peer_authentication: bool,
        external_services: bool,
    },
    /// A waypoint: what targets its Gateway or one of the services it fronts.
    Waypoint {
        gateway: String,
        /// The services it fronts, by key (`namespace/hostname`), and the external services
        /// bound to it (`namespace/name`) when it accepts them.
        services: BTreeSet<String>,
        /// It accepts RequestAuthentications.
        request_authentication: bool,
    },
}

impl Selection {
    /// The facts `proxy`'s rules need from `snapshot`.
    pub fn new(snapshot: &Snapshot, proxy: &Proxy) -> Self {
        match proxy {
            Proxy::Ztunnel {
                node,
                peer_authentication,
                external_services,
            } => {
                let scope = snapshot
                    .node_scopes()
                    .get(node)
                    .cloned()
                    .unwrap_or_default();
                Selection::Ztunnel {
                    scope,
                    peer_authentication: *peer_authentication,
                    external_services: *external_services,
                }
            }
            Proxy::Waypoint {
                gateway,
                request_authentication,
                external_services,
                ..
            } => {
                let bound = |kind| {
                    of_kind(snapshot, kind)
                        .filter(|(_, e)| e.waypoint.as_deref() == Some(gateway.as_str()))
                        .map(|(k, _)| k.name.clone())
                };
                let mut services: BTreeSet<String> = bound(ResourceKind::Service).collect();
                if *external_services {
                    services.extend(bound(ResourceKind::ExternalService));
                }
                Selection::Waypoint {
                    gateway: gateway.clone(),
                    request_authentication: *request_authentication,
                    services,
                }
            }
        }
    }

    /// Whether the proxy gets this resource.
    pub fn wants(&self, key: &Key, entry: &Entry) -> bool {
        // Everyone gets every workload and service.
        if matches!(key.kind, ResourceKind::Workload | ResourceKind::Service) {
            return true;
        }
        match (self, &entry.resource.kind) {
            (Selection::Ztunnel { scope, .. }, Some(resource::Kind::Authorization(a))) => {
                match a.scope() {
                    PolicyScope::Global => true,
                    PolicyScope::Namespace => scope.namespaces.contains(&a.namespace),
                    PolicyScope::WorkloadSelector => scope.referenced.contains(&key.name),
                }
            }
            // Selector ones too: ztunnel matches them against its pods' labels.
            (
                Selection::Ztunnel {
                    scope,
                    peer_authentication: true,
                    ..
                },
                Some(resource::Kind::PeerAuthentication(p)),
            ) => p.scope() == PolicyScope::Global || scope.namespaces.contains(&p.namespace),
            // Every one: any pod may dial any external service (as Istio's default export).
            (
                Selection::Ztunnel {
                    external_services: true,
                    ..
                },
                Some(resource::Kind::ExternalService(_)),
            ) => true,
            // Never routes or traffic policies: ztunnel does not parse HTTP.
            (Selection::Ztunnel { .. }, _) => false,
            (
                Selection::Waypoint {
                    gateway,
                    services,
                    request_authentication,
                },
                Some(kind),
            ) => match kind {
                resource::Kind::Authorization(a) => {
                    &a.target_gateway == gateway || services.contains(&a.target_service)
                }
                resource::Kind::Route(r) => r.parent_services.iter().any(|p| services.contains(p)),
                resource::Kind::TrafficPolicy(t) => services.contains(&t.target_service),
                // Only to a waypoint that says it knows the kind: an older one would NACK
                // every push holding one.
                resource::Kind::RequestAuthentication(a) => {
                    *request_authentication
                        && (&a.target_gateway == gateway || services.contains(&a.target_service))
                }
                // Those bound to it (only listed when it accepts the kind): it dials them.
                resource::Kind::ExternalService(_) => services.contains(&key.name),
                _ => false,
            },
            (Selection::Waypoint { .. }, None) => false,
        }
    }

    /// The selected resources of `snapshot`, in key order.
    pub fn select<'a>(
        &'a self,
        snapshot: &'a Snapshot,
    ) -> impl Iterator<Item = (&'a Key, &'a Arc<Entry>)> + 'a {
        snapshot
            .resources
            .iter()
            .filter(move |(k, e)| self.wants(k, e))
    }
}

fn of_kind(snapshot: &Snapshot, kind: ResourceKind) -> impl Iterator<Item = (&Key, &Arc<Entry>)> {
    let start = Key {
        kind,
        name: String::new(),
    };
    snapshot
        .resources
        .range(start..)
        .take_while(move |(k, _)| k.kind == kind)
}

/// The resources a proxy needs from a snapshot.
pub fn view(snapshot: &Snapshot, proxy: &Proxy) -> BTreeMap<Key, Arc<Entry>> {
    let selection = Selection::new(snapshot, proxy);
    selection
        .select(snapshot)
        .map(|(k, e)| (k.clone(), e.clone()))
        .collect()
}

/// What a proxy holds: the snapshot last pushed to it and what was selected from it.
///
/// Snapshots share their unchanged entries, so holding one costs a subscriber a pointer,
/// and the next diff is a merge of two sorted selections with no per-resource allocation:
/// a change reaches 100 subscribers of a 10,000-pod mesh without copying 100 views.
#[derive(Clone, Debug)]
pub struct Sent {
    snapshot: Arc<Snapshot>,
    selection: Selection,
}

/// The change from `sent` (what the proxy holds) to what `proxy` needs from `snapshot`:
/// upserts and removals, and the new `sent`. With no `sent` (a new stream) everything is
/// an upsert.
pub fn diff(
    snapshot: &Arc<Snapshot>,
    proxy: &Proxy,
    sent: Option<&Sent>,
) -> (Vec<Resource>, Vec<ResourceKey>, Sent) {
    let selection = Selection::new(snapshot, proxy);
    let (upserts, removals) = changes(snapshot, &selection, sent);
    (
        upserts,
        removals,
        Sent {
            snapshot: snapshot.clone(),
            selection,
        },
    )
}

/// The changes from `sent` to `snapshot`'s `selection`: from the snapshot's delta when it
/// follows the one sent and the proxy's selection is the same, else by merging both sorted
/// selections.
fn changes(
    snapshot: &Snapshot,
    selection: &Selection,
    sent: Option<&Sent>,
) -> (Vec<Resource>, Vec<ResourceKey>) {
    let Some(sent) = sent else {
        let all = selection.select(snapshot).map(|(_, e)| e.resource.clone());
        return (all.collect(), Vec::new());
    };
    let (mut upserts, mut removals) = (Vec::new(), Vec::new());
    let mut record =
        |key: &Key, before: Option<&Arc<Entry>>, now: Option<&Arc<Entry>>| match (before, now) {
            (Some(old), Some(e)) if old.hash == e.hash => {}
            (_, Some(e)) => upserts.push(e.resource.clone()),
            (Some(_), None) => removals.push(key.to_proto()),
            (None, None) => {}
        };
    let delta = snapshot
        .delta
        .as_ref()
        .filter(|d| d.since == sent.snapshot.version && sent.selection == *selection);
    match delta {
        Some(delta) => {
            for key in &delta.keys {
                record(
                    key,
                    wanted(&sent.selection, &sent.snapshot, key),
                    wanted(selection, snapshot, key),
                );
            }
        }
        None => {
            let before = sent.selection.select(&sent.snapshot);
            for (key, old, now) in changed_entries(before, selection.select(snapshot)) {
                record(key, old, now);
            }
        }
    }
    (upserts, removals)
}

/// `key`'s entry in `snapshot`, if `selection` wants it.
fn wanted<'a>(selection: &Selection, snapshot: &'a Snapshot, key: &Key) -> Option<&'a Arc<Entry>> {
    let (k, e) = snapshot.resources.get_key_value(key)?;
    selection.wants(k, e).then_some(e)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{content_hash, derive, Delta, ModelConfig, Store};
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
---
apiVersion: security.ambit.dev/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: ambit-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.ambit.dev/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: demo}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.ambit.dev/v1
kind: PeerAuthentication
metadata: {name: sel, namespace: demo}
spec: {selector: {matchLabels: {app: a}}, portLevelMtls: {"8080": {mode: STRICT}}}
---
apiVersion: security.ambit.dev/v1
kind: RequestAuthentication
metadata: {name: on-wp, namespace: demo}
spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}], jwtRules: [{issuer: i, jwksUri: 'https://i/keys'}]}
---
apiVersion: security.ambit.dev/v1
kind: RequestAuthentication
metadata: {name: on-svc, namespace: demo}
spec: {targetRefs: [{kind: Service, name: a}], jwtRules: [{issuer: i, jwksUri: 'https://i/keys'}]}
---
apiVersion: security.ambit.dev/v1
kind: RequestAuthentication
metadata: {name: elsewhere, namespace: demo}
spec: {targetRefs: [{kind: Service, name: b}], jwtRules: [{issuer: i, jwksUri: 'https://i/keys'}]}
---
apiVersion: networking.ambit.dev/v1
kind: ExternalService
metadata: {name: api, namespace: demo}
spec: {hosts: [api.example.com], addresses: [192.0.2.10], ports: [{number: 443}]}
---
apiVersion: networking.ambit.dev/v1
kind: ExternalService
metadata: {name: egress, namespace: demo, labels: {ambit.dev/use-waypoint: wp}}
spec: {hosts: [pay.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: on-egress, namespace: demo}
spec: {targetRefs: [{group: networking.ambit.dev, kind: ExternalService, name: egress}], action: DENY, rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]}
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
            node_scopes: Default::default(),
            delta: None,
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
        // The label bound `egress` to the Gateway: ztunnels learn where to tunnel it.
        let bound = snap
            .resources
            .iter()
            .find_map(|(k, e)| match &e.resource.kind {
                Some(resource::Kind::ExternalService(x)) if k.name == "demo/egress" => Some(x),
                _ => None,
            });
        assert_eq!(
            bound
                .and_then(|x| x.waypoint.as_ref())
                .map(|w| w.identity.as_str()),
            Some("spiffe://cluster.local/ns/demo/sa/wp")
        );
        let ztunnel = |node: &str| Proxy::Ztunnel {
            node: node.into(),
            peer_authentication: true,
            external_services: true,
        };
        let waypoint = |gw: &str| Proxy::Waypoint {
            gateway: gw.into(),
            identity: String::new(),
            request_authentication: true,
            external_services: true,
        };
        let cases: Vec<(Proxy, Vec<&str>)> = vec![
            (
                ztunnel("n1"),
                vec![
                    "Authorization ambit-system/global",
                    "Authorization demo/sel",
                    "PeerAuthentication ambit-system/mesh",
                    "PeerAuthentication demo/ns",
                    "PeerAuthentication demo/sel",
                    "ExternalService demo/api",
                    "ExternalService demo/egress",
                ],
            ),
            (
                ztunnel("n2"),
                vec![
                    "Authorization ambit-system/global",
                    "PeerAuthentication ambit-system/mesh",
                    "ExternalService demo/api",
                    "ExternalService demo/egress",
                ],
            ),
            // A ztunnel whose Hello does not accept them (an older one) gets none.
            (
                Proxy::Ztunnel {
                    node: "n1".into(),
                    peer_authentication: false,
                    external_services: false,
                },
                vec![
                    "Authorization ambit-system/global",
                    "Authorization demo/sel",
                ],
            ),
            (
                waypoint("demo/wp"),
                vec![
                    "Authorization demo/on-egress",
                    "Authorization demo/on-svc",
                    "Route demo/r",
                    "RequestAuthentication demo/on-svc",
                    "RequestAuthentication demo/on-wp",
                    // Bound to it; `api` goes straight out from ztunnel.
                    "ExternalService demo/egress",
                ],
            ),
            (waypoint("demo/other"), vec![]),
            // A waypoint whose Hello does not accept them (an older one) gets none.
            (
                Proxy::Waypoint {
                    gateway: "demo/wp".into(),
                    identity: String::new(),
                    request_authentication: false,
                    external_services: false,
                },
                vec!["Authorization demo/on-svc", "Route demo/r"],
            ),
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
        let proxy = Proxy::Ztunnel {
            node: "n1".into(),
            peer_authentication: true,
            external_services: true,
        };
        // What the proxy was sent: the fixture plus a global policy that is gone since.
        let mut before = snapshot();
        let global = Key {
            kind: ResourceKind::Authorization,
            name: "ambit-system/global".into(),
        };
        let gone = Key {
            kind: ResourceKind::Authorization,
            name: "ambit-system/old".into(),
        };
        let old_policy = before.resources[&global].clone();
        before.resources.insert(gone.clone(), old_policy);
        let before = Arc::new(before);
        let (all, removals, sent) = diff(&before, &proxy, None);
        assert_eq!(
            (all.len(), removals.len()),
            (view(&before, &proxy).len(), 0)
        );
        let (none, removals, _) = diff(&before, &proxy, Some(&sent));
        assert!(none.is_empty() && removals.is_empty());

        // Now: workload demo/a changed, the old policy removed, the rest shared.
        let mut now = (*before).clone();
        now.resources.remove(&gone);
        let workload = Key {
            kind: ResourceKind::Workload,
            name: "demo/a".into(),
        };
        let mut changed = (*now.resources[&workload]).clone();
        changed.hash ^= 1;
        now.resources.insert(workload, Arc::new(changed));
        let now = Arc::new(now);
        let (upserts, removals, next) = diff(&now, &proxy, Some(&sent));
        assert_eq!(upserts.len(), 1);
        assert!(matches!(&upserts[0].kind, Some(resource::Kind::Workload(w)) if w.uid == "demo/a"));
        assert_eq!(removals, vec![gone.to_proto()]);
        // A route (never a ztunnel's) appearing changes nothing for it.
        let mut with_route = (*now).clone();
        let route = Key {
            kind: ResourceKind::Route,
            name: "demo/r".into(),
        };
        assert!(with_route.resources.contains_key(&route));
        let route_entry = with_route.resources[&route].clone();
        with_route.resources.insert(
            Key {
                kind: ResourceKind::Route,
                name: "demo/new".into(),
            },
            route_entry,
        );
        let (none, removals, _) = diff(&Arc::new(with_route), &proxy, Some(&next));
        assert!(none.is_empty() && removals.is_empty());
    }

    #[test]
    fn a_diff_from_the_delta_equals_the_whole_merge() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let proxies = [
            Proxy::Ztunnel {
                node: "n1".into(),
                peer_authentication: true,
                external_services: true,
            },
            Proxy::Ztunnel {
                node: "n2".into(),
                peer_authentication: false,
                external_services: true,
            },
            Proxy::Waypoint {
                gateway: "demo/wp".into(),
                identity: String::new(),
                request_authentication: true,
                external_services: true,
            },
        ];
        let mut prev = Arc::new(snapshot());
        let mut sent: Vec<Sent> = proxies.iter().map(|p| diff(&prev, p, None).2).collect();
        let (mut from_delta, mut moved) = (0, 0);
        for round in 0..300u64 {
            let mut next = (*prev).clone();
            next.version += 1;
            next.node_scopes = Default::default();
            for _ in 0..rng.random_range(0..4) {
                let keys: Vec<Key> = next.resources.keys().cloned().collect();
                let key = keys[rng.random_range(0..keys.len())].clone();
                let mut entry = (*next.resources[&key]).clone();
                match rng.random_range(0..5) {
                    0 => {
                        next.resources.remove(&key);
                    }
                    // The same content in a new allocation: nothing to send.
                    1 => {
                        next.resources.insert(key, Arc::new(entry));
                    }
                    2 => {
                        entry.hash = rng.random();
                        next.resources.insert(key, Arc::new(entry));
                    }
                    3 => {
                        let copy = Key {
                            kind: key.kind,
                            name: format!("{}-{round}", key.name),
                        };
                        next.resources.insert(copy, Arc::new(entry));
                    }
                    // A pod moves node: the ztunnels' selections change.
                    _ => {
                        if let Some(resource::Kind::Workload(w)) = &mut entry.resource.kind {
                            w.node = if w.node == "n1" { "n2" } else { "n1" }.into();
                            entry.hash = rng.random();
                            moved += 1;
                        }
                        next.resources.insert(key, Arc::new(entry));
                    }
                }
            }
            next.delta = Some(Arc::new(Delta::between(
                prev.version,
                &prev.resources,
                &next.resources,
            )));
            let next = Arc::new(next);
            let merged = Arc::new(Snapshot {
                delta: None,
                node_scopes: Default::default(),
                ..(*next).clone()
            });
            for (proxy, sent) in proxies.iter().zip(sent.iter_mut()) {
                let (upserts, removals, after) = diff(&next, proxy, Some(sent));
                if after.selection == sent.selection {
                    from_delta += 1;
                }
                assert_eq!(
                    (upserts, removals),
                    {
                        let (u, r, _) = diff(&merged, proxy, Some(sent));
                        (u, r)
                    },
                    "round {round}, {proxy}"
                );
                *sent = after;
            }
            prev = next;
        }
        // Both ways were taken.
        assert!(from_delta > 600 && moved > 10, "{from_delta} {moved}");
    }

    #[test]
    fn a_delta_names_what_was_added_removed_or_replaced() {
        let before = snapshot().resources;
        let mut after = before.clone();
        let keys: Vec<Key> = before.keys().cloned().collect();
        after.remove(&keys[0]);
        let replaced = (*after[&keys[2]]).clone();
        after.insert(keys[2].clone(), Arc::new(replaced));
        let added = Key {
            kind: keys[1].kind,
            name: "zz/new".into(),
        };
        after.insert(added.clone(), after[&keys[1]].clone());
        let delta = Delta::between(4, &before, &after);
        let mut want = vec![keys[0].clone(), keys[2].clone(), added];
        want.sort();
        assert_eq!(
            delta,
            Delta {
                since: 4,
                keys: want
            }
        );
        assert!(Delta::between(4, &before, &before).keys.is_empty());
    }

    #[test]
    fn hellos_are_checked() {
        let hello = |kind: ProxyKind, node: &str, gateway: &str| Hello {
            kind: kind as i32,
            node: node.into(),
            gateway: gateway.into(),
            identity: String::new(),
            accepts: Vec::new(),
        };
        assert_eq!(
            Proxy::try_from(&hello(ProxyKind::Ztunnel, "n1", "")),
            Ok(Proxy::Ztunnel {
                node: "n1".into(),
                peer_authentication: false,
                external_services: false,
            })
        );
        let newer = Hello {
            accepts: vec![
                ResourceKind::PeerAuthentication as i32,
                ResourceKind::ExternalService as i32,
                99,
            ],
            ..hello(ProxyKind::Ztunnel, "n1", "")
        };
        assert_eq!(
            Proxy::try_from(&newer),
            Ok(Proxy::Ztunnel {
                node: "n1".into(),
                peer_authentication: true,
                external_services: true,
            })
        );
        assert!(Proxy::try_from(&hello(ProxyKind::Ztunnel, "", "")).is_err());
        assert_eq!(
            Proxy::try_from(&hello(ProxyKind::Waypoint, "", "demo/wp")),
            Ok(Proxy::Waypoint {
                gateway: "demo/wp".into(),
                identity: String::new(),
                request_authentication: false,
                external_services: false,
            })
        );
        let newer_waypoint = Hello {
            accepts: vec![
                ResourceKind::RequestAuthentication as i32,
                ResourceKind::ExternalService as i32,
            ],
            ..hello(ProxyKind::Waypoint, "", "demo/wp")
        };
        assert_eq!(
            Proxy::try_from(&newer_waypoint),
            Ok(Proxy::Waypoint {
                gateway: "demo/wp".into(),
                identity: String::new(),
                request_authentication: true,
                external_services: true,
            })
        );
        for bad in ["", "wp", "/wp", "demo/", "a/b/c"] {
            assert!(
                Proxy::try_from(&hello(ProxyKind::Waypoint, "", bad)).is_err(),
                "{bad}"
            );
        }
        assert!(Proxy::try_from(&hello(ProxyKind::Unspecified, "n1", "")).is_err());
    }
}
