//! The controller's one model: the objects all sources report, and the wire resources
//! derived from them.
//!
//! Sources send batches of [`SourceEvent`]s through a [`SourceSink`]; a single worker
//! task (the only writer) applies them to a [`Store`], derives the proxy resources again
//! where the batch can have changed them ([`Incremental`]; the whole derivation is
//! [`derive::derive`], which it equals), and publishes an immutable [`Snapshot`] on a
//! `watch` channel. Each snapshot carries a model version that grows with every change,
//! and each resource carries a content hash and the version at which it last changed, so
//! the discovery service can push only what differs from what a proxy already has.
//! Bursts are coalesced into one derivation. What keeps a change cheap at 10,000 pods:
//! objects are `Arc`s shared with the source that sent them (the store holds pointers,
//! not copies); a change derives only the workloads and services it touches; a derived
//! resource equal to the previous one keeps its entry, so unchanged entries are the same
//! allocation from snapshot to snapshot; and each snapshot indexes, once, what every
//! node's workloads need ([`Snapshot::node_scopes`]) for the discovery service.

mod authn;
mod derive;
mod external;
mod incremental;
mod object;
mod peer_auth;
mod pod;
mod policy;
mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ambit_proto::discovery::{resource, Resource, ResourceKey, ResourceKind};
use prost::Message;
use tokio::sync::{mpsc, watch};

pub use authn::check_spec as check_request_authentication;
pub use derive::{derive, Derived, DerivedResource, GATEWAY_NAME_LABEL};
pub use external::{outbound_policy, OUTBOUND_POLICY_LABEL};
pub use incremental::{Changes, Incremental};
pub use object::{Kind, Object, ObjectKey, DEFAULT_NAMESPACE};
pub use pod::MeshPod;
pub use store::Store;
pub(crate) use store::{typed, typed_in};

/// Settings the derivation depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// Namespace whose authorization policies apply mesh-wide, and whose PeerAuthentication
    /// without selector is the mesh-wide mTLS mode.
    pub root_namespace: String,
    /// DNS suffix of service host names (`name.ns.svc.<suffix>`).
    pub domain_suffix: String,
}

impl ModelConfig {
    /// A service's host name: `name.namespace.svc.<suffix>`.
    pub(crate) fn service_hostname(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.domain_suffix)
    }
}

/// True when every selector label is on the object (a Kubernetes equality selector), shared
/// by the derivation of services and the selection of policies.
pub(crate) fn selects(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// An address in its wire form (4 or 16 bytes), shared by the derivation of workloads and
/// services and that of external services.
pub(crate) fn ip_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            trust_domain: "cluster.local".to_string(),
            root_namespace: "ambit-system".to_string(),
            domain_suffix: "cluster.local".to_string(),
        }
    }
}

/// What a source tells the model. Sources batch these; one batch is one model change.
#[allow(clippy::large_enum_variant)] // as `Object`: boxing buys nothing at this rate
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// An object was created or changed (the whole new object). Shared: the local source
    /// keeps each file's parse to compare the next scan with, and the store holds the
    /// same allocation rather than a copy of every object.
    Apply(Arc<Object>),
    /// An object is gone.
    Delete(ObjectKey),
    /// The source's complete view of these kinds: objects of these kinds that are not
    /// listed are gone. A Kubernetes source sends this after each (re)list; the local
    /// source may use it too.
    Replace {
        kinds: Vec<Kind>,
        objects: Vec<Object>,
    },
    /// The source has delivered its initial state. The model serves proxies only once
    /// every source has said this, so no proxy sees a half-loaded mesh.
    Synced,
}

