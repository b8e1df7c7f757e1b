//! The real binaries together: `ambit-controller` in local mode (a folder of Kubernetes YAML,
//! its own generated root, node credentials) serving discovery and the CA over TLS, and one
//! `ztunnel` per node that learns the pods from it, gets their certificates from it
//! (`CreateCertificate` with the node's bearer token) and carries their traffic over HBONE;
//! a PeerAuthentication dropped into the folder reaches the ztunnels and turns plaintext
//! away; the namespace's `ambit.dev/outbound-policy=REGISTRY_ONLY` label then refuses an
//! address outside the mesh until an ExternalService declares it. Needs root.

use std::net::{IpAddr, SocketAddr};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{ReplyServer, Topology};
use anyhow::Context;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_ztunnels_as_processes_carry_hbone_with_ca_issued_identities(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_ctrl")
        .pod("plain", "n1")
        .pod("outside", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let plain = topo.pod("plain").clone();
    // In no file: an address the mesh does not know.
    let outside = topo.pod("outside").clone();
    let (controller_bin, ztunnel_bin) = blocking(|| {
        Ok((
            ambit_tests::workspace_bin("ambit-controller"),
            ambit_tests::workspace_bin("ztunnel"),
        ))
    })
    .await?;
    let dir = std::env::temp_dir().join(format!("ambit-{}-ctrl", topo.prefix()));
    let objects = dir.join("objects");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&objects)?;
    let mesh_yaml = |shop_labels: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    \
             ambit.dev/dataplane-mode: ambient\n{shop_labels}\
             ---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n{}{}{}",
            pod_yaml(&client, "shop", "client", "n1"),
            pod_yaml(&srv, "shop", "srv", "n2"),
            // Not enrolled: it speaks plaintext to the mesh.
            pod_yaml(&plain, "legacy", "plain", "n1"),
        )
    };
    std::fs::write(objects.join("mesh.yaml"), mesh_yaml(""))?;
    let app = ReplyServer::start(&srv, 8080)?;

    let grpc = free_port()?;
    let ops = free_port()?;
    let netns_dir = topo.netns_dir().to_path_buf();
    let (mut controller, mut zs) = blocking({
        let dir = dir.clone();
        move || {
            let mut controller = Proc::spawn(
                &controller_bin,
                &[
                    "--local-dir".into(),
                    objects.display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{grpc}"),
                    "--ops-listen".into(),
                    format!("127.0.0.1:{ops}"),
                    "--state-dir".into(),
                    state_dir.display().to_string(),
                    "--nodes".into(),
                    "n1,n2".into(),
                ],
                dir.join("controller.log"),
            )?;
            let root = state_dir.join("ca").join("root-cert.pem");
            let token = |n: &str| state_dir.join("credentials").join(format!("{n}.token"));
            wait("the controller's root and node credentials", || {
                controller.check_alive()?;
                Ok(root.exists() && token("n1").exists() && token("n2").exists())
            })?;
            let mut zs = Vec::new();
            for node in ["n1", "n2"] {
                let readiness = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                let z = Proc::spawn(
                    &ztunnel_bin,
                    &[
                        "--node".into(),
                        node.into(),
                        "--controller".into(),
                        format!("https://127.0.0.1:{grpc}"),
                        "--ca-root-file".into(),
                        root.display().to_string(),
                        "--credential-file".into(),
                        token(node).display().to_string(),
                        "--netns-dir".into(),
                        netns_dir.display().to_string(),
                        "--data-dir".into(),
                        dir.join(format!("data-{node}")).display().to_string(),
                        "--metrics-addr".into(),
                        metrics.to_string(),
                        "--readiness-addr".into(),
                        readiness.to_string(),
                        "--admin-addr".into(),
                        format!("127.0.0.1:{}", free_port()?),
                        "--drain-seconds".into(),
                        "2".into(),
                    ],
                    dir.join(format!("{node}.log")),
                )?;
                zs.push((z, readiness, metrics));
            }
            for (z, readiness, _) in zs.iter_mut() {
                z.wait_http_ok(*readiness, "/healthz/ready")
                    .context("ztunnel readiness")?;
            }
            Ok((controller, zs))
        }
    })
    .await?;

    eventually("capture rules in both pods", || {
        captured(&client) && captured(&srv)
    })
    .await?;
    let seen = round_trip(&client, app.addr(), b"via-controller").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));

    // n1 tunnelled it as the client's CA-issued identity to the server's.
    let metrics = zs[0].2;
    blocking(move || {
        wait("n1 metrics", || {
            let (_, body) = http_get(metrics, "/metrics")?;
            Ok(body.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/srv\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            }))
        })
    })
    .await?;

    // Plaintext is accepted by default (PERMISSIVE); a STRICT PeerAuthentication for the
    // namespace, written into the folder, reaches the ztunnels (their Hello accepts the
    // kind) and turns it away, while HBONE still passes.
    let seen = round_trip(&plain, app.addr(), b"plaintext").await?;
    assert_eq!(seen.ip(), IpAddr::from(plain.ip));
    std::fs::write(
        dir.join("objects").join("strict.yaml"),
        "apiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    )?;
    let dst = app.addr();
    let refused = || {
        let plain = plain.clone();
        blocking(move || {
            let Ok(mut s) = ambit_tests::connect_from(&plain, dst) else {
                return Ok(true);
            };
            Ok(ambit_tests::read_greeting(&mut s).is_err())
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !refused().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "plaintext still accepted {WAIT:?} after the STRICT PeerAuthentication was written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let served = app.seen().len();
    anyhow::ensure!(refused().await?, "plaintext accepted again");
    assert_eq!(
        app.seen().len(),
        served,
        "refused plaintext reached the app"
    );
    let seen = round_trip(&client, app.addr(), b"still-hbone").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));

    // Egress: ALLOW_ANY by default; the namespace label turns the unknown address away
    // (the workload carries the policy), and an ExternalService declaring it lets it out
    // (the ztunnels' Hello accepts the kind).
    let ext = ReplyServer::start(&outside, 8080)?;
    let seen = round_trip(&client, ext.addr(), b"allow-any").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    std::fs::write(
        dir.join("objects").join("mesh.yaml"),
        mesh_yaml("    ambit.dev/outbound-policy: REGISTRY_ONLY\n"),
    )?;
    let to_ext = || {
        let client = client.clone();
        let dst = ext.addr();
        blocking(move || {
            let Ok(mut s) = ambit_tests::connect_from(&client, dst) else {
                return Ok(false);
            };
            Ok(ambit_tests::read_greeting(&mut s).is_ok())
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while to_ext().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the unknown address still reached {WAIT:?} after REGISTRY_ONLY was set"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    std::fs::write(
        dir.join("objects").join("external.yaml"),
        format!(
            "apiVersion: networking.ambit.dev/v1\nkind: ExternalService\n\
             metadata: {{name: outside, namespace: shop}}\n\
             spec: {{hosts: [outside.example], addresses: ['{}'], ports: [{{number: 8080}}]}}\n",
            outside.ip
        ),
    )?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !to_ext().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the declared ExternalService still refused {WAIT:?} after it was written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let seen = round_trip(&client, ext.addr(), b"declared").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    drop(ext);

    for (z, _, _) in zs.iter_mut() {
        let status = z.terminate()?;
        assert!(status.success(), "ztunnel exit {status}: {}", z.logs());
    }
    let _ = controller.terminate();
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
