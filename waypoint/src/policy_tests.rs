//! Table-driven tests of L7 authorization against Istio's semantics.

use super::*;

fn policy(name: &str, action: Action, rule_yaml: &str) -> Policy {
    let rules: Vec<Rule> = serde_yaml::from_str(rule_yaml).expect("rules yaml");
    Policy {
        name: name.into(),
        namespace: "demo".into(),
        action,
        rules,
        ..Policy::default()
    }
}

fn attrs<'a>(method: &'a str, path: &'a str, headers: &'a http::HeaderMap) -> Attributes<'a> {
    Attributes {
        principal: Some("spiffe://cluster.local/ns/client/sa/curl"),
        namespace: Some("client"),
        source_ip: "10.0.0.5".parse().expect("ip"),
        destination_ip: "10.96.0.10".parse().expect("ip"),
        destination_port: 80,
        http: Some(HttpAttributes {
            method,
            path,
            host: "web.demo.svc.cluster.local:80",
            headers,
            auth: None,
        }),
    }
}

#[test]
fn string_match_forms() {
    let cases = [
        ("*", "x", true),
        ("*", "", false),
        ("/api/*", "/api/v1", true),
        ("/api/*", "/apx", false),
        ("*.js", "/a/b.js", true),
        ("*.js", "/a/b.css", false),
        ("/exact", "/exact", true),
        ("/exact", "/exact/", false),
    ];
    for (pattern, value, want) in cases {
        assert_eq!(
            StringMatch::parse(pattern).expect(pattern).matches(value),
            want,
            "{pattern} vs {value}"
        );
    }
}

/// name, policies, method, path, headers, expected (Err: substring of the denying policy).
type Case<'a> = (
    &'a str,
    Vec<&'a Policy>,
    &'a str,
    &'a str,
    &'a http::HeaderMap,
    Result<(), &'a str>,
);

#[test]
fn verdicts() {
    let deny_admin = policy("deny-admin", Action::Deny, "- to: [{paths: ['/admin/*']}]");
    let deny_delete = policy("deny-delete", Action::Deny, "- to: [{methods: [DELETE]}]");
    let allow_client = policy(
        "allow-client",
        Action::Allow,
        "- from: [{namespaces: [client]}]\n  to: [{methods: [GET, POST]}]",
    );
    let allow_other = policy(
        "allow-other",
        Action::Allow,
        "- from: [{namespaces: [other]}]",
    );
    let allow_header = policy(
        "allow-header",
        Action::Allow,
        "- when: [{key: 'request.headers[x-team]', values: [blue]}]",
    );
    let audit_all = policy("audit", Action::Audit, "- {}");
    let allow_empty = policy("allow-nothing", Action::Allow, "[]");
    let allow_ip = policy(
        "allow-ip",
        Action::Allow,
        "- from: [{ipBlocks: [10.0.0.0/24]}]",
    );
    let allow_jwt = policy(
        "allow-jwt",
        Action::Allow,
        "- from: [{requestPrincipals: ['*']}]",
    );

    let mut blue = http::HeaderMap::new();
    blue.insert("x-team", http::HeaderValue::from_static("blue"));
    let none = http::HeaderMap::new();

    let allowed = |v: &Verdict| matches!(v, Verdict::Allow { .. });
    let cases: Vec<Case<'_>> = vec![
        ("no policies allow", vec![], "GET", "/", &none, Ok(())),
        (
            "deny path",
            vec![&deny_admin],
            "GET",
            "/admin/x",
            &none,
            Err("demo/deny-admin"),
        ),
        (
            "deny path other path",
            vec![&deny_admin],
            "GET",
            "/public",
            &none,
            Ok(()),
        ),
        (
            "deny method",
            vec![&deny_delete],
            "DELETE",
            "/",
            &none,
            Err("demo/deny-delete"),
        ),
        (
            "allow matches",
            vec![&allow_client],
            "GET",
            "/",
            &none,
            Ok(()),
        ),
        (
            "allow wrong method",
            vec![&allow_client],
            "PUT",
            "/",
            &none,
            Err("no ALLOW"),
        ),
        (
            "one allow of two",
            vec![&allow_other, &allow_client],
            "POST",
            "/",
            &none,
            Ok(()),
        ),
        (
            "deny beats allow",
            vec![&allow_client, &deny_admin],
            "GET",
            "/admin/1",
            &none,
            Err("demo/deny-admin"),
        ),
        (
            "header condition",
            vec![&allow_header],
            "GET",
            "/",
            &blue,
            Ok(()),
        ),
        (
            "header condition absent",
            vec![&allow_header],
            "GET",
            "/",
            &none,
            Err("no ALLOW"),
        ),
        (
            "audit never decides",
            vec![&audit_all],
            "GET",
            "/",
            &none,
            Ok(()),
        ),
        (
            "allow with no rules",
            vec![&allow_empty],
            "GET",
            "/",
            &none,
            Err("no ALLOW"),
        ),
        ("ip block", vec![&allow_ip], "GET", "/", &none, Ok(())),
        (
            "jwt never satisfied",
            vec![&allow_jwt],
            "GET",
            "/",
            &none,
            Err("no ALLOW"),
        ),
    ];
    for (name, policies, method, path, headers, want) in cases {
        let v = evaluate(&policies, &attrs(method, path, headers));
        match want {
            Ok(()) => assert!(allowed(&v), "{name}: {v:?}"),
            Err(by) => match &v {
                Verdict::Deny { by: got, .. } => assert!(got.contains(by), "{name}: {got}"),
                other => panic!("{name}: expected deny, got {other:?}"),
            },
        }
    }
}

#[test]
fn audit_is_reported() {
    let audit_all = policy("audit", Action::Audit, "- {}");
    let none = http::HeaderMap::new();
    let v = evaluate(&[&audit_all], &attrs("GET", "/", &none));
    assert_eq!(
        v,
        Verdict::Allow {
            audited: vec!["demo/audit".into()]
        }
    );
}

#[test]
fn tcp_fails_closed() {
    let deny_admin = policy("deny-admin", Action::Deny, "- to: [{paths: ['/admin/*']}]");
    let allow_get = policy("allow-get", Action::Allow, "- to: [{methods: [GET]}]");
    let none = http::HeaderMap::new();
    let mut a = attrs("GET", "/", &none);
    a.http = None;
    assert!(matches!(evaluate(&[&deny_admin], &a), Verdict::Deny { .. }));
    assert!(matches!(evaluate(&[&allow_get], &a), Verdict::Deny { .. }));
}

#[test]
fn unknown_condition_rejected() {
    let p = policy(
        "p",
        Action::Allow,
        "- when: [{key: 'experimental.foo', values: [x]}]",
    );
    assert!(validate(&p).is_err());
}
