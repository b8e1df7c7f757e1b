//! The Kubernetes source: one kube-rs watcher per kind the model understands, each feeding
//! the model, producing the same [`SourceEvent`]s as the local source.
//!
//! Per kind, a watcher lists then watches cluster-wide with kube-rs' default back-off; managed
//! fields are stripped before anything reaches the model. The model is the only cache: no
//! reflector store keeps a second, whole copy of each object (of each Pod, 5 KB before its
//! strings, where the model keeps the fields the mesh reads). Each completed (re)list becomes one
//! [`SourceEvent::Replace`] for that kind, so objects deleted while the watch was away (a `410
//! Gone` forces a relist) disappear from the model; later changes are `Apply`/`Delete`. Once
//! every kind has completed its first list the source sends [`SourceEvent::Synced`], so the
//! model never serves a half-loaded cluster.
//!
//! A kind whose resource the API server does not serve (a CRD that is not installed: LIST is
//! 404) counts as listed-and-empty, so the Gateway API being absent neither blocks readiness nor
//! stops the other kinds; its watcher keeps retrying with back-off and picks the CRD up when it
//! is installed. Any other failure (403 from missing RBAC, the API server being away) keeps the
//! kind unsynced and is logged at every retry.

use std::collections::HashSet;
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::model::{Kind, ModelError, Object, ObjectKey, SourceEvent, SourceSink};

/// Why the Kubernetes source could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig file could not be read or used.
    #[error("loading kubeconfig {path}")]
    Kubeconfig {
        /// The file given with `--kubeconfig`.
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster configuration nor a default kubeconfig was found.
    #[error("finding Kubernetes credentials (in-cluster or ~/.kube/config)")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The model stopped accepting events.
    #[error("sending events to the model")]
    Model(#[source] ModelError),
    /// A watcher task panicked or was cancelled.
    #[error("a watcher task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
}

/// Client configuration: the given kubeconfig file, else in-cluster credentials, else the
/// default kubeconfig (`KUBECONFIG`, `~/.kube/config`).
pub async fn client_config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubeSourceError> {
    match kubeconfig {
        Some(path) => {
            let err = |source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)
        }
        None => kube::Config::infer().await.map_err(KubeSourceError::Infer),
    }
}

/// The Kubernetes source. Its readiness can be handed out before it runs.
pub struct KubeSource {
    client: Client,
    config: watcher::Config,
    ready_tx: watch::Sender<bool>,
}

impl KubeSource {
    /// A source with kube-rs' default watcher settings.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            config: watcher::Config::default(),
            ready_tx: watch::channel(false).0,
        }
    }

    /// A source for the cluster named by `kubeconfig`, else in-cluster credentials, else the
    /// default kubeconfig (see [`client_config`]).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, KubeSourceError> {
        let config = client_config(kubeconfig).await?;
        let client = Client::try_from(config).map_err(KubeSourceError::Client)?;
        Ok(Self::new(client))
    }

    /// Sets the watcher settings (watch timeout, page size, bookmarks).
    pub fn watcher_config(mut self, config: watcher::Config) -> Self {
        self.config = config;
        self
    }

    /// True once every kind completed its first list (or is not served by the cluster).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Runs one watcher per kind until the model stops (or a watcher task dies).
    pub async fn run(self, sink: SourceSink) -> Result<(), KubeSourceError> {
        let sync = Arc::new(SyncTracker {
            pending: Mutex::new(Kind::ALL.iter().copied().collect()),
            ready: self.ready_tx,
        });
        let mut s = Spawner {
            client: self.client,
            sink,
            config: self.config,
            sync,
            tasks: JoinSet::new(),
        };
        s.kind(Kind::Namespace, Object::Namespace);
        s.kind::<Node>(Kind::Node, |n| Object::Node(Box::new(n)));
        s.kind(Kind::ServiceAccount, Object::ServiceAccount);
        s.kind::<Pod>(Kind::Pod, |p| Object::Pod(p.into()));
        s.kind(Kind::Service, Object::Service);
        s.kind(Kind::EndpointSlice, Object::EndpointSlice);
        s.kind(Kind::Gateway, Object::Gateway);
        s.kind(Kind::HttpRoute, Object::HttpRoute);
        s.kind(Kind::GrpcRoute, Object::GrpcRoute);
        s.kind(Kind::AuthorizationPolicy, Object::AuthorizationPolicy);
        s.kind(Kind::TrafficPolicy, Object::TrafficPolicy);
        s.kind(Kind::PeerAuthentication, Object::PeerAuthentication);
        s.kind(Kind::RequestAuthentication, Object::RequestAuthentication);
        s.kind(Kind::ExternalService, Object::ExternalService);
        let mut tasks = s.tasks;
        let first = tasks.join_next().await;
        tasks.abort_all();
        match first {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(KubeSourceError::Task(e)),
            None => Ok(()),
        }
    }
}

impl super::Source for KubeSource {
    fn name(&self) -> &str {
        "kubernetes"
    }

    fn run(self: Box<Self>, sink: SourceSink) -> super::SourceFuture {
        Box::pin(async move {
            KubeSource::run(*self, sink)
                .await
                .map_err(super::SourceError::from)
        })
    }
}

/// Counts down the kinds whose first list is still outstanding.
struct SyncTracker {
    pending: Mutex<HashSet<Kind>>,
    ready: watch::Sender<bool>,
}

impl SyncTracker {
    /// Marks a kind listed; true for exactly the call that completes the set.
    fn listed(&self, kind: Kind) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let completes = pending.remove(&kind) && pending.is_empty();
        if completes {
            self.ready.send_replace(true);
        }
        completes
    }
}

