//! The trace an evaluation records is the evaluation's own: it names the rule that decided
//! and, field by field, what the request had and whether it matched, and it always agrees
//! with the verdict of the unobserved evaluation the proxies run.

use ambit_policy::{evaluate, explain, Attributes, HttpAttributes, Policy};

fn policies(yaml: &str) -> Vec<Policy> {
    serde_yaml::from_str(yaml).expect("policies")
}

fn attrs<'a>(principal: &'a str, port: u16, http: Option<HttpAttributes<'a>>) -> Attributes<'a> {
    Attributes {
        principal: Some(principal),
        namespace: principal.split('/').nth(2),
        source_ip: "10.0.0.1".parse().expect("ip"),
        destination_ip: "10.0.1.1".parse().expect("ip"),
        destination_port: port,
        http,
    }
}

const POLICIES: &str = r#"
- {name: deny-admin, namespace: app, action: DENY,
   rules: [{to: [{ports: [9090]}]}, {from: [{principals: ["cluster.local/ns/evil/*"]}]}]}
- {name: allow-web, namespace: app, action: ALLOW,
   rules: [{from: [{namespaces: [web]}], to: [{ports: [8080]}]},
           {from: [{principals: [cluster.local/ns/ops/sa/admin]}], to: [{methods: [GET]}]}]}
"#;

#[test]
fn a_deny_names_its_rule_and_the_fields_that_matched() {
    let ps = policies(POLICIES);
    let a = attrs("cluster.local/ns/evil/sa/x", 8080, None);
    let (verdict, trace) = explain(&ps, &a);
    assert_eq!(verdict, evaluate(&ps, &a));
    assert!(!trace.allowed);
    let by = trace.decided_by.clone().expect("a rule decided");
    assert_eq!((by.policy.as_str(), by.rule), ("app/deny-admin", 1));
    let rule = trace.deciding_rule().expect("its trace");
    let fields: Vec<(&str, &str)> = rule
        .deciding()
        .map(|c| (c.field.as_str(), c.seen.as_str()))
        .collect();
    assert_eq!(
        fields,
        [("from[0].source.principals", "cluster.local/ns/evil/sa/x")]
    );
    // Rule 0 was tried first and failed on its port.
    let deny = trace.policy("app/deny-admin").expect("deny traced");
    assert!(!deny.rules[0].matched);
    assert_eq!(deny.rules[0].checks[0].field, "to[0].operation.ports");
    assert_eq!(deny.rules[0].checks[0].seen, "8080");
}

#[test]
fn no_allow_matched_shows_each_rule_s_failing_field() {
    let ps = policies(POLICIES);
    // L4 (ztunnel): the second ALLOW rule names a method, so it cannot match at all.
    let a = attrs("cluster.local/ns/shop/sa/client", 8080, None);
    let (verdict, trace) = explain(&ps, &a);
    assert_eq!(verdict, evaluate(&ps, &a));
    assert!(!trace.allowed);
    assert!(trace.decided_by.is_none());
    let allow = trace.policy("app/allow-web").expect("allow traced");
    let failing: Vec<String> = allow.rules[0]
        .deciding()
        .map(|c| format!("{}={}", c.field, c.seen))
        .collect();
    assert_eq!(failing, ["from[0].source.namespaces=shop"]);
    assert!(allow.rules[1].unknowable && allow.rules[1].checks.is_empty());
}

#[test]
fn l7_fields_are_traced_with_the_request_s_values() {
    let ps = policies(POLICIES);
    let headers = http::HeaderMap::new();
    let http = |method| HttpAttributes {
        method,
        path: "/x",
        host: "api",
        headers: &headers,
        auth: None,
    };
    let a = attrs("cluster.local/ns/ops/sa/admin", 8080, Some(http("DELETE")));
    let (verdict, trace) = explain(&ps, &a);
    assert_eq!(verdict, evaluate(&ps, &a));
    let rule = &trace.policy("app/allow-web").expect("traced").rules[1];
    assert!(!rule.matched);
    let failing: Vec<String> = rule
        .deciding()
        .map(|c| format!("{}={}", c.field, c.seen))
        .collect();
    assert_eq!(failing, ["to[0].operation.methods=DELETE"]);
    let a = attrs("cluster.local/ns/ops/sa/admin", 8080, Some(http("GET")));
    let (verdict, trace) = explain(&ps, &a);
    assert!(verdict.allowed() && trace.allowed);
    assert_eq!(
        trace.decided_by.map(|r| r.to_string()).as_deref(),
        Some("app/allow-web (rule 1)")
    );
}

#[test]
fn a_matched_rule_names_only_the_alternative_that_matched() {
    let ps = policies(
        r#"
- {name: deny, namespace: app, action: DENY,
   rules: [{from: [{principals: ["cluster.local/ns/evil/*"]},
                   {namespaces: [shop], ipBlocks: [10.0.0.0/8]}]}]}
"#,
    );
    let a = attrs("cluster.local/ns/shop/sa/x", 80, None);
    let (verdict, trace) = explain(&ps, &a);
    assert!(!verdict.allowed());
    let rule = trace.deciding_rule().expect("a rule decided");
    assert_eq!(rule.checks.len(), 3, "{rule:?}");
    let named: Vec<&str> = rule.deciding().map(|c| c.field.as_str()).collect();
    assert_eq!(
        named,
        ["from[1].source.namespaces", "from[1].source.ipBlocks"]
    );
}
