//! Store tests: indexes, atomic pushes, last good state, the local-workloads watch.

use super::*;
use crate::state::fixtures::*;
use crate::state::workload::TunnelProtocol;
use pb::{PolicyAction as A, PolicyScope as S, ResourceKind as K};

fn base_push() -> pb::Push {
    let mut b = workload("default", "b", "b", "node-2", "10.0.2.1");
    b.addresses.push(crate::state::ip_to_bytes(ip("fd00::2:1")));
    b.authorization_policies = vec!["default/select-b".into()];
    full(
        1,
        vec![
            res_w(workload("default", "a", "a", "node-1", "10.0.1.1")),
            res_w(b),
            res_s(service(
                "default",
                "svc",
                "10.96.0.1",
                80,
                8080,
                &["default/a", "default/b"],
            )),
            res_a(policy("root", "global", S::Global, A::Deny, vec![])),
            res_a(policy("default", "ns", S::Namespace, A::Allow, vec![])),
            res_a(policy("other", "ns-other", S::Namespace, A::Allow, vec![])),
            res_a(policy(
                "default",
                "select-b",
                S::WorkloadSelector,
                A::Allow,
                vec![],
            )),
            res_a(pb::Authorization {
                target_gateway: "default/waypoint".into(),
                ..policy("default", "for-waypoint", S::Namespace, A::Deny, vec![])
            }),
        ],
    )
}

#[test]
fn full_state_is_indexed() {
    let mut store = Store::new(Some("node-1"));
    let out = store.apply(base_push()).unwrap();
    assert_eq!((out.workloads, out.services, out.policies), (2, 1, 5));
    let s = store.reader().snapshot();
    assert_eq!(s.version(), 1);
    assert_eq!(&*s.workload_by_ip(ip("10.0.1.1")).unwrap().name, "a");
    assert_eq!(&*s.workload_by_ip(ip("fd00::2:1")).unwrap().name, "b");
    assert_eq!(
        &*s.workload_by_ip(ip("::ffff:10.0.2.1")).unwrap().name,
        "b",
        "IPv4-mapped IPv6 finds the IPv4 workload"
    );
    assert!(s.workload_by_ip(ip("10.0.9.9")).is_none());
    assert_eq!(&*s.workload_by_uid("default/a").unwrap().name, "a");
    let (svc, port) = s.service_by_addr("10.96.0.1:80".parse().unwrap()).unwrap();
    assert_eq!(&*svc.name, "svc");
    assert_eq!(port.unwrap().target_port, 8080);
    let (_, port) = s.service_by_addr("10.96.0.1:81".parse().unwrap()).unwrap();
    assert!(port.is_none());
    assert!(s
        .service_by_hostname("svc.default.svc.cluster.local")
        .is_some());
    assert!(s.policy("default/ns").is_some());
    let on1: Vec<_> = s
        .workloads_on_node("node-1")
        .iter()
        .map(|w| &*w.name)
        .collect();
    assert_eq!(on1, vec!["a"]);
    assert!(s.workloads_on_node("node-9").is_empty());

    let keys = |w: &str| -> Vec<String> {
        let w = s.workload_by_uid(w).unwrap();
        s.policies_for(w).iter().map(|p| p.key()).collect()
    };
    assert_eq!(keys("default/a"), vec!["root/global", "default/ns"]);
    assert_eq!(
        keys("default/b"),
        vec!["root/global", "default/ns", "default/select-b"]
    );
    // The config dump serialises.
    let dump = serde_json::to_value(&*s).unwrap();
    assert_eq!(
        dump["workloads"]["default/a"]["identity"],
        "spiffe://cluster.local/ns/default/sa/a"
    );
}

#[test]
fn incremental_pushes_upsert_and_remove() {
    let mut store = Store::new(None);
    store.apply(base_push()).unwrap();
    let mut a2 = workload("default", "a", "a", "node-1", "10.0.1.2");
    a2.tunnel_protocol = pb::TunnelProtocol::None as i32;
    let out = store
        .apply(delta(
            2,
            vec![
                res_w(a2),
                res_w(workload("default", "c", "c", "node-1", "10.0.1.3")),
            ],
            vec![
                (K::Workload, "default/b"),
                (K::Service, "default/svc.default.svc.cluster.local"),
                (K::Authorization, "default/ns"),
                (K::Workload, "never-existed"),
                (K::Route, "default/r"),
            ],
        ))
        .unwrap();
    assert_eq!(out.removals, 3);
    let s = store.snapshot();
    assert_eq!(s.version(), 2);
    assert!(
        s.workload_by_ip(ip("10.0.1.1")).is_none(),
        "old address unindexed"
    );
    assert_eq!(
        s.workload_by_ip(ip("10.0.1.2")).unwrap().protocol,
        TunnelProtocol::Tcp
    );
    assert!(s.workload_by_uid("default/b").is_none());
    assert!(s.workload_by_ip(ip("fd00::2:1")).is_none());
    assert!(s.service_by_vip(ip("10.96.0.1")).is_none());
    assert!(s.policy("default/ns").is_none());
    assert!(s.policy("root/global").is_some());
}

