//! Discovery end to end over real gRPC on loopback: a real tonic server fed by the model
//! (from a watched folder or directly through a source sink) and real tonic clients
//! playing ztunnel and waypoint. Assertions are on what a proxy receives.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService, Registry};
use ambit_controller::model::{Model, ModelBuilder, ModelConfig, SourceEvent, SourceSink};
use ambit_controller::server::GrpcServer;
use ambit_controller::source::local::{parse_file, LocalOptions, LocalSource};
use ambit_controller::source::Sources;
use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{
    resource, subscribe_request, Ack, Hello, Nack, ProxyKind, Push, ResourceKind, SubscribeRequest,
};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    registry: Registry,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn serve(model: Model) -> Server {
    let (_roots_tx, roots) = tokio::sync::watch::channel(Arc::new(vec![
        "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n".to_string(),
    ]));
    // Keep the roots sender alive for the server's lifetime.
    std::mem::forget(_roots_tx);
    let discovery = DiscoveryService::new(model, roots, DiscoveryOptions::default());
    let registry = discovery.registry();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(GrpcServer::new(discovery).serve(listener, async {
        let _ = rx.await;
    }));
    Server {
        addr,
        registry,
        _shutdown: tx,
    }
}

/// A model fed directly by the test.
async fn direct_model() -> (SourceSink, Model) {
    let mut b = ModelBuilder::new(ModelConfig::default());
    let sink = b.sink("test");
    let model = b.spawn();
    (sink, model)
}

async fn apply(sink: &SourceSink, yaml: &str) {
    let objects = parse_file(Path::new("test.yaml"), yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let mut events: Vec<_> = objects
        .into_iter()
        .map(|l| SourceEvent::Apply(l.object))
        .collect();
    events.push(SourceEvent::Synced);
    sink.send(events).await.expect("send");
}

struct Client {
    tx: mpsc::Sender<SubscribeRequest>,
    pushes: tonic::Streaming<Push>,
}

fn ztunnel(node: &str) -> Hello {
    Hello {
        kind: ProxyKind::Ztunnel as i32,
        node: node.into(),
        ..Hello::default()
    }
}

fn waypoint(gateway: &str) -> Hello {
    Hello {
        kind: ProxyKind::Waypoint as i32,
        gateway: gateway.into(),
        identity: "spiffe://cluster.local/ns/demo/sa/wp".to_string(),
        ..Hello::default()
    }
}

async fn connect_with(endpoint: Endpoint, hello: Hello) -> Result<Client, tonic::Status> {
    let channel = endpoint.connect().await.expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(hello)),
    })
    .await
    .expect("hello");
    let pushes = DiscoveryClient::new(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Client { tx, pushes })
}

async fn connect(addr: SocketAddr, hello: Hello) -> Client {
    connect_with(
        Endpoint::from_shared(format!("http://{addr}")).expect("uri"),
        hello,
    )
    .await
    .expect("subscribe")
}

impl Client {
    async fn next(&mut self) -> Push {
        tokio::time::timeout(TIMEOUT, self.pushes.message())
            .await
            .expect("no push within timeout")
            .expect("stream error")
            .expect("stream ended")
    }

    async fn ack(&self, push: &Push) {
        self.tx
            .send(SubscribeRequest {
                message: Some(subscribe_request::Message::Ack(Ack {
                    nonce: push.nonce.clone(),
                })),
            })
            .await
            .expect("ack");
    }
}

/// `kind name` of every upsert, sorted.
fn upserts(push: &Push) -> Vec<String> {
    let mut v: Vec<String> = push
        .upserts
        .iter()
        .map(|r| match r.kind.as_ref().expect("kind") {
            resource::Kind::Workload(w) => format!("workload {}", w.uid),
            resource::Kind::Service(s) => format!("service {}", s.hostname),
            resource::Kind::Authorization(a) => format!("authz {}/{}", a.namespace, a.name),
            resource::Kind::Route(r) => format!("route {}/{}", r.namespace, r.name),
            resource::Kind::TrafficPolicy(t) => format!("tp {}/{}", t.namespace, t.name),
            resource::Kind::PeerAuthentication(p) => format!("pa {}/{}", p.namespace, p.name),
            resource::Kind::RequestAuthentication(a) => {
                format!("reqauthn {}/{}", a.namespace, a.name)
            }
            resource::Kind::ExternalService(x) => format!("xs {}/{}", x.namespace, x.name),
        })
        .collect();
    v.sort();
    v
}

async fn wait_stats(
    registry: &Registry,
    what: &str,
    f: impl Fn(&ambit_controller::discovery::SubscriberStats) -> bool,
) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if registry.snapshot().iter().any(&f) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {:?}",
            registry.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pod(ns: &str, name: &str, node: &str, labels: &str) -> String {
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: []}}\nstatus: {{podIP: 10.0.{}.{}}}\n", ns.len(), name.len())
}

