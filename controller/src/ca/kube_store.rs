//! Kubernetes mode: the generated root lives in the Secret `ambit-ca` of the controller's
//! namespace, and the trust root is published in the ConfigMap `ambit-root-cert` there.
//!
//! The Secret is the one `ambitctl install --ca-cert/--ca-key` renders (keys `ca.crt`,
//! `ca.key`), so a plugged-in root and a generated one are stored, found and reloaded the
//! same way, and a controller pod that restarts (its filesystem is an `emptyDir`) finds
//! the root it generated before instead of cutting every proxy off with a new one. The
//! ConfigMap is what ztunnel and waypoint pods mount as their `--ca-root-file`; it is
//! written with server-side apply under the field manager `ambit-controller`.
//!
//! With several replicas only the leader creates the Secret ([`load_when_led`]); the others
//! wait for it and sign with the same root.
//!
//! RBAC: `get`/`create` on `secrets` and `get`/`patch` on `configmaps` in the controller's
//! namespace.

use std::collections::BTreeMap;

use ambit_hbone::ca::{CaError, CertificateAuthority, DEFAULT_ROOT_VALIDITY};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};

use super::store::CaOrigin;

/// The Secret holding the CA (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "ambit-ca";
/// The ConfigMap proxies mount the trust root from (`root-cert.pem`).
pub const ROOT_CONFIGMAP: &str = "ambit-root-cert";
/// The server-side apply field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "ambit-controller";

/// Why the CA could not be loaded from, or stored in, Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubeStoreError {
    /// An API call failed.
    #[error("{what} {namespace}/{name}")]
    Api {
        /// What was being done ("reading Secret", ...).
        what: &'static str,
        /// The object's namespace.
        namespace: String,
        /// The object's name.
        name: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The Secret exists but lacks a key.
    #[error("Secret {namespace}/{CA_SECRET} has no {key:?}; it must hold ca.crt and ca.key")]
    MissingKey {
        /// The Secret's namespace.
        namespace: String,
        /// The missing key.
        key: &'static str,
    },
    /// The Secret's material does not make a CA.
    #[error("Secret {namespace}/{CA_SECRET} does not hold a usable CA")]
    Ca {
        /// The Secret's namespace.
        namespace: String,
        /// Why.
        #[source]
        source: CaError,
    },
}

/// Loads the CA from the Secret, or generates one and creates the Secret. If another
/// controller created it first, that one's root wins and is loaded.
pub async fn load_or_generate(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<(CertificateAuthority, CaOrigin), KubeStoreError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_err = |what| {
        move |source| KubeStoreError::Api {
            what,
            namespace: namespace.to_string(),
            name: CA_SECRET,
            source,
        }
    };
    if let Some(secret) = api
        .get_opt(CA_SECRET)
        .await
        .map_err(api_err("reading Secret"))?
    {
        return Ok((
            from_secret(&secret, namespace, trust_domain)?,
            CaOrigin::Reloaded,
        ));
    }
    let ca =
        CertificateAuthority::generate(trust_domain, DEFAULT_ROOT_VALIDITY).map_err(|source| {
            KubeStoreError::Ca {
                namespace: namespace.to_string(),
                source,
            }
        })?;
    let pem = ca.to_pem();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), ByteString(pem.cert_pem.into_bytes())),
            ("ca.key".to_string(), ByteString(pem.key_pem.into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((ca, CaOrigin::Generated)),
        // Someone else stored a root between our read and our write: use theirs, so
        // there is only ever one.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api
                .get(CA_SECRET)
                .await
                .map_err(api_err("reading Secret"))?;
            Ok((
                from_secret(&secret, namespace, trust_domain)?,
                CaOrigin::Reloaded,
            ))
        }
        Err(e) => Err(api_err("creating Secret")(e)),
    }
}

/// Loads the CA a leader stored: while this replica follows, waits (polling every `poll`)
/// for the Secret and loads it; as soon as it leads (or if it does from the start), loads or
/// generates it as [`load_or_generate`] does. Followers never generate, so every replica
/// signs with the leader's root.
pub async fn load_when_led(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    leadership: &crate::leader::Leadership,
    poll: std::time::Duration,
) -> Result<(CertificateAuthority, CaOrigin), KubeStoreError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    loop {
        if leadership.is_leader() {
            return load_or_generate(client, namespace, trust_domain).await;
        }
        match api.get_opt(CA_SECRET).await {
            Ok(Some(secret)) => {
                return Ok((
                    from_secret(&secret, namespace, trust_domain)?,
                    CaOrigin::Reloaded,
                ))
            }
            Ok(None) => {
                tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "following: waiting for the leader to store the CA")
            }
            // Transient (the API server restarting...): try again at the next poll.
            Err(source) => {
                let e = KubeStoreError::Api {
                    what: "reading Secret",
                    namespace: namespace.to_string(),
                    name: CA_SECRET,
                    source,
                };
                tracing::warn!(error = %crate::model::error_chain(&e), "waiting for the CA");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = leadership.acquired() => {}
        }
    }
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    trust_domain: &str,
) -> Result<CertificateAuthority, KubeStoreError> {
    let get = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| KubeStoreError::MissingKey {
                namespace: namespace.to_string(),
                key,
            })
    };
    CertificateAuthority::from_pem(trust_domain, &get("ca.crt")?, &get("ca.key")?, None).map_err(
        |source| KubeStoreError::Ca {
            namespace: namespace.to_string(),
            source,
        },
    )
}

/// Publishes the trust roots in the ConfigMap proxies mount (server-side apply).
pub async fn publish_roots(
    client: kube::Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<(), KubeStoreError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIGMAP.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "root-cert.pem".to_string(),
            roots_pem.to_string(),
        )])),
        ..ConfigMap::default()
    };
    api.patch(
        ROOT_CONFIGMAP,
        // Forced: the installer may have created it under another manager; the
        // controller's CA is the authority on what the root is.
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(|source| KubeStoreError::Api {
        what: "applying ConfigMap",
        namespace: namespace.to_string(),
        name: ROOT_CONFIGMAP,
        source,
    })?;
    Ok(())
}
