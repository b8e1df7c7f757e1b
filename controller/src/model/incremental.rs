//! The derivation kept between changes: after a change, only the workloads and services
//! it can touch are derived again, and every other resource keeps its entry (the same
//! `Arc`, which the discovery service's diff skips by pointer).
//!
//! What a change touches:
//! - a pod: its workload, and the services of its namespace (their endpoints);
//! - a service: itself; an endpoint slice: the services of its namespace;
//! - anything else only through the [`Context`] (waypoints, selector policies, namespace
//!   labels and outbound policies, node zones, load-balancing algorithms), which is
//!   computed whole on each change and compared with the previous one: a namespace whose
//!   labels or selector policies changed has its workloads (and, for labels, services)
//!   derived again; a changed waypoint or root-namespace selector policy, every workload
//!   and service; a changed zone, every workload.
//!
//! Policies, routes, traffic policies, peer and request authentications and external
//! services are few and derived whole ([`super::derive::policies`]). The result is the
//! same as [`super::derive`] from scratch (a unit test applies random changes both
//! ways); a kind replaced wholesale (a Kubernetes relist) makes every object of it new.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::derive::{self, Context, Derived, DerivedResource, Labels};
use super::policy::SelectorPolicy;
use super::{content_hash, Entry, Key, Kind, ModelConfig, ModelError, ObjectKey, Store};
use ambit_proto::discovery::{resource, Resource};

/// The objects the sources changed since the last derivation.
#[derive(Debug, Default)]
pub struct Changes {
    /// Objects applied or deleted.
    pub keys: HashSet<ObjectKey>,
    /// Kinds replaced wholesale: every object of them may have changed.
    pub kinds: BTreeSet<Kind>,
}

impl Changes {
    /// Records what one event changes.
    pub fn record(&mut self, event: &super::SourceEvent) {
        match event {
            super::SourceEvent::Apply(o) => {
                if let Some(k) = o.key() {
                    self.keys.insert(k);
                }
            }
            super::SourceEvent::Delete(k) => {
                self.keys.insert(k.clone());
            }
            super::SourceEvent::Replace { kinds, objects } => {
                self.kinds.extend(kinds.iter().copied());
                self.keys.extend(objects.iter().filter_map(|o| o.key()));
            }
            super::SourceEvent::Synced => {}
        }
    }
}

/// A store object of a namespaced kind: (namespace, name).
type Id = (String, String);

/// Pods' or services' derivations kept between changes.
#[derive(Debug, Default)]
struct Derivations {
    /// The key of each object's resource (objects that derive nothing are absent).
    keys: HashMap<Id, Key>,
    /// The objects deriving each key: one, unless two pods share a uid; the last in store
    /// order wins, as in a full derivation.
    owners: HashMap<Key, BTreeSet<Id>>,
    /// The problems found deriving each object, for the objects that have some.
    errors: BTreeMap<Id, Vec<ModelError>>,
}

/// What [`Incremental::update`] did.
#[derive(Debug)]
pub struct Outcome {
    /// Some resource was added, changed or removed.
    pub changed: bool,
    /// Every problem the current derivation has (not only the new ones).
    pub errors: Vec<ModelError>,
}

/// The model's derivation, updated change by change. Its `resources` are what a full
/// [`super::derive`] of the same store would give, as entries.
pub struct Incremental {
    config: ModelConfig,
    /// The previous context, `None` before the first derivation.
    context: Option<ContextSummary>,
    workloads: Derivations,
    services: Derivations,
    /// The resources of [`derive::policies`] last time, and its problems.
    policy_keys: BTreeSet<Key>,
    policy_errors: Vec<ModelError>,
    /// Problems of the context itself (invalid policies and namespace labels).
    context_errors: Vec<ModelError>,
    /// Every derived resource.
    resources: BTreeMap<Key, Arc<Entry>>,
}

/// The parts of a [`Context`] that workload and service derivations read, kept to compare
/// with the next one.
struct ContextSummary {
    waypoints: derive::Waypoints,
    root_namespace: String,
    selectors: BTreeMap<String, Vec<SelectorPolicy>>,
    namespaces: HashMap<String, Option<Labels>>,
    outbound: HashMap<String, ambit_proto::discovery::OutboundPolicy>,
    zones: HashMap<String, String>,
    lb: HashMap<Id, ambit_proto::discovery::LoadBalancing>,
}

/// Which pods and services to derive again.
#[derive(Default)]
struct Dirty {
    all_pods: bool,
    all_services: bool,
    pods: BTreeSet<Id>,
    services: BTreeSet<Id>,
    /// Namespaces whose pods, services are all derived again.
    pod_namespaces: BTreeSet<String>,
    service_namespaces: BTreeSet<String>,
}

