//! The CRD schemas refuse what they should and accept what they should: every fixture in
//! `manifests/examples/` is validated against the `openAPIV3Schema` of its CRD with a real
//! JSON-schema validator (`jsonschema`), after converting the structural schema to plain JSON
//! Schema.
//!
//! What the conversion does NOT cover (Kubernetes-only keywords, dropped before validating):
//! - `x-kubernetes-validations` (CEL). Each rule instead has a hand-written Rust mirror below,
//!   checked against the valid fixtures and against `examples/invalid-cel/`; the mirror tests the
//!   intent, not the CEL text itself (that needs a real API server).
//! - `x-kubernetes-preserve-unknown-fields`, `x-kubernetes-int-or-string`,
//!   `x-kubernetes-embedded-resource`, `x-kubernetes-list-type`/`-list-map-keys`,
//!   `x-kubernetes-map-type` (none are used by our CRDs today).
//! - pruning: the API server silently drops unknown fields, or rejects them under kubectl's default
//!   strict field validation. We emulate the strict behaviour by adding
//!   `additionalProperties: false` to every object schema that lists its `properties`.
//! - `default`: the API server fills defaults before validating; the validator does not (our
//!   defaults are all valid values, so this changes no verdict).
//! - `metadata` is only `type: object` here; the API server checks names itself.

// Test helpers panic on bad fixtures, as the tests themselves do (the workspace allows unwrap in
// #[test] functions only).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use ambit_manifests::crds;
use anyhow::{anyhow, Context};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// A fixture: its object and the `# key: value` annotation on its first lines, if any.
fn load(path: &Path, key: &str) -> (Value, Option<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let annotation = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {key}:")))
        .map(|v| v.trim().to_owned());
    let value: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not YAML", path.display()))
        .unwrap();
    (value, annotation)
}

/// Structural schema -> JSON Schema (draft 4, which OpenAPI v3's schema object extends).
fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                if k.starts_with("x-kubernetes-") || k == "nullable" {
                    continue;
                }
                // `properties` maps names to schemas; `enum`/`default` hold values, not schemas.
                let converted = match k.as_str() {
                    "enum" | "default" | "required" => v.clone(),
                    "properties" => Value::Object(
                        v.as_object()
                            .unwrap()
                            .iter()
                            .map(|(name, s)| (name.clone(), to_json_schema(s)))
                            .collect(),
                    ),
                    _ => to_json_schema(v),
                };
                out.insert(k.clone(), converted);
            }
            if map.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), serde_json::json!([t, "null"]));
                }
            }
            if out.contains_key("properties") && !out.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

fn crd_for(object: &Value, crds: &[CustomResourceDefinition]) -> anyhow::Result<Value> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let crd = crds
        .iter()
        .find(|c| {
            c.spec.names.kind == kind
                && c.spec
                    .versions
                    .iter()
                    .any(|v| format!("{}/{}", c.spec.group, v.name) == api_version)
        })
        .ok_or_else(|| anyhow!("no CRD for {api_version} {kind}"))?;
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .ok_or_else(|| anyhow!("CRD {kind} has no schema"))?;
    Ok(serde_json::to_value(schema)?)
}

/// The JSON-pointer paths of every schema error for `object`.
fn errors(object: &Value, crds: &[CustomResourceDefinition]) -> Vec<(String, String)> {
    let schema = to_json_schema(&crd_for(object, crds).unwrap());
    let validator = jsonschema::draft4::new(&schema).unwrap();
    validator
        .iter_errors(object)
        .map(|e| (e.instance_path().as_str().to_owned(), e.to_string()))
        .collect()
}

#[test]
fn valid_examples_pass_the_schema() {
    let crds = crds::all().unwrap();
    let files = yaml_files(&examples());
    assert!(
        files.len() >= 4,
        "expected fixtures in {}",
        examples().display()
    );
    for path in files {
        let (object, _) = load(&path, "expect");
        let errors = errors(&object, &crds);
        assert!(
            errors.is_empty(),
            "{} rejected: {errors:#?}",
            path.display()
        );
    }
}

#[test]
fn invalid_examples_are_rejected_where_expected() {
    let crds = crds::all().unwrap();
    let files = yaml_files(&examples().join("invalid"));
    assert!(files.len() >= 10);
    for path in files {
        let (object, expect) = load(&path, "expect");
        let expect = expect.unwrap_or_else(|| panic!("{}: no '# expect:' line", path.display()));
        let errors = errors(&object, &crds);
        assert!(
            errors.iter().any(|(at, _)| *at == expect),
            "{}: expected an error at {expect:?}, got {errors:#?}",
            path.display()
        );
    }
}

