//! The Grafana dashboards in `manifests/grafana/` query only what the proxies really export.
//! Each component's own metrics registry is filled with one sample of every family (through
//! the same calls the proxies make) and encoded as its `/metrics` endpoint serves it; every
//! metric name in every PromQL expression of the dashboards (panels and template variables)
//! must be one of those, and every label it selects or groups by must be one of that metric's
//! labels. Renaming a metric or a label in a proxy breaks this test, not a dashboard in
//! production.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

/// Exported sample names and, for each, the label names its samples carry.
type Exported = BTreeMap<String, BTreeSet<String>>;

/// The sample names and labels of an OpenMetrics/Prometheus text exposition. Families without
/// samples still count, by the names their `# TYPE` implies.
fn exported(text: &str, into: &mut Exported) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            };
            for n in names {
                into.entry(n).or_default();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.rsplit_once('}').map_or("", |(l, _)| l)),
            None => (line.split_whitespace().next().unwrap_or_default(), ""),
        };
        let entry = into.entry(name.to_owned()).or_default();
        // Label values are quoted; names are what precedes `="`.
        for part in labels.split("\",") {
            if let Some((label, _)) = part.split_once("=\"") {
                entry.insert(label.trim().to_owned());
            }
        }
    }
}

/// What each proxy and the controller export, one sample of every family recorded. Runs
/// inside a runtime: the controller's model is a task.
fn all_exported() -> Exported {
    let mut out = Exported::new();

    // ztunnel.
    use ambit_ztunnel::metrics::{ConnectionLabels, Metrics, Reporter};
    let z = Metrics::new();
    let labels = ConnectionLabels::unknown(Reporter::Destination);
    let conn = z.connection_opened(&labels);
    conn.record_request_bytes(10);
    conn.record_response_bytes(20);
    drop(conn);
    z.connection_revoked(&labels);
    let identity =
        ambit_hbone::Identity::new("cluster.local", "demo", "echo").expect("an identity");
    z.set_certificate_expiry(&identity, SystemTime::now());
    z.set_xds_connected(true);
    z.connection_refused("connection_limit");
    z.handshake_failed("tls");
    z.dns_request(&"client".into(), &"demo".into(), "answered");
    exported(&z.encode().expect("ztunnel metrics encode"), &mut out);

    // The waypoint: a request recorded as its proxy records one, when the recorder drops.
    let mut registry = prometheus_client::registry::Registry::default();
    let w = ambit_waypoint::metrics::Metrics::new(&mut registry);
    drop(ambit_waypoint::metrics::Recorder::new(
        w,
        tokio::time::Instant::now(),
    ));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("waypoint encode");
    exported(&text, &mut out);

    // The controller's ops port.
    use ambit_controller::model::{ModelBuilder, ModelConfig};
    let ca = ambit_controller::ca::service::CaMetrics::default();
    ca.signed.inc();
    ca.refused
        .get_or_create(&ambit_controller::ca::service::RefusedLabels {
            reason: "invalid_csr",
        })
        .inc();
    let ops = ambit_controller::ops::Ops::new(
        ambit_controller::discovery::Registry::default(),
        &ca,
        ambit_controller::ops::Readiness::new(ModelBuilder::new(ModelConfig::default()).spawn()),
    );
    exported(&ops.encode(), &mut out);
    out
}

/// Labels Prometheus adds to every scraped series itself (the target's): dashboards may group
/// by them although no proxy exports them.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// PromQL words that are neither metrics nor functions called with parentheses right after.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];

/// What one PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    /// Each metric selector: its name and the label names it matches on.
    selectors: Vec<(String, Vec<String>)>,
    /// Label names of `by`/`without`/`on`/`ignoring`/`group_*` clauses.
    grouping: Vec<String>,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// Reads the metric names and label names out of a PromQL expression: string literals, range