#[test]
fn a_bad_push_is_refused_whole_and_the_last_good_state_stays() {
    let mut store = Store::new(None);
    let reader = store.reader();
    store.apply(base_push()).unwrap();
    let mut bad = workload("default", "web-0", "web", "node-1", "10.0.1.9");
    bad.uid = "uid-9".into();
    bad.addresses.push(vec![1, 2, 3, 4, 5]);
    for push in [
        delta(
            2,
            vec![
                res_w(workload("default", "ok", "ok", "n", "10.0.1.8")),
                res_w(bad.clone()),
            ],
            vec![],
        ),
        full(2, vec![res_w(bad)]),
    ] {
        let err = store.apply(push).unwrap_err().to_string();
        assert_eq!(
            err,
            "workload default/web-0 (uid uid-9): address 1 is 5 bytes, not an IPv4 or IPv6 address"
        );
        let s = reader.snapshot();
        assert_eq!(s.version(), 1);
        assert_eq!(s.workloads().count(), 2);
        assert!(
            s.workload_by_ip(ip("10.0.1.8")).is_none(),
            "nothing of the push applied"
        );
    }
    let dup = full(
        3,
        vec![
            res_w(workload("default", "a", "a", "n", "10.0.0.1")),
            res_w(workload("default", "a", "a", "n", "10.0.0.2")),
        ],
    );
    assert!(store
        .apply(dup)
        .unwrap_err()
        .to_string()
        .contains("appears twice"));
    let empty = full(3, vec![pb::Resource { kind: None }]);
    assert!(store
        .apply(empty)
        .unwrap_err()
        .to_string()
        .contains("resource 0"));
    let bad_kind = pb::Push {
        removals: vec![pb::ResourceKey {
            kind: 0,
            name: "x".into(),
        }],
        ..delta(3, vec![], vec![])
    };
    assert!(store
        .apply(bad_kind)
        .unwrap_err()
        .to_string()
        .contains("unknown kind 0"));
    assert_eq!(reader.snapshot().version(), 1);
}

#[test]
fn full_state_replaces_everything() {
    let mut store = Store::new(None);
    store.apply(base_push()).unwrap();
    store
        .apply(pb::Push {
            trust_roots: vec!["PEM".into()],
            ..full(7, vec![res_w(workload("x", "z", "z", "n", "10.0.7.1"))])
        })
        .unwrap();
    let s = store.snapshot();
    assert_eq!(s.workloads().count(), 1);
    assert_eq!(s.services().count(), 0);
    assert_eq!(s.policies().count(), 0);
    assert_eq!(s.trust_roots().len(), 1);
    // Incremental pushes without roots keep them.
    store.apply(delta(8, vec![], vec![])).unwrap();
    assert_eq!(store.snapshot().trust_roots().len(), 1);
}

#[test]
fn local_watch_fires_only_when_local_workloads_change() {
    let mut store = Store::new(Some("node-1"));
    let mut rx = store.reader().watch_local();
    store.apply(base_push()).unwrap();
    assert!(rx.has_changed().unwrap());
    let local: Vec<_> = rx
        .borrow_and_update()
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(local, vec!["default/a"]);

    // A change on another node: no wake-up.
    store
        .apply(delta(
            2,
            vec![res_w(workload("default", "b", "b2", "node-2", "10.0.2.1"))],
            vec![],
        ))
        .unwrap();
    assert!(!rx.has_changed().unwrap());

    // Un-enrolling a local pod is a change.
    let mut a = workload("default", "a", "a", "node-1", "10.0.1.1");
    a.tunnel_protocol = pb::TunnelProtocol::None as i32;
    store.apply(delta(3, vec![res_w(a)], vec![])).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(
        rx.borrow_and_update()["default/a"].protocol,
        TunnelProtocol::Tcp
    );

    // A new local pod, then its removal.
    store
        .apply(delta(
            4,
            vec![res_w(workload("default", "n", "n", "node-1", "10.0.1.4"))],
            vec![],
        ))
        .unwrap();
    assert_eq!(rx.borrow_and_update().len(), 2);
    store
        .apply(delta(5, vec![], vec![(K::Workload, "default/n")]))
        .unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().len(), 1);
    assert_eq!(*store.reader().watch_version().borrow(), 5);
}

