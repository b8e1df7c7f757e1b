//! Conversion of `RequestAuthentication` to its wire form for waypoints, with every field
//! checked here ([`check_spec`]) so a mistake is reported against the object and field that
//! hold it, by the local source before the object is taken (file, document, field) and by
//! the model for the Kubernetes source, rather than a waypoint NACKing a whole push. The
//! inline key set is parsed with the same parser the waypoint uses.

use ambit_proto::discovery::RequestAuthentication as WireRequestAuthentication;

use super::{typed, FieldError, Kind, ModelConfig, ModelError, Store};
use crate::crd::request_authn::RequestAuthenticationSpec;

type FieldResult<T> = Result<T, (String, FieldError)>;

fn invalid<T>(field: String, why: impl Into<String>) -> FieldResult<T> {
    Err((field, FieldError::Invalid(why.into())))
}

/// Checks every field that does not depend on other objects.
pub fn check_spec(spec: &RequestAuthenticationSpec) -> FieldResult<()> {
    if spec.target_refs.is_empty() {
        let field = if spec.selector.is_some() {
            "spec.selector"
        } else {
            "spec.targetRefs"
        };
        return invalid(
            field.into(),
            "tokens are validated by waypoints: bind the RequestAuthentication with \
             targetRefs to a waypoint Gateway or a Service",
        );
    }
    if spec.selector.is_some() {
        return invalid("spec.selector".into(), "cannot be combined with targetRefs");
    }
    let mut gateways = 0;
    let mut services = 0;
    for (i, t) in spec.target_refs.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        match (t.group.as_str(), t.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => gateways += 1,
            ("" | "core", "Service") => services += 1,
            (g, k) => {
                return invalid(
                    field,
                    format!("cannot target {k} in group {g:?}; only Gateway and Service"),
                )
            }
        }
        if gateways > 1 || services > 1 {
            return invalid(field, "only one target of each kind is supported");
        }
        if t.name.is_empty() {
            return invalid(format!("{field}.name"), "must not be empty");
        }
    }
    if spec.jwt_rules.is_empty() {
        return invalid("spec.jwtRules".into(), "must list at least one rule");
    }
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let at = |f: &str| format!("spec.jwtRules[{i}].{f}");
        if r.issuer.is_empty() {
            return invalid(at("issuer"), "must not be empty");
        }
        match (r.jwks.as_deref(), r.jwks_uri.as_deref()) {
            (Some(jwks), None) => {
                if let Err(e) = serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(jwks) {
                    return invalid(at("jwks"), format!("not a JSON Web Key Set: {e}"));
                }
            }
            (None, Some(uri)) => {
                check_uri(uri).or_else(|why| invalid(at("jwksUri"), format!("{uri:?}: {why}")))?
            }
            (Some(_), Some(_)) => return invalid(at("jwks"), "give jwks or jwksUri, not both"),
            (None, None) => return invalid(at("jwksUri"), "give jwksUri or jwks"),
        }
        for (j, h) in r.from_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                return invalid(
                    at(&format!("fromHeaders[{j}].name")),
                    format!("{:?} is not a header name", h.name),
                );
            }
        }
        for (j, p) in r.from_params.iter().enumerate() {
            if p.is_empty() {
                return invalid(at(&format!("fromParams[{j}]")), "must not be empty");
            }
        }
        if let Some(h) = &r.output_payload_to_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return invalid(
                    at("outputPayloadToHeader"),
                    format!("{h:?} is not a header name"),
                );
            }
        }
    }
    Ok(())
}

/// A key-set URL: absolute http or https, with a host.
fn check_uri(uri: &str) -> Result<(), &'static str> {
    let u: http::Uri = uri.parse().map_err(|_| "not a URL")?;
    if !matches!(u.scheme_str(), Some("http" | "https")) {
        return Err("the scheme must be http or https");
    }
    if u.host().is_none_or(str::is_empty) {
        return Err("no host");
    }
    Ok(())
}

/// Converts every RequestAuthentication; invalid ones are reported and left out.
pub(super) fn request_authentications(
    store: &Store,
    config: &ModelConfig,
    errors: &mut Vec<ModelError>,
) -> Vec<WireRequestAuthentication> {
    let mut out = Vec::new();
    for ra in typed!(store, RequestAuthentication) {
        let Some(name) = ra.metadata.name.clone() else {
            continue;
        };
        let namespace = ra
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
        let spec_json = check_spec(&ra.spec).and_then(|()| {
            serde_json::to_string(&serde_json::json!({ "jwtRules": ra.spec.jwt_rules }))
                .map_err(|e| ("spec".into(), FieldError::Invalid(e.to_string())))
        });
        let spec_json = match spec_json {
            Ok(s) => s,
            Err((field, reason)) => {
                errors.push(ModelError::Rejected {
                    kind: Kind::RequestAuthentication,
                    namespace,
                    name,
                    field,
                    reason,
                });
                continue;
            }
        };
        let mut wire = WireRequestAuthentication {
            spec_json,
            ..Default::default()
        };
        for t in &ra.spec.target_refs {
            if t.kind == "Gateway" {
                wire.target_gateway = format!("{namespace}/{}", t.name);
            } else {
                wire.target_service = format!(
                    "{namespace}/{}",
                    config.service_hostname(&t.name, &namespace)
                );
            }
        }
        wire.name = name;
        wire.namespace = namespace;
        out.push(wire);
    }
    out
}
