//! `ambitctl check --pre` run for real on this machine (root): every kernel feature of the
//! capture rules is probed in a scratch namespace and ztunnel's own rules are installed there,
//! and the scratch namespace is gone afterwards. A directory flag pointed at a missing path is
//! named with its fix and makes the command fail. (The post-install checks are exercised
//! against a running local mesh in local_mesh.rs, and against the fake API server in
//! cli/tests/check.rs.)

use std::process::Command;

use ambit_tests::workspace_bin;
use serde_json::Value;

fn check_pre(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(workspace_bin("ambitctl"))
        .args(["check", "--pre", "-o", "json"])
        .args(args)
        .output()
        .expect("run ambitctl");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check -o json is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch_namespaces() -> Vec<String> {
    ambitctl::local::net::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with("ambitchk-"))
        .collect()
}

#[test]
fn pre_install_checks_probe_this_kernel_and_name_a_missing_directory() {
    if !ambit_tests::require_root(
        "pre_install_checks_probe_this_kernel_and_name_a_missing_directory",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("net.d");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&conf).expect("conf dir");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::write(
        conf.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("conflist");
    let netns = dir.path().join("netns");
    std::fs::create_dir_all(&netns).expect("netns dir");
    let (conf_s, bin_s, netns_s) = (
        conf.display().to_string(),
        bin.display().to_string(),
        netns.display().to_string(),
    );
    let dirs = [
        "--cni-conf-dir",
        conf_s.as_str(),
        "--cni-bin-dir",
        bin_s.as_str(),
    ];

    let mut args = dirs.to_vec();
    args.extend(["--netns-dir", &netns_s]);
    let (ok, report, stderr) = check_pre(&args);
    let checks = report["checks"].as_array().expect("checks");
    assert!(ok, "{report:#}\n{stderr}");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for want in [
        "iptables",
        "ip6tables",
        "iptables backend",
        "IPv4 TPROXY target",
        "IPv6 TPROXY target",
        "IPv4 mark match",
        "IPv6 connmark match and CONNMARK target",
        "IPv4 REDIRECT target (nat)",
        "ztunnel's capture rules",
        "netns directory",
        "CNI configuration",
        "CNI plugin directory",
    ] {
        assert!(names.contains(&want), "no check {want:?}: {names:?}");
    }
    assert!(checks.iter().all(|c| c["outcome"] == "ok"), "{report:#}");
    let cni = checks
        .iter()
        .find(|c| c["name"] == "CNI configuration")
        .expect("CNI check");
    assert!(
        cni["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("ambit-cni will chain onto 10-bridge.conflist"),
        "{cni}"
    );
    assert!(
        scratch_namespaces().is_empty(),
        "scratch namespaces left: {:?}",
        scratch_namespaces()
    );

    // The netns directory flag pointed at a path that does not exist.
    let missing = dir.path().join("no-such-netns");
    let missing_s = missing.display().to_string();
    let mut args = dirs.to_vec();
    args.extend(["--netns-dir", &missing_s]);
    let (ok, report, stderr) = check_pre(&args);
    assert!(!ok, "{report:#}");
    assert!(stderr.contains("1 of "), "{stderr}");
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["name"], "netns directory");
    assert!(
        failed[0]["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{missing_s}: No such file or directory")),
        "{}",
        failed[0]
    );
    assert!(
        failed[0]["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("AMBIT_NETNS_DIR"),
        "{}",
        failed[0]
    );
}