#[test]
fn a_config_dump_reads_back_as_the_same_state() {
    let mut store = Store::new(Some("node-1"));
    let mut push = base_push();
    push.upserts.push(res_pa(peer_auth(
        "default",
        "strict-b",
        S::WorkloadSelector,
        pb::MtlsMode::Strict,
        &[("app", "b")],
        &[(8080, pb::MtlsMode::Permissive)],
    )));
    store.apply(push).unwrap();
    let s = store.reader().snapshot();
    let dump = serde_json::to_value(&*s).unwrap();
    let back: State = serde_json::from_value(dump.clone()).unwrap();
    // The same primary maps, and indexes rebuilt from them.
    assert_eq!(serde_json::to_value(&back).unwrap(), dump);
    assert_eq!(back.version(), 1);
    assert_eq!(&*back.workload_by_ip(ip("fd00::2:1")).unwrap().name, "b");
    assert_eq!(&*back.service_by_vip(ip("10.96.0.1")).unwrap().name, "svc");
    let b = back.workload_by_uid("default/b").unwrap();
    let keys = |ps: Vec<Arc<crate::state::Authorization>>| -> Vec<String> {
        ps.iter().map(|p| p.key()).collect()
    };
    assert_eq!(
        keys(back.policies_for(b)),
        keys(s.policies_for(s.workload_by_uid("default/b").unwrap()))
    );
    assert_eq!(
        keys(back.policies_for(b)),
        ["root/global", "default/ns", "default/select-b"]
    );
}

/// The address index finds the same service a scan would: exact addresses and endpoints by
/// lookup, wider networks by scan, the first by key when several declare a destination.
#[test]
fn external_services_are_found_by_address_as_a_scan_would() {
    let x = |name: &str, nets: &[&str], endpoint: Option<&str>| pb::Resource {
        kind: Some(pb::resource::Kind::ExternalService(pb::ExternalService {
            name: name.into(),
            namespace: "ext".into(),
            hosts: vec![format!("{name}.example")],
            addresses: nets.iter().map(|n| block(n)).collect(),
            ports: vec![pb::ExternalPort {
                number: 443,
                name: "https".into(),
                ..Default::default()
            }],
            resolution: if endpoint.is_some() {
                pb::ExternalResolution::Static as i32
            } else {
                0
            },
            endpoints: endpoint
                .map(|a| pb::ExternalEndpoint {
                    address: a.into(),
                    ports: [("https".to_string(), 8443)].into(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })),
    };
    let mut store = Store::new(None);
    store
        .apply(full(
            1,
            vec![
                x("b-exact", &["192.0.2.9/32"], None),
                x("a-wide", &["192.0.2.0/24"], None),
                x("c-one", &["198.51.100.1/32"], Some("203.0.113.5")),
                x("d-v6", &["2001:db8::7/128"], None),
            ],
        ))
        .expect("fixture applies");
    let s = store.snapshot();
    let found = |dst: &str| {
        s.external_service_for(dst.parse().expect("addr"))
            .map(|x| x.name.to_string())
    };
    // Declared by both: the first by key, though one declares it exactly.
    assert_eq!(found("192.0.2.9:443").as_deref(), Some("a-wide"));
    assert_eq!(found("192.0.2.10:443").as_deref(), Some("a-wide"));
    assert_eq!(found("198.51.100.1:443").as_deref(), Some("c-one"));
    // An endpoint on the service port, or on its own port.
    assert_eq!(found("203.0.113.5:443").as_deref(), Some("c-one"));
    assert_eq!(found("203.0.113.5:8443").as_deref(), Some("c-one"));
    assert_eq!(found("[2001:db8::7]:443").as_deref(), Some("d-v6"));
    assert_eq!(found("[::ffff:198.51.100.1]:443").as_deref(), Some("c-one"));
    assert_eq!(found("198.51.100.2:443"), None);
    assert_eq!(found("198.51.100.1:80"), None);
}
