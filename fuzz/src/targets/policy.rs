//! The controller's conversion of `AuthorizationPolicy` objects to the wire form the proxies
//! enforce, through its public entry points only (the folder's parser, the store, `derive`),
//! so the target stays valid while the conversion code moves.
//!
//! Inputs (through the local source, as a folder of one file): policies built field by field (actions, selectors, targetRefs, principals,
//! namespaces, ipBlocks, ports, methods, paths, hosts, conditions) with values near their
//! edges, written as YAML next to the corpus mesh; and the corpus mesh's text mutated.
//!
//! Properties: nothing panics; every policy that parses is either served or reported (never
//! silently dropped); a policy served despite an invalid rule is enforced closed (a DENY
//! matches everything, an ALLOW nothing); and everything the controller derives is accepted
//! by ztunnel's and the waypoint's conversions (the controller checks what a proxy would
//! otherwise NACK, taking the whole push down with it).

use ambit_controller::model::{derive, Kind, ModelConfig, ModelError, Object, Store};
use ambit_proto::discovery as pb;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::mutate;

const MESH: &str = include_str!("../../corpus/controller/mesh.yaml");

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        5 => prop::sample::select(options).prop_map(str::to_string),
        1 => "[a-zA-Z0-9./*:_\\[\\]-]{0,10}",
    ]
}

fn list(options: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec(pick(options), 0..3).prop_map(|v| json!(v))
}

fn maybe(s: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.4, s)
}

fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect(),
    )
}

const PRINCIPALS: &[&str] = &[
    "*",
    "cluster.local/ns/bookinfo/sa/*",
    "*/sa/productpage",
    "",
    "a*b",
    "**",
];
const NAMESPACES: &[&str] = &["bookinfo", "shop*", "*", "", "test-*"];
const BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.77.1.2",
    "::/0",
    "fd00::/8",
    "10.0.0.0/33",
    "::/129",
    "10.0.0.256/8",
    "",
    "10.0.0.0/",
    "/8",
    "10.0.0.0/08",
    " 10.0.0.0/8",
];
const PORTS: &[&str] = &[
    "80", "9080", "0", "65535", "65536", "-1", "80-90", " 80", "http", "",
];
const METHODS: &[&str] = &["GET", "get", "DELETE", "", "*"];
const PATHS: &[&str] = &["/api/*", "/health", "*", "", "/a*b"];
const HOSTS: &[&str] = &["ratings.bookinfo.svc.cluster.local", "*.bookinfo", "*", ""];
const KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "destination.ip",
    "request.headers[x-tenant]",
    "request.auth.claims[iss]",
    "connection.sni",
    "",
    "bogus",
];
const VALUES: &[&str] = &["10.0.0.0/8", "80", "bookinfo", "x", "*", ""];

