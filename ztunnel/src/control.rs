//! The connection to the controller (discovery and CA, gRPC on 15012): a tonic channel over
//! rustls, verifying the controller's certificate against the mesh root given with
//! `--ca-root-file`, with the same crypto provider as the rest of Ambit (tonic's own TLS
//! feature would bring a second configuration path). `http://` URLs connect in plaintext
//! (tests, a controller on loopback).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

/// Why a controller channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The URL is not a valid endpoint.
    #[error("{url:?} is not a valid controller URL")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The root file could not be read.
    #[error("cannot read the mesh root from {path}")]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The root file holds no usable certificate.
    #[error("{path} holds no usable PEM certificate")]
    BadRoot { path: PathBuf },
    /// An https URL without a root to verify it by.
    #[error("{url} uses https but no --ca-root-file was given")]
    NoRoot { url: String },
    /// The URL's host is not a valid TLS server name.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName { host: String },
}

/// The rustls client config that trusts only the roots in `path`.
pub fn tls_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, ControlError> {
    let pem = std::fs::read_to_string(path).map_err(|source| ControlError::ReadRoot {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = || ControlError::BadRoot {
        path: path.to_path_buf(),
    };
    let certs = ambit_hbone::cert::parse_pem_certs(&pem).map_err(|_| bad())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|_| bad())?;
    }
    if roots.is_empty() {
        return Err(bad());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| bad())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A lazily connecting channel to `url` (TLS with `root` for https).
pub fn channel(url: &str, root: Option<&Path>) -> Result<Channel, ControlError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| ControlError::Url {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if !url.starts_with("https://") {
        return Ok(endpoint.connect_lazy());
    }
    let root = root.ok_or_else(|| ControlError::NoRoot {
        url: url.to_string(),
    })?;
    let connector = TlsConnector {
        config: tls_config(root)?,
    };
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Dials TCP and performs the TLS handshake for each new controller connection.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(15012);
            let name =
                ServerName::try_from(host.to_string()).map_err(|_| ControlError::ServerName {
                    host: host.to_string(),
                })?;
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
