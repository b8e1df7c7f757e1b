//! The operations ports: Prometheus metrics (`/metrics`, port 15020), readiness
//! (`/healthz/ready`, port 15021) and the admin config dump (`/config_dump`, 127.0.0.1:15000,
//! beside `/jwks`: each key-set URL's last good set, when it was fetched, the last failure).
//! The HTTP server is the one every binary shares ([`ambit_runtime::http`]); each listener
//! only answers its own paths, so the config dump (which names every workload) is never
//! reachable off the node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ambit_runtime::http::{self, Body, Listener, UntilDropped};
use hyper::{Response, StatusCode};
use prometheus_client::registry::Registry;

use crate::authn::jwks::Jwks;
use crate::state::StateHandle;

/// What the operations endpoints show.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Mutex<Registry>>,
    pub state: StateHandle,
    pub ready: Arc<AtomicBool>,
    /// The fetched key sets.
    pub jwks: Jwks,
}

/// Which paths a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `/metrics` (and Envoy's `/stats/prometheus`).
    Metrics,
    /// `/healthz/ready`.
    Readiness,
    /// Everything, including `/config_dump`; bind it to localhost.
    Admin,
}

impl Port {
    fn allows(self, path: &str) -> bool {
        match self {
            Port::Metrics => matches!(path, "/metrics" | "/stats/prometheus"),
            Port::Readiness => path == "/healthz/ready",
            Port::Admin => true,
        }
    }
}

impl Admin {
    fn respond(&self, port: Port, path: &str) -> Response<Body> {
        let path = if port.allows(path) { path } else { "" };
        match path {
            "/metrics" | "/stats/prometheus" => {
                let mut text = String::new();
                let registry = match self.registry.lock() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => http::respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            "/healthz/ready" => {
                if self.ready.load(Ordering::Acquire) {
                    http::text(StatusCode::OK, "ready\n")
                } else {
                    http::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            "/config_dump" => match serde_json::to_value(&self.state.load().source) {
                Ok(json) => http::json(StatusCode::OK, &json),
                Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            "/jwks" => match serde_json::to_value(&*self.jwks.entries()) {
                Ok(json) => http::json(StatusCode::OK, &json),
                Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            _ => http::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves `port`'s paths on `listener` until the task is dropped (the process exits):
    /// metrics and readiness stay answerable while the proxy drains.
    pub async fn serve(self, port: Port, listener: Listener) {
        listener
            .serve(UntilDropped, move |req| {
                let response = self.respond(port, req.uri().path());
                async move { response }
            })
            .await
    }
}
