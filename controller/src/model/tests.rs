//! Table-driven tests of the derivation against YAML fixtures: what would a proxy see?

use std::path::Path;

use ambit_proto::discovery::{
    resource, Authorization, PolicyScope, ResourceKind, Service, TunnelProtocol, Workload,
};

use super::*;
use crate::source::local::parse_file;

fn store(yaml: &str) -> Store {
    let objects = parse_file(Path::new("fixture.yaml"), yaml).unwrap_or_else(|e| {
        panic!(
            "fixture: {}",
            e.iter()
                .map(|e| error_chain(e))
                .collect::<Vec<_>>()
                .join("; ")
        )
    });
    Store::from_objects(objects.into_iter().map(|l| l.object))
}

fn derived(yaml: &str) -> Derived {
    derive(&store(yaml), &ModelConfig::default())
}

fn workload<'a>(d: &'a Derived, uid: &str) -> &'a Workload {
    match d
        .resources
        .get(&Key {
            kind: ResourceKind::Workload,
            name: uid.into(),
        })
        .and_then(|r| r.resource.kind.as_ref())
    {
        Some(resource::Kind::Workload(w)) => w,
        other => panic!("no workload {uid}: {other:?}"),
    }
}

fn service<'a>(d: &'a Derived, key: &str) -> &'a Service {
    match d
        .resources
        .get(&Key {
            kind: ResourceKind::Service,
            name: key.into(),
        })
        .and_then(|r| r.resource.kind.as_ref())
    {
        Some(resource::Kind::Service(s)) => s,
        other => panic!("no service {key}: {other:?}"),
    }
}

fn authorization<'a>(d: &'a Derived, key: &str) -> Option<&'a Authorization> {
    match d
        .resources
        .get(&Key {
            kind: ResourceKind::Authorization,
            name: key.into(),
        })?
        .resource
        .kind
        .as_ref()
    {
        Some(resource::Kind::Authorization(a)) => Some(a),
        _ => None,
    }
}

fn ns(name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n"
    )
}

fn pod(ns: &str, name: &str, labels: &str, ip: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: sa-{name}\n  containers:\n  - name: app\n    image: app\n    ports:\n    - name: web\n      containerPort: 8080\n\
         status:\n  podIP: {ip}\n"
    )
}

#[test]
fn enrollment_by_namespace_label_and_pod_opt_out() {
    let cases = [
        // (namespace labels, pod labels, expected)
        (
            "ambit.dev/dataplane-mode: ambient",
            "app: a",
            TunnelProtocol::Hbone,
        ),
        (
            "ambit.dev/dataplane-mode: ambient",
            "ambit.dev/dataplane-mode: none",
            TunnelProtocol::None,
        ),
        ("", "app: a", TunnelProtocol::None),
        (
            "ambit.dev/dataplane-mode: sidecar",
            "app: a",
            TunnelProtocol::None,
        ),
        // A pod cannot enroll itself; only its namespace does.
        (
            "",
            "ambit.dev/dataplane-mode: ambient",
            TunnelProtocol::None,
        ),
    ];
    for (ns_labels, pod_labels, want) in cases {
        let d =
            derived(&(ns("demo", ns_labels) + &pod("demo", "p", pod_labels, "10.0.0.1", "node-a")));
        let w = workload(&d, "demo/p");
        assert_eq!(
            w.tunnel_protocol(),
            want,
            "ns {{{ns_labels}}} pod {{{pod_labels}}}"
        );
        assert_eq!(w.service_account, "sa-p");
        assert_eq!(w.node, "node-a");
        assert_eq!(w.addresses, vec![vec![10, 0, 0, 1]]);
        assert_eq!(w.trust_domain, "cluster.local");
    }
}

#[test]
fn workload_defaults_and_canonical_labels() {
    let yaml = ns("demo", "") + "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-v1-5d8f-x2\n  namespace: demo\n  uid: 1234\n  labels: {app: reviews, version: v1}\n  ownerReferences:\n  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5d8f, uid: r, controller: true}\nspec:\n  containers: [{name: c}]\nstatus:\n  podIPs: [{ip: 10.0.0.9}, {ip: 'fd00::9'}]\n";
    let yaml = yaml + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-z, labels: {topology.kubernetes.io/zone: z1}}\n";
    let yaml = yaml.replace(
        "containers: [{name: c}]",
        "nodeName: node-z\n  containers: [{name: c}]",
    );
    let d = derived(&yaml);
    let w = workload(&d, "1234");
    assert_eq!(w.zone, "z1");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.workload_name, "reviews-v1");
    assert_eq!(w.canonical_name, "reviews");
    assert_eq!(w.canonical_revision, "v1");
    assert_eq!(w.addresses.len(), 2);
    assert_eq!(w.addresses[1].len(), 16);
}

