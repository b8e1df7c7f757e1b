//! Table tests of `decide` against one fixture state: one row per case, the decision written
//! out compactly so that a row says everything the proxy would do.

use std::cell::RefCell;

use super::*;
use crate::state::StateFile;

const FIXTURE: &str = r#"
workloads:
  - {uid: client, name: client, namespace: client, serviceAccount: curl, addresses: [10.0.0.5]}
  - {uid: web-a, name: web-a, namespace: demo, serviceAccount: web, addresses: [10.0.1.1]}
  - {uid: web-b, name: web-b, namespace: demo, serviceAccount: web, addresses: [10.0.1.2]}
  - {uid: canary-a, name: canary-a, namespace: demo, serviceAccount: canary, addresses: [10.0.2.1]}
  - {uid: lonely, name: lonely, namespace: demo, serviceAccount: lonely, addresses: [10.0.3.1]}
  - {uid: shadow-a, name: shadow-a, namespace: demo, serviceAccount: shadow, addresses: [10.0.4.1]}
services:
  - name: web
    namespace: demo
    hostname: web.demo.svc.cluster.local
    vips: [10.96.0.10]
    ports: [{servicePort: 80, targetPort: 8080}]
    endpoints: [{workloadUid: web-a}, {workloadUid: web-b}, {workloadUid: shadow-a, ready: false}]
  - name: canary
    namespace: demo
    hostname: canary.demo.svc.cluster.local
    vips: [10.96.0.11]
    ports: [{servicePort: 80, targetPort: 8081}]
    endpoints: [{workloadUid: canary-a}]
  - name: plain
    namespace: demo
    hostname: plain.demo.svc.cluster.local
    vips: [10.96.0.12]
    ports: [{servicePort: 80}]
    endpoints: [{workloadUid: canary-a, ports: {80: 9999}}]
  - name: limited
    namespace: demo
    hostname: limited.demo.svc.cluster.local
    vips: [10.96.0.13]
    ports: [{servicePort: 80, targetPort: 8080}]
    endpoints: [{workloadUid: web-a}]
  - name: faulty
    namespace: demo
    hostname: faulty.demo.svc.cluster.local
    vips: [10.96.0.14]
    ports: [{servicePort: 80, targetPort: 8080}]
    endpoints: [{workloadUid: web-b}]
  - name: shadow
    namespace: demo
    hostname: shadow.demo.svc.cluster.local
    vips: [10.96.0.15]
    ports: [{servicePort: 80, targetPort: 9090}]
    endpoints: [{workloadUid: shadow-a}]
  - name: empty
    namespace: demo
    hostname: empty.demo.svc.cluster.local
    vips: [10.96.0.16]
    ports: [{servicePort: 80, targetPort: 8080}]
policies:
  - name: no-admin
    namespace: demo
    action: DENY
    targetGateway: demo/waypoint
    rules: [{to: [{paths: ["/admin/*"]}]}]
  - name: watch-login
    namespace: demo
    action: AUDIT
    targetService: demo/web.demo.svc.cluster.local
    rules: [{to: [{paths: [/login]}]}]
  - name: elsewhere
    namespace: demo
    action: DENY
    targetGateway: other/waypoint
    rules: [{}]
  - name: legacy-writes
    namespace: demo
    action: DENY
    targetService: demo/legacy
    rules: [{to: [{methods: [POST]}]}]
routes:
  - name: web
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/web.demo.svc.cluster.local]
    spec:
      rules:
        - matches: [{path: {type: Exact, value: /login}}]
          timeouts: {request: 2s, backendRequest: 500ms}
          retry: {codes: [503], attempts: 2}
        - matches: [{path: {type: PathPrefix, value: /split}}]
          backendRefs: [{name: web, weight: 90}, {name: canary, weight: 10}]
        - matches: [{path: {type: PathPrefix, value: /old}}]
          filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
        - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "1"}]}]
          backendRefs: [{name: canary}]
        - matches: [{path: {type: PathPrefix, value: /api}}]
          filters:
            - type: URLRewrite
              urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
          backendRefs: [{name: web, port: 80}]
        - matches: [{path: {type: PathPrefix, value: /zero}}]
          backendRefs: [{name: web, weight: 0}, {name: canary, weight: 0}]
        - matches: [{path: {type: PathPrefix, value: /ghost}}]
          backendRefs: [{name: nowhere}]
        - matches: [{path: {type: PathPrefix, value: /mirror}}]
          filters:
            - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}, percent: 50}}
            - {type: RequestMirror, requestMirror: {backendRef: {name: nowhere}}}
