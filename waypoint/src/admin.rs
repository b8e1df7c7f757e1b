//! The operations ports: Prometheus metrics (`/metrics`, port 15020), readiness
//! (`/healthz/ready`, port 15021) and the admin config dump (`/config_dump`, 127.0.0.1:15000).
//! One small hyper server type serves all three; each listener only answers its own paths,
//! so the config dump (which names every workload) is never reachable off the node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::state::StateHandle;

/// What the operations endpoints show.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Mutex<Registry>>,
    pub state: StateHandle,
    pub ready: Arc<AtomicBool>,
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
    fn respond(&self, port: Port, path: &str) -> Response<Full<Bytes>> {
        let path = if port.allows(path) { path } else { "" };
        let (status, ctype, body) = match path {
            "/metrics" | "/stats/prometheus" => {
                let mut text = String::new();
                let registry = match self.registry.lock() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/healthz/ready" => {
                if self.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "text/plain", "ready\n".into())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".into(),
                    )
                }
            }
            "/config_dump" => match serde_json::to_string_pretty(&self.state.load().source) {
                Ok(json) => (StatusCode::OK, "application/json", json),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            },
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = http::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    }

    /// Serves `port`'s paths on `listener` until the task is dropped.
    pub async fn serve(self, port: Port, listener: TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let r = admin.respond(port, req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}
