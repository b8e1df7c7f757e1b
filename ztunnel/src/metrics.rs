//! ztunnel's Prometheus metrics, under the names dashboards for ambient meshes already use
//! (`istio_tcp_*` with `source_workload`, `destination_service`... labels), served in the
//! OpenMetrics text format on port 15020 (`/metrics`).
//!
//! Cost model: a connection's label set is built once, when it opens
//! ([`Metrics::connection_opened`]), and the returned [`ConnectionMetrics`] holds handles
//! to that connection's byte counters, so counting bytes is an atomic add with no hashing
//! or allocation. Label values are `Arc<str>` so the strings come from shared workload
//! state without copying.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use ambit_hbone::Identity;

use crate::drain::DrainWatcher;
use crate::http_server::{self, Listener, ServerError};

/// Default metrics port, as ambient meshes use.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15020);

/// Content type of the exposition: prometheus-client writes OpenMetrics text (with the
/// trailing `# EOF`), which Prometheus negotiates and parses natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The value Istio's dashboards expect for a label nobody knows.
pub const UNKNOWN: &str = "unknown";

/// Why metrics could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric or label failed to encode (a bug in an encoder, never bad input).
    #[error("cannot encode metrics")]
    Encode(#[source] std::fmt::Error),
}

/// Which side of the connection reported the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The source's ztunnel (outbound).
    Source,
    /// The destination's ztunnel (inbound).
    Destination,
}

/// The application protocol, as ztunnel sees it (it never parses user HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestProtocol {
    Tcp,
    /// A UDP flow (one 5-tuple), carried by CONNECT-UDP; its series are `istio_tcp_*` with
    /// `request_protocol="udp"` (bytes are UDP payload bytes).
    Udp,
}

/// Whether the hop was protected by mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// HBONE: both sides authenticated with SPIFFE certificates.
    MutualTls,
    /// Plaintext passthrough (the peer is outside the mesh).
    None,
}

/// Why a connection did not complete normally, in Envoy's response-flag vocabulary so
/// existing alerts keep working. Shared with the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// Nothing went wrong (`-`).
    None,
    /// The upstream connection could not be established (`UF`).
    UpstreamConnectionFailure,
    /// No destination to send to (`UH`).
    NoHealthyUpstream,
    /// Refused by authorization policy (`RBAC`, as Envoy's RBAC filter reports it).
    Denied,
    /// The connection was cut by drain or an idle/connect timeout (`UT`).
    Timeout,
}

impl ResponseFlags {
    /// The flag as it appears in metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::UpstreamConnectionFailure => "UF",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::Denied => "RBAC",
            ResponseFlags::Timeout => "UT",
        }
    }
}

impl Reporter {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl RequestProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            RequestProtocol::Tcp => "tcp",
            RequestProtocol::Udp => "udp",
        }
    }
}

impl SecurityPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

macro_rules! label_value_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value_as_str!(Reporter, RequestProtocol, SecurityPolicy, ResponseFlags);

/// The labels of every `istio_tcp_*` series: one value per connection, built when it
/// opens. Unknown values are [`UNKNOWN`], as Istio's dashboards expect.
///
/// The principals name only identities proven by mTLS (or the local pod's own): a plaintext
/// peer's is [`UNKNOWN`] whatever its address says. Its workload labels may still name the
/// workload owning its address, as Istio's ambient dashboards expect; the series says
/// `connection_security_policy="none"` beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    /// The source's SPIFFE identity (`spiffe://...`).
    pub source_principal: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    /// The service's host name (`name.namespace.svc.cluster.local`) when the client
    /// addressed a service.
    pub destination_service: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub request_protocol: RequestProtocol,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    /// Labels with every workload field [`UNKNOWN`], for callers to fill in.
    pub fn unknown(reporter: Reporter) -> Self {
        let unknown: Arc<str> = Arc::from(UNKNOWN);
        ConnectionLabels {
            reporter,
            source_workload: unknown.clone(),
            source_workload_namespace: unknown.clone(),
            source_principal: unknown.clone(),
            destination_workload: unknown.clone(),
            destination_workload_namespace: unknown.clone(),
            destination_principal: unknown.clone(),
            destination_service: unknown.clone(),
            destination_service_namespace: unknown,
            request_protocol: RequestProtocol::Tcp,
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::None,
        }
    }
}

/// The labels of `ambit_connections_revoked_total`: whose connection, and which kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RevokedLabels {
    destination_workload: Arc<str>,
    destination_workload_namespace: Arc<str>,
    connection_security_policy: SecurityPolicy,
}

