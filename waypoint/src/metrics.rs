//! Request metrics with the names and labels Istio dashboards know, and the access log: both
//! written once per request, when the response body ends (or is dropped), by
//! [`Recorder`], so durations and byte counts cover the whole exchange.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

pub use crate::labels::{Labels, LogFields};
use crate::otlp::PendingSpan;
use crate::BoxError;

fn new_duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ])
}

fn new_bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The labels of `ambit_policy_denials_total`: who, whom, and the policy that denied (a
/// name from the state, never from the request, so the series stay bounded).
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DenialLabels {
    source_workload: String,
    source_workload_namespace: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_service: String,
    policy: String,
}

/// The request metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    denials: Family<DenialLabels, Counter>,
}

impl Metrics {
    /// Registers the metrics in `registry` (names get no prefix: they are Istio's).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(new_duration_histogram),
            request_bytes: Family::new_with_constructor(new_bytes_histogram),
            response_bytes: Family::new_with_constructor(new_bytes_histogram),
            denials: Family::default(),
        };
        registry.register(
            "ambit_policy_denials",
            "Requests refused by an authorization policy, by the policy that denied",
            m.denials.clone(),
        );
        registry.register("istio_requests", "Requests handled", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        m
    }
}

/// Records one request when dropped.
#[derive(Debug)]
pub struct Recorder {
    metrics: Metrics,
    pub labels: Labels,
    pub log: LogFields,
    start: Instant,
    pub request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    /// Held until the request is recorded (circuit-breaker slot, active-request count), so
    /// limits count a request until its response body ends, not just its head.
    pub hold: Vec<Box<dyn std::any::Any + Send>>,
    /// The request's span, exported when it is recorded (an OTLP collector is configured
    /// and the trace is sampled).
    pub span: Option<PendingSpan>,
}

impl Recorder {
    pub fn new(metrics: Metrics, start: Instant) -> Self {
        Recorder {
            metrics,
            labels: Labels {
                reporter: "waypoint".into(),
                ..Labels::default()
            },
            log: LogFields::default(),
            start,
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: 0,
            hold: Vec::new(),
            span: None,
        }
    }
}

impl Recorder {
    /// Counts this request as denied by `policy` (a [`crate::refusal::Refusal::Denied`]'s
    /// `by`), in `ambit_policy_denials_total`.
    pub fn count_denial(&self, policy: &str) {
        let known = |s: &str| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s.to_owned()
            }
        };
        let l = &self.labels;
        self.metrics
            .denials
            .get_or_create(&DenialLabels {
                source_workload: known(&l.source_workload),
                source_workload_namespace: known(&l.source_workload_namespace),
                destination_workload: known(&l.destination_workload),
                destination_workload_namespace: known(&l.destination_workload_namespace),
                destination_service: known(&l.destination_service),
                policy: policy.to_owned(),
            })
            .inc();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        for label in [
            &mut self.labels.source_workload,
            &mut self.labels.destination_workload,
            &mut self.labels.destination_workload_namespace,
            &mut self.labels.destination_principal,
        ] {
            if label.is_empty() {
                // What Istio dashboards expect for a peer we could not name.
                *label = "unknown".into();
            }
        }
        let l = &self.labels;
        let elapsed = self.start.elapsed();
        let req_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.metrics.requests.get_or_create(l).inc();
        self.metrics
            .duration
            .get_or_create(l)
            .observe(elapsed.as_secs_f64() * 1000.0);
        self.metrics
            .request_bytes
            .get_or_create(l)
            .observe(req_bytes as f64);
        self.metrics
            .response_bytes
            .get_or_create(l)
            .observe(self.response_bytes as f64);
        let f = &self.log;
        tracing::info!(
            target: "access",
            src_principal = %l.source_principal,
            request_principal = %f.request_principal,
            src_workload = %l.source_workload,
            dst_service = %l.destination_service,
            dst_workload = %l.destination_workload,
            upstream = %f.upstream,
            method = %f.method,
            path = %f.path,
            authority = %f.authority,
            protocol = %l.request_protocol,
            status = %l.response_code,
            flags = %l.response_flags,
            grpc_status = %l.grpc_response_status,
            route = %f.route,
            reason = %f.reason,
            trace_id = %f.trace_id,
            bytes_sent = self.response_bytes,
            bytes_received = req_bytes,
            duration_ms = elapsed.as_millis() as u64,
            "request"
        );
        if let Some(span) = self.span.take() {
            span.finish(l, f);
        }
    }
}

/// A body that counts its bytes into a shared counter (request bodies).
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body: counts bytes, notes `grpc-status` from trailers, and owns the
/// [`Recorder`] so the request is recorded when the body ends or is dropped.
pub struct Recorded {
    inner: crate::Body,
    recorder: Option<Recorder>,
}

impl Recorded {
    pub fn new(inner: crate::Body, recorder: Recorder) -> Self {
        Recorded {
            inner,
            recorder: Some(recorder),
        }
    }

    /// As a boxed body.
    pub fn boxed(self) -> crate::Body {
        BodyExt::boxed_unsync(self)
    }
}

impl HttpBody for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(r) = this.recorder.as_mut() {
                if let Some(d) = frame.data_ref() {
                    r.response_bytes += d.len() as u64;
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    r.labels.grpc_response_status = status.to_string();
                }
            }
        }
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Record now rather than when hyper drops the body.
            this.recorder.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_counted_with_the_policy_and_unknown_for_what_is_not_known() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let mut rec = Recorder::new(metrics, Instant::now());
        rec.labels.source_workload = "client-0".into();
        rec.labels.source_workload_namespace = "shop".into();
        rec.labels.destination_service = "api.shop.svc.cluster.local".into();
        rec.count_denial("shop/no-delete");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let line = text
            .lines()
            .find(|l| l.starts_with("ambit_policy_denials_total{"))
            .unwrap_or_else(|| panic!("no denial series:\n{text}"));
        assert!(line.ends_with(" 1"), "{line}");
        for want in [
            "source_workload=\"client-0\"",
            "destination_workload=\"unknown\"",
            "destination_service=\"api.shop.svc.cluster.local\"",
            "policy=\"shop/no-delete\"",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
    }
}
