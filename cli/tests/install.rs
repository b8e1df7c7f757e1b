//! `ambitctl install` and `ambitctl crds` as a user runs them: the binary, its stdout, stderr and
//! exit code. Also the guard that `manifests/install/` is exactly what `ambitctl install` prints.

// Test helpers panic on unexpected output, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const REFRESH: &str =
    "cargo run -p ambitctl -- install --enable-waypoints --write-dir manifests/install";

fn ambitctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(args: &[&str]) -> String {
    let out = ambitctl(args);
    assert!(
        out.status.success(),
        "ambitctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn sorted_yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn manifests_dir_is_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    stdout(&["install", "--enable-waypoints", "--write-dir", dir]);
    let fresh = sorted_yaml_files(tmp.path());
    let committed = sorted_yaml_files(&install_dir());
    let names = |v: &[PathBuf]| -> Vec<_> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(&fresh),
        names(&committed),
        "manifests/install is out of date; refresh with:\n  {REFRESH}"
    );
    for (f, c) in fresh.iter().zip(&committed) {
        let (f_text, c_text) = (
            std::fs::read_to_string(f).unwrap(),
            std::fs::read_to_string(c).unwrap(),
        );
        assert!(
            f_text == c_text,
            "{} is out of date; refresh with:\n  {REFRESH}",
            c.display()
        );
    }
}

#[test]
fn stdout_is_the_same_install_as_the_files() {
    let printed = yaml_docs(&stdout(&["install", "--enable-waypoints"]));
    let files: Vec<Value> = sorted_yaml_files(&install_dir())
        .iter()
        .flat_map(|p| yaml_docs(&std::fs::read_to_string(p).unwrap()))
        .collect();
    assert_eq!(printed, files);

    let json: Value =
        serde_json::from_str(&stdout(&["render", "--enable-waypoints", "-o", "json"])).unwrap();
    assert_eq!(json["apiVersion"], "v1");
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"].as_array().unwrap(), &files);
}

#[test]
fn default_install_has_no_waypoint_objects() {
    let docs = yaml_docs(&stdout(&["install", "--dry-run"]));
    assert!(docs.iter().all(|d| d["kind"] != "GatewayClass"));
    assert!(docs.iter().any(|d| d["kind"] == "DaemonSet"));
    // Writing without waypoints removes a 05-waypoints.yaml left by an earlier run.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    stdout(&["install", "--enable-waypoints", "--write-dir", dir]);
    assert!(tmp.path().join("05-waypoints.yaml").exists());
    stdout(&["install", "--write-dir", dir]);
    assert!(!tmp.path().join("05-waypoints.yaml").exists());
    assert!(tmp.path().join("04-ztunnel.yaml").exists());
}

#[test]
fn crds_prints_only_our_crds() {
    let docs = yaml_docs(&stdout(&["crds"]));
    let names: Vec<_> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "authorizationpolicies.security.ambit.dev",
            "peerauthentications.security.ambit.dev",
            "trafficpolicies.traffic.ambit.dev",
            "requestauthentications.security.ambit.dev",
            "externalservices.networking.ambit.dev",
        ]
    );
}

#[test]
fn missing_ca_file_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-root.pem");
    let key = tmp.path().join("key.pem");
    std::fs::write(&key, "not used").unwrap();
    let out = ambitctl(&[
        "install",
        "--ca-cert",
        missing.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "nothing may be printed for kubectl to apply"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read") && stderr.contains("no-such-root.pem"),
        "{stderr}"
    );
}

#[test]
fn ca_cert_without_key_is_a_usage_error() {
    let out = ambitctl(&["install", "--ca-cert", "/tmp/x.pem"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-key"));
}

#[test]
fn bad_namespace_is_refused() {
    let out = ambitctl(&["install", "--namespace", "Not_A_Name"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--namespace"));
}