#[test]
fn service_endpoints_from_selectors() {
    let mut yaml = ns("demo", "ambit.dev/dataplane-mode: ambient");
    yaml += &pod("demo", "web-1", "app: web", "10.0.0.1", "a");
    yaml += &pod("demo", "web-2", "app: web, extra: x", "10.0.0.2", "b");
    yaml += &pod("demo", "db", "app: db", "10.0.0.3", "a");
    yaml += &pod("other", "web-elsewhere", "app: web", "10.0.0.4", "a");
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: grpc-api, port: 9090}\n  - {name: metrics, port: 9000, targetPort: 9100, appProtocol: http}\n";
    let d = derived(&yaml);
    let s = service(&d, "demo/web.demo.svc.cluster.local");
    assert_eq!(s.hostname, "web.demo.svc.cluster.local");
    assert_eq!(s.vips, vec![vec![10, 96, 0, 10]]);
    let ports: Vec<_> = s
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port, p.app_protocol.as_str()))
        .collect();
    assert_eq!(
        ports,
        vec![(80, 0, "HTTP"), (9090, 9090, "GRPC"), (9000, 9100, "HTTP")]
    );
    let eps: Vec<_> = s
        .endpoints
        .iter()
        .map(|e| (e.workload_uid.as_str(), e.ready, e.ports.get(&80).copied()))
        .collect();
    // Only same-namespace pods matching every selector label; the named port resolved per pod.
    assert_eq!(
        eps,
        vec![
            ("demo/web-1", true, Some(8080)),
            ("demo/web-2", true, Some(8080))
        ]
    );
}

#[test]
fn service_endpoints_from_given_endpoint_slices_win() {
    let mut yaml = ns("demo", "");
    yaml += &pod("demo", "web-1", "app: web", "10.0.0.1", "a");
    yaml += &pod("demo", "web-2", "app: web", "10.0.0.2", "a");
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    yaml += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-abc, namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.0.0.2]\n  conditions: {ready: false}\n";
    let d = derived(&yaml);
    let s = service(&d, "demo/web.demo.svc.cluster.local");
    let eps: Vec<_> = s
        .endpoints
        .iter()
        .map(|e| (e.workload_uid.as_str(), e.ready))
        .collect();
    assert_eq!(eps, vec![("demo/web-2", false)]);
}

#[test]
fn policy_scope_derivation() {
    let base = ns("demo", "") + &ns("ambit-system", "");
    let cases = [
        // (namespace, spec, expected scope, target gateway, target service)
        ("ambit-system", "{}", PolicyScope::Global, "", ""),
        ("demo", "{}", PolicyScope::Namespace, "", ""),
        (
            "demo",
            "{action: DENY, rules: [{}]}",
            PolicyScope::Namespace,
            "",
            "",
        ),
        (
            "demo",
            "{selector: {matchLabels: {app: web}}}",
            PolicyScope::WorkloadSelector,
            "",
            "",
        ),
        (
            "ambit-system",
            "{selector: {matchLabels: {app: web}}}",
            PolicyScope::WorkloadSelector,
            "",
            "",
        ),
        (
            "demo",
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}",
            PolicyScope::WorkloadSelector,
            "demo/wp",
            "",
        ),
        (
            "demo",
            "{targetRefs: [{kind: Service, name: web}]}",
            PolicyScope::WorkloadSelector,
            "",
            "demo/web.demo.svc.cluster.local",
        ),
    ];
    for (namespace, spec, scope, gw, svc) in cases {
        let yaml = base.clone()
            + &format!("---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {namespace}}}\nspec: {spec}\n");
        let d = derived(&yaml);
        assert!(d.errors.is_empty(), "{spec}: {:?}", d.errors);
        let a = authorization(&d, &format!("{namespace}/p"))
            .unwrap_or_else(|| panic!("{spec}: missing"));
        assert_eq!(
            (
                a.scope(),
                a.target_gateway.as_str(),
                a.target_service.as_str()
            ),
            (scope, gw, svc),
            "{namespace} {spec}"
        );
    }
}

