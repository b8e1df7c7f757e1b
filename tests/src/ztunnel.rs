//! For the end-to-end tests that run ztunnel: a mesh of in-process ztunnels (one `App` per
//! node of a [`Topology`]) fed by one static state file, a CA client backed by a real
//! [`CertificateAuthority`], and helpers to read metrics and access logs, sniff the fabric and
//! talk HBONE from inside a pod. Process guards, HTTP probes and bounded waits come from
//! `ambit-testing`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ambit_hbone::ca::CertificateAuthority;
use ambit_hbone::cert::WorkloadCertificate;
use ambit_hbone::Identity;
use ambit_testing::WAIT;
use ambit_ztunnel::app::App;
use ambit_ztunnel::capture::iptables::CHAIN_OUTPUT;
use ambit_ztunnel::capture::{NetnsHandle, NetnsWorker};
use ambit_ztunnel::certs::{CaClient, CertsError, SignedChain};
use ambit_ztunnel::config::Config;
use ambit_ztunnel::enrollment::PodStatus;
use ambit_ztunnel::telemetry::{self, CaptureWriter, LogFormat};
use anyhow::{bail, Context};

use crate::{Pod, Topology};

/// Signs with a real CA, valid from a second ago for `validity`, so rotation happens at
/// half of `validity` (the production CA backdates a minute, which would put a short-lived
/// certificate past its half-life on arrival).
#[derive(Clone)]
pub struct TestCa {
    pub ca: Arc<CertificateAuthority>,
    pub validity: Duration,
    pub issued: Arc<AtomicUsize>,
}

impl TestCa {
    pub fn new(validity: Duration) -> Self {
        TestCa {
            ca: Arc::new(
                CertificateAuthority::generate("cluster.local", Duration::from_secs(86400))
                    .expect("generate CA"),
            ),
            validity,
            issued: Arc::default(),
        }
    }

    /// Writes the CA as `ca.pem` and `ca-key.pem` in `dir`, the files a ztunnel process
    /// reads with `--local-ca-cert` and `--local-ca-key`.
    pub fn write_files(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let pem = self.ca.to_pem();
        std::fs::write(dir.join("ca.pem"), &pem.cert_pem)?;
        std::fs::write(dir.join("ca-key.pem"), &pem.key_pem)?;
        Ok(())
    }

    /// A certificate for `identity` (for test clients speaking HBONE themselves).
    pub fn issue(&self, identity: &Identity) -> WorkloadCertificate {
        let req = ambit_hbone::csr::new_csr(identity).expect("csr");
        let signed = self.sign_now(&req.csr_pem).expect("sign");
        let chain = ambit_hbone::cert::parse_pem_certs(&signed.cert_chain.concat()).expect("chain");
        WorkloadCertificate::new(chain, req.private_key(), self.ca.trust_roots()).expect("cert")
    }

    fn sign_now(&self, csr_pem: &str) -> Result<SignedChain, CertsError> {
        let refused = |e: &dyn std::error::Error| CertsError::Refused {
            reason: e.to_string(),
        };
        let csr = self
            .ca
            .validate_csr(csr_pem, None)
            .map_err(|e| refused(&e))?;
        let now = SystemTime::now();
        let chain = self
            .ca
            .sign_between(&csr, now - Duration::from_secs(1), now + self.validity)
            .map_err(|e| refused(&e))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(SignedChain {
            cert_chain: chain
                .iter()
                .map(|c| ambit_hbone::cert::to_pem(c.as_ref()))
                .collect(),
            trust_roots: self.ca.roots_pem(),
        })
    }
}

impl CaClient for TestCa {
    async fn sign(&self, csr_pem: String, _validity: Duration) -> Result<SignedChain, CertsError> {
        self.sign_now(&csr_pem)
    }
}

/// One workload of the state file.
pub fn workload(pod: &Pod, namespace: &str, sa: &str, node: &str, enrolled: bool) -> String {
    format!(
        "  - name: {}\n    namespace: {namespace}\n    serviceAccount: {sa}\n    node: {node}\n    addresses: [{}]\n    protocol: {}\n",
        pod.name,
        pod.ip,
        if enrolled { "HBONE" } else { "TCP" }
    )
}

/// One workload of the state file, known to the mesh by both of its addresses (so its IPv6
/// is captured and meshed).
pub fn dual_stack(pod: &Pod, namespace: &str, sa: &str, node: &str, enrolled: bool) -> String {
    workload(pod, namespace, sa, node, enrolled).replace(
        &format!("addresses: [{}]", pod.ip),
        &format!("addresses: [{}, '{}']", pod.ip, pod.ip6),
    )
}

