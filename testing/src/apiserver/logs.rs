//! `GET pods/<name>/log`: what a kubelet returns for a pod's container log, from a source the
//! test registers per pod (typically a proxy's real log file). `tailLines` is honoured, since
//! readers ask for the end of a log and never the whole of it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};

use super::response::Body;
use super::store::ApiError;
use super::Shared;

/// Produces a pod's log text on each request.
pub type PodLog = Arc<dyn Fn() -> std::io::Result<String> + Send + Sync>;

/// Whether `segs` (the path split on `/`) names a pod's log subresource; returns
/// (namespace, pod).
pub(crate) fn matches<'a>(segs: &[&'a str]) -> Option<(&'a str, &'a str)> {
    match segs {
        ["api", "v1", "namespaces", ns, "pods", name, "log"] => Some((ns, name)),
        _ => None,
    }
}

pub(crate) fn serve(
    shared: &Shared,
    namespace: &str,
    pod: &str,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let source = shared
        .logs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(namespace.to_owned(), pod.to_owned()))
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("pods \"{pod}\" not found")))?;
    let text = source().map_err(|e| ApiError::BadRequest(format!("reading the log: {e}")))?;
    let tail = query
        .iter()
        .find(|(k, _)| k == "tailLines")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let body = match tail {
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
            out.push('\n');
            out
        }
        None => text,
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}
