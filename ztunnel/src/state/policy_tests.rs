//! Table tests of L4 authorization (Istio semantics, L7 fail-closed).

use super::*;
use crate::state::fixtures::*;
use ambit_proto::discovery as pb;
use pb::{PolicyAction as A, PolicyScope as S};

const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/curl";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/bot";

fn src(principals: Vec<pb::StringMatch>) -> pb::Source {
    pb::Source {
        principals,
        ..Default::default()
    }
}

fn rule(from: Vec<pb::Source>, to: Vec<pb::Operation>, when: Vec<pb::Condition>) -> pb::Rule {
    pb::Rule { from, to, when }
}

fn ports(ps: &[u32]) -> pb::Operation {
    pb::Operation {
        ports: ps.to_vec(),
        ..Default::default()
    }
}

fn cond(key: &str, values: &[&str], not_values: &[&str]) -> pb::Condition {
    pb::Condition {
        key: key.into(),
        values: values.iter().map(|s| s.to_string()).collect(),
        not_values: not_values.iter().map(|s| s.to_string()).collect(),
    }
}

fn allow(name: &str, rules: Vec<pb::Rule>) -> pb::Authorization {
    policy("app", name, S::Namespace, A::Allow, rules)
}

fn deny(name: &str, rules: Vec<pb::Rule>) -> pb::Authorization {
    policy("app", name, S::Namespace, A::Deny, rules)
}

struct Case {
    name: &'static str,
    policies: Vec<pb::Authorization>,
    identity: Option<&'static str>,
    src_ip: &'static str,
    port: u16,
    allowed: bool,
    audit: bool,
    reason: &'static str,
}

fn case(name: &'static str, policies: Vec<pb::Authorization>) -> Case {
    Case {
        name,
        policies,
        identity: Some(CLIENT),
        src_ip: "10.1.0.5",
        port: 8080,
        allowed: true,
        audit: false,
        reason: "",
    }
}

