//! Reading a Kubernetes install for `status`, `proxy-config` and `check --kubernetes`: a kube
//! client from the operator's kubeconfig, and GETs to a pod's ops ports through the API
//! server's `portforward` (so admin ports bound to the pod's loopback are reachable, as with
//! `kubectl port-forward`, and nothing needs to be exposed). The values built here have the
//! shape `ambitctl::local::inspect` gives for the local mesh, so both print the same tables.

use std::path::Path;

use ambitctl::local::cluster::{CONTROLLER_OPS_PORT, ZTUNNEL_ADMIN_PORT, ZTUNNEL_READINESS_PORT};
use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::Client;
use serde_json::{json, Value};

/// The label every component's pods carry with its name.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The controller's Deployment and its pods' name label.
pub const CONTROLLER: &str = "ambit-controller";
/// The ztunnel DaemonSet and its pods' name label.
pub const ZTUNNEL: &str = "ambit-ztunnel";

/// Options shared by the subcommands that read a cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Read the cluster of the current kubeconfig context (or --kubeconfig) instead of the
    /// local mesh.
    #[arg(long)]
    pub kubernetes: bool,
    /// The kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace Ambit was installed in (with --kubernetes).
    #[arg(long, default_value = ambit_manifests::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// A runtime for one command's calls.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")
}

/// A client for `kubeconfig`, or for the inferred configuration.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig (set KUBECONFIG or pass --kubeconfig) and not in a cluster")?,
    };
    Client::try_from(config).context("building a Kubernetes client")
}

/// GETs `path` from `port` of pod `namespace/pod` through a port-forward; returns the status
/// code and body.
pub async fn get(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let what = || format!("{path} on port {port} of pod {namespace}/{pod}");
    let mut forward = Api::<Pod>::namespaced(client.clone(), namespace)
        .portforward(pod, &[port])
        .await
        .with_context(|| format!("port-forwarding to {}", what()))?;
    let Some(stream) = forward.take_stream(port) else {
        bail!("port-forward to {} gave no stream", what());
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(what)?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .with_context(what)?;
    let resp = sender.send_request(req).await.with_context(what)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(what)?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET as JSON, or `{"error": ...}`, like the local mesh's reads.
async fn get_json(client: &Client, namespace: &str, pod: &str, port: u16, path: &str) -> Value {
    match get(client, namespace, pod, port, path).await {
        Ok((200, body)) => serde_json::from_str(&body)
            .unwrap_or_else(|e| json!({"error": format!("{path}: not JSON: {e}")})),
        Ok((status, body)) => json!({"error": format!("{path}: HTTP {status}: {}", body.trim())}),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

/// Pods of `namespace` with `selector`.
pub async fn pods(client: &Client, namespace: &str, selector: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .with_context(|| format!("listing pods {selector} in {namespace}"))?
        .items)
}

fn name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Whether the pod's phase is Running.
pub fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The ztunnel pod on `node`, if any.
pub async fn ztunnel_on(client: &Client, namespace: &str, node: &str) -> anyhow::Result<Pod> {
    let all = pods(client, namespace, &format!("{NAME_LABEL}={ZTUNNEL}")).await?;
    let nodes: Vec<String> = all.iter().filter_map(node_of).collect();
    all.into_iter()
        .find(|p| node_of(p).as_deref() == Some(node))
        .with_context(|| {
            format!(
                "no ztunnel pod on node {node:?} in {namespace} (ztunnels run on: {})",
                nodes.join(", ")
            )
        })
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// One ztunnel pod, in the shape of `inspect::node`: ready (15021), `/config_dump` and
/// `/certs` (15000).
pub async fn ztunnel(client: &Client, namespace: &str, pod: &Pod) -> Value {
    let pod_name = name(pod);
    let ready = matches!(
        get(
            client,
            namespace,
            &pod_name,
            ZTUNNEL_READINESS_PORT,
            "/healthz/ready"
        )
        .await,
        Ok((200, _))
    );
    let dump = get_json(
        client,
        namespace,
        &pod_name,
        ZTUNNEL_ADMIN_PORT,
        "/config_dump",
    )
    .await;
    let certs = get_json(client, namespace, &pod_name, ZTUNNEL_ADMIN_PORT, "/certs").await;
    json!({
        "node": node_of(pod), "pod": format!("{namespace}/{pod_name}"),
        "ip": pod.status.as_ref().and_then(|s| s.host_ip.clone()),
        "running": running(pod), "ready": ready,
        "config_dump": dump, "certs": certs,
    })
}

/// Every ztunnel pod, ordered by node.
pub async fn ztunnels(client: &Client, namespace: &str) -> anyhow::Result<Vec<Value>> {
    let mut all = pods(client, namespace, &format!("{NAME_LABEL}={ZTUNNEL}")).await?;
    all.sort_by_key(node_of);
    let mut out = Vec::new();
    for p in &all {
        out.push(ztunnel(client, namespace, p).await);
    }
    Ok(out)
}

/// The controller, in the shape of `inspect::controller`: its first running pod's metrics.
pub async fn controller(client: &Client, namespace: &str) -> anyhow::Result<(String, Value)> {
    let all = pods(client, namespace, &format!("{NAME_LABEL}={CONTROLLER}")).await?;
    let url = format!("https://{CONTROLLER}.{namespace}.svc:15012");
    let Some(pod) = all.iter().find(|p| running(p)) else {
        return Ok((
            url.clone(),
            json!({"running": false, "pid": null, "url": url,
                   "metrics": {"error": format!("no running {CONTROLLER} pod in {namespace}")}}),
        ));
    };
    let pod_name = name(pod);
    let metrics = match get(
        client,
        namespace,
        &pod_name,
        CONTROLLER_OPS_PORT,
        "/metrics",
    )
    .await
    {
        Ok((200, body)) => ambitctl::local::inspect::controller_metrics(&body),
        Ok((status, _)) => json!({"error": format!("/metrics: HTTP {status}")}),
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    Ok((
        url.clone(),
        json!({"running": true, "pod": format!("{namespace}/{pod_name}"), "url": url, "metrics": metrics}),
    ))
}

/// Each waypoint pod (of a Gateway of class `ambit-waypoint`), in the shape of
/// `inspect::waypoint`; none when the Gateway API is not served.
pub async fn waypoints(client: &Client) -> Vec<Value> {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "gateways");
    let Ok(gateways) = Api::<DynamicObject>::all_with(client.clone(), &ar)
        .list(&ListParams::default())
        .await
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for gw in gateways.items {
        if gw.data["spec"]["gatewayClassName"] != ambit_manifests::WAYPOINT_CLASS {
            continue;
        }
        let ns = gw.metadata.namespace.clone().unwrap_or_default();
        let gname = gw.metadata.name.clone().unwrap_or_default();
        let selector = format!("{}={gname}", ambit_manifests::waypoint::GATEWAY_NAME_LABEL);
        for p in pods(client, &ns, &selector).await.unwrap_or_default() {
            let pod_name = name(&p);
            let ready = matches!(
                get(
                    client,
                    &ns,
                    &pod_name,
                    ZTUNNEL_READINESS_PORT,
                    "/healthz/ready"
                )
                .await,
                Ok((200, _))
            );
            out.push(json!({
                "gateway": format!("{ns}/{gname}"), "pod": format!("{ns}/{pod_name}"),
                "ip": p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                "running": running(&p), "ready": ready,
            }));
        }
    }
    out
}
