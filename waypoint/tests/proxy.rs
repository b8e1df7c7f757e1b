//! End-to-end through the waypoint on loopback: client → HBONE → waypoint → HBONE →
//! destination ztunnel stand-in → HTTP backend. Asserts on what callers see.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use ambit_waypoint::server::Limits;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn http1_and_http2_pass_through_with_caller_identity() {
    let mesh = start(&PODS, &state_yaml(""), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let (status, _, body) = get(
        &mut c,
        "/hello?x=1",
        &[("x-ambit-peer-identity", "spiffe://forged")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("identity=spiffe://cluster.local/ns/client/sa/curl"),
        "{body}"
    );
    assert!(body.contains("forwarded=for=127.0.0.1"), "{body}");
    assert!(body.contains("path=/hello?x=1"), "{body}");
    assert!(body.contains("version=HTTP/1.1"), "{body}");
    let tp = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent="))
        .unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    // An incoming trace is continued with a new span id.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, _, body) = get(&mut c, "/", &[("traceparent", parent)]).await;
    let tp = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent="))
        .unwrap();
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{tp}"
    );
    assert!(!tp.contains("b7ad6b7169203331"), "{tp}");

    let mut h2 = mesh.h2(WEB).await;
    let req = http::Request::builder()
        .uri("http://web.demo.svc.cluster.local/two")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(body.contains("version=HTTP/2.0"), "{body}");
    assert!(
        body.contains("identity=spiffe://cluster.local/ns/client/sa/curl"),
        "{body}"
    );
}

