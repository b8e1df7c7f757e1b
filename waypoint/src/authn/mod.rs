//! Request authentication: `RequestAuthentication` (Istio's schema) bound to this waypoint
//! by `targetRefs` (its Gateway, or a Service it fronts). A request that carries a token
//! where a rule reads tokens from has it validated ([`validate`]): signature with the
//! issuer's key set, `iss`, `aud`, `exp` and `nbf`. A bad token gets 401; a request without
//! one goes on with no request principal, and AuthorizationPolicy decides whether that is
//! enough (`requestPrincipals`, `request.auth.claims[...]`).
//!
//! Key sets are inline (`jwks`, parsed when the state is built, so a malformed one is
//! refused with the push) or fetched from `jwksUri` by [`jwks`], which keeps the last good
//! set of each URL; the decision only reads them through [`jwks::JwksSource`]. Signatures
//! are ring's ([`crypto`]).

pub mod crypto;
pub mod jwks;
pub mod mint;
pub mod validate;

use std::sync::Arc;

use http::HeaderName;
use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

/// Why a RequestAuthentication could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthnConfigError {
    /// A field that must be set is empty.
    #[error("request authentication {resource}: {field} is empty")]
    Missing { resource: String, field: String },
    /// The inline key set is not a JSON Web Key Set.
    #[error("request authentication {resource}: {field} is not a JSON Web Key Set")]
    Jwks {
        resource: String,
        field: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value outside its field's domain (a header name that is not one, a URL that is
    /// neither http nor https, both `jwks` and `jwksUri`...).
    #[error("request authentication {resource}: {field} {value:?} is invalid: {why}")]
    Invalid {
        resource: String,
        field: String,
        value: String,
        why: String,
    },
}

/// Where a token is read from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct JwtHeader {
    /// The header's name.
    pub name: String,
    /// Stripped from the value (`Bearer `), compared without regard to case.
    pub prefix: String,
}

/// One issuer's rule, as written (Istio's `JWTRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct JwtRuleSpec {
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any.
    pub audiences: Vec<String>,
    /// Where the key set is fetched from (http or https).
    pub jwks_uri: String,
    /// The key set itself, as a JSON string.
    pub jwks: String,
    /// Headers the token may be in; with neither these nor `fromParams`, the token is read
    /// from `Authorization: Bearer <token>` and the `access_token` query parameter.
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    /// Keep the token on the request towards the destination (it is removed otherwise).
    pub forward_original_token: bool,
    /// A header that gets the token's payload, base64url-encoded, towards the destination.
    pub output_payload_to_header: String,
}

/// The spec of a RequestAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// A RequestAuthentication bound to this waypoint, in the shape of the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RequestAuthenticationResource {
    pub name: String,
    pub namespace: String,
    /// `namespace/name` of the Gateway it targets.
    pub target_gateway: String,
    /// `namespace/hostname` of the Service it targets.
    pub target_service: String,
    pub spec: RequestAuthenticationSpec,
}

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum Keys {
    Inline(Arc<JwkSet>),
    /// Fetched by [`jwks`]; the URL.
    Uri(String),
}

/// Where a rule reads tokens from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Header { name, .. } => write!(f, "header {name}"),
            Location::Param(p) => write!(f, "query parameter {p}"),
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Keys,
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
}

/// A compiled RequestAuthentication.
#[derive(Debug, Clone)]
pub struct RequestAuthentication {
    /// `namespace/name`.
    pub key: String,
    pub target_gateway: Option<String>,
    pub target_service: Option<String>,
    pub rules: Vec<Arc<JwtRule>>,
}

impl RequestAuthenticationResource {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks every field and parses inline key sets.
    pub fn compile(&self) -> Result<RequestAuthentication, AuthnConfigError> {
        let resource = self.key();
        let mut rules = Vec::with_capacity(self.spec.jwt_rules.len());
        for (i, r) in self.spec.jwt_rules.iter().enumerate() {
            let at = |f: &str| format!("jwtRules[{i}].{f}");
            let invalid = |field: String, value: &str, why: &str| AuthnConfigError::Invalid {
                resource: resource.clone(),
                field,
                value: value.to_string(),
                why: why.to_string(),
            };
            if r.issuer.is_empty() {
                return Err(AuthnConfigError::Missing {
                    resource,
                    field: at("issuer"),
                });
            }
            let keys = match (r.jwks.is_empty(), r.jwks_uri.is_empty()) {
                (false, true) => Keys::Inline(Arc::new(serde_json::from_str(&r.jwks).map_err(
                    |source| AuthnConfigError::Jwks {
                        resource: resource.clone(),
                        field: at("jwks"),
                        source,
                    },
                )?)),
                (true, false) => {
                    check_uri(&r.jwks_uri)
                        .map_err(|why| invalid(at("jwksUri"), &r.jwks_uri, why))?;
                    Keys::Uri(r.jwks_uri.clone())
                }
                (false, false) => {
                    return Err(invalid(at("jwks"), "", "give jwks or jwksUri, not both"))
                }
                (true, true) => {
                    return Err(AuthnConfigError::Missing {
                        resource,
                        field: at("jwksUri"),
                    })
                }
            };
            let mut locations = Vec::new();
            for (j, h) in r.from_headers.iter().enumerate() {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    invalid(
                        at(&format!("fromHeaders[{j}].name")),
                        &h.name,
                        "not a header name",
                    )
                })?;
                locations.push(Location::Header {
                    name,
                    prefix: h.prefix.clone(),
                });
            }
            for (j, p) in r.from_params.iter().enumerate() {
                if p.is_empty() {
                    return Err(AuthnConfigError::Missing {
                        resource,
                        field: at(&format!("fromParams[{j}]")),
                    });
                }
                locations.push(Location::Param(p.clone()));
            }
            if locations.is_empty() {
                locations = vec![
                    Location::Header {
                        name: http::header::AUTHORIZATION,
                        prefix: "Bearer ".into(),
                    },
                    Location::Param("access_token".into()),
                ];
            }
            let output_payload_to_header =
                match r.output_payload_to_header.as_str() {
                    "" => None,
                    h => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        invalid(at("outputPayloadToHeader"), h, "not a header name")
                    })?),
                };
            rules.push(Arc::new(JwtRule {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys,
                locations,
                forward_original_token: r.forward_original_token,
                output_payload_to_header,
            }));
        }
        let target = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(RequestAuthentication {
            key: resource,
            target_gateway: target(&self.target_gateway),
            target_service: target(&self.target_service),
            rules,
        })
    }
}

/// A key-set URL must be absolute http or https with a host.
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
