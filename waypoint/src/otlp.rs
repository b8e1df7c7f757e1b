//! Span export to an OpenTelemetry collector (OTLP over gRPC), when one is configured.
//!
//! Each proxied request whose trace is sampled becomes one server span: the trace id of the
//! incoming `traceparent` (or of the new trace), as span id the id the waypoint sends
//! onward (so the destination's spans are children of ours), as parent the caller's span.
//! Requests only hand a finished span to a bounded queue; a background task sends batches.
//! A collector that is down or slow never holds a request up: when the queue is full spans
//! are dropped and counted, and failed exports are counted and logged once per outage.
//!
//! The protobuf types and the generated `TraceService` client come from
//! `opentelemetry-proto`: the waypoint already has its own span ids from `traceparent`
//! (they must match the header it forwards), so the SDK's tracer and id generation would
//! only stand in the way; the wire types are what must be exact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::labels::{Labels, LogFields};

/// Spans waiting for export; past this, new ones are dropped (and counted).
const QUEUE: usize = 2048;
/// Spans per export request.
const BATCH: usize = 512;
/// Longest a span waits for its batch.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Bound of one export call, so a stalled collector delays only the exporter.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The collector address is not a usable URI.
    #[error("invalid OTLP endpoint {endpoint:?} (expected e.g. http://collector:4317)")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Counters of the exporter, served with the waypoint's other metrics.
#[derive(Clone, Debug, Default)]
struct ExportMetrics {
    exported: Counter,
    dropped: Counter,
    failed: Counter,
}

/// Where requests hand their finished spans. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SpanSink {
    tx: mpsc::Sender<Span>,
    metrics: ExportMetrics,
}

impl SpanSink {
    fn offer(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

/// Stops the exporter, flushing what is queued.
#[derive(Debug)]
pub struct Exporter {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Exporter {
    /// Flushes queued spans and waits for the exporter, at most `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(deadline, self.task).await;
    }
}

/// Starts exporting to `endpoint` (OTLP/gRPC, e.g. `http://collector:4317`) as `service`.
/// Connects lazily: a collector that is not up yet only fails exports until it is.
pub fn start(
    endpoint: &str,
    service: &str,
    registry: &mut Registry,
) -> Result<(SpanSink, Exporter), OtlpError> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| OtlpError::Endpoint {
            endpoint: endpoint.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let metrics = ExportMetrics::default();
    registry.register(
        "ambit_otlp_spans_exported",
        "Spans the OTLP collector accepted",
        metrics.exported.clone(),
    );
    registry.register(
        "ambit_otlp_spans_dropped",
        "Spans dropped because the export queue was full",
        metrics.dropped.clone(),
    );
    registry.register(
        "ambit_otlp_spans_failed",
        "Spans whose export to the collector failed",
        metrics.failed.clone(),
    );
    let (tx, rx) = mpsc::channel(QUEUE);
    let (stop, stop_rx) = oneshot::channel();
    let worker = Worker {
        client: TraceServiceClient::new(channel),
        resource: Resource {
            attributes: vec![string_attr("service.name", service)],
            ..Resource::default()
        },
        metrics: metrics.clone(),
        failing: AtomicBool::new(false),
        endpoint: endpoint.to_string(),
    };
    let task = tokio::spawn(worker.run(rx, stop_rx));
    Ok((SpanSink { tx, metrics }, Exporter { stop, task }))
}

struct Worker {
    client: TraceServiceClient<Channel>,
    resource: Resource,
    metrics: ExportMetrics,
    /// Whether the last export failed: an outage is logged when it starts and ends, not
    /// once per batch.
    failing: AtomicBool,
    endpoint: String,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Span>, mut stop: oneshot::Receiver<()>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH {
                            self.export(&mut batch).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.export(&mut batch).await,
                _ = &mut stop => break,
            }
        }
        // Shutting down: what is queued goes out in one last round.
        while let Ok(s) = rx.try_recv() {
            batch.push(s);
            if batch.len() >= BATCH {
                self.export(&mut batch).await;
            }
        }
        self.export(&mut batch).await;
    }

    async fn export(&mut self, batch: &mut Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "ambit-waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match self.client.export(request).await {
            Ok(reply) => {
                let rejected = reply
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                self.metrics.exported.inc_by(n.saturating_sub(rejected));
                self.metrics.failed.inc_by(rejected);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "OTLP collector reachable again");
                }
            }
            Err(status) => {
                self.metrics.failed.inc_by(n);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %self.endpoint, %status, spans = n, "OTLP export failed; spans are dropped until the collector answers");
                }
            }
        }
    }
}

