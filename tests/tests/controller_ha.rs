//! Controller high availability in the local mesh: `ambitctl up --controllers 2` runs two
//! controller replicas over the same state dir. The test kills (SIGKILL) the replica the
//! ztunnels are connected to and asserts what users and operators see: the ztunnels are
//! connected to the survivor within 5 s (its `ambit_connected_proxies`), a connection opened
//! before the failover still carries bytes after it, every connection made during it
//! succeeds, and leadership (the leader record, the `ambit_controller_leader` gauge) moves to
//! the survivor.
//!
//! Runs the built binaries; must run under `flock /tmp/ambit-localmesh.lock` (the local
//! mesh's addresses are fixed).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_controller::leader::FileElector;
use ambit_tests::local_mesh::{wait_for, Mesh};
use ambitctl::local::cluster::CONTROLLER_OPS_PORT;
use ambitctl::local::{admin, net};

/// A sample of one replica's ops endpoint: (connected ztunnels, leads).
fn replica_view(fabric: &str, ops: SocketAddr) -> Option<(u64, bool)> {
    let (_, body) = admin::get(fabric, ops, "/metrics").ok()?;
    let value = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        value("ambit_connected_proxies{kind=\"ztunnel\"}")?,
        value("ambit_controller_leader ")? == 1,
    ))
}

/// One full exchange with the sample echo server from inside `netns`: greeting and echo.
fn exchange(netns: &str, dst: SocketAddr) -> Result<(), String> {
    net::in_netns(netns, move || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("hello from demo/echo-1") {
            return Err(std::io::Error::other(format!("greeting {line:?}")));
        }
        s.write_all(b"ping\n")?;
        line.clear();
        reader.read_line(&mut line)?;
        if line != "ping\n" {
            return Err(std::io::Error::other(format!("echo {line:?}")));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

#[test]
fn killing_the_serving_controller_moves_ztunnels_and_leadership_without_a_failed_connection() {
    let Some(mesh) = Mesh::up_with(
        "controller_failover",
        "ha",
        &["--nodes", "2", "--pods-per-node", "1", "--controllers", "2"],
    ) else {
        return;
    };
    let state = mesh.state();
    assert_eq!(state.more_controllers.len(), 1, "two replicas");
    let replicas: Vec<(String, i32, SocketAddr)> = std::iter::once((
        "controller-0".to_owned(),
        state.controller.as_ref().expect("controller-0").pid,
        SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT)),
    ))
    .chain(state.more_controllers.iter().map(|c| {
        (
            c.name.clone(),
            c.process.as_ref().expect("its process").pid,
            c.ops,
        )
    }))
    .collect();
    let logs = || {
        mesh.log("controller.log")
            + &mesh.log("controller-1.log")
            + &mesh.log("ztunnel-node1.log")
            + &mesh.log("ztunnel-node2.log")
    };
    // Both ztunnels on one replica, both replicas serving, one of them leading.
    let mut serving = None;
    wait_for(
        30,
        "both ztunnels connected to one replica, and one leader",
        || {
            let views: Vec<_> = replicas
                .iter()
                .map(|(_, _, ops)| replica_view(&state.fabric, *ops))
                .collect();
            let Some(views) = views.into_iter().collect::<Option<Vec<_>>>() else {
                return false;
            };
            let leaders = views.iter().filter(|(_, l)| *l).count();
            serving = views.iter().position(|(n, _)| *n == 2);
            leaders == 1 && serving.is_some()
        },
        logs,
    );
    let serving = serving.expect("a serving replica");
    let survivor = 1 - serving;
    let leader = FileElector::current(&state.state_dir).expect("a live leader recorded");
    assert!(
        replicas
            .iter()
            .any(|(name, pid, _)| *name == leader.0 && u32::try_from(*pid).ok() == Some(leader.1)),
        "the leader record names a replica: {leader:?}"
    );

    // Traffic across nodes (client-1 on node2 to echo-1 on node1), before and during.
    let [client, echo] = mesh.pods(["client-1", "echo-1"]);
    let dst = SocketAddr::from((echo.ip, 8080));
    wait_for(
        40,
        "the mesh to carry traffic",
        || exchange(&client.netns, dst).is_ok(),
        logs,
    );
    // A connection opened before the failover, kept open across it.
    let (netns, open_dst) = (client.netns.clone(), dst);
    let mut held = net::in_netns(&netns, move || {
        TcpStream::connect_timeout(&open_dst, Duration::from_secs(5))
    })
    .expect("enter the client pod")
    .expect("connect before the failover");
    held.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut held_reader = BufReader::new(held.try_clone().expect("clone"));
    let mut greeting = String::new();
    held_reader.read_line(&mut greeting).expect("greeting");
    assert!(greeting.starts_with("hello from demo/echo-1"), "{greeting}");

    // New connections in a loop, from before the kill until after the ztunnels moved.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (stop, netns) = (stop.clone(), client.netns.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match exchange(&netns, dst) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let sample_before = mesh.client_log().lines().count();

    // SIGKILL the replica the ztunnels use: no goodbye, its sockets die with it.
    let (killed_name, killed_pid, _) = replicas[serving].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the serving replica");
    let killed_at = Instant::now();
    let (survivor_name, _, survivor_ops) = replicas[survivor].clone();
    wait_for(
        10,
        "both ztunnels connected to the survivor",
        || replica_view(&state.fabric, survivor_ops).is_some_and(|(n, _)| n == 2),
        logs,
    );
    let moved_in = killed_at.elapsed();
    assert!(
        moved_in <= Duration::from_secs(5),
        "the ztunnels took {moved_in:?} to resume with {survivor_name} after {killed_name} died"
    );
    // Leadership is the survivor's: its gauge, and the record naming it.
    wait_for(
        10,
        "the survivor to lead",
        || {
            replica_view(&state.fabric, survivor_ops).is_some_and(|(_, leads)| leads)
                && FileElector::current(&state.state_dir)
                    .is_some_and(|(name, _)| name == survivor_name)
        },
        logs,
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = looper.join().expect("the request loop");
    assert!(
        failed.is_empty(),
        "{} of {} connections failed during the failover: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 10, "only {ok} connections made during the failover");
    // The connection opened before still carries bytes both ways.
    held.write_all(b"still here\n")
        .expect("write after the failover");
    let mut echoed = String::new();
    held_reader
        .read_line(&mut echoed)
        .expect("read after the failover");
    assert_eq!(echoed, "still here\n");
    // And the sample client, calling every second throughout, never failed either.
    let sample = mesh.client_log();
    let after: Vec<&str> = sample.lines().skip(sample_before).collect();
    assert!(
        after.iter().all(|l| !l.contains("\"ok\":false")),
        "{after:?}"
    );
    eprintln!(
        "ztunnels resumed with {survivor_name} {moved_in:?} after {killed_name} was killed; \
         {ok} connections during the failover, none failed"
    );
}