externalServices:
  - name: pay
    namespace: demo
    hosts: [pay.example.com]
    ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443, tls: {}}]
    resolution: DNS
    vips: [{host: pay.example.com, address: 240.240.0.7}]
  - name: legacy
    namespace: demo
    hosts: [legacy.example.com]
    addresses: [192.0.2.0/24]
    ports: [{number: 8080, name: http}]
  - name: none-vip
    namespace: demo
    hosts: [nowhere.example.com]
    ports: [{number: 80}]
    vips: [{host: nowhere.example.com, address: 240.240.0.8}]
trafficPolicies:
  - name: limit
    namespace: demo
    targetService: demo/limited.demo.svc.cluster.local
    spec: {rateLimit: {tokensPerFill: 1, fillInterval: 60s, maxTokens: 5}}
  - name: faults
    namespace: demo
    targetService: demo/faulty.demo.svc.cluster.local
    spec:
      faultInjection:
        delay: {fixedDelay: 5s, percentage: 50}
        abort: {httpStatus: 418, percentage: 30}
"#;

fn state() -> State {
    let file: StateFile = serde_yaml::from_str(FIXTURE).expect("fixture parses");
    State::build(file).expect("fixture builds")
}

/// Rate limits as the test says: `spent` services refuse; every consultation is noted.
#[derive(Default)]
struct Buckets {
    spent: Vec<&'static str>,
    asked: RefCell<Vec<String>>,
}

impl RateLimits for Buckets {
    fn check(&self, service_key: &str, _principal: &str) -> ratelimit::Decision {
        self.asked.borrow_mut().push(service_key.to_string());
        if self.spent.contains(&service_key) {
            ratelimit::Decision::Limited {
                retry_after: Duration::from_millis(1500),
            }
        } else {
            ratelimit::Decision::Allowed
        }
    }
}

/// No key set was ever fetched.
struct NoKeys;

impl JwksSource for NoKeys {
    fn jwks(&self, uri: &str) -> Result<Arc<jsonwebtoken::jwk::JwkSet>, String> {
        Err(format!("{uri} not fetched"))
    }
}

/// No fault fires, first backend, every mirror fires.
const QUIET: Draws = Draws {
    fault_delay: 99.9,
    fault_abort: 99.9,
    backend: 0,
    mirror: 0,
};

fn caller(authority: &str) -> Caller {
    let identity: ambit_hbone::Identity = "spiffe://cluster.local/ns/client/sa/curl"
        .parse()
        .expect("identity");
    Caller {
        principal: identity.to_string(),
        namespace: identity.namespace().to_string(),
        identity,
        addr: "10.0.0.5:40000".parse().expect("addr"),
        authority: authority.parse().expect("authority"),
    }
}

fn run(
    state: &State,
    limits: &Buckets,
    authority: &str,
    request: &str,
    headers: &[(&str, &str)],
    draws: Draws,
) -> Decision {
    run_at(
        state,
        limits,
        authority,
        request,
        headers,
        draws,
        1_800_000_000,
    )
}

fn run_at(
    state: &State,
    limits: &Buckets,
    authority: &str,
    request: &str,
    headers: &[(&str, &str)],
    draws: Draws,
    now: u64,
) -> Decision {
    let (method, uri) = request.split_once(' ').expect("METHOD /path");
    let method: Method = method.parse().expect("method");
    let uri: Uri = uri.parse().expect("uri");
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let head = RequestHead {
        method: &method,
        uri: &uri,
        host: "web.demo.svc.cluster.local:80",
        headers: &h,
    };
    decide(
        state,
        "demo/waypoint",
        &caller(authority),
        &head,
        draws,
        limits,
        AuthnInput { keys: &NoKeys, now },
    )
}

