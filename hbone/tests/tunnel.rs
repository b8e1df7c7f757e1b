//! The HBONE tunnel end to end: real certificates from a test CA, real TLS 1.3 and HTTP/2
//! over loopback sockets, the pooled client against the server.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::client::{ConnectError, ConnectTarget, SocketFactory};
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{
    ConnectRequest, Handler, Keepalive, Refusal, Server, ServerConfigSource, ServerSettings,
    ServerStats,
};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::testing::TestPki;
use ambit_hbone::{tls, Identity};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TD: &str = "cluster.local";

// The port of the `:authority` picks what the test handler does; any port not listed
// below echoes (tests use 7).
/// Read to EOF, record a digest of what came, then reply with `REPLY_LEN` pattern bytes.
const SINK_THEN_REPLY: u16 = 9;
const REPLY_LEN: usize = 8 * 1024 * 1024;
const DENY_401: u16 = 401;
const DENY_403: u16 = 403;
const DENY_503: u16 = 503;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa).unwrap()
}

/// Deterministic bytes, different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to tell that the server saw exactly the bytes sent.
fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the handler saw for one stream.
#[derive(Debug, Clone)]
struct Seen {
    request: ConnectRequest,
    /// For SINK_THEN_REPLY: (length, digest) of what was received.
    received: Option<(usize, u64)>,
    /// The identity the server-side stream reports.
    stream_identity: Option<Identity>,
}

#[derive(Clone, Default)]
struct TestHandler {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// `serve` calls that returned.
    finished: Arc<std::sync::atomic::AtomicUsize>,
}

impl TestHandler {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for TestHandler {
    type Accepted = ConnectRequest;

    async fn accept(&self, request: &ConnectRequest) -> Result<ConnectRequest, Refusal> {
        match request.authority.port() {
            DENY_401 => Err(Refusal::Unauthenticated("test says 401".into())),
            DENY_403 => Err(Refusal::Forbidden("test says 403".into())),
            DENY_503 => Err(Refusal::Unreachable("test says 503".into())),
            _ => Ok(request.clone()),
        }
    }

