//! CustomResourceDefinitions take effect: creating one makes the server serve its resource (and
//! marks it `Established`, which installers wait for), deleting one stops serving it after its
//! objects are deleted. Tests can thus install CRDs from `manifests/` through the API, as
//! `kubectl apply` would, instead of only through the Rust handle.

use serde_json::{json, Value};

use super::resource::{now_rfc3339, ResourceType};

/// `apiVersion` of CustomResourceDefinition objects.
pub(crate) const CRD_API_VERSION: &str = "apiextensions.k8s.io/v1";
/// Plural of CustomResourceDefinition objects.
pub(crate) const CRD_PLURAL: &str = "customresourcedefinitions";

/// The resources a CRD object serves: one per served version.
pub(crate) fn served_resources(crd: &Value) -> Vec<ResourceType> {
    let spec = crd.get("spec");
    let text = |pointer: &str| {
        spec.and_then(|s| s.pointer(pointer))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (group, plural, kind) = (text("/group"), text("/names/plural"), text("/names/kind"));
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let namespaced = text("/scope") != "Cluster";
    spec.and_then(|s| s.get("versions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .map(|version| ResourceType::custom(&group, version, &plural, &kind, namespaced))
        .collect()
}

/// Sets the status a real server reports once the CRD's names are accepted and it is served.
pub(crate) fn establish(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let condition = |kind: &str, reason: &str| {
        json!({
            "type": kind, "status": "True", "reason": reason,
            "lastTransitionTime": now_rfc3339(),
        })
    };
    if let Some(o) = crd.as_object_mut() {
        o.insert(
            "status".to_owned(),
            json!({
                "acceptedNames": names,
                "conditions": [
                    condition("NamesAccepted", "NoConflicts"),
                    condition("Established", "InitialNamesAccepted"),
                ],
                "storedVersions": [],
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_versions_become_resources() {
        let crd = json!({
            "spec": {
                "group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [
                    {"name": "v1", "served": true},
                    {"name": "v1beta1", "served": false},
                ],
            },
        });
        let served = served_resources(&crd);
        assert_eq!(
            served,
            vec![ResourceType::custom(
                "example.com",
                "v1",
                "widgets",
                "Widget",
                true
            )]
        );
        assert!(served_resources(&json!({"spec": {}})).is_empty());
    }
}
