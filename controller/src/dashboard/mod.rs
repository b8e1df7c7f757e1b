//! The built-in dashboard, served on the controller's operations port (15014) beside
//! `/metrics`: a live graph of the mesh's workloads with the golden metrics on each edge,
//! the recent denials with the policy that denied, and each proxy's health and certificate
//! expiry.
//!
//! - `GET /dashboard`: the page (server-rendered HTML with a small inline script).
//! - `GET /dashboard/data`: the same data as JSON (`edges`, `denials`, `proxies`,
//!   `workloads`), plus `html`, the rendered fragment the page's script swaps in.
//!
//! The data comes from the proxies' own Prometheus endpoints, scraped by the controller
//! ([`scrape`]); no other server is involved. The controller learns where each proxy's
//! endpoint is from its discovery subscription: the proxy announces its metrics *port*
//! in the `ambit-metrics-port` request metadata, and the controller scrapes that port at
//! the address the subscription came from (the pod's or node's IP). Only the port comes
//! from the proxy, so a proxy cannot aim the scraper at another host.
//!
//! Module map: [`prom`] reads the text exposition, [`view`] computes rates, edges,
//! denials and health from the scraped windows (pure), [`html`] renders, [`scrape`] does
//! the I/O.

pub mod html;
pub mod prom;
pub mod scrape;
pub mod view;

use ambit_runtime::http::{json, respond, text, Body};
use http::{HeaderValue, Response, StatusCode};

pub use scrape::{Dashboard, DashboardOptions};

/// The page's Content-Security-Policy: its own inline script and style, requests to this
/// server only, nothing loaded from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'";

impl Dashboard {
    /// The answer to `path` if it is one of the dashboard's, else `None`.
    pub fn respond(&self, path: &str) -> Option<Response<Body>> {
        let mut resp = match path {
            "/dashboard" | "/dashboard/" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                html::page(&self.view()),
            ),
            "/dashboard/data" => {
                let view = self.view();
                let fragment = html::fragment(&view);
                match serde_json::to_value(&view) {
                    Ok(mut value) => {
                        if let Some(obj) = value.as_object_mut() {
                            obj.insert("html".to_owned(), fragment.into());
                        }
                        json(StatusCode::OK, &value)
                    }
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the dashboard's data: {e}\n"),
                    ),
                }
            }
            _ => return None,
        };
        let headers = resp.headers_mut();
        headers.insert("content-security-policy", HeaderValue::from_static(CSP));
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        headers.insert("cache-control", HeaderValue::from_static("no-store"));
        Some(resp)
    }
}
