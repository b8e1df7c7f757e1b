//! The client side of the control plane connection: a tonic [`Channel`] to the controller
//! (discovery and CA, gRPC on 15012) over TLS 1.3 that trusts only the mesh root and
//! accepts only the controller's own SPIFFE identity.
//!
//! Why not tonic's TLS feature: it would verify a DNS name, but the controller's
//! certificate (issued by the mesh CA like every other) carries only its SPIFFE URI SAN;
//! and it would bring a second rustls configuration path. So the connector here dials TCP
//! and runs tokio-rustls with the same SPIFFE server verifier HBONE uses
//! ([`crate::tls`]). The client presents no certificate: the first thing a proxy asks the
//! controller for is its certificate, so it authenticates with a bearer token instead.
//!
//! The channel connects lazily and reconnects on its own; HTTP/2 keep-alive pings make a
//! controller that went silent (a dead node, a dropped route) show up as a failed stream
//! within seconds rather than after TCP's retransmission timeout of many minutes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::cert::{self, CertError};
use crate::identity::Identity;
use crate::tls::{self, TlsError, TrustBundle};

/// The controller's gRPC port, used when the address names none.
pub const DEFAULT_PORT: u16 = 15012;
/// How long dialing and the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an HTTP/2 ping checks that the controller is still there.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is declared dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a controller channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The mesh root PEM could not be read.
    #[error("mesh root is unreadable")]
    Roots(#[source] CertError),
    /// The roots do not form a usable trust bundle (empty, not a CA...).
    #[error("mesh root is not a usable trust bundle")]
    Bundle(#[source] TlsError),
    /// rustls refused the configuration.
    #[error("could not build the TLS configuration")]
    Config(#[source] rustls::Error),
    /// The address is not a valid endpoint.
    #[error("{addr:?} is not a valid controller address")]
    Address {
        /// The address as given.
        addr: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },
    /// A plaintext URL was given to a function that only speaks TLS.
    #[error("{addr:?}: the controller connection is always TLS; use https:// or host:port")]
    Plaintext {
        /// The address as given.
        addr: String,
    },
}

/// Client TLS for the controller: TLS 1.3, ALPN `h2`, no client certificate, and a server
/// that chains to `roots_pem` and proves exactly `expected`.
pub fn client_config(
    roots_pem: &str,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, ControlError> {
    let roots = cert::parse_pem_certs(roots_pem).map_err(ControlError::Roots)?;
    let bundle = TrustBundle::new(expected.trust_domain(), roots).map_err(ControlError::Bundle)?;
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ControlError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(tls::server_verifier(&bundle, expected))
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    // As for HBONE: a resumed session would skip the identity check.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A lazily connecting channel to the controller at `addr` (`https://host:port`, or
/// `host:port`, or `host`), verified against `roots_pem` and `expected`.
pub fn channel(addr: &str, roots_pem: &str, expected: &Identity) -> Result<Channel, ControlError> {
    let config = client_config(roots_pem, expected)?;
    channel_with_config(addr, config)
}

/// [`channel`] with a prepared client configuration.
pub fn channel_with_config(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, ControlError> {
    let url = if addr.contains("://") {
        if !addr.starts_with("https://") {
            return Err(ControlError::Plaintext {
                addr: addr.to_string(),
            });
        }
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|source| ControlError::Address {
            addr: addr.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // Discovery streams are long-lived and may be quiet for hours; ping them too.
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(Connector { config }))
}

/// Dials TCP and runs the TLS handshake for each new controller connection.
#[derive(Clone)]
struct Connector {
    config: Arc<ClientConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<Uri> for Connector {
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
            let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            // The TLS server name is a placeholder: the verifier checks the SPIFFE
            // identity, not a host name (see `tls::server_name`).
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(tls::server_name(), tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    #[test]
    fn plaintext_urls_are_refused() {
        let pki = TestPki::new("cluster.local");
        let id = Identity::new("cluster.local", "ambit-system", "ambit-controller").unwrap();
        let roots = cert::chain_to_pem(pki.bundle().roots());
        let err = channel("http://127.0.0.1:15012", &roots, &id).unwrap_err();
        assert!(matches!(err, ControlError::Plaintext { .. }), "{err}");
        assert!(matches!(
            channel("127.0.0.1:15012", "not pem", &id),
            Err(ControlError::Bundle(_) | ControlError::Roots(_))
        ));
    }
}
