//! Table tests of token validation: keys generated here (ECDSA) or read from the test-only
//! fixture (RSA), tokens minted per row, the clock fixed.

use std::collections::HashMap;

use serde_json::json;

use super::*;
use crate::authn::mint::{jwks, SigningKey};
use crate::authn::RequestAuthenticationResource;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example";
const RSA_PEM: &str = include_str!("../../tests/fixtures/jwt-test-only-rsa.pem");

/// Key sets by URL, as the fetcher would hold them.
struct Fetched(HashMap<String, Arc<JwkSet>>);

impl JwksSource for Fetched {
    fn jwks(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        self.0
            .get(uri)
            .cloned()
            .ok_or_else(|| format!("{uri} not fetched yet"))
    }
}

fn rules(yaml: &str) -> Vec<Arc<JwtRule>> {
    let r: RequestAuthenticationResource = serde_yaml::from_str(yaml).expect("yaml");
    r.compile().expect("compiles").rules
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({"iss": ISS, "sub": "alice", "aud": "web", "exp": NOW + 600, "iat": NOW});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn run(rules: &[Arc<JwtRule>], headers: &[(&str, &str)], query: Option<&str>) -> String {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let fetched = Fetched(HashMap::new());
    match authenticate(rules, &h, query, &fetched, NOW) {
        Ok(None) => "no token".into(),
        Ok(Some(a)) => format!(
            "ok {} aud={:?} azp={:?} from {}",
            a.auth.principal, a.auth.audiences, a.auth.presenter, a.location
        ),
        Err(e) => format!("401 {e}"),
    }
}

/// Name, headers, query, what `run` says.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Option<String>, &'a str);

#[test]
fn tokens_are_checked_against_their_issuers_rule() {
    let es = SigningKey::es256("k1").expect("key");
    let rsa = SigningKey::rs256_pem("r1", RSA_PEM).expect("rsa fixture");
    let other = SigningKey::es256("k1").expect("key"); // same kid, another key
    let set = jwks(&[&es, &rsa]);
    let rs = rules(&format!(
        "{{name: ra, namespace: demo, spec: {{jwtRules: [{{issuer: '{ISS}', audiences: [web, api], jwks: '{set}'}}]}}}}"
    ));
    let bearer = |t: String| format!("Bearer {t}");
    let tok = |k: &SigningKey, extra| k.token(&claims(extra)).expect("token");
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no token", vec![], None, "no token"),
        ("ES256", vec![("authorization", bearer(tok(&es, json!({"azp": "cli"}))))], None,
            "ok https://idp.example/alice aud=[\"web\"] azp=Some(\"cli\") from header authorization"),
        ("RS256", vec![("authorization", bearer(tok(&rsa, json!({"aud": ["x", "api"]}))))], None,
            "ok https://idp.example/alice aud=[\"x\", \"api\"] azp=None from header authorization"),
        ("bearer in any case", vec![("authorization", format!("bearer {}", tok(&es, json!({}))))], None,
            "ok https://idp.example/alice aud=[\"web\"] azp=None from header authorization"),
        ("access_token parameter", vec![], Some(format!("a=1&access_token={}", tok(&es, json!({})))),
            "ok https://idp.example/alice aud=[\"web\"] azp=None from query parameter access_token"),
        ("expired", vec![("authorization", bearer(tok(&es, json!({"exp": NOW - 61}))))], None,
            "401 token expired at 1799999939 (now 1800000000, leeway 60s)"),
        ("expired within the leeway", vec![("authorization", bearer(tok(&es, json!({"exp": NOW - 59}))))], None,
            "ok https://idp.example/alice aud=[\"web\"] azp=None from header authorization"),
        ("not yet valid", vec![("authorization", bearer(tok(&es, json!({"nbf": NOW + 600}))))], None,
            "401 token not valid before 1800000600 (now 1800000000, leeway 60s)"),
        ("exp that is no number is refused, not skipped", vec![("authorization", bearer(tok(&es, json!({"exp": "never"}))))], None,
            "401 claim exp is not a number"),
        ("nbf that is no number", vec![("authorization", bearer(tok(&es, json!({"nbf": "9999999999"}))))], None,
            "401 claim nbf is not a number"),
        ("no exp at all", vec![("authorization", bearer(tok(&es, json!({"exp": null}))))], None,
            "ok https://idp.example/alice aud=[\"web\"] azp=None from header authorization"),
        ("signed by another key", vec![("authorization", bearer(tok(&other, json!({}))))], None,
            "401 signature does not verify with any key of issuer \"https://idp.example\" (kid \"k1\")"),
        ("a kid the set lacks", vec![("authorization", bearer(tok(&es.clone().with_kid("k9"), json!({}))))], None,
            "401 signature does not verify with any key of issuer \"https://idp.example\" (kid \"k9\")"),
        ("another issuer", vec![("authorization", bearer(tok(&es, json!({"iss": "https://evil.example"}))))], None,
            "401 issuer \"https://evil.example\" is not configured for tokens in header authorization"),
        ("another audience", vec![("authorization", bearer(tok(&es, json!({"aud": "db"}))))], None,
            "401 audiences [\"db\"] are not among [\"web\", \"api\"]"),
        ("not a JWT", vec![("authorization", "Bearer abc".into())], None,
            "401 malformed token in header authorization: not three dot-separated parts"),
        ("HMAC is not accepted", vec![("authorization", bearer(hs256()))], None,
            "401 algorithm \"HS256\" is not accepted"),
        ("alg none", vec![("authorization", bearer(unsigned()))], None,
            "401 malformed token in header authorization: header: JSON error: unknown variant `none`"),
        ("another scheme is no token", vec![("authorization", "Basic YTpi".into())], None, "no token"),
    ];
    for (name, headers, query, want) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // The parser's own words may follow (`alg none`: where in the header).
        let got = run(&rs, &h, query.as_deref());
        assert!(
            got == want || (got.starts_with(want) && want.contains("JSON error")),
            "{name}: {got}"
        );
    }
}

