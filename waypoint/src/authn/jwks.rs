//! Key sets fetched from `jwksUri`: a cheap [`Jwks`] handle that requests read, and one
//! task ([`run`]) that fetches every URL the installed state names, keeps each URL's last
//! good set, and refreshes it on an interval.
//!
//! A new URL (a state change) is fetched at once; a good set is refreshed every
//! [`FetchConfig::refresh`]; a failed fetch keeps the last good set in force, is logged
//! with the URL and the reason (once per new reason), and is retried after
//! [`FetchConfig::retry`]. Until a URL has been fetched once, tokens of its issuer are
//! refused with that reason, never accepted. Sets of URLs the state no longer names are
//! dropped. Plain http is for tests and in-cluster issuers; https verifies the server
//! against the web's roots and the mesh's own.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::state::StateHandle;

/// Largest key set accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The key sets a decision may use, by URL.
pub trait JwksSource {
    /// The last good set fetched from `uri`, or why there is none.
    fn jwks(&self, uri: &str) -> Result<Arc<JwkSet>, String>;
}

/// Why a key set could not be fetched. Every message names the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL does not parse or is not http/https.
    #[error("{uri}: {why}")]
    Url { uri: String, why: &'static str },
    /// No connection could be made.
    #[error("{uri}: connecting to {authority}")]
    Connect {
        uri: String,
        authority: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("{uri}: TLS with {host}")]
    Tls {
        uri: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{uri}: HTTP")]
    Http {
        uri: String,
        #[source]
        source: hyper::Error,
    },
    /// The server answered, but not 200.
    #[error("{uri}: answered {status}")]
    Status { uri: String, status: u16 },
    /// The body could not be read, or is larger than [`MAX_JWKS_BYTES`].
    #[error("{uri}: reading the body: {why}")]
    Body { uri: String, why: String },
    /// The body is not a JSON Web Key Set.
    #[error("{uri}: not a JSON Web Key Set")]
    Json {
        uri: String,
        #[source]
        source: serde_json::Error,
    },
    /// Nothing within the timeout.
    #[error("{uri}: no answer within {after:?}")]
    Timeout { uri: String, after: Duration },
}

/// What is known of one URL (the admin config dump shows it).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The last good set.
    pub keys: Option<Arc<JwkSet>>,
    /// When it was fetched.
    pub fetched_at: Option<SystemTime>,
    /// The last fetch's failure, when it failed.
    pub error: Option<String>,
}

/// The fetched key sets. Cheap to clone; one writer ([`run`]).
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    inner: Arc<ArcSwap<HashMap<String, Entry>>>,
}

impl Jwks {
    /// Everything known, by URL.
    pub fn entries(&self) -> Arc<HashMap<String, Entry>> {
        self.inner.load_full()
    }
}

impl JwksSource for Jwks {
    fn jwks(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        match self.inner.load().get(uri) {
            Some(Entry {
                keys: Some(keys), ..
            }) => Ok(keys.clone()),
            Some(Entry { error: Some(e), .. }) => Err(format!("fetching the key set failed: {e}")),
            _ => Err(format!("the key set from {uri} has not been fetched yet")),
        }
    }
}

/// How key sets are fetched.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// A good set is fetched again after this long.
    pub refresh: Duration,
    /// A failed fetch is tried again after this long.
    pub retry: Duration,
    /// One fetch, connection included.
    pub timeout: Duration,
    /// For https: the web's roots and the mesh's.
    pub tls: Arc<rustls::ClientConfig>,
}

impl FetchConfig {
    /// Refresh every 20 minutes (as Istio does), retry after 5 s, 5 s per fetch; https
    /// trusts the web's roots and `extra_roots` (PEM, e.g. the mesh's).
    pub fn new(extra_roots: &str) -> Result<Self, rustls::Error> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        use rustls_pki_types::pem::PemObject as _;
        for cert in
            rustls_pki_types::CertificateDer::pem_slice_iter(extra_roots.as_bytes()).flatten()
        {
            // A mesh root that is no CA certificate serves nothing here; skip it.
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(FetchConfig {
            refresh: Duration::from_secs(20 * 60),
            retry: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            tls: Arc::new(tls),
        })
    }
}

