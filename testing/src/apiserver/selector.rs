//! Label and field selectors as the API server parses them (`labelSelector=app=web,tier!=db`,
//! `fieldSelector=metadata.name=x`), so LIST and WATCH filter the way a real cluster does.
//!
//! Only the selector grammar is modelled, not every field a real server indexes: field selectors
//! accept `metadata.name` and `metadata.namespace`, which is what clients use generically.

use serde_json::Value;

use super::store::ApiError;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    /// `key=value` or `key==value`.
    Eq(String, String),
    /// `key!=value` (also true when the key is absent, as in Kubernetes).
    Ne(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent).
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    NotExists(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses the `labelSelector` query parameter.
    pub(crate) fn parse(raw: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(raw) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_term(term)?);
        }
        Ok(Self(reqs))
    }

    /// Whether the object's `metadata.labels` satisfy the selector.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside `( )`, since set values are comma-separated too.
fn split_terms(raw: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in raw.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&raw[start..]);
    out
}

fn parse_term(term: &str) -> Result<LabelReq, ApiError> {
    let bad = || ApiError::BadRequest(format!("unable to parse requirement: {term:?}"));
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(valid_key(key.trim()).ok_or_else(bad)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelReq::Ne(
            valid_key(k.trim()).ok_or_else(bad)?,
            v.trim().to_owned(),
        ));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelReq::Eq(
            valid_key(k.trim()).ok_or_else(bad)?,
            v.trim().to_owned(),
        ));
    }
    if let Some(open) = term.find('(') {
        let (head, rest) = term.split_at(open);
        let values = rest
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect();
        let mut words = head.split_whitespace();
        let key = words.next().and_then(valid_key).ok_or_else(bad)?;
        return match (words.next(), words.next()) {
            (Some("in"), None) => Ok(LabelReq::In(key, values)),
            (Some("notin"), None) => Ok(LabelReq::NotIn(key, values)),
            _ => Err(bad()),
        };
    }
    Ok(LabelReq::Exists(valid_key(term).ok_or_else(bad)?))
}

fn valid_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_owned())
}

/// A parsed field selector over the generic metadata fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter; unsupported fields are a 400, as on a real
    /// server for fields a resource does not index.
    pub(crate) fn parse(raw: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector: {term:?}"
                )));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "field label not supported: {other}"
                    )))
                }
            };
            reqs.push((pointer.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(reqs))
    }

    /// Whether the object satisfies every field requirement.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_grammar() {
        let obj = pod(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("missing notin (a)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("", true),
        ];
        for (raw, want) in cases {
            let sel = LabelSelector::parse(raw).expect(raw);
            assert_eq!(sel.matches(&obj), want, "{raw}");
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selector_metadata_only() {
        let obj = pod(json!({}));
        assert!(FieldSelector::parse("metadata.name=p")
            .expect("parse")
            .matches(&obj));
        assert!(!FieldSelector::parse("metadata.namespace!=ns")
            .expect("parse")
            .matches(&obj));
        assert!(FieldSelector::parse("spec.nodeName=n1").is_err());
    }
}
