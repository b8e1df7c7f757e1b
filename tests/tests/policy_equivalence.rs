//! The same AuthorizationPolicy gives the same verdict at every hop.
//!
//! Each case is an `AuthorizationPolicy` as an operator writes it, read and converted by the
//! controller exactly as in production (`source::local::parse_file`, `model::derive`), once
//! bound to the pod by selector (what ztunnel enforces) and once to the waypoint by
//! `targetRefs` (what the waypoint enforces). The derived push then goes through what each
//! proxy does with it: ztunnel's store and its inbound decision, the waypoint's discovery
//! conversion, its policy lookup and its evaluation (opaque TCP and HTTP). Their verdicts
//! are compared with the controller's own conversion evaluated by the engine, for a set of
//! requests. In-process, no network: it costs milliseconds.

use std::net::IpAddr;
use std::path::Path;

use ambit_controller::model::{derive, ModelConfig, Store};
use ambit_controller::source::local::parse_file;
use ambit_hbone::Identity;
use ambit_policy::{Attributes, Decision, HttpAttributes, Policy, Verdict};
use ambit_proto::discovery as pb;
use ambit_ztunnel::decision::{self, Inbound};

const POD_IP: &str = "10.0.0.1";
const PORT: u16 = 8080;
const GATEWAY: &str = "demo/wp";
const SERVICE: &str = "demo/web.demo.svc.cluster.local";

/// The mesh around the policies: an enrolled pod `web` behind a Service, and a waypoint.
fn mesh_yaml() -> String {
    "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {ambit.dev/dataplane-mode: ambient}\n\
     ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: demo\n  labels: {app: web}\n\
     spec:\n  nodeName: n1\n  serviceAccountName: web\n  containers:\n  - name: app\n    image: app\n    ports:\n    - containerPort: 8080\n\
     status:\n  podIP: 10.0.0.1\n\
     ---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
     spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{port: 8080}]\n"
        .to_string()
}

/// One policy, twice: `{name}` selecting the pod and `{name}-wp` targeting the waypoint.
fn policy_yaml(name: &str, action: &str, rules: &str) -> String {
    let doc = |name: &str, binding: &str| {
        format!(
            "---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: demo}}\n\
             spec:\n  action: {action}\n  {binding}\n  rules: {rules}\n"
        )
    };
    doc(name, "selector: {matchLabels: {app: web}}")
        + &doc(
            &format!("{name}-wp"),
            "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]",
        )
}

/// The controller's full-state push for `yaml`.
fn controller_push(yaml: &str) -> pb::Push {
    let objects = parse_file(Path::new("case.yaml"), yaml).unwrap_or_else(|e| {
        panic!(
            "fixture: {:?}",
            e.iter().map(ToString::to_string).collect::<Vec<_>>()
        )
    });
    let store = Store::from_objects(objects.into_iter().map(|l| l.object));
    let derived = derive(&store, &ModelConfig::default());
    pb::Push {
        nonce: "n".into(),
        full_state: true,
        version: 1,
        upserts: derived
            .resources
            .into_values()
            .map(|r| r.resource)
            .collect(),
        removals: Vec::new(),
        trust_roots: Vec::new(),
    }
}

/// A request: who from where, and the HTTP parts the waypoint sees.
struct Request {
    peer: &'static str,
    src: &'static str,
    method: &'static str,
    path: &'static str,
    header: Option<(&'static str, &'static str)>,
}

const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/curl";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/bot";

fn requests() -> Vec<Request> {
    let r = |peer, src, method, path, header| Request {
        peer,
        src,
        method,
        path,
        header,
    };
    vec![
        r(CLIENT, "10.1.0.5", "GET", "/", None),
        r(CLIENT, "10.1.0.5", "DELETE", "/admin/x", None),
        r(
            CLIENT,
            "192.168.1.9",
            "GET",
            "/api/v1",
            Some(("x-team", "blue")),
        ),
        r(OTHER, "10.1.0.5", "GET", "/", None),
        r(
            OTHER,
            "10.2.0.7",
            "POST",
            "/api/x.js",
            Some(("x-team", "red")),
        ),
    ]
}

/// What the waypoint reports, with the `-wp` binding suffix removed: `None` when allowed,
/// else what it names as the refusal.
fn waypoint_view(v: ambit_waypoint::policy::Verdict) -> Option<String> {
    match v {
        ambit_waypoint::policy::Verdict::Allow { .. } => None,
        ambit_waypoint::policy::Verdict::Deny { by, .. } => Some(by.replace("-wp", "")),
    }
}