/// The keys on which two maps differ (present in one only, or with different values).
fn differing<'a, K: Eq + std::hash::Hash + Clone + 'a, V: PartialEq>(
    a: &'a HashMap<K, V>,
    b: &'a HashMap<K, V>,
) -> impl Iterator<Item = &'a K> + 'a {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
}

impl ContextSummary {
    fn of(context: &Context) -> Self {
        ContextSummary {
            waypoints: context.waypoints.clone(),
            root_namespace: context.authz.root_namespace().to_string(),
            selectors: context.authz.selectors(),
            namespaces: context.namespaces.clone(),
            outbound: context.outbound.clone(),
            zones: context.zones.clone(),
            lb: context.lb.clone(),
        }
    }

    /// Marks what differs between `self` (before) and `now` in `dirty`.
    fn compare(&self, now: &ContextSummary, dirty: &mut Dirty) {
        if self.waypoints != now.waypoints {
            dirty.all_pods = true;
            dirty.all_services = true;
        }
        if self.zones != now.zones {
            dirty.all_pods = true;
        }
        let empty = Vec::new();
        let namespaces: BTreeSet<&String> =
            self.selectors.keys().chain(now.selectors.keys()).collect();
        for ns in namespaces {
            let (a, b) = (
                self.selectors.get(ns).unwrap_or(&empty),
                now.selectors.get(ns).unwrap_or(&empty),
            );
            if a != b {
                if *ns == now.root_namespace {
                    dirty.all_pods = true;
                }
                dirty.pod_namespaces.insert(ns.clone());
            }
        }
        for ns in differing(&self.namespaces, &now.namespaces) {
            dirty.pod_namespaces.insert(ns.clone());
            dirty.service_namespaces.insert(ns.clone());
        }
        for ns in differing(&self.outbound, &now.outbound) {
            dirty.pod_namespaces.insert(ns.clone());
        }
        for id in differing(&self.lb, &now.lb) {
            dirty.services.insert(id.clone());
        }
    }
}

impl Incremental {
    /// Nothing derived yet: the first [`Incremental::update`] derives everything.
    pub fn new(config: ModelConfig) -> Self {
        Incremental {
            config,
            context: None,
            workloads: Derivations::default(),
            services: Derivations::default(),
            policy_keys: BTreeSet::new(),
            policy_errors: Vec::new(),
            context_errors: Vec::new(),
            resources: BTreeMap::new(),
        }
    }

    /// Every derived resource, as of the last update.
    pub fn resources(&self) -> &BTreeMap<Key, Arc<Entry>> {
        &self.resources
    }

    /// Brings the derivation up to `store`, which differs from the store of the previous
    /// update by `changes`. New content gets `version`.
    pub fn update(&mut self, store: &Store, changes: &Changes, version: u64) -> Outcome {
        let mut context_errors = Vec::new();
        let context = Context::new(store, &self.config, &mut context_errors);
        let summary = ContextSummary::of(&context);
        let mut dirty = Dirty::default();
        match &self.context {
            None => {
                dirty.all_pods = true;
                dirty.all_services = true;
            }
            Some(before) => before.compare(&summary, &mut dirty),
        }
        dirty.all_pods |= changes.kinds.contains(&Kind::Pod);
        dirty.all_services |= [Kind::Service, Kind::Pod, Kind::EndpointSlice]
            .iter()
            .any(|k| changes.kinds.contains(k));
        for key in &changes.keys {
            let id = (key.namespace.clone(), key.name.clone());
            match key.kind {
                Kind::Pod => {
                    dirty.pods.insert(id);
                    dirty.service_namespaces.insert(key.namespace.clone());
                }
                Kind::Service => {
                    dirty.services.insert(id);
                }
                Kind::EndpointSlice => {
                    dirty.service_namespaces.insert(key.namespace.clone());
                }
                _ => {}
            }
        }
        self.context = Some(summary);
        self.context_errors = context_errors;

        let mut changed = false;
        let config = &self.config;
        let mut resources = Resources {
            map: &mut self.resources,
            version,
            changed: &mut changed,
        };
        let pods = dirty_ids(
            store,
            Kind::Pod,
            &self.workloads,
            dirty.all_pods,
            &dirty.pods,
            &dirty.pod_namespaces,
        );
        self.workloads.update(pods, &mut resources, |id, errors| {
            let key = ObjectKey::new(Kind::Pod, &id.0, &id.1);
            match store.get(&key)? {
                super::Object::Pod(pod) => derive::workload(pod, config, &context, errors)
                    .map(|(w, waypoint)| (resource::Kind::Workload(w), waypoint)),
                _ => None,
            }
        });
        let services = dirty_ids(
            store,
            Kind::Service,
            &self.services,
            dirty.all_services,
            &dirty.services,
            &dirty.service_namespaces,
        );
        self.services
            .update(services, &mut resources, |id, errors| {
                let key = ObjectKey::new(Kind::Service, &id.0, &id.1);
                match store.get(&key)? {
                    super::Object::Service(svc) => {
                        derive::service(svc, store, config, &context, errors)
                            .map(|(s, waypoint)| (resource::Kind::Service(s), waypoint))
                    }
                    _ => None,
                }
            });

        let mut policies = Derived::default();
        derive::policies(store, config, &context, &mut policies);
        for key in &self.policy_keys {
            if !policies.resources.contains_key(key) {
                resources.remove(key);
            }
        }
        self.policy_keys = policies.resources.keys().cloned().collect();
        for (key, d) in policies.resources {
            resources.upsert(key, d);
        }
        self.policy_errors = policies.errors;

        let mut errors = self.context_errors.clone();
        errors.extend(self.workloads.errors.values().flatten().cloned());
        errors.extend(self.services.errors.values().flatten().cloned());
        errors.extend(self.policy_errors.iter().cloned());
        Outcome { changed, errors }
    }
}