/// Whether ztunnel's capture rules are in `pod`'s namespace (its outbound chain exists; the
/// rules are applied in one transaction, so one chain stands for all).
pub fn captured(pod: &Pod) -> bool {
    crate::exec_in(&pod.netns, &["iptables-save"]).is_ok_and(|r| r.contains(CHAIN_OUTPUT))
}

/// The uid the static file gives a workload.
pub fn uid(namespace: &str, pod: &Pod) -> String {
    format!("{namespace}/{}", pod.name)
}

/// ztunnels for the nodes of a topology, sharing one state file.
pub struct Mesh {
    pub ca: TestCa,
    pub state_file: PathBuf,
    pub apps: Vec<(String, App)>,
}

impl Mesh {
    /// Starts one ztunnel per node in `nodes`, each configured by `tweak`.
    pub async fn start(
        topo: &Topology,
        nodes: &[&str],
        state: &str,
        ca: TestCa,
        tweak: impl Fn(&str, &mut Config),
    ) -> anyhow::Result<Mesh> {
        let state_file = std::env::temp_dir().join(format!("ambit-{}-state.yaml", topo.prefix()));
        std::fs::write(&state_file, state)?;
        let mut apps = Vec::new();
        for node in nodes {
            let mut config =
                Config::for_tests(node, state_file.clone(), topo.netns_dir().to_path_buf());
            tweak(node, &mut config);
            let app = App::start(config, ca.clone())
                .await
                .with_context(|| format!("start ztunnel for {node}"))?;
            apps.push((node.to_string(), app));
        }
        Ok(Mesh {
            ca,
            state_file,
            apps,
        })
    }

    /// ztunnels on `n1` and `n2` with the default test configuration and a CA issuing
    /// hour-long certificates (no rotation during a test).
    pub async fn two_nodes(topo: &Topology, state: &str) -> anyhow::Result<Mesh> {
        let ca = TestCa::new(Duration::from_secs(3600));
        Mesh::start(topo, &["n1", "n2"], state, ca, |_, _| {}).await
    }

    pub fn app(&self, node: &str) -> &App {
        match self.apps.iter().find(|(n, _)| n == node) {
            Some((_, app)) => app,
            None => panic!("no ztunnel for {node}"),
        }
    }

    /// Replaces the state and makes every ztunnel apply it now.
    pub async fn set_state(&self, state: &str) -> anyhow::Result<()> {
        std::fs::write(&self.state_file, state)?;
        for (node, app) in &self.apps {
            app.reload_state()
                .await
                .with_context(|| format!("{node}: reload"))?;
        }
        Ok(())
    }

    /// Waits until `uid` is enrolled (or, with `false`, not) on `node`'s ztunnel.
    pub async fn wait_enrolled(&self, node: &str, uid: &str, enrolled: bool) -> anyhow::Result<()> {
        let mut rx = self.app(node).enrollment();
        let check = |s: &ambit_ztunnel::enrollment::Statuses| {
            matches!(s.get(uid), Some(PodStatus::Enrolled { .. })) == enrolled
        };
        let waited = tokio::time::timeout(WAIT, rx.wait_for(|s| check(s))).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => bail!(
                "{node}: {uid} did not become enrolled={enrolled}: {:?}",
                self.app(node).enrollment().borrow()
            ),
        }
    }

    /// Waits until every identity of `node` has a certificate.
    pub async fn wait_certs(&self, node: &str) -> anyhow::Result<()> {
        let app = self.app(node);
        let ids = app.certs().identities();
        tokio::time::timeout(WAIT, app.certs().wait_all_ready(&ids))
            .await
            .context("certificates did not arrive")??;
        Ok(())
    }

    pub async fn shutdown(self) {
        for (_, app) in self.apps {
            app.shutdown().await;
        }
        let _ = std::fs::remove_file(&self.state_file);
    }
}

