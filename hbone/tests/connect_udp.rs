//! CONNECT-UDP through the pooled client and the server, over real TLS 1.3 and HTTP/2 on
//! loopback: the request a UDP handler sees, datagrams both ways as capsules, refusals, and a
//! TCP-only server that does not offer extended CONNECT.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ambit_hbone::capsule::{self, Decoder};
use ambit_hbone::client::{ConnectError, ConnectTarget};
use ambit_hbone::connect_udp::TunnelProtocol;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{ConnectRequest, Handler, Refusal, Server, ServerSettings};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::testing::TestPki;
use ambit_hbone::{tls, Identity};
use bytes::Bytes;
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TD: &str = "cluster.local";

/// Echoes every datagram back with a `re:` prefix; refuses port 403. Carries UDP only when
/// `udp` is set.
#[derive(Clone, Default)]
struct Echo {
    udp: bool,
    seen: Arc<Mutex<Vec<(SocketAddr, TunnelProtocol)>>>,
}

impl Handler for Echo {
    type Accepted = ();

    fn carries_udp(&self) -> bool {
        self.udp
    }

    async fn accept(&self, request: &ConnectRequest) -> Result<(), Refusal> {
        self.seen
            .lock()
            .unwrap()
            .push((request.authority, request.protocol));
        if request.authority.port() == 403 {
            return Err(Refusal::Forbidden("test says 403".into()));
        }
        Ok(())
    }

    async fn serve(&self, (): (), mut stream: TunnelStream) {
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            decoder.push(&buf[..n]);
            while let Ok(Some(datagram)) = decoder.next_datagram() {
                let mut reply = b"re:".to_vec();
                reply.extend_from_slice(&datagram);
                if stream.write_all(&capsule::datagram(&reply)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn id(sa: &str) -> Identity {
    Identity::new(TD, "app", sa).unwrap()
}

async fn start(pki: &TestPki, server_id: &Identity, handler: Echo) -> SocketAddr {
    let config = tls::server_config(&pki.issue(server_id), &pki.bundle()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, config, handler, ServerSettings::default());
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));
    addr
}

fn target(pki: &TestPki, peer: SocketAddr, authority: &str) -> ConnectTarget {
    let (client, server) = (id("client"), id("server"));
    ConnectTarget {
        source: client.clone(),
        tls: tls::client_config(&pki.issue(&client), &pki.bundle(), &server).unwrap(),
        peer,
        expected_identity: server,
        authority: authority.parse().unwrap(),
        headers: HeaderMap::new(),
    }
}

async fn next(stream: &mut TunnelStream, decoder: &mut Decoder) -> Bytes {
    let mut buf = [0u8; 1024];
    loop {
        if let Some(d) = decoder.next_datagram().unwrap() {
            return d;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended before a datagram");
        decoder.push(&buf[..n]);
    }
}

#[tokio::test]
async fn datagrams_travel_both_ways_in_a_pooled_connection() {
    let pki = TestPki::new(TD);
    let handler = Echo {
        udp: true,
        ..Echo::default()
    };
    let peer = start(&pki, &id("server"), handler.clone()).await;
    let pool = Pool::new(PoolConfig::default());

    let mut udp = pool
        .connect_udp(target(&pki, peer, "10.1.2.3:5353"))
        .await
        .unwrap();
    // A TCP tunnel beside it shares the connection.
    let _tcp = pool
        .connect(target(&pki, peer, "10.1.2.3:80"))
        .await
        .unwrap();
    assert_eq!(pool.connection_count(), 1);

    let mut decoder = Decoder::new();
    for i in 0..50u32 {
        let payload = format!("datagram {i}");
        udp.write_all(&capsule::datagram(payload.as_bytes()))
            .await
            .unwrap();
        let reply = next(&mut udp, &mut decoder).await;
        assert_eq!(reply, format!("re:datagram {i}").as_bytes());
    }
    // An unknown capsule type in between is skipped by the server (RFC 9297).
    udp.write_all(&[0x17, 0x03, 1, 2, 3]).await.unwrap();
    udp.write_all(&capsule::datagram(b"still there"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut udp, &mut decoder).await,
        Bytes::from("re:still there")
    );

    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("10.1.2.3:5353".parse().unwrap(), TunnelProtocol::Udp),
            ("10.1.2.3:80".parse().unwrap(), TunnelProtocol::Tcp),
        ]
    );
}

#[tokio::test]
async fn refusals_and_tcp_only_peers() {
    let pki = TestPki::new(TD);
    let peer = start(
        &pki,
        &id("server"),
        Echo {
            udp: true,
            ..Echo::default()
        },
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    let err = pool
        .connect_udp(target(&pki, peer, "[fd00::7]:403"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Forbidden { .. }), "{err}");

    let tcp_only = Echo::default();
    let peer = start(&pki, &id("server"), tcp_only.clone()).await;
    let err = pool
        .connect_udp(target(&pki, peer, "10.1.2.3:53"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::UdpUnsupported { .. }), "{err}");
    // Nothing reached the handler, and TCP still works on that peer.
    assert!(tcp_only.seen.lock().unwrap().is_empty());
    pool.connect(target(&pki, peer, "10.1.2.3:53"))
        .await
        .unwrap();
}
