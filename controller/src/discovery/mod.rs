//! The discovery service: one bidirectional gRPC stream per proxy (`Discovery.Subscribe`).
//!
//! A proxy says `Hello` first; it then gets a full-state push of what it needs (see
//! [`view`]) and afterwards only changes. Each stream has its own task that watches the
//! model's snapshots and a bounded queue towards the proxy: a proxy that reads slowly only
//! blocks its own task, never the model or other proxies. While it is blocked, snapshots
//! keep coming but only the latest matters: when the queue frees up, the task diffs the
//! latest view against what it last queued (a "sent" map of content hashes, not a log),
//! so a slow proxy receives one push with the net difference. Every push has a nonce; ACKs
//! and NACKs are recorded in [`metrics`] (a NACK is logged with the proxy's reason, and
//! the model moves on regardless: the proxy keeps its last good state).

pub mod metrics;
pub mod view;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::discovery::discovery_server::{Discovery, DiscoveryServer};
use ambit_proto::discovery::{subscribe_request, Push, SubscribeRequest};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::model::Model;
pub use metrics::{Registry, SubscriberStats};
pub use view::Proxy;

/// How long a new stream may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a subscription was refused or ended.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The stream ended or failed before a `Hello`.
    #[error("stream ended before hello")]
    NoHello(#[source] Option<Status>),
    /// The first message was not a `Hello`.
    #[error("the first message must be a hello")]
    NotHello,
    /// No `Hello` within the allowed time.
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    /// The `Hello` does not describe a proxy we can serve.
    #[error("bad hello: {0}")]
    BadHello(&'static str),
}

impl From<DiscoveryError> for Status {
    /// The one place discovery errors become gRPC statuses.
    fn from(e: DiscoveryError) -> Status {
        match &e {
            DiscoveryError::NoHello(Some(s)) => s.clone(),
            DiscoveryError::NoHello(None)
            | DiscoveryError::NotHello
            | DiscoveryError::BadHello(_) => Status::invalid_argument(e.to_string()),
            DiscoveryError::HelloTimeout(_) => Status::deadline_exceeded(e.to_string()),
        }
    }
}

/// Settings of the discovery service.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    /// Pushes queued per subscriber before its task waits. Small on purpose: a deeper
    /// queue only delays coalescing.
    pub queue_depth: usize,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        DiscoveryOptions { queue_depth: 2 }
    }
}

/// The `Discovery` gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct DiscoveryService {
    model: Model,
    trust_roots: watch::Receiver<Arc<Vec<String>>>,
    options: DiscoveryOptions,
    registry: Registry,
    next_id: Arc<AtomicU64>,
}

