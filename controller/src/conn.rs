//! The connection the controller's gRPC server accepts, and what each request learns from it:
//! the peer's address and certificates. Kept apart from the server so the services (discovery,
//! the CA) can read a request's peer without depending on the server that runs them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

/// The caller's address: from the TLS connection's info when served over TLS, else from
/// tonic's plaintext connection info (tests on loopback).
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<TlsConnectInfo>()
        .map(|i| i.remote_addr)
        .or_else(|| request.remote_addr())
}

/// A TLS connection accepted by the gRPC server ([`GrpcServer`](crate::server::GrpcServer)).
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl TlsConn {
    /// A connection whose handshake with `peer` is done.
    pub fn new(inner: tokio_rustls::server::TlsStream<TcpStream>, peer: SocketAddr) -> Self {
        TlsConn { inner, peer }
    }
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