fn policy_doc() -> impl Strategy<Value = String> {
    let source = (
        (maybe(list(PRINCIPALS)), maybe(list(PRINCIPALS)), maybe(list(NAMESPACES)), maybe(list(NAMESPACES))),
        (maybe(list(BLOCKS)), maybe(list(BLOCKS)), maybe(list(PRINCIPALS)), maybe(list(BLOCKS))),
    )
        .prop_map(|((p, np, n, nn), (b, nb, rp, rb))| {
            json!({"source": object(vec![
                ("principals", p), ("notPrincipals", np), ("namespaces", n), ("notNamespaces", nn),
                ("ipBlocks", b), ("notIpBlocks", nb), ("requestPrincipals", rp), ("remoteIpBlocks", rb),
            ])})
        });
    let operation = (
        (maybe(list(PORTS)), maybe(list(PORTS)), maybe(list(METHODS))),
        (maybe(list(PATHS)), maybe(list(HOSTS)), maybe(list(METHODS))),
    )
        .prop_map(|((p, np, m), (pa, h, nm))| {
            json!({"operation": object(vec![
                ("ports", p), ("notPorts", np), ("methods", m), ("paths", pa), ("hosts", h), ("notMethods", nm),
            ])})
        });
    let condition =
        (pick(KEYS), maybe(list(VALUES)), maybe(list(VALUES))).prop_map(|(k, v, nv)| {
            object(vec![
                ("key", Some(json!(k))),
                ("values", v),
                ("notValues", nv),
            ])
        });
    let rule = (
        maybe(prop::collection::vec(source, 0..3).prop_map(Value::Array)),
        maybe(prop::collection::vec(operation, 0..2).prop_map(Value::Array)),
        maybe(prop::collection::vec(condition, 0..2).prop_map(Value::Array)),
    )
        .prop_map(|(f, t, w)| object(vec![("from", f), ("to", t), ("when", w)]));
    let target = (
        pick(&[
            "gateway.networking.k8s.io",
            "",
            "core",
            "networking.istio.io",
        ]),
        pick(&["Gateway", "Service", "Pod"]),
        pick(&["waypoint", "reviews", "nope", ""]),
    )
        .prop_map(|(g, k, n)| json!({"group": g, "kind": k, "name": n}));
    (
        (
            pick(&["p", "q"]),
            pick(&["bookinfo", "shop", "ambit-system"]),
        ),
        maybe(pick(&["ALLOW", "DENY", "AUDIT", "allow", "CUSTOM"]).prop_map(|a| json!(a))),
        maybe(Just(json!({"matchLabels": {"app": "reviews"}}))),
        maybe(prop::collection::vec(target, 0..3).prop_map(Value::Array)),
        maybe(prop::collection::vec(rule, 0..3).prop_map(Value::Array)),
    )
        .prop_map(|((name, ns), action, selector, targets, rules)| {
            let spec = object(vec![
                ("action", action),
                ("selector", selector),
                ("targetRefs", targets),
                ("rules", rules),
            ]);
            let doc = json!({
                "apiVersion": "security.ambit.dev/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            });
            serde_yaml::to_string(&doc).unwrap_or_default()
        })
}

fn inputs() -> impl Strategy<Value = String> {
    let generated = prop::collection::vec(policy_doc(), 1..4)
        .prop_map(|docs| format!("{MESH}\n---\n{}", docs.join("---\n")));
    let mutated = mutate::mutated(vec![MESH.as_bytes().to_vec()], mutate::YAML_WORDS, 4)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    prop_oneof![4 => generated, 1 => mutated]
}

/// The objects the local source serves for a folder holding `text` as its one file (the
/// source's own checks included: namespaces that exist, duplicates).
fn served_objects(text: &str) -> Result<Vec<Object>, TestCaseError> {
    use ambit_controller::model::SourceEvent;
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    std::fs::write(dir.path().join("fuzz.yaml"), text)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let scan = ambit_controller::source::local::Scanner::new(dir.path()).scan();
    Ok(scan
        .events
        .into_iter()
        .filter_map(|e| match e {
            SourceEvent::Apply(o) => Some(std::sync::Arc::unwrap_or_clone(o)),
            _ => None,
        })
        .collect())
}

fn check(text: &str) -> Result<(), TestCaseError> {
    let objects = served_objects(text)?;
    let policies: Vec<(String, String)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some((
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect();
    let store = Store::from_objects(objects);
    let derived = derive(&store, &ModelConfig::default());
    let served = |ns: &str, name: &str| {
        derived
            .resources
            .values()
            .find_map(|r| match &r.resource.kind {
                Some(pb::resource::Kind::Authorization(a))
                    if a.namespace == ns && a.name == name =>
                {
                    Some(a.clone())
                }
                _ => None,
            })
    };
    for (ns, name) in &policies {
        let reported = derived.errors.iter().find(|e| match e {
            ModelError::Rejected {
                kind: Kind::AuthorizationPolicy,
                namespace,
                name: n,
                ..
            } => namespace == ns && n == name,
            ModelError::PolicyFailedClosed {
                namespace, name: n, ..
            } => namespace == ns && n == name,
            _ => false,
        });
        let wire = served(ns, name);
        // AUDIT policies enforce nothing; a broken one may be dropped, but reported.
        prop_assert!(
            wire.is_some() || reported.is_some(),
            "policy {ns}/{name} neither served nor reported"
        );
        if let (Some(ModelError::PolicyFailedClosed { .. }), Some(wire)) = (reported, &wire) {
            match pb::PolicyAction::try_from(wire.action) {
                Ok(pb::PolicyAction::Deny) => {
                    prop_assert_eq!(&wire.rules, &vec![pb::Rule::default()])
                }
                Ok(pb::PolicyAction::Allow) => prop_assert!(wire.rules.is_empty()),
                other => {
                    return Err(TestCaseError::fail(format!(
                        "{ns}/{name} failed closed as {other:?}"
                    )))
                }
            }
        }
    }
    // What the controller serves, the proxies accept.
    let push = pb::Push {
        nonce: "1".into(),
        full_state: true,
        version: 1,
        upserts: derived
            .resources
            .values()
            .map(|r| r.resource.clone())
            .collect(),
        removals: Vec::new(),
        trust_roots: Vec::new(),
    };
    if let Err(e) = ambit_ztunnel::state::Store::new(None).apply(push.clone()) {
        return Err(TestCaseError::fail(format!(
            "ztunnel refuses the push: {e}"
        )));
    }
    if let Err(e) = ambit_waypoint::discovery::Resources::default().apply(&push) {
        return Err(TestCaseError::fail(format!(
            "the waypoint refuses the push: {e}"
        )));
    }
    Ok(())
}

#[test]
fn policy_conversion() {
    check(MESH).unwrap_or_else(|e| panic!("the corpus mesh itself: {e}"));
    crate::fuzz("policy", 600, inputs(), |text| check(&text));
}
