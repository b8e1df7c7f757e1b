//! Small builders shared by every object: metadata with Ambit's labels, and the name checks that
//! `InstallOptions::validate` and the waypoint template use.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label every installed object carries, so `kubectl get all -l app.kubernetes.io/part-of=ambit`
/// finds (and `kubectl delete` removes) exactly the install.
pub(crate) const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "ambit");

/// Labels for an object of `component`: the recommended `app.kubernetes.io/*` set.
pub(crate) fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
        (PART_OF.0.to_owned(), PART_OF.1.to_owned()),
        (
            "app.kubernetes.io/version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

/// The labels a workload's selector matches on: only the stable ones (a selector is immutable, so
/// the version label must stay out of it).
pub(crate) fn selector_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
        (PART_OF.0.to_owned(), PART_OF.1.to_owned()),
    ])
}

/// Metadata of a cluster-scoped object.
pub(crate) fn cluster_meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(labels(component)),
        ..ObjectMeta::default()
    }
}

/// Metadata of a namespaced object.
pub(crate) fn namespaced_meta(name: &str, namespace: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_owned()),
        ..cluster_meta(name, component)
    }
}

/// A DNS-1123 label: what Kubernetes requires of namespace and Service names.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_` (SPIFFE-ID spec, section 2.1).
pub(crate) fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// An image registry plus path (`ghcr.io/org`, `localhost:5000/x`, `ambit`): no whitespace, no
/// digest or tag separators that would make `<registry>/<name>:<tag>` ambiguous.
pub(crate) fn is_image_registry(s: &str) -> bool {
    let s = s.trim_end_matches('/');
    !s.is_empty()
        && !s.starts_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b':'))
}

/// An image tag, as the OCI distribution spec defines it.
pub(crate) fn is_image_tag(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_checks() {
        assert!(is_dns1123_label("ambit-system"));
        assert!(!is_dns1123_label("Ambit"));
        assert!(!is_dns1123_label("-x"));
        assert!(!is_dns1123_label("a\nkind: Secret"));
        assert!(is_trust_domain("cluster.local"));
        assert!(!is_trust_domain("Cluster.Local"));
        assert!(!is_trust_domain("td/ns"));
        assert!(is_image_registry("localhost:5000/ambit/"));
        assert!(!is_image_registry("a b"));
        assert!(!is_image_registry("x@sha256"));
        assert!(is_image_tag("0.1.0"));
        assert!(!is_image_tag(".x"));
        assert!(!is_image_tag("a:b"));
    }
}
