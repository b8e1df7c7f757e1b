//! Short run of `ztunnel_pods` (pod to pod across two ztunnel processes, direct against the
//! mesh): every measurement runs with small counts, and the harness itself refuses to print
//! figures unless the server side's ztunnel counted the held connections as tunnelled (its
//! metrics), so a run that silently measured the direct path twice fails here. No figure is
//! checked against a bound.

use std::process::Command;

use ambit_tests::{require_root, workspace_bin};

#[test]
fn harness_measures_both_paths_and_idle_connections_per_side() -> anyhow::Result<()> {
    if !require_root("ztunnel_pods_smoke") {
        return Ok(());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel_pods"))
        .args(["--bulk-mib", "4", "--pings", "200", "--connects", "50"])
        .args(["--idle", "300", "--udp-pings", "200", "--udp-mib", "1"])
        .arg("--ztunnel")
        .arg(workspace_bin("ztunnel"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztunnel_pods failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for line in [
        "bulk MB/s",
        "new connections/s",
        "300 idle connections opened",
        "holding them:",
        "RSS per idle connection:",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    Ok(())
}
