//! The fake API server against a real kube-rs client: if kube-rs can list, watch, discover and
//! review tokens through it, the wire format is right.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use super::*;

fn pod(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    })
}

async fn server() -> FakeApiServer {
    let server = FakeApiServer::start().await.expect("start");
    server
        .apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
        .expect("namespace");
    server
}

#[tokio::test]
async fn list_get_and_selectors_through_kube() {
    let server = server().await;
    for (name, app) in [("p1", "web"), ("p2", "db"), ("p3", "web")] {
        server.apply(&pod("a", name, app)).expect("pod");
    }
    let pods: Api<Pod> = Api::namespaced(server.client().expect("client"), "a");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    let names: Vec<_> = list
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["p1", "p3"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    // Pagination: a limit is honoured and the continue token walks the rest.
    let first = pods
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let rest = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await;
    assert_eq!(rest.expect("page 2").items.len(), 1);

    let got = pods.get("p2").await.expect("get");
    assert!(
        got.metadata.managed_fields.is_some(),
        "writes record managedFields"
    );
    let missing = pods.get("nope").await.expect_err("404");
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"));
}

#[tokio::test]
async fn writes_through_kube_bump_versions() {
    let server = server().await;
    let pods: Api<Pod> = Api::namespaced(server.client().expect("client"), "a");
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("a", "p1", "web")).expect("pod"),
        )
        .await
        .expect("create");
    let dup = pods
        .create(&PostParams::default(), &created)
        .await
        .expect_err("409");
    assert!(matches!(dup, kube::Error::Api(s) if s.code == 409));
    let patched = pods
        .patch(
            "p1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("patch");
    assert!(patched.metadata.resource_version > created.metadata.resource_version);
    let applied = pods
        .patch(
            "p2",
            &PatchParams::apply("ambit-test-manager"),
            &Patch::Apply(pod("a", "p2", "db")),
        )
        .await
        .expect("server-side apply creates");
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["ambit-test-manager"]);
    pods.delete("p1", &Default::default())
        .await
        .expect("delete");
    assert!(server.get("v1", "Pod", "a", "p1").is_none());
}

#[tokio::test]
async fn watch_replays_follows_and_expires() {
    let server = server().await;
    server.apply(&pod("a", "p1", "web")).expect("pod");
    let from = server.resource_version();
    server.apply(&pod("a", "p2", "web")).expect("pod");
    let pods: Api<Pod> = Api::namespaced(server.client().expect("client"), "a");
    let params = WatchParams::default().timeout(5);
    let mut stream = pods
        .watch(&params, &from.to_string())
        .await
        .expect("watch")
        .boxed();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(WatchEvent::Added(p)))) if p.metadata.name.as_deref() == Some("p2"))
    );
    server.delete("v1", "Pod", "a", "p1").expect("delete");
    let next = tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(WatchEvent::Deleted(p)))) if p.metadata.name.as_deref() == Some("p1"))
    );

    server.compact();
    let mut stale = pods
        .watch(&params, &from.to_string())
        .await
        .expect("watch")
        .boxed();
    let next = tokio::time::timeout(Duration::from_secs(5), stale.try_next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(WatchEvent::Error(ref s)))) if s.code == 410 && s.reason == "Expired"),
        "{next:?}"
    );
    assert_eq!(server.expired_sent(), 1);
}

#[tokio::test]
async fn bookmarks_when_allowed() {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await
        .expect("start");
    let namespaces: Api<Namespace> = Api::all(server.client().expect("client"));
    let rv = server.resource_version().to_string();
    let params = WatchParams::default().timeout(5); // bookmarks are on by default
    let mut stream = namespaces.watch(&params, &rv).await.expect("watch").boxed();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(WatchEvent::Bookmark(b)))) if b.metadata.resource_version == rv)
    );
}

#[tokio::test]
async fn discovery_and_missing_groups() {
    let server = FakeApiServer::builder()
        .without_group("gateway.networking.k8s.io")
        .start()
        .await
        .expect("start");
    let client = server.client().expect("client");
    let groups = client.list_api_groups().await.expect("groups");
    let names: Vec<_> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    assert!(names.contains(&"security.ambit.dev"));
    assert!(!names.contains(&"gateway.networking.k8s.io"));
    let core = client.list_core_api_resources("v1").await.expect("core");
    assert!(core
        .resources
        .iter()
        .any(|r| r.name == "pods" && r.namespaced));
    let gw = client
        .list_api_group_resources("gateway.networking.k8s.io/v1")
        .await;
    assert!(matches!(gw, Err(kube::Error::Api(s)) if s.code == 404));
    server.install(gateway_api_resources().remove(1));
    let gw = client
        .list_api_group_resources("gateway.networking.k8s.io/v1")
        .await;
    assert_eq!(gw.expect("installed late").resources.len(), 1);
}

