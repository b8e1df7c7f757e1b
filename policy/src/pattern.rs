//! Istio's string patterns: `exact`, `prefix*`, `*suffix`, and `*` alone for "any non-empty
//! value".
//!
//! Istio documents one wildcard, at one end of the value. A pattern with a `*` anywhere
//! else (`*x*`, `a*b`, `**`) is refused rather than given a meaning: read as an exact
//! string it would never match, and read as a suffix (`*x*` as "ends with `x*`") or a
//! prefix (`*x*` as "starts with `*x`") it matches something its author did not write.
//! Either way a DENY holding it would let through what its author meant to stop, so the
//! policy is rejected at conversion, where the error can name the field.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A `*` that is not the pattern's only character, its first or its last one (or
    /// several of them).
    #[error(
        "{pattern:?}: a pattern may hold one `*`, at its start (suffix match) or its end \
         (prefix match), or be `*` alone (any value)"
    )]
    Wildcard {
        /// The pattern as written.
        pattern: String,
    },
}

/// One string pattern. Serialised in Istio's spelling (`"/api/*"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StringMatch {
    /// The whole value.
    Exact(Arc<str>),
    /// Starts with.
    Prefix(Arc<str>),
    /// Ends with.
    Suffix(Arc<str>),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses Istio's spelling; see the module documentation for what is refused.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let m = if pattern == "*" {
            StringMatch::Presence
        } else if let Some(rest) = pattern.strip_prefix('*') {
            StringMatch::Suffix(rest.into())
        } else if let Some(rest) = pattern.strip_suffix('*') {
            StringMatch::Prefix(rest.into())
        } else {
            StringMatch::Exact(pattern.into())
        };
        match &m {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s)
                if s.contains('*') =>
            {
                Err(PatternError::Wildcard {
                    pattern: pattern.to_string(),
                })
            }
            _ => Ok(m),
        }
    }

    /// True when `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == &**e,
            StringMatch::Prefix(p) => value.starts_with(&**p),
            StringMatch::Suffix(s) => value.ends_with(&**s),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// Matches a principal in Istio's form (`cluster.local/ns/a/sa/b`, no scheme). A
    /// pattern written with `spiffe://` is read without it: it would otherwise never
    /// match, which fails closed in an ALLOW but open in a DENY.
    pub fn matches_principal(&self, principal: &str) -> bool {
        fn bare(s: &str) -> &str {
            s.strip_prefix("spiffe://").unwrap_or(s)
        }
        match self {
            StringMatch::Exact(e) => principal == bare(e),
            StringMatch::Prefix(p) => principal.starts_with(bare(p)),
            other => other.matches(principal),
        }
    }
}

impl TryFrom<String> for StringMatch {
    type Error = PatternError;
    fn try_from(s: String) -> Result<Self, PatternError> {
        StringMatch::parse(&s)
    }
}

impl From<StringMatch> for String {
    fn from(m: StringMatch) -> String {
        m.to_string()
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(e) => write!(f, "{e}"),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => write!(f, "*"),
        }
    }
}
