//! RequestAuthentication end to end on loopback: a client tunnels HTTP through the real
//! waypoint (mTLS HBONE) to real backends; tokens are minted here with keys generated at
//! test time (ECDSA) or the test-only RSA fixture; key sets are inline or served by a real
//! HTTP server the waypoint fetches from and refreshes.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_waypoint::authn::jwks::JwksSource as _;
use ambit_waypoint::authn::mint::{jwks, SigningKey};
use ambit_waypoint::server::Limits;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

const ISS: &str = "https://idp.example";
const RSA_PEM: &str = include_str!("fixtures/jwt-test-only-rsa.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(key: &SigningKey, extra: serde_json::Value) -> String {
    let mut c = json!({"iss": ISS, "sub": "alice", "aud": "web", "exp": now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    key.token(&c).unwrap()
}

/// Policies: `/api/*` needs a request principal of the issuer, `/admin/*` a token whose
/// `groups` claim holds `admin`; the rest needs nothing.
fn policies() -> &'static str {
    r#"
policies:
  - name: require-jwt
    namespace: demo
    targetGateway: demo/waypoint
    action: ALLOW
    rules:
      - from: [{requestPrincipals: ["https://idp.example/*"]}]
        to: [{paths: ["/api/*"]}]
      - to: [{paths: ["/admin/*"]}]
        when: [{key: "request.auth.claims[groups]", values: [admin]}]
      - to: [{notPaths: ["/api/*", "/admin/*"]}]
"#
}

#[tokio::test]
async fn tokens_are_validated_and_policies_match_their_principal_and_claims() {
    let es = SigningKey::es256("es-1").unwrap();
    let rsa = SigningKey::rs256_pem("rsa-1", RSA_PEM).unwrap();
    let stranger = SigningKey::es256("es-1").unwrap(); // same kid, a key nobody published
    let set = jwks(&[&es, &rsa]).replace('\'', "''");
    let yaml = state_yaml(&format!(
        r#"{}
requestAuthentications:
  - name: idp
    namespace: demo
    targetGateway: demo/waypoint
    spec:
      jwtRules:
        - issuer: "{ISS}"
          audiences: [web]
          jwks: '{set}'
          outputPayloadToHeader: x-jwt-payload
"#,
        policies()
    ));
    let mesh = start(&PODS, &yaml, Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let bearer = |t: String| format!("Bearer {t}");

    // A valid token passes the rule on requestPrincipals; the token is not sent on, its
    // payload is.
    let good = bearer(token(&es, json!({"groups": ["dev"]})));
    let (status, _, body) = get(&mut c, "/api/orders", &[("authorization", &good)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("authorization=\n"), "token forwarded: {body}");
    let payload = good.split('.').nth(1).unwrap();
    assert!(
        body.contains(&format!("x-jwt-payload={payload}\n")),
        "{body}"
    );
    let rs = bearer(token(&rsa, json!({})));
    assert_eq!(
        get(&mut c, "/api/orders", &[("authorization", &rs)])
            .await
            .0,
        200
    );

    // Expired and wrongly signed tokens: 401 with the reason, whatever the path.
    let expired = bearer(token(&es, json!({"exp": now() - 3600})));
    let (status, headers, body) = get(&mut c, "/api/orders", &[("authorization", &expired)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.starts_with("JWT rejected: token expired at"), "{body}");
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        "Bearer error=\"invalid_token\""
    );
    let forged = bearer(token(&stranger, json!({})));
    let (status, _, body) = get(&mut c, "/public", &[("authorization", &forged)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature does not verify"), "{body}");
    let other_aud = bearer(token(&es, json!({"aud": "db"})));
    assert_eq!(
        get(&mut c, "/public", &[("authorization", &other_aud)])
            .await
            .0,
        401
    );

    // No token: allowed where no principal is required, denied where one is.
    assert_eq!(get(&mut c, "/public", &[]).await.0, 200);
    let (status, _, body) = get(&mut c, "/api/orders", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("require-jwt"), "{body}");

    // A claims condition.
    assert_eq!(
        get(&mut c, "/admin/users", &[("authorization", &good)])
            .await
            .0,
        403
    );
    let admin = bearer(token(&es, json!({"groups": ["dev", "admin"]})));
    assert_eq!(
        get(&mut c, "/admin/users", &[("authorization", &admin)])
            .await
            .0,
        200
    );

    // What the refusals were, as counted.
    let m = mesh.metrics();
    let count = |code: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    assert_eq!(count("401"), 3, "{m}");
    assert_eq!(count("403"), 2, "{m}");
}

/// A key-set server: answers `GET /keys` with the current status and body, counting hits.
struct KeyServer {
    url: String,
    reply: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
}

async fn key_server(body: String) -> KeyServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Named `localhost`: the mesh rewrites `127.0.0.` addresses in its state to its own.
    let url = format!(
        "http://localhost:{}/keys",
        listener.local_addr().unwrap().port()
    );
    let reply = Arc::new(Mutex::new((200u16, body)));
    let hits = Arc::new(AtomicUsize::new(0));
    let (r, h) = (reply.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (r, h) = (r.clone(), h.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (r, h) = (r.clone(), h.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = r.lock().unwrap().clone();
                        let status = if req.uri().path() == "/keys" {
                            status
                        } else {
                            404
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    KeyServer { url, reply, hits }
}

/// Waits (at most 10 s) until `f` holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn key_sets_are_fetched_refreshed_and_kept_when_the_server_fails() {
    let first = SigningKey::es256("k1").unwrap();
    let second = SigningKey::es256("k2").unwrap();
    // The server starts out broken: not JSON.
    let server = key_server("<html>oops</html>".into()).await;
    let yaml = state_yaml(&format!(
        r#"{}
requestAuthentications:
  - name: idp
    namespace: demo
    targetService: demo/web.demo.svc.cluster.local
    spec:
      jwtRules:
        - issuer: "{ISS}"
          jwksUri: "{}"
          forwardOriginalToken: true
"#,
        policies(),
        server.url
    ));
    let mesh = start(&PODS, &yaml, Limits::default()).await;
    let mut c = mesh.h1(WEB).await;
    let t1 = format!("Bearer {}", token(&first, json!({})));
    let t2 = format!("Bearer {}", token(&second, json!({})));

    // Nothing good fetched yet: tokens are refused, with the URL and what was wrong.
    eventually("the failed fetch is recorded", async || {
        mesh.jwks
            .jwks(&server.url)
            .is_err_and(|e| e.contains("not a JSON Web Key Set"))
    })
    .await;
    let (status, _, body) = get(&mut c, "/api/x", &[("authorization", &t1)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains(&server.url), "{body}");
    assert!(body.contains("not a JSON Web Key Set"), "{body}");

    // The server recovers: the next retry fetches the set and the token passes (and is
    // forwarded, as the rule says).
    *server.reply.lock().unwrap() = (200, jwks(&[&first]));
    eventually("the first key set is in force", async || {
        get(&mut c, "/api/x", &[("authorization", &t1)]).await.0 == 200
    })
    .await;
    let (_, _, body) = get(&mut c, "/api/x", &[("authorization", &t1)]).await;
    assert!(body.contains(&format!("authorization={t1}\n")), "{body}");
    assert_eq!(
        get(&mut c, "/api/x", &[("authorization", &t2)]).await.0,
        401
    );

    // Key rotation: the refresh picks up the new set; the old key stops working.
    *server.reply.lock().unwrap() = (200, jwks(&[&second]));
    eventually("the rotated key set is in force", async || {
        get(&mut c, "/api/x", &[("authorization", &t2)]).await.0 == 200
    })
    .await;
    assert_eq!(
        get(&mut c, "/api/x", &[("authorization", &t1)]).await.0,
        401
    );

    // The server fails: the last good set keeps serving through several failed fetches.
    *server.reply.lock().unwrap() = (500, "down".into());
    let before = server.hits.load(Ordering::SeqCst);
    eventually("two failed fetches", async || {
        server.hits.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    let entry = mesh.jwks.entries()[&server.url].clone();
    let err = entry.error.unwrap();
    assert!(
        err.contains(&server.url) && err.contains("answered 500"),
        "{err}"
    );
    assert!(entry.keys.is_some());
    assert_eq!(
        get(&mut c, "/api/x", &[("authorization", &t2)]).await.0,
        200
    );
}

#[tokio::test]
async fn key_sets_over_https_are_checked_against_the_roots_given() {
    use ambit_waypoint::authn::jwks::{fetch, FetchConfig};

    // A CA of our own (standing in for the mesh's root) and a server certificate for
    // `localhost` that it signed.
    let ca = ambit_testing::pki::WebCa::new().unwrap();
    let ca_pem = ca.pem.clone();
    let leaf = ca.leaf("localhost").unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.cert.into()],
            rustls_pki_types::PrivatePkcs8KeyDer::from(leaf.key).into(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
    let signer = SigningKey::es256("tls").unwrap();
    let body = jwks(&[&signer]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}/keys",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req: http::Request<_>| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    // Trusting the given root (as the waypoint trusts the mesh's): fetched.
    let trusting = FetchConfig::new(&ca_pem).unwrap();
    let set = fetch(&url, &trusting.tls).await.unwrap();
    assert_eq!(set.keys.len(), 1);
    // The web's roots alone do not vouch for this server: refused, naming the URL.
    let web_only = FetchConfig::new("").unwrap();
    let err = fetch(&url, &web_only.tls).await.unwrap_err();
    let chain = ambit_runtime::logging::error_chain(&err);
    assert!(
        chain.starts_with(&format!("{url}: TLS with localhost")),
        "{chain}"
    );
}