/// and subquery brackets, numbers, durations and Grafana variables are skipped; an identifier
/// followed by `(` is a function, one in [`KEYWORDS`] an operator.
fn promql_refs(expr: &str) -> Refs {
    let b = expr.as_bytes();
    let mut refs = Refs::default();
    let mut i = 0;
    let ident = |i: &mut usize| -> String {
        let start = *i;
        while *i < b.len() && is_ident(b[*i]) {
            *i += 1;
        }
        expr[start..*i].to_owned()
    };
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let skip_quoted = |i: &mut usize| {
        let q = b[*i];
        *i += 1;
        while *i < b.len() && b[*i] != q {
            if b[*i] == b'\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    // Whether the last token was a metric name, so a `{` that follows selects on it.
    let mut after_metric = false;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            skip_quoted(&mut i);
            after_metric = false;
        } else if c == b'[' {
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            i += 1;
        } else if c == b'{' {
            i += 1;
            let mut labels = Vec::new();
            loop {
                while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    i += 1;
                    break;
                }
                labels.push(ident(&mut i));
                while i < b.len() && matches!(b[i], b'=' | b'!' | b'~' | b' ') {
                    i += 1;
                }
                if i < b.len() && matches!(b[i], b'"' | b'\'' | b'`') {
                    skip_quoted(&mut i);
                } else {
                    // Not a selector we understand: make the test say so.
                    labels.push(format!("<unparsed at byte {i}>"));
                    i += 1;
                }
            }
            match (after_metric, refs.selectors.last_mut()) {
                (true, Some((_, sel))) => sel.extend(labels),
                _ => refs
                    .selectors
                    .push(("<selector without a name>".into(), labels)),
            }
            after_metric = false;
        } else if c == b'$' {
            i += 1;
            if i < b.len() && b[i] == b'{' {
                while i < b.len() && b[i] != b'}' {
                    i += 1;
                }
                i += 1;
            } else {
                ident(&mut i);
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            after_metric = false;
        } else if is_ident_start(c) {
            let word = ident(&mut i);
            let mut j = i;
            skip_ws(&mut j);
            let next = b.get(j).copied();
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && next == Some(b'(')
            {
                i = j + 1;
                while i < b.len() && b[i] != b')' {
                    if is_ident_start(b[i]) {
                        refs.grouping.push(ident(&mut i));
                    } else {
                        i += 1;
                    }
                }
                i += 1;
                after_metric = false;
            } else if KEYWORDS.contains(&word.as_str()) || next == Some(b'(') {
                after_metric = false;
            } else {
                refs.selectors.push((word, Vec::new()));
                after_metric = true;
            }
        } else {
            if !c.is_ascii_whitespace() {
                after_metric = false;
            }
            i += 1;
        }
    }
    refs
}

/// Every problem of one dashboard against what is exported: unknown metrics, labels a
/// metric does not have, legends naming labels the query does not keep, variables over
/// unknown series.
fn problems(file: &str, dashboard: &Value, exported: &Exported) -> Vec<String> {
    let mut out = Vec::new();
    let check_expr = |context: &str, expr: &str, legend: Option<&str>| {
        let mut out = Vec::new();
        let refs = promql_refs(expr);
        if refs.selectors.is_empty() {
            out.push(format!("{file}: {context}: no metric in {expr:?}"));
        }
        let mut known_labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        for (metric, labels) in &refs.selectors {
            let Some(has) = exported.get(metric) else {
                out.push(format!(
                    "{file}: {context}: metric {metric:?} is not exported by any proxy or the controller"
                ));
                continue;
            };
            known_labels.extend(has.iter().map(String::as_str));
            for label in labels {
                if !has.contains(label) {
                    out.push(format!(
                        "{file}: {context}: {metric} has no label {label:?} (it has {has:?})"
                    ));
                }
            }
        }
        for label in &refs.grouping {
            if !known_labels.contains(label.as_str()) {
                out.push(format!(
                    "{file}: {context}: groups by {label:?}, which none of its metrics has"
                ));
            }
        }
        // A legend can only show labels the aggregation kept.
        for part in legend.unwrap_or_default().split("{{").skip(1) {
            let label = part.split("}}").next().unwrap_or_default().trim();
            let kept = refs.grouping.iter().any(|g| g == label)
                || (refs.grouping.is_empty() && known_labels.contains(label));
            if !kept {
                out.push(format!(
                    "{file}: {context}: legend shows {{{{{label}}}}}, which the query does not keep"
                ));
            }
        }
        out
    };
    let mut ids = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        if !ids.insert(panel["id"].as_u64()) {
            out.push(format!(
                "{file}: panel {title:?}: duplicate id {}",
                panel["id"]
            ));
        }
        if panel["type"] == "row" {
            continue;
        }
        if panel["datasource"]["uid"] != "${datasource}" {
            out.push(format!(
                "{file}: panel {title:?}: not on the ${{datasource}} variable"
            ));
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            exprs += 1;
            out.extend(check_expr(
                &format!("panel {title:?} target {}", target["refId"]),
                expr,
                target["legendFormat"].as_str(),
            ));
        }
    }
    if exprs == 0 {
        out.push(format!("{file}: no PromQL expression at all"));
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let q = var["query"]["query"].as_str().unwrap_or_default();
        let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        else {
            out.push(format!(
                "{file}: variable {name}: not a label_values query: {q:?}"
            ));
            continue;
        };
        let (selector, label) = args.rsplit_once(',').unwrap_or((args, ""));
        let label = label.trim();
        let refs = promql_refs(selector);
        for (metric, _) in &refs.selectors {
            match exported.get(metric) {
                Some(has) if has.contains(label) => {}
                Some(has) => out.push(format!(
                    "{file}: variable {name}: {metric} has no label {label:?} (it has {has:?})"
                )),
                None => out.push(format!(
                    "{file}: variable {name}: metric {metric:?} is not exported"
                )),
            }
        }
        out.extend(check_expr(&format!("variable {name}"), selector, None));
    }
    out
}

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana")
}

