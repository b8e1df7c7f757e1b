//! Protocols other than plain request/response HTTP/1.1 through the waypoint: gRPC (a real
//! tonic server, the caller speaking gRPC framing over HTTP/2), an HTTP/1.1 Upgrade, and
//! opaque TCP under L4 policy.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use ambit_proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_waypoint::server::Limits;
use bytes::{BufMut as _, Bytes, BytesMut};
use common::*;
use http_body_util::{BodyExt as _, Full};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A gRPC service that echoes the caller identity header in its answer.
struct Echo;

#[tonic::async_trait]
impl CertificateService for Echo {
    async fn create_certificate(
        &self,
        request: tonic::Request<CreateCertificateRequest>,
    ) -> Result<tonic::Response<CreateCertificateResponse>, tonic::Status> {
        let who = request
            .metadata()
            .get("x-ambit-peer-identity")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if request.get_ref().csr == "fail" {
            return Err(tonic::Status::permission_denied("no"));
        }
        Ok(tonic::Response::new(CreateCertificateResponse {
            cert_chain: vec![who, request.into_inner().csr],
            trust_roots: vec![],
        }))
    }
}

fn grpc_state() -> String {
    state_yaml(
        r#"
  - name: grpc
    namespace: demo
    hostname: grpc.demo.svc.cluster.local
    vips: [10.96.0.12]
    ports: [{servicePort: 9090, targetPort: 9090}]
    endpoints: [{workloadUid: grpc-a}]
"#,
    )
    .replace(
        "services:\n",
        "  - {uid: grpc-a, name: grpc-a, namespace: demo, serviceAccount: grpc-a, addresses: [127.0.0.5]}\nservices:\n",
    )
}

async fn grpc_call(mesh: &Mesh, csr: &str) -> (u16, String, Option<CreateCertificateResponse>) {
    let mut h2 = mesh.h2("10.96.0.12:9090").await;
    let msg = CreateCertificateRequest {
        csr: csr.into(),
        validity_seconds: 0,
    }
    .encode_to_vec();
    let mut framed = BytesMut::new();
    framed.put_u8(0);
    framed.put_u32(msg.len() as u32);
    framed.put_slice(&msg);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://grpc.demo.svc.cluster.local/ambit.ca.v1.CertificateService/CreateCertificate")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(framed.freeze()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let header_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let collected = resp.into_body().collect().await.unwrap();
    let grpc_status = header_status
        .or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.to_str().unwrap().to_string())
        })
        .unwrap_or_default();
    let body = collected.to_bytes();
    let reply = (body.len() > 5).then(|| CreateCertificateResponse::decode(&body[5..]).unwrap());
    (status, grpc_status, reply)
}

#[tokio::test]
async fn grpc_passes_through_with_identity_and_status() {
    let mut pods = PODS.to_vec();
    pods.push(("grpc-a", "127.0.0.5"));
    let (mesh, prefix) = start_with_prefix(&pods, &grpc_state(), Limits::default()).await;
    let addr: SocketAddr = format!("{prefix}5:9090").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CertificateServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (status, grpc_status, reply) = grpc_call(&mesh, "hello").await;
    assert_eq!((status, grpc_status.as_str()), (200, "0"));
    let reply = reply.unwrap();
    assert_eq!(
        reply.cert_chain,
        vec!["spiffe://cluster.local/ns/client/sa/curl", "hello"]
    );

    let (status, grpc_status, _) = grpc_call(&mesh, "fail").await;
    assert_eq!((status, grpc_status.as_str()), (200, "7"));

    let text = mesh.metrics();
    for code in ["0", "7"] {
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains(&format!("grpc_response_status=\"{code}\""))),
            "grpc status {code} missing:\n{text}"
        );
    }
}

#[tokio::test]
async fn http1_upgrade_passes_through() {
    let mesh = start(&PODS, &state_yaml(""), Limits::default()).await;
    let mut t = mesh.tunnel(WEB).await;
    t.write_all(b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    t.write_all(b"ping over the upgraded stream").await.unwrap();
    let mut buf = [0u8; 29];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over the upgraded stream");
}

#[tokio::test]
async fn tcp_is_forwarded_under_l4_policy() {
    let extra = r#"
policies:
  - name: only-other
    namespace: demo
    action: ALLOW
    targetService: demo/canary.demo.svc.cluster.local
    rules: [{from: [{namespaces: [other]}]}]
"#;
    let (mesh, prefix) = start_with_prefix(&PODS, &state_yaml(extra), Limits::default()).await;
    // A raw TCP echo server on web-a's port 8081, reached through the pod address.
    let addr: SocketAddr = format!("{prefix}2:8081").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut t = mesh.tunnel(&addr.to_string()).await;
    t.write_all(b"\x00\x01binary protocol").await.unwrap();
    let mut buf = [0u8; 17];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"\x00\x01binary protocol");

    // Denied by L4 policy: the tunnel is closed without a byte.
    let mut t = mesh.tunnel("10.96.0.11:80").await;
    t.write_all(b"\x00\x01binary protocol").await.unwrap();
    let mut out = Vec::new();
    let _ = t.read_to_end(&mut out).await;
    assert!(out.is_empty(), "{:?}", Bytes::from(out));
}

#[tokio::test]
async fn server_first_protocol_on_a_tcp_port_is_not_sniffed() {
    let yaml = state_yaml(
        r#"
  - name: smtp
    namespace: demo
    hostname: smtp.demo.svc.cluster.local
    vips: [10.96.0.13]
    ports: [{servicePort: 25, targetPort: 2525, appProtocol: TCP}]
    endpoints: [{workloadUid: web-a}]
"#,
    );
    // Detection would wait this long for the client's first bytes; the greeting must not.
    let limits = Limits {
        detect_timeout: std::time::Duration::from_secs(3600),
        ..Limits::default()
    };
    let (mesh, prefix) = start_with_prefix(&PODS, &yaml, limits).await;
    let addr: SocketAddr = format!("{prefix}2:2525").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.write_all(b"220 smtp ready\r\n").await;
        }
    });
    let mut t = mesh.tunnel("10.96.0.13:25").await;
    let mut greeting = [0u8; 16];
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        t.read_exact(&mut greeting),
    )
    .await
    .expect("greeting held back by protocol detection")
    .unwrap();
    assert_eq!(&greeting, b"220 smtp ready\r\n");
}
