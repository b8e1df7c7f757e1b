//! The discovery client: keeps the [`Store`] in step with the controller.
//!
//! One gRPC stream (`Discovery.Subscribe`): ztunnel says `Hello{ZTUNNEL, node}`, then applies
//! each [`Push`](pb::Push) to the store and ACKs it, or NACKs it with the conversion error as
//! the reason (the store keeps its last good state). When the stream breaks, the client
//! reconnects with capped, jittered exponential back-off; meanwhile the proxy keeps serving
//! from the state it has. The controller answers a new stream with a full state, which
//! replaces everything.
//!
//! With a node directory, every ACKed push is folded into [`LastAcked`] and the resulting
//! full state written there, so a restart can serve from it before the controller answers.
//!
//! [`DiscoveryClient`] is a cheap `Clone` handle over the worker task: it hands
//! out the read side of the store, a readiness `watch` (true once a first full state is
//! applied) and a status `watch` for the admin endpoint. The task stops when the last handle
//! is dropped.
//!
//! Transport security is the caller's: it passes a [`Connect`] (a tonic [`Endpoint`], or its
//! own connector doing SPIFFE TLS), and any HTTP/2 keep-alive that should detect a silent
//! controller is configured there too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::discovery as pb;
use pb::discovery_client::DiscoveryClient as GrpcClient;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::node_dir::{LastAcked, NodeDir};
use crate::state::{StateReader, Store};
use crate::telemetry::error_chain;

/// Boxed error of a connector.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Future returned by [`Connect::connect`].
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<Channel, BoxError>> + Send>>;

/// Opens a channel to the controller (called again on every reconnect).
pub trait Connect: Send + Sync + 'static {
    fn connect(&self) -> ConnectFuture;
}

impl Connect for Endpoint {
    fn connect(&self) -> ConnectFuture {
        let endpoint = self.clone();
        Box::pin(async move { endpoint.connect().await.map_err(Into::into) })
    }
}

/// A [`Connect`] from a closure, e.g. one that builds a SPIFFE TLS connector per attempt.
pub struct ConnectFn<F>(pub F);

impl<F, Fut> Connect for ConnectFn<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Channel, BoxError>> + Send + 'static,
{
    fn connect(&self) -> ConnectFuture {
        Box::pin((self.0)())
    }
}

/// Why a discovery stream ended (logged, and shown in [`Status::last_error`]).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The controller could not be reached.
    #[error("connecting to the controller: {0}")]
    Connect(#[source] BoxError),
    /// The controller refused the subscription.
    #[error("subscribing: {0}")]
    Subscribe(#[source] tonic::Status),
    /// The stream failed after it was established.
    #[error("discovery stream broke: {0}")]
    Stream(#[source] tonic::Status),
    /// The controller closed the stream.
    #[error("the controller closed the discovery stream")]
    Closed,
}

/// Reconnection back-off: doubles from `initial` up to `max`; each wait is drawn uniformly
/// from its upper half so that the ztunnels of a cluster do not reconnect in lockstep after a
/// controller restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(15),
        }
    }
}

impl Backoff {
    /// The step after `current`.
    pub fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).min(self.max).max(self.initial)
    }

    /// How long to actually wait for step `current`: in `[current / 2, current]`.
    pub fn jittered(&self, current: Duration, rng: &mut impl Rng) -> Duration {
        let half = current / 2;
        let spread = (current - half).as_millis().min(u128::from(u64::MAX)) as u64;
        half + Duration::from_millis(rng.random_range(0..=spread))
    }
}

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
}

/// What the client is doing, for the admin endpoint and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// A stream is established.
    pub connected: bool,
    /// Version of the last push applied.
    pub version: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Reason of the last NACK sent.
    pub last_nack: Option<String>,
    /// Why the last stream ended.
    pub last_error: Option<String>,
    /// Streams opened so far.
    pub streams: u64,
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
        let task = tokio::spawn(run(connector, store, config, ready_tx, status_tx));
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

