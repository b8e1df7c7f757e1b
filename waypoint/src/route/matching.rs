//! Route matching with Gateway API precedence: among every rule match that accepts the
//! request, the winner has an Exact path, then a regular expression (Gateway API leaves its
//! rank to implementations; above prefixes so a catch-all `/` cannot shadow it), then a prefix
//! (longer first), then a method condition, then more header conditions, then more query
//! conditions; remaining ties go to the earlier route (routes are ordered by
//! `namespace/name`) and the earlier rule.

use regex::Regex;

use crate::route::spec::{GrpcRouteMatch, HttpRouteMatch, RouteError, ValueMatch};

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathCond {
    Exact(String),
    /// Segment-wise prefix, stored without a trailing slash (except `/`).
    Prefix(String),
    Regex(Regex),
}

/// A value condition (header or query parameter).
#[derive(Debug, Clone)]
pub enum ValueCond {
    Exact(String),
    Regex(Regex),
}

impl ValueCond {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueCond::Exact(e) => e == v,
            ValueCond::Regex(r) => r.is_match(v),
        }
    }
}

/// Sort key of a match: path kind rank, path length, has method, header and query counts.
pub type Precedence = (u8, usize, bool, usize, usize);

/// One compiled match; all its parts must hold.
#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathCond,
    pub method: Option<String>,
    /// Lower-case header names.
    pub headers: Vec<(String, ValueCond)>,
    pub query: Vec<(String, ValueCond)>,
}

/// The condition of a [`Match`] a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Path,
    Method,
    /// This header (lower-case name).
    Header(String),
    /// This query parameter.
    Query(String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Path => f.write_str("path"),
            Mismatch::Method => f.write_str("method"),
            Mismatch::Header(h) => write!(f, "header {h}"),
            Mismatch::Query(q) => write!(f, "query parameter {q}"),
        }
    }
}

/// What matching looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