/// Sum of the samples of `metric` (e.g. `istio_tcp_connections_opened_total`) whose labels
/// contain every `k="v"` of `labels`.
pub fn metric(app: &App, metric: &str, labels: &[(&str, &str)]) -> u64 {
    let text = app.metrics().encode().expect("encode metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The access log (JSON lines) of every in-process ztunnel of this test binary: installed
/// once per process as the global subscriber, so call it before starting the mesh. Tests
/// of one binary share it; their addresses tell their lines apart.
pub fn access_log() -> CaptureWriter {
    static CAPTURE: OnceLock<CaptureWriter> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let out = CaptureWriter::new();
            let (dispatch, _) = telemetry::build(LogFormat::Json, "warn,access=info", out.clone())
                .expect("log directives");
            // Fails only if another subscriber was installed first: then nothing is
            // captured and the tests asserting on lines say so.
            let _ = tracing::dispatcher::set_global_default(dispatch);
            out
        })
        .clone()
}

/// The access-log lines (as JSON objects) containing every one of `needles`.
pub fn access_lines(log: &CaptureWriter, needles: &[&str]) -> Vec<serde_json::Value> {
    log.contents()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "access")
        .collect()
}

/// Runs a blocking fixture call off the runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Connects from `pod` to `dst` and expects the connection to be closed without the app's
/// greeting (ztunnel refused it).
pub async fn refused(pod: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    let pod = pod.clone();
    blocking(move || {
        // The capture accepts the TCP connection locally, so the refusal shows as a close.
        let Ok(mut s) = crate::connect_from(&pod, dst) else {
            return Ok(());
        };
        match crate::read_greeting(&mut s) {
            Ok(seen) => bail!("{dst} answered {seen:?}: not refused"),
            Err(_) => Ok(()),
        }
    })
    .await
}

/// Connects from `pod` to `dst`, reads the reply server's greeting and echoes `payload`;
/// returns the client address the server saw.
pub async fn round_trip(pod: &Pod, dst: SocketAddr, payload: &[u8]) -> anyhow::Result<SocketAddr> {
    let (pod, payload) = (pod.clone(), payload.to_vec());
    blocking(move || {
        let mut s = crate::connect_from(&pod, dst)?;
        let seen = crate::read_greeting(&mut s)?;
        let back = crate::echo(&mut s, &payload)?;
        if back != payload {
            bail!("echo came back different");
        }
        Ok(seen.peer)
    })
    .await
}

/// Records every frame on every interface of a namespace (the fabric) until dropped.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    /// Every frame's bytes, concatenated, and where each frame ends.
    frames: Arc<Mutex<(Vec<u8>, Vec<usize>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sniffer {
    pub fn start(netns: &str) -> anyhow::Result<Self> {
        // ETH_P_ALL in network byte order.
        let socket = crate::in_netns(netns, || {
            socket2::Socket::new(
                socket2::Domain::PACKET,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(0x0300)),
            )
        })??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let thread = std::thread::spawn({
            let (stop, frames) = (stop.clone(), frames.clone());
            move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = (&socket).read(&mut buf) {
                        let mut frames = frames.lock().expect("sniffer lock");
                        frames.0.extend_from_slice(&buf[..n]);
                        let end = frames.0.len();
                        frames.1.push(end);
                    }
                }
            }
        });
        Ok(Sniffer {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Everything captured so far, frames concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.frames.lock().expect("sniffer lock").0.clone()
    }

    /// Every frame captured so far (Ethernet header first), in order.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let frames = self.frames.lock().expect("sniffer lock");
        let (bytes, ends) = &*frames;
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let frame = bytes[start..end].to_vec();
                start = end;
                frame
            })
            .collect()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// HBONE pool sockets made inside a pod's namespace (the test acting as a mesh peer).
pub struct PodSocketFactory(pub NetnsWorker);

impl PodSocketFactory {
    pub fn for_pod(pod: &Pod) -> anyhow::Result<Self> {
        let handle = NetnsHandle::open(format!("/var/run/netns/{}", pod.netns))?;
        Ok(PodSocketFactory(NetnsWorker::spawn(handle)?))
    }
}

impl ambit_hbone::client::SocketFactory for PodSocketFactory {
    fn new_socket(
        &self,
        _source: &Identity,
        _peer: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpSocket> {
        self.0
            .run_blocking(|| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })
            .map_err(std::io::Error::other)?
            .map(|s| tokio::net::TcpSocket::from_std_stream(s.into()))
    }
}

/// A ServiceAccount and a Pod on `node`, as the controller's local source reads them.
pub fn pod_yaml(pod: &Pod, ns: &str, sa: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         uid: uid-{name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  \
         containers:\n  - name: app\n    image: app\nstatus:\n  podIP: {ip}\n",
        name = pod.name,
        ip = pod.ip
    )
}