/// Fetches the key sets `state` names into `jwks`, forever.
pub async fn run(state: StateHandle, jwks: Jwks, config: FetchConfig) {
    let mut changes = state.changes();
    // When each URL is due again.
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let wanted: BTreeSet<String> = state.load().jwks_uris();
        let now = Instant::now();
        due.retain(|u, _| wanted.contains(u));
        let fetch: Vec<&String> = wanted
            .iter()
            .filter(|u| due.get(*u).is_none_or(|t| *t <= now))
            .collect();
        let results =
            futures::future::join_all(fetch.iter().map(|u| fetch_timed(u, &config))).await;
        let mut map: HashMap<String, Entry> = (*jwks.entries()).clone();
        map.retain(|u, _| wanted.contains(u));
        for (uri, result) in fetch.into_iter().zip(results) {
            let entry = map.entry(uri.clone()).or_default();
            match result {
                Ok(set) => {
                    if entry.error.is_some() || entry.keys.is_none() {
                        tracing::info!(%uri, keys = set.keys.len(), "key set fetched");
                    }
                    entry.keys = Some(Arc::new(set));
                    entry.fetched_at = Some(SystemTime::now());
                    entry.error = None;
                    due.insert(uri.clone(), Instant::now() + config.refresh);
                }
                Err(e) => {
                    let reason = ambit_runtime::logging::error_chain(&e);
                    if entry.error.as_deref() != Some(reason.as_str()) {
                        tracing::warn!(
                            %uri,
                            error = %reason,
                            keeping_last_good = entry.keys.is_some(),
                            "fetching a key set failed"
                        );
                    }
                    entry.error = Some(reason);
                    due.insert(uri.clone(), Instant::now() + config.retry);
                }
            }
        }
        jwks.inner.store(Arc::new(map));
        let next = due.values().min().copied();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return; // the state's writer is gone
                }
            }
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

async fn fetch_timed(uri: &str, config: &FetchConfig) -> Result<JwkSet, FetchError> {
    tokio::time::timeout(config.timeout, fetch(uri, &config.tls))
        .await
        .unwrap_or(Err(FetchError::Timeout {
            uri: uri.to_string(),
            after: config.timeout,
        }))
}

/// One GET of `uri`, parsed as a key set.
pub async fn fetch(uri: &str, tls: &Arc<rustls::ClientConfig>) -> Result<JwkSet, FetchError> {
    let bad = |why| FetchError::Url {
        uri: uri.to_string(),
        why,
    };
    let u: http::Uri = uri.parse().map_err(|_| bad("not a URL"))?;
    let https = match u.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let authority = u.authority().ok_or(bad("no host"))?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|source| FetchError::Connect {
            uri: uri.to_string(),
            authority: authority.to_string(),
            source,
        })?;
    let path = u.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| bad("not a request target"))?;
    let resp = if https {
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| bad("the host is not a DNS name or an address"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| FetchError::Tls {
                uri: uri.to_string(),
                host: host.to_string(),
                source,
            })?;
        get(stream, req).await
    } else {
        get(tcp, req).await
    }
    .map_err(|source| FetchError::Http {
        uri: uri.to_string(),
        source,
    })?;
    if resp.status() != http::StatusCode::OK {
        return Err(FetchError::Status {
            uri: uri.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| FetchError::Body {
            uri: uri.to_string(),
            why: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|source| FetchError::Json {
        uri: uri.to_string(),
        source,
    })
}

/// One HTTP/1.1 exchange on its own connection (fetches are rare; no pool is worth it).
async fn get<IO>(
    io: IO,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "key set connection ended");
        }
    });
    sender.send_request(req).await
}