#[test]
fn selector_policies_are_listed_on_matching_workloads_only() {
    let mut yaml = ns("demo", "") + &ns("other", "") + &ns("ambit-system", "");
    yaml += &pod("demo", "web", "app: web", "10.0.0.1", "a");
    yaml += &pod("demo", "db", "app: db", "10.0.0.2", "a");
    yaml += &pod("other", "web", "app: web", "10.0.0.3", "a");
    for (ns, name, spec) in [
        ("demo", "sel", "{selector: {matchLabels: {app: web}}}"),
        ("demo", "whole-ns", "{}"),
        ("ambit-system", "mesh-web", "{selector: {matchLabels: {app: web}}}"),
        ("demo", "to-waypoint", "{selector: {matchLabels: {app: web}}, targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}"),
    ] {
        yaml += &format!("---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n");
    }
    let d = derived(&yaml);
    assert_eq!(
        workload(&d, "demo/web").authorization_policies,
        vec!["ambit-system/mesh-web", "demo/sel"]
    );
    assert!(workload(&d, "demo/db").authorization_policies.is_empty());
    assert_eq!(
        workload(&d, "other/web").authorization_policies,
        vec!["ambit-system/mesh-web"]
    );
}

#[test]
fn authorization_rules_are_converted() {
    let yaml = ns("demo", "")
        + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: ['cluster.local/ns/demo/sa/client', '*']\n        namespaces: ['team-*']\n        ipBlocks: ['10.0.0.0/8', '192.168.1.7']\n    to:\n    - operation: {ports: ['8080'], methods: [GET]}\n    when: [{key: 'request.headers[x-a]', values: [b]}]\n";
    let d = derived(&yaml);
    let a = authorization(&d, "demo/p").expect("policy");
    assert_eq!(a.action(), ambit_proto::discovery::PolicyAction::Deny);
    let src = &a.rules[0].from[0];
    use ambit_proto::discovery::string_match::Match;
    assert_eq!(
        src.principals[0].r#match,
        Some(Match::Exact("cluster.local/ns/demo/sa/client".into()))
    );
    assert_eq!(src.principals[1].r#match, Some(Match::Presence(true)));
    assert_eq!(
        src.namespaces[0].r#match,
        Some(Match::Prefix("team-".into()))
    );
    let blocks: Vec<_> = src
        .ip_blocks
        .iter()
        .map(|b| (b.address.clone(), b.prefix_len))
        .collect();
    assert_eq!(
        blocks,
        vec![(vec![10, 0, 0, 0], 8), (vec![192, 168, 1, 7], 32)]
    );
    assert_eq!(a.rules[0].to[0].ports, vec![8080]);
    // L7 fields are still sent: ztunnel fails closed on them.
    assert_eq!(a.rules[0].to[0].methods, vec!["GET"]);
    assert_eq!(a.rules[0].when[0].key, "request.headers[x-a]");
}

#[test]
fn condition_values_ztunnel_parses_are_checked_here() {
    // Found by the policy fuzz target: `destination.port: [bookinfo]` was served, and every
    // ztunnel refused the whole push carrying it. Now the policy fails closed instead, named.
    for (key, value, field) in [
        ("destination.port", "bookinfo", "notValues[0]"),
        ("destination.port", " 80", "notValues[0]"),
        ("source.ip", "10.0.0.0/33", "notValues[0]"),
        ("destination.ip", "ten", "notValues[0]"),
        // Unknown keys too: the waypoint refused the whole push carrying one.
        ("connection.sni", "a.example", "key"),
        ("bogus", "x", "key"),
        ("request.auth.nickname", "x", "key"),
        ("'request.auth.claims[]'", "request.auth.claims[]", "key"),
    ] {
        let yaml = ns("demo", "")
            + &format!("---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: demo}}\nspec:\n  action: DENY\n  rules: [{{when: [{{key: {key}, notValues: ['{value}']}}]}}]\n");
        let d = derived(&yaml);
        assert_eq!(d.errors.len(), 1, "{key} {value:?}: {:?}", d.errors);
        let msg = error_chain(&d.errors[0]);
        assert!(
            msg.contains(&format!("spec.rules[0].when[0].{field}"))
                && (msg.contains(value.trim()) || msg.contains(key)),
            "{msg}"
        );
        let bad = authorization(&d, "demo/bad").expect("kept, failing closed");
        assert_eq!(bad.rules, vec![Default::default()], "a DENY of everything");
    }
    // Values of the same keys that parse are served as written.
    let yaml = ns("demo", "")
        + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: demo}\nspec:\n  rules: [{when: [{key: destination.port, values: ['8080']}, {key: source.ip, values: [10.0.0.0/8, 10.1.1.1, 'fd00::/8']}, {key: 'request.headers[x]', values: [anything]}, {key: 'request.auth.claims[org][team]', values: [blue]}, {key: request.auth.presenter, values: [cli]}]}]\n";
    let d = derived(&yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(
        authorization(&d, "demo/ok").expect("served").rules[0]
            .when
            .len(),
        5
    );
}

#[test]
fn bad_policy_values_fail_closed_and_name_the_field() {
    // (action, the invalid source, field named, value named, rules enforced instead)
    let cases = [
        (
            "ALLOW",
            "ipBlocks: ['10.0.0.0/33']",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "10.0.0.0/33",
            Some(0),
        ),
        (
            "DENY",
            "notIpBlocks: ['10.0.0.0/8', 'ten']",
            "spec.rules[0].from[0].source.notIpBlocks[1]",
            "\"ten\"",
            Some(1),
        ),
        (
            "AUDIT",
            "ipBlocks: ['300.1.1.1']",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "300.1.1.1",
            None,
        ),
    ];
    for (action, source, field, mention, enforced_rules) in cases {
        let yaml = ns("demo", "")
            + &pod("demo", "web", "app: web", "10.0.0.1", "a")
            + &format!("---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: demo}}\nspec:\n  action: {action}\n  selector: {{matchLabels: {{app: web}}}}\n  rules: [{{from: [{{source: {{{source}}}}}]}}]\n")
            + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: good, namespace: demo}\nspec:\n  selector: {matchLabels: {app: web}}\n";
        let d = derived(&yaml);
        assert_eq!(d.errors.len(), 1, "{source}: {:?}", d.errors);
        let msg = error_chain(&d.errors[0]);
        assert!(msg.contains("AuthorizationPolicy demo/bad"), "{msg}");
        assert!(msg.contains(field), "{msg}");
        assert!(msg.contains(mention), "{msg}");
        assert!(authorization(&d, "demo/good").is_some());
        let refs = workload(&d, "demo/web").authorization_policies.clone();
        match enforced_rules {
            // An invalid ALLOW or DENY stays in force in a form that refuses: dropping
            // it would open traffic.
            Some(n) => {
                assert!(msg.contains("until it is fixed"), "{msg}");
                let bad = authorization(&d, "demo/bad").expect("kept, failing closed");
                assert_eq!(bad.rules.len(), n, "{action}: {bad:?}");
                if n == 1 {
                    assert_eq!(bad.rules[0], Default::default(), "DENY matches everything");
                }
                assert_eq!(refs, vec!["demo/bad", "demo/good"]);
            }
            // An AUDIT enforces nothing: dropped, and not referenced.
            None => {
                assert!(authorization(&d, "demo/bad").is_none());
                assert_eq!(refs, vec!["demo/good"]);
            }
        }
    }
    let yaml = ns("demo", "")
        + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec: {rules: [{to: [{operation: {ports: ['http']}}]}]}\n";
    let d = derived(&yaml);
    assert!(error_chain(&d.errors[0]).contains("spec.rules[0].to[0].operation.ports[0]"));
    // A policy that cannot be placed at all (bad target) is rejected outright.
    let yaml = ns("demo", "")
        + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec: {action: DENY, targetRefs: [{group: apps, kind: Deployment, name: x}]}\n";
    let d = derived(&yaml);
    assert!(error_chain(&d.errors[0]).contains("spec.targetRefs[0]"));
    assert!(authorization(&d, "demo/bad").is_none());
}

