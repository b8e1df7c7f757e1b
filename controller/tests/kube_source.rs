//! The Kubernetes source against the fake API server, over real sockets with the real kube-rs
//! client: what the model derives (workloads, services, policies) is the assertion, and each
//! test drives a wire-level situation a real cluster produces (watch events, bookmarks, 410 Gone
//! after compaction, a CRD that is not installed, a kind the source may not list).

use std::sync::Arc;
use std::time::Duration;

use ambit_controller::model::{Model, ModelBuilder, ModelConfig, Snapshot};
use ambit_controller::source::kube::KubeSource;
use ambit_proto::discovery::{
    resource, Route as WireRoute, Service as WireService, TunnelProtocol, Workload,
};
use ambit_testing::apiserver::{gateway_api_resources, ApiError, FakeApiServer, Verb};
use ambit_testing::{eventually, Proc};
use anyhow::{bail, Context, Result};
use kube::runtime::watcher;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Upper bound for anything the source must do after a change (the model waits; other
/// conditions use the shared [`eventually`], with the same bound).
const CONVERGE: Duration = ambit_testing::WAIT;

/// A model fed only by a Kubernetes source watching `server`.
struct Harness {
    model: Model,
    ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(server: &FakeApiServer) -> Result<Harness> {
    start_with(server, watcher::Config::default())
}

fn start_with(server: &FakeApiServer, config: watcher::Config) -> Result<Harness> {
    let mut builder = ModelBuilder::new(ModelConfig::default());
    let sink = builder.sink("kubernetes");
    let model = builder.spawn();
    let source = KubeSource::new(server.client()?).watcher_config(config);
    let ready = source.ready();
    let task = tokio::spawn(async move {
        if let Err(e) = source.run(sink).await {
            eprintln!("kubernetes source stopped: {e:?}");
        }
    });
    Ok(Harness { model, ready, task })
}

impl Harness {
    /// Waits (bounded) for a snapshot satisfying `f`; on timeout, fails with what the model
    /// held last so the failure explains itself.
    async fn eventually(
        &self,
        what: &str,
        f: impl FnMut(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>> {
        match tokio::time::timeout(CONVERGE, self.model.wait_for(f)).await {
            Ok(snap) => Ok(snap?),
            Err(_) => bail!(
                "timed out waiting for {what}; last snapshot: {}",
                summary(&self.model.current())
            ),
        }
    }
}

fn workload<'a>(snap: &'a Snapshot, namespace: &str, name: &str) -> Option<&'a Workload> {
    snap.resources
        .values()
        .find_map(|e| match e.resource.kind.as_ref()? {
            resource::Kind::Workload(w) if w.namespace == namespace && w.name == name => Some(w),
            _ => None,
        })
}

fn service<'a>(snap: &'a Snapshot, namespace: &str, name: &str) -> Option<&'a WireService> {
    snap.resources
        .values()
        .find_map(|e| match e.resource.kind.as_ref()? {
            resource::Kind::Service(s) if s.namespace == namespace && s.name == name => Some(s),
            _ => None,
        })
}

fn has_authorization(snap: &Snapshot, namespace: &str, name: &str) -> bool {
    snap.resources.values().any(|e| {
        matches!(e.resource.kind.as_ref(),
            Some(resource::Kind::Authorization(a)) if a.namespace == namespace && a.name == name)
    })
}

fn has_external_service(snap: &Snapshot, namespace: &str, name: &str) -> bool {
    snap.resources.values().any(|e| {
        matches!(e.resource.kind.as_ref(),
            Some(resource::Kind::ExternalService(x)) if x.namespace == namespace && x.name == name)
    })
}

fn hbone(w: Option<&Workload>) -> bool {
    w.is_some_and(|w| w.tunnel_protocol == TunnelProtocol::Hbone as i32)
}