/// The labels of `ambit_policy_denials_total`: who was refused, whom it wanted, and the
/// policy that denied. Every value comes from the state (workloads and policies the
/// controller pushed), never from what a peer sent, so the series stay bounded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DenialLabels {
    source_workload: Arc<str>,
    source_workload_namespace: Arc<str>,
    destination_workload: Arc<str>,
    destination_workload_namespace: Arc<str>,
    /// `namespace/name` of the DENY policy, or `no ALLOW policy matched (...)`.
    policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

type ConnectionFamily = Family<ConnectionLabels, Counter>;

/// A fixed cause (a refusal reason, a handshake failure kind): never a peer-chosen value, so
/// a flood cannot grow the number of series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The labels of `istio_dns_requests_total`: which pod's workload asked, and how the query
/// ended (a fixed set, [`crate::dns::Outcome::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DnsLabels {
    source_workload: Arc<str>,
    source_workload_namespace: Arc<str>,
    outcome: &'static str,
}

/// ztunnel's metrics. Cheap to clone; clones share the registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    opened: ConnectionFamily,
    closed: ConnectionFamily,
    sent: ConnectionFamily,
    received: ConnectionFamily,
    revoked: Family<RevokedLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    cert_expiry: Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    xds_state: Gauge,
    refused: Family<ReasonLabels, Counter>,
    handshakes_failed: Family<ReasonLabels, Counter>,
    dns_requests: Family<DnsLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = ConnectionFamily::default();
        let closed = ConnectionFamily::default();
        let sent = ConnectionFamily::default();
        let received = ConnectionFamily::default();
        let revoked = Family::default();
        let cert_expiry = Family::default();
        let xds_state = Gauge::default();
        let denials = Family::default();
        registry.register(
            "ambit_policy_denials",
            "Inbound connections refused by an authorization policy, by the policy that denied",
            denials.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response: from the destination back to the client",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request: from the client towards the destination",
            received.clone(),
        );
        registry.register(
            "ambit_connections_revoked",
            "Open inbound connections closed because a policy change denied them",
            revoked.clone(),
        );
        registry.register(
            "ambit_certificates_expiry_seconds",
            "Unix time (seconds) at which the current certificate of each local identity expires",
            cert_expiry.clone(),
        );
        registry.register(
            "ambit_xds_connection_state",
            "1 while the discovery stream to the controller is connected, else 0",
            xds_state.clone(),
        );
        let refused = Family::default();
        let handshakes_failed = Family::default();
        registry.register(
            "ambit_ztunnel_connections_refused",
            "New connections reset before being served, by reason (a limit, or a self-dial)",
            refused.clone(),
        );
        registry.register(
            "ambit_ztunnel_hbone_handshakes_failed",
            "Inbound HBONE connections that failed before HTTP/2 was up, by reason",
            handshakes_failed.clone(),
        );
        let dns_requests = Family::default();
        registry.register(
            "istio_dns_requests",
            "DNS queries of enrolled pods captured by ztunnel, by outcome (answered, nodata, forwarded, malformed, not_implemented, rate_limited, upstream_failed)",
            dns_requests.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            dns_requests,
            opened,
            closed,
            sent,
            received,
            revoked,
            denials,
            cert_expiry,
            xds_state,
            refused,
            handshakes_failed,
        }
    }

    /// Counts a connection refused before it was served (`reason` from
    /// [`crate::limits::Refused::as_str`]).
    pub fn connection_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one DNS query of a pod of `workload` in `namespace`, ended as `outcome`.
    pub fn dns_request(&self, workload: &Arc<str>, namespace: &Arc<str>, outcome: &'static str) {
        self.dns_requests
            .get_or_create(&DnsLabels {
                source_workload: workload.clone(),
                source_workload_namespace: namespace.clone(),
                outcome,
            })
            .inc();
    }

    /// Counts an inbound HBONE connection whose handshake failed.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshakes_failed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection as opened and returns its recorder, which counts bytes and
    /// counts the connection as closed when dropped.
    pub fn connection_opened(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        self.opened.get_or_create(labels).inc();
        // Cloning a counter clones an `Arc` to the same atomic, so these handles stay
        // live even if the family is later cleared.
        ConnectionMetrics {
            sent: self.sent.get_or_create_owned(labels),
            received: self.received.get_or_create_owned(labels),
            closed: self.closed.get_or_create_owned(labels),
        }
    }

    /// Counts an open connection (opened with `labels`) closed by a policy change.
    pub fn connection_revoked(&self, labels: &ConnectionLabels) {
        self.revoked
            .get_or_create(&RevokedLabels {
                destination_workload: labels.destination_workload.clone(),
                destination_workload_namespace: labels.destination_workload_namespace.clone(),
                connection_security_policy: labels.connection_security_policy,
            })
            .inc();
    }

    /// Counts an inbound connection (labelled `labels`) refused by `policy` (the
    /// decision's `denied_by`).
    pub fn policy_denied(&self, labels: &ConnectionLabels, policy: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                source_workload: labels.source_workload.clone(),
                source_workload_namespace: labels.source_workload_namespace.clone(),
                destination_workload: labels.destination_workload.clone(),
                destination_workload_namespace: labels.destination_workload_namespace.clone(),
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Publishes the expiry of `identity`'s current certificate.
    pub fn set_certificate_expiry(&self, identity: &Identity, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.cert_expiry
            .get_or_create(&IdentityLabels {
                identity: identity.to_string(),
            })
            .set(secs);
    }

    /// Removes `identity`'s certificate series (no local workload uses it any more).
    pub fn remove_certificate(&self, identity: &Identity) {
        self.cert_expiry.remove(&IdentityLabels {
            identity: identity.to_string(),
        });
    }

    /// Records whether the discovery stream is connected.
    pub fn set_xds_connected(&self, connected: bool) {
        self.xds_state.set(i64::from(connected));
    }

    /// The whole exposition, as served on `/metrics`.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(MetricsError::Encode)?;
        Ok(out)
    }
}

