//! Validating a request's token: a pure function of the rules bound to the destination,
//! the request head, the key sets known ([`JwksSource`]) and the time, returning what
//! policy reads ([`RequestAuth`]) or why the token is refused ([`AuthnError`], a 401).
//!
//! The token is looked for where the rules say (their headers and query parameters, in
//! rule order). The first one found is checked against the rule of its issuer (`iss`, read
//! before the signature is known good, only to pick the rule) that reads tokens from that
//! place: signature with one of the issuer's keys (the `kid` one when the token names one),
//! then `iss`, `aud` (when the rule lists audiences), `exp` and `nbf` with [`LEEWAY`]. A
//! time claim that is not a number is refused rather than skipped. A request with no token
//! anywhere is not refused here.

use std::sync::Arc;

use ambit_policy::RequestAuth;
use base64::Engine as _;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::JwksSource;
use super::{crypto, JwtRule, Keys, Location};

/// Clock skew tolerated on `exp` and `nbf`, in seconds (Envoy's default).
pub const LEEWAY: u64 = 60;

/// Why a token was refused: the access log's reason and the 401's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// Not three base64url parts with a JSON header and payload.
    #[error("malformed token in {location}: {why}")]
    Malformed { location: String, why: String },
    /// No rule reads tokens of this issuer from where it was found.
    #[error("issuer {issuer:?} is not configured for tokens in {location}")]
    UnknownIssuer { issuer: String, location: String },
    /// The header names an algorithm that key sets do not serve (HMAC).
    #[error("algorithm {alg:?} is not accepted")]
    Algorithm { alg: String },
    /// The issuer's key set has not been fetched (or never successfully).
    #[error("no keys for issuer {issuer:?} yet: {why}")]
    NoKeys { issuer: String, why: String },
    /// No key of the issuer's set verifies the signature.
    #[error("signature does not verify with any key of issuer {issuer:?}{}", kid.as_ref().map(|k| format!(" (kid {k:?})")).unwrap_or_default())]
    Signature { issuer: String, kid: Option<String> },
    /// `exp` is past.
    #[error("token expired at {exp} (now {now}, leeway {LEEWAY}s)")]
    Expired { exp: u64, now: u64 },
    /// `nbf` is ahead.
    #[error("token not valid before {nbf} (now {now}, leeway {LEEWAY}s)")]
    NotYetValid { nbf: u64, now: u64 },
    /// A registered claim has the wrong type.
    #[error("claim {claim} is not {want}")]
    ClaimType {
        claim: &'static str,
        want: &'static str,
    },
    /// `aud` names none of the rule's audiences.
    #[error("audiences {got:?} are not among {want:?}")]
    Audience { got: Vec<String>, want: Vec<String> },
}

/// A validated token and what to do with it towards the destination.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub auth: RequestAuth,
    /// The rule that accepted it.
    pub rule: Arc<JwtRule>,
    /// Where it was found (removed towards the destination unless the rule forwards it).
    pub location: Location,
    /// The payload as sent (base64url), for `outputPayloadToHeader`.
    pub payload: String,
}

/// The token of a request, if any, validated against `rules` at `now` (Unix seconds).
pub fn authenticate(
    rules: &[Arc<JwtRule>],
    headers: &HeaderMap,
    query: Option<&str>,
    keys: &dyn JwksSource,
    now: u64,
) -> Result<Option<Authenticated>, AuthnError> {
    let Some((token, location)) = find_token(rules, headers, query) else {
        return Ok(None);
    };
    let (payload_b64, claims) = peek(&token).map_err(|why| AuthnError::Malformed {
        location: location.to_string(),
        why,
    })?;
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(rule) = rules
        .iter()
        .find(|r| r.issuer == issuer && r.locations.contains(&location))
    else {
        return Err(AuthnError::UnknownIssuer {
            issuer: issuer.to_string(),
            location: location.to_string(),
        });
    };
    let claims = verify(&token, rule, keys, &location)?;
    let auth = check_claims(rule, claims, now)?;
    Ok(Some(Authenticated {
        auth,
        rule: rule.clone(),
        location,
        payload: payload_b64,
    }))
}

