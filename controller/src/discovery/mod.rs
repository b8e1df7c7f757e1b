//! The discovery service: one bidirectional gRPC stream per proxy (`Discovery.Subscribe`).
//!
//! A proxy says `Hello` first; it then gets a full-state push of what it needs (see
//! [`view`]) and afterwards only changes. Each stream has its own task that watches the
//! model's snapshots and a bounded queue towards the proxy: a proxy that reads slowly only
//! blocks its own task, never the model or other proxies. While it is blocked, snapshots
//! keep coming but only the latest matters: when the queue frees up, the task diffs the
//! latest view against what it last queued (the snapshot it last pushed, not a log),
//! so a slow proxy receives one push with the net difference. Every push has a nonce; ACKs
//! and NACKs are recorded in [`metrics`] (a NACK is logged with the proxy's reason, and
//! the model moves on regardless: the proxy keeps its last good state). The diff against
//! the last push walks both selections in key order but skips, by pointer, every entry
//! the two snapshots share; each push is encoded into an allocation of its own size by
//! this service's [`route`], so a subscriber holds no buffer between pushes.
//!
//! With an authenticator ([`DiscoveryService::with_authenticator`], always set in
//! production) a subscriber must prove, by its bearer token, that it is the proxy its
//! `Hello` names: a node's credential subscribes only for that node, so one compromised
//! ztunnel cannot read another node's view.

