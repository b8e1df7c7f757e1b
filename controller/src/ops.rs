//! The operations endpoint on 15014: Prometheus metrics and readiness, over plain HTTP/1.1
//! (the HTTP server every binary shares, [`ambit_runtime::http`]; this module is its handler).
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
//! - `GET /dashboard`, `GET /dashboard/data`: the built-in dashboard ([`crate::dashboard`]).
//!
//! Gauges of connected proxies are computed from the discovery registry at scrape time,
//! so they can never drift from the streams that actually exist.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ambit_runtime::http::{respond, text, Body, Listener, Shutdown};
use http::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ca::CaMetrics;
use crate::dashboard::Dashboard;
use crate::discovery;
use crate::model::Model;
use crate::source::local::LocalError;

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
    dashboard: Option<Dashboard>,
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
            dashboard: None,
        }
    }

    /// Exposes `ambit_controller_leader`, whether this replica leads.
    pub fn with_leadership(mut self, leadership: &crate::leader::Leadership) -> Self {
        // Only before the first clone, which is when the binary calls it.
        if let Some(registry) = Arc::get_mut(&mut self.registry) {
            leadership.register(registry);
        }
        self
    }

    /// Reports the local source's problems (its [`crate::source::local::LocalSource::errors`]).
    pub fn with_source_errors(
        mut self,
        errors: tokio::sync::watch::Receiver<Arc<Vec<LocalError>>>,
    ) -> Self {
        self.local_errors = Some(errors);
        self
    }

    /// Serves the dashboard (`/dashboard`, `/dashboard/data`).
    pub fn with_dashboard(mut self, dashboard: Dashboard) -> Self {
        self.dashboard = Some(dashboard);
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

    fn respond<B>(&self, req: &Request<B>) -> Response<Body> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.encode(),
            ),
            "/ready" | "/healthz/ready" => {
                let missing = self.readiness.missing();
                if missing.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", missing.join(", ")),
                    )
                }
            }
            "/healthz/live" => text(StatusCode::OK, "live\n"),
            path => self
                .dashboard
                .as_ref()
                .and_then(|d| d.respond(path))
                .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n")),
        }
    }

    /// Serves on `listener` until `shutdown` fires; connections still open are asked to close
    /// after their current request.
    pub async fn serve(self, listener: Listener, shutdown: impl Shutdown) {
        listener
            .serve(shutdown, move |req| {
                let response = self.respond(&req);
                async move { response }
            })
            .await
    }
}
