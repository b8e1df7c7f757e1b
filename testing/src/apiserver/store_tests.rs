//! Unit tests of the fake API server's state: revision counting, preconditions, history
//! bounds and cascading deletes.

use super::*;

fn state() -> State {
    let mut s = State::new(
        vec![
            ResourceType::new("", "v1", "namespaces", "Namespace", false),
            ResourceType::new("", "v1", "pods", "Pod", true),
        ],
        3,
    );
    s.upsert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
        .expect("namespace");
    s
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "a"}})
}

#[test]
fn writes_bump_one_revision_and_stamp_objects() {
    let mut s = state();
    let before = s.rv;
    let p = s.upsert(pod("p1")).expect("create");
    assert_eq!(s.rv, before + 1);
    assert_eq!(
        p["metadata"]["resourceVersion"],
        json!((before + 1).to_string())
    );
    assert_eq!(
        p["metadata"]["managedFields"][0]["manager"],
        json!("ambit-test")
    );
    let uid = p["metadata"]["uid"].clone();
    let p = s.upsert(pod("p1")).expect("replace");
    assert_eq!(p["metadata"]["uid"], uid, "uid survives updates");
    assert_eq!(s.history.back().map(|c| c.kind), Some(ChangeType::Modified));
}

#[test]
fn creating_in_a_missing_namespace_is_not_found() {
    let mut s = state();
    let mut p = pod("p1");
    p["metadata"]["namespace"] = json!("nope");
    assert_eq!(s.upsert(p).map_err(|e| e.code()).err(), Some(404));
}

#[test]
fn stale_resource_version_conflicts() {
    let mut s = state();
    let rt = s.resource("v1", "pods").cloned().expect("pods");
    s.upsert(pod("p1")).expect("create");
    let mut stale = pod("p1");
    stale["metadata"]["resourceVersion"] = json!("1");
    let err = s.replace(&rt, "a", "p1", stale, "m").expect_err("conflict");
    assert_eq!(err.code(), 409);
}

#[test]
fn bounded_history_raises_the_floor() {
    let mut s = state();
    for i in 0..5 {
        s.upsert(pod(&format!("p{i}"))).expect("create");
    }
    assert_eq!(s.history.len(), 3);
    assert_eq!(s.floor, s.rv - 3);
    s.compact();
    assert!(s.history.is_empty());
    assert_eq!(s.floor, s.rv);
}

#[test]
fn deleting_a_namespace_deletes_its_objects() {
    let mut s = state();
    let ns = s.resource("v1", "namespaces").cloned().expect("namespaces");
    let pods = s.resource("v1", "pods").cloned().expect("pods");
    s.upsert(pod("p1")).expect("create");
    s.delete(&ns, "", "a").expect("delete");
    assert!(s.list(&pods, None).is_empty());
    let kinds: Vec<_> = s.history.iter().rev().take(2).map(|c| c.kind).collect();
    assert_eq!(kinds, vec![ChangeType::Deleted, ChangeType::Deleted]);
}

#[test]
fn merge_patch_removes_nulls() {
    let mut v = json!({"a": {"b": 1, "c": 2}});
    merge(&mut v, &json!({"a": {"b": null, "d": 3}}));
    assert_eq!(v, json!({"a": {"c": 2, "d": 3}}));
}
