//! The discovery client against a real tonic Discovery server (plaintext on loopback): the
//! Hello says WAYPOINT with identity and gateway, good pushes are ACKed and installed, a bad
//! one is NACKed with a reason while the last good state keeps serving, and after the
//! controller drops the stream the client reconnects and takes the new full state.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::discovery as pb;
use ambit_waypoint::discovery::{self, DiscoveryConfig};
use ambit_waypoint::state::StateHandle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

/// The proxy's next message, summarised.
async fn next(inbound: &mut tonic::Streaming<pb::SubscribeRequest>) -> Option<(String, String)> {
    let m = inbound.next().await?.ok()?.message?;
    Some(match m {
        pb::subscribe_request::Message::Hello(h) => (
            "hello".to_string(),
            format!("{:?} {} {}", h.kind(), h.identity, h.gateway),
        ),
        pb::subscribe_request::Message::Ack(a) => ("ack".into(), a.nonce),
        pb::subscribe_request::Message::Nack(n) => {
            ("nack".into(), format!("{} {}", n.nonce, n.reason))
        }
    })
}

fn workload(uid: &str, addr: [u8; 4]) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Workload(pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "demo".into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
            addresses: vec![addr.to_vec()],
            ..Default::default()
        })),
    }
}

/// Replies seen by the controller, in order: ("hello"|"ack"|"nack", detail).
type Log = Arc<Mutex<Vec<(String, String)>>>;

struct Controller {
    log: Log,
    streams: Arc<Mutex<u32>>,
}

#[tonic::async_trait]
impl pb::discovery_server::Discovery for Controller {
    type SubscribeStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Push, tonic::Status>> + Send>>;

    async fn subscribe(
        &self,
        request: tonic::Request<tonic::Streaming<pb::SubscribeRequest>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let n = {
            let mut s = self.streams.lock().unwrap();
            *s += 1;
            *s
        };
        let mut inbound = request.into_inner();
        let log = self.log.clone();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let record = |e: Option<(String, String)>| {
                if let Some(e) = e {
                    log.lock().unwrap().push(e);
                }
            };
            record(next(&mut inbound).await);
            if n == 1 {
                let good = pb::Push {
                    nonce: "1".into(),
                    full_state: true,
                    version: 1,
                    upserts: vec![workload("a", [10, 0, 0, 1])],
                    ..Default::default()
                };
                let _ = tx.send(Ok(good)).await;
                record(next(&mut inbound).await);
                let bad = pb::Push {
                    nonce: "2".into(),
                    version: 2,
                    upserts: vec![pb::Resource {
                        kind: Some(pb::resource::Kind::Workload(pb::Workload {
                            uid: "b".into(),
                            addresses: vec![vec![1, 2, 3]],
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                };
                let _ = tx.send(Ok(bad)).await;
                record(next(&mut inbound).await);
                // Dropping tx ends the stream: the controller "restarts".
            } else {
                let full = pb::Push {
                    nonce: "3".into(),
                    full_state: true,
                    version: 3,
                    upserts: vec![workload("c", [10, 0, 0, 3])],
                    ..Default::default()
                };
                let _ = tx.send(Ok(full)).await;
                record(next(&mut inbound).await);
                std::future::pending::<()>().await;
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::test]
async fn acks_nacks_keeps_last_good_state_and_reconnects() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::discovery_server::DiscoveryServer::new(Controller {
                log: log.clone(),
                streams: Arc::default(),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let state = StateHandle::default();
    let ready = Arc::new(AtomicBool::new(false));
    let config = DiscoveryConfig {
        identity: "spiffe://cluster.local/ns/demo/sa/waypoint"
            .parse()
            .unwrap(),
        gateway: "demo/waypoint".into(),
        credential_file: None,
        metrics_port: None,
    };
    // The binary's own channel, in its plaintext form for a controller on loopback.
    let channel = ambit_runtime::control::channel(
        &format!("http://{addr}"),
        None,
        &ambit_runtime::control::default_controller_identity("cluster.local"),
    )
    .unwrap();
    let (status_tx, status) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(discovery::run(
        channel,
        config,
        state.clone(),
        ready.clone(),
        status_tx,
    ));

    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut saw_bad = false;
    for _ in 0..500 {
        let entries = log.lock().unwrap().clone();
        if !saw_bad && entries.iter().any(|(k, _)| k == "nack") {
            saw_bad = true;
            // The bad push did not replace the good state.
            let s = state.load();
            assert!(s.workload_by_ip(ip("10.0.0.1")).is_some());
        }
        if entries.iter().any(|(k, d)| k == "ack" && d == "3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let entries = log.lock().unwrap().clone();
    let kinds: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["hello", "ack", "nack", "hello", "ack"],
        "{entries:?}"
    );
    assert_eq!(
        entries[0].1,
        "Waypoint spiffe://cluster.local/ns/demo/sa/waypoint demo/waypoint"
    );
    assert!(
        entries[2].1.starts_with("2 workload b: address of 3 bytes"),
        "{entries:?}"
    );
    assert!(ready.load(Ordering::Acquire));
    // The shared client's status counts what the controller saw.
    let st = status.borrow().clone();
    assert_eq!((st.acks, st.nacks, st.streams), (2, 1, 2), "{st:?}");
    assert!(
        st.last_nack.as_deref().unwrap_or("").contains("workload b"),
        "{st:?}"
    );
    let s = state.load();
    assert!(s.workload_by_ip(ip("10.0.0.3")).is_some());
    assert!(
        s.workload_by_ip(ip("10.0.0.1")).is_none(),
        "a full state replaces everything"
    );
}