/// The waypoint's report computed from an engine verdict.
fn expected_waypoint_view(v: &Verdict) -> Option<String> {
    match &v.decision {
        Decision::DeniedBy(r) => Some(r.policy.clone()),
        Decision::NoAllowMatched(keys) => {
            Some(format!("no ALLOW policy matched ({})", keys.join(", ")))
        }
        Decision::AllowedBy(_) | Decision::NoAllowPolicy => None,
    }
}

#[test]
fn one_policy_one_verdict_at_every_hop() {
    // (name, action, rules in the CRD's shape)
    let cases = [
        ("ns", "ALLOW", "[{from: [{source: {namespaces: [client]}}]}]"),
        ("principal-prefix", "DENY", "[{from: [{source: {principals: ['cluster.local/ns/other/*']}}]}]"),
        ("principal-suffix", "ALLOW", "[{from: [{source: {principals: ['*/sa/curl']}}]}]"),
        ("not-principal", "DENY", "[{from: [{source: {notPrincipals: ['*']}}]}]"),
        ("ip", "ALLOW", "[{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.0.9]}}]}]"),
        ("remote-ip", "DENY", "[{from: [{source: {remoteIpBlocks: [192.168.0.0/16]}}]}]"),
        ("port", "ALLOW", "[{to: [{operation: {ports: ['9090']}}]}, {to: [{operation: {notPorts: ['1']}}]}]"),
        ("when", "ALLOW", "[{when: [{key: source.ip, values: [10.1.0.0/16]}, {key: destination.port, values: ['8080']}, {key: source.principal, notValues: ['spiffe://cluster.local/ns/other/*']}]}]"),
        ("audit", "AUDIT", "[{}]"),
        ("nothing", "ALLOW", "[]"),
        // HTTP fields: ztunnel and opaque TCP fail closed alike; HTTP decides at the waypoint.
        ("methods", "ALLOW", "[{to: [{operation: {methods: [GET]}}]}]"),
        ("admin", "DENY", "[{from: [{source: {namespaces: [client]}}], to: [{operation: {paths: ['/admin/*']}}]}]"),
        ("js", "DENY", "[{to: [{operation: {paths: ['*.js'], hosts: ['*']}}]}]"),
        ("header", "ALLOW", "[{when: [{key: 'request.headers[x-team]', values: [blue]}]}]"),
        ("jwt", "DENY", "[{from: [{source: {requestPrincipals: ['*'], namespaces: [other]}}]}]"),
        // The pattern the three old matchers read three ways: refused by the controller,
        // so each hop enforces the same fail-closed stand-in (an ALLOW matching nothing,
        // a DENY of everything).
        ("wild-allow", "ALLOW", "[{from: [{source: {namespaces: ['*lie*']}}]}]"),
        ("wild-deny", "DENY", "[{from: [{source: {principals: ['*ns/other*']}}]}]"),
    ];
    let requests = requests();
    let mut compared = 0;
    for (name, action, rules) in cases {
        let push = controller_push(&(mesh_yaml() + &policy_yaml(name, action, rules)));

        // The controller's conversion, evaluated by the engine.
        let controller: Vec<Policy> = push
            .upserts
            .iter()
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Authorization(a)) => Some(a.clone()),
                _ => None,
            })
            .map(|a| Policy::try_from(a).expect("the controller's output decodes"))
            .collect();
        let (for_pod, for_waypoint): (Vec<&Policy>, Vec<&Policy>) =
            controller.iter().partition(|p| !p.for_waypoint());
        assert_eq!((for_pod.len(), for_waypoint.len()), (1, 1), "{name}");

        // ztunnel: its store and its inbound decision.
        let mut zt = ambit_ztunnel::state::Store::new(Some("n1"));
        zt.apply(push.clone()).expect("ztunnel accepts the push");
        let zt_state = zt.snapshot();
        let pod_ip: IpAddr = POD_IP.parse().expect("ip");
        let pod = zt_state.workload_by_ip(pod_ip).expect("pod").clone();

        // The waypoint: its discovery conversion and its policy lookup.
        let (_, wp_state) = ambit_waypoint::discovery::Resources::default()
            .apply(&push)
            .expect("the waypoint accepts the push");
        let wp_policies = wp_state.policies_for(GATEWAY, Some(SERVICE));
        assert_eq!(wp_policies.len(), 1, "{name}");

        for req in &requests {
            let peer: Identity = req.peer.parse().expect("identity");
            let src: IpAddr = req.src.parse().expect("ip");
            let mut headers = http::HeaderMap::new();
            if let Some((n, v)) = req.header {
                headers.insert(
                    http::HeaderName::from_static(n),
                    http::HeaderValue::from_static(v),
                );
            }
            let l4 = Attributes {
                principal: Some(req.peer),
                namespace: Some(peer.namespace()),
                source_ip: src,
                destination_ip: pod_ip,
                destination_port: PORT,
                http: None,
            };
            let l7 = Attributes {
                http: Some(HttpAttributes {
                    method: req.method,
                    path: req.path,
                    host: "web.demo.svc.cluster.local:8080",
                    headers: &headers,
                    auth: None,
                }),
                ..l4
            };
            let what = format!(
                "{name}: {} from {} {} {}",
                req.peer, req.src, req.method, req.path
            );

            let engine_l4 = ambit_policy::evaluate(for_pod.iter().copied(), &l4);
            let engine_wp_l4 = ambit_policy::evaluate(for_waypoint.iter().copied(), &l4);
            let engine_wp_l7 = ambit_policy::evaluate(for_waypoint.iter().copied(), &l7);

            // A recorded evaluation (what `ambitctl explain` shows) decides the same, and its
            // trace names the rule the verdict names.
            for (policies, attrs, verdict) in [
                (&for_pod, &l4, &engine_l4),
                (&for_waypoint, &l7, &engine_wp_l7),
            ] {
                let (traced, trace) = ambit_policy::explain(policies.iter().copied(), attrs);
                assert_eq!(&traced, verdict, "{what}");
                assert_eq!(trace.allowed, verdict.allowed(), "{what}");
                let by = match &verdict.decision {
                    Decision::DeniedBy(r) | Decision::AllowedBy(r) => Some(r),
                    _ => None,
                };
                assert_eq!(trace.decided_by.as_ref(), by, "{what}");
                // The rule that decided matched, on at least one whole clause when it
                // checked anything.
                if let Some(rule) = trace.deciding_rule() {
                    assert!(rule.matched, "{what}");
                    assert!(
                        rule.checks.is_empty() || rule.deciding().next().is_some(),
                        "{what}: {rule:?}"
                    );
                }
            }

            // ztunnel's inbound decision prints the engine's verdict.
            let authority = format!("{POD_IP}:{PORT}");
            match decision::inbound(&zt_state, &pod, Some(&peer), src, &authority) {
                Inbound::Accept { reason, audit, .. } => {
                    assert!(engine_l4.allowed(), "{what}: ztunnel accepted ({reason})");
                    assert_eq!(reason, engine_l4.to_string(), "{what}");
                    assert_eq!(audit, !engine_l4.audited.is_empty(), "{what}");
                }
                Inbound::Refuse { status, reason, .. } => {
                    assert!(!engine_l4.allowed(), "{what}: ztunnel refused ({reason})");
                    assert_eq!((status, reason), (403, engine_l4.to_string()), "{what}");
                }
            }

            // The same rules bound elsewhere decide the same, by the rule of the same index.
            assert_eq!(
                engine_wp_l4.to_string().replace("-wp", ""),
                engine_l4.to_string(),
                "{what}"
            );

            // The waypoint: opaque TCP is ztunnel's view; HTTP is the engine's L7 verdict.
            let wp_tcp = ambit_waypoint::policy::evaluate(&wp_policies, &l4);
            assert_eq!(
                waypoint_view(wp_tcp),
                expected_waypoint_view(&engine_l4),
                "{what}"
            );
            let wp_http = ambit_waypoint::policy::evaluate(&wp_policies, &l7);
            assert_eq!(
                waypoint_view(wp_http),
                expected_waypoint_view(&engine_wp_l7).map(|s| s.replace("-wp", "")),
                "{what}"
            );

            // A policy without HTTP fields means the same with and without HTTP.
            let has_http = for_pod[0].rules.iter().any(|r| r.uses_l7());
            if !has_http {
                assert_eq!(engine_wp_l7.to_string(), engine_wp_l4.to_string(), "{what}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 17 * 5);
}

#[test]
fn the_ambiguous_pattern_is_refused_with_the_field_named() {
    let yaml = mesh_yaml()
        + &policy_yaml(
            "wild",
            "DENY",
            "[{from: [{source: {principals: ['*x*']}}]}]",
        );
    let objects = parse_file(Path::new("case.yaml"), &yaml).expect("parses");
    let store = Store::from_objects(objects.into_iter().map(|l| l.object));
    let derived = derive(&store, &ModelConfig::default());
    let errors: Vec<String> = derived
        .errors
        .iter()
        .map(|e| ambit_controller::model::error_chain(e))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for e in &errors {
        assert!(
            e.contains("spec.rules[0].from[0].source.principals[0]") && e.contains("\"*x*\""),
            "{e}"
        );
        assert!(e.contains("a DENY of all traffic it selects"), "{e}");
    }
}