#[test]
fn waypoint_binding() {
    let gw = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: demo}\nspec:\n  gatewayClassName: ambit-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\nstatus:\n  addresses: [{value: 10.0.9.9}]\n";
    let svc = |labels: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo, labels: {{{labels}}}}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n  ports: [{{port: 80}}]\n")
    };
    let cases = [
        // (ns labels, pod labels, svc labels, pod waypoint?, svc waypoint?)
        (
            "ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp",
            "app: web",
            "",
            true,
            true,
        ),
        (
            "ambit.dev/dataplane-mode: ambient",
            "app: web, ambit.dev/use-waypoint: wp",
            "",
            true,
            false,
        ),
        (
            "ambit.dev/dataplane-mode: ambient",
            "app: web",
            "ambit.dev/use-waypoint: wp",
            false,
            true,
        ),
        (
            "ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp",
            "app: web, ambit.dev/use-waypoint: none",
            "ambit.dev/use-waypoint: none",
            false,
            false,
        ),
        // Not in the mesh: no waypoint for the pod.
        ("ambit.dev/use-waypoint: wp", "app: web", "", false, true),
    ];
    for (nsl, podl, svcl, want_pod, want_svc) in cases {
        let yaml = ns("demo", nsl) + gw + &pod("demo", "web", podl, "10.0.0.1", "a") + &svc(svcl);
        let d = derived(&yaml);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let w = workload(&d, "demo/web");
        let s = service(&d, "demo/web.demo.svc.cluster.local");
        assert_eq!(
            w.waypoint.is_some(),
            want_pod,
            "pod: ns {{{nsl}}} pod {{{podl}}}"
        );
        assert_eq!(
            s.waypoint.is_some(),
            want_svc,
            "svc: ns {{{nsl}}} svc {{{svcl}}}"
        );
        for g in w.waypoint.iter().chain(s.waypoint.iter()) {
            assert_eq!(g.address, vec![10, 0, 9, 9]);
            assert_eq!(g.hbone_port, 15008);
            assert_eq!(g.identity, "spiffe://cluster.local/ns/demo/sa/wp");
        }
        let entry = &d.resources[&Key {
            kind: ResourceKind::Service,
            name: "demo/web.demo.svc.cluster.local".into(),
        }];
        assert_eq!(entry.waypoint.is_some(), want_svc);
    }
    // A label naming a missing waypoint is reported and leaves the workload without one.
    let yaml = ns(
        "demo",
        "ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: nope",
    ) + &pod("demo", "web", "app: web", "10.0.0.1", "a");
    let d = derived(&yaml);
    assert!(workload(&d, "demo/web").waypoint.is_none());
    let msg = error_chain(&d.errors[0]);
    assert!(
        msg.contains("Pod demo/web") && msg.contains("demo/nope"),
        "{msg}"
    );
}