impl Case {
    fn from(mut self, id: Option<&'static str>, ip: &'static str) -> Self {
        self.identity = id;
        self.src_ip = ip;
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn want(mut self, allowed: bool, reason: &'static str) -> Self {
        self.allowed = allowed;
        self.reason = reason;
        self
    }
    fn audited(mut self) -> Self {
        self.audit = true;
        self
    }
}

#[test]
fn l4_authorization_table() {
    let l7_rule = || {
        rule(
            vec![src(vec![exact("cluster.local/ns/client/sa/curl")])],
            vec![pb::Operation {
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            vec![],
        )
    };
    let cases = vec![
        case("no policies: allowed", vec![]).want(true, "no ALLOW policy applies"),
        case(
            "allowed by principal",
            vec![allow(
                "a",
                vec![rule(
                    vec![src(vec![exact("cluster.local/ns/client/sa/curl")])],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(true, "allowed by app/a (rule 0)"),
        case(
            "principal wildcard suffix",
            vec![allow(
                "a",
                vec![rule(vec![src(vec![suffix("/sa/curl")])], vec![], vec![])],
            )],
        )
        .want(true, "allowed by app/a"),
        case(
            "denied by principal: another identity",
            vec![allow(
                "a",
                vec![rule(
                    vec![src(vec![exact("cluster.local/ns/client/sa/curl")])],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(Some(OTHER), "10.1.0.5")
        .want(false, "no ALLOW policy matched (checked: app/a)"),
        case(
            "principals written with spiffe:// still match (a DENY must not fail open)",
            vec![deny(
                "d",
                vec![rule(
                    vec![src(vec![exact("spiffe://cluster.local/ns/client/sa/curl")])],
                    vec![],
                    vec![cond(
                        "source.principal",
                        &["spiffe://cluster.local/ns/client/*"],
                        &[],
                    )],
                )],
            )],
        )
        .want(false, "denied by app/d (rule 0)"),
        case(
            "deny policy on principal prefix",
            vec![deny(
                "d",
                vec![rule(
                    vec![src(vec![prefix("cluster.local/ns/client/")])],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(false, "denied by app/d (rule 0)"),
        case(
            "denied by namespace",
            vec![allow(
                "a",
                vec![rule(
                    vec![pb::Source {
                        namespaces: vec![exact("client")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(Some(OTHER), "10.1.0.5")
        .want(false, "no ALLOW policy matched"),
        case(
            "denied by port",
            vec![deny(
                "deny-port",
                vec![rule(vec![], vec![ports(&[8080])], vec![])],
            )],
        )
        .want(false, "denied by app/deny-port (rule 0)"),
        case(
            "deny on another port does not apply",
            vec![deny(
                "deny-port",
                vec![rule(vec![], vec![ports(&[9090])], vec![])],
            )],
        )
        .want(true, "no ALLOW policy applies"),
        case(
            "allow port: other port refused",
            vec![allow("a", vec![rule(vec![], vec![ports(&[9090])], vec![])])],
        )
        .want(false, "checked: app/a"),
        case(
            "ip blocks allow",
            vec![allow(
                "a",
                vec![rule(
                    vec![pb::Source {
                        ip_blocks: vec![block("10.1.0.0/16")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(true, "allowed by app/a"),
        case(
            "ip blocks outside",
            vec![allow(
                "a",
                vec![rule(
                    vec![pb::Source {
                        remote_ip_blocks: vec![block("10.2.0.0/16")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(false, "no ALLOW policy matched"),
        case(
            "not_ip_blocks negates",
            vec![deny(
                "d",
                vec![rule(
                    vec![pb::Source {
                        not_ip_blocks: vec![block("10.1.0.0/16")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(Some(CLIENT), "192.168.1.1")
        .want(false, "denied by app/d"),
        case(
            "not_principals: listed identity escapes the deny",
            vec![deny(
                "d",
                vec![rule(
                    vec![pb::Source {
                        not_principals: vec![exact("cluster.local/ns/client/sa/curl")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(true, "no ALLOW policy applies"),
        case(
            "not_namespaces: other namespace denied",
            vec![deny(
                "d",
                vec![rule(
                    vec![pb::Source {
                        not_namespaces: vec![exact("client")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(Some(OTHER), "10.1.0.5")
        .want(false, "denied by app/d"),
        case(
            "not_ports",
            vec![allow(
                "a",
                vec![rule(
                    vec![],
                    vec![pb::Operation {
                        not_ports: vec![8080],
                        ..Default::default()
                    }],
                    vec![],
                )],
            )],
        )
        .want(false, "no ALLOW policy matched"),
        case(
            "fields ANDed within a source",
            vec![allow(
                "a",
                vec![rule(
                    vec![pb::Source {
                        principals: vec![presence()],
                        ip_blocks: vec![block("10.9.0.0/16")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(false, "no ALLOW policy matched"),
        case(
            "from entries ORed",
            vec![allow(
                "a",
                vec![rule(
                    vec![
                        src(vec![exact("nobody")]),
                        pb::Source {
                            ip_blocks: vec![block("10.1.0.5/32")],
                            ..Default::default()
                        },
                    ],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(true, "allowed by app/a (rule 0)"),
        case(
            "second rule matches",
            vec![allow(
                "a",
                vec![
                    rule(vec![], vec![ports(&[1])], vec![]),
                    rule(vec![], vec![ports(&[8080])], vec![]),
                ],
            )],
        )
        .want(true, "allowed by app/a (rule 1)"),
        case(
            "when conditions ANDed",
            vec![allow(
                "a",
                vec![rule(
                    vec![],
                    vec![],
                    vec![
                        cond("source.namespace", &["client"], &[]),
                        cond("destination.port", &["8080"], &[]),
                        cond("source.ip", &["10.1.0.0/24"], &[]),
                        cond("destination.ip", &["10.0.0.2"], &[]),
                        cond("source.principal", &["cluster.local/ns/client/*"], &[]),
                    ],
                )],
            )],
        )
        .want(true, "allowed by app/a"),
        case(
            "when not_values",
            vec![allow(
                "a",
                vec![rule(
                    vec![],
                    vec![],
                    vec![cond("source.namespace", &[], &["client"])],
                )],
            )],
        )
        .want(false, "no ALLOW policy matched"),
        case(
            "allow with no rules matches nothing",
            vec![allow("nothing", vec![])],
        )
        .want(false, "no ALLOW policy matched (checked: app/nothing)"),
        case(
            "audit flags, does not deny",
            vec![policy(
                "app",
                "audit",
                S::Namespace,
                A::Audit,
                vec![rule(vec![], vec![], vec![])],
            )],
        )
        .want(
            true,
            "no ALLOW policy applies; audited by app/audit (rule 0)",
        )
        .audited(),
        case(
            "L7 in ALLOW never matches",
            vec![allow("l7", vec![l7_rule()])],
        )
        .want(false, "no ALLOW policy matched (checked: app/l7)"),
        case(
            "L7 in DENY matches on its L4 parts",
            vec![deny("l7", vec![l7_rule()])],
        )
        .want(false, "denied by app/l7 (rule 0)"),
        case(
            "L7 in DENY: L4 parts decide",
            vec![deny("l7", vec![l7_rule()])],
        )
        .from(Some(OTHER), "10.1.0.5")
        .want(true, "no ALLOW policy applies"),
        case(
            "L7 condition in ALLOW fails closed",
            vec![allow(
                "a",
                vec![rule(
                    vec![],
                    vec![],
                    vec![cond("request.headers[x-user]", &["me"], &[])],
                )],
            )],
        )
        .want(false, "no ALLOW policy matched"),
        case(
            "request principals in DENY deny everything from L4's view",
            vec![deny(
                "d",
                vec![rule(
                    vec![pb::Source {
                        request_principals: vec![presence()],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .want(false, "denied by app/d"),
        case(
            "plaintext never matches a principal rule",
            vec![allow(
                "a",
                vec![rule(vec![src(vec![presence()])], vec![], vec![])],
            )],
        )
        .from(None, "10.1.0.5")
        .want(false, "no ALLOW policy matched"),
        case(
            "plaintext escapes not_principals deny (nothing to match)",
            vec![deny(
                "d",
                vec![rule(
                    vec![pb::Source {
                        principals: vec![presence()],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(None, "10.1.0.5")
        .want(true, "no ALLOW policy applies"),
        case(
            "plaintext denied by not_principals *",
            vec![deny(
                "require-mtls",
                vec![rule(
                    vec![pb::Source {
                        not_principals: vec![presence()],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(None, "10.1.0.5")
        .want(false, "denied by app/require-mtls (rule 0)"),
        case(
            "plaintext allowed by ip block",
            vec![allow(
                "a",
                vec![rule(
                    vec![pb::Source {
                        ip_blocks: vec![block("10.1.0.0/16")],
                        ..Default::default()
                    }],
                    vec![],
                    vec![],
                )],
            )],
        )
        .from(None, "10.1.0.5")
        .want(true, "allowed by app/a"),
        case(
            "deny wins over allow",
            vec![
                allow("a", vec![rule(vec![], vec![], vec![])]),
                deny("d", vec![rule(vec![], vec![ports(&[8080])], vec![])]),
            ],
        )
        .want(false, "denied by app/d"),
        case(
            "audit flags denied connections too",
            vec![
                deny("d", vec![rule(vec![], vec![], vec![])]),
                policy(
                    "app",
                    "audit",
                    S::Namespace,
                    A::Audit,
                    vec![rule(vec![], vec![], vec![])],
                ),
            ],
        )
        .want(
            false,
            "denied by app/d (rule 0); audited by app/audit (rule 0)",
        )
        .audited(),
        case(
            "several allows, reason lists them",
            vec![
                allow("x", vec![rule(vec![], vec![ports(&[1])], vec![])]),
                allow("y", vec![rule(vec![], vec![ports(&[2])], vec![])]),
            ],
        )
        .port(3)
        .want(false, "no ALLOW policy matched (checked: app/x, app/y)"),
    ];
    for c in cases {
        let policies: Vec<Authorization> = c
            .policies
            .into_iter()
            .map(|p| Authorization::try_from(p).expect(c.name))
            .collect();
        let id: Option<Identity> = c.identity.map(|s| s.parse().expect("identity"));
        let conn = ConnectionInfo {
            src_identity: id.as_ref(),
            src_ip: ip(c.src_ip),
            dst_ip: ip("10.0.0.2"),
            dst_port: c.port,
        };
        let v = evaluate(policies.iter(), &conn);
        assert_eq!(v.allowed, c.allowed, "{}: {v:?}", c.name);
        assert_eq!(v.audit, c.audit, "{}: {v:?}", c.name);
        assert!(
            v.reason.contains(c.reason),
            "{}: {:?} lacks {:?}",
            c.name,
            v.reason,
            c.reason
        );
    }
}

#[test]
fn conversion_errors_name_the_field() {
    let bad = |r: pb::Rule| policy("app", "p", S::Namespace, A::Allow, vec![r]);
    let cases = vec![
        (
            bad(rule(
                vec![pb::Source {
                    ip_blocks: vec![pb::IpBlock {
                        address: vec![10, 0, 0, 0],
                        prefix_len: 33,
                    }],
                    ..Default::default()
                }],
                vec![],
                vec![],
            )),
            "authorization app/p: rules[0].from[0].ip_blocks[0].prefix_len \"33\"",
        ),
        (
            bad(rule(vec![], vec![ports(&[70000])], vec![])),
            "rules[0].to[0].ports[0] \"70000\"",
        ),
        (
            bad(rule(
                vec![],
                vec![],
                vec![cond("source.ip", &["nope"], &[])],
            )),
            "when[0] (source.ip) values[0] \"nope\"",
        ),
        (
            bad(rule(
                vec![src(vec![pb::StringMatch { r#match: None }])],
                vec![],
                vec![],
            )),
            "rules[0].from[0].principals[0]",
        ),
        (
            pb::Authorization {
                action: 9,
                ..bad(pb::Rule::default())
            },
            "action \"9\"",
        ),
    ];
    for (p, want) in cases {
        let err = Authorization::try_from(p).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
}

#[test]
fn unknown_condition_keys_fail_closed_instead_of_nacking() {
    let p = Authorization::try_from(policy(
        "app",
        "p",
        S::Namespace,
        A::Allow,
        vec![rule(
            vec![],
            vec![],
            vec![cond("connection.sni", &["x"], &[])],
        )],
    ))
    .unwrap();
    assert!(p.rules[0].uses_l7());
}
