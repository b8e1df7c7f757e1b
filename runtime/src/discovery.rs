//! The proxies' side of the discovery stream (`Discovery.Subscribe`), shared by ztunnel and
//! the waypoint: everything except what a push means.
//!
//! [`run`] opens a stream with the [`Subscriber`]'s `Hello` (and the bearer credential,
//! re-read from its file for every stream so a rotated token is picked up), hands each push
//! to [`Subscriber::apply`], and answers ACK, or NACK with the error as the reason (the
//! subscriber keeps its last good state). When the stream breaks it reconnects with capped,
//! jittered exponential [`Backoff`]; meanwhile the proxy serves from the state it has. The
//! controller answers a new stream with a full state, which replaces everything. A [`Status`]
//! `watch` says what the client is doing, for admin endpoints, metrics and tests.
//!
//! Transport security is the caller's: it passes a [`Connect`] (a tonic [`Endpoint`], or a
//! connector doing SPIFFE TLS such as [`crate::control::channel`]), and any HTTP/2 keep-alive
//! that should detect a silent controller is configured there too.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use ambit_proto::discovery as pb;
use pb::discovery_client::DiscoveryClient as GrpcClient;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

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

/// A lazily connecting channel (e.g. from [`crate::control::channel`]): every stream reuses it,
/// and tonic reconnects it underneath.
impl Connect for Channel {
    fn connect(&self) -> ConnectFuture {
        let channel = self.clone();
        Box::pin(async move { Ok(channel) })
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
/// from its upper half so that the proxies of a cluster do not reconnect in lockstep after a
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

/// What the client is doing, for admin endpoints, metrics and tests.
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

/// What a proxy does with the stream: who it says it is, and what a push means to it.
pub trait Subscriber: Send + 'static {
    /// Why a push was refused; its text is the NACK's reason.
    type Error: std::error::Error + Send;

    /// The `Hello` that opens every stream.
    fn hello(&self) -> pb::Hello;

    /// Applies one push, all or nothing, and returns the version now in force; on error the
    /// last good state stays and the push is NACKed.
    fn apply(&mut self, push: pb::Push) -> Result<u64, Self::Error>;

    /// Runs after the ACK of the push just applied was sent (ztunnel keeps it on disk then,
    /// off the ACK's path).
    fn acked(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How the client connects and retries.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    pub backoff: Backoff,
    /// File holding the bearer token the controller authenticates subscriptions by (the
    /// same credential as the CA's); re-read per stream so a rotated token is picked up.
    pub credential_file: Option<PathBuf>,
    /// The port this proxy serves Prometheus metrics on, announced to the controller in the
    /// [`METRICS_PORT_HEADER`] request metadata so its dashboard can scrape the proxy at the
    /// address the stream comes from (`None`: not announced, never scraped).
    pub metrics_port: Option<u16>,
}

/// The subscription's metadata key announcing the proxy's metrics port (a decimal number).
/// Metadata rather than a `Hello` field: it says where to reach the process, not what the
/// proxy is, and an older controller simply ignores it.
pub const METRICS_PORT_HEADER: &str = "ambit-metrics-port";

/// Runs the client forever (until the task is dropped): one stream at a time, reconnecting
/// with back-off, reporting on `status`.
pub async fn run<S: Subscriber>(
    connector: impl Connect,
    mut subscriber: S,
    config: ClientConfig,
    status: watch::Sender<Status>,
) {
    let mut delay = config.backoff.initial;
    loop {
        let mut applied = false;
        let err = session(&connector, &mut subscriber, &config, &status, &mut applied).await;
        tracing::warn!(error = %err, "discovery stream ended; keeping the last good state");
        status.send_modify(|s| {
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

/// The `authorization` value for the token in `path`, or `None` when it cannot be read: the
/// controller's refusal (unauthenticated) then names what is missing.
async fn bearer(
    path: &std::path::Path,
) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let token = tokio::fs::read_to_string(path).await.ok()?;
    let mut value: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// One stream, from connecting to its end; returns why it ended.
async fn session<S: Subscriber>(
    connector: &impl Connect,
    subscriber: &mut S,
    config: &ClientConfig,
    status: &watch::Sender<Status>,
    applied: &mut bool,
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
    let hello = subscriber.hello();
    let (node, gateway) = (hello.node.clone(), hello.gateway.clone());
    if !send(pb::subscribe_request::Message::Hello(hello)).await {
        return DiscoveryError::Closed;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &config.credential_file {
        if let Some(value) = bearer(path).await {
            request.metadata_mut().insert("authorization", value);
        }
    }
    if let Some(port) = config.metrics_port.filter(|p| *p != 0) {
        request.metadata_mut().insert(
            METRICS_PORT_HEADER,
            tonic::metadata::MetadataValue::from(port),
        );
    }
    let mut stream = match client.subscribe(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return DiscoveryError::Subscribe(status),
    };
    status.send_modify(|s| {
        s.connected = true;
        s.streams += 1;
    });
    tracing::info!(%node, %gateway, "discovery stream established");
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
        let reply = match subscriber.apply(push) {
            Ok(version) => {
                tracing::debug!(version, %nonce, "push applied");
                *applied = true;
                status.send_modify(|s| {
                    s.version = version;
                    s.acks += 1;
                });
                pb::subscribe_request::Message::Ack(pb::Ack { nonce })
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(%nonce, %reason, "push refused; keeping the last good state");
                status.send_modify(|s| {
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
        if ack {
            subscriber.acked().await;
        }
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
