//! SPIFFE workload identities as Ambit uses them.
//!
//! Every workload certificate carries exactly one URI SAN of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. Parsing is strict:
//! identities end up in authorization decisions, so anything ambiguous is refused rather
//! than normalised.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Trust domain used when none is configured, as in Kubernetes meshes (defined with the
/// contract, in `ambit-proto`).
pub use ambit_proto::DEFAULT_TRUST_DOMAIN;

/// Why a string is not an Ambit SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    /// A component is empty, too long or has characters Kubernetes names never have.
    #[error("identity {uri:?}: {part} {value:?} is not a valid name ({why})")]
    Component {
        uri: String,
        part: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A workload's SPIFFE identity. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

impl Identity {
    /// Builds an identity from its parts, checking each as [`FromStr`] would.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let uri = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_trust_domain(&uri, trust_domain)?;
        check_name(&uri, "namespace", namespace)?;
        check_name(&uri, "service account", service_account)?;
        Ok(Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        check_trust_domain(s, td)?;
        check_name(s, "namespace", ns)?;
        check_name(s, "service account", sa)?;
        Ok(Identity {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks that `trust_domain` could appear in an identity (as [`Identity::new`] would).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    check_trust_domain(&format!("spiffe://{trust_domain}"), trust_domain)
}

/// A trust domain is a DNS-like name: lowercase letters, digits, '.', '-' and '_'
/// (SPIFFE ID spec), at most 255 bytes.
fn check_trust_domain(uri: &str, td: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::Component {
        uri: uri.to_string(),
        part: "trust domain",
        value: td.to_string(),
        why,
    };
    if td.is_empty() {
        return Err(bad("empty"));
    }
    if td.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(bad(
            "only lowercase letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Namespaces and service accounts are Kubernetes names: DNS-1123 subdomains, which are
/// a superset of what both allow (lowercase alphanumerics, '-' and '.', at most 253,
/// starting and ending alphanumeric).
fn check_name(uri: &str, part: &'static str, value: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::Component {
        uri: uri.to_string(),
        part,
        value: value.to_string(),
        why,
    };
    if value.is_empty() {
        return Err(bad("empty"));
    }
    if value.len() > 253 {
        return Err(bad("longer than 253 bytes"));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !value.bytes().all(|b| alnum(b) || b == b'-' || b == b'.') {
        return Err(bad(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    let bytes = value.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id: Identity = s.parse().expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), s);
        assert_eq!(
            Identity::new("cluster.local", "default", "bookinfo-productpage"),
            Ok(id)
        );
    }

    #[test]
    fn refuses_malformed() {
        let cases: &[(&str, &str)] = &[
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe://cluster.local/ns/a/sa", "is not of the form"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "is not of the form",
            ),
            ("spiffe://cluster.local/sa/b/ns/a", "is not of the form"),
            ("spiffe:///ns/a/sa/b", "trust domain \"\""),
            ("spiffe://Cluster.Local/ns/a/sa/b", "only lowercase"),
            ("spiffe://cluster.local/ns//sa/b", "namespace \"\""),
            ("spiffe://cluster.local/ns/a/sa/B", "only lowercase"),
            ("spiffe://cluster.local/ns/-a/sa/b", "must start and end"),
            ("spiffe://cluster.local/ns/a/sa/b%2f", "only lowercase"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "only lowercase"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "only lowercase"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "only lowercase"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().expect_err(input).to_string();
            assert!(err.contains(want), "{input}: {err} lacks {want:?}");
        }
    }
}