fn summary(snap: &Snapshot) -> String {
    let names: Vec<String> = snap
        .resources
        .values()
        .filter_map(|e| match e.resource.kind.as_ref()? {
            resource::Kind::Workload(w) => Some(format!(
                "workload {}/{} tunnel={}",
                w.namespace, w.name, w.tunnel_protocol
            )),
            resource::Kind::Service(s) => Some(format!("service {}/{}", s.namespace, s.name)),
            resource::Kind::Authorization(a) => Some(format!("authz {}/{}", a.namespace, a.name)),
            _ => None,
        })
        .collect();
    format!("version={} ready={} {names:?}", snap.version, snap.ready)
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({"ambit.dev/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(namespace: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": "node-1", "serviceAccountName": name,
            "containers": [{"name": "app", "image": "app:1"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn service_obj(namespace: &str, name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

fn endpoint_slice(namespace: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abc"), "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn authorization_policy(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "security.ambit.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [namespace]}}]}],
        },
    })
}

fn rv_of(obj: &Value) -> u64 {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn initial_list_populates_the_model() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    server.apply(&namespace("legacy", false))?;
    server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    server.apply(&pod(
        "apps",
        "batch",
        "10.0.0.6",
        json!({"app": "batch", "ambit.dev/dataplane-mode": "none"}),
    ))?;
    server.apply(&pod("legacy", "old", "10.0.1.5", json!({"app": "old"})))?;
    server.apply(&service_obj("apps", "web", "10.96.0.10"))?;
    server.apply(&endpoint_slice("apps", "web", "10.0.0.5"))?;
    server.apply(&authorization_policy("apps", "allow-apps"))?;

    let h = start(&server)?;
    let snap = h.eventually("the source to sync", |s| s.ready).await?;

    // Enrollment comes from the namespace label, opting out from the pod label.
    let web = workload(&snap, "apps", "web").context("apps/web workload")?;
    assert!(hbone(Some(web)), "{}", summary(&snap));
    assert_eq!(web.addresses, vec![vec![10, 0, 0, 5]]);
    assert_eq!(web.node, "node-1");
    assert_eq!(
        web.authorization_policies,
        vec!["apps/allow-apps".to_owned()]
    );
    assert!(
        !hbone(workload(&snap, "apps", "batch")),
        "opted-out pod stays plain"
    );
    assert!(
        !hbone(workload(&snap, "legacy", "old")),
        "pod in a plain namespace stays plain"
    );
    let svc = service(&snap, "apps", "web").context("apps/web service")?;
    assert_eq!(svc.hostname, "web.apps.svc.cluster.local");
    assert_eq!(svc.vips, vec![vec![10, 96, 0, 10]]);
    assert_eq!(svc.endpoints.len(), 1, "endpoint from the EndpointSlice");
    assert_eq!(svc.endpoints[0].workload_uid, web.uid);
    assert!(has_authorization(&snap, "apps", "allow-apps"));

    // Readiness: every kind listed once.
    assert!(*h.ready.borrow());
    assert_eq!(server.count(Verb::List, "pods"), 1);
    Ok(())
}

#[tokio::test]
async fn watch_events_reach_the_model() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    let h = start(&server)?;
    h.eventually("the source to sync", |s| s.ready).await?;

    let created = server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    h.eventually("ADDED pod as an HBONE workload", |s| {
        hbone(workload(s, "apps", "web"))
    })
    .await?;

    let modified = server.apply(&pod(
        "apps",
        "web",
        "10.0.0.5",
        json!({"app": "web", "ambit.dev/dataplane-mode": "none"}),
    ))?;
    assert!(rv_of(&modified) > rv_of(&created));
    h.eventually("MODIFIED pod to opt out", |s| {
        workload(s, "apps", "web").is_some_and(|w| w.tunnel_protocol == TunnelProtocol::None as i32)
    })
    .await?;

    // Namespace changes re-derive the pods inside (enrollment needs no pod restart).
    server.apply(&pod("apps", "api", "10.0.0.7", json!({"app": "api"})))?;
    h.eventually("second pod enrolled", |s| hbone(workload(s, "apps", "api")))
        .await?;
    server.apply(&namespace("apps", false))?;
    h.eventually("un-enrolling the namespace", |s| {
        workload(s, "apps", "api").is_some_and(|w| w.tunnel_protocol == TunnelProtocol::None as i32)
    })
    .await?;

    server.delete("v1", "Pod", "apps", "web")?;
    h.eventually("DELETED pod to disappear", |s| {
        workload(s, "apps", "web").is_none()
    })
    .await?;

    // Deleting the namespace deletes what is in it.
    server.delete("v1", "Namespace", "", "apps")?;
    h.eventually("the namespace's pods to go with it", |s| {
        workload(s, "apps", "api").is_none()
    })
    .await?;

    // All of it travelled over the watch: one LIST per kind, no relist.
    assert_eq!(server.count(Verb::List, "pods"), 1);
    assert_eq!(server.count(Verb::List, "namespaces"), 1);
    assert_eq!(server.expired_sent(), 0);
    Ok(())
}

#[tokio::test]
async fn bookmarks_advance_the_watch_without_changing_the_model() -> Result<()> {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await?;
    server.apply(&namespace("apps", true))?;
    server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    let h = start(&server)?;
    let synced = h
        .eventually("the source to sync", |s| {
            s.ready && workload(s, "apps", "web").is_some()
        })
        .await?;

    // Writes to kinds the source does not watch move the cluster's resourceVersion; only
    // bookmarks tell the pod watcher about it.
    for i in 0..5 {
        server.apply(&json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm{i}"), "namespace": "apps"},
        }))?;
    }
    let moved_to = server.resource_version();
    let before = server.bookmarks_sent();
    // Every one of the eleven watches gets several bookmarks.
    eventually("bookmarks on every watch", || {
        server.bookmarks_sent() >= before + 33
    })
    .await?;
    assert_eq!(
        h.model.current().version,
        synced.version,
        "bookmarks changed the model"
    );

    // A watcher that consumed the bookmarks resumes from the bookmarked version.
    let watches_before = server.count(Verb::Watch, "pods");
    server.close_watches();
    eventually("the pod watch to resume", || {
        server.count(Verb::Watch, "pods") > watches_before
    })
    .await?;
    let resumed = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.is(Verb::Watch, "pods"))
        .and_then(|r| {
            r.param("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
        })
        .context("resumed watch's resourceVersion")?;
    assert!(
        resumed >= moved_to,
        "resumed from {resumed}, bookmarks said {moved_to}"
    );
    assert_eq!(server.count(Verb::List, "pods"), 1, "no relist");
    assert_eq!(h.model.current().version, synced.version);
    Ok(())
}

#[tokio::test]
async fn gone_after_compaction_relists_and_converges() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    server.apply(&pod("apps", "keep", "10.0.0.5", json!({"app": "keep"})))?;
    server.apply(&pod("apps", "doomed", "10.0.0.6", json!({"app": "doomed"})))?;
    let h = start(&server)?;
    h.eventually("both pods", |s| {
        s.ready && workload(s, "apps", "keep").is_some() && workload(s, "apps", "doomed").is_some()
    })
    .await?;
    assert_eq!(server.count(Verb::List, "pods"), 1);

    // A partition: watches drop and cannot reconnect; meanwhile the cluster changes and etcd
    // compacts past the watchers' versions.
    server.pause_watches();
    server.delete("v1", "Pod", "apps", "doomed")?;
    server.apply(&pod(
        "apps",
        "newcomer",
        "10.0.0.7",
        json!({"app": "newcomer"}),
    ))?;
    server.compact();
    server.resume_watches();

    let snap = h
        .eventually("convergence after 410", |s| {
            workload(s, "apps", "doomed").is_none()
                && hbone(workload(s, "apps", "newcomer"))
                && hbone(workload(s, "apps", "keep"))
        })
        .await?;
    assert!(server.expired_sent() >= 1, "the server sent 410 Expired");
    assert!(
        server.count(Verb::List, "pods") >= 2,
        "the pod watcher relisted"
    );
    assert!(snap.ready);

    // And the relisted watcher keeps watching.
    server.delete("v1", "Pod", "apps", "keep")?;
    h.eventually("delete after the relist", |s| {
        workload(s, "apps", "keep").is_none()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn missing_crd_does_not_stop_other_kinds() -> Result<()> {
    let server = FakeApiServer::builder()
        .without_group("gateway.networking.k8s.io")
        .start()
        .await?;
    let mut ns = namespace("apps", true);
    ns["metadata"]["labels"]["ambit.dev/use-waypoint"] = json!("waypoint");
    server.apply(&ns)?;
    let h = start(&server)?;
    h.eventually("sync without the Gateway API", |s| s.ready)
        .await?;
    assert!(server.count(Verb::List, "gateways") >= 1);
    assert!(server.count(Verb::List, "httproutes") >= 1);

    server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    let snap = h
        .eventually("pods flowing", |s| hbone(workload(s, "apps", "web")))
        .await?;
    assert_eq!(waypoint_of(&snap, "apps", "web"), None);

    // Installing the CRD later is picked up by the watcher retrying with back-off (its
    // delays grow from under a second, so this stays well inside the bound).
    for rt in gateway_api_resources() {
        server.install(rt);
    }
    server.apply(&json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "apps"},
        "spec": {
            "gatewayClassName": "ambit-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            "addresses": [{"type": "IPAddress", "value": "10.96.0.99"}],
        },
    }))?;
    h.eventually("the waypoint from the late CRD", |s| {
        waypoint_of(s, "apps", "web") == Some(vec![10, 96, 0, 99])
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn not_ready_until_every_kind_listed() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    // Missing RBAC for services: LIST is 403 until fixed.
    server.inject_fault(
        Verb::List,
        "services",
        ApiError::Forbidden("services is forbidden".into()),
    );
    let h = start(&server)?;

    // Other kinds flow, and the failing one is retried, but the source is not ready.
    h.eventually("pods despite the failing kind", |s| {
        hbone(workload(s, "apps", "web"))
    })
    .await?;
    eventually("a retried services LIST", || {
        server.count(Verb::List, "services") >= 2
    })
    .await?;
    assert!(!*h.ready.borrow(), "ready although services never listed");
    assert!(
        !h.model.current().ready,
        "model served before every kind listed"
    );

    server.clear_faults();
    server.apply(&service_obj("apps", "web", "10.96.0.10"))?;
    let snap = h
        .eventually("ready once services list", |s| s.ready)
        .await?;
    assert!(
        service(&snap, "apps", "web").is_some(),
        "{}",
        summary(&snap)
    );
    assert!(*h.ready.borrow());
    Ok(())
}

#[tokio::test]
async fn paginated_and_streaming_initial_lists() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    for i in 0..5 {
        server.apply(&pod(
            "apps",
            &format!("p{i}"),
            &format!("10.0.0.{}", 10 + i),
            json!({}),
        ))?;
    }
    let all_five =
        |s: &Snapshot| s.ready && (0..5).all(|i| hbone(workload(s, "apps", &format!("p{i}"))));

    // Pages of two: the watcher follows continue tokens and the model gets all five.
    let paged = start_with(&server, watcher::Config::default().page_size(2))?;
    paged
        .eventually("all pods over three pages", all_five)
        .await?;
    let pages: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is(Verb::List, "pods"))
        .map(|r| {
            (
                r.param("limit").map(str::to_owned),
                r.param("continue").is_some(),
            )
        })
        .collect();
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(pages.iter().all(|(limit, _)| limit.as_deref() == Some("2")));
    assert_eq!(pages.iter().filter(|(_, cont)| *cont).count(), 2);
    drop(paged);

    // Streaming lists (sendInitialEvents): no LIST at all, the initial-events-end bookmark
    // marks the end of the initial state.
    let lists_before = server.count(Verb::List, "pods");
    let streamed = start_with(&server, watcher::Config::default().streaming_lists())?;
    streamed
        .eventually("all pods over a streaming list", all_five)
        .await?;
    assert_eq!(server.count(Verb::List, "pods"), lists_before);
    server.delete("v1", "Pod", "apps", "p0")?;
    streamed
        .eventually("a delete after the streaming list", |s| {
            workload(s, "apps", "p0").is_none()
        })
        .await?;
    Ok(())
}

