//! The gRPC server over TLS: a real rustls handshake on loopback (ALPN h2 set by the
//! server builder), then a discovery subscription through it; a plaintext client is
//! refused. Production serves only this way once the CA provides the certificate.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService};
use ambit_controller::model::{ModelBuilder, ModelConfig};
use ambit_controller::server::GrpcServer;
use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{subscribe_request, Hello, ProxyKind, SubscribeRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Endpoint, Uri};

/// Connects over TLS to the URI's host and port, checking the server as `localhost`.
#[derive(Clone)]
struct TlsConnector(Arc<rustls::ClientConfig>);

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move {
            let addr = format!(
                "{}:{}",
                uri.host().unwrap_or("127.0.0.1"),
                uri.port_u16().unwrap_or(443)
            );
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn hello() -> SubscribeRequest {
    SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(Hello {
            kind: ProxyKind::Ztunnel as i32,
            node: "n".into(),
            ..Hello::default()
        })),
    }
}

#[tokio::test]
async fn discovery_over_tls() -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert_der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;

    let model = ModelBuilder::new(ModelConfig::default()).spawn();
    let (_roots_tx, roots) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let discovery = DiscoveryService::new(model, roots, DiscoveryOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        GrpcServer::new(discovery)
            .with_tls(Arc::new(server_config))
            .serve(listener, async {
                let _ = stopped.await;
            }),
    );

    let mut roots_store = rustls::RootCertStore::empty();
    roots_store.add(cert_der)?;
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots_store)
        .with_no_client_auth();
    client_config.alpn_protocols = vec![b"h2".to_vec()];
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(TlsConnector(Arc::new(client_config)))
        .await?;
    let mut pushes = DiscoveryClient::new(channel)
        .subscribe(tokio_stream::iter(vec![hello()]))
        .await?
        .into_inner();
    let push = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await??
        .expect("a push");
    assert!(push.full_state);

    // A plaintext client cannot talk to it.
    let plain = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => DiscoveryClient::new(channel)
            .subscribe(tokio_stream::iter(vec![hello()]))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "plaintext subscription succeeded against the TLS server"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server).await???;
    Ok(())
}
