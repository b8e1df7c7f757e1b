//! Request routing and the wire format: discovery documents, `XxxList` bodies, `Status` errors,
//! TokenReview, and watches as chunked newline-delimited JSON events. Paths and query parameters
//! are the ones client-go and kube-rs send, so a real client needs no special configuration.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::resource::ResourceType;
use super::response::{json_response, Body};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, State, TokenUser};
use super::{RequestRecord, Shared, Verb};

/// Audiences a token is valid for when neither side names any (the API server's own).
const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Where a request path points.
enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    GroupVersion(String, String),
    TokenReview,
    Resource {
        rt: ResourceType,
        namespace: Option<String>,
        name: Option<String>,
        /// The `/status` subresource of the object.
        status: bool,
    },
}

/// Serves one request; never fails at the HTTP level, errors become `Status` bodies.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let query = parse_query(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let route = route(&shared, &path);
    let verb = verb(&method, &path, &route, &query);
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let fault = shared.record(RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        verb,
        bearer,
    });
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (route, fault) {
        (_, Some(fault)) => Err(fault),
        (_, None) if super::portforward::matches(&segs).is_some() => {
            let (ns, pod) = super::portforward::matches(&segs).unwrap_or_default();
            super::portforward::serve(&shared, req, ns, pod, &query)
        }
        (_, None) if super::logs::matches(&segs).is_some() => {
            let (ns, pod) = super::logs::matches(&segs).unwrap_or_default();
            super::logs::serve(&shared, ns, pod, &query)
        }
        (Ok(route), None) => dispatch(&shared, req, route, verb, &query).await,
        (Err(e), None) => Err(e),
    };
    Ok(result.unwrap_or_else(|e| json_response(status_of(e.code()), &e.status_json())))
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn verb(
    method: &Method,
    path: &str,
    route: &Result<Route, ApiError>,
    query: &[(String, String)],
) -> Verb {
    let Ok(route) = route else {
        // Unserved resources are still logged by what the client tried (a LIST of a CRD that
        // is not installed is what tests look for).
        let segs = path.trim_matches('/').split('/').count();
        let collection = match path.split('/').nth(1) {
            Some("api") => segs == 3 || segs == 5,
            Some("apis") => segs == 4 || segs == 6,
            _ => false,
        };
        return match *method {
            Method::GET if collection && is_watch(query) => Verb::Watch,
            Method::GET if collection => Verb::List,
            _ => Verb::Other,
        };
    };
    match (method, route) {
        (_, Route::TokenReview) => Verb::TokenReview,
        (&Method::GET, Route::Resource { name: None, .. }) if is_watch(query) => Verb::Watch,
        (&Method::GET, Route::Resource { name: None, .. }) => Verb::List,
        (&Method::GET, Route::Resource { .. }) => Verb::Get,
        (&Method::POST, Route::Resource { .. }) => Verb::Create,
        (&Method::PUT, Route::Resource { .. }) => Verb::Update,
        (&Method::PATCH, Route::Resource { .. }) => Verb::Patch,
        (&Method::DELETE, Route::Resource { .. }) => Verb::Delete,
        (&Method::GET, _) => Verb::Discovery,
        _ => Verb::Other,
    }
}