fn ns(name: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{ambit.dev/dataplane-mode: ambient}}}}\n")
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")
}

#[tokio::test]
async fn full_state_then_only_what_changed_from_a_watched_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}\n";
    std::fs::write(dir.path().join("ns.yaml"), ns("demo")).expect("write");
    std::fs::write(
        dir.path().join("app.yaml"),
        pod("demo", "a", "node-a", "app: web") + &pod("demo", "b", "node-a", "app: db") + svc,
    )
    .expect("write");
    let mut sources = Sources::new();
    sources.add(LocalSource::new(
        dir.path(),
        LocalOptions {
            debounce: Duration::from_millis(50),
            rescan: Duration::from_secs(3600),
            ..LocalOptions::default()
        },
    ));
    let mut builder = ModelBuilder::new(ModelConfig::default());
    let _tasks = sources.spawn(&mut builder);
    let server = serve(builder.spawn()).await;

    let mut client = connect(server.addr, ztunnel("node-a")).await;
    let full = client.next().await;
    assert!(full.full_state);
    assert_eq!(full.trust_roots.len(), 1);
    assert_eq!(
        upserts(&full),
        vec![
            "service web.demo.svc.cluster.local",
            "workload demo/a",
            "workload demo/b"
        ]
    );
    client.ack(&full).await;

    // Relabel pod b (not selected by the service before or after): only b changes.
    std::fs::write(
        dir.path().join("app.yaml"),
        pod("demo", "a", "node-a", "app: web")
            + &pod("demo", "b", "node-a", "app: db, version: v2")
            + svc,
    )
    .expect("write");
    let push = client.next().await;
    assert!(!push.full_state);
    assert!(push.version > full.version);
    assert_eq!(upserts(&push), vec!["workload demo/b"]);
    assert!(push.removals.is_empty());
    assert!(
        push.trust_roots.is_empty(),
        "roots are only resent when they change"
    );
    assert_ne!(push.nonce, full.nonce);
    client.ack(&push).await;
    let version = push.version;
    wait_stats(&server.registry, "two ACKs", |s| {
        s.acks == 2 && s.version_acked == version && s.last_ack_latency.is_some()
    })
    .await;

    // Remove pod a: its workload is removed and the service loses its endpoint.
    std::fs::write(
        dir.path().join("app.yaml"),
        pod("demo", "b", "node-a", "app: db, version: v2") + svc,
    )
    .expect("write");
    let push = client.next().await;
    assert_eq!(upserts(&push), vec!["service web.demo.svc.cluster.local"]);
    let removals: Vec<_> = push
        .removals
        .iter()
        .map(|k| (k.kind(), k.name.as_str()))
        .collect();
    assert_eq!(removals, vec![(ResourceKind::Workload, "demo/a")]);
}

#[tokio::test]
async fn a_ztunnel_gets_only_the_policies_of_its_nodes_pods() {
    let (sink, model) = direct_model().await;
    let mut yaml = ns("demo") + &ns("other") + &ns("ambit-system");
    yaml += &pod("demo", "local", "node-a", "app: web");
    yaml += &pod("other", "remote", "node-b", "app: web");
    yaml += &policy("ambit-system", "global", "{}");
    yaml += &policy("demo", "demo-wide", "{}");
    yaml += &policy("other", "other-wide", "{}");
    yaml += &policy(
        "other",
        "only-remote",
        "{selector: {matchLabels: {app: web}}}",
    );
    yaml += &policy(
        "demo",
        "only-local",
        "{selector: {matchLabels: {app: web}}}",
    );
    yaml += &policy(
        "demo",
        "for-waypoint",
        "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}",
    );
    apply(&sink, &yaml).await;
    let server = serve(model).await;

    let mut a = connect(server.addr, ztunnel("node-a")).await;
    let got = upserts(&a.next().await);
    let authz: Vec<_> = got
        .iter()
        .filter(|u| u.starts_with("authz"))
        .cloned()
        .collect();
    assert_eq!(
        authz,
        vec![
            "authz ambit-system/global",
            "authz demo/demo-wide",
            "authz demo/only-local"
        ]
    );
    // It still gets every workload: it may have to reach any of them.
    assert!(got.contains(&"workload other/remote".to_string()));

    let mut b = connect(server.addr, ztunnel("node-b")).await;
    let authz: Vec<_> = upserts(&b.next().await)
        .into_iter()
        .filter(|u| u.starts_with("authz"))
        .collect();
    assert_eq!(
        authz,
        vec![
            "authz ambit-system/global",
            "authz other/only-remote",
            "authz other/other-wide"
        ]
    );

    // Moving the policy's scope changes who gets it: node-a gets the new policy, node-b a removal.
    apply(
        &sink,
        &policy(
            "other",
            "only-remote",
            "{selector: {matchLabels: {app: nothing}}}",
        ),
    )
    .await;
    let push = b.next().await;
    let removals: Vec<_> = push.removals.iter().map(|k| k.name.clone()).collect();
    assert_eq!(removals, vec!["other/only-remote"]);
    // node-a needs the workload (its policy list changed) but not the policy.
    let push = a.next().await;
    assert_eq!(upserts(&push), vec!["workload other/remote"]);
    assert!(push.removals.is_empty());
}

