//! The CNI endpoint: how `ambit-cni` (the chained CNI plugin, `cni/`) tells ztunnel about a pod
//! the moment its network is set up, before its containers start.
//!
//! The plugin asks (`query`) whether the pod is in the mesh; ztunnel answers from its state
//! ([`verdict`]). If it is, the plugin installs the pod's capture rules itself (so the pod is
//! refused, never let through, until ztunnel serves it) and then says so (`added`): ztunnel
//! records where the pod's network namespace is and which addresses the CNI gave it
//! ([`Hints`]). Enrollment uses the hint at once: it enters that namespace directly (no scan by
//! IP) and, when the controller has not yet published the pod's address (Kubernetes learns it
//! from the very CNI call that is running), captures the pod by the address the CNI reported.
//! The plugin's [`verdict`] is also what it applies to the kept state when ztunnel is away.
//!
//! Wire format: one JSON object per line each way ([`Request`], then [`Response`]), one exchange
//! per connection, at most [`MAX_MESSAGE`] bytes, versioned by [`PROTOCOL_VERSION`]. The socket
//! is owner-only (the plugin runs as root, as the container runtime does).
//!
//! Not for: installing rules (the plugin does that, with the same `capture::iptables` code) or
//! deciding policy.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::drain::DrainWatcher;
use crate::state::{State, StateReader, TunnelProtocol, Workload};

/// File name of the socket in the node directory.
pub const SOCKET_NAME: &str = "cni.sock";
/// Version of [`Request`]/[`Response`]; a peer speaking another one is refused with a reason.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request or response line, newline included: a pod reference is a few hundred bytes.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// How long one exchange may take before ztunnel hangs up (a stuck plugin holds one permit).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exchanges served at once; the kubelet runs a handful of sandboxes in parallel at most.
const MAX_CONCURRENT: usize = 32;
/// How long an ADD for a pod missing from the state waits for the controller to publish it
/// (on Kubernetes the pod is pushed when it is scheduled, normally well before its sandbox).
const WORKLOAD_WAIT: Duration = Duration::from_millis(1500);

/// What the plugin asks or says. An ADD is two exchanges: `query`, then (the rules installed)
/// `added`; so ztunnel never programs the namespace while the plugin does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Is this pod in the mesh? (ADD and CHECK.) Waits briefly for a pod the state lacks.
    Query,
    /// The pod's capture rules are in: adopt it now.
    Added,
    /// The pod's network is being torn down: forget it.
    Deleted,
}

/// The pod as the container runtime describes it to a CNI plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's network namespace file (absent on a DEL after it is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `K8S_POD_UID` from `CNI_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The addresses the previous plugins gave the pod (`prevResult.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl PodRef {
    /// The key the controller gives this pod's workload: its uid, else "namespace/name".
    pub fn key(&self) -> Option<String> {
        self.uid.clone().or_else(|| {
            Some(format!(
                "{}/{}",
                self.namespace.as_deref()?,
                self.name.as_deref()?
            ))
        })
    }
}

/// One line from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// What the plugin is doing.
    pub op: Op,
    /// The pod.
    pub pod: PodRef,
}

/// ztunnel's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`PROTOCOL_VERSION`] of ztunnel.
    pub version: u32,
    /// The verdict.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// ztunnel's verdict on a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The pod is in the mesh: it must be captured.
    Enrolled {
        /// Why ztunnel thinks so.
        reason: String,
    },
    /// The pod is not in the mesh: leave it alone.
    NotEnrolled {
        /// Why ztunnel thinks so.
        reason: String,
    },
    /// The request could not be taken (bad version, malformed line).
    Refused {
        /// What was wrong.
        reason: String,
    },
}

/// Whether a pod is in the mesh, and how that was found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The state holds the pod's workload: enrolled iff its protocol is HBONE.
    Known {
        /// Its workload uid.
        uid: Arc<str>,
        /// Whether it is enrolled.
        enrolled: bool,
    },
    /// The state lacks the pod; its namespace has enrolled workloads, so it is enrolled
    /// unless it opts out, which only the controller can tell (it is then released).
    NamespaceEnrolled,
    /// Neither the pod nor any enrolled workload of its namespace is known.
    Unknown,
}

impl Verdict {
    /// Whether the pod must be captured now. An unknown pod is not: nothing says its
    /// namespace is in the mesh, and ztunnel still captures it when the controller says so.
    pub fn enrolled(&self) -> bool {
        match self {
            Verdict::Known { enrolled, .. } => *enrolled,
            Verdict::NamespaceEnrolled => true,
            Verdict::Unknown => false,
        }
    }