/// A decision in one line: what a row expects.
fn summary(d: &Decision) -> String {
    let mut out = format!("dst={}", d.destination);
    if let Some(rule) = &d.rule {
        out += &format!(" route={}", rule.route);
    }
    if !d.audited.is_empty() {
        out += &format!(" audit={}", d.audited.join(","));
    }
    if let Some(delay) = d.delay {
        out += &format!(" delay={delay:?}");
    }
    let addrs = |ups: &[Upstream]| {
        ups.iter()
            .map(Upstream::describe)
            .collect::<Vec<_>>()
            .join(",")
    };
    match &d.action {
        Action::Refuse(r) => {
            out += &format!(
                " | {} {} {}",
                r.status().as_u16(),
                r.flag(),
                r.body().trim()
            )
        }
        Action::Redirect { status, location } => {
            out += &format!(" | redirect {} {location}", status.as_u16())
        }
        Action::Forward(f) => {
            out += &format!(" | forward {} [{}]", f.service, addrs(&f.endpoints));
            if let Some(i) = f.backend {
                out += &format!(" backend={i}");
            }
            if let Some(pq) = &f.rewrite.path_and_query {
                out += &format!(" path={pq}");
            }
            if let Some(h) = &f.rewrite.host {
                out += &format!(" host={}", h.to_str().unwrap_or("?"));
            }
            if f.request_timeout.is_some() || f.try_timeout.is_some() {
                out += &format!(" timeouts={:?}/{:?}", f.request_timeout, f.try_timeout);
            }
            if let Some(r) = d.retry() {
                out += &format!(" retry={}x{:?}", r.attempts, r.codes);
            }
            if f.buffer_body {
                out += " buffer";
            }
            if !f.mirrors.is_empty() {
                out += &format!(" mirror=[{}]", addrs(&f.mirrors));
            }
        }
    }
    out
}

/// Name, authority, `METHOD /path`, headers, draws, the decision's summary.
type Row<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Draws,
    String,
);

