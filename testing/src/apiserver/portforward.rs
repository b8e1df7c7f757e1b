//! `pods/<name>/portforward`: the WebSocket upgrade kubectl and kube-rs use to reach a pod's
//! port, with the channel framing of `v4.channel.k8s.io` (each binary message starts with its
//! channel byte; port `i` has data channel `2i` and error channel `2i+1`, and the first message
//! on each carries the port number, little-endian). The pod side is whatever the test
//! registered for that pod with [`super::FakeApiServer::forward_pod`]: typically a dial into
//! the network namespace of a real process, since a fake server has no kubelet to ask.
//!
//! One port per request, like `kubectl port-forward` makes one request per connection.
//! When the pod closes its side, the WebSocket is closed, which is how kube-rs's
//! `Portforwarder` learns of the end of the stream.

use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::response::Body;
use super::store::ApiError;
use super::Shared;

/// Connects to a port of a pod, as the kubelet would: called on a blocking thread with the
/// port number; the connection it returns is the pod's end of the forward.
pub type PodDialer = Arc<dyn Fn(u16) -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// The channel subprotocol the server speaks.
const PROTOCOL: &str = "v4.channel.k8s.io";

/// Whether `segs` (the path split on `/`) names a pod's portforward subresource; returns
/// (namespace, pod).
pub(crate) fn matches<'a>(segs: &[&'a str]) -> Option<(&'a str, &'a str)> {
    match segs {
        ["api", "v1", "namespaces", ns, "pods", name, "portforward"] => Some((ns, name)),
        _ => None,
    }
}

/// Answers the upgrade and spawns the forward; errors are `Status` answers before the upgrade.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    namespace: &str,
    pod: &str,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let dialer = shared
        .dialers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(namespace.to_owned(), pod.to_owned()))
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("pods \"{pod}\" not found")))?;
    let ports: Vec<u16> = query
        .iter()
        .filter(|(k, _)| k == "ports")
        .flat_map(|(_, v)| v.split(','))
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let [port] = ports.as_slice() else {
        return Err(ApiError::BadRequest(format!(
            "forward exactly one port per request (got {ports:?})"
        )));
    };
    let port = *port;
    let headers = req.headers();
    let key = headers
        .get(hyper::header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::BadRequest("portforward needs a WebSocket upgrade".into()))?;
    let offered = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == PROTOCOL);
    if !offered {
        return Err(ApiError::BadRequest(format!(
            "the client must offer the {PROTOCOL} subprotocol"
        )));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "fake API server: portforward upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        forward(ws, dialer, port).await;
    });
    let mut resp = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        "Upgrade".parse().expect("static"),
    );
    h.insert(hyper::header::UPGRADE, "websocket".parse().expect("static"));
    if let Ok(v) = accept.parse() {
        h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(
        hyper::header::SEC_WEBSOCKET_PROTOCOL,
        PROTOCOL.parse().expect("static"),
    );
    Ok(resp)
}

/// Copies between the WebSocket's data channel 0 and the pod's connection; reports a dial
/// failure on the error channel 1, as the kubelet does.
async fn forward<S>(ws: WebSocketStream<S>, dialer: PodDialer, port: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let [lo, hi] = port.to_le_bytes();
    for ch in [0u8, 1] {
        if sink.send(Message::binary(vec![ch, lo, hi])).await.is_err() {
            return;
        }
    }
    let dialed = tokio::task::spawn_blocking(move || {
        dialer(port).and_then(|s| s.set_nonblocking(true).map(|()| s))
    })
    .await;
    let conn = match dialed {
        Ok(Ok(s)) => tokio::net::TcpStream::from_std(s),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e)),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            let mut msg = vec![1u8];
            msg.extend_from_slice(format!("error forwarding port {port}: {e}").as_bytes());
            let _ = sink.send(Message::binary(msg)).await;
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    let (mut from_pod, mut to_pod) = conn.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = from_pod.read(&mut buf[1..]) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf[0] = 0;
                    if sink.send(Message::binary(buf[..=n].to_vec())).await.is_err() {
                        return;
                    }
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) if data.first() == Some(&0) && data.len() > 1 => {
                    if to_pod.write_all(&data[1..]).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = to_pod.shutdown().await;
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    // The pod closed its side: end the stream, so the client sees the end of the data.
    let _ = sink.send(Message::Close(None)).await;
}