async fn run(
    connector: impl Connect,
    mut store: Store,
    config: DiscoveryConfig,
    ready_tx: watch::Sender<bool>,
    status_tx: watch::Sender<Status>,
) {
    let mut delay = config.backoff.initial;
    let mut acked = LastAcked::default();
    loop {
        let mut applied = false;
        let err = session(
            &connector,
            &mut store,
            &config,
            &ready_tx,
            &status_tx,
            &mut applied,
            &mut acked,
        )
        .await;
        tracing::warn!(error = %err, "discovery stream ended; keeping the last good state");
        status_tx.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(err.to_string());
        });
        // A stream that delivered something was healthy: start the back-off over.
        if applied {
            delay = config.backoff.initial;
        }
        let wait = config.backoff.jittered(delay, &mut rand::rng());
        tokio::time::sleep(wait).await;
        delay = config.backoff.next(delay);
    }
}

/// One stream, from connecting to its end; returns why it ended.
async fn session(
    connector: &impl Connect,
    store: &mut Store,
    config: &DiscoveryConfig,
    ready_tx: &watch::Sender<bool>,
    status_tx: &watch::Sender<Status>,
    applied: &mut bool,
    acked: &mut LastAcked,
) -> DiscoveryError {
    let channel = match connector.connect().await {
        Ok(c) => c,
        Err(e) => return DiscoveryError::Connect(e),
    };
    let mut client = GrpcClient::new(channel);
    // Requests are one Hello and then one ACK/NACK per push: a small buffer is plenty, and
    // the receiver lives as long as the stream, so sends only fail once it is gone.
    let (tx, rx) = mpsc::channel(16);
    let send = |m: pb::subscribe_request::Message| {
        let tx = tx.clone();
        async move {
            tx.send(pb::SubscribeRequest { message: Some(m) })
                .await
                .is_ok()
        }
    };
    send(pb::subscribe_request::Message::Hello(pb::Hello {
        kind: pb::ProxyKind::Ztunnel as i32,
        node: config.node.clone(),
        identity: String::new(),
        gateway: String::new(),
    }))
    .await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &config.credential_file {
        // An unreadable credential is reported by the controller's refusal (unauthenticated),
        // which names what is missing; the CA client reports the file itself.
        if let Ok(token) = tokio::fs::read_to_string(path).await {
            if let Ok(mut v) =
                format!("Bearer {}", token.trim()).parse::<tonic::metadata::MetadataValue<_>>()
            {
                v.set_sensitive(true);
                request.metadata_mut().insert("authorization", v);
            }
        }
    }
    let mut stream = match client.subscribe(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return DiscoveryError::Subscribe(status),
    };
    status_tx.send_modify(|s| {
        s.connected = true;
        s.streams += 1;
    });
    tracing::info!(node = %config.node, "discovery stream established");
    let mut first = true;
    loop {
        let push = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return DiscoveryError::Closed,
            Err(status) => return DiscoveryError::Stream(status),
        };
        if first && !push.full_state {
            tracing::warn!(nonce = %push.nonce, "first push of a stream is not a full state; applying it anyway");
        }
        first = false;
        let nonce = push.nonce.clone();
        let full = push.full_state;
        // Only copied when it will be kept.
        let kept = config.node_dir.as_ref().map(|_| push.clone());
        let reply = match store.apply(push) {
            Ok(outcome) => {
                tracing::debug!(?outcome, %nonce, "push applied");
                *applied = true;
                if full {
                    ready_tx.send_replace(true);
                }
                status_tx.send_modify(|s| {
                    s.version = outcome.version;
                    s.acks += 1;
                });
                pb::subscribe_request::Message::Ack(pb::Ack { nonce })
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(%nonce, %reason, "push refused; keeping the last good state");
                status_tx.send_modify(|s| {
                    s.nacks += 1;
                    s.last_nack = Some(reason.clone());
                });
                pb::subscribe_request::Message::Nack(pb::Nack { nonce, reason })
            }
        };
        let ack = matches!(reply, pb::subscribe_request::Message::Ack(_));
        if !send(reply).await {
            return DiscoveryError::Closed;
        }
        if let (true, Some(dir), Some(push)) = (ack, &config.node_dir, kept) {
            acked.apply(&push);
            keep(dir, acked.to_push()).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_bounds() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        let mut d = b.initial;
        let mut steps = vec![];
        for _ in 0..6 {
            steps.push(d.as_millis());
            d = b.next(d);
        }
        assert_eq!(steps, vec![100, 200, 400, 800, 1000, 1000]);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let j = b.jittered(Duration::from_millis(800), &mut rng);
            assert!(
                j >= Duration::from_millis(400) && j <= Duration::from_millis(800),
                "{j:?}"
            );
        }
    }
}