/// One connection's byte counters; counts the connection as closed when dropped.
#[derive(Debug)]
pub struct ConnectionMetrics {
    sent: Counter,
    received: Counter,
    closed: Counter,
}

impl ConnectionMetrics {
    /// Counts bytes of the request direction (client to destination), which Istio's
    /// dashboards read as `istio_tcp_received_bytes_total`, whichever side reports.
    pub fn record_request_bytes(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// Counts bytes of the response direction (destination to client):
    /// `istio_tcp_sent_bytes_total`.
    pub fn record_response_bytes(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

/// The metrics server, bound and ready to serve.
#[derive(Debug)]
pub struct MetricsServer {
    listener: Listener,
    metrics: Metrics,
}

impl MetricsServer {
    /// Binds `addr` (normally [`DEFAULT_ADDR`]; port 0 in tests).
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, ServerError> {
        Self::bind_with(addr, metrics, &crate::handover::Handover::default()).await
    }

    /// [`MetricsServer::bind`], taking the listener a previous ztunnel handed over if any.
    pub async fn bind_with(
        addr: SocketAddr,
        metrics: Metrics,
        handover: &crate::handover::Handover,
    ) -> Result<Self, ServerError> {
        Ok(MetricsServer {
            listener: http_server::bind_with(
                "metrics",
                crate::handover::Role::Metrics,
                addr,
                handover,
            )
            .await?,
            metrics,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves `/metrics` until drain starts.
    pub async fn serve(self, drain: DrainWatcher) {
        let metrics = self.metrics;
        self.listener
            .serve(drain, move |req| {
                let metrics = metrics.clone();
                async move {
                    match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics" | "/stats/prometheus") => {
                            match metrics.encode() {
                                Ok(body) => {
                                    http_server::respond(StatusCode::OK, CONTENT_TYPE, body)
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot encode metrics");
                                    http_server::text(
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        format!("{e}\n"),
                                    )
                                }
                            }
                        }
                        _ => http_server::text(StatusCode::NOT_FOUND, "not found\n"),
                    }
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_server::test_client::get;
    use std::collections::BTreeMap;

    type Sample = (String, BTreeMap<String, String>, f64);

    /// Parses the exposition's sample lines (`name{k="v",...} value`); enough for the
    /// label values used here (no escaped quotes or commas).
    fn parse(body: &str) -> Vec<Sample> {
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample line");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        let inner = rest.strip_suffix('}').expect("closing brace");
                        let labels = inner
                            .split(',')
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').expect("label");
                                (k.to_string(), v.trim_matches('"').to_string())
                            })
                            .collect();
                        (name, labels)
                    }
                    None => (series, BTreeMap::new()),
                };
                (name.to_string(), labels, value.parse().expect("value"))
            })
            .collect()
    }

    fn labels() -> ConnectionLabels {
        ConnectionLabels {
            reporter: Reporter::Source,
            source_workload: "sleep".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
            destination_workload: "echo".into(),
            destination_workload_namespace: "apps".into(),
            destination_principal: "spiffe://cluster.local/ns/apps/sa/echo".into(),
            destination_service: "echo.apps.svc.cluster.local".into(),
            destination_service_namespace: "apps".into(),
            request_protocol: RequestProtocol::Tcp,
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    #[tokio::test]
    async fn serves_connection_series_over_http() {
        let metrics = Metrics::new();
        let conn = metrics.connection_opened(&labels());
        conn.record_request_bytes(100);
        conn.record_request_bytes(23);
        conn.record_response_bytes(4567);
        drop(conn);
        let open = metrics.connection_opened(&labels());
        let identity: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .expect("id");
        let not_after = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        metrics.set_certificate_expiry(&identity, not_after);
        metrics.set_xds_connected(true);

        let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"), metrics.clone())
            .await
            .expect("bind");
        let addr = server.local_addr();
        let (trigger, watcher) = crate::drain::channel();
        let serving = tokio::spawn(server.serve(watcher));

        let (status, headers, body) = get(addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[hyper::header::CONTENT_TYPE], CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
        let samples = parse(&body);
        let expected_labels: BTreeMap<String, String> = [
            ("reporter", "source"),
            ("source_workload", "sleep"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/sleep",
            ),
            ("destination_workload", "echo"),
            ("destination_workload_namespace", "apps"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/apps/sa/echo",
            ),
            ("destination_service", "echo.apps.svc.cluster.local"),
            ("destination_service_namespace", "apps"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let value = |name: &str| {
            let found: Vec<_> = samples.iter().filter(|s| s.0 == name).collect();
            assert_eq!(found.len(), 1, "{name}: {found:?}\n{body}");
            assert_eq!(found[0].1, expected_labels, "{name}");
            found[0].2
        };
        assert_eq!(value("istio_tcp_connections_opened_total"), 2.0);
        assert_eq!(value("istio_tcp_connections_closed_total"), 1.0);
        // Istio's names: "received" is the request direction, "sent" the response's.
        assert_eq!(value("istio_tcp_received_bytes_total"), 123.0);
        assert_eq!(value("istio_tcp_sent_bytes_total"), 4567.0);
        let expiry: Vec<_> = samples
            .iter()
            .filter(|s| s.0 == "ambit_certificates_expiry_seconds")
            .collect();
        assert_eq!(expiry.len(), 1, "{body}");
        assert_eq!(expiry[0].1["identity"], identity.to_string());
        assert_eq!(expiry[0].2, 1_800_000_000.0);
        assert!(samples
            .iter()
            .any(|s| s.0 == "ambit_xds_connection_state" && s.2 == 1.0));

        drop(open);
        metrics.remove_certificate(&identity);
        let (_, _, body) = get(addr, "/metrics").await;
        let samples = parse(&body);
        assert!(samples
            .iter()
            .any(|s| s.0 == "istio_tcp_connections_closed_total" && s.2 == 2.0));
        assert!(
            !samples
                .iter()
                .any(|s| s.0 == "ambit_certificates_expiry_seconds"),
            "{body}"
        );

        assert_eq!(get(addr, "/other").await.0, StatusCode::NOT_FOUND);
        trigger
            .drain_and_wait(std::time::Duration::from_secs(5))
            .await;
        serving.await.expect("server task");
    }

    #[test]
    fn denials_are_counted_by_the_policy_that_denied() {
        let m = Metrics::new();
        let mut l = ConnectionLabels::unknown(Reporter::Destination);
        l.source_workload = Arc::from("client");
        l.source_workload_namespace = Arc::from("demo");
        l.destination_workload = Arc::from("echo");
        l.destination_workload_namespace = Arc::from("demo");
        m.policy_denied(&l, "demo/deny-client");
        m.policy_denied(&l, "demo/deny-client");
        let body = m.encode().expect("encode");
        let (_, labels, value) = parse(&body)
            .into_iter()
            .find(|(name, _, _)| name == "ambit_policy_denials_total")
            .unwrap_or_else(|| panic!("no denial series:\n{body}"));
        assert_eq!(value, 2.0);
        assert_eq!(labels["policy"], "demo/deny-client");
        assert_eq!(labels["source_workload"], "client");
        assert_eq!(labels["destination_workload_namespace"], "demo");
    }

    #[test]
    fn connection_labels_are_small_to_clone() {
        // Built once per connection and cloned into the families: `Arc<str>` fields keep
        // that a handful of reference-count increments, never string copies.
        assert!(std::mem::size_of::<ConnectionLabels>() <= 160);
        let l = ConnectionLabels::unknown(Reporter::Destination);
        assert_eq!(&*l.source_workload, UNKNOWN);
    }
}
