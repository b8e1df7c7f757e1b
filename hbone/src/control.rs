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
//!
//! High availability: the address may be a comma-separated list of controller replicas
//! (`https://10.77.0.1:15012,https://10.77.0.1:15112`). Every replica serves discovery and
//! the CA, so each new connection dials the replica that answered last and, when it does not
//! answer, the next ones in turn ([`Dialer`]): a proxy whose replica went away is connected
//! to another one by its next reconnect, without waiting for the dead one's timeout more than
//! [`FAILOVER_DIAL_TIMEOUT`]. On Kubernetes one address (the Service) is enough: its next
//! connection lands on a live replica.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// How long one replica of a list may take to accept TCP before the next is tried: a
/// replica on a dead host never answers, and the proxies must move on within seconds.
pub const FAILOVER_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
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
    /// An address without a host to dial.
    #[error("{addr:?} names no host to dial")]
    NoHost {
        /// The address as given.
        addr: String,
    },
    /// An empty list of addresses.
    #[error("no controller address given")]
    NoAddress,
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

/// [`channel`] with a prepared client configuration; `addr` may list several replicas,
/// separated by commas.
pub fn channel_with_config(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, ControlError> {
    let mut urls = Vec::new();
    for one in split_addresses(addr) {
        let url = if one.contains("://") {
            if !one.starts_with("https://") {
                return Err(ControlError::Plaintext {
                    addr: one.to_string(),
                });
            }
            one.to_string()
        } else {
            format!("https://{one}")
        };
        urls.push(url);
    }
    let dialer = Dialer::new(&urls)?;
    Ok(endpoint(&urls[0], addr)?.connect_with_connector_lazy(Connector { config, dialer }))
}

/// A lazily connecting plaintext channel to `addr` (`http://host:port`, possibly several
/// separated by commas), failing over as [`channel`] does: for a controller on loopback
/// in tests.
pub fn plaintext_channel(addr: &str) -> Result<Channel, ControlError> {
    let urls: Vec<String> = split_addresses(addr).map(str::to_string).collect();
    let dialer = Dialer::new(&urls)?;
    let first = urls.first().ok_or(ControlError::NoAddress)?;
    Ok(endpoint(first, addr)?.connect_with_connector_lazy(PlainConnector { dialer }))
}

/// The addresses of a comma-separated list, trimmed, empty entries skipped.
pub fn split_addresses(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty())
}

/// The endpoint settings every controller channel shares. Its URI only names the HTTP/2
/// `:authority`; which replica is dialed is the [`Dialer`]'s choice.
fn endpoint(url: &str, addr: &str) -> Result<Endpoint, ControlError> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|source| ControlError::Address {
            addr: addr.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // Discovery streams are long-lived and may be quiet for hours; ping them too.
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

/// Dials one of the controller replicas: the one that answered last first, then the others
/// in list order. Cheap to clone (clones share the last good choice).
#[derive(Clone, Debug)]
pub struct Dialer {
    targets: Arc<[(String, u16)]>,
    /// Index of the replica that accepted the last connection.
    last_good: Arc<AtomicUsize>,
}

impl Dialer {
    /// A dialer over `urls` (`scheme://host:port`, the port defaulting to
    /// [`DEFAULT_PORT`]).
    pub fn new(urls: &[String]) -> Result<Self, ControlError> {
        let mut targets = Vec::new();
        for url in urls {
            let uri: Uri = url
                .parse()
                .map_err(|_| ControlError::NoHost { addr: url.clone() })?;
            let host = uri
                .host()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| ControlError::NoHost { addr: url.clone() })?
                .trim_matches(['[', ']']);
            targets.push((host.to_string(), uri.port_u16().unwrap_or(DEFAULT_PORT)));
        }
        if targets.is_empty() {
            return Err(ControlError::NoAddress);
        }
        Ok(Dialer {
            targets: targets.into(),
            last_good: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A TCP connection to the first replica that accepts one; the error of the last one
    /// tried when none does.
    pub async fn dial(&self) -> std::io::Result<TcpStream> {
        let n = self.targets.len();
        let start = self.last_good.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let index = (start + i) % n;
            let (host, port) = &self.targets[index];
            // A single replica gets the whole connect timeout; in a list, a silent one
            // must not hold the others back.
            let limit = if n == 1 {
                CONNECT_TIMEOUT
            } else {
                FAILOVER_DIAL_TIMEOUT
            };
            match tokio::time::timeout(limit, TcpStream::connect((host.as_str(), *port))).await {
                Ok(Ok(tcp)) => {
                    self.last_good.store(index, Ordering::Relaxed);
                    return Ok(tcp);
                }
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => {
                    last_err = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("controller {host}:{port} did not answer within {limit:?}"),
                    ))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("no controller address")))
    }
}

/// Dials a replica and runs the TLS handshake for each new controller connection.
#[derive(Clone)]
struct Connector {
    config: Arc<ClientConfig>,
    dialer: Dialer,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let config = self.config.clone();
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let tcp = dialer.dial().await?;
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

/// Dials a replica in plaintext (tests with a controller on loopback).
#[derive(Clone)]
struct PlainConnector {
    dialer: Dialer,
}

impl tonic::codegen::Service<Uri> for PlainConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let tcp = dialer.dial().await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
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

    #[tokio::test]
    async fn the_dialer_moves_to_the_next_replica_and_stays_there() {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        // Closed: connecting to it is refused at once, as to a killed replica.
        drop(dead);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let dialer = Dialer::new(&[
            format!("https://{dead_addr}"),
            format!("https://{live_addr}"),
        ])
        .unwrap();
        for _ in 0..2 {
            let tcp = dialer.dial().await.unwrap();
            assert_eq!(tcp.peer_addr().unwrap(), live_addr);
            live.accept().await.unwrap();
        }
        assert_eq!(
            dialer.last_good.load(Ordering::Relaxed),
            1,
            "remembers the live one"
        );
        drop(live);
        let err = dialer.dial().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn address_lists_are_split_and_checked_one_by_one() {
        let pki = TestPki::new("cluster.local");
        let id = Identity::new("cluster.local", "ambit-system", "ambit-controller").unwrap();
        let roots = cert::chain_to_pem(pki.bundle().roots());
        assert_eq!(
            split_addresses(" https://a:1, ,https://b:2 ").collect::<Vec<_>>(),
            ["https://a:1", "https://b:2"]
        );
        assert!(matches!(
            channel("https://127.0.0.1:1,http://127.0.0.1:2", &roots, &id),
            Err(ControlError::Plaintext { .. })
        ));
        assert!(matches!(
            channel(" , ", &roots, &id),
            Err(ControlError::NoAddress)
        ));
    }
}
