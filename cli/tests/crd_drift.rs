//! The hand-written CRD schemas (`ambit_manifests::crds`) and the controller's Rust types
//! (`ambit_controller::crd`) describe the same objects: same fields at the same paths, same JSON
//! types, same required fields, and every example policy reads into the types.
//!
//! The schemas are hand-written because they carry the admission checks (patterns, bounds, CEL)
//! the types do not; this test is what keeps the two from drifting. It compares against the schema
//! kube-rs generates from the types (`CustomResourceExt::crd()`).

// Test helpers panic on unexpected input, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use ambit_controller::crd::{
    AuthorizationPolicy, ExternalService, PeerAuthentication, RequestAuthentication, TrafficPolicy,
};
use kube::CustomResourceExt;
use serde_json::Value;

/// Field aliases the types accept (serde `alias`) that a generated schema cannot show.
const ALIASES: &[&str] = &["spec.circuitBreaker"];

#[derive(Debug, PartialEq)]
struct Field {
    ty: Option<String>,
    required: Vec<String>,
}

/// Every field path (`spec.rules[].from[].source.principals[]`) with its type and required list.
fn fields(schema: &Value, path: &str, out: &mut BTreeMap<String, Field>) {
    // kube-rs may express `Option<T>`/enums through anyOf/oneOf/allOf; look through a lone branch.
    let schema = match schema.get("allOf").and_then(Value::as_array) {
        Some(branches) if branches.len() == 1 && schema.get("type").is_none() => &branches[0],
        _ => schema,
    };
    let mut required: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    required.sort();
    out.insert(
        path.to_owned(),
        Field {
            ty: schema
                .get("type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            required,
        },
    );
    if let Some(Value::Object(props)) = schema.get("properties") {
        for (name, s) in props {
            fields(s, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        fields(items, &format!("{path}[]"), out);
    }
    if let Some(ap @ Value::Object(_)) = schema.get("additionalProperties") {
        fields(ap, &format!("{path}{{}}"), out);
    }
}

fn spec_fields(crd: &Value) -> BTreeMap<String, Field> {
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut out = BTreeMap::new();
    fields(schema, "spec", &mut out);
    out
}

fn compare(kind: &str, generated: Value) {
    let hand = ambit_manifests::crds::all_values()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap();
    assert_eq!(hand["metadata"]["name"], generated["metadata"]["name"]);
    assert_eq!(hand["spec"]["group"], generated["spec"]["group"]);
    assert_eq!(hand["spec"]["scope"], generated["spec"]["scope"]);
    assert_eq!(
        hand["spec"]["names"]["shortNames"],
        generated["spec"]["names"]["shortNames"]
    );

    let (mut hand, generated) = (spec_fields(&hand), spec_fields(&generated));
    hand.retain(|path, _| !ALIASES.iter().any(|a| path.starts_with(a)));
    let only_hand: Vec<_> = hand
        .keys()
        .filter(|k| !generated.contains_key(*k))
        .collect();
    let only_types: Vec<_> = generated
        .keys()
        .filter(|k| !hand.contains_key(*k))
        .collect();
    assert!(
        only_hand.is_empty() && only_types.is_empty(),
        "{kind}: fields only in manifests/src/crds.rs: {only_hand:?}; only in controller/src/crd: {only_types:?}"
    );
    for (path, field) in &hand {
        let theirs = &generated[path];
        if let (Some(a), Some(b)) = (&field.ty, &theirs.ty) {
            assert_eq!(a, b, "{kind} {path}: type");
        }
        assert_eq!(
            field.required, theirs.required,
            "{kind} {path}: required fields"
        );
    }
}

#[test]
fn authorization_policy_schema_matches_the_types() {
    compare(
        "AuthorizationPolicy",
        serde_json::to_value(AuthorizationPolicy::crd()).unwrap(),
    );
}

#[test]
fn peer_authentication_schema_matches_the_types() {
    compare(
        "PeerAuthentication",
        serde_json::to_value(PeerAuthentication::crd()).unwrap(),
    );
}

#[test]
fn request_authentication_schema_matches_the_types() {
    compare(
        "RequestAuthentication",
        serde_json::to_value(RequestAuthentication::crd()).unwrap(),
    );
}

#[test]
fn external_service_schema_matches_the_types() {
    compare(
        "ExternalService",
        serde_json::to_value(ExternalService::crd()).unwrap(),
    );
}

#[test]
fn traffic_policy_schema_matches_the_types() {
    compare(
        "TrafficPolicy",
        serde_json::to_value(TrafficPolicy::crd()).unwrap(),
    );
}

#[test]
fn example_policies_read_into_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut read = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let value: Value = serde_yaml::from_str(&text).unwrap();
        let ok = match value["kind"].as_str() {
            Some("AuthorizationPolicy") => {
                serde_json::from_value::<AuthorizationPolicy>(value).map(drop)
            }
            Some("TrafficPolicy") => serde_json::from_value::<TrafficPolicy>(value).map(drop),
            Some("PeerAuthentication") => {
                serde_json::from_value::<PeerAuthentication>(value).map(drop)
            }
            Some("RequestAuthentication") => {
                serde_json::from_value::<RequestAuthentication>(value).map(drop)
            }
            Some("ExternalService") => serde_json::from_value::<ExternalService>(value)
                .map(|x| {
                    x.spec
                        .check()
                        .map_err(|e| panic!("{}: {e}", path.display()))
                })
                .map(drop),
            other => panic!("{}: unexpected kind {other:?}", path.display()),
        };
        ok.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        read += 1;
    }
    assert!(read >= 4);
}

#[test]
fn the_comparison_sees_every_field() {
    // Guards the walk above: if kube-rs changed how it nests schemas, `fields` could find nothing
    // on both sides and the comparison would pass vacuously.
    let ap = spec_fields(&serde_json::to_value(AuthorizationPolicy::crd()).unwrap());
    assert!(
        ap.contains_key("spec.rules[].from[].source.principals[]"),
        "{:?}",
        ap.keys()
    );
    assert!(ap.contains_key("spec.targetRefs[].kind"));
    let tp = spec_fields(&serde_json::to_value(TrafficPolicy::crd()).unwrap());
    assert!(
        tp.contains_key("spec.faultInjection.abort.httpStatus"),
        "{:?}",
        tp.keys()
    );
    assert!(ap.len() > 30 && tp.len() > 25, "{} {}", ap.len(), tp.len());
}
