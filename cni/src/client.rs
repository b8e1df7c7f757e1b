//! Talking to ztunnel over `cni.sock`, and what to believe when it does not answer.
//!
//! The exchange is ztunnel's protocol (`ambit_ztunnel::cni`): one JSON line each way. When
//! ztunnel is not there (stopped, restarting, not yet started on a new node), the plugin reads
//! the last state ztunnel acknowledged from the node directory and applies the same verdict
//! function to it, so an enrolled pod is still captured (and refused until a ztunnel adopts it)
//! rather than started outside the mesh.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ambit_ztunnel::cni::{self as proto, Op, Outcome, PodRef, Request, Response, Verdict};
use ambit_ztunnel::node_dir::NodeDir;
use ambit_ztunnel::state::Store;

/// Why ztunnel gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or the exchange failed midway.
    #[error("cannot talk to ztunnel at {path}")]
    Io {
        /// The socket.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not the protocol's.
    #[error("ztunnel's answer is not understood: {0}")]
    Garbled(String),
    /// ztunnel refused the request (another protocol version, most likely).
    #[error("ztunnel refused the request: {0}")]
    Refused(String),
}

/// Asks ztunnel about `pod` (`op`) over the socket in `data_dir`.
pub fn ask(data_dir: &Path, op: Op, pod: &PodRef, timeout: Duration) -> Result<bool, ClientError> {
    let path = data_dir.join(proto::SOCKET_NAME);
    let io = |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(&path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&Request {
        version: proto::PROTOCOL_VERSION,
        op,
        pod: pod.clone(),
    })
    .map_err(|e| ClientError::Garbled(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = Vec::new();
    BufReader::new(stream.take(proto::MAX_MESSAGE as u64))
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    let response: Response =
        serde_json::from_slice(&answer).map_err(|e| ClientError::Garbled(e.to_string()))?;
    match response.outcome {
        Outcome::Enrolled { .. } => Ok(true),
        Outcome::NotEnrolled { .. } => Ok(false),
        Outcome::Refused { reason } => Err(ClientError::Refused(reason)),
    }
}

/// The verdict on `pod` from the state ztunnel last acknowledged for `node`, kept in
/// `data_dir`. `None` when there is no usable kept state (ztunnel never ran here, another
/// format, another node): then nothing says the pod is in the mesh.
pub fn kept_verdict(data_dir: &Path, node: &str, pod: &PodRef) -> Option<Verdict> {
    // Opening creates the directory; a node where ztunnel never ran must stay untouched.
    if !data_dir.is_dir() {
        return None;
    }
    let dir = NodeDir::open(data_dir, node).ok()?;
    let (push, _saved) = dir.load_state().ok()??;
    let mut store = Store::new(Some(node));
    store.apply(push).ok()?;
    Some(proto::verdict(&store.snapshot(), pod))
}
