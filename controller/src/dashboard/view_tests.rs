use super::*;
use crate::dashboard::prom::parse;

fn tcp(reporter: &str, flags: &str, mtls: &str, svc: &str, opened: u64, bytes: u64) -> String {
    let labels = format!(
        "reporter=\"{reporter}\",source_workload=\"client\",source_workload_namespace=\"demo\",\
         destination_workload=\"echo\",destination_workload_namespace=\"demo\",\
         destination_service=\"{svc}\",response_flags=\"{flags}\",connection_security_policy=\"{mtls}\""
    );
    format!(
        "istio_tcp_connections_opened_total{{{labels}}} {opened}\n\
         istio_tcp_sent_bytes_total{{{labels}}} {bytes}\n"
    )
}

fn scrape(at: f64, text: &str) -> Scrape {
    Scrape {
        at,
        samples: Arc::new(parse(text)),
    }
}

fn proxy(name: &str, scrapes: Vec<Scrape>) -> ProxyScrapes {
    ProxyScrapes {
        proxy: name.to_owned(),
        metrics_addr: Some(([10, 77, 0, 11], 15020).into()),
        scrapes: scrapes.into(),
        last_error: None,
    }
}

#[test]
fn tcp_edge_rates_come_from_the_destination_and_count_refusals_as_failures() {
    // The destination saw 10 connections in 5 s (2 of them denied), the source 12.
    let dst = proxy(
        "ztunnel node=node1",
        vec![
            scrape(
                100.0,
                &tcp("destination", "-", "mutual_tls", "unknown", 20, 1000),
            ),
            scrape(
                105.0,
                &(tcp("destination", "-", "mutual_tls", "unknown", 28, 1500)
                    + &tcp("destination", "RBAC", "mutual_tls", "unknown", 2, 0)),
            ),
        ],
    );
    let src = proxy(
        "ztunnel node=node2",
        vec![
            scrape(
                100.0,
                &tcp(
                    "source",
                    "-",
                    "mutual_tls",
                    "echo.demo.svc.cluster.local",
                    0,
                    0,
                ),
            ),
            scrape(
                105.0,
                &tcp(
                    "source",
                    "-",
                    "mutual_tls",
                    "echo.demo.svc.cluster.local",
                    12,
                    0,
                ),
            ),
        ],
    );
    let v = view(&[dst, src], &DenialLog::default(), 106.0);
    assert_eq!(v.edges.len(), 1, "{:?}", v.edges);
    let e = &v.edges[0];
    assert_eq!(
        (e.source.as_str(), e.destination.as_str()),
        ("demo/client", "demo/echo")
    );
    assert_eq!(e.reporter, "destination");
    // Only the source knew the service; the edge still names it.
    assert_eq!(e.services, ["echo.demo.svc.cluster.local"]);
    assert_eq!(e.rate, 2.0);
    assert_eq!(e.success_rate, Some(0.8));
    assert_eq!(e.bytes_per_second, 100.0);
    assert!(e.mtls && !e.plaintext);
    assert_eq!((e.p50_ms, e.p99_ms), (None, None));
    assert_eq!(v.workloads, ["demo/client", "demo/echo"]);
}

#[test]
fn a_counter_reset_counts_from_zero_and_one_scrape_gives_no_rate() {
    let restarted = proxy(
        "ztunnel node=node1",
        vec![
            scrape(0.0, &tcp("destination", "-", "none", "unknown", 50, 0)),
            scrape(10.0, &tcp("destination", "-", "none", "unknown", 5, 0)),
        ],
    );
    let v = view(&[restarted], &DenialLog::default(), 10.0);
    assert_eq!(v.edges[0].rate, 0.5);
    assert!(v.edges[0].plaintext && !v.edges[0].mtls);
    let once = proxy(
        "ztunnel node=node1",
        vec![scrape(
            0.0,
            &tcp("destination", "-", "none", "unknown", 5, 0),
        )],
    );
    assert!(view(&[once], &DenialLog::default(), 0.0).edges.is_empty());
}

