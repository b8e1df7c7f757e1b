//! The objects the model currently holds, indexed by kind, and how source events change
//! them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::object::{Kind, Object, ObjectKey};
use super::SourceEvent;

/// Every object the sources have reported, by kind then (namespace, name). Objects are
/// shared with the source that sent them (and between the model's copies of the store),
/// so the store costs a pointer per object.
#[derive(Clone, Debug, Default)]
pub struct Store {
    objects: BTreeMap<Kind, BTreeMap<(String, String), Arc<Object>>>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding these objects (later duplicates win); objects without a name are
    /// skipped. Handy for fixtures.
    pub fn from_objects(objects: impl IntoIterator<Item = impl Into<Arc<Object>>>) -> Self {
        let mut store = Store::new();
        for o in objects {
            store.insert(o);
        }
        store
    }

    /// Adds or replaces an object. Returns false when it has no name.
    pub fn insert(&mut self, object: impl Into<Arc<Object>>) -> bool {
        let object = object.into();
        let Some(key) = object.key() else {
            return false;
        };
        self.objects
            .entry(key.kind)
            .or_default()
            .insert((key.namespace, key.name), object);
        true
    }

    /// Removes an object; true when it was there.
    pub fn remove(&mut self, key: &ObjectKey) -> bool {
        self.objects
            .get_mut(&key.kind)
            .and_then(|m| m.remove(&(key.namespace.clone(), key.name.clone())))
            .is_some()
    }

    /// Applies one source event.
    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply(object) => {
                if !self.insert(object) {
                    tracing::warn!("ignoring an object without a name");
                }
            }
            SourceEvent::Delete(key) => {
                self.remove(&key);
            }
            SourceEvent::Replace { kinds, objects } => {
                for kind in kinds {
                    self.objects.remove(&kind);
                }
                for object in objects {
                    self.insert(object);
                }
            }
            SourceEvent::Synced => {}
        }
    }

    /// The object with this key.
    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects
            .get(&key.kind)?
            .get(&(key.namespace.clone(), key.name.clone()))
            .map(|o| &**o)
    }

    /// Every object of a kind, ordered by namespace then name.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> + '_ {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values().map(|o| &**o))
    }

    /// Every object of a kind in one namespace, ordered by name; a range lookup, so
    /// per-service derivation does not scan the whole cluster.
    pub fn of_kind_in<'a>(
        &'a self,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects.get(&kind).into_iter().flat_map(move |m| {
            m.range((namespace.to_string(), String::new())..)
                .take_while(move |((ns, _), _)| ns == namespace)
                .map(|(_, o)| &**o)
        })
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }

    /// True when no object is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Typed iteration: `typed!(store, Pod)` yields `&Pod`s.
macro_rules! typed {
    ($store:expr, $variant:ident) => {
        $store
            .of_kind($crate::model::Kind::$variant)
            .filter_map(|o| match o {
                $crate::model::Object::$variant(x) => Some(x),
                _ => None,
            })
    };
}
pub(crate) use typed;

/// Typed iteration within a namespace: `typed_in!(store, Pod, "demo")`.
macro_rules! typed_in {
    ($store:expr, $variant:ident, $ns:expr) => {
        $store
            .of_kind_in($crate::model::Kind::$variant, $ns)
            .filter_map(|o| match o {
                $crate::model::Object::$variant(x) => Some(x),
                _ => None,
            })
    };
}
pub(crate) use typed_in;