/// The objects of `kind` to derive again: all of them, or the named ones and those of the
/// named namespaces (in the store now, or derived before and since deleted).
fn dirty_ids(
    store: &Store,
    kind: Kind,
    known: &Derivations,
    all: bool,
    ids: &BTreeSet<Id>,
    namespaces: &BTreeSet<String>,
) -> BTreeSet<Id> {
    let id_of = |o: &super::Object| -> Option<Id> {
        let k = o.key()?;
        Some((k.namespace, k.name))
    };
    let mut out = ids.clone();
    if all {
        out.extend(store.of_kind(kind).filter_map(id_of));
        out.extend(known.keys.keys().cloned());
        out.extend(known.errors.keys().cloned());
        return out;
    }
    for ns in namespaces {
        out.extend(store.of_kind_in(kind, ns).filter_map(id_of));
    }
    out
}

/// The resource map being updated, with the version new content gets.
struct Resources<'a> {
    map: &'a mut BTreeMap<Key, Arc<Entry>>,
    version: u64,
    changed: &'a mut bool,
}

impl Resources<'_> {
    /// Sets a resource; content equal to the current entry keeps that entry (and its
    /// version). Comparing the messages is cheaper than hashing them (a hash clones and
    /// encodes), and prost's map fields compare regardless of order; only new content is
    /// hashed.
    fn upsert(&mut self, key: Key, d: DerivedResource) {
        if let Some(old) = self.map.get(&key) {
            if old.resource == d.resource && old.waypoint == d.waypoint {
                return;
            }
        }
        *self.changed = true;
        let entry = Arc::new(Entry {
            hash: content_hash(&d.resource),
            resource: d.resource,
            version: self.version,
            waypoint: d.waypoint,
        });
        self.map.insert(key, entry);
    }

    fn remove(&mut self, key: &Key) {
        if self.map.remove(key).is_some() {
            *self.changed = true;
        }
    }
}

impl Derivations {
    /// Derives `ids` again with `derive_one` and updates `resources` for every key they
    /// had or now have.
    fn update(
        &mut self,
        ids: BTreeSet<Id>,
        resources: &mut Resources<'_>,
        mut derive_one: impl FnMut(
            &Id,
            &mut Vec<ModelError>,
        ) -> Option<(resource::Kind, Option<String>)>,
    ) {
        let mut derived: HashMap<Id, DerivedResource> = HashMap::new();
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        for id in ids {
            if let Some(old) = self.keys.remove(&id) {
                if let Some(owners) = self.owners.get_mut(&old) {
                    owners.remove(&id);
                }
                affected.insert(old);
            }
            self.errors.remove(&id);
            let mut errors = Vec::new();
            if let Some((key, d)) = derive_one(&id, &mut errors).and_then(keyed) {
                self.owners
                    .entry(key.clone())
                    .or_default()
                    .insert(id.clone());
                self.keys.insert(id.clone(), key.clone());
                affected.insert(key);
                derived.insert(id.clone(), d);
            }
            if !errors.is_empty() {
                self.errors.insert(id, errors);
            }
        }
        for key in affected {
            let winner = self.owners.get(&key).and_then(|o| o.last()).cloned();
            let Some(winner) = winner else {
                self.owners.remove(&key);
                resources.remove(&key);
                continue;
            };
            // The object that wins a shared key was not derived again: derive it now (its
            // problems are already recorded).
            let d = derived.remove(&winner).or_else(|| {
                derive_one(&winner, &mut Vec::new())
                    .and_then(keyed)
                    .map(|(_, d)| d)
            });
            match d {
                Some(d) => resources.upsert(key, d),
                None => resources.remove(&key),
            }
        }
    }
}

fn keyed((kind, waypoint): (resource::Kind, Option<String>)) -> Option<(Key, DerivedResource)> {
    let resource = Resource { kind: Some(kind) };
    let key = Key::of(&resource)?;
    Some((key, DerivedResource { resource, waypoint }))
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
