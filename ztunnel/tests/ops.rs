//! The operations ports wired together as the binary wires them: one drain for the
//! admin, metrics and readiness servers, `/quitquitquit` asking for shutdown, and drain
//! closing idle keep-alive connections promptly instead of waiting for the deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_ztunnel::admin::{Admin, AdminServer};
use ambit_ztunnel::drain::{self, DrainOutcome, ShutdownRequest};
use ambit_ztunnel::metrics::{Metrics, MetricsServer};
use ambit_ztunnel::readiness::{ReadinessServer, Ready};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// A keep-alive HTTP/1 client connection.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    closed: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let closed = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { send, closed, addr }
    }

    async fn request(&mut self, method: Method, path: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Empty::new())
            .expect("request");
        let resp = self.send.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn quitquitquit_drains_every_operations_server() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (trigger, watcher) = drain::channel();
    let shutdown = ShutdownRequest::new();
    let ready = Ready::new();
    let starting = ready.register("discovery: first full state");

    let admin = AdminServer::bind(any, Admin::new().with_shutdown(shutdown.clone()))
        .await
        .expect("admin");
    let metrics = MetricsServer::bind(any, Metrics::new())
        .await
        .expect("metrics");
    let readiness = ReadinessServer::bind(any, ready.clone())
        .await
        .expect("readiness");
    let addrs = [
        admin.local_addr(),
        metrics.local_addr(),
        readiness.local_addr(),
    ];
    let servers = [
        tokio::spawn(admin.serve(watcher.clone())),
        tokio::spawn(metrics.serve(watcher.clone())),
        tokio::spawn(readiness.serve(watcher.clone())),
    ];
    drop(watcher);

    // A scraper holding a keep-alive connection open, and a kubelet probing readiness.
    let mut scraper = Client::connect(addrs[1]).await;
    assert_eq!(
        scraper.request(Method::GET, "/metrics").await.0,
        StatusCode::OK
    );
    let mut kubelet = Client::connect(addrs[2]).await;
    assert_eq!(
        kubelet.request(Method::GET, "/healthz/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    drop(starting);
    assert_eq!(
        kubelet.request(Method::GET, "/healthz/ready").await.0,
        StatusCode::OK
    );

    // What main does: wait for a signal or /quitquitquit, then drain.
    let main = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = drain::signal_handler() => {}
                () = shutdown.requested() => {}
            }
            let start = Instant::now();
            let outcome = trigger.drain_and_wait(Duration::from_secs(5)).await;
            (outcome, start.elapsed())
        }
    });
    let mut operator = Client::connect(addrs[0]).await;
    let (status, body) = operator.request(Method::POST, "/quitquitquit").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "draining\n"));

    let (outcome, took) = main.await.expect("main");
    assert_eq!(outcome, DrainOutcome::Complete);
    // Idle keep-alive connections are closed at once, not held to the deadline.
    assert!(took < Duration::from_secs(2), "drain took {took:?}");
    for server in servers {
        server.await.expect("server task");
    }
    for client in [scraper, kubelet, operator] {
        tokio::time::timeout(Duration::from_secs(2), client.closed)
            .await
            .expect("server closed the keep-alive connection")
            .expect("join");
    }
    for addr in addrs {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepting after drain"
        );
    }
}
