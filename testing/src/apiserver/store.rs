//! The fake API server's state, with the semantics clients depend on: one cluster-wide
//! resourceVersion counter (etcd's revision) bumped by every write, objects stamped with the
//! version of their last write, and a bounded history of changes that watches replay. When the
//! history is trimmed (or the test compacts it), a watch from an older version is `410 Expired`,
//! which is what forces a real client to relist.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::crd;
use super::resource::{now_rfc3339, ResourceType};

/// Errors the server answers with, each mapped to the `Status` code and reason a real API server
/// uses (`ApiError::status_json` is the one place that mapping lives).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The resource type or the object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Create of a name that is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A write whose resourceVersion precondition no longer holds.
    #[error("{0}")]
    Conflict(String),
    /// The requested resourceVersion was compacted away.
    #[error("{0}")]
    Expired(String),
    /// Malformed request: bad selector, body, or a namespace mismatch.
    #[error("{0}")]
    BadRequest(String),
    /// The verb is not supported on this path.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A patch type the server does not implement.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request carries no valid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller lacks permission (only ever injected by a test, to mimic missing RBAC).
    #[error("{0}")]
    Forbidden(String),
    /// A server failure (only ever injected by a test).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::AlreadyExists(_) | Self::Conflict(_) => 409,
            Self::Expired(_) => 410,
            Self::BadRequest(_) => 400,
            Self::MethodNotAllowed(_) => 405,
            Self::UnsupportedMediaType(_) => 415,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Internal(_) => 500,
        }
    }

    /// The `reason` field of the `Status` object.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NotFound",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::Conflict(_) => "Conflict",
            Self::Expired(_) => "Expired",
            Self::BadRequest(_) => "BadRequest",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::Internal(_) => "InternalError",
        }
    }

    /// The `Status` object a real server sends for this error.
    pub fn status_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "details": {},
            "code": self.code(),
        })
    }
}

/// Identifies one stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) api_version: String,
    pub(crate) plural: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// What a write did, as a watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the watch history.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) key: Key,
    pub(crate) kind: ChangeType,
    /// The object after the write (for a delete: the last state, stamped with the delete's version).
    pub(crate) object: Arc<Value>,
    /// The object before the write, so a selector-filtered watch can turn "stopped matching" into
    /// DELETED and "started matching" into ADDED, as the real watch cache does.
    pub(crate) previous: Option<Arc<Value>>,
}

/// A token the TokenReview endpoint recognises.
#[derive(Debug, Clone, Default)]
pub struct TokenUser {
    /// `system:serviceaccount:<ns>:<sa>` for service-account tokens.
    pub username: String,
    /// The user's UID.
    pub uid: String,
    /// Groups, e.g. `system:serviceaccounts`.
    pub groups: Vec<String>,
    /// Audiences the token is valid for; empty means the API server's default audience only.
    pub audiences: Vec<String>,
    /// Extra attributes, e.g. `authentication.kubernetes.io/pod-name`.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    /// The same user with a token valid only for these audiences (as projected tokens are).
    pub fn with_audiences(mut self, audiences: &[&str]) -> Self {
        self.audiences = audiences.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// A projected service-account token bound to a pod on a node, as kubelet mounts them.
    pub fn service_account(namespace: &str, sa: &str, pod: &str, node: &str) -> Self {
        let one = |v: &str| vec![v.to_owned()];
        Self {
            username: format!("system:serviceaccount:{namespace}:{sa}"),
            uid: format!("uid-sa-{namespace}-{sa}"),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
            audiences: Vec::new(),
            extra: BTreeMap::from([
                ("authentication.kubernetes.io/pod-name".to_owned(), one(pod)),
                (
                    "authentication.kubernetes.io/pod-uid".to_owned(),
                    one(&format!("uid-{pod}")),
                ),
                (
                    "authentication.kubernetes.io/node-name".to_owned(),
                    one(node),
                ),
            ]),
        }
    }
}

/// Everything the server knows, behind one mutex.
#[derive(Debug)]
pub(crate) struct State {
    /// Current cluster-wide resourceVersion (the last write's).
    pub(crate) rv: u64,
    /// Resource types served, in discovery order.
    pub(crate) resources: Vec<ResourceType>,
    pub(crate) objects: BTreeMap<Key, Arc<Value>>,
    pub(crate) history: VecDeque<Change>,
    pub(crate) history_limit: usize,
    /// Oldest resourceVersion a watch may resume from: every change after it is in `history`.
    pub(crate) floor: u64,
    pub(crate) tokens: HashMap<String, TokenUser>,
    uid_seq: u64,
}

impl State {
    pub(crate) fn new(resources: Vec<ResourceType>, history_limit: usize) -> Self {
        Self {
            rv: 1,
            resources,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            floor: 1,
            tokens: HashMap::new(),
            uid_seq: 0,
        }
    }