pub mod metrics;
pub mod route;
pub mod view;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::discovery::discovery_server::Discovery;
use ambit_proto::discovery::{subscribe_request, Push, SubscribeRequest};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::ca::auth::{AuthError, Authenticator, Caller};
use crate::model::Model;
pub use metrics::{Registry, SubscriberStats, Totals};
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
    /// The caller's credential proves nothing.
    #[error("unauthenticated")]
    Unauthenticated(#[source] AuthError),
    /// The caller may not subscribe as the proxy its `Hello` names.
    #[error("{caller} may not subscribe as {proxy}: {why}")]
    NotAllowed {
        /// Who the credential says the caller is.
        caller: String,
        /// What the `Hello` claimed.
        proxy: String,
        /// Which rule refused it.
        why: &'static str,
    },
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
            DiscoveryError::Unauthenticated(a) => a.to_status(),
            DiscoveryError::NotAllowed { .. } => Status::permission_denied(e.to_string()),
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
    /// Checks callers' bearer tokens; `None` serves anyone (tests on loopback).
    authenticator: Option<Authenticator>,
    /// Turns true when the controller shuts down: every push stream then ends cleanly.
    closing: watch::Receiver<bool>,
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
            authenticator: None,
            // Without `with_shutdown`, never closing (see `shutting_down`).
            closing: watch::Sender::new(false).subscribe(),
        }
    }

    /// Ends every push stream (with an OK status) once `closing` turns true, so a
    /// graceful server shutdown does not wait on streams that never end by themselves.
    pub fn with_shutdown(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = closing;
        self
    }

    /// Requires every subscriber to authenticate as the proxy its `Hello` names: a
    /// ztunnel's credential must be its node's, a waypoint's its own service account's
    /// (in the Gateway's namespace). Production always sets this.
    pub fn with_authenticator(mut self, authenticator: Authenticator) -> Self {
        self.authenticator = Some(authenticator);
        self
    }

    /// Per-subscriber statistics, for the metrics endpoint.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// The route to mount on a server: this service behind its own encoding of pushes,
    /// which frees each push once it is written (see [`route`]). Pushes have no size
    /// limit: a full state of a large mesh exceeds tonic's 4 MiB default.
    pub fn into_server(self) -> route::DiscoveryRoute {
        route::DiscoveryRoute::new(self)
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
        let peer = crate::conn::peer_addr(&request);
        // Authenticate before reading anything else: an unknown caller learns nothing.
        let caller = match &self.authenticator {
            Some(a) => Some(
                a.authenticate(request.metadata())
                    .await
                    .map_err(DiscoveryError::Unauthenticated)
                    .inspect_err(|e| tracing::warn!(?peer, error = %crate::model::error_chain(e), "subscription refused"))?,
            ),
            None => None,
        };
        let metrics_addr = announced_metrics_addr(peer, request.metadata());
        let mut inbound = request.into_inner();
        let proxy = read_hello(&mut inbound).await?;
        if let Some(caller) = &caller {
            may_subscribe(caller, &proxy)
                .inspect_err(|e| tracing::warn!(?peer, error = %e, "subscription refused"))?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registration = Arc::new(self.registry.register(id, proxy.to_string(), metrics_addr));
        tracing::info!(id, %proxy, ?peer, "proxy subscribed");

        let (tx, rx) = mpsc::channel(self.options.queue_depth.max(1));
        let pusher = Pusher {
            id,
            proxy: proxy.clone(),
            snapshots: self.model.watch(),
            trust_roots: self.trust_roots.clone(),
            tx,
            registration: registration.clone(),
            closing: self.closing.clone(),
        };
        let mut push_task = tokio::spawn(pusher.run());
        // ACKs and NACKs; when the proxy's side ends, stop pushing. When pushing ends
        // first (shutdown), stop reading too: dropping the request stream lets the HTTP/2
        // stream close, or a graceful shutdown would wait on it forever.
        tokio::spawn(async move {
            tokio::select! {
                () = read_acks(id, &mut inbound, &registration) => push_task.abort(),
                _ = &mut push_task => {}
            }
            drop(inbound);
            tracing::info!(id, %proxy, "proxy unsubscribed");
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Where a subscriber serves its metrics: the address its stream comes from, with the port
/// it announced. Only the port is taken from the proxy, so an authenticated proxy cannot
/// point the controller's scraper at another host.
fn announced_metrics_addr(
    peer: Option<std::net::SocketAddr>,
    metadata: &tonic::metadata::MetadataMap,
) -> Option<std::net::SocketAddr> {
    let port = metadata
        .get(ambit_runtime::discovery::METRICS_PORT_HEADER)?
        .to_str()
        .ok()?
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)?;
    Some(std::net::SocketAddr::new(peer?.ip().to_canonical(), port))
}

/// Whether an authenticated `caller` may subscribe as `proxy`.
fn may_subscribe(caller: &Caller, proxy: &Proxy) -> Result<(), DiscoveryError> {
    let refuse = |why| DiscoveryError::NotAllowed {
        caller: caller.to_string(),
        proxy: proxy.to_string(),
        why,
    };
    match (caller, proxy) {
        (Caller::Node { node: own }, Proxy::Ztunnel { node, .. }) if own == node => Ok(()),
        (Caller::Node { .. }, Proxy::Ztunnel { .. }) => {
            Err(refuse("a ztunnel may only subscribe for its own node"))
        }
        (
            Caller::Workload { identity: own, .. },
            Proxy::Waypoint {
                gateway, identity, ..
            },
        ) => {
            if identity.parse::<ambit_hbone::Identity>().ok().as_ref() != Some(own) {
                return Err(refuse("a waypoint must name its own identity"));
            }
            match gateway.split_once('/') {
                Some((ns, _)) if ns == own.namespace() => Ok(()),
                _ => Err(refuse(
                    "a waypoint may only serve a Gateway of its own namespace",
                )),
            }
        }
        (Caller::Node { .. }, Proxy::Waypoint { .. }) => {
            Err(refuse("a node credential cannot subscribe as a waypoint"))
        }
        (Caller::Workload { .. }, Proxy::Ztunnel { .. }) => Err(refuse(
            "only the ztunnel service account may subscribe as a ztunnel",
        )),
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

/// Completes once `closing` turns true; never, if its sender is gone without that.
async fn shutting_down(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
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
    closing: watch::Receiver<bool>,
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
                let (upserts, removals, next) = view::diff(&snapshot, &self.proxy, sent.as_ref());
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
                () = shutting_down(&mut self.closing) => {
                    tracing::debug!(id = self.id, "controller shutting down; ending the push stream");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_is_the_peer_with_the_announced_port_only() {
        let peer = Some(std::net::SocketAddr::from(([10, 77, 0, 11], 40112)));
        let with = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert(
                ambit_runtime::discovery::METRICS_PORT_HEADER,
                v.parse().expect("ascii"),
            );
            m
        };
        assert_eq!(
            announced_metrics_addr(peer, &with("15020")),
            Some(([10, 77, 0, 11], 15020).into())
        );
        // A host in the value is not a port: nothing is scraped rather than another host.
        for bad in ["10.0.0.1:15020", "0", "70000", ""] {
            assert_eq!(announced_metrics_addr(peer, &with(bad)), None, "{bad:?}");
        }
        let none = tonic::metadata::MetadataMap::new();
        assert_eq!(announced_metrics_addr(peer, &none), None);
        assert_eq!(announced_metrics_addr(None, &with("15020")), None);
        // An IPv4 peer seen on a dual-stack socket is scraped at its IPv4 address.
        let mapped = "[::ffff:10.77.0.12]:5000".parse().ok();
        assert_eq!(
            announced_metrics_addr(mapped, &with("15020")),
            Some(([10, 77, 0, 12], 15020).into())
        );
    }
}
