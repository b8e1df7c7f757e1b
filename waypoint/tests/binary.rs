//! The `waypoint` binary end to end: started with certificate files and a static state, it
//! becomes ready, serves traffic through real HBONE, shows it in `/metrics` and
//! `/config_dump`, and exits cleanly on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ambit_hbone::client::ConnectTarget;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{ConnectRequest, Handler, Refusal, Server, ServerSettings};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::testing::TestPki;
use ambit_hbone::{cert, csr, tls, Identity};
use ambit_testing::{free_port, http_get_async};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

struct Forward;

impl Handler for Forward {
    type Accepted = TcpStream;
    async fn accept(&self, r: &ConnectRequest) -> Result<TcpStream, Refusal> {
        TcpStream::connect(r.authority)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))
    }
    async fn serve(&self, mut tcp: TcpStream, mut s: TunnelStream) {
        let _ = ambit_hbone::copy::copy_bidirectional(&mut s, &mut tcp).await;
    }
}

#[tokio::test]
async fn binary_serves_reports_and_drains() {
    // Backend and destination ztunnel stand-in on 127.0.0.1.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = backend.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |_req: http::Request<hyper::body::Incoming>| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"hi"),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let td = "cluster.local";
    let pki = TestPki::new(td);
    let pod_id = Identity::new(td, "demo", "web").unwrap();
    let wp_id = Identity::new(td, "demo", "waypoint").unwrap();
    let client_id = Identity::new(td, "demo", "client").unwrap();
    let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_port = dest.local_addr().unwrap().port();
    let server = Server::new(
        dest,
        tls::server_config(&pki.issue(&pod_id), &pki.bundle()).unwrap(),
        Forward,
        ServerSettings::default(),
    );
    tokio::spawn(server.run(std::future::pending()));

    let dir = std::env::temp_dir().join(format!("waypoint-binary-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let request = csr::new_csr(&wp_id).unwrap();
    let valid = pki.ca.validate_csr(&request.csr_pem, Some(&wp_id)).unwrap();
    let now = std::time::SystemTime::now();
    let chain = pki
        .ca
        .sign_between(
            &valid,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert::chain_to_pem(&chain)).unwrap();
    std::fs::write(dir.join("key.pem"), request.private_key_pem()).unwrap();
    std::fs::write(
        dir.join("roots.pem"),
        cert::chain_to_pem(&pki.ca.trust_roots()),
    )
    .unwrap();
    std::fs::write(
        dir.join("state.yaml"),
        format!(
            "workloads: [{{uid: web, name: web, namespace: demo, serviceAccount: web, addresses: [127.0.0.1]}}]\n\
             services: [{{name: web, namespace: demo, hostname: web.demo.svc.cluster.local, vips: [10.96.0.10],\n\
               ports: [{{servicePort: 80, targetPort: {}}}], endpoints: [{{workloadUid: web}}]}}]\n\
             requestAuthentications: [{{name: idp, namespace: demo, targetGateway: demo/other,\n\
               spec: {{jwtRules: [{{issuer: idp, jwksUri: 'http://127.0.0.1:1/keys'}}]}}}}]\n",
            backend_addr.port()
        ),
    )
    .unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let ready: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_waypoint"))
        // Identity and gateway from the environment the controller's Deployment sets.
        .env("POD_NAMESPACE", "demo")
        .env("SERVICE_ACCOUNT", "waypoint")
        .env("AMBIT_WAYPOINT_NAME", "waypoint")
        .env("AMBIT_LOG_FORMAT", "json")
        // One runtime thread: nothing the waypoint does may need a second to make progress.
        .env("AMBIT_WORKER_THREADS", "1")
        .arg("--static-state")
        .arg(dir.join("state.yaml"))
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--ca-root-file")
        .arg(dir.join("roots.pem"))
        .args(["--listen", &listen.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--readiness-addr", &ready.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args([
            "--hbone-port",
            &hbone_port.to_string(),
            "--drain-seconds",
            "1",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut is_ready = false;
    for _ in 0..200 {
        if http_get_async(ready, "/healthz/ready")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            is_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_ready, "waypoint never became ready");

    let pool = Pool::new(PoolConfig::default());
    let stream = pool
        .connect(ConnectTarget {
            source: client_id.clone(),
            tls: tls::client_config(&pki.issue(&client_id), &pki.bundle(), &wp_id).unwrap(),
            peer: listen,
            expected_identity: wp_id.clone(),
            authority: "10.96.0.10:80".parse().unwrap(),
            headers: http::HeaderMap::new(),
        })
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            http::Request::builder()
                .uri("/")
                .header("host", "web")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "hi");

    let (_, text) = http_get_async(metrics, "/metrics").await.unwrap();
    assert!(text.contains("istio_requests_total{"), "{text}");
    assert!(
        text.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\""),
        "{text}"
    );
    let (status, dump) = http_get_async(admin, "/config_dump").await.unwrap();
    assert_eq!(status, 200);
    // Not on the ports other nodes can reach.
    assert_eq!(
        http_get_async(metrics, "/config_dump").await.unwrap().0,
        404
    );
    assert_eq!(http_get_async(ready, "/config_dump").await.unwrap().0, 404);
    assert!(dump.contains("web.demo.svc.cluster.local"), "{dump}");
    // The key set nobody serves: its failure, named by URL, on the admin port only.
    let jwks = async || http_get_async(admin, "/jwks").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = jwks().await;
        if body.contains("connecting") || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200);
    assert!(
        body.contains("\"http://127.0.0.1:1/keys\"")
            && body.contains("http://127.0.0.1:1/keys: connecting to 127.0.0.1:1"),
        "{body}"
    );
    assert_eq!(http_get_async(metrics, "/jwks").await.unwrap().0, 404);

    let pid = child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("waypoint did not exit after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
