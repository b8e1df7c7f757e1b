//! What the fake API server serves and how it stamps time: the resource types of its discovery
//! documents, shared by the store, the CRD handling and the HTTP layer.

/// A resource the server serves: one entry of an APIResourceList.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, empty for the core group.
    pub group: String,
    /// API version inside the group.
    pub version: String,
    /// Plural name used in URLs (`pods`).
    pub plural: String,
    /// Kind of one object (`Pod`).
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether this is a custom resource (its list items carry `apiVersion`/`kind`).
    pub custom: bool,
}

impl ResourceType {
    /// Describes a resource.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
            custom: false,
        }
    }

    /// Describes a custom resource (one a CRD installs).
    pub fn custom(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            custom: true,
            ..Self::new(group, version, plural, kind, namespaced)
        }
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Now, formatted as Kubernetes timestamps are (`2024-01-02T03:04:05Z`).
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}