#[test]
fn decisions() {
    let state = state();
    let limits = Buckets {
        spent: vec!["demo/limited.demo.svc.cluster.local"],
        ..Buckets::default()
    };
    let draw = |fault_delay: f64, fault_abort: f64, backend: u64, mirror: u64| Draws {
        fault_delay,
        fault_abort,
        backend,
        mirror,
    };
    let web = "demo/web.demo.svc.cluster.local";
    let canary = "demo/canary.demo.svc.cluster.local";
    #[rustfmt::skip]
    let cases: Vec<Row> = vec![
        ("unknown destination", "10.9.9.9:80", "GET /", vec![], QUIET,
            "dst= | 503 NR no service or workload known at 10.9.9.9:80".into()),
        ("pod address, no service: straight to it", "10.0.3.1:8080", "GET /", vec![], QUIET,
            "dst=10.0.3.1:8080 | forward  [10.0.3.1:8080]".into()),
        ("pod address of a service: its policies, no routing", "10.0.1.2:8080", "GET /admin/x", vec![], QUIET,
            "dst=web.demo.svc.cluster.local | 403 RBAC RBAC: access denied by demo/no-admin".into()),
        ("pod address of a service, allowed", "10.0.1.2:8080", "GET /other", vec![], QUIET,
            format!("dst=web.demo.svc.cluster.local | forward {web} [10.0.1.2:8080]")),
        ("service without routes: endpoint port override", "10.96.0.12:80", "GET /", vec![], QUIET,
            "dst=plain.demo.svc.cluster.local | forward demo/plain.demo.svc.cluster.local [10.0.2.1:9999]".into()),
        ("service without endpoints: forwarded, the attempt says 503 UH", "10.96.0.16:80", "GET /", vec![], QUIET,
            "dst=empty.demo.svc.cluster.local | forward demo/empty.demo.svc.cluster.local []".into()),
        ("policy deny", "10.96.0.10:80", "GET /admin/users", vec![], QUIET,
            "dst=web.demo.svc.cluster.local | 403 RBAC RBAC: access denied by demo/no-admin".into()),
        ("rate limited", "10.96.0.13:80", "GET /", vec![], QUIET,
            "dst=limited.demo.svc.cluster.local | 429 RL local rate limit exceeded".into()),
        ("fault delay and abort", "10.96.0.14:80", "GET /", vec![], draw(10.0, 29.9, 0, 0),
            "dst=faulty.demo.svc.cluster.local delay=5s | 418 FI fault filter abort".into()),
        ("fault abort alone", "10.96.0.14:80", "GET /", vec![], draw(50.0, 0.0, 0, 0),
            "dst=faulty.demo.svc.cluster.local | 418 FI fault filter abort".into()),
        ("fault delay alone", "10.96.0.14:80", "GET /", vec![], draw(49.9, 30.0, 0, 0),
            "dst=faulty.demo.svc.cluster.local delay=5s | forward demo/faulty.demo.svc.cluster.local [10.0.1.2:8080]".into()),
        ("no fault drawn", "10.96.0.14:80", "GET /", vec![], draw(50.0, 30.0, 0, 0),
            "dst=faulty.demo.svc.cluster.local | forward demo/faulty.demo.svc.cluster.local [10.0.1.2:8080]".into()),
        ("no route", "10.96.0.10:80", "GET /other", vec![], QUIET,
            "dst=web.demo.svc.cluster.local | 404 NR no route of web.demo.svc.cluster.local matches GET /other".into()),
        ("exact path: timeouts, retry, buffered body, audit", "10.96.0.10:80", "POST /login", vec![], QUIET,
            format!("dst=web.demo.svc.cluster.local route=demo/web audit=demo/watch-login | forward {web} [10.0.1.1:8080,10.0.1.2:8080] timeouts=Some(2s)/Some(500ms) retry=2x[503] buffer")),
        ("weighted pick, first of 90", "10.96.0.10:80", "GET /split", vec![], draw(99.9, 99.9, 0, 0),
            format!("dst=web.demo.svc.cluster.local route=demo/web | forward {web} [10.0.1.1:8080,10.0.1.2:8080] backend=0")),
        ("weighted pick, last of 90", "10.96.0.10:80", "GET /split", vec![], draw(99.9, 99.9, 89, 0),
            format!("dst=web.demo.svc.cluster.local route=demo/web | forward {web} [10.0.1.1:8080,10.0.1.2:8080] backend=0")),
        ("weighted pick, first of 10", "10.96.0.10:80", "GET /split", vec![], draw(99.9, 99.9, 90, 0),
            format!("dst=canary.demo.svc.cluster.local route=demo/web | forward {canary} [10.0.2.1:8081] backend=1")),
        ("weighted pick, draw past the total wraps", "10.96.0.10:80", "GET /split", vec![], draw(99.9, 99.9, 199, 0),
            format!("dst=canary.demo.svc.cluster.local route=demo/web | forward {canary} [10.0.2.1:8081] backend=1")),
        ("redirect", "10.96.0.10:80", "GET /old/page?q=1", vec![], QUIET,
            "dst=web.demo.svc.cluster.local route=demo/web | redirect 301 https://web.demo.svc.cluster.local/old/page?q=1".into()),
        ("header match wins over the plain prefix", "10.96.0.10:80", "GET /api/users", vec![("x-canary", "1")], QUIET,
            format!("dst=canary.demo.svc.cluster.local route=demo/web | forward {canary} [10.0.2.1:8081] backend=0")),
        ("header value differs: rewrite path and host", "10.96.0.10:80", "GET /api/users?page=2", vec![("x-canary", "2")], QUIET,
            format!("dst=web.demo.svc.cluster.local route=demo/web | forward {web} [10.0.1.1:8080,10.0.1.2:8080] backend=0 path=/v2/users?page=2 host=api.internal")),
        ("all backend weights zero", "10.96.0.10:80", "GET /zero", vec![], QUIET,
            "dst=web.demo.svc.cluster.local route=demo/web | 500 NR route has no backend with weight".into()),
        ("unknown backend", "10.96.0.10:80", "GET /ghost", vec![], QUIET,
            "dst=web.demo.svc.cluster.local route=demo/web | 500 NR route backend demo/nowhere is not a known service".into()),
        ("mirror drawn (an unknown mirror service is skipped)", "10.96.0.10:80", "PUT /mirror", vec![], draw(99.9, 99.9, 0, 49),
            format!("dst=web.demo.svc.cluster.local route=demo/web | forward {web} [10.0.1.1:8080,10.0.1.2:8080] buffer mirror=[10.0.4.1:9090]")),
        ("external VIP: its host, resolved when dialled, TLS originated", "240.240.0.7:80", "GET /charge", vec![], QUIET,
            "dst=pay.example.com | forward demo/pay [pay.example.com:443]".into()),
        ("external VIP: the waypoint's policies apply", "240.240.0.7:80", "GET /admin/x", vec![], QUIET,
            "dst=pay.example.com | 403 RBAC RBAC: access denied by demo/no-admin".into()),
        ("external VIP, undeclared port: unknown", "240.240.0.7:81", "GET /", vec![], QUIET,
            "dst= | 503 NR no service or workload known at 240.240.0.7:81".into()),
        ("external address: the address dialled, no routing", "192.0.2.9:8080", "GET /", vec![], QUIET,
            "dst=legacy.example.com | forward demo/legacy [192.0.2.9:8080]".into()),
        ("external address: a policy bound to the ExternalService", "192.0.2.9:8080", "POST /", vec![], QUIET,
            "dst=legacy.example.com | 403 RBAC RBAC: access denied by demo/legacy-writes".into()),
        ("external VIP of a NONE service leads nowhere: the attempt says 503 UH", "240.240.0.8:80", "GET /", vec![], QUIET,
            "dst=nowhere.example.com | forward demo/none-vip []".into()),
        ("mirror not drawn: the body is buffered all the same", "10.96.0.10:80", "PUT /mirror", vec![], draw(99.9, 99.9, 0, 50),
            format!("dst=web.demo.svc.cluster.local route=demo/web | forward {web} [10.0.1.1:8080,10.0.1.2:8080] buffer")),
    ];
    for (name, authority, request, headers, draws, want) in cases {
        let d = run(&state, &limits, authority, request, &headers, draws);
        assert_eq!(summary(&d), want, "{name}");
    }
}