#[tokio::test]
async fn peer_authentications_reach_only_ztunnels_that_accept_them() {
    let (sink, model) = direct_model().await;
    let mut yaml = ns("demo") + &ns("other") + &ns("ambit-system");
    yaml += &pod("demo", "local", "node-a", "app: web");
    yaml += &pod("other", "remote", "node-b", "app: web");
    let pa = |ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n")
    };
    yaml += &pa("ambit-system", "mesh", "{mtls: {mode: STRICT}}");
    yaml += &pa("demo", "strict", "{mtls: {mode: STRICT}}");
    yaml += &pa(
        "demo",
        "web",
        "{selector: {matchLabels: {app: web}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}",
    );
    yaml += &pa("other", "permissive", "{mtls: {mode: PERMISSIVE}}");
    apply(&sink, &yaml).await;
    let server = serve(model).await;
    let peer_auths = |push: &Push| -> Vec<String> {
        upserts(push)
            .into_iter()
            .filter(|u| u.starts_with("pa "))
            .collect()
    };

    // A ztunnel that says it decodes them: the mesh's and those of its pods' namespaces.
    let newer = Hello {
        accepts: vec![ResourceKind::PeerAuthentication as i32],
        ..ztunnel("node-a")
    };
    let mut a = connect(server.addr, newer).await;
    assert_eq!(
        peer_auths(&a.next().await),
        vec!["pa ambit-system/mesh", "pa demo/strict", "pa demo/web"]
    );
    // An older ztunnel (its Hello lists no such kind) would NACK them: it gets none, and
    // the rest of its state as before.
    let mut old = connect(server.addr, ztunnel("node-a")).await;
    let push = old.next().await;
    assert!(peer_auths(&push).is_empty(), "{:?}", upserts(&push));
    assert!(upserts(&push).contains(&"workload demo/local".to_string()));
    // Waypoints never get them.
    let mut wp = connect(server.addr, waypoint("demo/wp")).await;
    assert!(peer_auths(&wp.next().await).is_empty());
}