#[tokio::test]
async fn token_review_answers_from_registered_tokens() {
    let server = server().await;
    server.add_token("t1", TokenUser::service_account("a", "sa1", "p1", "node-1"));
    let reviews: Api<TokenReview> = Api::all(server.client().expect("client"));
    let review = |token: &str, audiences: Option<Vec<String>>| TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences,
        },
        ..Default::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("t1", None))
        .await
        .expect("review");
    let status = ok.status.expect("status");
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.expect("user");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:a:sa1")
    );
    let node = user
        .extra
        .and_then(|e| e.get("authentication.kubernetes.io/node-name").cloned());
    assert_eq!(node, Some(vec!["node-1".to_owned()]));
    let bad = reviews
        .create(&PostParams::default(), &review("nope", None))
        .await
        .expect("review");
    assert_ne!(bad.status.and_then(|s| s.authenticated), Some(true));
    // A token projected for the CA's audience is accepted for it, and says so.
    let ca_user =
        TokenUser::service_account("a", "sa1", "p1", "node-1").with_audiences(&["ambit-ca"]);
    server.add_token("t2", ca_user);
    let for_ca = review("t2", Some(vec!["ambit-ca".to_owned()]));
    let ok = reviews
        .create(&PostParams::default(), &for_ca)
        .await
        .expect("review");
    let status = ok.status.expect("status");
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(status.audiences, Some(vec!["ambit-ca".to_owned()]));
    let default_aud = reviews
        .create(&PostParams::default(), &review("t2", None))
        .await;
    assert_ne!(
        default_aud
            .expect("review")
            .status
            .and_then(|s| s.authenticated),
        Some(true)
    );
    let wrong_aud = review("t1", Some(vec!["other".to_owned()]));
    let bad = reviews
        .create(&PostParams::default(), &wrong_aud)
        .await
        .expect("review");
    assert_ne!(bad.status.and_then(|s| s.authenticated), Some(true));
}

#[tokio::test]
async fn crds_written_through_the_api_are_served() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

    let server = server().await;
    let client = server.client().expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object"}}}],
        },
    }))
    .expect("crd");
    let created = crds
        .patch(
            "widgets.example.com",
            &PatchParams::apply("installer"),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
    let established = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established, "installers wait for Established");

    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "a", &ApiResource::from_gvk(&gvk));
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3},
    }))
    .expect("widget");
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .expect("create widget");
    assert_eq!(
        widgets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    crds.delete("widgets.example.com", &Default::default())
        .await
        .expect("delete CRD");
    let gone = widgets
        .list(&ListParams::default())
        .await
        .expect_err("not served any more");
    assert!(matches!(gone, kube::Error::Api(s) if s.code == 404));
    assert!(server.get("example.com/v1", "Widget", "a", "w1").is_none());
}

#[tokio::test]
async fn bearer_token_required_when_configured() {
    let server = FakeApiServer::builder()
        .require_bearer("secret")
        .start()
        .await
        .expect("start");
    let namespaces: Api<Namespace> = Api::all(server.client().expect("client"));
    let denied = namespaces
        .list(&ListParams::default())
        .await
        .expect_err("401");
    assert!(matches!(denied, kube::Error::Api(s) if s.code == 401));
    let mut config = server.kube_config().expect("config");
    config.auth_info.token = Some("secret".to_owned().into());
    let client = kube::Client::try_from(config).expect("client");
    let listed = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await;
    assert_eq!(
        listed.expect("authorised list").items.len(),
        2,
        "default and kube-system"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portforward_carries_bytes_both_ways_through_kube() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = server().await;
    server.apply(&pod("a", "web-0", "web")).expect("pod");
    // The pod's port: an echo server that upper-cases, then closes after one line.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::{BufRead as _, Write as _};
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(&conn);
            if reader.read_line(&mut line).is_ok() {
                let _ = (&conn).write_all(line.to_uppercase().as_bytes());
            }
        }
    });
    let dialed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = dialed.clone();
    server.forward_pod(
        "a",
        "web-0",
        Arc::new(move |port| {
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(port);
            std::net::TcpStream::connect(addr)
        }),
    );
    let pods: Api<Pod> = Api::namespaced(server.client().expect("client"), "a");
    let mut forward = pods
        .portforward("web-0", &[15000])
        .await
        .expect("portforward");
    let mut stream = forward.take_stream(15000).expect("stream");
    stream.write_all(b"hello pod\n").await.expect("write");
    let mut back = String::new();
    // The pod closes after its answer: the forward ends and the read sees the end.
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut back))
        .await
        .expect("the forward ends when the pod closes")
        .expect("read");
    assert_eq!(back, "HELLO POD\n");
    assert_eq!(*dialed.lock().unwrap_or_else(|e| e.into_inner()), [15000]);

    // A pod nobody forwards for is a 404, as for a pod that does not exist.
    let err = pods.portforward("db-0", &[15000]).await.err().expect("404");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // A port the pod does not listen on: the dial error arrives on the error channel.
    server.forward_pod(
        "a",
        "web-0",
        Arc::new(|_| Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))),
    );
    let mut forward = pods
        .portforward("web-0", &[15001])
        .await
        .expect("portforward");
    let error = forward.take_error(15001).expect("error channel");
    let message = tokio::time::timeout(Duration::from_secs(5), error)
        .await
        .expect("an error in time")
        .expect("an error message");
    assert!(message.contains("error forwarding port 15001"), "{message}");
}
