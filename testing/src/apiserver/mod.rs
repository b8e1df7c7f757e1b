//! A fake Kubernetes API server for tests: plain HTTP/1.1 on a loopback port, speaking the real
//! wire format so that an unmodified kube-rs client (watchers, reflectors, discovery, typed
//! `Api<K>`) runs against it. No real API server can be installed where these tests run, so this
//! one is built to be faithful where controllers are sensitive:
//!
//! - one cluster-wide resourceVersion counter; LIST reports it, objects carry their last write's;
//! - WATCH replays history after a version, follows writes, sends BOOKMARKs when allowed, and
//!   answers a compacted version with an `ERROR` event holding a `410 Expired` Status;
//! - discovery (`/api`, `/apis`, APIResourceLists) lists only what is installed, so a CRD that
//!   is not installed is a 404 like on a real cluster;
//! - `Status` errors with real codes and reasons; managedFields stamped on every write;
//! - TokenReview answers from tokens the test registers;
//! - `pods/<name>/portforward` upgrades to a WebSocket with the `v4.channel.k8s.io` framing,
//!   connected to whatever the test registered for that pod.
//!
//! Tests drive it through [`FakeApiServer`]: write objects directly, compact the history, close
//! or pause watches (a partition), install CRDs late, and inspect the requests clients made.
//! Deliberate simplifications are listed on the items that make them (server-side apply is
//! create-or-merge; LIST pages after the first read current state).

mod crd;
mod http;
mod logs;
mod portforward;
mod resource;
mod response;
mod selector;
mod store;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;

pub use logs::PodLog;
pub use portforward::PodDialer;
pub use resource::ResourceType;
use store::State;
pub use store::{ApiError, TokenUser};

/// Errors starting the server or talking to it from a test.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Binding the loopback listener failed.
    #[error("binding the fake API server's listener")]
    Bind(#[source] std::io::Error),
    /// The server's own URL did not parse as a URI (a bug).
    #[error("building the fake API server's URL")]
    Url(#[source] ::http::uri::InvalidUri),
    /// Building a kube client for the server failed.
    #[error("building a kube client for the fake API server")]
    Client(#[source] kube::Error),
    /// An object written through the handle was not serialisable.
    #[error("serialising an object for the fake API server")]
    Serialize(#[source] serde_json::Error),
    /// The server refused a write made through the handle.
    #[error("the fake API server refused the write")]
    Api(#[source] ApiError),
}

/// The kind of request, in the vocabulary of Kubernetes audit logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GET of a collection without `watch`.
    List,
    /// GET of a collection with `watch=true`.
    Watch,
    /// GET of one object.
    Get,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
    /// `/api`, `/apis`, `/version` and resource lists.
    Discovery,
    /// POST of a TokenReview.
    TokenReview,
    /// Anything unroutable.
    Other,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// What the request was.
    pub verb: Verb,
    /// The bearer token the client authenticated with, if any.
    pub bearer: Option<String>,
}

impl RequestRecord {
    /// Whether this request was `verb` on the collection whose path ends with `plural`
    /// (all namespaces or one).
    pub fn is(&self, verb: Verb, plural: &str) -> bool {
        self.verb == verb && self.path.ends_with(&format!("/{plural}"))
    }

    /// The value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the handle, the connections and the watch producers.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped after every write so watches wake up.
    changes: signal::Sender<u64>,
    /// Bumped to end every open watch stream.
    epoch: signal::Sender<u64>,
    /// False while watches are paused (new watch requests wait).
    gate: signal::Sender<bool>,
    /// Set when the handle is dropped.
    shutdown: signal::Sender<bool>,
    bookmark_interval: Mutex<Duration>,
    requests: Mutex<Vec<RequestRecord>>,
    /// Injected failures: requests of this verb on this collection get this error.
    faults: Mutex<Vec<(Verb, String, ApiError)>>,
    bookmarks_sent: AtomicU64,
    expired_sent: AtomicU64,
    addr: SocketAddr,
    /// The only bearer token accepted, if the server checks.
    bearer: Option<String>,
    /// How to reach each pod's ports for `portforward`, by (namespace, name).
    dialers: Mutex<std::collections::HashMap<(String, String), PodDialer>>,
    /// Each pod's log for `pods/<name>/log`, by (namespace, name).
    logs: Mutex<std::collections::HashMap<(String, String), PodLog>>,
}

impl Shared {
    /// The state; a panic in another holder does not poison tests that follow.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a write and wakes the watches.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let (out, rv) = {
            let mut state = self.lock();
            let out = f(&mut state);
            (out, state.rv)
        };
        self.changes.send_replace(rv);
        out
    }

    /// Logs a request; returns the injected failure it must get, if any.
    fn record(&self, record: RequestRecord) -> Option<ApiError> {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let fault = faults
            .iter()
            .find(|(verb, plural, _)| record.is(*verb, plural))
            .map(|(_, _, e)| e.clone());
        drop(faults);
        let fault = match &self.bearer {
            Some(want) if record.bearer.as_ref() != Some(want) => {
                Some(ApiError::Unauthorized("Unauthorized".to_owned()))
            }
            _ => fault,
        };
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
        fault
    }
}

/// The built-in resources served by default.
pub fn builtin_resources() -> Vec<ResourceType> {
    let core = |plural: &str, kind: &str, namespaced: bool| {
        ResourceType::new("", "v1", plural, kind, namespaced)
    };
    vec![
        core("namespaces", "Namespace", false),
        core("nodes", "Node", false),
        core("pods", "Pod", true),
        core("services", "Service", true),
        core("endpoints", "Endpoints", true),
        core("serviceaccounts", "ServiceAccount", true),
        core("configmaps", "ConfigMap", true),
        core("secrets", "Secret", true),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        ResourceType::new("apps", "v1", "deployments", "Deployment", true),
        ResourceType::new("apps", "v1", "daemonsets", "DaemonSet", true),
        // The controller's leader election: get, create, and replace guarded by the
        // resourceVersion (a stale one is a 409 Conflict, as on a real server).
        ResourceType::new("coordination.k8s.io", "v1", "leases", "Lease", true),
        ResourceType::new(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
        ),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        ),
    ]
}