/// Rust mirrors of the CRDs' CEL rules, keyed by the rule's message. `None` means "holds".
fn cel_mirror(message: &str) -> Option<fn(&Value) -> bool> {
    fn has(v: &Value, field: &str) -> bool {
        v.get(field).is_some()
    }
    Some(match message {
        "set targetRefs or selector, not both" => {
            |spec| !(has(spec, "targetRefs") && has(spec, "selector"))
        }
        "resolution STATIC needs at least one endpoint" => |spec| {
            spec.get("resolution").and_then(Value::as_str) != Some("STATIC")
                || spec
                    .get("endpoints")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty())
        },
        "give jwksUri or jwks, exactly one" => |spec| {
            spec.get("jwtRules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .all(|r| has(r, "jwksUri") != has(r, "jwks"))
        },
        "circuitBreaker is another name for connectionPool: set one of them" => {
            |spec| !(has(spec, "connectionPool") && has(spec, "circuitBreaker"))
        }
        "portLevelMtls keys are port numbers 1-65535" => |spec| {
            spec.get("portLevelMtls")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .all(|(k, _)| {
                    // The CRD's pattern: decimal, no sign or leading zero.
                    !k.starts_with('0') && k.parse::<u16>().is_ok_and(|p| p > 0)
                })
        },
        "portLevelMtls needs a selector" => |spec| {
            let ports = spec
                .get("portLevelMtls")
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty());
            let labels = spec
                .pointer("/selector/matchLabels")
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty());
            !ports || labels
        },
        m if m.starts_with("a Gateway is in group") => |spec| {
            spec.get("targetRefs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .all(|r| {
                    let group = r.get("group").and_then(Value::as_str);
                    match r["kind"].as_str() {
                        Some("Gateway") => group == Some("gateway.networking.k8s.io"),
                        Some("ExternalService") => group == Some("networking.ambit.dev"),
                        _ => group.is_none_or(str::is_empty),
                    }
                })
        },
        _ => return None,
    })
}

/// Every `x-kubernetes-validations` message in a schema.
fn cel_messages(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                out.extend(
                    rules
                        .iter()
                        .filter_map(|r| r["message"].as_str().map(str::to_owned)),
                );
            }
            map.values().for_each(|v| cel_messages(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| cel_messages(v, out)),
        _ => {}
    }
}

#[test]
fn every_cel_rule_has_a_mirror_that_matches_the_fixtures() {
    let crds = crds::all().unwrap();
    let mut messages = Vec::new();
    for crd in &crds {
        cel_messages(&serde_json::to_value(&crd.spec).unwrap(), &mut messages);
    }
    assert_eq!(messages.len(), 8, "{messages:?}");
    for m in &messages {
        assert!(
            cel_mirror(m).is_some(),
            "CEL rule {m:?} has no Rust mirror in this test"
        );
    }
    // Valid fixtures satisfy every rule...
    for path in yaml_files(&examples()) {
        let (object, _) = load(&path, "cel");
        for m in &messages {
            assert!(
                cel_mirror(m).unwrap()(&object["spec"]),
                "{} breaks {m:?}",
                path.display()
            );
        }
    }
    // ...and each CEL fixture passes the JSON schema but breaks exactly the rule it names.
    let files = yaml_files(&examples().join("invalid-cel"));
    assert_eq!(files.len(), 8);
    for path in files {
        let (object, expect) = load(&path, "cel");
        let expect = expect.unwrap();
        assert!(
            messages.contains(&expect),
            "{}: unknown rule {expect:?}",
            path.display()
        );
        assert!(errors(&object, &crds).is_empty(), "{}", path.display());
        for m in &messages {
            let holds = cel_mirror(m).unwrap()(&object["spec"]);
            assert_eq!(holds, *m != expect, "{}: rule {m:?}", path.display());
        }
    }
}

#[test]
fn crds_are_structural_enough() {
    // A structural schema gives every field a type (or says it is int-or-string / preserves
    // unknown fields); the API server refuses a CRD that does not.
    fn check(schema: &Value, path: &str) {
        let Some(map) = schema.as_object() else {
            return;
        };
        let typed = map.contains_key("type")
            || map.contains_key("x-kubernetes-int-or-string")
            || map.contains_key("x-kubernetes-preserve-unknown-fields");
        assert!(typed, "{path}: no type");
        if let Some(Value::Object(props)) = map.get("properties") {
            for (name, s) in props {
                check(s, &format!("{path}.{name}"));
            }
        }
        if let Some(items) = map.get("items") {
            check(items, &format!("{path}[]"));
        }
        if let Some(ap @ Value::Object(_)) = map.get("additionalProperties") {
            check(ap, &format!("{path}{{}}"));
        }
        // Inside anyOf/allOf/oneOf/not, a structural schema may not set a type.
        for key in ["anyOf", "allOf", "oneOf"] {
            for s in map.get(key).and_then(Value::as_array).into_iter().flatten() {
                assert!(
                    s.get("type").is_none(),
                    "{path}.{key}: type inside a junctor"
                );
            }
        }
    }
    for crd in crds::all().unwrap() {
        let name = crd.metadata.name.clone().unwrap();
        let schema = crd.spec.versions[0]
            .schema
            .clone()
            .unwrap()
            .open_api_v3_schema
            .unwrap();
        check(&serde_json::to_value(schema).unwrap(), &name);
    }
}
