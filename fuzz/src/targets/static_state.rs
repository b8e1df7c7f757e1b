//! ztunnel's static state file (`--state-file`): YAML or JSON an operator writes, turned
//! into the same full-state push the controller would send.
//!
//! Inputs: the example file (`corpus/static-state/`) mutated as text with YAML's tokens,
//! and documents built field by field from the schema with values near their edges,
//! written as YAML or JSON.
//!
//! Properties: parsing never panics, and a file that parses is a push the store accepts
//! (the parser promises to report every problem itself, naming the item).

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::mutate;

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(options).prop_map(|s| json!(s)),
        1 => "[a-z0-9./*:-]{0,12}".prop_map(|s| json!(s)),
    ]
}

fn name() -> impl Strategy<Value = Value> {
    pick(&[
        "web-0", "a", "", "A", "-a", "a.b", "a_b", "default", "waypoint",
    ])
}

fn address() -> impl Strategy<Value = Value> {
    pick(&[
        "10.0.1.5",
        "10.0.2.9",
        "::1",
        "fd00::1",
        "10.0.0.256",
        "",
        "1.2.3",
        "::ffff:1.2.3.4",
        "fe80::1%eth0",
        "0.0.0.0",
    ])
}

fn port() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(&[0i64, 1, 80, 8080, 15008, 65535, 65536, -1][..])
            .prop_map(|p| json!(p)),
        Just(json!("80")),
        Just(json!(1.5)),
    ]
}

fn small_list<S: Strategy<Value = Value>>(s: S, max: usize) -> impl Strategy<Value = Value> {
    prop::collection::vec(s, 0..=max).prop_map(Value::Array)
}