    async fn serve(&self, request: ConnectRequest, mut stream: TunnelStream) {
        let port = request.authority.port();
        let mut seen = Seen {
            request,
            received: None,
            stream_identity: Some(stream.peer_identity().clone()),
        };
        match port {
            SINK_THEN_REPLY => {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                seen.received = Some((got.len(), digest(&got)));
                self.seen.lock().unwrap().push(seen);
                // The client half-closed; this direction is still open.
                stream.write_all(&pattern(99, REPLY_LEN)).await.unwrap();
                stream.shutdown().await.unwrap();
            }
            _ => {
                self.seen.lock().unwrap().push(seen);
                let (mut r, mut w) = tokio::io::split(stream);
                // Errors are for the client side to see; some tests cut tunnels on purpose.
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            }
        }
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

struct TestServer {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    drain: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start_server(
    pki: &TestPki,
    identity: &Identity,
    handler: TestHandler,
    bind: SocketAddr,
    settings: ServerSettings,
) -> TestServer {
    let cert = pki.issue(identity);
    let config = tls::server_config(&cert, &pki.bundle()).unwrap();
    let listener = TcpListener::bind(bind).await.unwrap();
    let server = Server::new(listener, config, handler, settings);
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        stats,
        drain: Some(tx),
        task,
    }
}

fn target(
    pki: &TestPki,
    source: &Identity,
    expected: &Identity,
    peer: SocketAddr,
    authority: &str,
) -> ConnectTarget {
    let cert = pki.issue(source);
    ConnectTarget {
        source: source.clone(),
        tls: tls::client_config(&cert, &pki.bundle(), expected).unwrap(),
        peer,
        expected_identity: expected.clone(),
        authority: authority.parse().unwrap(),
        headers: HeaderMap::new(),
    }
}

async fn echo_roundtrip(stream: &mut TunnelStream, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::with_capacity(data.len());
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_bytes_both_ways_and_half_closes() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());

    let mut stream = pool
        .connect(target(
            &pki,
            &client_id,
            &server_id,
            server.addr,
            "10.0.0.9:9",
        ))
        .await
        .unwrap();
    let upload = pattern(1, 8 * 1024 * 1024);
    stream.write_all(&upload).await.unwrap();
    // Half-close: the server reads EOF, then still sends its whole reply.
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();

    assert_eq!(reply.len(), REPLY_LEN);
    assert!(reply == pattern(99, REPLY_LEN), "reply bytes differ");
    let seen = handler.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].received, Some((upload.len(), digest(&upload))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_identity_authority_headers_and_refusals_become_statuses() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("shop", "frontend"), id("shop", "cart"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());

    let mut t = target(&pki, &client_id, &server_id, server.addr, "10.1.2.3:7");
    t.headers
        .insert("x-ambit-test", HeaderValue::from_static("yes"));
    let mut stream = pool.connect(t).await.unwrap();
    assert_eq!(stream.peer_identity(), &server_id);
    echo_roundtrip(&mut stream, b"hello through the tunnel").await;
    drop(stream);

    let seen = handler.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0].request;
    assert_eq!(request.peer_identity, client_id);
    assert_eq!(seen[0].stream_identity.as_ref(), Some(&client_id));
    assert_eq!(
        request.authority,
        "10.1.2.3:7".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(request.peer_addr.ip(), server.addr.ip());
    assert_eq!(request.local_addr, server.addr);
    assert_eq!(request.headers.get("x-ambit-test").unwrap(), "yes");

    // IPv6 destinations travel as [addr]:port.
    let mut stream = pool
        .connect(target(
            &pki,
            &client_id,
            &server_id,
            server.addr,
            "[fd00::1]:7",
        ))
        .await
        .unwrap();
    echo_roundtrip(&mut stream, b"v6").await;
    assert_eq!(
        handler.seen()[1].request.authority,
        "[fd00::1]:7".parse::<SocketAddr>().unwrap()
    );

    for (port, status) in [(DENY_401, 401), (DENY_403, 403), (DENY_503, 503)] {
        let t = target(
            &pki,
            &client_id,
            &server_id,
            server.addr,
            &format!("10.1.2.3:{port}"),
        );
        let err = pool.connect(t).await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(status), "{err}");
        match (status, &err) {
            (401, ConnectError::Unauthenticated { .. })
            | (403, ConnectError::Forbidden { .. })
            | (503, ConnectError::Unreachable { .. }) => {}
            _ => panic!("status {status} gave {err:?}"),
        }
    }
    // Refusals did not reach `serve`; they reused the one pooled connection.
    assert_eq!(handler.seen().len(), 2);
    assert_eq!(server.stats.streams_refused.load(Ordering::Relaxed), 3);
    assert_eq!(server.stats.connections_accepted.load(Ordering::Relaxed), 1);
}

/// A hand-rolled HTTP/2 client, to send what our pool never would.
async fn raw_request(
    pki: &TestPki,
    server: &TestServer,
    server_id: &Identity,
    method: Method,
    uri: &str,
) -> StatusCode {
    let client_id = id("raw", "client");
    let config = tls::client_config(&pki.issue(&client_id), &pki.bundle(), server_id).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (response, _body) = send.send_request(request, false).unwrap();
    response.await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_405() {
    let pki = TestPki::new(TD);
    let server_id = id("shop", "cart");
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;

    assert_eq!(
        raw_request(
            &pki,
            &server,
            &server_id,
            Method::CONNECT,
            "cart.shop.svc:80"
        )
        .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw_request(&pki, &server, &server_id, Method::CONNECT, "10.0.0.1:0").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw_request(
            &pki,
            &server,
            &server_id,
            Method::GET,
            "https://10.0.0.1:80/"
        )
        .await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // A well-formed CONNECT from the same hand-rolled client works: the wire format is
    // plain HTTP/2, not something only our pool speaks.
    assert_eq!(
        raw_request(&pki, &server, &server_id, Method::CONNECT, "10.0.0.1:7").await,
        StatusCode::OK
    );
    assert_eq!(handler.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_an_unexpected_identity() {
    let pki = TestPki::new(TD);
    let client_id = id("shop", "frontend");
    let (actual, expected) = (id("shop", "impostor"), id("shop", "cart"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &actual,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());

    let err = pool
        .connect(target(
            &pki,
            &client_id,
            &expected,
            server.addr,
            "10.0.0.1:7",
        ))
        .await
        .unwrap_err();
    let ConnectError::Tls { expected: e, .. } = &err else {
        panic!("expected a TLS error, got {err:?}");
    };
    assert_eq!(e, &expected);
    let message = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        message.contains("spiffe://cluster.local/ns/shop/sa/impostor"),
        "{message}"
    );
    assert!(handler.seen().is_empty());
    assert_eq!(pool.connection_count(), 0);
    // Nothing is kept for a key that never got a connection.
    assert_eq!(pool.key_count(), 0);
}

/// Opens `n` tunnels through `pool` all at once (they are all open at the same moment),
/// echoes distinct bytes through each, and returns.
async fn concurrent_echo(pool: &Pool, make: impl Fn(usize) -> ConnectTarget, n: usize, len: usize) {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (pool, t, barrier) = (pool.clone(), make(i), barrier.clone());
        tasks.spawn(async move {
            let mut stream = pool.connect(t).await.unwrap();
            // Everyone holds a tunnel before anyone finishes, so the pool must fit `n`
            // concurrent streams.
            barrier.wait().await;
            echo_roundtrip(&mut stream, &pattern(i as u64, len)).await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tunnels_share_few_connections() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("load", "client"), id("load", "server"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    let t = target(&pki, &client_id, &server_id, server.addr, "10.0.0.1:7");

    concurrent_echo(&pool, |_| t.clone(), 1000, 16 * 1024).await;

    assert_eq!(handler.seen().len(), 1000);
    // 1000 concurrent streams at 100 per connection: exactly 10 are needed, a thundering
    // herd would open many more.
    let accepted = server.stats.connections_accepted.load(Ordering::Relaxed);
    assert!((10..=12).contains(&accepted), "{accepted} connections");
    assert_eq!(
        pool.stats().connections_opened.load(Ordering::Relaxed),
        accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_lower_stream_limit_is_respected() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("load", "client"), id("load", "server"));
    let handler = TestHandler::default();
    let settings = ServerSettings {
        max_concurrent_streams: 30,
        ..ServerSettings::default()
    };
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        settings,
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    let t = target(&pki, &client_id, &server_id, server.addr, "10.0.0.1:7");

    // Would deadlock at the barrier if streams beyond 30 queued on a full connection.
    tokio::time::timeout(
        Duration::from_secs(30),
        concurrent_echo(&pool, |_| t.clone(), 120, 1024),
    )
    .await
    .expect("streams stalled behind the server's limit");
    let accepted = server.stats.connections_accepted.load(Ordering::Relaxed);
    assert!((4..=5).contains(&accepted), "{accepted} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_never_shared_across_source_identities() {
    let pki = TestPki::new(TD);
    let (alice, bob, server_id) = (id("a", "alice"), id("b", "bob"), id("s", "server"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    let ta = target(&pki, &alice, &server_id, server.addr, "10.0.0.1:7");
    let tb = target(&pki, &bob, &server_id, server.addr, "10.0.0.1:7");

    concurrent_echo(
        &pool,
        |i| if i % 2 == 0 { ta.clone() } else { tb.clone() },
        20,
        1024,
    )
    .await;

    assert_eq!(server.stats.connections_accepted.load(Ordering::Relaxed), 2);
    let seen = handler.seen();
    assert_eq!(seen.len(), 20);
    // Each connection (client address) carried exactly one identity.
    let mut by_conn = std::collections::HashMap::<SocketAddr, Identity>::new();
    for s in &seen {
        let first = by_conn
            .entry(s.request.peer_addr)
            .or_insert(s.request.peer_identity.clone());
        assert_eq!(first, &s.request.peer_identity);
    }
    let mut identities: Vec<_> = by_conn.into_values().collect();
    identities.sort();
    assert_eq!(identities, vec![alice, bob]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_evicted_and_the_next_connect_succeeds() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let first = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let addr = first.addr;
    let pool = Pool::new(PoolConfig::default());
    let t = target(&pki, &client_id, &server_id, addr, "10.0.0.1:7");

    let mut stream = pool.connect(t.clone()).await.unwrap();
    echo_roundtrip(&mut stream, b"before").await;
    drop(stream);
    assert_eq!(pool.connection_count(), 1);

    // The server process dies: its sockets close without GOAWAY.
    first.task.abort();
    let _ = first.task.await;
    let evicted = async {
        while pool.connection_count() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), evicted)
        .await
        .expect("dead connection still pooled");

    // It comes back on the same port.
    let second = start_server(
        &pki,
        &server_id,
        handler.clone(),
        addr,
        ServerSettings::default(),
    )
    .await;
    let mut stream = pool.connect(t.clone()).await.unwrap();
    echo_roundtrip(&mut stream, b"after").await;
    assert_eq!(second.stats.connections_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(pool.stats().connections_opened.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_connection_is_not_reused() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let mut first = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings {
            drain_deadline: Duration::from_millis(300),
            ..ServerSettings::default()
        },
    )
    .await;
    let addr = first.addr;
    let pool = Pool::new(PoolConfig::default());
    let t = target(&pki, &client_id, &server_id, addr, "10.0.0.1:7");

    // A tunnel is open when the server starts draining.
    let mut open = pool.connect(t.clone()).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    open.read_exact(&mut buf).await.unwrap();
    first.drain.take().unwrap().send(()).unwrap();

    // Draining: the open tunnel still works until the deadline...
    tokio::time::sleep(Duration::from_millis(50)).await;
    open.write_all(b"pong").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // ...new connections are not accepted (the listener is closed)...
    let err = pool.connect(t.clone()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Tcp { .. }), "{err:?}");
    // The stream was refused by the GOAWAY'd connection before being sent, and retried
    // (once) on a fresh connection, which is what failed.
    assert_eq!(pool.stats().retries.load(Ordering::Relaxed), 1);
    // ...and at the deadline the rest is cut.
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(matches!(cut, Ok(Err(_))), "{cut:?}");
    tokio::time::timeout(Duration::from_secs(5), first.task)
        .await
        .expect("server did not stop after its drain deadline")
        .unwrap();

    // A new server on the same port gets a new connection.
    let second = start_server(
        &pki,
        &server_id,
        handler.clone(),
        addr,
        ServerSettings::default(),
    )
    .await;
    let mut stream = pool.connect(t).await.unwrap();
    echo_roundtrip(&mut stream, b"after drain").await;
    assert_eq!(second.stats.connections_accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_hits_the_handshake_timeout() {
    let pki = TestPki::new(TD);
    let server_id = id("app", "server");
    let server = start_server(
        &pki,
        &server_id,
        TestHandler::default(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings {
            handshake_timeout: Duration::from_millis(200),
            ..ServerSettings::default()
        },
    )
    .await;
    // Connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(server.stats.handshakes_failed.load(Ordering::Relaxed), 1);
}

/// Counts the sockets it makes, and binds them to a chosen source address, as the node
/// proxy's factory would set a mark or a network namespace.
struct CountingFactory {
    made: std::sync::atomic::AtomicUsize,
}

impl SocketFactory for CountingFactory {
    fn new_socket(
        &self,
        _source: &Identity,
        _peer: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpSocket> {
        self.made.fetch_add(1, Ordering::Relaxed);
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().unwrap())?;
        Ok(socket)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_come_from_the_factory_and_idle_connections_close() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let factory = Arc::new(CountingFactory {
        made: Default::default(),
    });
    let config = PoolConfig {
        idle_timeout: Duration::from_millis(300),
        ..PoolConfig::default()
    };
    let pool = Pool::with_socket_factory(config, factory.clone());
    let t = target(&pki, &client_id, &server_id, server.addr, "10.0.0.1:7");

    for round in 0..3 {
        let mut stream = pool.connect(t.clone()).await.unwrap();
        echo_roundtrip(&mut stream, format!("round {round}").as_bytes()).await;
    }
    // Three tunnels one after the other: one connection, one socket.
    assert_eq!(factory.made.load(Ordering::Relaxed), 1);
    assert_eq!(pool.connection_count(), 1);

    // A connection with an open stream is not idle, however long the stream lasts.
    let mut held = pool.connect(t.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.connection_count(), 1);
    echo_roundtrip(&mut held, b"still here").await;
    drop(held);

    // Without streams it closes after the idle timeout (and the key is forgotten)...
    let closed = async {
        while pool.connection_count() != 0 || pool.key_count() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("idle connection still pooled");
    // ...and the next tunnel opens a new one through the factory.
    let mut stream = pool.connect(t).await.unwrap();
    echo_roundtrip(&mut stream, b"fresh").await;
    assert_eq!(factory.made.load(Ordering::Relaxed), 2);
    assert_eq!(server.stats.connections_accepted.load(Ordering::Relaxed), 2);
}

/// A TCP relay that can turn into a black hole: once frozen it swallows what it reads and
/// keeps every socket open, like a peer whose node vanished.
async fn freezable_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    async fn pump(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let (a, _) = listener.accept().await.unwrap();
            let b = tokio::net::TcpStream::connect(to).await.unwrap();
            let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
            tokio::spawn(pump(ar, bw, f.clone()));
            tokio::spawn(pump(br, aw, f.clone()));
        }
    });
    (addr, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_tunnels_through_a_vanished_peer() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let keepalive = Some(Keepalive {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
    });
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings {
            keepalive,
            ..ServerSettings::default()
        },
    )
    .await;
    let (relay, frozen) = freezable_relay(server.addr).await;
    let pool = Pool::new(PoolConfig {
        keepalive,
        ..PoolConfig::default()
    });
    let mut stream = pool
        .connect(target(&pki, &client_id, &server_id, relay, "10.0.0.1:7"))
        .await
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    stream.read_exact(&mut buf).await.unwrap();
    // Quiet for several keepalive intervals: PINGs are answered, nothing is closed.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream.write_all(b"pong").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");

    frozen.store(true, Ordering::Relaxed);
    // The client gives up on the silent peer: the tunnel fails rather than hanging...
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(matches!(read, Ok(Err(_))), "{read:?}");
    assert_eq!(pool.connection_count(), 0);
    // ...and the server gives up on the silent client, ending the tunnel's handler.
    let finished = async {
        while handler.finished.load(Ordering::Relaxed) != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), finished)
        .await
        .expect("server kept the tunnel of a silent client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_server_does_not_trust_gets_a_tls_error() {
    let pki = TestPki::new(TD);
    let stranger_pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let handler = TestHandler::default();
    let server = start_server(
        &pki,
        &server_id,
        handler.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerSettings::default(),
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    // The client trusts the server's CA but its own certificate comes from another CA.
    let mut t = target(&pki, &client_id, &server_id, server.addr, "10.0.0.1:7");
    let mut roots = pki.bundle().roots().to_vec();
    roots.extend(stranger_pki.bundle().roots().iter().cloned());
    let bundle = tls::TrustBundle::new(TD, roots).unwrap();
    t.tls = tls::client_config(&stranger_pki.issue(&client_id), &bundle, &server_id).unwrap();

    let err = pool.connect(t).await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("alert"), "{err}");
    assert!(handler.seen().is_empty());
    assert_eq!(server.stats.handshakes_failed.load(Ordering::Relaxed), 1);
    assert_eq!(
        server.stats.connections_established.load(Ordering::Relaxed),
        0
    );
}

/// A certificate source with nothing to offer until `ready` is set, like a proxy whose
/// first certificate is still being signed.
struct NotYet {
    config: Arc<rustls::ServerConfig>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    asked: Arc<std::sync::atomic::AtomicUsize>,
}

impl ServerConfigSource for NotYet {
    async fn server_config(
        &self,
        _local: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        if self.ready.load(Ordering::Relaxed) {
            Ok(self.config.clone())
        } else {
            Err("no certificate yet".into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_asks_its_config_source_per_connection() {
    let pki = TestPki::new(TD);
    let (client_id, server_id) = (id("app", "client"), id("app", "server"));
    let source = NotYet {
        config: tls::server_config(&pki.issue(&server_id), &pki.bundle()).unwrap(),
        ready: Default::default(),
        asked: Default::default(),
    };
    let (ready, asked) = (source.ready.clone(), source.asked.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(
        listener,
        source,
        TestHandler::default(),
        ServerSettings::default(),
    );
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));
    let pool = Pool::new(PoolConfig::default());
    let t = target(&pki, &client_id, &server_id, addr, "10.0.0.1:7");

    // No certificate: the connection is closed before TLS, the client sees a TLS failure.
    let err = pool.connect(t.clone()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    // Once there is one, the next connection gets it without restarting the server.
    ready.store(true, Ordering::Relaxed);
    let mut stream = pool.connect(t).await.unwrap();
    echo_roundtrip(&mut stream, b"certified").await;
    assert_eq!(asked.load(Ordering::Relaxed), 2);
}