#[tokio::test]
async fn l7_deny_by_path_and_method_names_the_policy() {
    let extra = r#"
policies:
  - name: no-admin
    namespace: demo
    action: DENY
    targetGateway: demo/waypoint
    rules: [{to: [{paths: ["/admin/*"]}]}]
  - name: read-only
    namespace: demo
    action: ALLOW
    targetService: demo/web.demo.svc.cluster.local
    rules: [{from: [{namespaces: [client]}], to: [{methods: [GET]}]}]
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let (status, _, body) = get(&mut c, "/admin/users", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(body, "RBAC: access denied by demo/no-admin\n");
    let (status, _, body) = send(&mut c, "DELETE", "/items/1", &[]).await;
    assert_eq!(status, 403);
    assert!(body.contains("demo/read-only"), "{body}");
    let (status, _, _) = get(&mut c, "/items/1", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        mesh.backends["web-a"].hits.load(Ordering::SeqCst)
            + mesh.backends["web-b"].hits.load(Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn weighted_split_90_10() {
    let extra = r#"
routes:
  - name: split
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/web.demo.svc.cluster.local]
    spec:
      rules:
        - backendRefs:
            - {name: web, port: 80, weight: 90}
            - {name: canary, port: 80, weight: 10}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let mut canary = 0;
    for _ in 0..1000 {
        let (status, _, body) = get(&mut c, "/", &[]).await;
        assert_eq!(status, 200);
        if body.contains("backend=canary-a") {
            canary += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, σ ≈ 9.5; ±4σ.
    assert!((62..=138).contains(&canary), "canary got {canary} of 1000");
    // Round robin over web's two pods.
    let a = mesh.backends["web-a"].hits.load(Ordering::SeqCst);
    let b = mesh.backends["web-b"].hits.load(Ordering::SeqCst);
    assert!(a.abs_diff(b) <= 1, "{a} vs {b}");
}

#[tokio::test]
async fn routes_match_filter_redirect_and_404() {
    let extra = r#"
routes:
  - name: rules
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/web.demo.svc.cluster.local]
    spec:
      rules:
        - matches: [{path: {type: PathPrefix, value: /canary}}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-added, value: yes}]}
            - type: ResponseHeaderModifier
              responseHeaderModifier: {add: [{name: x-served-by, value: waypoint}]}
            - type: URLRewrite
              urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
          backendRefs: [{name: canary, port: 80}]
        - matches: [{path: {type: Exact, value: /old}}]
          filters:
            - type: RequestRedirect
              requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
        - matches: [{path: {type: PathPrefix, value: /app}, headers: [{name: x-user, value: bob}]}]
          backendRefs: [{name: web, port: 80}]
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let (status, headers, body) = get(&mut c, "/canary/a?q=1", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("backend=canary-a"), "{body}");
    assert!(body.contains("path=/v2/a?q=1"), "{body}");
    assert!(body.contains("x-added=yes"), "{body}");
    assert_eq!(headers["x-served-by"], "waypoint");
    let (status, headers, _) = get(&mut c, "/old", &[]).await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "http://web.demo.svc.cluster.local/new");
    let (status, _, _) = get(&mut c, "/app/x", &[("x-user", "bob")]).await;
    assert_eq!(status, 200);
    let (status, _, body) = get(&mut c, "/app/x", &[]).await;
    assert_eq!(status, 404);
    assert!(
        body.contains("no route of web.demo.svc.cluster.local matches GET /app/x"),
        "{body}"
    );
}

#[tokio::test]
async fn retries_turn_flaky_503s_into_200s() {
    let extra = r#"
routes:
  - name: retry
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/canary.demo.svc.cluster.local]
    spec:
      rules:
        - backendRefs: [{name: canary, port: 80}]
          retry: {codes: [503], attempts: 3, backoff: 1ms}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let flaky = &mesh.backends["canary-a"];
    flaky.fail_first.store(2, Ordering::SeqCst);
    let mut c = mesh.h1("10.96.0.11:80").await;
    let (status, _, body) = get(&mut c, "/", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(flaky.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn retry_budget_stops_a_storm() {
    let extra = r#"
routes:
  - name: retry
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/canary.demo.svc.cluster.local]
    spec:
      rules:
        - backendRefs: [{name: canary, port: 80}]
          retry: {codes: [503], attempts: 5, backoff: 200ms}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let down = mesh.backends["canary-a"].clone();
    down.always.store(503, Ordering::SeqCst);
    // 20 concurrent requests to a dead service: without a budget 20 × 6 = 120 hits; the
    // budget allows max(3, 20% of 20 = 4) retries in flight at once.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = mesh.h1("10.96.0.11:80").await;
        tasks.push(tokio::spawn(async move { get(&mut c, "/", &[]).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 503);
    }
    let hits = down.hits.load(Ordering::SeqCst);
    assert!(hits >= 20, "{hits}");
    assert!(
        hits < 60,
        "retry storm: {hits} backend hits for 20 requests"
    );
}

#[tokio::test]
async fn route_timeout_is_504() {
    let extra = r#"
routes:
  - name: slow
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/canary.demo.svc.cluster.local]
    spec:
      rules:
        - backendRefs: [{name: canary, port: 80}]
          timeouts: {request: 100ms}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    mesh.backends["canary-a"]
        .delay_ms
        .store(2_000, Ordering::SeqCst);
    let mut c = mesh.h1("10.96.0.11:80").await;
    let (status, _, body) = get(&mut c, "/", &[]).await;
    assert_eq!(status, 504);
    assert_eq!(body, "upstream request timeout\n");
}

#[tokio::test]
async fn fault_abort_share_and_rate_limit() {
    let extra = r#"
trafficPolicies:
  - name: faults
    namespace: demo
    targetService: demo/web.demo.svc.cluster.local
    spec:
      faultInjection: {abort: {httpStatus: 418, percentage: 30}}
  - name: limit
    namespace: demo
    targetService: demo/canary.demo.svc.cluster.local
    spec:
      rateLimit: {tokensPerFill: 1, fillInterval: 60s, maxTokens: 5}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let mut aborted = 0;
    for _ in 0..400 {
        let (status, _, _) = get(&mut c, "/", &[]).await;
        if status == 418 {
            aborted += 1;
        } else {
            assert_eq!(status, 200);
        }
    }
    // Binomial(400, 0.3): mean 120, σ ≈ 9.2; ±4σ.
    assert!((83..=157).contains(&aborted), "{aborted} of 400 aborted");

    let mut c = mesh.h1("10.96.0.11:80").await;
    for _ in 0..5 {
        assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    }
    let (status, headers, body) = get(&mut c, "/", &[]).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

#[tokio::test]
async fn outlier_is_ejected_and_comes_back() {
    let extra = r#"
trafficPolicies:
  - name: outlier
    namespace: demo
    targetService: demo/web.demo.svc.cluster.local
    spec:
      outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 300ms, maxEjectionPercent: 50}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let bad = mesh.backends["web-b"].clone();
    bad.always.store(500, Ordering::SeqCst);
    let mut c = mesh.h1(WEB).await;
    for _ in 0..6 {
        get(&mut c, "/", &[]).await;
    }
    // web-b failed twice and is out: the next requests all reach web-a.
    let before = bad.hits.load(Ordering::SeqCst);
    assert_eq!(before, 2);
    for _ in 0..10 {
        assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), before);
    // After the ejection time it gets traffic again.
    bad.always.store(0, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    for _ in 0..4 {
        assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    }
    assert!(bad.hits.load(Ordering::SeqCst) > before);
}

#[tokio::test]
async fn metrics_have_istio_labels() {
    let extra = r#"
policies:
  - name: no-admin
    namespace: demo
    action: DENY
    targetGateway: demo/waypoint
    rules: [{to: [{paths: ["/admin"]}]}]
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    for _ in 0..3 {
        assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    }
    assert_eq!(get(&mut c, "/admin", &[]).await.0, 403);
    let text = mesh.metrics();
    let ok_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .collect();
    let total: u64 = ok_lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 3, "{text}");
    let l = ok_lines[0];
    for label in [
        "reporter=\"waypoint\"",
        "source_principal=\"spiffe://cluster.local/ns/client/sa/curl\"",
        "source_workload_namespace=\"client\"",
        "destination_service=\"web.demo.svc.cluster.local\"",
        "destination_workload_namespace=\"demo\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
    ] {
        assert!(l.contains(label), "{label} missing in {l}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"403\"")
            && l.contains("response_flags=\"RBAC\"")),
        "{text}"
    );
    assert!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("istio_response_bytes_sum{"), "{text}");
}

