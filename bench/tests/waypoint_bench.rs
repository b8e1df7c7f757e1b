//! Smoke run of the waypoint benchmark (`waypoint-bench` with tiny counts, the debug
//! `waypoint` binary): every path answers its requests and the report names each ratio. No
//! figure is checked against a bound.

use std::process::Command;

use ambit_tests::workspace_bin;

#[test]
fn benchmark_runs_every_path_and_reports_the_ratios() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint-bench"))
        .args([
            "--requests",
            "50",
            "--connections",
            "4",
            "--per-connection",
            "25",
        ])
        .args(["--load-seconds", "1", "--load-rate", "100"])
        .arg("--waypoint-bin")
        .arg(workspace_bin("waypoint"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "waypoint-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for title in [
        "hbone vs direct",
        "two hops vs direct",
        "waypoint vs direct",
    ] {
        assert!(stdout.contains(title), "no table {title:?}:\n{stdout}");
    }
    assert!(
        stdout.contains("requests/s against one hop: two hops "),
        "{stdout}"
    );
    assert!(
        stdout.contains("latency p50 added to one hop's: two hops "),
        "{stdout}"
    );
    // The paced load reached the waypoint process: its CPU and RSS were read.
    assert!(stdout.contains("waypoint process ("), "{stdout}");
    assert!(!stdout.contains("RSS 0.0 MiB"), "{stdout}");
    Ok(())
}
