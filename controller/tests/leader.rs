//! Controller high availability on Kubernetes: two `ambit-controller` processes against an API
//! server speaking the real wire format elect one leader with a `coordination.k8s.io/v1`
//! Lease; only the leader writes (the CA Secret, waypoint Deployments); a leader whose Lease
//! is taken stops writing; and when the leader is killed the survivor takes the Lease over
//! within the lease duration and performs the writes.

// Helpers panic as test failures do.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use ambit_testing::apiserver::{FakeApiServer, Verb};
use ambit_testing::{eventually, Proc};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The election's timing in this test (seconds): short, so a failover costs seconds.
const LEASE: u64 = 3;
const RENEW: u64 = 2;
const RETRY: u64 = 1;

struct Replica {
    name: &'static str,
    proc: Proc,
    ops: SocketAddr,
}

fn free_addr() -> SocketAddr {
    // Bound and released: the controller binds it right after.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start(name: &'static str, kubeconfig: &Path, dir: &Path) -> Result<Replica> {
    let ops = free_addr();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ambit-controller"));
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--ops-listen")
        .arg(ops.to_string())
        .arg("--state-dir")
        .arg(dir.join(name))
        .args(["--waypoint-image", "ambit/waypoint:test"])
        .args(["--leader-identity", name])
        .arg(format!("--lease-duration-seconds={LEASE}"))
        .arg(format!("--renew-deadline-seconds={RENEW}"))
        .arg(format!("--retry-period-seconds={RETRY}"));
    let proc = Proc::start(command, dir.join(format!("{name}.log")))?;
    Ok(Replica { name, proc, ops })
}

/// The replica's `ambit_controller_leader` gauge, if its ops endpoint answers.
fn leader_gauge(ops: SocketAddr) -> Option<i64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&ops, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("ambit_controller_leader "))
        .and_then(|v| v.trim().parse().ok())
}

fn holder(server: &FakeApiServer) -> Option<String> {
    let lease = server.get(
        "coordination.k8s.io/v1",
        "Lease",
        "ambit-system",
        "ambit-controller",
    )?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

fn deployment(server: &FakeApiServer) -> Option<Value> {
    server.get("apps/v1", "Deployment", "shop", "waypoint")
}

fn gateway(label: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"touched": label}},
        "spec": {"gatewayClassName": "ambit-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    })
}

async fn wait_for(what: &str, replicas: &[&Replica], cond: impl FnMut() -> bool) -> Result<()> {
    if let Err(e) = eventually(what, cond).await {
        let logs: Vec<String> = replicas
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, r.proc.logs()))
            .collect();
        bail!("{e}\n{}", logs.join("\n"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_the_survivor_takes_over_the_writes() -> Result<()> {
    let server = FakeApiServer::start().await?;
    for ns in ["shop", "ambit-system"] {
        server
            .apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
    }
    server.apply(&gateway("0"))?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, Some("t"))?;

    // Two replicas start together: exactly one leads, both come up (the follower with the
    // leader's root), and the leader deploys the waypoint.
    let a = start("replica-a", &kubeconfig, dir.path()).context("replica a")?;
    let b = start("replica-b", &kubeconfig, dir.path()).context("replica b")?;
    wait_for("a leader and its writes", &[&a, &b], || {
        holder(&server).is_some() && deployment(&server).is_some()
    })
    .await?;
    wait_for("both replicas serving, one leading", &[&a, &b], || {
        let gauges = (leader_gauge(a.ops), leader_gauge(b.ops));
        matches!(gauges, (Some(1), Some(0)) | (Some(0), Some(1)))
    })
    .await?;
    assert_eq!(
        server.count(Verb::Create, "secrets"),
        1,
        "only the leader stores the CA; the follower loads it"
    );
    let first = holder(&server).unwrap();
    let (leader, follower) = if first == a.name { (a, b) } else { (b, a) };
    assert_eq!(
        leader_gauge(leader.ops),
        Some(1),
        "the Lease's holder leads"
    );

    // Someone else takes the Lease: the leader stops writing at its next round.
    let mut stolen = server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "ambit-system",
            "ambit-controller",
        )
        .unwrap();
    stolen["spec"]["holderIdentity"] = json!("intruder");
    stolen["spec"]["leaseDurationSeconds"] = json!(3600);
    if let Some(m) = stolen["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    server.apply(&stolen)?;
    wait_for("the old leader to step down", &[&leader, &follower], || {
        leader_gauge(leader.ops) == Some(0)
    })
    .await?;
    server.delete("apps/v1", "Deployment", "shop", "waypoint")?;
    server.apply(&gateway("1"))?;
    tokio::time::sleep(Duration::from_secs(2 * RETRY + 1)).await;
    assert!(
        deployment(&server).is_none(),
        "a replica without the Lease wrote the waypoint"
    );
    assert_eq!(leader_gauge(follower.ops), Some(0), "nobody leads");

    // The intruder goes away: a replica leads again and redoes the writes.
    server.delete(
        "coordination.k8s.io/v1",
        "Lease",
        "ambit-system",
        "ambit-controller",
    )?;
    wait_for("a new term and its writes", &[&leader, &follower], || {
        holder(&server).is_some_and(|h| h != "intruder") && deployment(&server).is_some()
    })
    .await?;

    // Kill the leader (no release): the survivor acquires within the lease duration (plus
    // one retry period to notice) and performs the writes.
    let current = holder(&server).unwrap();
    let (mut dead, survivor) = if current == leader.name {
        (leader, follower)
    } else {
        (follower, leader)
    };
    server.delete("apps/v1", "Deployment", "shop", "waypoint")?;
    let killed = Instant::now();
    dead.proc.child.kill()?;
    dead.proc.child.wait()?;
    wait_for("the survivor to hold the Lease", &[&survivor], || {
        holder(&server).as_deref() == Some(survivor.name)
    })
    .await?;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(LEASE + 2 * RETRY),
        "took {took:?} to take the Lease over (lease {LEASE} s, retry {RETRY} s)"
    );
    wait_for("the survivor's writes", &[&survivor], || {
        deployment(&server).is_some()
    })
    .await?;
    assert_eq!(leader_gauge(survivor.ops), Some(1));
    let lease = server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "ambit-system",
            "ambit-controller",
        )
        .unwrap();
    assert!(
        lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0) >= 1,
        "{lease}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_cleanly_releases_the_lease() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambit-system"}}),
    )?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, Some("t"))?;
    let mut a = start("replica-a", &kubeconfig, dir.path())?;
    // Serving (its signal handler installed), and leading.
    wait_for("the Lease", &[&a], || {
        holder(&server).as_deref() == Some("replica-a") && leader_gauge(a.ops) == Some(1)
    })
    .await?;
    // SIGTERM: a clean shutdown, which gives the Lease up.
    a.proc.terminate()?;
    wait_for("the Lease to be released", &[&a], || {
        holder(&server).is_none()
    })
    .await?;
    Ok(())
}
