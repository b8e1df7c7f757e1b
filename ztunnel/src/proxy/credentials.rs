//! One pod's TLS side: its identity's current certificate and the rustls configs built on it.
//!
//! Building a rustls config parses roots into a store and allocates verifiers: too much per
//! connection. So configs are cached *per certificate*: client configs by expected peer
//! identity, and one server config over a [`RotatingCert`] slot. When the certificate manager
//! rotates the certificate (a different `Arc`), the next connection notices, swaps the slot
//! (new handshakes present the new leaf, established connections keep theirs) and drops the
//! cached client configs. Nothing restarts.

#![allow(clippy::result_large_err)] // see ProxyError: built once per failed connection

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_hbone::cert::WorkloadCertificate;
use ambit_hbone::server::ServerConfigSource;
use ambit_hbone::tls::{self, RotatingCert, TrustBundle};
use ambit_hbone::Identity;

use super::ProxyError;
use crate::certs::CertManager;

/// Configs built for one certificate.
struct Cached {
    cert: Arc<WorkloadCertificate>,
    bundle: TrustBundle,
    clients: HashMap<Identity, Arc<rustls::ClientConfig>>,
    server: Arc<rustls::ServerConfig>,
}

/// The credentials of one identity, for one pod's proxies. Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    certs: CertManager,
    identity: Identity,
    trust_domain: Arc<str>,
    wait: Duration,
    /// Shared by every server config of this pod: rotation swaps what it holds.
    slot: Mutex<Option<RotatingCert>>,
    cached: Mutex<Option<Cached>>,
}

impl Credentials {
    pub fn new(
        certs: CertManager,
        identity: Identity,
        trust_domain: Arc<str>,
        wait: Duration,
    ) -> Self {
        Credentials {
            inner: Arc::new(Inner {
                certs,
                identity,
                trust_domain,
                wait,
                slot: Mutex::new(None),
                cached: Mutex::new(None),
            }),
        }
    }

    /// The identity these credentials prove.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The current certificate, waiting (bounded) for the first one.
    pub async fn certificate(&self) -> Result<Arc<WorkloadCertificate>, ProxyError> {
        let inner = &self.inner;
        if let Some(cert) = inner.certs.current(&inner.identity) {
            return Ok(cert);
        }
        let no_cert = |source| ProxyError::NoCertificate {
            identity: inner.identity.clone(),
            waited: inner.wait,
            source,
        };
        match tokio::time::timeout(inner.wait, inner.certs.wait_ready(&inner.identity)).await {
            Ok(Ok(cert)) => Ok(cert),
            Ok(Err(e)) => Err(no_cert(Some(Box::new(e)))),
            Err(_) => Err(no_cert(None)),
        }
    }

    /// Runs `f` on the configs of `cert`, rebuilding them first if `cert` is new.
    fn with_cached<T>(
        &self,
        cert: &Arc<WorkloadCertificate>,
        f: impl FnOnce(&mut Cached) -> Result<T, ProxyError>,
    ) -> Result<T, ProxyError> {
        let inner = &self.inner;
        let tls_error = |source| ProxyError::Tls {
            identity: inner.identity.clone(),
            source,
        };
        let mut cached = inner.cached.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = cached.as_ref().is_some_and(|c| Arc::ptr_eq(&c.cert, cert));
        if !fresh {
            let bundle =
                TrustBundle::new(&inner.trust_domain, cert.roots().to_vec()).map_err(tls_error)?;
            let mut slot = inner.slot.lock().unwrap_or_else(PoisonError::into_inner);
            let rotating = match &*slot {
                Some(r) => {
                    r.set(cert);
                    r.clone()
                }
                None => slot.insert(RotatingCert::new(cert)).clone(),
            };
            // Roots rarely change, but a new bundle must reach the verifier too.
            let server = match cached.as_ref() {
                Some(c) if c.cert.roots() == cert.roots() => c.server.clone(),
                _ => tls::server_config_rotating(&rotating, &bundle).map_err(tls_error)?,
            };
            if cached.is_some() {
                tracing::info!(identity = %inner.identity, "certificate rotated; new handshakes use it");
            }
            *cached = Some(Cached {
                cert: cert.clone(),
                bundle,
                clients: HashMap::new(),
                server,
            });
        }
        match cached.as_mut() {
            Some(c) => f(c),
            None => unreachable!("filled above"),
        }
    }

    /// A client config presenting this pod's certificate and accepting only `expected`.
    pub async fn client_config(
        &self,
        expected: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
        let cert = self.certificate().await?;
        let identity = self.inner.identity.clone();
        self.with_cached(&cert, |c| {
            if let Some(config) = c.clients.get(expected) {
                return Ok(config.clone());
            }
            let config = tls::client_config(&c.cert, &c.bundle, expected)
                .map_err(|source| ProxyError::Tls { identity, source })?;
            c.clients.insert(expected.clone(), config.clone());
            Ok(config)
        })
    }

    /// The server config for the pod's HBONE listener.
    pub async fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
        let cert = self.certificate().await?;
        self.with_cached(&cert, |c| Ok(c.server.clone()))
    }
}

impl ServerConfigSource for Credentials {
    async fn server_config(
        &self,
        _local: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
        Credentials::server_config(self).await.map_err(Into::into)
    }
}