/// Builds the per-kind watcher tasks.
struct Spawner {
    client: Client,
    sink: SourceSink,
    config: watcher::Config,
    sync: Arc<SyncTracker>,
    tasks: JoinSet<Result<(), KubeSourceError>>,
}

impl Spawner {
    fn kind<K>(&mut self, kind: Kind, wrap: fn(K) -> Object)
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let stream = watcher(api, self.config.clone())
            .default_backoff()
            // Managed fields are large and nobody reads them: drop them before the model
            // keeps the object.
            .modify(|obj: &mut K| obj.managed_fields_mut().clear())
            .boxed();
        let task = KindWatch {
            kind,
            wrap,
            sink: self.sink.clone(),
            sync: self.sync.clone(),
        };
        self.tasks.spawn(task.run(stream));
    }
}

/// Turns one kind's watcher events into model events.
struct KindWatch<K> {
    kind: Kind,
    wrap: fn(K) -> Object,
    sink: SourceSink,
    sync: Arc<SyncTracker>,
}

/// What a watcher error means for the source.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// LIST said 404: the resource is not served (its CRD is not installed).
    NotServed,
    /// The watch resumed from a compacted version: a relist follows, nothing is wrong.
    Expired,
    /// Anything else: the kind is stale until a retry succeeds.
    Other,
}

fn classify(err: &watcher::Error) -> Failure {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404 => {
            Failure::NotServed
        }
        watcher::Error::WatchError(s) if s.code == 410 => Failure::Expired,
        _ => Failure::Other,
    }
}

impl<K> KindWatch<K>
where
    K: Resource + Clone + Debug + Send + 'static,
{
    async fn run(
        self,
        mut stream: futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    ) -> Result<(), KubeSourceError> {
        let kind = self.kind;
        let mut listing: Option<Vec<Object>> = None;
        let mut not_served = false;
        while let Some(item) = stream.next().await {
            let (events, listed) = match item {
                Ok(watcher::Event::Init) => {
                    listing = Some(Vec::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    listing.get_or_insert_with(Vec::new).push((self.wrap)(obj));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    let objects = listing.take().unwrap_or_default();
                    tracing::debug!(%kind, objects = objects.len(), "listed");
                    not_served = false;
                    (
                        vec![SourceEvent::Replace {
                            kinds: vec![kind],
                            objects,
                        }],
                        true,
                    )
                }
                Ok(watcher::Event::Apply(obj)) => {
                    (vec![SourceEvent::Apply(Arc::new((self.wrap)(obj)))], false)
                }
                Ok(watcher::Event::Delete(obj)) => {
                    (vec![SourceEvent::Delete(key_of(kind, &obj))], false)
                }
                Err(err) => match classify(&err) {
                    Failure::NotServed if !not_served => {
                        not_served = true;
                        listing = None;
                        tracing::warn!(
                            %kind,
                            api_version = kind.api_version(),
                            "the API server does not serve this kind (CRD not installed?); \
                             treating it as empty and retrying with back-off"
                        );
                        // The cluster has none of these: forget any we had.
                        (
                            vec![SourceEvent::Replace {
                                kinds: vec![kind],
                                objects: Vec::new(),
                            }],
                            true,
                        )
                    }
                    Failure::NotServed => {
                        tracing::debug!(%kind, "still not served; retrying");
                        continue;
                    }
                    Failure::Expired => {
                        tracing::info!(%kind, "watch expired (410 Gone); relisting");
                        continue;
                    }
                    Failure::Other => {
                        tracing::warn!(%kind, error = %crate::model::error_chain(&err),
                            "watch failed; retrying with back-off");
                        continue;
                    }
                },
            };
            self.sink
                .send(events)
                .await
                .map_err(KubeSourceError::Model)?;
            // Synced goes after this kind's Replace, and the last kind to list sends it, so the
            // model sees every kind's full state before it is told the source is ready.
            if listed && self.sync.listed(kind) {
                tracing::info!("every kind listed; Kubernetes source synced");
                self.sink
                    .send(vec![SourceEvent::Synced])
                    .await
                    .map_err(KubeSourceError::Model)?;
            }
        }
        Ok(())
    }
}

/// The model key of a Kubernetes object.
fn key_of<K: Resource>(kind: Kind, obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey::new(
        kind,
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, reason: &str) -> kube::core::Status {
        kube::core::Status {
            code,
            reason: reason.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn classifies_watcher_failures() {
        let list = |code| {
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(api_error(code, "x"))))
        };
        assert_eq!(classify(&list(404)), Failure::NotServed);
        assert_eq!(classify(&list(403)), Failure::Other);
        let gone = watcher::Error::WatchError(Box::new(api_error(410, "Expired")));
        assert_eq!(classify(&gone), Failure::Expired);
        let other = watcher::Error::WatchError(Box::new(api_error(500, "InternalError")));
        assert_eq!(classify(&other), Failure::Other);
    }

    #[test]
    fn ready_exactly_once_when_the_last_kind_lists() {
        let (tx, rx) = watch::channel(false);
        let tracker = SyncTracker {
            pending: Mutex::new([Kind::Pod, Kind::Node].into_iter().collect()),
            ready: tx,
        };
        assert!(!tracker.listed(Kind::Pod));
        assert!(!tracker.listed(Kind::Pod), "a relist does not count twice");
        assert!(!*rx.borrow());
        assert!(tracker.listed(Kind::Node));
        assert!(*rx.borrow());
        assert!(!tracker.listed(Kind::Node), "Synced is sent once");
    }
}
