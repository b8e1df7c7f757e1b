//! The discovery client against a real tonic server on 127.0.0.1 that plays a scripted
//! controller: full state applied and ACKed, a bad push NACKed with the old state kept,
//! the server killed and restarted (state kept meanwhile, then replaced), readiness.

use std::net::SocketAddr;
use std::time::Duration;

use ambit_proto::discovery as pb;
use ambit_ztunnel::discovery::{Backoff, BoxError, ConnectFn, DiscoveryClient, DiscoveryConfig};
use ambit_ztunnel::state::Store;
use anyhow::{bail, Context, Result};
use pb::discovery_server::{Discovery, DiscoveryServer};
use pb::subscribe_request::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};

/// One stream the client opened, as the test drives it.
struct Conn {
    pushes: mpsc::UnboundedSender<Result<pb::Push, Status>>,
    requests: mpsc::UnboundedReceiver<pb::SubscribeRequest>,
}

impl Conn {
    async fn next(&mut self) -> Result<Message> {
        let req = tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .context("waiting for a request from the client")?
            .context("stream closed")?;
        req.message.context("empty request")
    }

    fn push(&self, p: pb::Push) -> Result<()> {
        self.pushes.send(Ok(p)).ok().context("stream gone")
    }
}

struct Scripted {
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl Discovery for Scripted {
    type SubscribeStream = UnboundedReceiverStream<Result<pb::Push, Status>>;

    async fn subscribe(
        &self,
        request: Request<tonic::Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if req_tx.send(m).is_err() {
                    break;
                }
            }
        });
        let _ = self.conns.send(Conn {
            pushes: push_tx,
            requests: req_rx,
        });
        Ok(Response::new(UnboundedReceiverStream::new(push_rx)))
    }
}

/// A controller on its own thread and runtime: killing it drops every connection at once,
/// as a crashed process would.
struct Controller {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Controller {
    fn start(addr: SocketAddr, conns: mpsc::UnboundedSender<Conn>) -> Result<Self> {
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                // The previous server's connections may linger in TIME_WAIT on this port.
                socket.set_reuseaddr(true).expect("reuseaddr");
                socket.bind(addr).expect("bind");
                let listener = socket.listen(64).expect("listen");
                bound_tx
                    .send(listener.local_addr().expect("local addr"))
                    .expect("report address");
                let serve = Server::builder()
                    .add_service(DiscoveryServer::new(Scripted { conns }))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_background();
        });
        let addr = bound_rx
            .recv_timeout(Duration::from_secs(10))
            .context("server did not start")?;
        Ok(Controller {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn workload(name: &str, addr: [u8; 4]) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Workload(pb::Workload {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            node: "node-1".into(),
            addresses: vec![addr.to_vec()],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            ..Default::default()
        })),
    }
}

fn push(nonce: &str, full_state: bool, version: u64, upserts: Vec<pb::Resource>) -> pb::Push {
    pb::Push {
        nonce: nonce.into(),
        full_state,
        version,
        upserts,
        removals: vec![],
        trust_roots: vec![],
    }
}

async fn expect_ack(conn: &mut Conn, nonce: &str) -> Result<()> {
    match conn.next().await? {
        Message::Ack(a) if a.nonce == nonce => Ok(()),
        other => bail!("expected ACK of {nonce}, got {other:?}"),
    }
}

async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>) -> Result<Conn> {
    tokio::time::timeout(Duration::from_secs(10), conns.recv())
        .await
        .context("client did not (re)connect")?
        .context("server gone")
}

fn names(client: &DiscoveryClient) -> Vec<String> {
    client
        .reader()
        .snapshot()
        .workloads()
        .map(|w| w.name.to_string())
        .collect()
}

