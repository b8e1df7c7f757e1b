//! WATCH: a chunked stream of `{"type": ..., "object": ...}` lines replaying the change history
//! after the requested resourceVersion, then following new writes. It behaves as the real watch
//! cache does where clients notice: a compacted start version yields an `ERROR` event carrying a
//! `410 Expired` Status (HTTP 200, not an HTTP error), `allowWatchBookmarks` yields periodic
//! `BOOKMARK`s, `timeoutSeconds` ends the stream cleanly, and no `resourceVersion` (or "0")
//! first sends the current objects as `ADDED`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::resource::ResourceType;
use super::response::{streaming_response, Body};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, ChangeType, State};
use super::Shared;

/// What one watch request asked for.
struct WatchRequest {
    rt: ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchRequest {
    fn selects(&self, obj: &Value) -> bool {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

/// Where the stream starts.
enum Start {
    /// Send current objects as ADDED first ("0" or no resourceVersion).
    Snapshot { initial_events_end: bool },
    /// Replay changes after this version.
    After(u64),
}

/// Answers a watch request with a streaming body.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    rt: ResourceType,
    namespace: Option<String>,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let timeout = match get("timeoutSeconds") {
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest(format!("invalid timeoutSeconds {t:?}")))?,
        None => 1800,
    };
    let request = WatchRequest {
        rt,
        namespace,
        labels: LabelSelector::parse(get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(get("fieldSelector").unwrap_or(""))?,
        bookmarks: get("allowWatchBookmarks") == Some("true"),
        timeout: Duration::from_secs(timeout),
    };
    let start = match get("resourceVersion").filter(|v| !v.is_empty() && *v != "0") {
        Some(rv) => Start::After(
            rv.parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
        ),
        None => Start::Snapshot {
            initial_events_end: get("sendInitialEvents") == Some("true"),
        },
    };
    // A paused server (a simulated partition) holds watch requests until resumed; by then the
    // requested version may have been compacted.
    let mut gate = shared.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(produce(shared, request, start, tx));
    Ok(streaming_response(rx))
}

/// Feeds one watch stream until it times out, is closed by the test, or the client goes away.
async fn produce(shared: Arc<Shared>, req: WatchRequest, start: Start, tx: mpsc::Sender<Bytes>) {
    let mut changes = shared.changes.subscribe();
    let mut epoch = shared.epoch.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let deadline = tokio::time::sleep(req.timeout);
    tokio::pin!(deadline);

    let (lines, mut last) = {
        let state = shared.lock();
        match start {
            Start::After(rv) => (Vec::new(), rv),
            Start::Snapshot { initial_events_end } => {
                let mut lines: Vec<Bytes> = state
                    .list(&req.rt, req.namespace.as_deref())
                    .iter()
                    .filter(|o| req.selects(o))
                    .map(|o| event_line("ADDED", o))
                    .collect();
                if initial_events_end {
                    lines.push(bookmark(&req.rt, state.rv, true));
                }
                (lines, state.rv)
            }
        }
    };
    for line in lines {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let interval = *shared
        .bookmark_interval
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut send_bookmark = false;
    loop {
        // The first pass replays history after the start version (or reports it expired).
        let (lines, expired_at) = drain(&shared.lock(), &req, &mut last);
        if let Some(floor) = expired_at {
            shared.expired_sent.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(expired(last, floor)).await;
            return;
        }
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if send_bookmark {
            shared.bookmarks_sent.fetch_add(1, Ordering::Relaxed);
            if tx.send(bookmark(&req.rt, last, false)).await.is_err() {
                return;
            }
        }
        send_bookmark = false;
        tokio::select! {
            _ = changes.changed() => {}
            _ = ticker.tick(), if req.bookmarks => send_bookmark = true,
            _ = &mut deadline => return,
            _ = epoch.changed() => return,
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
    }
}

/// Collects the events after `last` that this watch selects and advances `last` to the current
/// version. Returns the floor instead when the history no longer reaches back to `last` (a
/// watcher that fell behind a bounded history).
fn drain(state: &State, req: &WatchRequest, last: &mut u64) -> (Vec<Bytes>, Option<u64>) {
    if *last < state.floor {
        return (Vec::new(), Some(state.floor));
    }
    let from = state.history.partition_point(|c| c.rv <= *last);
    let api_version = req.rt.api_version();
    let mut lines = Vec::new();
    for change in state.history.range(from..) {
        if change.key.api_version != api_version || change.key.plural != req.rt.plural {
            continue;
        }
        let (now, before) = match change.kind {
            ChangeType::Deleted => (false, req.selects(&change.object)),
            _ => (
                req.selects(&change.object),
                change.previous.as_deref().is_some_and(|p| req.selects(p)),
            ),
        };
        if let Some(kind) = event_type(change.kind, now, before) {
            lines.push(event_line(kind, &change.object));
        }
    }
    *last = state.rv;
    (lines, None)
}

/// A BOOKMARK: an object carrying only the kind and a resourceVersion up to which this watch has
/// seen every change.
fn bookmark(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

/// The ERROR event a real server sends for a compacted start version.
fn expired(requested: u64, floor: u64) -> Bytes {
    let status = ApiError::Expired(format!("too old resource version: {requested} ({floor})"));
    event_line("ERROR", &status.status_json())
}

/// Serialises one watch event line.
pub(crate) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The watch event type for a change, as seen through a selector: objects that start or stop
/// matching are ADDED or DELETED for this watcher.
pub(crate) fn event_type(kind: ChangeType, now: bool, before: bool) -> Option<&'static str> {
    match (kind, before, now) {
        (ChangeType::Added, _, true) => Some("ADDED"),
        (ChangeType::Modified, true, true) => Some("MODIFIED"),
        (ChangeType::Modified, false, true) => Some("ADDED"),
        (ChangeType::Modified, true, false) => Some("DELETED"),
        (ChangeType::Deleted, true, _) => Some("DELETED"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_transitions() {
        use ChangeType::*;
        // (change, matches now, matched before)
        assert_eq!(event_type(Modified, true, false), Some("ADDED"));
        assert_eq!(event_type(Modified, false, true), Some("DELETED"));
        assert_eq!(event_type(Modified, false, false), None);
        assert_eq!(event_type(Deleted, false, true), Some("DELETED"));
    }
}
