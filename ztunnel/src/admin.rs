//! The admin endpoint (127.0.0.1:15000): what an operator on the node uses to see what the
//! proxy knows and to change how it logs.
//!
//! It shows the whole configuration and can stop the proxy, so it only ever listens on a
//! loopback address: [`AdminServer::bind`] refuses anything else rather than trusting the
//! caller's configuration. Endpoints:
//!
//! - `GET /config_dump`: the state snapshot the caller provides (JSON);
//! - `GET /certs`: certificates of local identities (serials and dates, never keys);
//! - `GET|POST /logging?level=<filter>`: show or change the log filter at runtime;
//! - `POST /quitquitquit`: start a graceful drain, as SIGTERM would;
//! - `GET /`: this list.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hyper::{Method, StatusCode};

use crate::certs::CertManager;
use crate::drain::{DrainWatcher, ShutdownRequest};
use crate::http_server::{self, Body, Listener, ServerError};
use crate::telemetry::{error_chain, LogHandle};

/// Default admin address: loopback only.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is not a loopback address; the admin API must not be reachable from
    /// the network.
    #[error("refusing to serve the admin API on {0}: it may only listen on a loopback address (127.0.0.1 or ::1)")]
    NotLoopback(SocketAddr),
    /// The listener could not be bound.
    #[error("cannot start the admin server")]
    Server(#[source] ServerError),
}

/// Produces the config dump: a snapshot of the proxy's state as JSON.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin endpoints read and act on; every part is optional so the admin
/// server can start before the rest of the proxy (and tests can wire only what they
/// exercise). An endpoint whose part is missing answers 404.
#[derive(Clone, Default)]
pub struct Admin {
    config_dump: Option<ConfigDump>,
    certs: Option<CertManager>,
    logging: Option<LogHandle>,
    shutdown: Option<ShutdownRequest>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("config_dump", &self.config_dump.is_some())
            .field("certs", &self.certs.is_some())
            .field("logging", &self.logging.is_some())
            .field("shutdown", &self.shutdown.is_some())
            .finish()
    }
}

impl Admin {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `dump()` on `/config_dump`.
    pub fn with_config_dump(
        mut self,
        dump: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.config_dump = Some(Arc::new(dump));
        self
    }

    /// Serves the manager's certificates on `/certs`.
    pub fn with_certs(mut self, certs: CertManager) -> Self {
        self.certs = Some(certs);
        self
    }

    /// Lets `/logging` change the log filter.
    pub fn with_logging(mut self, logging: LogHandle) -> Self {
        self.logging = Some(logging);
        self
    }

    /// Lets `/quitquitquit` request shutdown.
    pub fn with_shutdown(mut self, shutdown: ShutdownRequest) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    fn handle(&self, method: &Method, path: &str, query: Option<&str>) -> hyper::Response<Body> {
        use http_server::{json, text};
        let not_configured = |what: &str| {
            text(
                StatusCode::NOT_FOUND,
                format!("{what} is not available in this process\n"),
            )
        };
        match (method, path) {
            (&Method::GET, "/") => text(StatusCode::OK, INDEX),
            (&Method::GET, "/config_dump") => match &self.config_dump {
                Some(dump) => json(StatusCode::OK, &dump()),
                None => not_configured("the config dump"),
            },
            (&Method::GET, "/certs") => match &self.certs {
                Some(certs) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "certificates": certs.status() }),
                ),
                None => not_configured("the certificate manager"),
            },
            (&Method::GET | &Method::POST, "/logging") => {
                let Some(logging) = &self.logging else {
                    return not_configured("runtime log control");
                };
                match http_server::query_param(query, "level") {
                    None if method == Method::GET => {
                        text(StatusCode::OK, format!("level: {}\n", logging.current()))
                    }
                    None => text(StatusCode::BAD_REQUEST, "missing ?level=<filter>\n"),
                    Some(level) => match logging.set(&level) {
                        Ok(()) => text(StatusCode::OK, format!("level: {}\n", logging.current())),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{}\n", error_chain(&e))),
                    },
                }
            }
            (&Method::POST, "/quitquitquit") => match &self.shutdown {
                Some(shutdown) => {
                    tracing::info!("shutdown requested through the admin API");
                    shutdown.request();
                    text(StatusCode::OK, "draining\n")
                }
                None => not_configured("shutdown"),
            },
            (_, "/quitquitquit" | "/logging" | "/certs" | "/config_dump" | "/") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                format!("no such endpoint; see /\n\n{INDEX}"),
            ),
        }
    }
}

const INDEX: &str = "ztunnel admin\n\
GET  /config_dump         the proxy's state (workloads, services, policies)\n\
GET  /certs               certificates of local identities (no keys)\n\
GET  /logging             current log filter\n\
POST /logging?level=F     set the log filter (e.g. debug, or access=off,info)\n\
POST /quitquitquit        drain and exit\n";

/// The admin server, bound to a loopback address and ready to serve.
#[derive(Debug)]
pub struct AdminServer {
    listener: Listener,
    admin: Admin,
}

impl AdminServer {
    /// Binds `addr`, which must be a loopback address ([`DEFAULT_ADDR`]; port 0 in
    /// tests).
    pub async fn bind(addr: SocketAddr, admin: Admin) -> Result<Self, AdminError> {
        Self::bind_with(addr, admin, &crate::handover::Handover::default()).await
    }

