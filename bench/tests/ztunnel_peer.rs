//! Smoke run of the side-by-side harness (`ztunnel_peer --quick`, one round, no peer): direct,
//! the floor relay pair and Ambit's ztunnel pair in dedicated mode on a veth pair. Asserts
//! that every tool delivered bytes or requests on every path, that the floor and Ambit paths
//! really went through the server side's proxy (its own connection and byte counters), that
//! the peer was skipped and said so, and that nothing is left behind. No figure is checked
//! against a bound.

use std::process::Command;

use ambit_tests::{require_root, workspace_bin};

fn tools_present(test: &str) -> bool {
    let missing: Vec<&str> = ["iperf3", "sockperf", "wrk", "nginx"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: needs {} (scripts/test.sh and scripts/bench.sh install them)",
        missing.join(", ")
    );
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{why}; CI=true, so this is a failure, not a skip");
    eprintln!("SKIPPED {why}");
    false
}

#[test]
fn harness_measures_direct_and_ambit_through_the_proxies() -> anyhow::Result<()> {
    let test = "ztunnel_peer_smoke";
    if !require_root(test) || !tools_present(test) {
        return Ok(());
    }
    let ztunnel = workspace_bin("ztunnel");
    let dir = tempfile::tempdir()?;
    let json_path = dir.path().join("figures.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel_peer"))
        .args([
            "--quick",
            "--rounds",
            "1",
            "--floor-tunnel",
            "tls",
            "--ztunnel",
        ])
        .arg(&ztunnel)
        .arg("--json")
        .arg(&json_path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztunnel_peer failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("peer: skipped (no --peer-ztunnel given)"),
        "{stdout}"
    );
    assert!(stdout.contains("throughput, 1 stream (Gb/s)"), "{stdout}");
    assert!(stdout.contains("load average: before"), "{stdout}");

    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    assert_eq!(doc["peer_skipped"], true);
    let runs = doc["rounds"][0]["runs"]
        .as_array()
        .expect("runs of round 1")
        .clone();
    let paths: Vec<&str> = runs.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(paths, ["direct", "floor", "ambit"]);
    let count = |run: &serde_json::Value, ptr: &str| {
        run.pointer(ptr)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    for run in &runs {
        for ptr in [
            "/throughput_1_stream/bytes",
            "/throughput_4_streams/bytes",
            "/ping_pong/round_trips",
            "/connection_close/requests",
            "/keepalive/requests",
        ] {
            assert!(count(run, ptr) > 0.0, "{ptr} is zero in {run}");
        }
    }
    let direct = &runs[0];
    assert!(direct["proxy"].is_null(), "{direct}");
    for proxied_run in &runs[1..] {
        // The tools' connections were counted by the server side's proxy: the harness
        // measured the proxies, not the direct path again.
        let proxied = count(proxied_run, "/proxy/server_side_connections");
        let tool_connections = count(proxied_run, "/connection_close/requests");
        assert!(
            proxied >= tool_connections,
            "{proxied} connections through the server side's proxy, fewer than wrk's {tool_connections}: {proxied_run}"
        );
        let bytes = count(proxied_run, "/proxy/server_side_bytes");
        assert!(
            bytes
                >= count(proxied_run, "/throughput_1_stream/bytes")
                    + count(proxied_run, "/throughput_4_streams/bytes"),
            "{bytes} bytes counted by the server side's proxy: {proxied_run}"
        );
        assert!(
            count(proxied_run, "/proxy/rss_kib_after/0") > 0.0,
            "{proxied_run}"
        );
    }

    // The namespaces it made are gone.
    let client_ns = stdout
        .split_whitespace()
        .find(|w| w.starts_with("zp") && w.ends_with("-c"))
        .expect("the run names its namespaces");
    let listed =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    assert!(
        !listed.contains(client_ns.trim_end_matches("-c")),
        "namespaces left behind:\n{listed}"
    );
    Ok(())
}