/// Ambit's own CRDs.
pub fn ambit_resources() -> Vec<ResourceType> {
    vec![
        ResourceType::custom(
            "security.ambit.dev",
            "v1",
            "authorizationpolicies",
            "AuthorizationPolicy",
            true,
        ),
        ResourceType::custom(
            "security.ambit.dev",
            "v1",
            "peerauthentications",
            "PeerAuthentication",
            true,
        ),
        ResourceType::custom(
            "security.ambit.dev",
            "v1",
            "requestauthentications",
            "RequestAuthentication",
            true,
        ),
        ResourceType::custom(
            "networking.ambit.dev",
            "v1",
            "externalservices",
            "ExternalService",
            true,
        ),
        ResourceType::custom(
            "traffic.ambit.dev",
            "v1",
            "trafficpolicies",
            "TrafficPolicy",
            true,
        ),
    ]
}

/// The Gateway API CRDs Ambit reads.
pub fn gateway_api_resources() -> Vec<ResourceType> {
    let gw = |plural: &str, kind: &str, namespaced: bool| {
        ResourceType::custom("gateway.networking.k8s.io", "v1", plural, kind, namespaced)
    };
    vec![
        gw("gatewayclasses", "GatewayClass", false),
        gw("gateways", "Gateway", true),
        gw("httproutes", "HTTPRoute", true),
        gw("grpcroutes", "GRPCRoute", true),
    ]
}

/// Configures a [`FakeApiServer`] before it starts.
#[derive(Debug, Clone)]
pub struct Builder {
    resources: Vec<ResourceType>,
    history_limit: usize,
    bookmark_interval: Duration,
    bearer: Option<String>,
}

impl Default for Builder {
    fn default() -> Self {
        let mut resources = builtin_resources();
        resources.extend(ambit_resources());
        resources.extend(gateway_api_resources());
        Self {
            resources,
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
            bearer: None,
        }
    }
}

impl Builder {
    /// Serves only the built-in resources: CRDs must be installed (through the API, as
    /// `kubectl apply` of the manifests would, or with [`FakeApiServer::install`]).
    pub fn builtins_only(mut self) -> Self {
        self.resources = builtin_resources();
        self
    }

    /// Answers `401 Unauthorized` to requests that do not carry this bearer token.
    pub fn require_bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// Does not serve this API group (as if its CRDs were not installed).
    pub fn without_group(mut self, group: &str) -> Self {
        self.resources.retain(|r| r.group != group);
        self
    }

    /// Serves one more resource.
    pub fn resource(mut self, rt: ResourceType) -> Self {
        self.resources.push(rt);
        self
    }

    /// How many changes the watch history keeps before the oldest are compacted away.
    pub fn history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    /// How often watches that allow bookmarks get one.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving. The `default` and `kube-system` namespaces exist
    /// from the start, as on a real cluster.
    pub async fn start(self) -> Result<FakeApiServer, ApiServerError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ApiServerError::Bind)?;
        let addr = listener.local_addr().map_err(ApiServerError::Bind)?;
        let mut state = State::new(self.resources, self.history_limit);
        for ns in ["default", "kube-system"] {
            state
                .upsert(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
                }))
                .map_err(ApiServerError::Api)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changes: signal::channel(0).0,
            epoch: signal::channel(0).0,
            gate: signal::channel(true).0,
            shutdown: signal::channel(false).0,
            bookmark_interval: Mutex::new(self.bookmark_interval),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            bookmarks_sent: AtomicU64::new(0),
            expired_sent: AtomicU64::new(0),
            addr,
            bearer: self.bearer,
            dialers: Mutex::default(),
            logs: Mutex::default(),
        });
        tokio::spawn(accept(listener, shared.clone()));
        Ok(FakeApiServer { shared })
    }
}

/// Accepts connections until the handle is dropped; each connection is HTTP/1.1.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "fake API server: accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades()
                .await
            {
                tracing::debug!(error = %e, "fake API server: connection ended");
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
    }
}

