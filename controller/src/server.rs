//! The controller's gRPC server: discovery today, the CA next, on one port (15012).
//!
//! [`GrpcServer`] is the seam: other services are added through [`GrpcServer::routes_mut`],
//! and TLS is an optional rustls `ServerConfig` (production always sets one; tests may
//! serve plaintext on loopback). TLS is terminated here rather than with tonic's TLS
//! feature so the same rustls configuration (and crypto provider) as the rest of Ambit is
//! used, and so each request can see the peer's certificates
//! ([`TlsConnectInfo`](crate::conn::TlsConnectInfo)).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;

use crate::conn::TlsConn;
use crate::discovery::DiscoveryService;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// Builder and runner of the controller's gRPC server.
pub struct GrpcServer {
    routes: RoutesBuilder,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl GrpcServer {
    /// A server offering discovery.
    pub fn new(discovery: DiscoveryService) -> Self {
        let mut routes = RoutesBuilder::default();
        routes.add_service(discovery.into_server());
        GrpcServer { routes, tls: None }
    }

    /// Where more services are added (the CA: `routes_mut().add_service(...)`).
    pub fn routes_mut(&mut self) -> &mut RoutesBuilder {
        &mut self.routes
    }

    /// Serve over TLS with this configuration. ALPN is set to `h2` if the config has none.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        let config = if config.alpn_protocols.is_empty() {
            let mut c = (*config).clone();
            c.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(c)
        } else {
            config
        };
        self.tls = Some(config);
        self
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(self.routes.routes());
        match self.tls {
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            Some(config) => {
                let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(64);
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                // Handshakes run in their own tasks so one slow client cannot hold up
                // accepting the others.
                let accept_loop = tokio::spawn(async move {
                    loop {
                        let (tcp, peer) = match listener.accept().await {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        let acceptor = acceptor.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send(Ok(TlsConn::new(tls, peer))).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                });
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
                let r = server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                accept_loop.abort();
                r
            }
        }
        .map_err(ServerError::Transport)
    }
}