#[tokio::test]
async fn bad_input_gets_4xx_and_slow_loris_is_cut() {
    let limits = Limits {
        max_header_bytes: 8 * 1024,
        header_read_timeout: std::time::Duration::from_millis(300),
        ..Limits::default()
    };
    let mesh = start(&PODS, &state_yaml(""), limits).await;
    // Oversized headers.
    let mut t = mesh.tunnel(WEB).await;
    let big = "a".repeat(20 * 1024);
    t.write_all(format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = t.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // Malformed request line.
    let mut t = mesh.tunnel(WEB).await;
    t.write_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = t.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Slow loris: a partial head, then silence; the waypoint closes the stream.
    let mut t = mesh.tunnel(WEB).await;
    t.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), t.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "slow client still connected after 10 s");
    // An unknown destination gets a clear 503.
    let mut c = mesh.h1("10.96.9.9:80").await;
    let (status, _, body) = get(&mut c, "/", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body, "no service or workload known at 10.96.9.9:80\n");
    // HTTP/2 with an oversized header block: refused (by our SETTINGS or a 431), not served.
    let mut h2 = mesh.h2(WEB).await;
    let req = http::Request::builder()
        .uri("http://web.demo.svc.cluster.local/")
        .header("x-big", "b".repeat(100 * 1024))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match h2.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => eprintln!("oversized HTTP/2 headers refused: {e}"),
    }
    // And the waypoint still serves, over both versions.
    let mut c = mesh.h1(WEB).await;
    assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    let mut h2 = mesh.h2(WEB).await;
    let req = http::Request::builder()
        .uri("http://web.demo.svc.cluster.local/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn circuit_breaker_overflow_is_503_uo() {
    let extra = r#"
trafficPolicies:
  - name: cb
    namespace: demo
    targetService: demo/canary.demo.svc.cluster.local
    spec:
      connectionPool: {maxConnections: 1, maxPendingRequests: 0}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    mesh.backends["canary-a"]
        .delay_ms
        .store(500, Ordering::SeqCst);
    let mut slow = mesh.h1("10.96.0.11:80").await;
    let first = tokio::spawn(async move { get(&mut slow, "/", &[]).await.0 });
    // Wait until the first request holds the only slot.
    while mesh.backends["canary-a"].hits.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut c = mesh.h1("10.96.0.11:80").await;
    let (status, _, body) = get(&mut c, "/", &[]).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("upstream overflow"), "{body}");
    assert_eq!(first.await.unwrap(), 200);
    assert!(mesh
        .metrics()
        .lines()
        .any(|l| l.contains("response_flags=\"UO\"") && l.starts_with("istio_requests_total{")));
}