#[test]
fn each_step_refuses_before_the_next_runs() {
    let state = state();
    // Denied: the bucket is not touched, so denied callers cannot spend others' tokens.
    let limits = Buckets::default();
    let d = run(&state, &limits, "10.96.0.13:80", "GET /admin/x", &[], QUIET);
    assert!(matches!(d.action, Action::Refuse(Refusal::Denied { .. })));
    assert!(limits.asked.borrow().is_empty());
    // Services without a rate limit are not asked either.
    let d = run(&state, &limits, "10.96.0.10:80", "GET /login", &[], QUIET);
    assert!(matches!(d.action, Action::Forward(_)));
    assert!(limits.asked.borrow().is_empty());
    let d = run(&state, &limits, "10.96.0.13:80", "GET /", &[], QUIET);
    assert!(matches!(d.action, Action::Forward(_)));
    assert_eq!(
        *limits.asked.borrow(),
        vec!["demo/limited.demo.svc.cluster.local".to_string()]
    );
    // A fault abort comes before routing: no rule is reported.
    let d = run(
        &state,
        &limits,
        "10.96.0.14:80",
        "GET /",
        &[],
        Draws {
            fault_abort: 0.0,
            ..QUIET
        },
    );
    assert!(d.rule.is_none());
}

#[test]
fn filters_are_the_rules_then_the_backends() {
    let state = state();
    let limits = Buckets::default();
    let d = run(&state, &limits, "10.96.0.10:80", "GET /api/x", &[], QUIET);
    let types: Vec<&str> = d.filters().map(|f| f.type_.as_str()).collect();
    assert_eq!(types, vec!["URLRewrite"]);
    let d = run(&state, &limits, "10.96.0.10:80", "GET /old", &[], QUIET);
    assert!(matches!(d.action, Action::Redirect { .. }));
}