#[test]
fn http_edges_have_success_rate_and_percentiles_from_buckets() {
    let labels =
        "reporter=\"waypoint\",source_workload=\"client\",source_workload_namespace=\"demo\",\
                  destination_workload=\"echo\",destination_workload_namespace=\"demo\",\
                  destination_service=\"echo.demo.svc.cluster.local\"";
    let at = |n200: u64, n503: u64, b10: u64, b100: u64| {
        format!(
            "istio_requests_total{{{labels},response_code=\"200\"}} {n200}\n\
             istio_requests_total{{{labels},response_code=\"503\"}} {n503}\n\
             istio_request_duration_milliseconds_bucket{{{labels},response_code=\"200\",le=\"10.0\"}} {b10}\n\
             istio_request_duration_milliseconds_bucket{{{labels},response_code=\"200\",le=\"100.0\"}} {b100}\n\
             istio_request_duration_milliseconds_bucket{{{labels},response_code=\"200\",le=\"+Inf\"}} {b100}\n"
        )
    };
    let wp = proxy(
        "waypoint gateway=demo/waypoint",
        vec![
            scrape(0.0, &at(0, 0, 0, 0)),
            scrape(10.0, &at(90, 10, 50, 90)),
        ],
    );
    let v = view(&[wp], &DenialLog::default(), 10.0);
    let e = &v.edges[0];
    assert_eq!(
        (e.protocol, e.rate, e.success_rate),
        ("http", 10.0, Some(0.9))
    );
    assert_eq!(e.services, ["echo.demo.svc.cluster.local"]);
    // 45th of 90 is in the first bucket (0..10], at 45/50 of it; the 89.1th in (10, 100].
    let p50 = e.p50_ms.expect("p50");
    assert!((p50 - 9.0).abs() < 1e-9, "{p50}");
    let p99 = e.p99_ms.expect("p99");
    assert!(
        (p99 - (10.0 + 90.0 * (89.1 - 50.0) / 40.0)).abs() < 1e-9,
        "{p99}"
    );
    assert!(e.mtls);
}

fn denials(policy: &str, n: u64) -> String {
    format!(
        "ambit_policy_denials_total{{source_workload=\"client\",source_workload_namespace=\"demo\",\
         destination_workload=\"echo\",destination_workload_namespace=\"demo\",policy=\"{policy}\"}} {n}\n"
    )
}

#[test]
fn denials_are_listed_by_policy_when_they_grow_and_forgotten_later() {
    let mut log = DenialLog::default();
    let (a, b, c) = (
        parse(&denials("demo/old", 7)),
        parse(&(denials("demo/old", 7) + &denials("demo/deny-client", 3))),
        parse(&(denials("demo/old", 7) + &denials("demo/deny-client", 5))),
    );
    log.update("ztunnel node=node1", &a, &b, 10.0);
    log.update("ztunnel node=node1", &b, &c, 12.0);
    let recent = log.recent();
    assert_eq!(
        recent.len(),
        1,
        "an unchanged count is not news: {recent:?}"
    );
    assert_eq!(recent[0].policy, "demo/deny-client");
    assert_eq!((recent[0].count, recent[0].last_seen), (5.0, 12.0));
    assert_eq!(recent[0].source, "demo/client");
    log.update("ztunnel node=node1", &c, &c, 12.0 + DenialLog::KEEP + 1.0);
    assert!(log.recent().is_empty());
}

#[test]
fn a_request_denied_before_an_endpoint_was_picked_names_the_service() {
    let line = |n: u64| {
        format!(
            "ambit_policy_denials_total{{source_workload=\"client-0\",source_workload_namespace=\"shop\",\
             destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",\
             destination_service=\"api.shop.svc.cluster.local\",policy=\"shop/no-delete\"}} {n}\n"
        )
    };
    let mut log = DenialLog::default();
    log.update(
        "waypoint gateway=shop/waypoint",
        &parse(&line(1)),
        &parse(&line(4)),
        5.0,
    );
    let d = &log.recent()[0];
    assert_eq!(
        (
            d.policy.as_str(),
            d.source.as_str(),
            d.destination.as_str(),
            d.count
        ),
        (
            "shop/no-delete",
            "shop/client-0",
            "api.shop.svc.cluster.local",
            3.0
        )
    );
}

#[test]
fn health_says_what_is_wrong() {
    let mut p = proxy(
        "ztunnel node=node1",
        vec![scrape(
            5.0,
            "ambit_xds_connection_state 1\n\
             ambit_certificates_expiry_seconds{identity=\"a\"} 2000\n\
             ambit_certificates_expiry_seconds{identity=\"b\"} 1000\n",
        )],
    );
    let h = health(&p);
    assert!(h.healthy, "{h:?}");
    assert_eq!(
        (h.cert_expiry, h.certificates, h.xds_connected),
        (Some(1000.0), 2, Some(true))
    );
    p.last_error = Some("connection refused".into());
    assert_eq!(health(&p).status, "scrape failed: connection refused");
    p.metrics_addr = None;
    assert!(!health(&p).healthy);
    let wp = proxy("waypoint gateway=demo/wp", vec![]);
    assert_eq!(
        (health(&wp).kind, health(&wp).status.as_str()),
        ("waypoint", "not scraped yet")
    );
}