/// The first token in the places the rules read, in rule order.
fn find_token(
    rules: &[Arc<JwtRule>],
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<(String, Location)> {
    for loc in rules.iter().flat_map(|r| &r.locations) {
        let found = match loc {
            Location::Header { name, prefix } => header_token(headers, name, prefix),
            Location::Param(p) => query.and_then(|q| param(q, p)),
        };
        if let Some(t) = found {
            return Some((t, loc.clone()));
        }
    }
    None
}

fn header_token(headers: &HeaderMap, name: &HeaderName, prefix: &str) -> Option<String> {
    headers.get_all(name).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let head = v.get(..prefix.len())?;
        head.eq_ignore_ascii_case(prefix)
            .then(|| v[prefix.len()..].trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_string())
    })
}

/// The payload part and its claims, before the signature is checked: only to pick the rule.
fn peek(token: &str) -> Result<(String, Map<String, Value>), String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three dot-separated parts".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("payload is not base64url: {e}"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok((payload.to_string(), m)),
        Ok(_) => Err("payload is not a JSON object".into()),
        Err(e) => Err(format!("payload is not JSON: {e}")),
    }
}

/// Whether key `k` may verify a token signed with `alg`.
fn fits(k: &Jwk, alg: Algorithm) -> bool {
    if let Some(ka) = k.common.key_algorithm {
        if ka.to_string() != format!("{alg:?}") {
            return false;
        }
    }
    match (&k.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

/// Checks the signature with the rule's keys; the claims, not yet checked.
fn verify(
    token: &str,
    rule: &JwtRule,
    keys: &dyn JwksSource,
    location: &Location,
) -> Result<Map<String, Value>, AuthnError> {
    crypto::install();
    let header = jsonwebtoken::decode_header(token).map_err(|e| AuthnError::Malformed {
        location: location.to_string(),
        why: format!("header: {e}"),
    })?;
    if matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(AuthnError::Algorithm {
            alg: format!("{:?}", header.alg),
        });
    }
    let set: Arc<JwkSet> = match &rule.keys {
        Keys::Inline(set) => set.clone(),
        Keys::Uri(uri) => keys.jwks(uri).map_err(|why| AuthnError::NoKeys {
            issuer: rule.issuer.clone(),
            why,
        })?,
    };
    // Time, issuer and audience are checked by `check_claims`, against the injected clock.
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let candidates = set
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        .filter(|k| fits(k, header.alg));
    for k in candidates {
        let Ok(key) = DecodingKey::from_jwk(k) else {
            continue;
        };
        if let Ok(data) = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
            return Ok(data.claims);
        }
    }
    Err(AuthnError::Signature {
        issuer: rule.issuer.clone(),
        kid: header.kid,
    })
}

/// A registered time claim: absent, or a number of seconds.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, AuthnError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            // Fractions of a second do not matter at this leeway; negative times are 0.
            .map(|f| Some(f.max(0.0) as u64))
            .ok_or(AuthnError::ClaimType {
                claim: name,
                want: "a number",
            }),
    }
}

fn check_claims(
    rule: &JwtRule,
    claims: Map<String, Value>,
    now: u64,
) -> Result<RequestAuth, AuthnError> {
    if let Some(exp) = time_claim(&claims, "exp")? {
        if now > exp.saturating_add(LEEWAY) {
            return Err(AuthnError::Expired { exp, now });
        }
    }
    if let Some(nbf) = time_claim(&claims, "nbf")? {
        if now.saturating_add(LEEWAY) < nbf {
            return Err(AuthnError::NotYetValid { nbf, now });
        }
    }
    let string = |name: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AuthnError::ClaimType {
            claim: name,
            want: "a string",
        }),
    };
    // The rule was picked by this issuer; a signed token must still say it.
    let issuer = string("iss")?.unwrap_or_default();
    if issuer != rule.issuer {
        return Err(AuthnError::UnknownIssuer {
            issuer,
            location: "the signed payload".into(),
        });
    }
    let subject = string("sub")?.unwrap_or_default();
    let presenter = string("azp")?;
    let audiences = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(AuthnError::ClaimType {
                claim: "aud",
                want: "a string or a list of strings",
            })?,
        Some(_) => {
            return Err(AuthnError::ClaimType {
                claim: "aud",
                want: "a string or a list of strings",
            })
        }
    };
    if !rule.audiences.is_empty() && !audiences.iter().any(|a| rule.audiences.contains(a)) {
        return Err(AuthnError::Audience {
            got: audiences,
            want: rule.audiences.clone(),
        });
    }
    Ok(RequestAuth {
        principal: format!("{issuer}/{subject}"),
        audiences,
        presenter,
        claims,
    })
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