#[test]
fn matched_rules_and_endpoint_lists_are_shared_with_the_state() {
    let state = state();
    let limits = Buckets::default();
    let a = run(&state, &limits, "10.96.0.10:80", "GET /login", &[], QUIET);
    let b = run(&state, &limits, "10.96.0.10:80", "GET /login", &[], QUIET);
    let (Some(ra), Some(rb)) = (&a.rule, &b.rule) else {
        panic!("both match a rule");
    };
    assert!(Arc::ptr_eq(ra, rb), "the rule is the state's, not a copy");
    let (Action::Forward(fa), Action::Forward(fb)) = (&a.action, &b.action) else {
        panic!("both forward");
    };
    assert!(
        Arc::ptr_eq(&fa.endpoints, &fb.endpoints),
        "the endpoint list is built with the state, not per request"
    );
}

#[test]
fn mirror_draws_are_one_digit_each() {
    let d = Draws {
        mirror: 12_34_56,
        ..QUIET
    };
    assert_eq!(
        (0..4).map(|i| d.mirror(i)).collect::<Vec<_>>(),
        vec![56, 34, 12, 0]
    );
    assert_eq!(d.mirror(9), 56);
}

#[test]
fn opaque_tcp_is_decided_on_l4_with_http_rules_failing_closed() {
    let state = state();
    let mut trace = ambit_policy::Trace::default();
    let d = decide_tcp(&state, "demo/waypoint", &caller("10.9.9.9:80"), &mut trace);
    assert!(matches!(d, TcpDecision::UnknownDestination), "{d:?}");
    assert!(!trace.evaluated, "policy runs only for a known destination");
    // demo/no-admin denies paths; without HTTP its rule matches on what is known.
    let d = decide_tcp(
        &state,
        "demo/waypoint",
        &caller("10.96.0.10:80"),
        &mut trace,
    );
    match d {
        TcpDecision::Denied { by } => assert_eq!(by, "demo/no-admin"),
        other => panic!("{other:?}"),
    }
    let rule = trace.deciding_rule().expect("a rule decided");
    assert_eq!(rule.checks[0].field, "to[0].operation.methods/paths/hosts");
    assert_eq!(rule.checks[0].seen, "unknown (no HTTP)");
    // Through a waypoint no policy is bound to: the service's ready endpoints.
    let d = decide_tcp(
        &state,
        "other/none",
        &caller("10.96.0.10:80"),
        &mut ambit_policy::Unobserved,
    );
    match d {
        TcpDecision::Forward { upstreams } => {
            let addrs: Vec<String> = upstreams.iter().map(|u| u.addr.to_string()).collect();
            assert_eq!(addrs, ["10.0.1.1:8080", "10.0.1.2:8080"]);
        }
        other => panic!("{other:?}"),
    }
}

/// `canary` requires a token of `https://idp.example` (inline keys, a principal required by
/// policy, `admin` in `groups` for `/admin`); `plain` reads its keys from a URL never fetched.
fn state_with_authn(key: &crate::authn::mint::SigningKey) -> State {
    let mut file: StateFile = serde_yaml::from_str(FIXTURE).expect("fixture parses");
    let set = crate::authn::mint::jwks(&[key]);
    file.request_authentications = serde_yaml::from_str(&format!(
        r#"
- name: idp
  namespace: demo
  targetService: demo/canary.demo.svc.cluster.local
  spec: {{jwtRules: [{{issuer: "https://idp.example", jwks: '{set}'}}]}}
- name: remote
  namespace: demo
  targetService: demo/plain.demo.svc.cluster.local
  spec: {{jwtRules: [{{issuer: "https://idp.example", jwksUri: "https://idp.example/keys"}}]}}
"#
    ))
    .expect("request authentications");
    let policies: Vec<crate::policy::Policy> = serde_yaml::from_str(
        r#"
- name: need-jwt
  namespace: demo
  targetService: demo/canary.demo.svc.cluster.local
  rules:
    - from: [{requestPrincipals: ["https://idp.example/*"]}]
      to: [{notPaths: ["/ops/*"]}]
    - to: [{paths: ["/ops/*"]}]
      when: [{key: "request.auth.claims[groups]", values: [admin]}]
"#,
    )
    .expect("policies");
    file.policies.extend(policies);
    State::build(file).expect("state builds")
}