#[tokio::test]
async fn applies_acks_nacks_and_survives_a_controller_restart() -> Result<()> {
    let (conns_tx, mut conns) = mpsc::unbounded_channel();
    let server = Controller::start("127.0.0.1:0".parse()?, conns_tx.clone())?;
    let addr = server.addr;

    let store = Store::new(Some("node-1"));
    let mut local = store.reader().watch_local();
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(1));
    let client = DiscoveryClient::spawn(
        endpoint,
        store,
        DiscoveryConfig {
            node: "node-1".into(),
            node_dir: None,
            backoff: Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
            credential_file: None,
            metrics_port: None,
        },
    );
    let mut ready = client.ready();

    // Hello first, with our node.
    let mut conn = next_conn(&mut conns).await?;
    match conn.next().await? {
        Message::Hello(h) => {
            assert_eq!(h.kind, pb::ProxyKind::Ztunnel as i32);
            assert_eq!(h.node, "node-1");
        }
        other => bail!("expected Hello, got {other:?}"),
    }
    assert!(!*ready.borrow(), "not ready before a full state");

    // Full state: applied, ACKed, ready, local workloads announced.
    conn.push(push(
        "n1",
        true,
        1,
        vec![workload("a", [10, 0, 0, 1]), workload("b", [10, 0, 0, 2])],
    ))?;
    expect_ack(&mut conn, "n1").await?;
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await??;
    assert_eq!(names(&client), vec!["a", "b"]);
    local.changed().await?;
    assert_eq!(local.borrow_and_update().len(), 2);

    // An invalid push is NACKed with the conversion error; the last good state stays.
    let mut bad = workload("web-0", [10, 0, 0, 3]);
    if let Some(pb::resource::Kind::Workload(w)) = &mut bad.kind {
        w.addresses = vec![vec![1, 2, 3, 4, 5]];
    }
    conn.push(push(
        "n2",
        false,
        2,
        vec![workload("c", [10, 0, 0, 4]), bad],
    ))?;
    match conn.next().await? {
        Message::Nack(n) => {
            assert_eq!(n.nonce, "n2");
            assert_eq!(
                n.reason,
                "workload default/web-0 (uid uid-web-0): address 0 is 5 bytes, not an IPv4 or IPv6 address"
            );
        }
        other => bail!("expected NACK, got {other:?}"),
    }
    assert_eq!(names(&client), vec!["a", "b"]);
    assert_eq!(client.reader().snapshot().version(), 1);
    assert_eq!(client.status().borrow().nacks, 1);

    // An incremental push still applies after a NACK.
    conn.push(push("n3", false, 3, vec![workload("c", [10, 0, 0, 4])]))?;
    expect_ack(&mut conn, "n3").await?;
    assert_eq!(names(&client), vec!["a", "b", "c"]);

    // The controller dies: the client notices and keeps its state (and readiness).
    drop(conn);
    server.kill();
    let mut status = client.status();
    tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| !s.connected)).await??;
    tokio::time::sleep(Duration::from_millis(300)).await; // a few failed reconnects
    assert_eq!(names(&client), vec!["a", "b", "c"]);
    assert!(*client.ready().borrow());

    // Back on the same address: the client reconnects, says Hello again, and the new full
    // state replaces everything it had.
    let _server = Controller::start(addr, conns_tx)?;
    let mut conn = next_conn(&mut conns).await?;
    assert!(matches!(conn.next().await?, Message::Hello(_)));
    conn.push(push("m1", true, 10, vec![workload("z", [10, 0, 0, 9])]))?;
    expect_ack(&mut conn, "m1").await?;
    assert_eq!(names(&client), vec!["z"]);
    assert_eq!(client.reader().snapshot().version(), 10);
    let s = client.status().borrow().clone();
    assert!(s.connected && s.streams >= 2, "{s:?}");
    Ok(())
}

#[tokio::test]
async fn stays_unready_without_a_controller_and_stops_with_its_handles() -> Result<()> {
    // Nothing listens here (a port we bind and release).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let store = Store::new(None);
    let reader = store.reader();
    // A closure connector, as a caller plugging in its own TLS would write it.
    let connector = ConnectFn(move || {
        let endpoint = endpoint.clone();
        async move { endpoint.connect().await.map_err(BoxError::from) }
    });
    let client = DiscoveryClient::spawn(
        connector,
        store,
        DiscoveryConfig {
            node: "node-1".into(),
            node_dir: None,
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            credential_file: None,
            metrics_port: None,
        },
    );
    let mut status = client.status();
    tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await??;
    assert!(!*client.ready().borrow());
    assert!(status
        .borrow()
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("connecting to the controller")));
    // The version watch's sender lives in the worker's store: dropping the last handle
    // stops the worker and closes it.
    let mut version = reader.watch_version();
    drop(client);
    drop(status);
    tokio::time::timeout(Duration::from_secs(5), version.changed())
        .await
        .context("worker still running")?
        .expect_err("sender dropped with the worker");
    Ok(())
}
