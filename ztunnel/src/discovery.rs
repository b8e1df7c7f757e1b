//! The discovery client: keeps the [`Store`] in step with the controller.
//!
//! The stream itself (`Hello{ZTUNNEL, node}`, ACK/NACK, the bearer credential, reconnection
//! with capped, jittered exponential back-off) is [`ambit_runtime::discovery`]'s, shared with
//! the waypoint; this module says what a push means to ztunnel: it is applied to the store,
//! and refused (NACKed with the conversion error, the store keeping its last good state) when
//! it does not convert. Meanwhile the proxy keeps serving from the state it has. The
//! controller answers a new stream with a full state, which replaces everything.
//!
//! With a node directory, every ACKed push is folded into [`LastAcked`] and the resulting
//! full state written there, so a restart can serve from it before the controller answers.
//!
//! [`DiscoveryClient`] is a cheap `Clone` handle over the worker task: it hands
//! out the read side of the store, a readiness `watch` (true once a first full state is
//! applied) and a status `watch` for the admin endpoint. The task stops when the last handle
//! is dropped.
//!
//! Transport security is the caller's: it passes a [`Connect`] (a tonic
//! [`Endpoint`](tonic::transport::Endpoint), or its own connector doing SPIFFE TLS), and any
//! HTTP/2 keep-alive that should detect a silent controller is configured there too.

use std::sync::Arc;

use ambit_proto::discovery as pb;
use ambit_runtime::discovery::{self as stream, ClientConfig, Subscriber};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use ambit_runtime::discovery::{
    Backoff, BoxError, Connect, ConnectFn, ConnectFuture, DiscoveryError, Status,
};

use crate::node_dir::{LastAcked, NodeDir};
use crate::state::{StateReader, Store, StoreError};
use crate::telemetry::error_chain;

/// Client settings.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The node this ztunnel serves (sent in `Hello`).
    pub node: String,
    pub backoff: Backoff,
    /// File holding the bearer token the controller authenticates subscriptions by (the
    /// same credential as the CA's); re-read per stream so a rotated token is picked up.
    pub credential_file: Option<std::path::PathBuf>,
    /// Where the last ACKed state is kept (`None`: nowhere).
    pub node_dir: Option<NodeDir>,
    /// The metrics port announced to the controller (its dashboard scrapes it).
    pub metrics_port: Option<u16>,
}

/// Aborts the worker when the last handle goes.
struct Worker(JoinHandle<()>);

impl Drop for Worker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Handle on the discovery worker. Cheap to clone.
#[derive(Clone)]
pub struct DiscoveryClient {
    reader: StateReader,
    ready: watch::Receiver<bool>,
    status: watch::Receiver<Status>,
    _worker: Arc<Worker>,
}

impl DiscoveryClient {
    /// Starts the worker on the current tokio runtime; it owns `store` (the single writer).
    pub fn spawn(connector: impl Connect, store: Store, config: DiscoveryConfig) -> Self {
        let reader = store.reader();
        let (ready_tx, ready) = watch::channel(false);
        let (status_tx, status) = watch::channel(Status::default());
        let subscriber = Ztunnel {
            node: config.node,
            store,
            ready: ready_tx,
            node_dir: config.node_dir,
            acked: LastAcked::default(),
            pending: None,
        };
        let client = ClientConfig {
            backoff: config.backoff,
            credential_file: config.credential_file,
            metrics_port: config.metrics_port,
        };
        let task = tokio::spawn(stream::run(connector, subscriber, client, status_tx));
        DiscoveryClient {
            reader,
            ready,
            status,
            _worker: Arc::new(Worker(task)),
        }
    }

    /// Read side of the store the worker writes.
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// Turns true once a full state has been applied, and stays true (the proxy serves its
    /// last good state while the controller is away).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Waits until [`ready`](Self::ready) is true.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.clone();
        // Err means the worker is gone, which only happens once every handle is dropped.
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
}

/// What a push means to ztunnel.
struct Ztunnel {
    node: String,
    store: Store,
    ready: watch::Sender<bool>,
    node_dir: Option<NodeDir>,
    /// The state last ACKed, as it is kept in the node directory.
    acked: LastAcked,
    /// The push just applied, kept once it is ACKed (only with a node directory).
    pending: Option<pb::Push>,
}

impl Subscriber for Ztunnel {
    type Error = StoreError;

    fn hello(&self) -> pb::Hello {
        pb::Hello {
            kind: pb::ProxyKind::Ztunnel as i32,
            node: self.node.clone(),
            identity: String::new(),
            gateway: String::new(),
            accepts: vec![
                pb::ResourceKind::PeerAuthentication as i32,
                pb::ResourceKind::ExternalService as i32,
            ],
        }
    }

    fn apply(&mut self, push: pb::Push) -> Result<u64, StoreError> {
        let full = push.full_state;
        // Only copied when it will be kept.
        self.pending = self.node_dir.as_ref().map(|_| push.clone());
        let outcome = match self.store.apply(push) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.pending = None;
                return Err(e);
            }
        };
        tracing::debug!(?outcome, "push applied to the store");
        if full {
            self.ready.send_replace(true);
        }
        Ok(outcome.version)
    }

    async fn acked(&mut self) {
        if let (Some(dir), Some(push)) = (&self.node_dir, self.pending.take()) {
            self.acked.apply(&push);
            keep(dir, self.acked.to_push()).await;
        }
    }
}

/// Writes the ACKed state to the node directory, off the runtime (it fsyncs). A failure is
/// logged: the proxy serves on, only a restart would have to wait for the controller.
async fn keep(dir: &NodeDir, state: pb::Push) {
    let dir = dir.clone();
    let path = dir.state_path();
    match tokio::task::spawn_blocking(move || dir.save_state(&state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            error = %error_chain(&e),
            "cannot keep the acknowledged state; a restart will wait for the controller"
        ),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "state write task failed"),
    }
}
