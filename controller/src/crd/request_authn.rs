//! `RequestAuthentication` in `security.ambit.dev/v1`: Istio's schema, so operators can
//! bring the JWT rules they already have. In an ambient mesh it is enforced by waypoints,
//! so it must be bound with `targetRefs` (a waypoint Gateway, or a Service that uses one).
//!
//! Kept as written; the model checks every field (issuer present, exactly one of `jwks`
//! and `jwksUri`, an inline key set that parses, header names) and names the offending one.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::security::{PolicyTargetReference, WorkloadSelector};

/// How requests to the targeted waypoint or Service prove who sent them: JWTs of these
/// issuers are validated; a request with a bad token is refused (401), one without a token
/// goes on without a request principal.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "RequestAuthentication",
    plural = "requestauthentications",
    shortname = "ra",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Istio's workload selector. Ambit validates tokens only at waypoints, so a
    /// RequestAuthentication must use `targetRefs`; one with only a selector is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The Gateway (waypoint) or Service whose requests are authenticated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// One rule per accepted issuer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// How tokens of one issuer are validated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The token's `iss`, exactly.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// URL (http or https) of the issuer's JSON Web Key Set; the waypoint fetches it and
    /// refreshes it. Exactly one of `jwksUri` and `jwks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The issuer's JSON Web Key Set itself, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token is read from. With neither these nor `fromParams`:
    /// `Authorization: Bearer <token>` and the `access_token` query parameter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token is read from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Keep the token on the request sent on (it is removed otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// A header that gets the token's payload (base64url) on the request sent on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
}

/// A header a token is read from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    /// The header's name.
    pub name: String,
    /// Removed from the value before it is read as a token, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}