#[test]
fn routes_and_traffic_policies() {
    let yaml = ns("demo", "")
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]\n    timeouts: {request: 5s}\n"
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: demo}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules: [{timeouts: {request: soon}}]\n"
        + "---\napiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {name: tp, namespace: demo}\nspec:\n  targetRef: {kind: Service, name: web}\n  loadBalancer: {simple: LEAST_REQUEST}\n  faultInjection: {abort: {httpStatus: 503, percentage: 5}}\n";
    let d = derived(&yaml);
    let route = d.resources[&Key {
        kind: ResourceKind::Route,
        name: "demo/r".into(),
    }]
        .resource
        .kind
        .clone();
    let Some(resource::Kind::Route(route)) = route else {
        panic!("route")
    };
    assert_eq!(route.kind, "HTTPRoute");
    assert_eq!(
        route.parent_services,
        vec!["demo/web.demo.svc.cluster.local"]
    );
    let spec: serde_json::Value = serde_json::from_str(&route.spec_json).expect("json");
    assert_eq!(spec["rules"][0]["backendRefs"][1]["weight"], 10);
    assert!(!d.resources.contains_key(&Key {
        kind: ResourceKind::Route,
        name: "demo/bad".into()
    }));
    let msg = error_chain(&d.errors[0]);
    assert!(
        msg.contains("HTTPRoute demo/bad") && msg.contains("spec.rules[0].timeouts.request"),
        "{msg}"
    );
    let Some(resource::Kind::TrafficPolicy(tp)) = d.resources[&Key {
        kind: ResourceKind::TrafficPolicy,
        name: "demo/tp".into(),
    }]
        .resource
        .kind
        .clone()
    else {
        panic!("tp")
    };
    assert_eq!(tp.target_service, "demo/web.demo.svc.cluster.local");
}

#[test]
fn durations() {
    for (s, ms) in [
        ("10s", 10_000),
        ("250ms", 250),
        ("1m30s", 90_000),
        ("1.5s", 1500),
        ("0", 0),
    ] {
        assert_eq!(policy::parse_duration(s).expect(s).as_millis(), ms, "{s}");
    }
    for s in ["", "10", "s", "10x", "-1s"] {
        assert!(policy::parse_duration(s).is_err(), "{s}");
    }
}

#[test]
fn content_hash_ignores_map_order() {
    let mut a = Workload {
        uid: "u".into(),
        ..Default::default()
    };
    for i in 0..50 {
        a.labels.insert(format!("k{i}"), "v".into());
    }
    let b = Workload {
        labels: {
            let mut v: Vec<_> = a.labels.clone().into_iter().collect();
            v.reverse();
            v.into_iter().collect()
        },
        ..a.clone()
    };
    let wrap = |w: Workload| Resource {
        kind: Some(resource::Kind::Workload(w)),
    };
    assert_eq!(content_hash(&wrap(a.clone())), content_hash(&wrap(b)));
    let mut c = a.clone();
    c.labels.insert("k0".into(), "changed".into());
    assert_ne!(content_hash(&wrap(a)), content_hash(&wrap(c)));
}