fn is_watch(query: &[(String, String)]) -> bool {
    param(query, "watch").is_some_and(|v| v == "true" || v == "1")
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn route(shared: &Shared, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let unknown = || ApiError::NotFound("the server could not find the requested resource".into());
    let state = shared.lock();
    let (api_version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => return Ok(Route::TokenReview),
        ["apis", group] if state.resources.iter().any(|r| r.group == *group) => {
            return Ok(Route::Group((*group).to_owned()))
        }
        ["apis", group, version, rest @ ..]
            if state
                .resources
                .iter()
                .any(|r| r.group == *group && r.version == *version) =>
        {
            (format!("{group}/{version}"), rest)
        }
        _ => return Err(unknown()),
    };
    let find = |plural: &str| {
        state
            .resource(&api_version, plural)
            .cloned()
            .ok_or_else(unknown)
    };
    let (rest, status) = match rest {
        [head @ .., "status"] if head.len() == 2 || head.len() == 4 => (head, true),
        _ => (rest, false),
    };
    let (rt, namespace, name) = match rest {
        [] => {
            let (group, version) = api_version.split_once('/').unwrap_or(("", "v1"));
            return Ok(Route::GroupVersion(group.to_owned(), version.to_owned()));
        }
        ["namespaces", ns, plural] => (find(plural)?, Some(*ns), None),
        ["namespaces", ns, plural, name] => (find(plural)?, Some(*ns), Some(*name)),
        [plural] => (find(plural)?, None, None),
        [plural, name] => (find(plural)?, None, Some(*name)),
        _ => return Err(unknown()),
    };
    // Namespaced objects are only addressable through their namespace; cluster-scoped
    // resources have no namespaced form.
    if rt.namespaced != namespace.is_some() && (name.is_some() || !rt.namespaced) {
        return Err(unknown());
    }
    Ok(Route::Resource {
        rt,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        status,
    })
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    route: Route,
    verb: Verb,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
    let manager = param(query, "fieldManager").unwrap_or("").to_owned();
    match (route, method) {
        (Route::Version, Method::GET) => Ok(ok(&json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-ambit-fake",
            "platform": "linux/amd64",
        }))),
        (Route::CoreVersions, Method::GET) => Ok(ok(&json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
            ],
        }))),
        (Route::Groups, Method::GET) => Ok(ok(&groups(&shared.lock()))),
        (Route::Group(g), Method::GET) => Ok(ok(&group(&shared.lock(), &g))),
        (Route::GroupVersion(g, v), Method::GET) => Ok(ok(&resource_list(&shared.lock(), &g, &v))),
        (Route::TokenReview, Method::POST) => token_review(shared, &body),
        (
            Route::Resource {
                rt,
                namespace,
                name: Some(name),
                status: true,
            },
            method,
        ) => {
            let ns = namespace.unwrap_or_default();
            // The status subresource: writes change `status` and nothing else.
            let status = match method {
                Method::GET => None,
                Method::PUT => Some(parse_json(&body)?.get("status").cloned()),
                Method::PATCH => {
                    let patch = parse_patch(&content_type, &body)?;
                    let mut merged = shared.lock().get(&rt, &ns, &name).map(|o| (*o).clone());
                    if let Some(m) = merged.as_mut() {
                        super::store::merge(m, &patch);
                    }
                    Some(merged.and_then(|m| m.get("status").cloned()))
                }
                other => {
                    return Err(ApiError::MethodNotAllowed(format!(
                        "{other} is not supported on {}/status",
                        rt.plural
                    )))
                }
            };
            let obj = match status {
                None => shared.lock().get(&rt, &ns, &name),
                Some(status) => {
                    Some(shared.write(|s| s.set_status(&rt, &ns, &name, status, &manager))?)
                }
            };
            Ok(ok(&obj.ok_or_else(|| {
                ApiError::NotFound(format!("{} \"{name}\" not found", rt.plural))
            })?))
        }
        (
            Route::Resource {
                rt,
                namespace,
                name,
                status: _,
            },
            method,
        ) => {
            let ns = namespace.clone().unwrap_or_default();
            match (method, name) {
                (Method::GET, None) if verb == Verb::Watch => {
                    super::watch::serve(shared.clone(), rt, namespace, query).await
                }
                (Method::GET, None) => list(shared, &rt, namespace.as_deref(), query),
                (Method::GET, Some(name)) => {
                    let obj = shared.lock().get(&rt, &ns, &name).ok_or_else(|| {
                        ApiError::NotFound(format!("{} \"{name}\" not found", rt.plural))
                    })?;
                    Ok(ok(&obj))
                }
                (Method::POST, None) => {
                    let obj = parse_json(&body)?;
                    let created = shared.write(|s| s.create(&rt, &ns, obj, &manager))?;
                    Ok(json_response(StatusCode::CREATED, &created))
                }
                (Method::PUT, Some(name)) => {
                    let obj = parse_json(&body)?;
                    Ok(ok(
                        &shared.write(|s| s.replace(&rt, &ns, &name, obj, &manager))?
                    ))
                }
                (Method::PATCH, Some(name)) => {
                    let patch = parse_patch(&content_type, &body)?;
                    let obj = if is_apply(&content_type) {
                        shared.write(|s| s.apply_patch(&rt, &ns, &name, patch, &manager))?
                    } else {
                        shared.write(|s| s.merge_patch(&rt, &ns, &name, &patch, &manager))?
                    };
                    Ok(ok(&obj))
                }
                (Method::DELETE, Some(name)) => {
                    Ok(ok(&shared.write(|s| s.delete(&rt, &ns, &name))?))
                }
                (method, _) => Err(ApiError::MethodNotAllowed(format!(
                    "{method} is not supported on {}",
                    rt.plural
                ))),
            }
        }
        (_, method) => Err(ApiError::MethodNotAllowed(format!(
            "{method} is not supported here"
        ))),
    }
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn is_apply(content_type: &str) -> bool {
    media_type(content_type).starts_with("application/apply-patch")
}

/// Parses a PATCH body: merge and strategic-merge patches (treated alike: they differ only for
/// lists with merge keys) and server-side apply (YAML, which includes JSON).
fn parse_patch(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    match media_type(content_type) {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            parse_json(body)
        }
        "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid YAML: {e}"))),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: \
             application/merge-patch+json, application/strategic-merge-patch+json, \
             application/apply-patch+yaml (got {other})"
        ))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}