#[tokio::test]
async fn consistent_hash_is_sticky() {
    let extra = r#"
trafficPolicies:
  - name: lb
    namespace: demo
    targetService: demo/web.demo.svc.cluster.local
    spec:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let mut seen = std::collections::HashMap::new();
    // The pods share an ephemeral HBONE port, so which user lands where differs between runs:
    // with 40 users the chance that all land on one of two pods is 2^-39, small enough that
    // a failure means the hash ignores its key.
    for i in 0..40 {
        let user = format!("user-{i}");
        let (_, _, first) = get(&mut c, "/", &[("x-user", &user)]).await;
        let backend = first.lines().next().unwrap().to_string();
        for _ in 0..3 {
            let (_, _, again) = get(&mut c, "/", &[("x-user", &user)]).await;
            assert_eq!(again.lines().next().unwrap(), backend, "{user}");
        }
        seen.insert(backend, ());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn fault_delay_share_shows_in_metrics() {
    let extra = r#"
trafficPolicies:
  - name: delay
    namespace: demo
    targetService: demo/web.demo.svc.cluster.local
    spec:
      faultInjection: {delay: {fixedDelay: 1ms, percentage: 50}}
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    for _ in 0..400 {
        assert_eq!(get(&mut c, "/", &[]).await.0, 200);
    }
    let delayed: u64 = mesh
        .metrics()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"DI\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    // Binomial(400, 0.5): mean 200, σ = 10; ±4σ.
    assert!((160..=240).contains(&delayed), "{delayed} of 400 delayed");
}

#[tokio::test]
async fn mirror_copies_requests_to_another_service() {
    let extra = r#"
routes:
  - name: mirror
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/web.demo.svc.cluster.local]
    spec:
      rules:
        - filters:
            - type: RequestMirror
              requestMirror: {backendRef: {name: canary, port: 80}}
          backendRefs: [{name: web, port: 80}]
"#;
    let mesh = start(&PODS, &state_yaml(extra), Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    for _ in 0..10 {
        let (status, _, body) = get(&mut c, "/m", &[]).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("backend=web-"), "{body}");
    }
    // Fire and forget: the copies arrive shortly after.
    let canary = mesh.backends["canary-a"].clone();
    for _ in 0..200 {
        if canary.hits.load(Ordering::SeqCst) == 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(canary.hits.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn upstream_closing_connections_is_not_an_error() {
    let mesh = start(&PODS, &state_yaml(""), Limits::default()).await;
    for pod in ["web-a", "web-b"] {
        mesh.backends[pod]
            .no_keepalive
            .store(true, Ordering::SeqCst);
    }
    let mut c = mesh.h1(WEB).await;
    for i in 0..100 {
        let (status, _, body) = get(&mut c, "/", &[]).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
}

#[tokio::test]
async fn concurrent_http2_requests_share_one_upstream_connection() {
    let mesh = start(&PODS, &state_yaml(""), Limits::default()).await;
    let canary = mesh.backends["canary-a"].clone();
    canary.delay_ms.store(50, Ordering::SeqCst);
    let h2 = mesh.h2("10.96.0.11:80").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::builder()
                .uri(format!("http://canary.demo.svc.cluster.local/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            h2.send_request(req).await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(canary.hits.load(Ordering::SeqCst), 20);
    assert_eq!(canary.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    // web-b's endpoint points at a port nothing listens on: its ztunnel refuses the tunnel.
    let yaml = state_yaml(
        r#"
routes:
  - name: retry
    namespace: demo
    kind: HTTPRoute
    parentServices: [demo/web.demo.svc.cluster.local]
    spec:
      rules:
        - backendRefs: [{name: web, port: 80}]
          retry: {codes: [], attempts: 1, backoff: 1ms}
"#,
    )
    .replace(
        "{workloadUid: web-b}",
        "{workloadUid: web-b, ports: {80: 9}}",
    );
    let mesh = start(&PODS, &yaml, Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    for i in 0..20 {
        let (status, _, body) = get(&mut c, "/", &[]).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.starts_with("backend=web-a"), "{body}");
    }
    // Without a retry policy the refused tunnel is a clear 503.
    let mesh = start(
        &PODS,
        &state_yaml("").replace(
            "{workloadUid: web-b}",
            "{workloadUid: web-b, ports: {80: 9}}",
        ),
        Limits::default(),
    )
    .await;
    let mut c = mesh.h1(WEB).await;
    let mut failures = 0;
    for _ in 0..4 {
        let (status, _, body) = get(&mut c, "/", &[]).await;
        if status == 503 {
            assert!(body.contains("opening HBONE tunnel to"), "{body}");
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "round robin sends every other request to the broken endpoint"
    );
}