/// Drops the fields whose value is `null`, so optional fields are sometimes absent.
fn object(fields: Vec<(&'static str, Value)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn maybe<S: Strategy<Value = Value>>(s: S) -> impl Strategy<Value = Value> {
    prop_oneof![1 => Just(Value::Null), 2 => s]
}

fn gateway() -> impl Strategy<Value = Value> {
    (
        address(),
        maybe(port()),
        pick(&[
            "spiffe://cluster.local/ns/default/sa/waypoint",
            "spiffe://cluster.local/ns/default",
            "cluster.local/ns/a/sa/b",
        ]),
    )
        .prop_map(|(a, p, i)| object(vec![("address", a), ("hbonePort", p), ("identity", i)]))
}

fn workload() -> impl Strategy<Value = Value> {
    (
        (
            maybe(pick(&["default/web-0", "x", ""])),
            name(),
            name(),
            maybe(name()),
        ),
        (
            pick(&["node-1", "node-2", ""]),
            small_list(address(), 3),
            maybe(pick(&["HBONE", "TCP", "hbone", "UDP"])),
            maybe(gateway()),
        ),
        (
            small_list(pick(&["default/allow-api", "default/", "/x", "a/b/c"]), 2),
            maybe(Just(json!({"app": "web"}))),
            maybe(pick(&["zone-a", ""])),
            maybe(prop_oneof![
                Just(json!(true)),
                Just(json!(false)),
                Just(json!("yes"))
            ]),
        ),
    )
        .prop_map(
            |((uid, n, ns, sa), (node, addrs, proto, wp), (pols, labels, zone, isw))| {
                object(vec![
                    ("uid", uid),
                    ("name", n),
                    ("namespace", ns),
                    ("serviceAccount", sa),
                    ("node", node),
                    ("addresses", addrs),
                    ("protocol", proto),
                    ("waypoint", wp),
                    ("authorizationPolicies", pols),
                    ("labels", labels),
                    ("zone", zone),
                    ("isWaypoint", isw),
                ])
            },
        )
}

fn service() -> impl Strategy<Value = Value> {
    (
        (
            name(),
            name(),
            maybe(pick(&["web.default.svc.cluster.local", ""])),
        ),
        small_list(address(), 2),
        small_list(
            (port(), maybe(port())).prop_map(|(p, t)| object(vec![("port", p), ("targetPort", t)])),
            2,
        ),
        small_list(
            (
                pick(&["default/web-0", "default/waypoint-0", "nope"]),
                maybe(Just(json!(false))),
            )
                .prop_map(|(u, r)| object(vec![("workloadUid", u), ("ready", r)])),
            2,
        ),
        maybe(gateway()),
        maybe(pick(&[
            "RANDOM",
            "LEAST_CONNECTIONS",
            "ROUND_ROBIN",
            "FASTEST",
        ])),
    )
        .prop_map(|((n, ns, host), vips, ports, eps, wp, lb)| {
            object(vec![
                ("name", n),
                ("namespace", ns),
                ("hostname", host),
                ("vips", vips),
                ("ports", ports),
                ("endpoints", eps),
                ("waypoint", wp),
                ("loadBalancing", lb),
            ])
        })
}

fn policy() -> impl Strategy<Value = Value> {
    let matches = || {
        small_list(
            pick(&[
                "*",
                "a*",
                "*a",
                "a*b",
                "",
                "cluster.local/ns/api/sa/*",
                "**",
            ]),
            2,
        )
    };
    let blocks = || {
        small_list(
            pick(&[
                "10.0.0.0/8",
                "10.0.0.0/33",
                "::/129",
                "::/0",
                "10.0.0.1",
                "x",
                "10.0.0.0/-1",
            ]),
            2,
        )
    };
    let source = (matches(), matches(), blocks(), blocks()).prop_map(
        |(p, n, b, nb)| json!({"principals": p, "namespaces": n, "ipBlocks": b, "notIpBlocks": nb}),
    );
    let operation = (
        small_list(port(), 2),
        small_list(pick(&["GET", "get", ""]), 1),
    )
        .prop_map(|(p, m)| json!({"ports": p, "methods": m}));
    let condition = (
        pick(&[
            "source.ip",
            "source.namespace",
            "source.principal",
            "destination.port",
            "destination.ip",
            "request.headers[x]",
            "bogus",
        ]),
        small_list(pick(&["api", "10.0.0.0/8", "80", "x", "*"]), 2),
    )
        .prop_map(|(k, v)| json!({"key": k, "values": v}));
    let rule = (
        small_list(source, 2),
        small_list(operation, 1),
        small_list(condition, 2),
    )
        .prop_map(|(f, t, w)| json!({"from": f, "to": t, "when": w}));
    (
        name(),
        name(),
        maybe(pick(&[
            "WORKLOAD_SELECTOR",
            "NAMESPACE",
            "GLOBAL",
            "CLUSTER",
        ])),
        maybe(pick(&["ALLOW", "DENY", "AUDIT", "CUSTOM"])),
        small_list(rule, 2),
    )
        .prop_map(|(n, ns, scope, action, rules)| {
            object(vec![
                ("name", n),
                ("namespace", ns),
                ("scope", scope),
                ("action", action),
                ("rules", rules),
            ])
        })
}

fn document() -> impl Strategy<Value = String> {
    (
        small_list(workload(), 3),
        small_list(service(), 2),
        small_list(policy(), 2),
        any::<bool>(),
    )
        .prop_map(|(w, s, p, as_json)| {
            let doc = json!({"workloads": w, "services": s, "policies": p});
            if as_json {
                doc.to_string()
            } else {
                serde_yaml::to_string(&doc).unwrap_or_default()
            }
        })
}

pub(crate) fn inputs() -> impl Strategy<Value = String> {
    let seeds = vec![
        include_bytes!("../../corpus/static-state/example.yaml").to_vec(),
        b"workloads: []\n".to_vec(),
    ];
    prop_oneof![
        1 => mutate::mutated(seeds, mutate::YAML_WORDS, 6)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => document(),
    ]
}

pub(crate) fn check(text: &str) -> Result<(), TestCaseError> {
    let Ok(push) = ambit_ztunnel::state::static_file::parse("fuzz", text, 1) else {
        return Ok(());
    };
    let mut store = ambit_ztunnel::state::Store::new(Some("node-1"));
    if let Err(e) = store.apply(push) {
        return Err(TestCaseError::fail(format!(
            "the file parsed but its push was refused: {e}"
        )));
    }
    Ok(())
}

#[test]
fn static_state_file() {
    assert!(
        ambit_ztunnel::state::static_file::parse(
            "example",
            include_str!("../../corpus/static-state/example.yaml"),
            1
        )
        .is_ok(),
        "the seed must parse"
    );
    crate::fuzz("static_state", 1500, inputs(), |text| check(&text));
}
