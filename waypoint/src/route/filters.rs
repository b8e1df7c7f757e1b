//! Route filters as pure functions on request and response heads: header modifiers,
//! redirect (a response decided without any upstream), URL rewrite, and which mirrors apply.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, Uri};

use crate::route::matching::PathCond;
use crate::route::spec::{Filter, HeaderModifier, MirrorSpec, PathModifier};

/// Applies set/add/remove; invalid names or values are skipped (the controller validated
/// them; a bad one must not fail the request).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for nv in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(nv.name.as_bytes()),
            HeaderValue::from_str(&nv.value),
        ) {
            headers.insert(n, v);
        }
    }
    for nv in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(nv.name.as_bytes()),
            HeaderValue::from_str(&nv.value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// Request-side effects of `filters` on `headers`.
pub fn apply_request_headers<'a>(
    filters: impl IntoIterator<Item = &'a Filter>,
    headers: &mut HeaderMap,
) {
    for f in filters {
        if let Some(m) = &f.request_header_modifier {
            modify_headers(headers, m);
        }
    }
}

/// Response-side effects of `filters`.
pub fn apply_response_headers<'a>(
    filters: impl IntoIterator<Item = &'a Filter>,
    headers: &mut HeaderMap,
) {
    for f in filters {
        if let Some(m) = &f.response_header_modifier {
            modify_headers(headers, m);
        }
    }
}

/// Mirrors configured by `filters`.
pub fn mirrors<'a>(
    filters: impl IntoIterator<Item = &'a Filter>,
) -> impl Iterator<Item = &'a MirrorSpec> {
    filters
        .into_iter()
        .filter_map(|f| f.request_mirror.as_ref())
}

fn new_path(path: &str, modifier: &PathModifier, matched: Option<&PathCond>) -> String {
    if let Some(full) = &modifier.replace_full_path {
        return full.clone();
    }
    if let (Some(replacement), Some(PathCond::Prefix(prefix))) =
        (&modifier.replace_prefix_match, matched)
    {
        let rest = if prefix == "/" {
            path.trim_start_matches('/')
        } else {
            path.strip_prefix(prefix.as_str())
                .unwrap_or(path)
                .trim_start_matches('/')
        };
        let base = replacement.trim_end_matches('/');
        return match (base.is_empty(), rest.is_empty()) {
            (true, true) => "/".into(),
            (true, false) => format!("/{rest}"),
            (false, true) => base.to_string(),
            (false, false) => format!("{base}/{rest}"),
        };
    }
    path.to_string()
}

/// The redirect response head (status, `location`) if a filter asks for one.
pub fn redirect(
    filters: &[Filter],
    uri: &Uri,
    host: &str,
    matched: Option<&PathCond>,
) -> Option<(StatusCode, String)> {
    let spec = filters.iter().find_map(|f| f.request_redirect.as_ref())?;
    let scheme = spec.scheme.clone().unwrap_or_else(|| "http".into());
    let host_only = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let hostname = spec
        .hostname
        .clone()
        .unwrap_or_else(|| host_only.to_string());
    let path = match &spec.path {
        Some(m) => new_path(uri.path(), m, matched),
        None => uri.path().to_string(),
    };
    let port = match (spec.port, scheme.as_str()) {
        (Some(80), "http") | (Some(443), "https") | (None, _) => String::new(),
        (Some(p), _) => format!(":{p}"),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let status = StatusCode::from_u16(spec.status_code.unwrap_or(302)).unwrap_or(StatusCode::FOUND);
    Some((status, format!("{scheme}://{hostname}{port}{path}{query}")))
}

/// The rewritten path-and-query and host, if a URLRewrite filter applies.
pub fn rewrite(
    filters: &[Filter],
    uri: &Uri,
    matched: Option<&PathCond>,
) -> (Option<String>, Option<String>) {
    let Some(spec) = filters.iter().find_map(|f| f.url_rewrite.as_ref()) else {
        return (None, None);
    };
    let path = spec.path.as_ref().map(|m| {
        let p = new_path(uri.path(), m, matched);
        match uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        }
    });
    (path, spec.hostname.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::spec::{NameValue, RedirectSpec, RewriteSpec};

    #[test]
    fn headers_set_add_remove() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        h.insert("gone", HeaderValue::from_static("x"));
        modify_headers(
            &mut h,
            &HeaderModifier {
                set: vec![NameValue {
                    name: "a".into(),
                    value: "2".into(),
                }],
                add: vec![NameValue {
                    name: "b".into(),
                    value: "3".into(),
                }],
                remove: vec!["gone".into()],
            },
        );
        assert_eq!(h.get("a").map(|v| v.as_bytes()), Some(&b"2"[..]));
        assert_eq!(h.get("b").map(|v| v.as_bytes()), Some(&b"3"[..]));
        assert!(h.get("gone").is_none());
    }

    #[test]
    fn prefix_rewrite_and_redirect() {
        let prefix = PathCond::Prefix("/old".into());
        let cases = [
            ("/old", "/new", "/new"),
            ("/old/a/b?x=1", "/new", "/new/a/b?x=1"),
            ("/old/a", "/", "/a"),
        ];
        for (path, replacement, want) in cases {
            let f = Filter {
                type_: "URLRewrite".into(),
                url_rewrite: Some(RewriteSpec {
                    hostname: Some("other".into()),
                    path: Some(PathModifier {
                        type_: "ReplacePrefixMatch".into(),
                        replace_full_path: None,
                        replace_prefix_match: Some(replacement.into()),
                    }),
                }),
                ..Filter::default()
            };
            let uri: Uri = path.parse().expect("uri");
            let (p, h) = rewrite(std::slice::from_ref(&f), &uri, Some(&prefix));
            assert_eq!(p.as_deref(), Some(want), "{path}");
            assert_eq!(h.as_deref(), Some("other"));
        }
        let f = Filter {
            type_: "RequestRedirect".into(),
            request_redirect: Some(RedirectSpec {
                scheme: Some("https".into()),
                status_code: Some(301),
                ..RedirectSpec::default()
            }),
            ..Filter::default()
        };
        let uri: Uri = "/a?b=c".parse().expect("uri");
        let (status, location) = redirect(&[f], &uri, "web:80", None).expect("redirect");
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(location, "https://web/a?b=c");
    }
}