/// A token signed with HMAC (the signature does not matter: the algorithm is refused first).
fn hs256() -> String {
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.c2ln",
        b(json!({"alg": "HS256", "typ": "JWT"})),
        b(claims(json!({})))
    )
}

/// `alg: none`, no signature.
fn unsigned() -> String {
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!("{}.{}.", b(json!({"alg": "none"})), b(claims(json!({}))))
}

#[test]
fn places_and_issuers_pair_up() {
    let a = SigningKey::es256("a").expect("key");
    let b = SigningKey::es256("b").expect("key");
    let (sa, sb) = (jwks(&[&a]), jwks(&[&b]));
    let rs = rules(&format!(
        "{{name: ra, namespace: demo, spec: {{jwtRules: [
            {{issuer: issuer-a, jwks: '{sa}', fromHeaders: [{{name: x-jwt-a, prefix: 'Token '}}], fromParams: [ta]}},
            {{issuer: issuer-b, jwks: '{sb}'}}]}}}}"
    ));
    let token_a = a
        .token(&claims(json!({"iss": "issuer-a", "aud": null})))
        .expect("a");
    let token_b = b
        .token(&claims(json!({"iss": "issuer-b", "sub": "bob"})))
        .expect("b");
    let with_prefix = format!("Token {token_a}");
    assert_eq!(
        run(&rs, &[("x-jwt-a", &with_prefix)], None),
        "ok issuer-a/alice aud=[] azp=None from header x-jwt-a"
    );
    // The prefix is required where the rule says so.
    assert_eq!(run(&rs, &[("x-jwt-a", &token_a)], None), "no token");
    assert_eq!(
        run(&rs, &[], Some(&format!("ta={token_a}"))),
        "ok issuer-a/alice aud=[] azp=None from query parameter ta"
    );
    let bearer_b = format!("Bearer {token_b}");
    assert_eq!(
        run(&rs, &[("authorization", &bearer_b)], None),
        "ok issuer-b/bob aud=[\"web\"] azp=None from header authorization"
    );
    // Issuer B's token where only issuer A's are read.
    let b_in_a = format!("Token {token_b}");
    assert_eq!(
        run(&rs, &[("x-jwt-a", &b_in_a)], None),
        "401 issuer \"issuer-b\" is not configured for tokens in header x-jwt-a"
    );
}

#[test]
fn fetched_keys_are_used_and_their_absence_refuses() {
    let k = SigningKey::es256("k").expect("key");
    let rs = rules(&format!(
        "{{name: ra, namespace: demo, spec: {{jwtRules: [{{issuer: '{ISS}', jwksUri: 'http://idp.example/keys'}}]}}}}"
    ));
    let mut h = HeaderMap::new();
    let token = k.token(&claims(json!({}))).expect("token");
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("value"),
    );
    let none = Fetched(HashMap::new());
    let err = authenticate(&rs, &h, None, &none, NOW).expect_err("no keys yet");
    assert_eq!(
        err.to_string(),
        "no keys for issuer \"https://idp.example\" yet: http://idp.example/keys not fetched yet"
    );
    let set: JwkSet = serde_json::from_str(&jwks(&[&k])).expect("set");
    let fetched = Fetched(HashMap::from([(
        "http://idp.example/keys".to_string(),
        Arc::new(set),
    )]));
    let ok = authenticate(&rs, &h, None, &fetched, NOW)
        .expect("valid")
        .expect("a token");
    assert_eq!(ok.auth.principal, "https://idp.example/alice");
}

#[test]
fn bad_rules_are_refused_naming_the_field() {
    let cases = [
        ("{name: ra, namespace: d, spec: {jwtRules: [{jwks: '{\"keys\": []}'}]}}", "request authentication d/ra: jwtRules[0].issuer is empty"),
        ("{name: ra, namespace: d, spec: {jwtRules: [{issuer: i, jwks: 'not json'}]}}", "request authentication d/ra: jwtRules[0].jwks is not a JSON Web Key Set"),
        ("{name: ra, namespace: d, spec: {jwtRules: [{issuer: i}]}}", "request authentication d/ra: jwtRules[0].jwksUri is empty"),
        ("{name: ra, namespace: d, spec: {jwtRules: [{issuer: i, jwksUri: 'ftp://x/k'}]}}", "request authentication d/ra: jwtRules[0].jwksUri \"ftp://x/k\" is invalid: the scheme must be http or https"),
        ("{name: ra, namespace: d, spec: {jwtRules: [{issuer: i, jwksUri: 'http://x/k', fromHeaders: [{name: 'bad header'}]}]}}", "request authentication d/ra: jwtRules[0].fromHeaders[0].name \"bad header\" is invalid: not a header name"),
    ];
    for (yaml, want) in cases {
        let r: RequestAuthenticationResource = serde_yaml::from_str(yaml).expect("yaml");
        let err = r.compile().expect_err(yaml);
        assert_eq!(err.to_string(), want);
    }
}