/// Why something in the model failed. `Clone`: the model keeps each object's problems
/// between changes and reports them with every snapshot.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ModelError {
    /// An object could not be converted; it was rejected and the rest still applies.
    #[error("{kind} {namespace}/{name} rejected: field {field}")]
    Rejected {
        kind: Kind,
        namespace: String,
        name: String,
        /// Path of the offending field, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
        field: String,
        /// What is wrong with it.
        #[source]
        reason: FieldError,
    },
    /// An authorization policy's rules could not be converted. Dropping it would open
    /// traffic (a missing DENY, or a missing ALLOW that was the only one), so it is kept
    /// in a form that refuses rather than permits: see `policy::fail_closed`.
    #[error("AuthorizationPolicy {namespace}/{name} is invalid at field {field}; enforced as {enforced} until it is fixed")]
    PolicyFailedClosed {
        namespace: String,
        name: String,
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        #[source]
        reason: FieldError,
        /// What is enforced instead, for the operator reading the log.
        enforced: &'static str,
    },
    /// An `ambit.dev/use-waypoint` label names a waypoint that does not exist or has no
    /// address; the object is served without a waypoint, except an ExternalService, which
    /// is withheld (its egress must not skip the policy it asked for).
    #[error("{kind} {namespace}/{name}: waypoint {waypoint:?} {why}")]
    WaypointUnresolved {
        kind: Kind,
        namespace: String,
        name: String,
        waypoint: String,
        why: &'static str,
    },
    /// A namespace's `ambit.dev/outbound-policy` label is neither `ALLOW_ANY` nor
    /// `REGISTRY_ONLY`; its workloads get `REGISTRY_ONLY` (whoever set it meant to restrict)
    /// until it is fixed.
    #[error("Namespace {namespace}: {field}: {why}; REGISTRY_ONLY is enforced until it is fixed")]
    OutboundPolicyInvalid {
        namespace: String,
        field: String,
        why: String,
    },
    /// The model worker has stopped, so events can no longer be delivered.
    #[error("the model has stopped")]
    Closed,
}

/// What is wrong with one field.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FieldError {
    /// Not an IP address or CIDR.
    #[error("{value:?} is not an IP address or CIDR")]
    Cidr {
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    /// Not an IP address.
    #[error("{value:?} is not an IP address")]
    Ip {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    /// Not a port number (1-65535).
    #[error("{0:?} is not a port number (1-65535)")]
    Port(String),
    /// Not a duration such as `10s` or `250ms`.
    #[error("{0:?} is not a duration such as \"10s\" or \"250ms\"")]
    Duration(String),
    /// A number outside its allowed range.
    #[error("{value} is outside {min}..={max}")]
    Range { value: f64, min: f64, max: f64 },
    /// A value the field does not allow.
    #[error("{0}")]
    Invalid(String),
}

/// A resource's identity in a snapshot: its kind and its name as in [`ResourceKey`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: ResourceKind,
    pub name: String,
}

impl Key {
    /// The key of a resource.
    pub fn of(resource: &Resource) -> Option<Key> {
        let (kind, name) = match resource.kind.as_ref()? {
            resource::Kind::Workload(w) => (ResourceKind::Workload, w.uid.clone()),
            resource::Kind::Service(s) => (
                ResourceKind::Service,
                format!("{}/{}", s.namespace, s.hostname),
            ),
            resource::Kind::Authorization(a) => (
                ResourceKind::Authorization,
                format!("{}/{}", a.namespace, a.name),
            ),
            resource::Kind::Route(r) => {
                (ResourceKind::Route, format!("{}/{}", r.namespace, r.name))
            }
            resource::Kind::TrafficPolicy(t) => (
                ResourceKind::TrafficPolicy,
                format!("{}/{}", t.namespace, t.name),
            ),
            resource::Kind::PeerAuthentication(p) => (
                ResourceKind::PeerAuthentication,
                format!("{}/{}", p.namespace, p.name),
            ),
            resource::Kind::ExternalService(x) => (
                ResourceKind::ExternalService,
                format!("{}/{}", x.namespace, x.name),
            ),
            resource::Kind::RequestAuthentication(a) => (
                ResourceKind::RequestAuthentication,
                format!("{}/{}", a.namespace, a.name),
            ),
        };
        Some(Key { kind, name })
    }

    /// The wire form.
    pub fn to_proto(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind as i32,
            name: self.name.clone(),
        }
    }
}

/// One derived resource in a snapshot.
#[derive(Clone, Debug)]
pub struct Entry {
    /// What proxies receive.
    pub resource: Resource,
    /// Content hash; equal hashes mean a proxy holding one needs nothing new.
    pub hash: u64,
    /// Model version at which this content first appeared.
    pub version: u64,
    /// For services and workloads: `namespace/name` of the waypoint Gateway they use.
    /// Lets the discovery service find what a waypoint is responsible for.
    pub waypoint: Option<String>,
}