#[tokio::test]
async fn model_versions_and_readiness() {
    let mut builder = ModelBuilder::new(ModelConfig::default());
    let sink = builder.sink("test");
    let model = builder.spawn();
    assert!(!model.current().ready);
    let objects = parse_file(
        Path::new("x.yaml"),
        &(ns("demo", "") + &pod("demo", "p", "app: a", "10.0.0.1", "a")),
    )
    .expect("parse");
    let mut events: Vec<_> = objects
        .into_iter()
        .map(|l| SourceEvent::Apply(l.object))
        .collect();
    events.push(SourceEvent::Synced);
    sink.send(events).await.expect("send");
    let s1 = model.wait_for(|s| s.ready).await.expect("ready");
    let key = Key {
        kind: ResourceKind::Workload,
        name: "demo/p".into(),
    };
    let v1 = s1.resources[&key].version;
    // Deleting the pod removes the workload and bumps the version.
    sink.send(vec![SourceEvent::Delete(ObjectKey::new(
        Kind::Pod,
        "demo",
        "p",
    ))])
    .await
    .expect("send");
    let s2 = model
        .wait_for(|s| !s.resources.contains_key(&key))
        .await
        .expect("removed");
    assert!(s2.version > s1.version && v1 <= s1.version);
}

#[test]
fn policy_fields_are_checked_strictly_but_known_spellings_pass() {
    let ok = ns("demo", "")
        + "---\napiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {name: tp, namespace: demo}\nspec:\n  targetRef: {name: web}\n  circuitBreaker: {maxConnections: 10}\n  outlierDetection: {consecutive5xxErrors: 3, interval: 10s}\n"
        + "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  selector: {matchLabels: {}}\n  targetRefs: []\n  rules: [{from: [{source: {principals: ['*'], ipBlocks: []}}], to: [{operation: {ports: ['80']}}], when: [{key: source.ip, values: [10.0.0.1]}]}]\n"
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec: {parentRefs: [{kind: Service, name: web}], futureField: {x: 1}}\n";
    assert_eq!(store(&ok).len(), 4);
    let bad = "apiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {name: tp, namespace: demo}\nspec:\n  targetRef: {name: web}\n  rateLimit: {tokensPerFill: 1, fillInterval: 1s, maxTokens: 1, perSource: true}\n";
    let errs = parse_file(Path::new("tp.yaml"), bad).expect_err("typo accepted");
    assert_eq!(
        error_chain(&errs[0]),
        "tp.yaml: document 1: unknown field spec.rateLimit.perSource"
    );
}

#[test]
fn peer_authentications_are_placed_by_root_namespace_and_selector() {
    use ambit_proto::discovery::{MtlsMode, PeerAuthentication};
    let pa = |ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")
    };
    let yaml = pa("ambit-system", "mesh", "{mtls: {mode: STRICT}}")
        + &pa("demo", "ns", "{mtls: {mode: PERMISSIVE}}")
        + &pa(
            "demo",
            "web",
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {'8080': {mode: DISABLE}}}",
        )
        // An empty selector is namespace-wide, as in Istio.
        + &pa("demo", "empty-sel", "{selector: {matchLabels: {}}}");
    let d = derived(&yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let get = |key: &str| -> PeerAuthentication {
        match d
            .resources
            .get(&Key {
                kind: ResourceKind::PeerAuthentication,
                name: key.into(),
            })
            .and_then(|r| r.resource.kind.clone())
        {
            Some(resource::Kind::PeerAuthentication(p)) => p,
            other => panic!("no peer authentication {key}: {other:?}"),
        }
    };
    let mesh = get("ambit-system/mesh");
    assert_eq!(
        (mesh.scope(), mesh.mode()),
        (PolicyScope::Global, MtlsMode::Strict)
    );
    let ns = get("demo/ns");
    assert_eq!(
        (ns.scope(), ns.mode()),
        (PolicyScope::Namespace, MtlsMode::Permissive)
    );
    let web = get("demo/web");
    assert_eq!(
        (web.scope(), web.mode()),
        (PolicyScope::WorkloadSelector, MtlsMode::Unset)
    );
    assert_eq!(web.selector.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        web.port_level_mtls.get(&8080).copied(),
        Some(MtlsMode::Disable as i32)
    );
    assert_eq!(get("demo/empty-sel").scope(), PolicyScope::Namespace);

    // From a source without files (Kubernetes), a bad object is rejected by the model,
    // naming the object and the field, and the rest still derives.
    let mut bad = crate::crd::PeerAuthentication::new(
        "bad",
        crate::crd::peer_auth::PeerAuthenticationSpec {
            port_level_mtls: [(
                "70000".to_string(),
                crate::crd::peer_auth::Mtls {
                    mode: crate::crd::peer_auth::Mode::Strict,
                },
            )]
            .into(),
            ..Default::default()
        },
    );
    bad.metadata.namespace = Some("demo".into());
    let mut objects: Vec<Object> = parse_file(Path::new("f.yaml"), &yaml)
        .expect("fixture")
        .into_iter()
        .map(|l| Arc::unwrap_or_clone(l.object))
        .collect();
    objects.push(Object::PeerAuthentication(bad));
    let d = derive(&Store::from_objects(objects), &ModelConfig::default());
    let errors: Vec<String> = d.errors.iter().map(|e| error_chain(e)).collect();
    assert_eq!(
        errors,
        vec!["PeerAuthentication demo/bad rejected: field spec.portLevelMtls[70000]: \"70000\" is not a port number (1-65535)"]
    );
    assert_eq!(
        d.resources
            .keys()
            .filter(|k| k.kind == ResourceKind::PeerAuthentication)
            .count(),
        4
    );
}