fn route<'a>(snap: &'a Snapshot, namespace: &str, name: &str) -> Option<&'a WireRoute> {
    snap.resources
        .values()
        .find_map(|e| match e.resource.kind.as_ref()? {
            resource::Kind::Route(r) if r.namespace == namespace && r.name == name => Some(r),
            _ => None,
        })
}

fn has_traffic_policy(snap: &Snapshot, namespace: &str, name: &str) -> bool {
    snap.resources.values().any(|e| {
        matches!(e.resource.kind.as_ref(),
            Some(resource::Kind::TrafficPolicy(t)) if t.namespace == namespace && t.name == name)
    })
}

fn waypoint_of(snap: &Snapshot, namespace: &str, name: &str) -> Option<Vec<u8>> {
    workload(snap, namespace, name)?
        .waypoint
        .as_ref()
        .map(|w| w.address.clone())
}

#[tokio::test]
async fn gateway_api_and_ambit_crds_flow_through_watches() -> Result<()> {
    let server = FakeApiServer::start().await?;
    let mut ns = namespace("apps", true);
    ns["metadata"]["labels"]["ambit.dev/use-waypoint"] = json!("waypoint");
    server.apply(&ns)?;
    server.apply(&pod("apps", "web", "10.0.0.5", json!({"app": "web"})))?;
    server.apply(&service_obj("apps", "web", "10.96.0.10"))?;
    let h = start(&server)?;
    let snap = h
        .eventually("the source to sync", |s| {
            s.ready && workload(s, "apps", "web").is_some()
        })
        .await?;
    assert_eq!(waypoint_of(&snap, "apps", "web"), None, "no Gateway yet");

    let parent = json!([{"group": "", "kind": "Service", "name": "web"}]);
    let backends = json!([{"name": "web", "port": 80}]);
    server.apply(&json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "apps"},
        "spec": {
            "gatewayClassName": "ambit-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            "addresses": [{"type": "IPAddress", "value": "10.96.0.99"}],
        },
    }))?;
    server.apply(&json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web-http", "namespace": "apps"},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": backends}]},
    }))?;
    server.apply(&json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "web-grpc", "namespace": "apps"},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": backends}]},
    }))?;
    server.apply(&json!({
        "apiVersion": "traffic.ambit.dev/v1", "kind": "TrafficPolicy",
        "metadata": {"name": "web-limits", "namespace": "apps"},
        "spec": {"targetRef": {"name": "web"}, "connectionPool": {"maxConnections": 10}},
    }))?;
    server.apply(&authorization_policy("apps", "allow-apps"))?;
    server.apply(&json!({
        "apiVersion": "networking.ambit.dev/v1", "kind": "ExternalService",
        "metadata": {"name": "api", "namespace": "apps"},
        "spec": {"hosts": ["api.example.com"], "addresses": ["192.0.2.10"], "ports": [{"number": 443}]},
    }))?;
    // A bad one (the API server's schema would refuse it; this fake has none) is left out
    // by the model, naming its field, while the good one serves.
    server.apply(&json!({
        "apiVersion": "networking.ambit.dev/v1", "kind": "ExternalService",
        "metadata": {"name": "bad", "namespace": "apps"},
        "spec": {"hosts": ["api.example.com"], "ports": [{"number": 70000}]},
    }))?;

    let snap = h
        .eventually("waypoint, routes and policies", |s| {
            waypoint_of(s, "apps", "web") == Some(vec![10, 96, 0, 99])
                && route(s, "apps", "web-http").is_some()
                && route(s, "apps", "web-grpc").is_some()
                && has_traffic_policy(s, "apps", "web-limits")
                && has_authorization(s, "apps", "allow-apps")
                && has_external_service(s, "apps", "api")
                && s.errors.iter().any(|e| {
                    e.to_string() == "ExternalService apps/bad rejected: field spec.ports[0].number"
                })
        })
        .await?;
    assert!(!has_external_service(&snap, "apps", "bad"));
    let http = route(&snap, "apps", "web-http").context("HTTPRoute")?;
    assert_eq!(http.kind, "HTTPRoute");
    assert_eq!(
        http.parent_services,
        vec!["apps/web.apps.svc.cluster.local".to_owned()]
    );
    assert_eq!(
        route(&snap, "apps", "web-grpc").map(|r| r.kind.as_str()),
        Some("GRPCRoute")
    );

    server.delete(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "apps",
        "web-http",
    )?;
    server.delete(
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "apps",
        "web-grpc",
    )?;
    server.delete(
        "traffic.ambit.dev/v1",
        "TrafficPolicy",
        "apps",
        "web-limits",
    )?;
    server.delete(
        "security.ambit.dev/v1",
        "AuthorizationPolicy",
        "apps",
        "allow-apps",
    )?;
    server.delete(
        "gateway.networking.k8s.io/v1",
        "Gateway",
        "apps",
        "waypoint",
    )?;
    h.eventually("every deletion", |s| {
        waypoint_of(s, "apps", "web").is_none()
            && route(s, "apps", "web-http").is_none()
            && route(s, "apps", "web-grpc").is_none()
            && !has_traffic_policy(s, "apps", "web-limits")
            && !has_authorization(s, "apps", "allow-apps")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_binary_watches_the_cluster_named_by_kubeconfig() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&namespace("apps", true))?;
    // The controller keeps its CA in a Secret of its own namespace.
    server.apply(&namespace("ambit-system", false))?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, Some("kubeconfig-token"))?;
    // The controller's log goes to a file, shown only if the test fails.
    let log = dir.path().join("controller.log");
    let _child = Proc::adopt(
        std::process::Command::new(env!("CARGO_BIN_EXE_ambit-controller"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting ambit-controller")?,
    );
    // Every kind is listed and then watched, with the kubeconfig's credentials.
    for plural in [
        "namespaces",
        "pods",
        "endpointslices",
        "authorizationpolicies",
        "httproutes",
    ] {
        let watched = eventually(&format!("the controller to watch {plural}"), || {
            server.count(Verb::Watch, plural) >= 1
        })
        .await;
        if let Err(e) = watched {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{e}; controller log:\n{log}");
        }
    }
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.is(Verb::List, "pods")));
    assert!(
        requests
            .iter()
            .all(|r| r.bearer.as_deref() == Some("kubeconfig-token")),
        "a request without the kubeconfig's token"
    );
    Ok(())
}