/// An immutable view of the model at one version.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Grows by one with every change.
    pub version: u64,
    /// True once every source has delivered its initial state.
    pub ready: bool,
    /// Every derived resource.
    pub resources: BTreeMap<Key, Arc<Entry>>,
    /// Objects rejected or only partly applied by the last derivation.
    pub errors: Arc<Vec<ModelError>>,
    /// What each node's workloads need, computed from `resources` on first use: every
    /// ztunnel's subscription reads it, so one pass over the workloads serves them all
    /// instead of one pass per subscriber.
    pub node_scopes: std::sync::OnceLock<Arc<NodeScopes>>,
    /// What differs from the snapshot before this one, when there was one.
    pub delta: Option<Arc<Delta>>,
}

/// The keys whose entry one snapshot added, removed or replaced since the one before it
/// (`since`, its version), in key order. A subscriber that holds that snapshot diffs only
/// these keys: a change to one pod reaches 100 subscribers without each of them walking
/// its whole selection again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub since: u64,
    pub keys: Vec<Key>,
}

impl Delta {
    /// The keys whose entry is not the same allocation in `before` and `after` (derivation
    /// keeps the `Arc` of every entry it did not change, so that is the change).
    pub fn between(
        since: u64,
        before: &BTreeMap<Key, Arc<Entry>>,
        after: &BTreeMap<Key, Arc<Entry>>,
    ) -> Self {
        let keys = changed_entries(before.iter(), after.iter())
            .map(|(key, _, _)| key.clone())
            .collect();
        Delta { since, keys }
    }
}

/// The entries of two key-ordered sequences that differ, in key order, as `(key, before,
/// after)`: a key on one side only, or under the same key another allocation. Unchanged
/// entries are the same allocation across snapshots, and an entry lives under one key
/// only, so the common case costs no key comparison (comparing 10,000 keys per subscriber
/// per change was once the controller's hottest loop).
pub fn changed_entries<'a>(
    before: impl Iterator<Item = (&'a Key, &'a Arc<Entry>)>,
    after: impl Iterator<Item = (&'a Key, &'a Arc<Entry>)>,
) -> impl Iterator<Item = (&'a Key, Option<&'a Arc<Entry>>, Option<&'a Arc<Entry>>)> {
    let (mut before, mut after) = (before.peekable(), after.peekable());
    std::iter::from_fn(move || loop {
        match (before.peek().copied(), after.peek().copied()) {
            (None, None) => return None,
            (Some((_, old)), Some((_, new))) if Arc::ptr_eq(old, new) => {
                before.next();
                after.next();
            }
            (Some((old_k, old)), Some((new_k, new))) if old_k == new_k => {
                before.next();
                after.next();
                return Some((new_k, Some(old), Some(new)));
            }
            (Some((old_k, _)), Some((new_k, new))) if new_k < old_k => {
                after.next();
                return Some((new_k, None, Some(new)));
            }
            (None, Some((new_k, new))) => {
                after.next();
                return Some((new_k, None, Some(new)));
            }
            (Some((old_k, old)), _) => {
                before.next();
                return Some((old_k, Some(old), None));
            }
        }
    })
}

/// Per node: the namespaces its workloads are in and the selector policies they reference.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeScope {
    pub namespaces: std::collections::BTreeSet<String>,
    pub referenced: std::collections::BTreeSet<String>,
}

/// [`NodeScope`] by node name.
pub type NodeScopes = std::collections::HashMap<String, Arc<NodeScope>>;

