//! What the dashboard shows, computed from the proxies' scrapes: a pure function of the
//! windows the scraper keeps ([`view`]), and the log of recent denials it updates after
//! each scrape ([`DenialLog`]). No I/O here, so every number is tested on fixtures.
//!
//! Rates are increases of counters between the oldest and the newest scrape of a proxy's
//! window, divided by the time between them; a counter that went down (the proxy
//! restarted) counts from zero. An edge is counted once: from the destination's reports
//! when it has any (the destination ztunnel or the waypoint saw the connection arrive),
//! else from the source's (traffic that left the mesh, or a destination outside it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use super::prom::Sample;

/// The value metrics use for a label nobody knows.
const UNKNOWN: &str = "unknown";

/// One scrape of one proxy.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Unix time of the scrape, in seconds.
    pub at: f64,
    pub samples: Arc<Vec<Sample>>,
}

/// What the scraper knows of one connected proxy.
#[derive(Debug, Clone)]
pub struct ProxyScrapes {
    /// `ztunnel node=...` or `waypoint gateway=...`, as discovery names it.
    pub proxy: String,
    /// Where it is scraped; `None` when it announced no metrics port.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The latest successful scrapes, oldest first.
    pub scrapes: VecDeque<Scrape>,
    /// Why the latest scrape failed, if it did.
    pub last_error: Option<String>,
}

/// A graph edge: traffic from one workload to another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    /// `namespace/name` of the client workload (`unknown` when not in the mesh).
    pub source: String,
    /// `namespace/name` of the server workload.
    pub destination: String,
    /// The services the client addressed (host names), when it addressed one.
    pub services: Vec<String>,
    /// `tcp` (connections, from ztunnel) or `http` (requests, from a waypoint).
    pub protocol: &'static str,
    /// Connections or requests per second.
    pub rate: f64,
    /// Share of them that succeeded (no response flag; for HTTP, no 5xx), 0 to 1.
    pub success_rate: Option<f64>,
    /// Request duration percentiles, HTTP only (ztunnel does not time connections).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Bytes per second, both directions.
    pub bytes_per_second: f64,
    /// Whether the traffic was mutual TLS (any of it, if mixed: see `plaintext`).
    pub mtls: bool,
    /// Whether some of it was plaintext.
    pub plaintext: bool,
    /// Which side's proxies reported it (`destination`, `source`, `waypoint`).
    pub reporter: String,
}

/// A recent denial: who, whom, and the policy that denied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Denial {
    pub policy: String,
    pub source: String,
    pub destination: String,
    /// Denials seen since this entry was first seen.
    pub count: f64,
    /// Unix time of the scrape that last saw the count grow.
    pub last_seen: f64,
    /// The proxy that denied.
    pub proxy: String,
}

/// One proxy's health.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyHealth {
    pub proxy: String,
    /// `ztunnel` or `waypoint`.
    pub kind: &'static str,
    pub metrics_addr: Option<String>,
    /// Scraped successfully last time, and (where it reports it) connected to discovery.
    pub healthy: bool,
    /// What is wrong, or `ok`.
    pub status: String,
    /// Unix time of the latest successful scrape.
    pub last_scrape: Option<f64>,
    /// Its discovery stream's state, as it reports it (`ambit_xds_connection_state`).
    pub xds_connected: Option<bool>,
    /// Unix time at which the first of its certificates expires.
    pub cert_expiry: Option<f64>,
    /// How many workload identities it holds certificates for.
    pub certificates: usize,
}

/// Everything the page shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    /// Unix time this view was computed.
    pub generated_at: f64,
    /// The workloads that appear in an edge, sorted.
    pub workloads: Vec<String>,
    pub edges: Vec<Edge>,
    /// Most recent first.
    pub denials: Vec<Denial>,
    pub proxies: Vec<ProxyHealth>,
}

fn workload(s: &Sample, side: &str) -> String {
    let name = s.label(&format!("{side}_workload"));
    let ns = s.label(&format!("{side}_workload_namespace"));
    if name.is_empty() || name == UNKNOWN {
        UNKNOWN.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

/// Increase of every series named `name` from `old` to `new` (a reset counts from zero;
/// a series that appeared counts from zero too, since counters start there).
fn increases<'a>(old: &'a [Sample], new: &'a [Sample], name: &str) -> Vec<(&'a Sample, f64)> {
    let before: BTreeMap<&BTreeMap<String, String>, f64> = old
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (&s.labels, s.value))
        .collect();
    new.iter()
        .filter(|s| s.name == name)
        .map(|s| {
            let was = before.get(&s.labels).copied().unwrap_or(0.0);
            let inc = if s.value >= was {
                s.value - was
            } else {
                s.value
            };
            (s, inc)
        })
        .collect()
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count) buckets.
fn quantile(buckets: &BTreeMap<OrderedBound, f64>, q: f64) -> Option<f64> {
    let total = buckets.iter().last().map(|(_, c)| *c)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in buckets {
        if *count >= rank {
            if bound.0.is_infinite() {
                return Some(lower);
            }
            let width = count - below;
            let into = if width > 0.0 {
                (rank - below) / width
            } else {
                1.0
            };
            return Some(lower + (bound.0 - lower) * into);
        }
        lower = bound.0;
        below = *count;
    }
    Some(lower)
}

