//! The controller binary with hostile files dropped into its folder: a 200 KB file of
//! nested sequences (which kept libyaml busy for minutes) and a file over the size cap.
//! Throughout, discovery, the CA and the metrics endpoint must answer as before; the
//! files are refused with their path and reason while the rest of the folder keeps being
//! served; removing them clears the errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_hbone::Identity;
use ambit_proto::ca::certificate_service_client::CertificateServiceClient;
use ambit_proto::ca::CreateCertificateRequest;
use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{
    resource, subscribe_request, Hello, ProxyKind, Push, SubscribeRequest,
};
use ambit_testing::{free_port, http_get_async, Proc};
use anyhow::{bail, Context};

const BIN: &str = env!("CARGO_BIN_EXE_ambit-controller");

/// How long each probe may take. Serving takes milliseconds; a stalled runtime would take
/// as long as the parse (minutes before the fix).
const PROMPT: Duration = Duration::from_secs(2);

const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {ambit.dev/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.1.0.1}\n";

/// What the probes need to reach the running controller.
struct Plane {
    listen: String,
    ops_port: u16,
    root: String,
    token: String,
    log: PathBuf,
}

impl Plane {
    fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let identity: Identity =
            "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller".parse()?;
        Ok(ambit_hbone::control::channel(
            &self.listen,
            &self.root,
            &identity,
        )?)
    }

    /// A new ztunnel subscription for node n1, and its first push.
    async fn subscribe(
        &self,
    ) -> anyhow::Result<(
        tonic::Streaming<Push>,
        Push,
        tokio::sync::mpsc::Sender<SubscribeRequest>,
    )> {
        let mut client = DiscoveryClient::new(self.channel()?);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(SubscribeRequest {
            message: Some(subscribe_request::Message::Hello(Hello {
                kind: ProxyKind::Ztunnel as i32,
                node: "n1".into(),
                ..Hello::default()
            })),
        })
        .await?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let mut pushes = client.subscribe(request).await?.into_inner();
        let push = pushes.message().await?.context("stream ended")?;
        Ok((pushes, push, tx))
    }

    /// One CreateCertificate for the identity of n1's pod.
    async fn certificate(&self) -> anyhow::Result<()> {
        let identity = Identity::new("cluster.local", "demo", "default")?;
        let csr = ambit_hbone::csr::new_csr(&identity)?;
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr: csr.csr_pem,
            validity_seconds: 0,
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let response = CertificateServiceClient::new(self.channel()?)
            .create_certificate(request)
            .await?
            .into_inner();
        anyhow::ensure!(!response.cert_chain.is_empty(), "no certificate");
        Ok(())
    }

    /// Discovery, the CA and metrics, each within [`PROMPT`].
    async fn all_answer(&self) -> anyhow::Result<String> {
        let (_, push, _) = tokio::time::timeout(PROMPT, self.subscribe())
            .await
            .context("discovery did not answer within 2 s")??;
        anyhow::ensure!(push.full_state, "first push is not a full state");
        tokio::time::timeout(PROMPT, self.certificate())
            .await
            .context("the CA did not answer within 2 s")??;
        let ops = SocketAddr::from(([127, 0, 0, 1], self.ops_port));
        let (status, metrics) = tokio::time::timeout(PROMPT, http_get_async(ops, "/metrics"))
            .await
            .context("metrics did not answer within 2 s")??;
        anyhow::ensure!(status == 200, "{metrics}");
        Ok(metrics)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Probes until `done` holds on the metrics and the log, at most `limit`.
    async fn probe_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&str, &str) -> bool,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let metrics = self.all_answer().await?;
            if done(&metrics, &self.log()) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("{what} not seen within {limit:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn start(dir: &Path, state: &Path) -> anyhow::Result<(Proc, Plane)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let ops_port = free_port()?;
    let log = state.join("controller.log");
    let child = Proc::adopt(
        Command::new(BIN)
            .args([
                "--local-dir",
                &dir.to_string_lossy(),
                "--listen",
                &listen,
                "--ops-listen",
                &format!("127.0.0.1:{ops_port}"),
                "--state-dir",
                &state.to_string_lossy(),
                "--nodes",
                "n1",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (root, token) = loop {
        let root = std::fs::read_to_string(state.join("ca/root-cert.pem"));
        let token = std::fs::read_to_string(state.join("credentials/n1.token"));
        if let (Ok(root), Ok(token)) = (root, token) {
            break (root, token.trim().to_string());
        }
        anyhow::ensure!(Instant::now() < deadline, "controller never wrote its root");
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((
        child,
        Plane {
            listen,
            ops_port,
            root,
            token,
            log,
        },
    ))
}

fn workload_uids(push: &Push) -> Vec<String> {
    push.upserts
        .iter()
        .filter_map(|r| match &r.kind {
            Some(resource::Kind::Workload(w)) => Some(w.uid.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_never_stall_discovery_the_ca_or_metrics() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    std::fs::write(dir.path().join("mesh.yaml"), MESH)?;
    let (_child, plane) = start(dir.path(), state.path())?;
    // Up and serving: the first probe may wait for the listener.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = plane.all_answer().await {
        anyhow::ensure!(Instant::now() < deadline, "controller never served: {e:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut pushes, first, _hello) = plane.subscribe().await?;
    assert_eq!(workload_uids(&first), vec!["demo/a"]);

    // 200 KB of nested flow sequences in a document that is otherwise a valid object, and
    // a file 10 KB over the 1 MiB cap.
    let nested = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  labels: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    std::fs::write(dir.path().join("nested.yaml"), &nested)?;
    let huge = format!("# {}\n", "x".repeat(1024 * 1024 + 10 * 1024));
    std::fs::write(dir.path().join("huge.yaml"), &huge)?;

    // Every probe answers promptly while the files are read and refused, and the refusals
    // name each file and its reason.
    let nested_err = format!(
        "{}: document 1: refused before parsing: nesting deeper than 64 levels at line 5, column",
        dir.path().join("nested.yaml").display()
    );
    let huge_err = format!(
        "{}: refused before parsing: {} bytes is over the limit of 1048576 bytes per file",
        dir.path().join("huge.yaml").display(),
        huge.len()
    );
    plane
        .probe_until(Duration::from_secs(15), "both refusals", |metrics, log| {
            metrics.contains("ambit_local_source_errors 2")
                && log.contains(&nested_err)
                && log.contains(&huge_err)
        })
        .await?;
    // Keep probing for a while: nothing the files caused may stall serving later either
    // (the folder is rescanned on every change and periodically).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        plane.all_answer().await?;
    }

    // The rest of the folder is still served: a new pod reaches the subscriber.
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: demo}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.1.0.2}\n",
    )?;
    let got_b = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let push = pushes.message().await?.context("stream ended")?;
            if workload_uids(&push).contains(&"demo/b".to_string()) {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("the new pod was not pushed while the bad files were present")?;
    got_b?;

    // Removing the files recovers: no errors left, and the log says so.
    std::fs::remove_file(dir.path().join("nested.yaml"))?;
    std::fs::remove_file(dir.path().join("huge.yaml"))?;
    plane
        .probe_until(Duration::from_secs(15), "recovery", |metrics, log| {
            metrics.contains("ambit_local_source_errors 0")
                && log.contains("local source: every file is accepted again")
        })
        .await?;
    Ok(())
}