    /// [`AdminServer::bind`], taking the listener a previous ztunnel handed over if any.
    pub async fn bind_with(
        addr: SocketAddr,
        admin: Admin,
        handover: &crate::handover::Handover,
    ) -> Result<Self, AdminError> {
        if !addr.ip().is_loopback() {
            return Err(AdminError::NotLoopback(addr));
        }
        Ok(AdminServer {
            listener: http_server::bind_with("admin", crate::handover::Role::Admin, addr, handover)
                .await
                .map_err(AdminError::Server)?,
            admin,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves until drain starts.
    pub async fn serve(self, drain: DrainWatcher) {
        let admin = Arc::new(self.admin);
        self.listener
            .serve(drain, move |req| {
                let admin = admin.clone();
                async move { admin.handle(req.method(), req.uri().path(), req.uri().query()) }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::local::InProcessCa;
    use crate::certs::{CertConfig, TokioClock};
    use crate::http_server::test_client::{get, request};
    use crate::telemetry::{self, CaptureWriter, LogFormat};

    async fn start(admin: Admin) -> (SocketAddr, crate::drain::DrainTrigger) {
        let server = AdminServer::bind("127.0.0.1:0".parse().expect("addr"), admin)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let (trigger, watcher) = crate::drain::channel();
        tokio::spawn(server.serve(watcher));
        (addr, trigger)
    }

    #[tokio::test]
    async fn refuses_non_loopback_addresses() {
        for addr in ["0.0.0.0:0", "[::]:0", "10.1.2.3:15000"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let err = AdminServer::bind(addr, Admin::new())
                .await
                .expect_err("must refuse");
            assert!(
                matches!(err, AdminError::NotLoopback(a) if a == addr),
                "{err:?}"
            );
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        AdminServer::bind("[::1]:0".parse().expect("addr"), Admin::new())
            .await
            .expect("IPv6 loopback is fine");
    }

    // Current-thread runtime (tokio::test's default): the server's tasks run on this
    // thread, so the thread-local subscriber set below sees their events too.
    #[tokio::test]
    async fn logging_changes_the_level_at_runtime() {
        let out = CaptureWriter::new();
        let (dispatch, handle) =
            telemetry::build(LogFormat::Text, "info", out.clone()).expect("logging");
        let _guard = tracing::dispatcher::set_default(&dispatch);
        let (addr, _trigger) = start(Admin::new().with_logging(handle)).await;

        tracing::debug!("debug-before");
        let (status, _, body) = get(addr, "/logging").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "level: info\n"));

        let (status, _, body) = request(addr, Method::POST, "/logging?level=debug").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "level: debug\n"));
        tracing::debug!("debug-after");

        let (status, _, body) = request(addr, Method::POST, "/logging?level=%3D%3Dbad").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("invalid log filter"), "{body}");
        assert_eq!(get(addr, "/logging").await.2, "level: debug\n");

        let logs = out.contents();
        assert!(!logs.contains("debug-before"), "{logs}");
        assert!(logs.contains("debug-after"), "{logs}");
    }

    #[tokio::test]
    async fn certs_show_dates_but_never_keys() {
        let ca = ambit_hbone::ca::CertificateAuthority::generate(
            "cluster.local",
            std::time::Duration::from_secs(3600 * 24 * 365),
        )
        .expect("CA");
        let clock = TokioClock::new();
        let certs = crate::certs::CertManager::new(
            InProcessCa::new(std::sync::Arc::new(ca), clock),
            clock,
            CertConfig::default(),
            None,
        );
        let id: ambit_hbone::Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .expect("id");
        certs.ensure(&id);
        let cert = certs.wait_ready(&id).await.expect("cert");
        let (addr, _trigger) = start(Admin::new().with_certs(certs)).await;

        let (status, headers, body) = get(addr, "/certs").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[hyper::header::CONTENT_TYPE], "application/json");
        assert!(!body.contains("PRIVATE KEY"), "{body}");
        assert!(!body.contains("BEGIN"), "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        let entry = &json["certificates"][0];
        assert_eq!(entry["identity"], id.to_string());
        assert_eq!(entry["state"], "ready");
        assert_eq!(entry["serial"], cert.summary().serial);
        assert_eq!(entry["not_after"], cert.summary().not_after);
        assert!(entry["expires_in_seconds"].as_u64().expect("secs") > 23 * 3600);
    }

    #[tokio::test]
    async fn config_dump_index_and_quitquitquit() {
        let shutdown = ShutdownRequest::new();
        let admin = Admin::new()
            .with_config_dump(|| serde_json::json!({ "workloads": [{ "name": "sleep" }] }))
            .with_shutdown(shutdown.clone());
        let (addr, trigger) = start(admin).await;

        let (status, _, body) = get(addr, "/config_dump").await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["workloads"][0]["name"], "sleep");

        let (status, _, body) = get(addr, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("/quitquitquit"), "{body}");
        assert_eq!(get(addr, "/certs").await.0, StatusCode::NOT_FOUND);

        // GET must not stop the proxy (a crawler or a stray curl).
        assert_eq!(
            get(addr, "/quitquitquit").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(!shutdown.is_requested());
        let (status, _, _) = request(addr, Method::POST, "/quitquitquit").await;
        assert_eq!(status, StatusCode::OK);
        tokio::time::timeout(std::time::Duration::from_secs(5), shutdown.requested())
            .await
            .expect("shutdown requested");
        assert_eq!(
            trigger
                .drain_and_wait(std::time::Duration::from_secs(5))
                .await,
            crate::drain::DrainOutcome::Complete
        );
    }
}