    /// One line for the plugin's log and the runtime's error messages.
    pub fn reason(&self, pod: &PodRef) -> String {
        let ns = pod.namespace.as_deref().unwrap_or("?");
        match self {
            Verdict::Known { uid, enrolled } => format!(
                "workload {uid} is {} the mesh",
                if *enrolled { "in" } else { "not in" }
            ),
            Verdict::NamespaceEnrolled => {
                format!("pod not known yet; namespace {ns} has workloads in the mesh")
            }
            Verdict::Unknown => {
                format!("pod not known and namespace {ns} has no workload in the mesh")
            }
        }
    }
}

fn enrolled(w: &Workload) -> bool {
    w.protocol == TunnelProtocol::Hbone && !w.is_waypoint
}

/// Decides from `state` whether `pod` is in the mesh: its workload by uid, else by namespace and
/// name, else by one of its addresses; failing those, whether its namespace has enrolled
/// workloads (the namespace label is what enrolls a pod).
pub fn verdict(state: &State, pod: &PodRef) -> Verdict {
    let by_uid = pod
        .uid
        .as_deref()
        .and_then(|uid| state.workload_by_uid(uid));
    let by_name = || match (pod.namespace.as_deref(), pod.name.as_deref()) {
        (Some(ns), Some(name)) => state
            .workloads()
            .find(|w| &*w.namespace == ns && &*w.name == name),
        _ => None,
    };
    let by_ip = || pod.ips.iter().find_map(|ip| state.workload_by_ip(*ip));
    if let Some(w) = by_uid.or_else(by_name).or_else(by_ip) {
        return Verdict::Known {
            uid: w.uid.clone(),
            enrolled: enrolled(w),
        };
    }
    match pod.namespace.as_deref() {
        Some(ns)
            if state
                .workloads()
                .any(|w| &*w.namespace == ns && enrolled(w)) =>
        {
            Verdict::NamespaceEnrolled
        }
        _ => Verdict::Unknown,
    }
}

/// Where the CNI put one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// Its network namespace file.
    pub netns: PathBuf,
    /// The addresses the CNI gave it.
    pub ips: Vec<IpAddr>,
}

/// Hints by workload key (uid, else "namespace/name").
pub type HintMap = BTreeMap<Arc<str>, Hint>;

/// The pods the CNI reported. Cheap to clone; enrollment watches it.
#[derive(Debug, Clone)]
pub struct Hints {
    tx: Arc<watch::Sender<Arc<HintMap>>>,
}

impl Default for Hints {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(HintMap::new()))),
        }
    }
}

impl Hints {
    /// Records `hint` for workload `key`.
    pub fn insert(&self, key: &str, hint: Hint) {
        self.tx.send_modify(|m| {
            Arc::make_mut(m).insert(Arc::from(key), hint);
        });
    }

    /// Forgets the pod in `netns`, or under `key` (DEL).
    pub fn remove(&self, key: Option<&str>, netns: Option<&Path>) {
        self.tx.send_if_modified(|m| {
            let before = m.len();
            Arc::make_mut(m).retain(|k, h| Some(&**k) != key && Some(h.netns.as_path()) != netns);
            m.len() != before
        });
    }

    /// The hint for workload `uid`, else one whose addresses include `ip`.
    pub fn find(&self, uid: &str, ip: Option<IpAddr>) -> Option<Hint> {
        let map = self.tx.borrow();
        map.get(uid).cloned().or_else(|| {
            let ip = ip?;
            map.values().find(|h| h.ips.contains(&ip)).cloned()
        })
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<HintMap>> {
        self.tx.subscribe()
    }
}

/// Errors from setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// The bound `cni.sock`.
#[derive(Debug)]
pub struct CniServer {
    listener: UnixListener,
    path: PathBuf,
}

impl CniServer {
    /// Binds `cni.sock` in `dir` (owner-only), replacing a socket an earlier ztunnel left.
    pub fn bind(dir: &Path) -> Result<Self, CniError> {
        let path = dir.join(SOCKET_NAME);
        let bind_err = |source| CniError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_err)?;
        Ok(Self { listener, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers the plugin until `drain` fires.
    pub async fn serve(self, state: StateReader, hints: Hints, drain: DrainWatcher) {
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
        let accept = async {
            loop {
                let stream = match self.listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cni socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Dropped at once: the plugin sees the connection close and fails closed.
                    tracing::warn!("cni socket: too many exchanges at once; one refused");
                    continue;
                };
                let (state, hints) = (state.clone(), hints.clone());
                tokio::spawn(async move {
                    let served =
                        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, &state, &hints))
                            .await;
                    match served {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "cni socket: exchange failed"),
                        Err(_) => tracing::warn!("cni socket: exchange timed out"),
                    }
                    drop(permit);
                });
            }
        };
        tokio::select! {
            () = accept => {}
            _ = drain.signaled() => {}
        }
    }
}