/// A request's span from its start until it is recorded.
#[derive(Debug)]
pub struct PendingSpan {
    sink: SpanSink,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start: SystemTime,
}

impl PendingSpan {
    /// A span for `ctx`, or none when the trace is not sampled.
    pub fn start(sink: &SpanSink, ctx: &TraceContext) -> Option<Self> {
        ctx.sampled.then(|| PendingSpan {
            sink: sink.clone(),
            trace_id: ctx.trace_id.to_be_bytes(),
            span_id: ctx.span_id.to_be_bytes(),
            parent_span_id: ctx.parent_span_id.map(u64::to_be_bytes),
            start: SystemTime::now(),
        })
    }

    /// Ends the span with what the request's metrics and access log say, and queues it.
    pub fn finish(self, labels: &Labels, log: &LogFields) {
        let code: u16 = labels.response_code.parse().unwrap_or(0);
        let mut attributes = vec![
            string_attr("http.request.method", &log.method),
            string_attr("url.path", &log.path),
            string_attr("server.address", &log.authority),
            int_attr("http.response.status_code", i64::from(code)),
            string_attr("network.protocol.name", &labels.request_protocol),
            string_attr("source.principal", &labels.source_principal),
            string_attr("source.workload", &labels.source_workload),
            string_attr("destination.service", &labels.destination_service),
            string_attr("destination.workload", &labels.destination_workload),
            string_attr("destination.principal", &labels.destination_principal),
            string_attr("response.flags", &labels.response_flags),
        ];
        if !log.upstream.is_empty() {
            attributes.push(string_attr("upstream.address", &log.upstream));
        }
        if !log.reason.is_empty() {
            attributes.push(string_attr("ambit.reason", &log.reason));
        }
        // HTTP semantic conventions: a server span is an error on 5xx (and when no
        // response was made at all), not on 4xx, which are the client's.
        let error = code == 0 || code >= 500;
        let span = Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: format!("{} {}", log.method, log.authority),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            status: Some(Status {
                code: if error {
                    status::StatusCode::Error
                } else {
                    status::StatusCode::Unset
                } as i32,
                message: if error {
                    log.reason.clone()
                } else {
                    String::new()
                },
            }),
            ..Span::default()
        };
        self.sink.offer(span);
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// A request's place in its trace (W3C Trace Context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The span id the waypoint sends onward: its own span's.
    pub span_id: u64,
    /// The caller's span, from the incoming `traceparent`.
    pub parent_span_id: Option<u64>,
    /// The sampled flag: unsampled traces are propagated but not exported.
    pub sampled: bool,
    flags: u8,
}

impl TraceContext {
    /// Continues the trace of an incoming `traceparent` with a new span id, or starts a
    /// sampled trace when it is absent or malformed.
    pub fn next(incoming: Option<&str>, rng: &mut impl rand::Rng) -> Self {
        let span_id = rng.random::<u64>() | 1;
        match incoming.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id,
                parent_span_id: Some(parent),
                sampled: flags & 1 == 1,
                flags,
            },
            None => TraceContext {
                trace_id: rng.random::<u128>() | 1,
                span_id,
                parent_span_id: None,
                sampled: true,
                flags: 1,
            },
        }
    }

    /// The `traceparent` to send onward.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// The trace id as the access log writes it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// `(trace id, parent span id, flags)` of a version-00-compatible `traceparent`.
fn parse_traceparent(v: &str) -> Option<(u128, u64, u8)> {
    let mut parts = v.trim().split('-');
    let (ver, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    // Version ff is forbidden; later versions may append fields, version 00 may not.
    if !hex(ver, 2) || ver.eq_ignore_ascii_case("ff") || (ver == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let parent = u64::from_str_radix(parent, 16).ok()?;
    // All-zero ids are invalid.
    if trace == 0 || parent == 0 {
        return None;
    }
    Some((trace, parent, u8::from_str_radix(flags, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_continued_or_started() {
        let mut rng = rand::rng();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::next(Some(parent), &mut rng);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id, Some(0x00f0_67aa_0ba9_02b7));
        assert!(ctx.sampled);
        let header = ctx.header();
        assert!(
            header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{header}"
        );
        assert!(header.ends_with("-01"));
        assert_ne!(&header[36..52], "00f067aa0ba902b7", "a new span id per hop");

        let unsampled = TraceContext::next(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            &mut rng,
        );
        assert!(!unsampled.sampled);
        assert!(unsampled.header().ends_with("-00"));

        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            let ctx = TraceContext::next(Some(bad), &mut rng);
            assert_eq!(ctx.parent_span_id, None, "{bad}");
            assert!(ctx.sampled && ctx.trace_id != 0, "{bad}");
        }
    }
}