impl Snapshot {
    /// The scope of every node with a workload in this snapshot.
    pub fn node_scopes(&self) -> &NodeScopes {
        self.node_scopes.get_or_init(|| {
            let mut scopes: std::collections::HashMap<String, NodeScope> =
                std::collections::HashMap::new();
            let start = Key {
                kind: ResourceKind::Workload,
                name: String::new(),
            };
            let workloads = self
                .resources
                .range(start..)
                .take_while(|(k, _)| k.kind == ResourceKind::Workload);
            for (_, e) in workloads {
                let Some(resource::Kind::Workload(w)) = &e.resource.kind else {
                    continue;
                };
                let scope = match scopes.get_mut(&w.node) {
                    Some(s) => s,
                    None => scopes.entry(w.node.clone()).or_default(),
                };
                if !scope.namespaces.contains(&w.namespace) {
                    scope.namespaces.insert(w.namespace.clone());
                }
                for p in &w.authorization_policies {
                    if !scope.referenced.contains(p) {
                        scope.referenced.insert(p.clone());
                    }
                }
            }
            Arc::new(
                scopes
                    .into_iter()
                    .map(|(node, scope)| (node, Arc::new(scope)))
                    .collect(),
            )
        })
    }
}

/// A content hash that does not depend on map iteration order (prost maps are
/// `HashMap`s, whose encoding order varies between instances).
pub fn content_hash(resource: &Resource) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut canonical = resource.clone();
    match canonical.kind.as_mut() {
        Some(resource::Kind::Workload(w)) => {
            let labels: BTreeMap<_, _> = std::mem::take(&mut w.labels).into_iter().collect();
            labels.hash(&mut hasher);
        }
        Some(resource::Kind::Service(s)) => {
            for e in &mut s.endpoints {
                let ports: BTreeMap<_, _> = std::mem::take(&mut e.ports).into_iter().collect();
                ports.hash(&mut hasher);
            }
        }
        _ => {}
    }
    canonical.encode_to_vec().hash(&mut hasher);
    hasher.finish()
}

/// One batch of events from one source, as the model receives it.
#[derive(Debug)]
pub struct SourceBatch {
    /// Which registered source sent it.
    pub source: usize,
    pub events: Vec<SourceEvent>,
}

/// Where a source sends its events. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SourceSink {
    id: usize,
    name: Arc<str>,
    tx: mpsc::Sender<SourceBatch>,
}

impl SourceSink {
    /// The source's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one batch; the model applies it as one change. Waits when the model is busy,
    /// which slows a source down rather than buffering without bound.
    pub async fn send(&self, events: Vec<SourceEvent>) -> Result<(), ModelError> {
        self.tx
            .send(SourceBatch {
                source: self.id,
                events,
            })
            .await
            .map_err(|_| ModelError::Closed)
    }
}

impl SourceSink {
    /// A sink not connected to a model: the receiver sees exactly what the source sends.
    /// For testing a source on its own.
    pub fn detached(name: &str, capacity: usize) -> (SourceSink, mpsc::Receiver<SourceBatch>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            SourceSink {
                id: 0,
                name: name.into(),
                tx,
            },
            rx,
        )
    }
}

/// Assembles the model: register every source first, then [`ModelBuilder::spawn`].
pub struct ModelBuilder {
    config: ModelConfig,
    names: Vec<Arc<str>>,
    tx: mpsc::Sender<SourceBatch>,
    rx: mpsc::Receiver<SourceBatch>,
}

impl ModelBuilder {
    /// A model with these settings and no sources yet.
    pub fn new(config: ModelConfig) -> Self {
        let (tx, rx) = mpsc::channel(64);
        ModelBuilder {
            config,
            names: Vec::new(),
            tx,
            rx,
        }
    }

    /// Registers a source; the model is ready once every registered source sent
    /// [`SourceEvent::Synced`].
    pub fn sink(&mut self, name: &str) -> SourceSink {
        let name: Arc<str> = name.into();
        self.names.push(name.clone());
        SourceSink {
            id: self.names.len() - 1,
            name,
            tx: self.tx.clone(),
        }
    }

    /// Starts the worker task. The model keeps running while any sink is alive.
    pub fn spawn(self) -> Model {
        let ready = self.names.is_empty();
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot {
            ready,
            ..Snapshot::default()
        }));
        drop(self.tx);
        let worker = Worker {
            incremental: Some(Incremental::new(self.config.clone())),
            config: self.config,
            store: Arc::new(Store::new()),
            changes: Changes::default(),
            pending: vec![true; self.names.len()],
            names: self.names,
            snapshot: snap_tx,
        };
        tokio::spawn(worker.run(self.rx));
        Model { snapshot: snap_rx }
    }
}

