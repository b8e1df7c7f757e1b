//! Readiness: ztunnel reports ready (`GET /healthz/ready` on port 15021 → 200) only once
//! every startup task that traffic depends on is done.
//!
//! Before the first full discovery state, or before local workloads have certificates,
//! captured traffic would be refused; kubelet must not consider the node's proxy ready
//! (and a rollout must not move on) until then. Each such task takes a [`BlockReady`]
//! guard from [`Ready::register`]; dropping the guard marks it done, so a task that
//! fails or panics never leaves a stale "pending" behind it, and one that is simply
//! forgotten shows up by name in the 503 body.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::{Method, StatusCode};

use crate::drain::DrainWatcher;
use crate::http_server::{self, Listener, ServerError};

/// Default readiness port, as ambient meshes use.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15021);

/// The set of startup tasks still pending. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    inner: Arc<Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    tasks: BTreeMap<u64, String>,
}

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a task that must finish before ztunnel is ready; it is done when the
    /// returned guard is dropped.
    pub fn register(&self, name: impl Into<String>) -> BlockReady {
        let mut pending = self.lock();
        let id = pending.next_id;
        pending.next_id += 1;
        let name = name.into();
        tracing::debug!(task = %name, "readiness: waiting for task");
        pending.tasks.insert(id, name);
        BlockReady {
            ready: self.clone(),
            id,
        }
    }

    /// Names of the tasks still pending, in registration order.
    pub fn pending(&self) -> Vec<String> {
        self.lock().tasks.values().cloned().collect()
    }

    /// Whether every registered task is done.
    pub fn is_ready(&self) -> bool {
        self.lock().tasks.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The map stays consistent even if a holder panicked mid-update (each update is a
        // single insert or remove), so a poisoned lock is safe to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps one startup task pending until dropped.
#[derive(Debug)]
#[must_use = "the task is marked done as soon as the guard is dropped"]
pub struct BlockReady {
    ready: Ready,
    id: u64,
}

impl BlockReady {
    /// Marks the task done (same as dropping the guard, but reads better at call sites).
    pub fn done(self) {}
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let mut pending = self.ready.lock();
        if let Some(name) = pending.tasks.remove(&self.id) {
            tracing::info!(task = %name, remaining = pending.tasks.len(), "readiness: task done");
        }
    }
}

/// The readiness server, bound and ready to serve.
#[derive(Debug)]
pub struct ReadinessServer {
    listener: Listener,
    ready: Ready,
}

impl ReadinessServer {
    /// Binds `addr` (normally [`DEFAULT_ADDR`]; port 0 in tests).
    pub async fn bind(addr: SocketAddr, ready: Ready) -> Result<Self, ServerError> {
        Self::bind_with(addr, ready, &crate::handover::Handover::default()).await
    }

    /// [`ReadinessServer::bind`], taking the listener a previous ztunnel handed over if any.
    pub async fn bind_with(
        addr: SocketAddr,
        ready: Ready,
        handover: &crate::handover::Handover,
    ) -> Result<Self, ServerError> {
        Ok(ReadinessServer {
            listener: http_server::bind_with(
                "readiness",
                crate::handover::Role::Readiness,
                addr,
                handover,
            )
            .await?,
            ready,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves until drain starts.
    pub async fn serve(self, drain: DrainWatcher) {
        let ready = self.ready;
        self.listener
            .serve(drain, move |req| {
                let ready = ready.clone();
                async move {
                    match (req.method(), req.uri().path()) {
                        (&Method::GET | &Method::HEAD, "/healthz/ready") => {
                            let pending = ready.pending();
                            if pending.is_empty() {
                                http_server::text(StatusCode::OK, "ready\n")
                            } else {
                                let mut body = String::from("not ready; waiting for:\n");
                                for task in pending {
                                    body.push_str("- ");
                                    body.push_str(&task);
                                    body.push('\n');
                                }
                                http_server::text(StatusCode::SERVICE_UNAVAILABLE, body)
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

    #[test]
    fn guards_track_pending_tasks() {
        let ready = Ready::new();
        assert!(ready.is_ready());
        let a = ready.register("discovery: first full state");
        let b = ready.register("certificates for local workloads");
        assert_eq!(
            ready.pending(),
            [
                "discovery: first full state",
                "certificates for local workloads"
            ]
        );
        a.done();
        assert_eq!(ready.pending(), ["certificates for local workloads"]);
        assert!(!ready.is_ready());
        drop(b);
        assert!(ready.is_ready());
    }

    #[tokio::test]
    async fn serves_503_until_every_task_is_done() {
        use crate::http_server::test_client::get;
        let ready = Ready::new();
        let discovery = ready.register("discovery: first full state");
        let certs = ready.register("certificates for local workloads");
        let server = ReadinessServer::bind("127.0.0.1:0".parse().expect("addr"), ready.clone())
            .await
            .expect("bind");
        let addr = server.local_addr();
        let (trigger, watcher) = crate::drain::channel();
        let serving = tokio::spawn(server.serve(watcher));

        let (status, _, body) = get(addr, "/healthz/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("discovery: first full state"), "{body}");
        assert!(body.contains("certificates for local workloads"), "{body}");

        drop(discovery);
        let (status, _, body) = get(addr, "/healthz/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.contains("discovery"), "{body}");
        assert!(body.contains("certificates for local workloads"), "{body}");

        certs.done();
        let (status, _, body) = get(addr, "/healthz/ready").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);

        let outcome = trigger
            .drain_and_wait(std::time::Duration::from_secs(5))
            .await;
        assert_eq!(outcome, crate::drain::DrainOutcome::Complete);
        serving.await.expect("server task");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening after drain"
        );
    }
}
