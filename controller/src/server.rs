//! The controller's gRPC server: discovery today, the CA next, on one port (15012).
//!
//! [`GrpcServer`] is the seam: other services are added through [`GrpcServer::routes_mut`],
//! and TLS is an optional rustls `ServerConfig` (production always sets one; tests may
//! serve plaintext on loopback). TLS is terminated here rather than with tonic's TLS
//! feature so the same rustls configuration (and crypto provider) as the rest of Ambit is
//! used, and so each request can see the peer's certificates ([`TlsConnectInfo`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::service::RoutesBuilder;
use tonic::transport::server::Connected;

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
                                    let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
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

/// A TLS connection accepted by [`GrpcServer`].
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
}

/// What a request on a TLS connection knows about its peer (a request extension).
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, leaf first, when it presented one.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        let certs = self
            .inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
        TlsConnectInfo {
            remote_addr: self.peer,
            peer_certificates: certs,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