impl Match {
    /// Everything (a rule without matches).
    pub fn any() -> Self {
        Match {
            path: PathCond::Prefix("/".into()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    /// True when the request satisfies every condition.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        self.mismatch(r).is_none()
    }

    /// The first condition the request does not satisfy, in the order path, method,
    /// headers, query parameters; `None` when it satisfies them all ([`Match::matches`]).
    pub fn mismatch(&self, r: &RequestView<'_>) -> Option<Mismatch> {
        let path_ok = match &self.path {
            PathCond::Exact(p) => r.path == p,
            PathCond::Prefix(p) => prefix_matches(p, r.path),
            PathCond::Regex(re) => re.is_match(r.path),
        };
        if !path_ok {
            return Some(Mismatch::Path);
        }
        if self.method.as_deref().is_some_and(|m| m != r.method) {
            return Some(Mismatch::Method);
        }
        let header = self.headers.iter().find(|(name, cond)| {
            !r.headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| cond.matches(v))
        });
        if let Some((name, _)) = header {
            return Some(Mismatch::Header(name.clone()));
        }
        let query = self.query.iter().find(|(name, cond)| {
            !r.query
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                // Gateway API: the first value of a repeated parameter counts.
                .find(|(k, _)| k == name)
                .is_some_and(|(_, v)| cond.matches(v))
        });
        query.map(|(name, _)| Mismatch::Query(name.clone()))
    }

    /// Precedence, larger first.
    pub fn precedence(&self) -> Precedence {
        let (rank, len) = match &self.path {
            PathCond::Exact(p) => (3, p.len()),
            PathCond::Regex(_) => (2, 0),
            PathCond::Prefix(p) => (1, p.len()),
        };
        (
            rank,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn regex(route: &str, pattern: &str) -> Result<Regex, RouteError> {
    // Gateway API regular expressions match the whole value.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|source| RouteError::Regex {
        route: route.to_string(),
        pattern: pattern.to_string(),
        source,
    })
}

fn value_conds(
    route: &str,
    list: &[ValueMatch],
    lower: bool,
) -> Result<Vec<(String, ValueCond)>, RouteError> {
    list.iter()
        .map(|v| {
            let name = if lower {
                v.name.to_ascii_lowercase()
            } else {
                v.name.clone()
            };
            let cond = match v.type_.as_deref() {
                Some("RegularExpression") => ValueCond::Regex(regex(route, &v.value)?),
                _ => ValueCond::Exact(v.value.clone()),
            };
            Ok((name, cond))
        })
        .collect()
}

/// Compiles HTTPRoute matches (an empty list matches everything).
pub fn compile_http(route: &str, matches: &[HttpRouteMatch]) -> Result<Vec<Match>, RouteError> {
    if matches.is_empty() {
        return Ok(vec![Match::any()]);
    }
    matches
        .iter()
        .map(|m| {
            let path = match &m.path {
                None => PathCond::Prefix("/".into()),
                Some(p) => match p.type_.as_str() {
                    "Exact" => PathCond::Exact(p.value.clone()),
                    "RegularExpression" => PathCond::Regex(regex(route, &p.value)?),
                    _ => {
                        let trimmed = p.value.trim_end_matches('/');
                        PathCond::Prefix(if trimmed.is_empty() {
                            "/".into()
                        } else {
                            trimmed.to_string()
                        })
                    }
                },
            };
            Ok(Match {
                path,
                method: m.method.clone(),
                headers: value_conds(route, &m.headers, true)?,
                query: value_conds(route, &m.query_params, false)?,
            })
        })
        .collect()
}

/// Compiles GRPCRoute matches into path conditions on `/<service>/<method>`.
pub fn compile_grpc(route: &str, matches: &[GrpcRouteMatch]) -> Result<Vec<Match>, RouteError> {
    if matches.is_empty() {
        return Ok(vec![Match::any()]);
    }
    matches
        .iter()
        .map(|m| {
            let path = match &m.method {
                None => PathCond::Prefix("/".into()),
                Some(gm) => {
                    let is_regex = gm.type_.as_deref() == Some("RegularExpression");
                    match (gm.service.as_deref(), gm.method.as_deref(), is_regex) {
                        (Some(s), Some(me), false) => PathCond::Exact(format!("/{s}/{me}")),
                        (Some(s), None, false) => PathCond::Prefix(format!("/{s}")),
                        (None, Some(me), false) => {
                            PathCond::Regex(regex(route, &format!("/[^/]+/{}", regex::escape(me)))?)
                        }
                        (s, me, _) => PathCond::Regex(regex(
                            route,
                            &format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
                        )?),
                    }
                }
            };
            Ok(Match {
                path,
                method: None,
                headers: value_conds(route, &m.headers, true)?,
                query: Vec::new(),
            })
        })
        .collect()
}

/// Something matched as a whole: a compiled rule, whose match alternatives each accept a
/// request on their own.
pub trait Alternatives {
    /// The alternatives; the rule applies when any one holds.
    fn alternatives(&self) -> &[Match];
}

impl Alternatives for Vec<Match> {
    fn alternatives(&self) -> &[Match] {
        self
    }
}

impl<T: Alternatives> Alternatives for std::sync::Arc<T> {
    fn alternatives(&self) -> &[Match] {
        (**self).alternatives()
    }
}

/// For each rule and each of its alternatives, the condition the request failed (`None`: it
/// matched): what `ambitctl explain` shows next to [`select`]'s choice, from the same
/// [`Match::mismatch`] that `select` decides with.
pub fn mismatches<R: Alternatives>(
    rules: &[R],
    req: &RequestView<'_>,
) -> Vec<Vec<Option<Mismatch>>> {
    rules
        .iter()
        .map(|rule| {
            rule.alternatives()
                .iter()
                .map(|m| m.mismatch(req))
                .collect()
        })
        .collect()
}

/// The winning rule for a request, by Gateway API precedence; `None` when no rule matches.
pub fn select<'a, R: Alternatives>(rules: &'a [R], req: &RequestView<'_>) -> Option<&'a R> {
    let mut best: Option<(&R, Precedence)> = None;
    for rule in rules {
        for m in rule.alternatives() {
            if !m.matches(req) {
                continue;
            }
            let p = m.precedence();
            if best.as_ref().is_none_or(|(_, bp)| p > *bp) {
                best = Some((rule, p));
            }
        }
    }
    best.map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::spec::{GrpcRouteSpec, HttpRouteSpec};

    /// Each rule's compiled matches.
    fn rules(spec: serde_json::Value) -> Vec<Vec<Match>> {
        let spec: HttpRouteSpec = serde_json::from_value(spec).expect("spec");
        spec.rules
            .iter()
            .map(|r| compile_http("demo/r", &r.matches).expect("compile"))
            .collect()
    }

    fn pick(
        rules: &[Vec<Match>],
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<usize> {
        let uri: http::Uri = uri.parse().expect("uri");
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        let view = RequestView {
            method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        let chosen = select(rules, &view)?;
        rules.iter().position(|r| std::ptr::eq(r, chosen))
    }

    #[test]
    fn mismatches_name_the_first_condition_failed() {
        let r = rules(serde_json::json!({"rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST"}]},
            {"matches": [
                {"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-Canary", "value": "1"}]},
                {"path": {"type": "PathPrefix", "value": "/q"}, "queryParams": [{"name": "v", "value": "2"}]},
            ]},
        ]}));
        let h = http::HeaderMap::new();
        let view = |path, query| RequestView {
            method: "GET",
            path,
            query,
            headers: &h,
        };
        assert_eq!(
            mismatches(&r, &view("/api/x", None)),
            [
                vec![Some(Mismatch::Method)],
                vec![
                    Some(Mismatch::Header("x-canary".into())),
                    Some(Mismatch::Path)
                ]
            ]
        );
        assert_eq!(
            mismatches(&r, &view("/q", Some("v=2")))[1],
            [Some(Mismatch::Path), None]
        );
        // `select` agrees: a rule is chosen exactly when one of its alternatives has no mismatch.
        assert_eq!(pick(&r, "GET", "/q?v=2", &[]), Some(1));
        assert_eq!(pick(&r, "GET", "/api/x", &[]), None);
    }

    #[test]
    fn precedence() {
        let r = rules(serde_json::json!({"rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/api/login"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "POST"}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-Canary", "value": "1"}]}]},
            {"matches": [{"path": {"type": "RegularExpression", "value": "/img/.*\\.png"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/q"}, "queryParams": [{"name": "v", "value": "2"}]}]},
        ]}));
        let cases = [
            ("GET", "/", vec![], Some(0)),
            ("GET", "/apix", vec![], Some(0)),
            ("GET", "/api", vec![], Some(1)),
            ("GET", "/api/users", vec![], Some(1)),
            ("GET", "/api/login", vec![], Some(2)),
            ("POST", "/api/login", vec![], Some(2)),
            ("POST", "/api/users", vec![("x-canary", "1")], Some(3)),
            ("GET", "/api/users", vec![("x-canary", "1")], Some(4)),
            ("GET", "/img/a.png", vec![], Some(5)),
            ("GET", "/img/a.jpg", vec![], Some(0)),
            ("GET", "/q?v=2", vec![], Some(6)),
            ("GET", "/q?v=1", vec![], Some(0)),
        ];
        for (method, uri, headers, want) in cases {
            assert_eq!(
                pick(&r, method, uri, &headers),
                want,
                "{method} {uri} {headers:?}"
            );
        }
    }

    #[test]
    fn no_match_is_none() {
        let r = rules(serde_json::json!({"rules": [
            {"matches": [{"path": {"type": "Exact", "value": "/only"}}]},
        ]}));
        assert_eq!(pick(&r, "GET", "/other", &[]), None);
    }

    #[test]
    fn grpc_methods() {
        let spec: GrpcRouteSpec = serde_json::from_value(serde_json::json!({"rules": [
            {"matches": [{"method": {"service": "pkg.Svc", "method": "Get"}}]},
            {"matches": [{"method": {"service": "pkg.Svc"}}]},
        ]}))
        .expect("spec");
        let r: Vec<Vec<Match>> = spec
            .rules
            .iter()
            .map(|r| compile_grpc("demo/g", &r.matches).expect("compile"))
            .collect();
        assert_eq!(pick(&r, "POST", "/pkg.Svc/Get", &[]), Some(0));
        assert_eq!(pick(&r, "POST", "/pkg.Svc/List", &[]), Some(1));
        assert_eq!(pick(&r, "POST", "/other.Svc/Get", &[]), None);
    }
}
