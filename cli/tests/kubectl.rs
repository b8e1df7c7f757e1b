//! kubectl reads `ambitctl install`'s YAML as we meant it (optional: runs only where kubectl is
//! on PATH; set AMBIT_REQUIRE_KUBECTL=1 to make its absence a failure).
//!
//! `kubectl label --local` parses manifests with kubectl's own YAML 1.1 decoder and needs no API
//! server (unlike `create/apply --dry-run=client`, which need discovery). Installing with names
//! that YAML 1.1 reads as booleans or floats (`no`, `yes`, `1.10`) proves they arrive as strings.

// Test helpers panic on unexpected output, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

const LABEL: &str = "ambit.dev/kubectl-test";

fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("AMBIT_REQUIRE_KUBECTL").is_none(),
            "AMBIT_REQUIRE_KUBECTL is set but kubectl cannot run"
        );
        eprintln!("kubectl not on PATH: skipping");
    }
    found
}

#[test]
fn kubectl_reads_the_install_as_rendered() {
    if !kubectl_available() {
        return;
    }
    let args = [
        "install",
        "--enable-waypoints",
        "--namespace",
        "no",
        "--trust-domain",
        "yes",
        "--tag",
        "1.10",
        "-o",
        "yaml",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    let json = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(args.iter().take(args.len() - 1).chain(&["json"]))
        .output()
        .unwrap();
    let expected: Value = serde_json::from_slice(&json.stdout).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("install.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("kubectl")
        .args(["label", "--local", "-o", "json", "-f"])
        .arg(&file)
        .arg(format!("{LABEL}=x"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // kubectl prints one JSON object per document; drop the label it added and compare.
    let parsed: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|v| {
            let mut v = v.unwrap();
            let labels = v["metadata"]["labels"].as_object_mut().unwrap();
            labels.remove(LABEL);
            v
        })
        .collect();
    let expected = expected["items"].as_array().unwrap();
    assert_eq!(parsed.len(), expected.len());
    for (got, want) in parsed.iter().zip(expected) {
        if let Some(path) = first_difference(got, want, String::new()) {
            panic!(
                "{} {}: kubectl read {path} differently",
                want["kind"], want["metadata"]["name"]
            );
        }
    }
}

/// The first path where two documents differ, numbers compared by value (`100` == `100.0`).
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then_some(path),
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return Some(format!("{path} (keys {:?} vs {:?})", x.keys(), y.keys()));
            }
            x.iter().find_map(|(k, v)| match y.get(k) {
                Some(w) => first_difference(v, w, format!("{path}.{k}")),
                None => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        _ => (a != b).then(|| format!("{path} ({a} vs {b})")),
    }
}