#[test]
fn request_authentications_go_to_waypoints_and_bad_ones_are_rejected() {
    let good = ns("demo", "")
        + "---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: idp, namespace: demo}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}, {kind: Service, name: web}]\n  jwtRules:\n  - issuer: https://idp.example\n    audiences: [web]\n    jwksUri: https://idp.example/keys\n    fromHeaders: [{name: x-jwt, prefix: 'Bearer '}]\n    outputPayloadToHeader: x-jwt-payload\n";
    let mut objects: Vec<Object> = parse_file(Path::new("fixture.yaml"), &good)
        .expect("fixture")
        .into_iter()
        .map(|l| Arc::unwrap_or_clone(l.object))
        .collect();
    // What the Kubernetes source may hand over: the API server checked the schema, not
    // whether the inline key set parses.
    let bad: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: bad, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, name: web}]\n  jwtRules: [{issuer: idp, jwks: 'not json'}]\n",
    )
    .expect("yaml");
    objects.push(
        Kind::RequestAuthentication
            .deserialize(bad)
            .expect("object"),
    );
    let d = derive(&Store::from_objects(objects), &ModelConfig::default());
    let Some(resource::Kind::RequestAuthentication(ra)) = d.resources[&Key {
        kind: ResourceKind::RequestAuthentication,
        name: "demo/idp".into(),
    }]
        .resource
        .kind
        .clone()
    else {
        panic!("request authentication")
    };
    assert_eq!(ra.target_gateway, "demo/wp");
    assert_eq!(ra.target_service, "demo/web.demo.svc.cluster.local");
    let spec: serde_json::Value = serde_json::from_str(&ra.spec_json).expect("json");
    assert_eq!(
        spec,
        serde_json::json!({"jwtRules": [{
            "issuer": "https://idp.example", "audiences": ["web"],
            "jwksUri": "https://idp.example/keys",
            "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}],
            "outputPayloadToHeader": "x-jwt-payload",
        }]})
    );
    assert!(!d.resources.contains_key(&Key {
        kind: ResourceKind::RequestAuthentication,
        name: "demo/bad".into()
    }));
    let msg = error_chain(&d.errors[0]);
    assert!(
        msg.contains("RequestAuthentication demo/bad rejected: field spec.jwtRules[0].jwks")
            && msg.contains("not a JSON Web Key Set"),
        "{msg}"
    );
}