#[tokio::test]
async fn a_waypoint_gets_its_policies_routes_and_traffic_policies() {
    let (sink, model) = direct_model().await;
    let mut yaml = ns("demo");
    yaml += "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: demo}\nspec: {gatewayClassName: ambit-waypoint, addresses: [{value: 10.0.9.9}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo, labels: {ambit.dev/use-waypoint: wp}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: demo}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
    yaml += &policy(
        "demo",
        "gw",
        "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}",
    );
    yaml += &policy("demo", "svc", "{targetRefs: [{kind: Service, name: web}]}");
    yaml += &policy(
        "demo",
        "plain-svc",
        "{targetRefs: [{kind: Service, name: plain}]}",
    );
    yaml += &policy("demo", "ns-wide", "{}");
    for svc in ["web", "plain"] {
        yaml += &format!("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {svc}, namespace: demo}}\nspec: {{parentRefs: [{{kind: Service, name: {svc}}}]}}\n");
        yaml += &format!("---\napiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {{name: {svc}, namespace: demo}}\nspec: {{targetRef: {{name: {svc}}}}}\n");
    }
    apply(&sink, &yaml).await;
    let server = serve(model).await;

    let mut w = connect(server.addr, waypoint("demo/wp")).await;
    let got = upserts(&w.next().await);
    let l7: Vec<_> = got
        .iter()
        .filter(|u| !u.starts_with("workload") && !u.starts_with("service"))
        .cloned()
        .collect();
    assert_eq!(
        l7,
        vec![
            "authz demo/gw",
            "authz demo/svc",
            "route demo/web",
            "tp demo/web"
        ]
    );

    let mut z = connect(server.addr, ztunnel("node-a")).await;
    let got = upserts(&z.next().await);
    assert!(
        got.iter()
            .all(|u| !u.starts_with("route") && !u.starts_with("tp")),
        "{got:?}"
    );

    let endpoint = Endpoint::from_shared(format!("http://{}", server.addr)).expect("uri");
    let bad = connect_with(endpoint, waypoint("no-slash"))
        .await
        .err()
        .expect("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_slow_subscriber_does_not_delay_others_and_later_gets_the_net_state() {
    let (sink, model) = direct_model().await;
    apply(&sink, &ns("demo")).await;
    let server = serve(model.clone()).await;

    // The slow proxy never reads; a tiny HTTP/2 window makes the back-pressure reach the
    // controller after a few pushes instead of after megabytes of socket buffers.
    let slow_endpoint = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024);
    let mut slow = connect_with(slow_endpoint, ztunnel("slow"))
        .await
        .expect("slow");
    let mut fast = connect(server.addr, ztunnel("fast")).await;
    fast.next().await;

    // Each change adds a workload with ~8 KiB of labels.
    let big = "x".repeat(1000);
    const CHANGES: usize = 30;
    for i in 0..CHANGES {
        let labels: Vec<String> = (0..8).map(|j| format!("l{j}: {big}{i}")).collect();
        apply(
            &sink,
            &pod("demo", &format!("p{i:02}"), "n", &labels.join(", ")),
        )
        .await;
        let push = tokio::time::timeout(Duration::from_secs(5), fast.next())
            .await
            .expect("the fast proxy was held up");
        assert_eq!(upserts(&push), vec![format!("workload demo/p{i:02}")]);
    }
    // Also change one object several times: only its last state may matter.
    for v in 0..3 {
        apply(&sink, &pod("demo", "p00", "n", &format!("final: v{v}"))).await;
        fast.next().await;
    }
    let final_version = model.current().version;

    let slow_pushes = server
        .registry
        .snapshot()
        .iter()
        .find(|s| s.proxy.contains("slow"))
        .expect("slow registered")
        .pushes;
    assert!(
        slow_pushes < (CHANGES as u64) / 2,
        "the slow proxy's updates were not coalesced: {slow_pushes} pushes"
    );

    // Resume reading: the slow proxy catches up with a few pushes, the last carrying the
    // net difference, and ends with exactly the model's state.
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    let mut received = 0;
    loop {
        let push = slow.next().await;
        received += 1;
        for r in &push.upserts {
            if let Some(resource::Kind::Workload(w)) = &r.kind {
                let labels: BTreeSet<String> = w
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={}", &v[..v.len().min(3)]))
                    .collect();
                state.insert(
                    w.uid.clone(),
                    labels.into_iter().collect::<Vec<_>>().join(","),
                );
            }
        }
        if push.version == final_version {
            break;
        }
    }
    eprintln!("slow proxy: {slow_pushes} pushes queued while stalled, {received} read to catch up");
    assert!(
        received <= slow_pushes as usize + 1,
        "{received} pushes to catch up"
    );
    assert_eq!(state.len(), CHANGES);
    assert_eq!(state["demo/p00"], "final=v2");
}

#[tokio::test]
async fn a_reconnecting_proxy_gets_full_state() {
    let (sink, model) = direct_model().await;
    apply(&sink, &(ns("demo") + &pod("demo", "a", "n", "app: a"))).await;
    let server = serve(model.clone()).await;
    let mut c = connect(server.addr, ztunnel("n")).await;
    let first = c.next().await;
    assert_eq!(upserts(&first), vec!["workload demo/a"]);
    drop(c);
    wait_stats(&server.registry, "subscriber gone", |_| true).await;

    apply(&sink, &pod("demo", "b", "n", "app: b")).await;
    model
        .wait_for(|s| s.resources.len() == 2)
        .await
        .expect("model");
    let mut c = connect(server.addr, ztunnel("n")).await;
    let again = c.next().await;
    assert!(again.full_state);
    assert_eq!(again.trust_roots.len(), 1);
    assert_eq!(upserts(&again), vec!["workload demo/a", "workload demo/b"]);
}

#[tokio::test]
async fn a_nack_is_recorded_and_the_model_moves_on() {
    let (sink, model) = direct_model().await;
    apply(&sink, &(ns("demo") + &pod("demo", "a", "n", "app: a"))).await;
    let server = serve(model).await;
    let mut c = connect(server.addr, ztunnel("n")).await;
    let push = c.next().await;
    c.tx.send(SubscribeRequest {
        message: Some(subscribe_request::Message::Nack(Nack {
            nonce: push.nonce.clone(),
            reason: "workload demo/a: bad address".into(),
        })),
    })
    .await
    .expect("nack");
    let nonce = push.nonce.clone();
    wait_stats(&server.registry, "NACK recorded", |s| {
        s.nacks == 1 && s.last_nack == Some((nonce.clone(), "workload demo/a: bad address".into()))
    })
    .await;
    apply(&sink, &pod("demo", "b", "n", "app: b")).await;
    assert_eq!(upserts(&c.next().await), vec!["workload demo/b"]);
}