/// A histogram bucket's upper bound, ordered (bounds are never NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Sums of one edge as one reporter saw it over its window.
#[derive(Debug, Default)]
struct Tally {
    count: f64,
    ok: f64,
    bytes: f64,
    seconds: f64,
    mtls: bool,
    plaintext: bool,
    services: BTreeSet<String>,
    buckets: BTreeMap<OrderedBound, f64>,
}

type EdgeKey = (String, String, &'static str);

fn add_tcp(
    tallies: &mut BTreeMap<(EdgeKey, String), Tally>,
    old: &[Sample],
    new: &[Sample],
    dt: f64,
) {
    for (s, inc) in increases(old, new, "istio_tcp_connections_opened_total") {
        let key = (workload(s, "source"), workload(s, "destination"), "tcp");
        let t = tallies
            .entry((key, s.label("reporter").to_owned()))
            .or_default();
        t.seconds = t.seconds.max(dt);
        t.count += inc;
        if s.label("response_flags") == "-" {
            t.ok += inc;
        }
        match s.label("connection_security_policy") {
            "mutual_tls" => t.mtls = true,
            _ => t.plaintext = true,
        }
        let svc = s.label("destination_service");
        if !svc.is_empty() && svc != UNKNOWN {
            t.services.insert(svc.to_owned());
        }
    }
    for name in [
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        for (s, inc) in increases(old, new, name) {
            let key = (workload(s, "source"), workload(s, "destination"), "tcp");
            let t = tallies
                .entry((key, s.label("reporter").to_owned()))
                .or_default();
            t.seconds = t.seconds.max(dt);
            t.bytes += inc;
        }
    }
}

fn add_http(
    tallies: &mut BTreeMap<(EdgeKey, String), Tally>,
    old: &[Sample],
    new: &[Sample],
    dt: f64,
) {
    let key_of = |s: &Sample| {
        let key = (workload(s, "source"), workload(s, "destination"), "http");
        (key, s.label("reporter").to_owned())
    };
    for (s, inc) in increases(old, new, "istio_requests_total") {
        let t = tallies.entry(key_of(s)).or_default();
        t.seconds = t.seconds.max(dt);
        t.count += inc;
        if !s.label("response_code").starts_with('5') {
            t.ok += inc;
        }
        match s.label("connection_security_policy") {
            // The waypoint only accepts HBONE, so traffic it reports came over mTLS.
            "mutual_tls" | "" => t.mtls = true,
            _ => t.plaintext = true,
        }
        let svc = s.label("destination_service");
        if !svc.is_empty() && svc != UNKNOWN {
            t.services.insert(svc.to_owned());
        }
    }
    for (s, inc) in increases(old, new, "istio_request_duration_milliseconds_bucket") {
        let Ok(bound) = s.label("le").replace("+Inf", "inf").parse::<f64>() else {
            continue;
        };
        let t = tallies.entry(key_of(s)).or_default();
        *t.buckets.entry(OrderedBound(bound)).or_default() += inc;
    }
    for name in ["istio_request_bytes_sum", "istio_response_bytes_sum"] {
        for (s, inc) in increases(old, new, name) {
            let t = tallies.entry(key_of(s)).or_default();
            t.bytes += inc;
        }
    }
}

/// The edges of the mesh over the proxies' windows.
fn edges(proxies: &[ProxyScrapes]) -> Vec<Edge> {
    let mut tallies: BTreeMap<(EdgeKey, String), Tally> = BTreeMap::new();
    for p in proxies {
        let (Some(first), Some(last)) = (p.scrapes.front(), p.scrapes.back()) else {
            continue;
        };
        let dt = last.at - first.at;
        if dt <= 0.0 {
            continue;
        }
        add_tcp(&mut tallies, &first.samples, &last.samples, dt);
        add_http(&mut tallies, &first.samples, &last.samples, dt);
    }
    // One reporter per edge: the destination's (or the waypoint's) view when there is one.
    // Only the source knows the service a client addressed: services come from every side.
    let mut services: BTreeMap<EdgeKey, BTreeSet<String>> = BTreeMap::new();
    for ((key, _), tally) in &tallies {
        services
            .entry(key.clone())
            .or_default()
            .extend(tally.services.iter().cloned());
    }
    let mut chosen: BTreeMap<EdgeKey, (String, Tally)> = BTreeMap::new();
    for ((key, reporter), tally) in tallies {
        let rank = |r: &str| match r {
            "destination" | "waypoint" => 0,
            _ => 1,
        };
        match chosen.get(&key) {
            Some((have, _)) if rank(have) <= rank(&reporter) => {}
            _ => {
                chosen.insert(key, (reporter, tally));
            }
        }
    }
    chosen
        .into_iter()
        .filter(|(_, (_, t))| t.seconds > 0.0)
        .map(|(key, (reporter, t))| Edge {
            services: services
                .get(&key)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            source: key.0,
            destination: key.1,
            protocol: key.2,
            rate: t.count / t.seconds,
            success_rate: (t.count > 0.0).then(|| t.ok / t.count),
            p50_ms: quantile(&t.buckets, 0.5),
            p99_ms: quantile(&t.buckets, 0.99),
            bytes_per_second: t.bytes / t.seconds,
            mtls: t.mtls,
            plaintext: t.plaintext,
            reporter,
        })
        .collect()
}

fn health(p: &ProxyScrapes) -> ProxyHealth {
    let kind = if p.proxy.starts_with("waypoint") {
        "waypoint"
    } else {
        "ztunnel"
    };
    let last = p.scrapes.back();
    let samples: &[Sample] = last.map_or(&[], |s| &s.samples);
    let xds_connected = samples
        .iter()
        .find(|s| s.name == "ambit_xds_connection_state")
        .map(|s| s.value >= 1.0);
    let expiries: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == "ambit_certificates_expiry_seconds")
        .map(|s| s.value)
        .collect();
    let cert_expiry = expiries.iter().copied().reduce(f64::min);
    let status = match (&p.metrics_addr, &p.last_error, xds_connected) {
        (None, _, _) => "no metrics port announced".to_owned(),
        (_, Some(e), _) => format!("scrape failed: {e}"),
        (_, None, _) if last.is_none() => "not scraped yet".to_owned(),
        (_, None, Some(false)) => "discovery stream down".to_owned(),
        _ => "ok".to_owned(),
    };
    ProxyHealth {
        proxy: p.proxy.clone(),
        kind,
        metrics_addr: p.metrics_addr.map(|a| a.to_string()),
        healthy: status == "ok",
        status,
        last_scrape: last.map(|s| s.at),
        xds_connected,
        cert_expiry,
        certificates: expiries.len(),
    }
}