/// Read handle on the model. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Model {
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Model {
    /// The latest snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every new snapshot (intermediate ones may be skipped).
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Waits for a snapshot that satisfies `f`.
    pub async fn wait_for(
        &self,
        mut f: impl FnMut(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>, ModelError> {
        let mut rx = self.snapshot.clone();
        let snap = rx
            .wait_for(|s| f(s))
            .await
            .map_err(|_| ModelError::Closed)?;
        Ok(snap.clone())
    }
}

struct Worker {
    config: ModelConfig,
    /// Shared with the derivation thread while it runs, unique otherwise, so applying
    /// events never copies it.
    store: Arc<Store>,
    /// What the events applied since the last derivation changed.
    changes: Changes,
    /// The derivation kept between changes; `None` while it runs (and after it panicked,
    /// until the next change derives everything again).
    incremental: Option<Incremental>,
    names: Vec<Arc<str>>,
    /// Sources that have not sent `Synced` yet.
    pending: Vec<bool>,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<SourceBatch>) {
        while let Some(batch) = rx.recv().await {
            self.apply(batch);
            // Coalesce a burst: everything already queued becomes one derivation.
            while let Ok(batch) = rx.try_recv() {
                self.apply(batch);
            }
            self.publish().await;
        }
        tracing::debug!("every source has stopped; model worker exits");
    }

    fn apply(&mut self, SourceBatch { source: id, events }: SourceBatch) {
        for event in events {
            if matches!(event, SourceEvent::Synced) {
                if let Some(p) = self.pending.get_mut(id) {
                    if *p {
                        tracing::info!(source = %self.names[id], "source synced");
                    }
                    *p = false;
                }
            }
            self.changes.record(&event);
            Arc::make_mut(&mut self.store).apply(event);
        }
    }

    async fn publish(&mut self) {
        let previous = self.snapshot.borrow().clone();
        let version = previous.version + 1;
        // Deriving takes a while (all of it at start, or after a relist); keep it off the
        // runtime's worker threads so discovery streams stay responsive meanwhile.
        let store = self.store.clone();
        let changes = std::mem::take(&mut self.changes);
        let mut incremental = self
            .incremental
            .take()
            .unwrap_or_else(|| Incremental::new(self.config.clone()));
        let before = previous.clone();
        let derived = tokio::task::spawn_blocking(move || {
            let outcome = incremental.update(&store, &changes, version);
            let resources = outcome.changed.then(|| incremental.resources().clone());
            let delta = resources
                .as_ref()
                .map(|after| Arc::new(Delta::between(before.version, &before.resources, after)));
            (incremental, outcome, resources.zip(delta))
        })
        .await;
        let (incremental, outcome, resources) = match derived {
            Ok(d) => d,
            Err(e) => {
                // Its state is lost with it: the next change derives everything again.
                tracing::error!(error = %e, "model derivation panicked; keeping the previous snapshot");
                return;
            }
        };
        self.incremental = Some(incremental);
        let ready = !self.pending.iter().any(|p| *p);
        let mut changed = ready != previous.ready || resources.is_some();
        // Report each problem once, when it appears, rather than on every change.
        let old: std::collections::HashSet<String> =
            previous.errors.iter().map(|e| error_chain(e)).collect();
        let new: Vec<String> = outcome.errors.iter().map(|e| error_chain(e)).collect();
        for e in new.iter().filter(|e| !old.contains(*e)) {
            tracing::warn!(error = %e, "model");
        }
        changed |= new.len() != old.len() || new.iter().any(|e| !old.contains(e));
        if !changed {
            return;
        }
        let (resources, delta) = resources.unwrap_or_else(|| {
            (
                previous.resources.clone(),
                Arc::new(Delta {
                    since: previous.version,
                    keys: Vec::new(),
                }),
            )
        });
        tracing::debug!(
            version,
            resources = resources.len(),
            changed = delta.keys.len(),
            "model changed"
        );
        self.snapshot.send_replace(Arc::new(Snapshot {
            version,
            ready,
            resources,
            errors: Arc::new(outcome.errors),
            node_scopes: Default::default(),
            delta: Some(delta),
        }));
    }
}

/// An error and its causes on one line, for logs and reports.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
