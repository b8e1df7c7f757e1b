//! The one table of authorization cases: Istio's pattern semantics, every action and every
//! field of a rule, at L4 (what ztunnel sees) and at L7 (what the waypoint sees), run
//! against the one engine. Each case is written as operators write policies (YAML in
//! Istio's shape) and checks the verdict's full text, which names the deciding policy and
//! rule.

use ambit_policy::{
    evaluate, Attributes, HttpAttributes, Policy, RequestAuth, Rule, StringMatch, Test, Verdict,
};

#[test]
fn patterns_follow_istio() {
    // (pattern, value, matches); `None` for patterns refused at conversion.
    let cases: &[(&str, &str, Option<bool>)] = &[
        // Exact.
        ("abc", "abc", Some(true)),
        ("abc", "abcd", Some(false)),
        ("abc", "ABC", Some(false)),
        ("", "", Some(true)),
        // Prefix: "abc*" matches "abc" and "abcd".
        ("abc*", "abc", Some(true)),
        ("abc*", "abcd", Some(true)),
        ("abc*", "xabc", Some(false)),
        ("/api/*", "/api/v1", Some(true)),
        ("/api/*", "/apx", Some(false)),
        // Suffix: "*abc" matches "abc" and "xabc".
        ("*abc", "abc", Some(true)),
        ("*abc", "xabc", Some(true)),
        ("*abc", "abcd", Some(false)),
        ("*.js", "/a/b.js", Some(true)),
        // Presence: "*" matches any non-empty value.
        ("*", "x", Some(true)),
        ("*", "", Some(false)),
        // One wildcard, at one end: anything else is refused, never guessed at.
        ("*x*", "x", None),
        ("*x*", "*x", None),
        ("*x*", "ax*", None),
        ("a*b", "a*b", None),
        ("**", "x", None),
        ("*a*b", "ab", None),
    ];
    for &(pattern, value, want) in cases {
        match (StringMatch::parse(pattern), want) {
            (Ok(m), Some(want)) => {
                assert_eq!(m.matches(value), want, "{pattern:?} vs {value:?}");
                assert_eq!(m.to_string(), pattern, "{pattern:?} round trip");
            }
            (Err(e), None) => assert!(e.to_string().contains(pattern), "{e}"),
            (got, want) => panic!("{pattern:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn principals_match_without_their_scheme() {
    let id = "cluster.local/ns/client/sa/curl";
    for (pattern, want) in [
        ("cluster.local/ns/client/sa/curl", true),
        ("spiffe://cluster.local/ns/client/sa/curl", true),
        ("spiffe://cluster.local/ns/client/*", true),
        ("*/sa/curl", true),
        ("*", true),
        ("spiffe://cluster.local/ns/other/*", false),
    ] {
        let m = StringMatch::parse(pattern).expect(pattern);
        assert_eq!(m.matches_principal(id), want, "{pattern}");
    }
}

/// A request: L4 facts always, HTTP ones when `method` is set.
#[derive(Clone, Copy)]
struct Req {
    principal: Option<&'static str>,
    src: &'static str,
    dst: &'static str,
    port: u16,
    method: Option<&'static str>,
    path: &'static str,
    host: &'static str,
    header: Option<(&'static str, &'static str)>,
    /// Carries the validated token of [`token`].
    jwt: bool,
}

/// The validated token `GET.token()` carries: `https://idp.example/alice`, audience `web`,
/// presenter `cli`, groups `admin` and `dev`, a nested `org.team`.
fn token() -> RequestAuth {
    let claims = serde_json::json!({
        "iss": "https://idp.example", "sub": "alice", "aud": "web", "azp": "cli",
        "groups": ["admin", "dev"], "org": {"team": "blue"}, "level": 3,
    });
    RequestAuth {
        principal: "https://idp.example/alice".into(),
        audiences: vec!["web".into()],
        presenter: Some("cli".into()),
        claims: claims.as_object().cloned().unwrap_or_default(),
    }
}

/// `curl` in namespace `client` from 10.1.0.5 to 10.0.0.2:8080, at L4.
const L4: Req = Req {
    principal: Some("spiffe://cluster.local/ns/client/sa/curl"),
    src: "10.1.0.5",
    dst: "10.0.0.2",
    port: 8080,
    method: None,
    path: "/",
    host: "web.app.svc.cluster.local:8080",
    header: None,
    jwt: false,
};

/// The same over IPv6: from fd77:1::2 to [fd77:2::2]:8080.
const L4_V6: Req = Req {
    src: "fd77:1::2",
    dst: "fd77:2::2",
    ..L4
};

/// The same as an HTTP `GET /`.
const GET: Req = Req {
    method: Some("GET"),
    ..L4
};

impl Req {
    fn from(self, principal: Option<&'static str>, src: &'static str) -> Self {
        Req {
            principal,
            src,
            ..self
        }
    }
    fn port(self, port: u16) -> Self {
        Req { port, ..self }
    }
    fn http(self, method: &'static str, path: &'static str) -> Self {
        Req {
            method: Some(method),
            path,
            ..self
        }
    }
    fn host(self, host: &'static str) -> Self {
        Req { host, ..self }
    }
    fn header(self, name: &'static str, value: &'static str) -> Self {
        Req {
            header: Some((name, value)),
            ..self
        }
    }

    fn token(self) -> Self {
        Req { jwt: true, ..self }
    }

    fn verdict(&self, policies: &[Policy]) -> Verdict {
        let token = token();
        let mut headers = http::HeaderMap::new();
        if let Some((n, v)) = self.header {
            headers.insert(
                http::HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            );
        }
        let namespace = self.principal.and_then(|p| p.split('/').nth(4));
        let attrs = Attributes {
            principal: self.principal,
            namespace,
            source_ip: self.src.parse().expect("src"),
            destination_ip: self.dst.parse().expect("dst"),
            destination_port: self.port,
            http: self.method.map(|method| HttpAttributes {
                method,
                path: self.path,
                host: self.host,
                headers: &headers,
                auth: self.jwt.then_some(&token),
            }),
        };
        evaluate(policies, &attrs)
    }
}

const OTHER: Option<&str> = Some("spiffe://cluster.local/ns/other/sa/bot");

/// Policies in namespace `app`, in the shape operators write:
/// `name ACTION: <rules as YAML flow>` per line.
fn policies(spec: &str) -> Vec<Policy> {
    spec.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (head, rules) = line.split_once(':').expect("name ACTION: rules");
            let (name, action) = head.split_once(' ').expect("name ACTION");
            let rules: Vec<Rule> =
                serde_yaml::from_str(rules).unwrap_or_else(|e| panic!("{line}: {e}"));
            let action = serde_yaml::from_str(action).expect("action");
            Policy {
                name: name.into(),
                namespace: "app".into(),
                action,
                rules,
                ..Policy::default()
            }
        })
        .collect()
}

#[test]
fn verdicts() {
    // (case, policies, request, verdict as the access log prints it)
    let cases: &[(&str, &str, Req, &str)] = &[
        // ---- actions and their order
        ("no policy allows", "", L4, "no ALLOW policy applies"),
        ("allow without rules matches nothing", "a ALLOW: []", L4, "no ALLOW policy matched (checked: app/a)"),
        ("empty rule matches everything", "a ALLOW: [{}]", L4, "allowed by app/a (rule 0)"),
        ("deny matches", "d DENY: [{}]", L4, "denied by app/d (rule 0)"),
        ("deny without rules matches nothing", "d DENY: []", L4, "no ALLOW policy applies"),
        ("deny wins over allow", "a ALLOW: [{}]\nd DENY: [{to: [{ports: [8080]}]}]", L4, "denied by app/d (rule 0)"),
        ("first deny names itself", "d1 DENY: [{to: [{ports: [1]}]}, {}]\nd2 DENY: [{}]", L4, "denied by app/d1 (rule 1)"),
        ("one allow of several suffices", "x ALLOW: [{to: [{ports: [1]}]}]\ny ALLOW: [{}]", L4, "allowed by app/y (rule 0)"),
        ("several allows, none matches", "x ALLOW: [{to: [{ports: [1]}]}]\ny ALLOW: [{to: [{ports: [2]}]}]", L4, "no ALLOW policy matched (checked: app/x, app/y)"),
        ("second rule decides", "a ALLOW: [{to: [{ports: [1]}]}, {to: [{ports: [8080]}]}]", L4, "allowed by app/a (rule 1)"),
        ("audit never decides", "au AUDIT: [{}]", L4, "no ALLOW policy applies; audited by app/au (rule 0)"),
        ("audit flags denied requests", "d DENY: [{}]\nau AUDIT: [{}]", L4, "denied by app/d (rule 0); audited by app/au (rule 0)"),
        ("audit not matching is silent", "au AUDIT: [{to: [{ports: [1]}]}]", L4, "no ALLOW policy applies"),
        ("audit does not count as an allow", "au AUDIT: [{}]\na ALLOW: [{to: [{ports: [1]}]}]", L4, "no ALLOW policy matched (checked: app/a); audited by app/au (rule 0)"),
        // ---- sources: fields ANDed, values ORed, entries ORed
        ("principal exact", "a ALLOW: [{from: [{principals: [cluster.local/ns/client/sa/curl]}]}]", L4, "allowed by app/a (rule 0)"),
        ("principal other identity", "a ALLOW: [{from: [{principals: [cluster.local/ns/client/sa/curl]}]}]", L4.from(OTHER, "10.1.0.5"), "no ALLOW policy matched (checked: app/a)"),
        ("principal prefix", "d DENY: [{from: [{principals: ['cluster.local/ns/client/*']}]}]", L4, "denied by app/d (rule 0)"),
        ("principal suffix", "a ALLOW: [{from: [{principals: ['*/sa/curl']}]}]", L4, "allowed by app/a (rule 0)"),
        ("principal with spiffe:// in a DENY still denies", "d DENY: [{from: [{principals: ['spiffe://cluster.local/ns/client/sa/curl']}]}]", L4, "denied by app/d (rule 0)"),
        ("principal presence: plaintext has none", "a ALLOW: [{from: [{principals: ['*']}]}]", L4.from(None, "10.1.0.5"), "no ALLOW policy matched (checked: app/a)"),
        ("notPrincipals excludes", "d DENY: [{from: [{notPrincipals: [cluster.local/ns/client/sa/curl]}]}]", L4, "no ALLOW policy applies"),
        ("notPrincipals '*' denies plaintext", "d DENY: [{from: [{notPrincipals: ['*']}]}]", L4.from(None, "10.1.0.5"), "denied by app/d (rule 0)"),
        ("namespaces", "a ALLOW: [{from: [{namespaces: [client]}]}]", L4, "allowed by app/a (rule 0)"),
        ("namespaces other", "a ALLOW: [{from: [{namespaces: [client]}]}]", L4.from(OTHER, "10.1.0.5"), "no ALLOW policy matched (checked: app/a)"),
        ("namespaces prefix", "a ALLOW: [{from: [{namespaces: ['cli*']}]}]", L4, "allowed by app/a (rule 0)"),
        ("notNamespaces", "d DENY: [{from: [{notNamespaces: [client]}]}]", L4.from(OTHER, "10.1.0.5"), "denied by app/d (rule 0)"),
        ("ipBlocks", "a ALLOW: [{from: [{ipBlocks: [10.1.0.0/16]}]}]", L4, "allowed by app/a (rule 0)"),
        ("ipBlocks outside", "a ALLOW: [{from: [{ipBlocks: [10.2.0.0/16]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("ipBlocks for plaintext", "a ALLOW: [{from: [{ipBlocks: [10.1.0.0/16]}]}]", L4.from(None, "10.1.0.5"), "allowed by app/a (rule 0)"),
        ("notIpBlocks", "d DENY: [{from: [{notIpBlocks: [10.1.0.0/16]}]}]", L4.from(L4.principal, "192.168.1.1"), "denied by app/d (rule 0)"),
        ("remoteIpBlocks", "a ALLOW: [{from: [{remoteIpBlocks: [10.1.0.5/32]}]}]", L4, "allowed by app/a (rule 0)"),
        ("notRemoteIpBlocks", "a ALLOW: [{from: [{notRemoteIpBlocks: [10.1.0.0/16]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        // ---- IPv6: blocks match their own family only; IPv4-mapped sources are IPv4
        ("ipBlocks IPv6", "a ALLOW: [{from: [{ipBlocks: ['fd77:1::/64']}]}]", L4_V6, "allowed by app/a (rule 0)"),
        ("ipBlocks IPv6 outside", "a ALLOW: [{from: [{ipBlocks: ['fd77:2::/64']}]}]", L4_V6, "no ALLOW policy matched (checked: app/a)"),
        ("ipBlocks IPv6 single address", "d DENY: [{from: [{ipBlocks: ['fd77:1::2/128']}]}]", L4_V6, "denied by app/d (rule 0)"),
        ("ipBlocks IPv6 /128", "d DENY: [{from: [{ipBlocks: ['fd77:1::3/128']}]}]", L4_V6, "no ALLOW policy applies"),
        ("ipBlocks IPv6 ::/0 takes every IPv6 source", "d DENY: [{from: [{ipBlocks: ['::/0']}]}]", L4_V6, "denied by app/d (rule 0)"),
        ("ipBlocks IPv6 ::/0 is not IPv4", "d DENY: [{from: [{ipBlocks: ['::/0']}]}]", L4, "no ALLOW policy applies"),
        ("ipBlocks IPv4 0.0.0.0/0 is not IPv6", "d DENY: [{from: [{ipBlocks: [0.0.0.0/0]}]}]", L4_V6, "no ALLOW policy applies"),
        ("ipBlocks IPv6 for plaintext", "d DENY: [{from: [{ipBlocks: ['fd77:1::/64']}]}]", L4_V6.from(None, "fd77:1::2"), "denied by app/d (rule 0)"),
        ("notIpBlocks IPv6", "d DENY: [{from: [{notIpBlocks: ['fd77:1::/64']}]}]", L4_V6.from(L4.principal, "fd77:9::1"), "denied by app/d (rule 0)"),
        ("IPv4-mapped source matches the IPv4 block", "a ALLOW: [{from: [{ipBlocks: [10.1.0.0/16]}]}]", L4.from(L4.principal, "::ffff:10.1.0.5"), "allowed by app/a (rule 0)"),
        ("remoteIpBlocks IPv6", "a ALLOW: [{from: [{remoteIpBlocks: ['fd77:1::/48']}]}]", L4_V6, "allowed by app/a (rule 0)"),
        ("when source.ip IPv6", "d DENY: [{when: [{key: source.ip, values: ['fd77:1::/64']}]}]", L4_V6, "denied by app/d (rule 0)"),
        ("when destination.ip IPv6", "a ALLOW: [{when: [{key: destination.ip, values: ['fd77:2::2']}]}]", L4_V6, "allowed by app/a (rule 0)"),
        ("when destination.ip IPv6 notValues", "a ALLOW: [{when: [{key: destination.ip, notValues: ['fd77:2::/64']}]}]", L4_V6, "no ALLOW policy matched (checked: app/a)"),
        ("ipBlocks AND remoteIpBlocks", "a ALLOW: [{from: [{ipBlocks: [10.1.0.0/16], remoteIpBlocks: [10.9.0.0/16]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("fields ANDed within a source", "a ALLOW: [{from: [{principals: ['*'], ipBlocks: [10.9.0.0/16]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("sources ORed", "a ALLOW: [{from: [{principals: [nobody]}, {ipBlocks: [10.1.0.5/32]}]}]", L4, "allowed by app/a (rule 0)"),
        ("requestPrincipals: an ALLOW does not match a request without a token", "a ALLOW: [{from: [{requestPrincipals: ['*']}]}]", GET, "no ALLOW policy matched (checked: app/a)"),
        ("requestPrincipals: an ALLOW matches the token's iss/sub", "a ALLOW: [{from: [{requestPrincipals: ['https://idp.example/alice']}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("requestPrincipals: issuer prefix", "a ALLOW: [{from: [{requestPrincipals: ['https://idp.example/*']}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("requestPrincipals: another subject", "a ALLOW: [{from: [{requestPrincipals: ['https://idp.example/bob']}]}]", GET.token(), "no ALLOW policy matched (checked: app/a)"),
        ("requestPrincipals: an ALLOW never matches at L4", "a ALLOW: [{from: [{requestPrincipals: ['*']}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("requestPrincipals: a DENY at L4 matches on the rest", "d DENY: [{from: [{requestPrincipals: ['*'], namespaces: [client]}]}]", L4, "denied by app/d (rule 0)"),
        ("requestPrincipals: a DENY does not match a request without a token", "d DENY: [{from: [{requestPrincipals: ['*'], namespaces: [client]}]}]", GET, "no ALLOW policy applies"),
        ("notRequestPrincipals: a DENY of requests without a token", "d DENY: [{from: [{notRequestPrincipals: ['*']}]}]", GET, "denied by app/d (rule 0)"),
        ("notRequestPrincipals: a request with a token passes", "d DENY: [{from: [{notRequestPrincipals: ['*']}]}]", GET.token(), "no ALLOW policy applies"),
        ("notRequestPrincipals: a DENY matches on the rest", "d DENY: [{from: [{notRequestPrincipals: ['*'], namespaces: [other]}]}]", GET, "no ALLOW policy applies"),
        ("requestPrincipals in one source of an ALLOW rule: the other source matches at L7", "a ALLOW: [{from: [{namespaces: [client]}, {requestPrincipals: ['*']}]}]", GET, "allowed by app/a (rule 0)"),
        ("requestPrincipals in one source fails the whole ALLOW rule at L4", "a ALLOW: [{from: [{namespaces: [client]}, {requestPrincipals: ['*']}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        // ---- operations
        ("ports", "d DENY: [{to: [{ports: [8080]}]}]", L4, "denied by app/d (rule 0)"),
        ("ports other", "d DENY: [{to: [{ports: [9090]}]}]", L4, "no ALLOW policy applies"),
        ("notPorts", "a ALLOW: [{to: [{notPorts: [8080]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("operations ORed", "a ALLOW: [{to: [{ports: [1]}, {ports: [8080]}]}]", L4, "allowed by app/a (rule 0)"),
        ("methods", "a ALLOW: [{to: [{methods: [GET, POST]}]}]", GET, "allowed by app/a (rule 0)"),
        ("methods other", "a ALLOW: [{to: [{methods: [GET, POST]}]}]", GET.http("PUT", "/"), "no ALLOW policy matched (checked: app/a)"),
        ("methods '*'", "a ALLOW: [{to: [{methods: ['*']}]}]", GET.http("PATCH", "/"), "allowed by app/a (rule 0)"),
        ("notMethods", "d DENY: [{to: [{notMethods: [GET]}]}]", GET.http("DELETE", "/"), "denied by app/d (rule 0)"),
        ("paths prefix", "d DENY: [{to: [{paths: ['/admin/*']}]}]", GET.http("GET", "/admin/x"), "denied by app/d (rule 0)"),
        ("paths prefix other", "d DENY: [{to: [{paths: ['/admin/*']}]}]", GET.http("GET", "/public"), "no ALLOW policy applies"),
        ("paths suffix", "d DENY: [{to: [{paths: ['*.js']}]}]", GET.http("GET", "/a/b.js"), "denied by app/d (rule 0)"),
        ("paths exact", "a ALLOW: [{to: [{paths: [/exact]}]}]", GET.http("GET", "/exact/"), "no ALLOW policy matched (checked: app/a)"),
        ("notPaths", "a ALLOW: [{to: [{notPaths: ['/admin/*']}]}]", GET.http("GET", "/admin/1"), "no ALLOW policy matched (checked: app/a)"),
        ("hosts without the port", "a ALLOW: [{to: [{hosts: [web.app.svc.cluster.local]}]}]", GET, "allowed by app/a (rule 0)"),
        ("hosts with the port", "a ALLOW: [{to: [{hosts: ['web.app.svc.cluster.local:8080']}]}]", GET, "allowed by app/a (rule 0)"),
        ("hosts suffix", "a ALLOW: [{to: [{hosts: ['*.svc.cluster.local']}]}]", GET.host("web.app.svc.cluster.local"), "allowed by app/a (rule 0)"),
        ("hosts other", "a ALLOW: [{to: [{hosts: [db.app.svc.cluster.local]}]}]", GET, "no ALLOW policy matched (checked: app/a)"),
        ("notHosts", "d DENY: [{to: [{notHosts: ['db.*']}]}]", GET, "denied by app/d (rule 0)"),
        ("HTTP fields in an ALLOW at L4: never match", "a ALLOW: [{to: [{methods: [GET]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("HTTP fields in a DENY at L4: L4 parts decide (match)", "d DENY: [{from: [{namespaces: [client]}], to: [{paths: ['/admin/*']}]}]", L4, "denied by app/d (rule 0)"),
        ("HTTP fields in a DENY at L4: L4 parts decide (no match)", "d DENY: [{from: [{namespaces: [client]}], to: [{paths: ['/admin/*']}]}]", L4.from(OTHER, "10.1.0.5"), "no ALLOW policy applies"),
        ("HTTP fields in an AUDIT at L4: flagged on L4 parts", "au AUDIT: [{to: [{methods: [GET]}]}]", L4, "no ALLOW policy applies; audited by app/au (rule 0)"),
        // ---- conditions (ANDed; values ORed; notValues exclude)
        ("when source.ip", "a ALLOW: [{when: [{key: source.ip, values: [10.1.0.0/24]}]}]", L4, "allowed by app/a (rule 0)"),
        ("when remote.ip", "a ALLOW: [{when: [{key: remote.ip, values: [10.1.0.5]}]}]", L4, "allowed by app/a (rule 0)"),
        ("when destination.ip", "a ALLOW: [{when: [{key: destination.ip, notValues: [10.0.0.2]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("when destination.port", "a ALLOW: [{when: [{key: destination.port, values: ['8080']}]}]", L4, "allowed by app/a (rule 0)"),
        ("when source.namespace notValues", "a ALLOW: [{when: [{key: source.namespace, notValues: [client]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("when source.principal with spiffe://", "d DENY: [{when: [{key: source.principal, values: ['spiffe://cluster.local/ns/client/*']}]}]", L4, "denied by app/d (rule 0)"),
        ("when ANDed", "a ALLOW: [{when: [{key: source.namespace, values: [client]}, {key: destination.port, values: ['1']}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("when request.headers", "a ALLOW: [{when: [{key: 'request.headers[x-team]', values: [blue]}]}]", GET.header("x-team", "blue"), "allowed by app/a (rule 0)"),
        ("when request.headers absent", "a ALLOW: [{when: [{key: 'request.headers[x-team]', values: [blue]}]}]", GET, "no ALLOW policy matched (checked: app/a)"),
        ("when request.headers presence", "d DENY: [{when: [{key: 'request.headers[x-debug]', values: ['*']}]}]", GET.header("x-debug", "1"), "denied by app/d (rule 0)"),
        ("when request.headers at L4 in an ALLOW", "a ALLOW: [{when: [{key: 'request.headers[x-team]', values: [blue]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        ("when request.headers at L4 in a DENY", "d DENY: [{when: [{key: 'request.headers[x-team]', values: [blue]}]}]", L4, "denied by app/d (rule 0)"),
        ("when request.auth.claims without a token", "a ALLOW: [{when: [{key: 'request.auth.claims[iss]', values: ['*']}]}]", GET, "no ALLOW policy matched (checked: app/a)"),
        ("when request.auth.claims in a DENY without a token", "d DENY: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]", GET, "no ALLOW policy applies"),
        ("when request.auth.claims in a DENY at L4", "d DENY: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]", L4, "denied by app/d (rule 0)"),
        ("when request.auth.claims string", "a ALLOW: [{when: [{key: 'request.auth.claims[iss]', values: ['https://idp.example']}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("when request.auth.claims list", "a ALLOW: [{when: [{key: 'request.auth.claims[groups]', values: [admin]}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("when request.auth.claims list, none", "a ALLOW: [{when: [{key: 'request.auth.claims[groups]', values: [ops]}]}]", GET.token(), "no ALLOW policy matched (checked: app/a)"),
        ("when request.auth.claims notValues on a list", "d DENY: [{when: [{key: 'request.auth.claims[groups]', notValues: [dev]}]}]", GET.token(), "no ALLOW policy applies"),
        ("when request.auth.claims nested", "a ALLOW: [{when: [{key: 'request.auth.claims[org][team]', values: ['bl*']}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("when request.auth.claims a number is no string", "a ALLOW: [{when: [{key: 'request.auth.claims[level]', values: ['3']}]}]", GET.token(), "no ALLOW policy matched (checked: app/a)"),
        ("when request.auth.claims malformed key", "a ALLOW: [{when: [{key: 'request.auth.claims[]', values: ['*']}]}]", GET.token(), "no ALLOW policy matched (checked: app/a)"),
        ("when request.auth.principal", "a ALLOW: [{when: [{key: request.auth.principal, values: ['*/alice']}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("when request.auth.audiences", "a ALLOW: [{when: [{key: request.auth.audiences, values: [web]}]}]", GET.token(), "allowed by app/a (rule 0)"),
        ("when request.auth.presenter", "a ALLOW: [{when: [{key: request.auth.presenter, values: [other]}]}]", GET.token(), "no ALLOW policy matched (checked: app/a)"),
        ("when unknown key in an ALLOW", "a ALLOW: [{when: [{key: connection.sni, values: [x]}]}]", GET, "no ALLOW policy matched (checked: app/a)"),
        ("when unknown key in a DENY", "d DENY: [{when: [{key: connection.sni, values: [x]}]}]", L4, "denied by app/d (rule 0)"),
        ("from AND to AND when", "a ALLOW: [{from: [{namespaces: [client]}], to: [{ports: [8080]}], when: [{key: source.ip, values: [10.9.0.0/16]}]}]", L4, "no ALLOW policy matched (checked: app/a)"),
        // ---- the same policy at both hops
        ("port deny at L7 too", "d DENY: [{to: [{ports: [8080]}]}]", GET, "denied by app/d (rule 0)"),
        ("other port at L7", "a ALLOW: [{to: [{ports: [8080]}]}]", GET.port(9090), "no ALLOW policy matched (checked: app/a)"),
    ];
    for &(name, spec, req, want) in cases {
        let v = req.verdict(&policies(spec));
        assert_eq!(v.to_string(), want, "{name}");
        let allowed = !want.starts_with("denied") && !want.starts_with("no ALLOW policy matched");
        assert_eq!(v.allowed(), allowed, "{name}");
    }
}

#[test]
fn malformed_values_are_refused_where_they_are_read() {
    for (rules, want) in [
        ("[{from: [{principals: ['*x*']}]}]", "\"*x*\""),
        ("[{to: [{paths: ['/a*b']}]}]", "\"/a*b\""),
        (
            "[{when: [{key: source.ip, values: [nope]}]}]",
            "(source.ip) values[0] \"nope\"",
        ),
        (
            "[{when: [{key: destination.port, notValues: ['http']}]}]",
            "(destination.port) not_values[0] \"http\"",
        ),
        (
            "[{when: [{key: 'request.headers[x]', values: ['*a*']}]}]",
            "\"*a*\"",
        ),
        ("[{to: [{ports: [70000]}]}]", "70000"),
    ] {
        let err = serde_yaml::from_str::<Vec<Rule>>(rules).expect_err(rules);
        assert!(err.to_string().contains(want), "{rules}: {err}");
    }
    let rules: Vec<Rule> =
        serde_yaml::from_str("[{when: [{key: connection.sni, values: ['*x*']}]}]")
            .expect("unknown key");
    assert_eq!(rules[0].when[0].test(), &Test::Unknown);
    assert!(rules[0].uses_l7());
}

#[test]
fn wire_round_trip_keeps_the_policy() {
    let mut p = policies(
        "p DENY: [{from: [{principals: ['a*', '*b', c, '*'], notNamespaces: [x], ipBlocks: [10.0.0.0/8], notRemoteIpBlocks: ['fd00::/8'], requestPrincipals: [j]}], to: [{ports: [80], notPorts: [81], hosts: [h], notHosts: ['*.h'], methods: [GET], notMethods: [PUT], paths: ['/p*'], notPaths: [/q]}], when: [{key: source.ip, values: [10.1.0.0/16], notValues: [10.1.2.3]}, {key: 'request.headers[x]', values: [v]}]}]",
    )
    .remove(0);
    p.target_service = Some("app/web.app.svc.cluster.local".into());
    let wire = ambit_proto::discovery::Authorization::from(&p);
    assert_eq!(Policy::try_from(wire).expect("decodes"), p);
}