/// Each dashboard file, by name.
fn dashboards() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(grafana_dir())
        .expect("manifests/grafana")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read a dashboard"))
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn every_metric_and_label_in_the_dashboards_is_exported() {
    let exported = all_exported();
    let files = dashboards();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ambit-mesh.json", "ambit-proxies.json"]);
    let mut uids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (name, text) in &files {
        let dashboard: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        assert!(
            uids.insert(dashboard["uid"].as_str().unwrap_or_default().to_owned()),
            "{name}: duplicate uid"
        );
        let found = problems(name, &dashboard, &exported);
        assert!(found.is_empty(), "{}", found.join("\n"));
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                for (m, _) in promql_refs(t["expr"].as_str().unwrap_or_default()).selectors {
                    used.insert(m);
                }
            }
        }
    }
    // The golden signals are all there: requests, latency, bytes, connections, denials,
    // certificate expiry, discovery state.
    for metric in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_sum",
        "istio_response_bytes_sum",
        "istio_tcp_connections_opened_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "ambit_connections_revoked_total",
        "ambit_certificates_expiry_seconds",
        "ambit_xds_connection_state",
        "ambit_connected_proxies",
    ] {
        assert!(used.contains(metric), "no panel uses {metric}");
    }
}

#[tokio::test]
async fn a_renamed_metric_or_label_is_caught() {
    let exported = all_exported();
    let (name, text) = dashboards()
        .into_iter()
        .find(|(n, _)| n == "ambit-mesh.json")
        .expect("ambit-mesh.json");
    // As if the waypoint renamed its counter, and ztunnel one of its labels.
    let renamed = text
        .replace("istio_requests_total", "istio_request_total")
        .replace("connection_security_policy", "security_policy")
        .replace(
            "{{destination_service}} {{response_code}}",
            "{{destination_service}} {{method}}",
        );
    let dashboard: Value = serde_json::from_str(&renamed).expect("still JSON");
    let found = problems(&name, &dashboard, &exported).join("\n");
    assert!(
        found.contains("metric \"istio_request_total\" is not exported"),
        "{found}"
    );
    assert!(
        found.contains("istio_tcp_connections_opened_total has no label \"security_policy\""),
        "{found}"
    );
    assert!(found.contains("groups by \"security_policy\""), "{found}");
    assert!(found.contains("legend shows {{method}}"), "{found}");
}

#[test]
fn promql_is_read_for_metrics_and_labels() {
    let refs = promql_refs(
        r#"histogram_quantile(0.99, sum by (le, destination_service) (rate(istio_request_duration_milliseconds_bucket{reporter="waypoint",destination_workload_namespace=~"$namespace"}[$__rate_interval]))) / on (instance) group_left ambit_xds_connection_state offset 5m or vector(0) - time()"#,
    );
    assert_eq!(
        refs,
        Refs {
            selectors: vec![
                (
                    "istio_request_duration_milliseconds_bucket".into(),
                    vec!["reporter".into(), "destination_workload_namespace".into()]
                ),
                ("ambit_xds_connection_state".into(), vec![]),
            ],
            grouping: vec!["le".into(), "destination_service".into(), "instance".into()],
        }
    );
}