impl DiscoveryService {
    /// A service pushing from `model`. `trust_roots` is the PEM bundle proxies must trust;
    /// when it changes (CA rotation) every subscriber is sent the new bundle.
    pub fn new(
        model: Model,
        trust_roots: watch::Receiver<Arc<Vec<String>>>,
        options: DiscoveryOptions,
    ) -> Self {
        DiscoveryService {
            model,
            trust_roots,
            options,
            registry: Registry::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Per-subscriber statistics, for the metrics endpoint.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// The tonic service to mount on a server.
    pub fn into_server(self) -> DiscoveryServer<Self> {
        // Full-state pushes of a large mesh exceed tonic's 4 MiB default.
        DiscoveryServer::new(self).max_encoding_message_size(usize::MAX)
    }
}

/// The stream of pushes towards one proxy.
pub type PushStream = Pin<Box<dyn Stream<Item = Result<Push, Status>> + Send>>;

async fn read_hello(inbound: &mut Streaming<SubscribeRequest>) -> Result<Proxy, DiscoveryError> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
        .await
        .map_err(|_| DiscoveryError::HelloTimeout(HELLO_TIMEOUT))?;
    let msg = match first {
        None => return Err(DiscoveryError::NoHello(None)),
        Some(Err(s)) => return Err(DiscoveryError::NoHello(Some(s))),
        Some(Ok(m)) => m,
    };
    match msg.message {
        Some(subscribe_request::Message::Hello(h)) => {
            Proxy::try_from(&h).map_err(DiscoveryError::BadHello)
        }
        _ => Err(DiscoveryError::NotHello),
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<PushStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let proxy = read_hello(&mut inbound).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registration = Arc::new(self.registry.register(id, proxy.to_string()));
        tracing::info!(id, %proxy, ?peer, "proxy subscribed");

        let (tx, rx) = mpsc::channel(self.options.queue_depth.max(1));
        let pusher = Pusher {
            id,
            proxy: proxy.clone(),
            snapshots: self.model.watch(),
            trust_roots: self.trust_roots.clone(),
            tx,
            registration: registration.clone(),
        };
        let push_task = tokio::spawn(pusher.run());
        // ACKs and NACKs; when the proxy's side ends, stop pushing.
        tokio::spawn(async move {
            read_acks(id, &mut inbound, &registration).await;
            push_task.abort();
            tracing::info!(id, %proxy, "proxy unsubscribed");
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn read_acks(
    id: u64,
    inbound: &mut Streaming<SubscribeRequest>,
    registration: &metrics::Registration,
) {
    while let Some(msg) = inbound.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(status) => {
                tracing::debug!(id, %status, "subscriber stream failed");
                return;
            }
        };
        match msg.message {
            Some(subscribe_request::Message::Ack(ack)) => {
                if !registration.metrics.acked(&ack.nonce) {
                    tracing::debug!(id, nonce = %ack.nonce, "ACK for an unknown nonce");
                }
            }
            Some(subscribe_request::Message::Nack(nack)) => {
                tracing::warn!(id, nonce = %nack.nonce, reason = %nack.reason, "proxy refused a push; it keeps its last good state");
                registration.metrics.nacked(&nack.nonce, &nack.reason);
            }
            Some(subscribe_request::Message::Hello(_)) | None => {
                tracing::debug!(id, "ignoring a repeated hello or empty message");
            }
        }
    }
}

/// One subscriber's push task.
struct Pusher {
    id: u64,
    proxy: Proxy,
    snapshots: watch::Receiver<Arc<crate::model::Snapshot>>,
    trust_roots: watch::Receiver<Arc<Vec<String>>>,
    tx: mpsc::Sender<Result<Push, Status>>,
    registration: Arc<metrics::Registration>,
}

impl Pusher {
    async fn run(mut self) {
        let mut sent: Option<view::Sent> = None;
        let mut seq = 0u64;
        let mut roots_changed = false;
        loop {
            let snapshot = self.snapshots.borrow_and_update().clone();
            // Serve nothing until every source has loaded: a half-loaded mesh would make
            // proxies drop workloads they still need.
            if snapshot.ready {
                let view = view::view(&snapshot, &self.proxy);
                let (upserts, removals, next) = view::diff(&view, sent.as_ref());
                let full_state = sent.is_none();
                let trust_roots = if full_state || roots_changed {
                    self.trust_roots.borrow_and_update().to_vec()
                } else {
                    Vec::new()
                };
                if full_state || roots_changed || !upserts.is_empty() || !removals.is_empty() {
                    seq += 1;
                    let nonce = format!("{}-{seq}", self.id);
                    let push = Push {
                        nonce: nonce.clone(),
                        full_state,
                        version: snapshot.version,
                        upserts,
                        removals,
                        trust_roots,
                    };
                    tracing::debug!(id = self.id, %nonce, full_state, upserts = push.upserts.len(), removals = push.removals.len(), version = snapshot.version, "push");
                    self.registration.metrics.pushed(&nonce, snapshot.version);
                    // Waits while the proxy's queue is full; only this task is held up.
                    if self.tx.send(Ok(push)).await.is_err() {
                        return;
                    }
                    sent = Some(next);
                    roots_changed = false;
                }
            }
            tokio::select! {
                r = self.snapshots.changed() => if r.is_err() { return },
                r = self.trust_roots.changed() => match r {
                    Ok(()) => roots_changed = true,
                    Err(_) => return,
                },
                () = self.tx.closed() => return,
            }
        }
    }
}