    /// The served resource for a group/version and plural.
    pub(crate) fn resource(&self, api_version: &str, plural: &str) -> Option<&ResourceType> {
        self.resources
            .iter()
            .find(|r| r.api_version() == api_version && r.plural == plural)
    }

    /// The served resource for an object's `apiVersion` and `kind`.
    pub(crate) fn resource_of(&self, obj: &Value) -> Result<ResourceType, ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        self.resources
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no matches for kind {kind:?} in version {api_version:?}"
                ))
            })
    }

    /// Forgets all history: any watch from before now gets 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    pub(crate) fn key(rt: &ResourceType, namespace: &str, name: &str) -> Key {
        Key {
            api_version: rt.api_version(),
            plural: rt.plural.clone(),
            namespace: if rt.namespaced {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }

    /// Objects of one resource, optionally in one namespace, ordered by namespace then name.
    pub(crate) fn list(&self, rt: &ResourceType, namespace: Option<&str>) -> Vec<Arc<Value>> {
        let lo = Self::key(rt, namespace.unwrap_or(""), "");
        self.objects
            .range(lo..)
            .take_while(|(k, _)| {
                k.api_version == rt.api_version()
                    && k.plural == rt.plural
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub(crate) fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(&Self::key(rt, namespace, name)).cloned()
    }

    /// Creates an object; `namespace` comes from the URL (or the object, for the Rust handle).
    pub(crate) fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut obj: Value,
        manager: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let name = self.prepare_new(rt, namespace, &mut obj)?;
        let key = Self::key(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists(format!(
                "{} \"{name}\" already exists",
                rt.plural
            )));
        }
        stamp_manager(&mut obj, rt, manager, "Update");
        Ok(self.commit(key, ChangeType::Added, obj))
    }

    /// Replaces an object (PUT). A non-empty `metadata.resourceVersion` in the body is an
    /// optimistic-concurrency precondition, as on a real server.
    pub(crate) fn replace(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        mut obj: Value,
        manager: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = Self::key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(not_found(rt, name));
        };
        check_body(rt, namespace, name, &obj)?;
        let wanted = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        let current = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        if wanted.is_some_and(|w| !w.is_empty() && Some(w) != current) {
            return Err(ApiError::Conflict(format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                rt.plural
            )));
        }
        carry_server_fields(&old, &mut obj, rt, namespace);
        stamp_manager(&mut obj, rt, manager, "Update");
        Ok(self.commit(key, ChangeType::Modified, obj))
    }

    /// JSON merge patch (RFC 7386); also used for strategic merge, which differs only for lists
    /// with merge keys.
    pub(crate) fn merge_patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        patch: &Value,
        manager: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = Self::key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(not_found(rt, name));
        };
        let mut obj = (*old).clone();
        merge(&mut obj, patch);
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        carry_server_fields(&old, &mut obj, rt, namespace);
        stamp_manager(&mut obj, rt, manager, "Update");
        Ok(self.commit(key, ChangeType::Modified, obj))
    }

    /// Writes the status subresource: only `status` changes (and `generation` does not).
    pub(crate) fn set_status(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        status: Option<Value>,
        manager: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = Self::key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(not_found(rt, name));
        };
        let mut obj = (*old).clone();
        if let Some(o) = obj.as_object_mut() {
            match status {
                Some(status) => o.insert("status".to_owned(), status),
                None => o.remove("status"),
            };
        }
        stamp_manager(&mut obj, rt, manager, "Update");
        Ok(self.commit(key, ChangeType::Modified, obj))
    }

    /// Server-side apply, simplified to create-or-merge with the manager recorded in
    /// `managedFields` (field ownership and conflicts are not modelled).
    pub(crate) fn apply_patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        patch: Value,
        manager: &str,
    ) -> Result<Arc<Value>, ApiError> {
        if manager.is_empty() {
            return Err(ApiError::BadRequest(
                "PATCH, fieldManager: Required value: is required for apply patch".to_owned(),
            ));
        }
        check_body(rt, namespace, name, &patch)?;
        let key = Self::key(rt, namespace, name);
        match self.objects.get(&key).cloned() {
            None => {
                let mut obj = patch;
                let name = self.prepare_new(rt, namespace, &mut obj)?;
                stamp_manager(&mut obj, rt, manager, "Apply");
                Ok(self.commit(Self::key(rt, namespace, &name), ChangeType::Added, obj))
            }
            Some(old) => {
                let mut obj = (*old).clone();
                merge(&mut obj, &patch);
                carry_server_fields(&old, &mut obj, rt, namespace);
                stamp_manager(&mut obj, rt, manager, "Apply");
                Ok(self.commit(key, ChangeType::Modified, obj))
            }
        }
    }

    /// Deletes an object; deleting a namespace (or a CRD) deletes what it holds (its custom
    /// resources) first: the namespace controller's job on a real cluster, done at once here.
    pub(crate) fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = Self::key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(not_found(rt, name));
        };
        let crd_served = if rt.api_version() == crd::CRD_API_VERSION {
            crd::served_resources(&old)
        } else {
            Vec::new()
        };
        let is_namespace = rt.group.is_empty() && rt.plural == "namespaces";
        if is_namespace || !crd_served.is_empty() {
            // A namespace's objects, or a CRD's custom resources, go first.
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| {
                    if is_namespace {
                        k.namespace == name
                    } else {
                        crd_served
                            .iter()
                            .any(|r| r.api_version() == k.api_version && r.plural == k.plural)
                    }
                })
                .cloned()
                .collect();
            for k in inside {
                if let Some(obj) = self.objects.get(&k).cloned() {
                    self.commit(k, ChangeType::Deleted, (*obj).clone());
                }
            }
        }
        Ok(self.commit(key, ChangeType::Deleted, (*old).clone()))
    }

    /// Create-or-replace without preconditions, for tests writing through the Rust handle.
    pub(crate) fn upsert(&mut self, obj: Value) -> Result<Arc<Value>, ApiError> {
        let rt = self.resource_of(&obj)?;
        let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str);
        let namespace = match (rt.namespaced, namespace) {
            (true, Some(ns)) => ns.to_owned(),
            (true, None) => "default".to_owned(),
            (false, _) => String::new(),
        };
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        match name {
            Some(name) if self.get(&rt, &namespace, &name).is_some() => {
                let mut obj = obj;
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
                self.replace(&rt, &namespace, &name, obj, "ambit-test")
            }
            _ => self.create(&rt, &namespace, obj, "ambit-test"),
        }
    }

    /// Starts or stops serving a CRD's resources as it is written or deleted.
    fn serve_crd(&mut self, obj: &mut Value, kind: ChangeType) {
        let served = crd::served_resources(obj);
        let same = |a: &ResourceType, b: &ResourceType| a.group == b.group && a.plural == b.plural;
        if let Some(first) = served.first().cloned() {
            // Versions no longer listed stop being served.
            self.resources
                .retain(|r| !same(r, &first) || served.contains(r));
        }
        if kind == ChangeType::Deleted {
            self.resources.retain(|r| !served.contains(r));
        } else {
            for rt in served {
                if !self.resources.contains(&rt) {
                    self.resources.push(rt);
                }
            }
            crd::establish(obj);
        }
    }

    /// Validates a new object and fills the fields the server owns; returns its name.
    fn prepare_new(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        obj: &mut Value,
    ) -> Result<String, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object".to_owned(),
            ));
        }
        if rt.namespaced && !self.namespace_exists(namespace) {
            return Err(ApiError::NotFound(format!(
                "namespaces \"{namespace}\" not found"
            )));
        }
        self.uid_seq += 1;
        let seq = self.uid_seq;
        let meta = obj
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::BadRequest("metadata must be an object".to_owned()))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{seq:05x}"),
                None => {
                    return Err(ApiError::BadRequest(
                        "metadata.name: Required value: name or generateName is required"
                            .to_owned(),
                    ))
                }
            },
        };
        meta.insert("name".to_owned(), json!(name));
        meta.insert(
            "uid".to_owned(),
            json!(format!("00000000-0000-4000-8000-{seq:012x}")),
        );
        meta.insert("creationTimestamp".to_owned(), json!(now_rfc3339()));
        meta.insert("generation".to_owned(), json!(1));
        meta.remove("resourceVersion");
        set_identity(obj, rt, namespace);
        check_body(rt, namespace, &name, obj)?;
        Ok(name)
    }

    fn namespace_exists(&self, namespace: &str) -> bool {
        self.objects.contains_key(&Key {
            api_version: "v1".to_owned(),
            plural: "namespaces".to_owned(),
            namespace: String::new(),
            name: namespace.to_owned(),
        })
    }

    /// Applies one write: bumps the revision, stamps it on the object, records the change.
    fn commit(&mut self, key: Key, kind: ChangeType, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".to_owned(), json!(rv.to_string()));
        }
        let is_crd = key.api_version == crd::CRD_API_VERSION && key.plural == crd::CRD_PLURAL;
        if is_crd {
            self.serve_crd(&mut obj, kind);
        }
        let obj = Arc::new(obj);
        let previous = match kind {
            ChangeType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key.clone(), obj.clone()),
        };
        self.history.push_back(Change {
            rv,
            key,
            kind,
            object: obj.clone(),
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        obj
    }
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    let group = if rt.group.is_empty() {
        String::new()
    } else {
        format!(".{}", rt.group)
    };
    ApiError::NotFound(format!("{}{group} \"{name}\" not found", rt.plural))
}

