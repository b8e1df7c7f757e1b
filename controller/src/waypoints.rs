//! Kubernetes mode: every `Gateway` of class `ambit-waypoint` becomes a running waypoint
//! (its ServiceAccount, Deployment and Service), applied with server-side apply under the
//! field manager `ambit-controller`.
//!
//! The objects come from `ambit_manifests::waypoint::render`, the typed template the
//! installer and `ambitctl` share, so what the controller deploys is exactly what the
//! manifests document. They are owned by their Gateway, so deleting the Gateway lets the
//! garbage collector remove them; this module never deletes. Server-side apply makes
//! every pass idempotent: re-applying an unchanged Gateway is a no-op on the API server,
//! and a field someone else changed in a generated object is taken back (`force`).

use ambit_manifests::waypoint::{render, WaypointError, WaypointParams};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};

use crate::ca::kube_store::FIELD_MANAGER;
use crate::crd::Gateway;

/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";

/// Why a waypoint could not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum WaypointDeployError {
    /// The Gateway cannot be turned into objects (its name, no uid...).
    #[error("Gateway {namespace}/{name} cannot become a waypoint")]
    Render {
        /// The Gateway's namespace.
        namespace: String,
        /// The Gateway's name.
        name: String,
        /// Why.
        #[source]
        source: WaypointError,
    },
    /// Applying one of the objects failed.
    #[error("applying {kind} {namespace}/{name}")]
    Apply {
        /// The object's kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Deploys waypoints for Gateways. Cheap to clone.
#[derive(Clone)]
pub struct WaypointDeployer {
    client: kube::Client,
    image: String,
    trust_domain: String,
    controller_address: String,
}

impl WaypointDeployer {
    /// Deploys `image`, configured for `trust_domain` and the controller at
    /// `controller_address` (`https://host:port`).
    pub fn new(
        client: kube::Client,
        image: &str,
        trust_domain: &str,
        controller_address: &str,
    ) -> Self {
        WaypointDeployer {
            client,
            image: image.to_string(),
            trust_domain: trust_domain.to_string(),
            controller_address: controller_address.to_string(),
        }
    }

    /// Applies the waypoint of `gateway`; returns false (and does nothing) for a Gateway
    /// of another class.
    pub async fn apply(&self, gateway: &Gateway) -> Result<bool, WaypointDeployError> {
        if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
            return Ok(false);
        }
        let name = gateway.metadata.name.as_deref().unwrap_or_default();
        let namespace = gateway.metadata.namespace.as_deref().unwrap_or("default");
        let objects = render(&WaypointParams {
            name,
            namespace,
            gateway_uid: gateway.metadata.uid.as_deref().unwrap_or_default(),
            image: &self.image,
            trust_domain: &self.trust_domain,
            controller_address: &self.controller_address,
        })
        .map_err(|source| WaypointDeployError::Render {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        })?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let err = |kind| {
            move |source| WaypointDeployError::Apply {
                kind,
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            }
        };
        // ServiceAccount first: the Deployment's pods need it to start.
        Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(&objects.service_account))
            .await
            .map_err(err("ServiceAccount"))?;
        Api::<Deployment>::namespaced(self.client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(&objects.deployment))
            .await
            .map_err(err("Deployment"))?;
        Api::<Service>::namespaced(self.client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(&objects.service))
            .await
            .map_err(err("Service"))?;
        tracing::info!(gateway = %format!("{namespace}/{name}"), "waypoint applied");
        Ok(true)
    }

    /// Watches Gateways in every namespace and applies each waypoint when it appears or
    /// changes (and after every relist). Runs until the task is dropped; failures are
    /// logged and retried at the next event or relist.
    pub async fn run(self) {
        let api: Api<Gateway> = Api::all(self.client.clone());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(gateway) => {
                    if let Err(e) = self.apply(&gateway).await {
                        tracing::warn!(error = %crate::model::error_chain(&e), "waypoint not deployed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::model::error_chain(&e), "watching Gateways")
                }
            }
        }
    }
}