/// Name, authority, `METHOD /path`, headers, the decision's summary.
type AuthnRow<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, String);

#[test]
fn authentication_comes_before_authorization() {
    let key = crate::authn::mint::SigningKey::es256("k").expect("key");
    let stranger = crate::authn::mint::SigningKey::es256("k").expect("key");
    let state = state_with_authn(&key);
    let limits = Buckets::default();
    let now = 1_800_000_000u64;
    let token = |k: &crate::authn::mint::SigningKey, extra: serde_json::Value| {
        let mut c =
            serde_json::json!({"iss": "https://idp.example", "sub": "alice", "exp": now + 60});
        for (n, v) in extra.as_object().into_iter().flatten() {
            c[n] = v.clone();
        }
        format!("Bearer {}", k.token(&c).expect("token"))
    };
    let good = token(&key, serde_json::json!({}));
    let admin = token(&key, serde_json::json!({"groups": ["admin"]}));
    let expired = token(&key, serde_json::json!({"exp": now - 120}));
    let forged = token(&stranger, serde_json::json!({}));
    let canary = "demo/canary.demo.svc.cluster.local";
    #[rustfmt::skip]
    let cases: Vec<AuthnRow> = vec![
        ("a valid token meets requestPrincipals", "10.96.0.11:80", "GET /", vec![("authorization", &good)],
            format!("dst=canary.demo.svc.cluster.local | forward {canary} [10.0.2.1:8081] token=https://idp.example/alice")),
        ("no token: no principal, the ALLOW does not match", "10.96.0.11:80", "GET /", vec![],
            "dst=canary.demo.svc.cluster.local | 403 RBAC RBAC: access denied by no ALLOW policy matched (demo/need-jwt)".into()),
        ("expired: 401 before policy", "10.96.0.11:80", "GET /", vec![("authorization", &expired)],
            "dst=canary.demo.svc.cluster.local | 401 - JWT rejected: token expired at 1799999880 (now 1800000000, leeway 60s)".into()),
        ("wrongly signed", "10.96.0.11:80", "GET /", vec![("authorization", &forged)],
            "dst=canary.demo.svc.cluster.local | 401 - JWT rejected: signature does not verify with any key of issuer \"https://idp.example\" (kid \"k\")".into()),
        ("claims condition not met", "10.96.0.11:80", "GET /ops/x", vec![("authorization", &good)],
            "dst=canary.demo.svc.cluster.local | 403 RBAC RBAC: access denied by no ALLOW policy matched (demo/need-jwt) token=https://idp.example/alice".into()),
        ("claims condition met", "10.96.0.11:80", "GET /ops/x", vec![("authorization", &admin)],
            format!("dst=canary.demo.svc.cluster.local | forward {canary} [10.0.2.1:8081] token=https://idp.example/alice")),
        ("keys not fetched yet: refused, not accepted", "10.96.0.12:80", "GET /", vec![("authorization", &good)],
            "dst=plain.demo.svc.cluster.local | 401 - JWT rejected: no keys for issuer \"https://idp.example\" yet: https://idp.example/keys not fetched".into()),
        ("a service without RequestAuthentication ignores tokens", "10.96.0.13:80", "GET /", vec![("authorization", &forged)],
            "dst=limited.demo.svc.cluster.local | 429 RL local rate limit exceeded".into()),
    ];
    let limits_spent = Buckets {
        spent: vec!["demo/limited.demo.svc.cluster.local"],
        ..Buckets::default()
    };
    for (name, authority, request, headers, want) in cases {
        let l = if authority == "10.96.0.13:80" {
            &limits_spent
        } else {
            &limits
        };
        let d = run_at(&state, l, authority, request, &headers, QUIET, now);
        let mut got = summary(&d);
        if let Some(a) = &d.authn {
            got += &format!(" token={}", a.auth.principal);
        }
        assert_eq!(got, want, "{name}");
    }
}
