//! The scraper: every [`DashboardOptions::interval`] it GETs `/metrics` from each proxy
//! subscribed to discovery that announced a metrics port, and keeps the last
//! [`DashboardOptions::window`] scrapes per proxy (rates need two). Proxies are scraped
//! concurrently, each bounded in time and size, so a slow or hostile one costs one timeout
//! and at most [`MAX_BODY`] bytes, never the others' freshness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use super::prom;
use super::view::{self, DenialLog, ProxyScrapes, Scrape, View};
use crate::discovery;

/// The largest metrics page read from a proxy.
pub const MAX_BODY: usize = 8 << 20;

/// Why one scrape failed (shown on the dashboard beside the proxy).
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed (handshake, request, or reading the body).
    #[error("HTTP from {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The proxy answered with another status than 200.
    #[error("{addr} answered {status}")]
    Status { addr: SocketAddr, status: u16 },
    /// No answer in time.
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Scraping settings.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// Time between two scrapes of every proxy.
    pub interval: Duration,
    /// Scrapes kept per proxy; rates are over the oldest to the newest.
    pub window: usize,
    /// Longest a scrape may take.
    pub timeout: Duration,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        // A 2 s interval and 6 scrapes: rates over the last ~10 s, fresh enough to watch a
        // policy take effect, and a few small GETs per proxy per interval.
        DashboardOptions {
            interval: Duration::from_secs(2),
            window: 6,
            timeout: Duration::from_millis(1500),
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One GET of `http://addr/metrics`.
async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, ScrapeError> {
    let http =
        |source: Box<dyn std::error::Error + Send + Sync>| ScrapeError::Http { addr, source };
    let get = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ScrapeError::Connect { addr, source })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
        tokio::spawn(conn);
        let req = http::Request::get("/metrics")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.into()))?;
        let resp = send.send_request(req).await.map_err(|e| http(e.into()))?;
        if resp.status() != http::StatusCode::OK {
            return Err(ScrapeError::Status {
                addr,
                status: resp.status().as_u16(),
            });
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| ScrapeError::Timeout { addr, timeout })?
}

/// What the scraper keeps, behind one lock.
#[derive(Debug, Default)]
struct Windows {
    /// By discovery stream id.
    proxies: BTreeMap<u64, ProxyScrapes>,
    denials: DenialLog,
}

/// The scraped windows and the task that fills them. Cheap to clone; the task stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Dashboard {
    windows: Arc<Mutex<Windows>>,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock(windows: &Mutex<Windows>) -> MutexGuard<'_, Windows> {
    // A panic elsewhere must not stop the dashboard; the data stays usable.
    windows.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dashboard {
    /// Starts scraping the proxies subscribed in `subscribers` (on the current runtime).
    pub fn spawn(subscribers: discovery::Registry, options: DashboardOptions) -> Self {
        let windows = Arc::new(Mutex::new(Windows::default()));
        let task = tokio::spawn(run(subscribers, options, windows.clone()));
        Dashboard {
            windows,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// The view of the mesh now.
    pub fn view(&self) -> View {
        let w = lock(&self.windows);
        let proxies: Vec<ProxyScrapes> = w.proxies.values().cloned().collect();
        view::view(&proxies, &w.denials, now())
    }
}

async fn run(
    subscribers: discovery::Registry,
    options: DashboardOptions,
    windows: Arc<Mutex<Windows>>,
) {
    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = subscribers.snapshot();
        let scrapes = futures::future::join_all(current.iter().map(|s| async move {
            let result = match s.metrics_addr {
                Some(addr) => Some(fetch(addr, options.timeout).await),
                None => None,
            };
            (s, result, now())
        }))
        .await;
        let mut w = lock(&windows);
        let Windows { proxies, denials } = &mut *w;
        proxies.retain(|id, _| current.iter().any(|s| s.id == *id));
        for (s, result, at) in scrapes {
            let entry = proxies.entry(s.id).or_insert_with(|| ProxyScrapes {
                proxy: s.proxy.clone(),
                metrics_addr: s.metrics_addr,
                scrapes: Default::default(),
                last_error: None,
            });
            match result {
                None => {}
                Some(Err(e)) => {
                    tracing::debug!(proxy = %s.proxy, error = %crate::model::error_chain(&e), "dashboard: scrape failed");
                    entry.last_error = Some(crate::model::error_chain(&e));
                }
                Some(Ok(text)) => {
                    let scrape = Scrape {
                        at,
                        samples: Arc::new(prom::parse(&text)),
                    };
                    if let Some(prev) = entry.scrapes.back() {
                        denials.update(&s.proxy, &prev.samples, &scrape.samples, at);
                    }
                    entry.last_error = None;
                    entry.scrapes.push_back(scrape);
                    while entry.scrapes.len() > options.window.max(2) {
                        entry.scrapes.pop_front();
                    }
                }
            }
        }
    }
}