/// One request, one response.
async fn exchange(stream: UnixStream, state: &StateReader, hints: &Hints) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    // `take` bounds what one peer can make us buffer.
    BufReader::new(read)
        .take(MAX_MESSAGE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    let outcome = match serde_json::from_slice::<Request>(&line) {
        Err(e) if !line.ends_with(b"\n") && line.len() >= MAX_MESSAGE => Outcome::Refused {
            reason: format!("request longer than {MAX_MESSAGE} bytes ({e})"),
        },
        Err(e) => Outcome::Refused {
            reason: format!("malformed request: {e}"),
        },
        Ok(req) if req.version != PROTOCOL_VERSION => Outcome::Refused {
            reason: format!(
                "protocol version {} not supported (this ztunnel speaks {PROTOCOL_VERSION})",
                req.version
            ),
        },
        Ok(req) => handle(req, state, hints).await,
    };
    let mut out = serde_json::to_vec(&Response {
        version: PROTOCOL_VERSION,
        outcome,
    })
    .map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn handle(req: Request, state: &StateReader, hints: &Hints) -> Outcome {
    let pod = req.pod;
    match req.op {
        Op::Deleted => {
            hints.remove(pod.key().as_deref(), pod.netns.as_deref());
            tracing::info!(container = %pod.container_id, pod = ?pod.key(), "cni: pod removed");
            let v = verdict(&state.snapshot(), &pod);
            reply(&v, &pod)
        }
        Op::Query => reply(&await_verdict(state, &pod).await, &pod),
        Op::Added => {
            let v = verdict(&state.snapshot(), &pod);
            if v.enrolled() {
                let key = match &v {
                    Verdict::Known { uid, .. } => Some(uid.to_string()),
                    _ => pod.key(),
                };
                if let (Some(key), Some(netns)) = (key, pod.netns.clone()) {
                    hints.insert(
                        &key,
                        Hint {
                            netns,
                            ips: pod.ips.clone(),
                        },
                    );
                }
            }
            tracing::info!(
                container = %pod.container_id,
                pod = ?pod.key(),
                netns = ?pod.netns,
                enrolled = v.enrolled(),
                reason = %v.reason(&pod),
                "cni: pod added"
            );
            reply(&v, &pod)
        }
    }
}

/// The verdict, waiting a little for a pod the state does not hold yet.
async fn await_verdict(state: &StateReader, pod: &PodRef) -> Verdict {
    let mut versions = state.watch_version();
    let deadline = tokio::time::Instant::now() + WORKLOAD_WAIT;
    loop {
        let v = verdict(&state.snapshot(), pod);
        if matches!(v, Verdict::Known { .. }) {
            return v;
        }
        match tokio::time::timeout_at(deadline, versions.changed()).await {
            Ok(Ok(())) => {}
            _ => return v,
        }
    }
}

fn reply(v: &Verdict, pod: &PodRef) -> Outcome {
    let reason = v.reason(pod);
    if v.enrolled() {
        Outcome::Enrolled { reason }
    } else {
        Outcome::NotEnrolled { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{node_state as state, workload};
    use crate::state::Store;
    use ambit_proto::discovery as pb;

    fn pod(ns: &str, name: &str, uid: Option<&str>, ip: &str) -> PodRef {
        PodRef {
            container_id: "c1".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: uid.map(Into::into),
            ips: vec![ip.parse().unwrap()],
        }
    }

    fn plain(mut w: pb::Workload) -> pb::Workload {
        w.tunnel_protocol = pb::TunnelProtocol::None as i32;
        w
    }

    #[test]
    fn verdicts_from_the_state() {
        let st = state(vec![
            workload("shop", "a", "a", "n1", "10.0.0.2"),
            plain(workload("shop", "optout", "o", "n1", "10.0.0.3")),
            plain(workload("legacy", "l", "l", "n1", "10.0.0.4")),
        ]);
        let a_uid = st
            .workloads()
            .find(|w| &*w.name == "a")
            .map(|w| w.uid.clone())
            .unwrap();
        // (pod, expected verdict, enrolled)
        let cases: Vec<(PodRef, Verdict, bool)> = vec![
            // By uid, whatever the other fields say.
            (
                pod("x", "y", Some(&a_uid), "10.9.9.9"),
                Verdict::Known {
                    uid: a_uid.clone(),
                    enrolled: true,
                },
                true,
            ),
            // By namespace and name.
            (
                pod("shop", "a", None, "10.9.9.9"),
                Verdict::Known {
                    uid: a_uid.clone(),
                    enrolled: true,
                },
                true,
            ),
            // By address.
            (
                pod("other", "zz", Some("nope"), "10.0.0.2"),
                Verdict::Known {
                    uid: a_uid.clone(),
                    enrolled: true,
                },
                true,
            ),
            // A known pod that opted out is not captured, though its namespace is enrolled.
            (
                pod("shop", "optout", None, "10.9.9.9"),
                Verdict::Known {
                    uid: st
                        .workloads()
                        .find(|w| &*w.name == "optout")
                        .map(|w| w.uid.clone())
                        .unwrap(),
                    enrolled: false,
                },
                false,
            ),
            // Unknown pods: by their namespace.
            (
                pod("shop", "new", Some("u-new"), "10.9.9.9"),
                Verdict::NamespaceEnrolled,
                true,
            ),
            (
                pod("legacy", "new", Some("u-new"), "10.9.9.9"),
                Verdict::Unknown,
                false,
            ),
            (
                pod("nowhere", "new", None, "10.9.9.9"),
                Verdict::Unknown,
                false,
            ),
        ];
        for (p, want, captured) in cases {
            let got = verdict(&st, &p);
            assert_eq!(got, want, "{p:?}");
            assert_eq!(got.enrolled(), captured, "{p:?}");
        }
    }

    #[test]
    fn wire_format_is_one_json_object_per_line() {
        let req = Request {
            version: PROTOCOL_VERSION,
            op: Op::Added,
            pod: pod("shop", "a", Some("u1"), "10.0.0.2"),
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"op":"added","pod":{"container_id":"c1","netns":"/var/run/netns/cni-1","namespace":"shop","name":"a","uid":"u1","ips":["10.0.0.2"]}}"#
        );
        let resp = Response {
            version: 1,
            outcome: Outcome::Enrolled { reason: "r".into() },
        };
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"version":1,"outcome":"enrolled","reason":"r"}"#
        );
        assert_eq!(
            serde_json::from_str::<Response>(
                r#"{"version":1,"outcome":"not_enrolled","reason":"x"}"#
            )
            .unwrap()
            .outcome,
            Outcome::NotEnrolled { reason: "x".into() }
        );
    }

    #[test]
    fn hints_are_found_by_uid_or_address_and_forgotten_by_netns() {
        let hints = Hints::default();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        hints.insert(
            "u1",
            Hint {
                netns: "/run/netns/a".into(),
                ips: vec![ip],
            },
        );
        assert!(hints.find("u1", None).is_some());
        assert!(hints.find("other", Some(ip)).is_some());
        assert!(hints
            .find("other", Some("10.0.0.8".parse().unwrap()))
            .is_none());
        hints.remove(None, Some(Path::new("/run/netns/a")));
        assert!(hints.find("u1", None).is_none());
    }

    #[tokio::test]
    async fn the_socket_answers_adds_and_refuses_bad_lines() {
        let dir = tempfile_dir();
        let mut store = Store::new(Some("n1"));
        store
            .apply(pb::Push {
                full_state: true,
                version: 1,
                upserts: vec![pb::Resource {
                    kind: Some(pb::resource::Kind::Workload(workload(
                        "shop", "a", "a", "n1", "10.0.0.2",
                    ))),
                }],
                ..pb::Push::default()
            })
            .unwrap();
        let server = CniServer::bind(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(server.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let hints = Hints::default();
        let (_trigger, watcher) = crate::drain::channel();
        let path = server.path().to_path_buf();
        tokio::spawn(server.serve(store.reader(), hints.clone(), watcher));

        async fn ask(path: &Path, line: &[u8]) -> Response {
            let mut s = UnixStream::connect(path).await.unwrap();
            s.write_all(line).await.unwrap();
            // One line, as the plugin reads it: after an oversized request ztunnel closes with
            // input unread, which resets the connection once the answer has been read.
            let mut out = Vec::new();
            BufReader::new(s).read_until(b'\n', &mut out).await.unwrap();
            serde_json::from_slice(&out).unwrap()
        }
        let mut add = serde_json::to_vec(&Request {
            version: 1,
            op: Op::Added,
            pod: pod("shop", "new", Some("u-new"), "10.0.0.9"),
        })
        .unwrap();
        add.push(b'\n');
        let r = ask(&path, &add).await;
        assert!(matches!(r.outcome, Outcome::Enrolled { .. }), "{r:?}");
        assert_eq!(
            hints.find("u-new", None).map(|h| h.netns),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let r = ask(
            &path,
            b"{\"version\":2,\"op\":\"query\",\"pod\":{\"container_id\":\"c\"}}\n",
        )
        .await;
        assert!(
            matches!(&r.outcome, Outcome::Refused { reason } if reason.contains("version 2")),
            "{r:?}"
        );
        let r = ask(&path, b"not json\n").await;
        assert!(matches!(&r.outcome, Outcome::Refused { reason } if reason.contains("malformed")));
        let r = ask(&path, &vec![b'x'; MAX_MESSAGE * 2]).await;
        assert!(
            matches!(&r.outcome, Outcome::Refused { reason } if reason.contains("longer than")),
            "{r:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambit-cni-sock-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
