//! Span export over OTLP: a real tonic `TraceService` collector on loopback receives what
//! the waypoint exports for requests sent through real HBONE.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{status, Span};

/// Every span received, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

async fn collector() -> (String, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = Collector::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), c)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn sampled_requests_become_spans_in_the_callers_trace() {
    let (endpoint, collected) = collector().await;
    let (mesh, exporter) = start_traced(&PODS, &state_yaml(""), &endpoint).await;
    let mut c = mesh.h1(WEB).await;

    // The caller's span: our span continues its trace as its child.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _, body) = get(&mut c, "/traced", &[("traceparent", parent)]).await;
    assert_eq!(status, 200, "{body}");
    let sent_on = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent="))
        .unwrap()
        .to_string();
    // A new trace, and an unsampled one (propagated, never exported).
    let (status, _, _) = get(&mut c, "/fresh", &[]).await;
    assert_eq!(status, 200);
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let (status, _, _) = get(&mut c, "/quiet", &[("traceparent", unsampled)]).await;
    assert_eq!(status, 200);
    // No such service: the waypoint's own 503 is an error span.
    let mut lost = mesh.h1("10.96.9.9:80").await;
    let (status, _, _) = get(&mut lost, "/nowhere", &[]).await;
    assert_eq!(status, 503);

    // Batches leave every 2 s; shutting down flushes the rest at once.
    exporter.shutdown(Duration::from_secs(5)).await;
    let spans = collected.0.lock().unwrap().clone();
    let paths: Vec<String> = spans
        .iter()
        .map(|(_, s)| attr(&s.attributes, "url.path").unwrap())
        .collect();
    assert_eq!(spans.len(), 3, "{paths:?}");
    assert!(!paths.contains(&"/quiet".to_string()), "{paths:?}");

    let by_path = |p: &str| {
        spans
            .iter()
            .find(|(_, s)| attr(&s.attributes, "url.path").as_deref() == Some(p))
            .unwrap()
    };
    let (service, traced) = by_path("/traced");
    assert_eq!(service, "waypoint-test");
    assert_eq!(hex(&traced.trace_id), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(hex(&traced.parent_span_id), "b7ad6b7169203331");
    // The span id is the one the destination was told is its parent.
    assert_eq!(
        sent_on,
        format!("00-{}-{}-01", hex(&traced.trace_id), hex(&traced.span_id))
    );
    assert_eq!(
        attr(&traced.attributes, "http.request.method").unwrap(),
        "GET"
    );
    assert_eq!(
        attr(&traced.attributes, "http.response.status_code").unwrap(),
        "200"
    );
    assert_eq!(
        attr(&traced.attributes, "source.principal").unwrap(),
        "spiffe://cluster.local/ns/client/sa/curl"
    );
    assert_eq!(
        attr(&traced.attributes, "destination.service").unwrap(),
        "web.demo.svc.cluster.local"
    );
    assert!(traced.end_time_unix_nano >= traced.start_time_unix_nano);
    assert!(traced.start_time_unix_nano > 0);
    assert_eq!(
        traced.status.as_ref().unwrap().code,
        status::StatusCode::Unset as i32
    );

    let (_, fresh) = by_path("/fresh");
    assert!(fresh.parent_span_id.is_empty());
    assert_ne!(fresh.trace_id, traced.trace_id);
    let (_, failed) = by_path("/nowhere");
    assert_eq!(
        attr(&failed.attributes, "http.response.status_code").unwrap(),
        "503"
    );
    assert_eq!(
        failed.status.as_ref().unwrap().code,
        status::StatusCode::Error as i32
    );

    let text = mesh.metrics();
    assert_eq!(
        metric(&text, "ambit_otlp_spans_exported_total"),
        3,
        "{text}"
    );
    assert_eq!(metric(&text, "ambit_otlp_spans_failed_total"), 0, "{text}");
}

#[tokio::test]
async fn a_collector_that_is_down_costs_requests_nothing() {
    // A port that refuses connections.
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (mesh, exporter) = start_traced(&PODS, &state_yaml(""), &endpoint).await;
    let mut c = mesh.h1(WEB).await;
    for _ in 0..20 {
        let (status, _, body) = get(&mut c, "/", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    exporter.shutdown(Duration::from_secs(5)).await;
    let text = mesh.metrics();
    assert_eq!(metric(&text, "ambit_otlp_spans_failed_total"), 20, "{text}");
    assert_eq!(
        metric(&text, "ambit_otlp_spans_exported_total"),
        0,
        "{text}"
    );
    // The requests themselves were recorded as usual.
    assert!(text.contains("istio_requests_total{"), "{text}");
}