/// The view of `proxies` (and the denials `log` holds), at unix time `now`.
pub fn view(proxies: &[ProxyScrapes], log: &DenialLog, now: f64) -> View {
    let edges = edges(proxies);
    let workloads: BTreeSet<String> = edges
        .iter()
        .flat_map(|e| [e.source.clone(), e.destination.clone()])
        .collect();
    View {
        generated_at: now,
        workloads: workloads.into_iter().collect(),
        edges,
        denials: log.recent(),
        proxies: proxies.iter().map(health).collect(),
    }
}

/// The denials seen lately, by (proxy, policy, source, destination), updated from each
/// pair of consecutive scrapes of a proxy. Bounded: entries older than [`DenialLog::KEEP`]
/// seconds go, and at most [`DenialLog::MAX`] are kept (the oldest go first).
#[derive(Debug, Default)]
pub struct DenialLog {
    entries: BTreeMap<(String, String, String, String), (f64, f64)>,
}

impl DenialLog {
    /// How long a denial stays listed after it was last seen, in seconds.
    pub const KEEP: f64 = 600.0;
    /// The most entries kept.
    pub const MAX: usize = 100;

    /// Records the denials counted between `old` and `new`, two consecutive scrapes of
    /// `proxy` (the second at `at`). Counts present at a proxy's first scrape are not
    /// recent news and are not listed: only increases are.
    pub fn update(&mut self, proxy: &str, old: &[Sample], new: &[Sample], at: f64) {
        for (s, inc) in increases(old, new, "ambit_policy_denials_total") {
            if inc <= 0.0 {
                continue;
            }
            // A request a waypoint denied may have no destination workload yet (it is
            // refused before an endpoint is picked): name the service it asked for.
            let destination = match (workload(s, "destination"), s.label("destination_service")) {
                (w, svc) if w == UNKNOWN && !svc.is_empty() && svc != UNKNOWN => svc.to_owned(),
                (w, _) => w,
            };
            let key = (
                proxy.to_owned(),
                s.label("policy").to_owned(),
                workload(s, "source"),
                destination,
            );
            let entry = self.entries.entry(key).or_insert((0.0, at));
            entry.0 += inc;
            entry.1 = at;
        }
        self.entries.retain(|_, (_, seen)| at - *seen <= Self::KEEP);
        while self.entries.len() > Self::MAX {
            let oldest = self
                .entries
                .iter()
                .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }

    /// The entries, most recently seen first.
    pub fn recent(&self) -> Vec<Denial> {
        let mut out: Vec<Denial> = self
            .entries
            .iter()
            .map(
                |((proxy, policy, source, destination), (count, seen))| Denial {
                    policy: policy.clone(),
                    source: source.clone(),
                    destination: destination.clone(),
                    count: *count,
                    last_seen: *seen,
                    proxy: proxy.clone(),
                },
            )
            .collect();
        out.sort_by(|a, b| b.last_seen.total_cmp(&a.last_seen));
        out
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
