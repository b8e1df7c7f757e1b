//! The operations endpoint on 15014: Prometheus metrics and readiness, over plain HTTP/1.1.
//!
//! - `GET /metrics`: `ambit_connected_proxies{kind}`, `ambit_pushes_total`,
//!   `ambit_nacks_total`, `ambit_push_duration_seconds` (queueing a push to its ACK),
//!   `ambit_certificates_signed_total`, `ambit_certificates_refused_total{reason}`,
//!   `ambit_local_source_errors` (problems the local source's latest scan found; each is
//!   logged with its file).
//! - `GET /ready` (also `/healthz/ready`, the manifests' probe): 200 once every source
//!   has synced, the CA is loaded and the gRPC server listens; otherwise 503 naming what is
//!   missing, so `kubectl describe` says why the pod is not ready.
//! - `GET /healthz/live`: 200 while the process serves HTTP at all.
//!
//! Gauges of connected proxies are computed from the discovery registry at scrape time,
//! so they can never drift from the streams that actually exist.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::ca::CaMetrics;
use crate::discovery;
use crate::model::Model;
use crate::source::local::LocalError;

/// Why the operations endpoint stopped.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Accepting connections failed for good.
    #[error("operations endpoint stopped accepting")]
    Accept(#[source] std::io::Error),
}

/// Labels of `ambit_connected_proxies`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// `ztunnel` or `waypoint`.
    kind: &'static str,
}

/// What readiness waits for. Cheap to clone; clones share the flags.
#[derive(Clone, Debug)]
pub struct Readiness {
    model: Model,
    ca_loaded: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
}

impl Readiness {
    /// Readiness of a controller serving `model`; the CA and listener flags start unset.
    pub fn new(model: Model) -> Self {
        Readiness {
            model,
            ca_loaded: Arc::default(),
            listening: Arc::default(),
        }
    }

    /// The CA is loaded and can sign.
    pub fn set_ca_loaded(&self) {
        self.ca_loaded.store(true, Ordering::Release);
    }

    /// The gRPC server is listening.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.model.current().ready {
            out.push("sources not synced");
        }
        if !self.ca_loaded.load(Ordering::Acquire) {
            out.push("CA not loaded");
        }
        if !self.listening.load(Ordering::Acquire) {
            out.push("gRPC server not listening");
        }
        out
    }
}

/// The metrics registry and readiness behind the endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Ops {
    registry: Arc<Registry>,
    subscribers: discovery::Registry,
    connected: Family<KindLabels, Gauge>,
    readiness: Readiness,
    source_errors: Gauge,
    local_errors: Option<tokio::sync::watch::Receiver<Arc<Vec<LocalError>>>>,
}

impl Ops {
    /// Exposes the discovery totals and the CA's counters, and `readiness`.
    pub fn new(subscribers: discovery::Registry, ca: &CaMetrics, readiness: Readiness) -> Self {
        let mut registry = Registry::default();
        let connected = Family::<KindLabels, Gauge>::default();
        registry.register(
            "ambit_connected_proxies",
            "Proxies subscribed to discovery, by kind",
            connected.clone(),
        );
        subscribers.totals().register(&mut registry);
        ca.register(&mut registry);
        let source_errors = Gauge::default();
        registry.register(
            "ambit_local_source_errors",
            "Problems the local source's latest scan of its folder found (files refused, documents rejected); each is logged with its file",
            source_errors.clone(),
        );
        Ops {
            registry: Arc::new(registry),
            subscribers,
            connected,
            readiness,
            source_errors,
            local_errors: None,
        }
    }

    /// Reports the local source's problems (its [`crate::source::local::LocalSource::errors`]).
    pub fn with_source_errors(
        mut self,
        errors: tokio::sync::watch::Receiver<Arc<Vec<LocalError>>>,
    ) -> Self {
        self.local_errors = Some(errors);
        self
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let (mut ztunnels, mut waypoints) = (0, 0);
        for s in self.subscribers.snapshot() {
            if s.proxy.starts_with("ztunnel") {
                ztunnels += 1;
            } else {
                waypoints += 1;
            }
        }
        for (kind, n) in [("ztunnel", ztunnels), ("waypoint", waypoints)] {
            self.connected.get_or_create(&KindLabels { kind }).set(n);
        }
        if let Some(errors) = &self.local_errors {
            let n = errors.borrow().len();
            self.source_errors.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String, content_type: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            r
        };
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET only\n".into(),
                "text/plain",
            );
        }
        match req.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                self.encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            "/ready" | "/healthz/ready" => {
                let missing = self.readiness.missing();
                if missing.is_empty() {
                    text(StatusCode::OK, "ready\n".into(), "text/plain")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", missing.join(", ")),
                        "text/plain",
                    )
                }
            }
            "/healthz/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
        }
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), OpsError> {
        tokio::pin!(shutdown);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    // Out of file descriptors and the like: back off rather than spin.
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "operations endpoint: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => return Err(OpsError::Accept(e)),
                },
            };
            let ops = self.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = ops.respond(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
        // Scrapes are short; anything still open is cut at shutdown.
        connections.shutdown().await;
        Ok(())
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::PermissionDenied
    )
}