#[test]
fn external_services_and_the_outbound_policy_reach_the_wire() {
    use ambit_proto::discovery::{ExternalResolution, ExternalService, OutboundPolicy};
    let xs = |name: &str, spec: &str| {
        format!("---\napiVersion: networking.ambit.dev/v1\nkind: ExternalService\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n")
    };
    let yaml = ns("demo", "ambit.dev/dataplane-mode: ambient, ambit.dev/outbound-policy: REGISTRY_ONLY")
        + &ns("open", "ambit.dev/dataplane-mode: ambient")
        + &pod("demo", "a", "app: a", "10.0.0.1", "n1")
        + &pod("open", "b", "app: b", "10.0.0.2", "n1")
        + &xs(
            "api",
            "{hosts: [API.example.com], addresses: [192.0.2.0/24], ports: [{number: 443, protocol: https}]}",
        )
        + &xs(
            "db",
            "{hosts: [db.example.com], ports: [{number: 5432, name: pg, targetPort: 6432}], resolution: STATIC, endpoints: [{address: 192.0.2.20}]}",
        );
    let d = derived(&yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(
        workload(&d, "demo/a").outbound_policy(),
        OutboundPolicy::RegistryOnly
    );
    assert_eq!(
        workload(&d, "open/b").outbound_policy(),
        OutboundPolicy::AllowAny
    );
    let get = |key: &str| -> ExternalService {
        match d
            .resources
            .get(&Key {
                kind: ResourceKind::ExternalService,
                name: key.into(),
            })
            .and_then(|r| r.resource.kind.clone())
        {
            Some(resource::Kind::ExternalService(x)) => x,
            other => panic!("no external service {key}: {other:?}"),
        }
    };
    let api = get("demo/api");
    assert_eq!(api.hosts, vec!["api.example.com"]);
    assert_eq!(
        (
            api.addresses[0].address.as_slice(),
            api.addresses[0].prefix_len
        ),
        (&[192u8, 0, 2, 0][..], 24)
    );
    assert_eq!(api.ports[0].protocol, "HTTPS");
    // One IPv4 VIP from 240.240.0.0/16 and one IPv6 from fd00:240:240::/112 per host, at the
    // same offset.
    let vips: Vec<(&str, &[u8])> = api
        .vips
        .iter()
        .map(|v| (v.host.as_str(), v.address.as_slice()))
        .collect();
    assert_eq!(vips.len(), 2, "{vips:?}");
    assert!(vips.iter().all(|(h, _)| *h == "api.example.com"));
    assert_eq!(&vips[0].1[..2], &[240, 240]);
    assert_eq!(&vips[1].1[..6], &[0xfd, 0x00, 0x02, 0x40, 0x02, 0x40]);
    assert_eq!(vips[0].1[2..4], vips[1].1[14..16]);
    assert_eq!(api.resolution(), ExternalResolution::None);
    let db = get("demo/db");
    assert_ne!(
        db.vips[0].address, api.vips[0].address,
        "two hosts share a VIP"
    );
    assert_eq!(db.resolution(), ExternalResolution::Static);
    assert_eq!(
        (db.ports[0].target_port, db.endpoints[0].address.as_str()),
        (6432, "192.0.2.20")
    );

    // Bound to a waypoint that does not exist: withheld (fail closed) and reported.
    let unbound = yaml.clone()
        + "---\napiVersion: networking.ambit.dev/v1\nkind: ExternalService\nmetadata: {name: pay, namespace: demo, labels: {ambit.dev/use-waypoint: egress}}\nspec: {hosts: [pay.example.com], ports: [{number: 80}], resolution: DNS}\n";
    let d2 = derived(&unbound);
    assert!(!d2.resources.contains_key(&Key {
        kind: ResourceKind::ExternalService,
        name: "demo/pay".into(),
    }));
    assert_eq!(
        d2.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        ["ExternalService demo/pay: waypoint \"demo/egress\" is not a Gateway of class ambit-waypoint"]
    );

    // From a source without files (Kubernetes), bad input is reported by the model, naming
    // the object and field, and the rest still derives; a bad label fails closed.
    let mut objects: Vec<Object> = parse_file(Path::new("f.yaml"), &yaml)
        .expect("fixture")
        .into_iter()
        .map(|l| Arc::unwrap_or_clone(l.object))
        .collect();
    let mut bad = crate::crd::ExternalService::new(
        "bad",
        crate::crd::external::ExternalServiceSpec {
            hosts: vec!["bad host".into()],
            ports: vec![crate::crd::external::ExternalPort {
                number: 80,
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    bad.metadata.namespace = Some("demo".into());
    objects.push(Object::ExternalService(bad));
    for o in &mut objects {
        if let Object::Namespace(n) = o {
            if n.metadata.name.as_deref() == Some("open") {
                n.metadata
                    .labels
                    .get_or_insert_default()
                    .insert(OUTBOUND_POLICY_LABEL.into(), "registry-only".into());
            }
        }
    }
    let d = derive(&Store::from_objects(objects), &ModelConfig::default());
    let mut errors: Vec<String> = d.errors.iter().map(|e| error_chain(e)).collect();
    errors.sort();
    assert_eq!(
        errors,
        vec![
            "ExternalService demo/bad rejected: field spec.hosts[0]: \"bad host\" is not a DNS name (letters, digits, '-' and '.')",
            "Namespace open: metadata.labels[ambit.dev/outbound-policy]: \"registry-only\" is not ALLOW_ANY or REGISTRY_ONLY; REGISTRY_ONLY is enforced until it is fixed",
        ]
    );
    assert_eq!(
        workload(&d, "open/b").outbound_policy(),
        OutboundPolicy::RegistryOnly
    );
    assert_eq!(
        d.resources
            .keys()
            .filter(|k| k.kind == ResourceKind::ExternalService)
            .count(),
        2
    );
}