/// A running fake API server; dropping it stops the server and ends every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl FakeApiServer {
    /// A builder with the built-in resources, Ambit's CRDs and the Gateway API installed.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts a server with the default set of resources.
    pub async fn start() -> Result<Self, ApiServerError> {
        Builder::default().start().await
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig file at `path` whose current context is this server, presenting
    /// `token` as its bearer token if given, for commands that take `--kubeconfig` (as an
    /// operator's `ambitctl ... --kubernetes` or the controller binary would).
    pub fn write_kubeconfig(
        &self,
        path: &std::path::Path,
        token: Option<&str>,
    ) -> std::io::Result<()> {
        let user = match token {
            Some(t) => format!("{{token: \"{t}\"}}"),
            None => "{}".to_owned(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {user}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test}}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// A kube client configuration pointing at this server.
    pub fn kube_config(&self) -> Result<kube::Config, ApiServerError> {
        let uri = self.url().parse().map_err(ApiServerError::Url)?;
        Ok(kube::Config::new(uri))
    }

    /// A kube client for this server.
    pub fn client(&self) -> Result<kube::Client, ApiServerError> {
        kube::Client::try_from(self.kube_config()?).map_err(ApiServerError::Client)
    }

    /// Creates or replaces an object (any serialisable Kubernetes object with `apiVersion` and
    /// `kind`), as an unconditional write; returns the stored object.
    pub fn apply(&self, obj: &impl serde::Serialize) -> Result<Value, ApiServerError> {
        let obj = serde_json::to_value(obj).map_err(ApiServerError::Serialize)?;
        let stored = self
            .shared
            .write(|s| s.upsert(obj))
            .map_err(ApiServerError::Api)?;
        Ok((*stored).clone())
    }

    /// Deletes an object by `apiVersion`, `kind`, namespace (ignored for cluster-scoped kinds)
    /// and name; returns its last state.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiServerError> {
        let probe = serde_json::json!({"apiVersion": api_version, "kind": kind});
        let deleted = self
            .shared
            .write(|s| {
                let rt = s.resource_of(&probe)?;
                s.delete(&rt, namespace, name)
            })
            .map_err(ApiServerError::Api)?;
        Ok((*deleted).clone())
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let probe = serde_json::json!({"apiVersion": api_version, "kind": kind});
        let state = self.shared.lock();
        let rt = state.resource_of(&probe).ok()?;
        state.get(&rt, namespace, name).map(|o| (*o).clone())
    }

    /// Starts serving a resource, as installing its CRD does.
    pub fn install(&self, rt: ResourceType) {
        let mut state = self.shared.lock();
        if !state.resources.contains(&rt) {
            state.resources.push(rt);
        }
    }

    /// The current cluster-wide resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Drops the whole watch history: watches resuming from any earlier version get 410.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch stream cleanly (clients resume from their last version).
    pub fn close_watches(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Simulates a partition for watches: open streams end and new watch requests wait until
    /// [`Self::resume_watches`]. LIST and writes keep working.
    pub fn pause_watches(&self) {
        self.shared.gate.send_replace(false);
        self.close_watches();
    }

    /// Lets held and new watch requests proceed.
    pub fn resume_watches(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Changes the bookmark interval for watches started from now on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// Serves `pods/<name>/portforward` for the pod `namespace/name`: each forwarded
    /// connection is made by `dial` (given the port), as the kubelet would connect inside the
    /// pod. Without one, portforward answers 404 like for a pod that does not exist.
    pub fn forward_pod(&self, namespace: &str, name: &str, dial: PodDialer) {
        self.shared
            .dialers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.to_owned(), name.to_owned()), dial);
    }

    /// Serves `pods/<name>/log` for the pod `namespace/name` from `log` (read at each request).
    /// Without one, the log answers 404 like for a pod that does not exist.
    pub fn pod_log(&self, namespace: &str, name: &str, log: PodLog) {
        self.shared
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.to_owned(), name.to_owned()), log);
    }

    /// Registers a token for TokenReview.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.shared.lock().tokens.insert(token.to_owned(), user);
    }

    /// Makes every `verb` request on the collection `plural` fail with `error` (e.g. a 403 as
    /// missing RBAC gives, or a 500), until [`Self::clear_faults`].
    pub fn inject_fault(&self, verb: Verb, plural: &str, error: ApiError) {
        let mut faults = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.push((verb, plural.to_owned(), error));
    }

    /// Removes every injected failure.
    pub fn clear_faults(&self) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many requests were `verb` on the collection `plural`.
    pub fn count(&self, verb: Verb, plural: &str) -> usize {
        let requests = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        requests.iter().filter(|r| r.is(verb, plural)).count()
    }

    /// BOOKMARK events sent so far, over all watches.
    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.bookmarks_sent.load(Ordering::Relaxed)
    }

    /// `410 Expired` ERROR events sent so far.
    pub fn expired_sent(&self) -> u64 {
        self.shared.expired_sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