/// Rejects a body whose identity disagrees with the URL, as a real server does.
fn check_body(rt: &ResourceType, namespace: &str, name: &str, obj: &Value) -> Result<(), ApiError> {
    let body_name = obj.pointer("/metadata/name").and_then(Value::as_str);
    if body_name.is_some_and(|n| n != name) {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            body_name.unwrap_or_default()
        )));
    }
    let body_ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
    if rt.namespaced && body_ns.is_some_and(|n| !n.is_empty() && n != namespace) {
        return Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Sets `apiVersion`, `kind` and `metadata.namespace` from the resource and URL.
fn set_identity(obj: &mut Value, rt: &ResourceType, namespace: &str) {
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".to_owned(), json!(rt.api_version()));
        o.insert("kind".to_owned(), json!(rt.kind));
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            if rt.namespaced {
                meta.insert("namespace".to_owned(), json!(namespace));
            } else {
                meta.remove("namespace");
            }
        }
    }
}

/// Keeps the fields clients may not change (uid, creation time), bumps `generation` when the
/// spec changed.
fn carry_server_fields(old: &Value, new: &mut Value, rt: &ResourceType, namespace: &str) {
    if !new.get("metadata").is_some_and(Value::is_object) {
        if let Some(o) = new.as_object_mut() {
            o.insert("metadata".to_owned(), json!({}));
        }
    }
    let old_meta = old.get("metadata").and_then(Value::as_object);
    let spec_changed = old.get("spec") != new.get("spec");
    if let (Some(old_meta), Some(meta)) = (
        old_meta,
        new.get_mut("metadata").and_then(Value::as_object_mut),
    ) {
        for field in ["name", "uid", "creationTimestamp", "managedFields"] {
            if let Some(v) = old_meta.get(field) {
                meta.insert(field.to_owned(), v.clone());
            }
        }
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta.insert(
            "generation".to_owned(),
            json!(if spec_changed {
                generation + 1
            } else {
                generation
            }),
        );
    }
    set_identity(new, rt, namespace);
}

/// Records the writer in `metadata.managedFields`, as every real write does. Clients that cache
/// objects are expected to strip these.
fn stamp_manager(obj: &mut Value, rt: &ResourceType, manager: &str, operation: &str) {
    let manager = if manager.is_empty() {
        "unknown"
    } else {
        manager
    };
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let mut fields: Vec<Value> = meta
        .get("managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    fields.retain(|f| f.get("manager").and_then(Value::as_str) != Some(manager));
    fields.push(json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": rt.api_version(),
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {}, "f:spec": {}},
    }));
    meta.insert("managedFields".to_owned(), Value::Array(fields));
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