/// LIST with selectors and `limit`/`continue` pagination. Continued pages report the first
/// page's resourceVersion (a real server serves them from that snapshot; here they come from
/// current state, which a client following with a watch from that version still converges on).
fn list(
    shared: &Shared,
    rt: &ResourceType,
    namespace: Option<&str>,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let labels = LabelSelector::parse(param(query, "labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(param(query, "fieldSelector").unwrap_or(""))?;
    let limit = match param(query, "limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::BadRequest(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    }
    .filter(|l| *l > 0);
    let state = shared.lock();
    let (list_rv, after) = match param(query, "continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, pos) = parse_continue(token)?;
            if rv < state.floor {
                return Err(ApiError::Expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter."
                        .to_owned(),
                ));
            }
            (rv, Some(pos))
        }
        None => {
            check_list_version(&state, query)?;
            (state.rv, None)
        }
    };
    let matching: Vec<Arc<Value>> = state
        .list(rt, namespace)
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter(|o| after.as_ref().is_none_or(|a| position(o) > *a))
        .collect();
    drop(state);
    let total = matching.len();
    let page: Vec<Arc<Value>> = matching
        .into_iter()
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if page.len() < total {
        if let Some(last) = page.last() {
            let (ns, name) = position(last);
            metadata["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
            metadata["remainingItemCount"] = json!(total - page.len());
        }
    }
    let items: Vec<Value> = page.iter().map(|o| list_item(rt, o)).collect();
    Ok(ok(&json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items,
    })))
}

/// A real server leaves `apiVersion`/`kind` off the items of built-in lists (they are implied by
/// the list), but keeps them for custom resources; clients must cope with both.
fn list_item(rt: &ResourceType, obj: &Value) -> Value {
    let mut obj = obj.clone();
    if !rt.custom {
        if let Some(o) = obj.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
    }
    obj
}

/// `resourceVersionMatch=Exact` from a compacted version is 410, as on a real server. Other
/// versions are served from current state (historical snapshots are not kept).
fn check_list_version(state: &State, query: &[(String, String)]) -> Result<(), ApiError> {
    let exact = param(query, "resourceVersionMatch") == Some("Exact");
    match param(query, "resourceVersion")
        .filter(|v| !v.is_empty())
        .map(str::parse::<u64>)
    {
        Some(Err(_)) => Err(ApiError::BadRequest("invalid resourceVersion".to_owned())),
        Some(Ok(rv)) if exact && rv < state.floor => Err(ApiError::Expired(format!(
            "The resourceVersion for the provided list is too old: {rv} ({})",
            state.floor
        ))),
        _ => Ok(()),
    }
}

fn position(obj: &Value) -> (String, String) {
    let get = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    (get("/metadata/namespace"), get("/metadata/name"))
}

fn parse_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let bad = || ApiError::BadRequest(format!("invalid continue token {token:?}"));
    let mut parts = token.splitn(3, '/');
    let rv = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_owned();
    let name = parts.next().ok_or_else(bad)?.to_owned();
    Ok((rv, (ns, name)))
}

fn groups(state: &State) -> Value {
    let mut names: Vec<&str> = Vec::new();
    for r in &state.resources {
        if !r.group.is_empty() && !names.contains(&r.group.as_str()) {
            names.push(&r.group);
        }
    }
    let groups: Vec<Value> = names.into_iter().map(|g| group(state, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group(state: &State, name: &str) -> Value {
    let mut versions: Vec<Value> = Vec::new();
    for r in state.resources.iter().filter(|r| r.group == name) {
        let v = json!({"groupVersion": r.api_version(), "version": r.version});
        if !versions.contains(&v) {
            versions.push(v);
        }
    }
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": name,
        "versions": versions, "preferredVersion": preferred,
    })
}

fn resource_list(state: &State, group: &str, version: &str) -> Value {
    let resources: Vec<Value> = state
        .resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            let verbs = if r.plural == "tokenreviews" {
                json!(["create"])
            } else {
                json!(["create", "delete", "get", "list", "patch", "update", "watch"])
            };
            json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(),
                "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs,
            })
        })
        .collect();
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// TokenReview: authenticated when the token is registered and shares an audience with the
/// request (both default to the API server's own audience).
fn token_review(shared: &Shared, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let review = parse_json(body)?;
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let wanted: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![DEFAULT_AUDIENCE.to_owned()]);
    let user: Option<TokenUser> = shared.lock().tokens.get(token).cloned();
    let status = match user {
        None => json!({"user": {}, "error": "[invalid bearer token, token not recognised]"}),
        Some(user) => {
            let has = if user.audiences.is_empty() {
                vec![DEFAULT_AUDIENCE.to_owned()]
            } else {
                user.audiences.clone()
            };
            let common: Vec<&String> = wanted.iter().filter(|a| has.contains(a)).collect();
            if common.is_empty() {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, token audiences {has:?} is invalid for the target \
                     audiences {wanted:?}]")})
            } else {
                json!({
                    "authenticated": true,
                    "user": {
                        "username": user.username, "uid": user.uid,
                        "groups": user.groups, "extra": user.extra,
                    },
                    "audiences": common,
                })
            }
        }
    };
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review.get("spec").cloned().unwrap_or(json!({})),
            "status": status,
        }),
    ))
}

fn ok(value: &impl serde::Serialize) -> Response<Body> {
    json_response(StatusCode::OK, value)
}

/// Minimal `application/x-www-form-urlencoded` query parsing.
fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=true&x");
        assert_eq!(param(&q, "labelSelector"), Some("app=web,tier in (a)"));
        assert!(is_watch(&q));
        assert_eq!(param(&q, "x"), Some(""));
        assert_eq!(decode("100%"), "100%");
    }
}
