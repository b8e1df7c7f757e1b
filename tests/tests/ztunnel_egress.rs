//! ztunnel end to end, egress: a namespace's outbound policy and declared ExternalServices.
//! Under REGISTRY_ONLY a destination the mesh does not know is refused (the client sees the
//! close, the access log names the policy, the refusal is counted) while a declared external
//! service is reached directly (the server outside the mesh sees the pod's own address), also
//! through a STATIC endpoint; ALLOW_ANY still passes unknown destinations through. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{Pod, ReplyServer, Topology};

const REFUSED: &str = "ambit_ztunnel_connections_refused_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_unknown_destinations_and_allows_declared_external_services(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_egress")
        .node("n1")
        .node("n2")
        .pod("locked", "n1")
        .pod("open", "n1")
        .pod("ext", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (locked, open, ext) = (topo.pod("locked"), topo.pod("open"), topo.pod("ext"));
    // `ext` is outside the mesh: the state does not know its address at all.
    let workloads = format!(
        "workloads:\n{}    outboundPolicy: REGISTRY_ONLY\n{}",
        workload(locked, "eg-locked", "client", "n1", true),
        workload(open, "eg-open", "client", "n1", true),
    );
    let log = access_log();
    let mesh = Mesh::two_nodes(&topo, &workloads).await?;
    mesh.wait_enrolled("n1", &uid("eg-locked", locked), true)
        .await?;
    mesh.wait_enrolled("n1", &uid("eg-open", open), true)
        .await?;
    let declared = ReplyServer::start(ext, 8080)?;
    let other_port = ReplyServer::start(ext, 9090)?;
    let undeclared = ReplyServer::start(ext, 7070)?;
    let n1 = mesh.app("n1");

    // ALLOW_ANY (the default): an unknown destination is passed through from the pod's IP.
    let seen = round_trip(open, declared.addr(), b"allow any").await?;
    assert_eq!(seen.ip(), IpAddr::from(open.ip));

    // REGISTRY_ONLY: refused before it leaves; nothing reaches the server.
    let before = declared.seen().len();
    refused(locked, declared.addr()).await?;
    assert_eq!(
        declared.seen().len(),
        before,
        "a refused connection arrived"
    );
    let src = format!("\"src.addr\":\"{}:", locked.ip);
    let dst = format!("\"dst.addr\":\"{}\"", declared.addr());
    eventually("the refusal is logged", || {
        !access_lines(&log, &[&src, &dst, "REGISTRY_ONLY"]).is_empty()
    })
    .await?;
    let line = &access_lines(&log, &[&src, &dst, "REGISTRY_ONLY"])[0];
    assert_eq!(
        line["reason"],
        format!(
            "outbound policy REGISTRY_ONLY of namespace eg-locked: {} is neither a mesh \
             destination nor a declared ExternalService",
            declared.addr()
        )
    );
    assert_eq!(line["response_flags"], "RBAC");
    eventually("the refusal is counted", || {
        metric(n1, REFUSED, &[("reason", "registry_only")]) >= 1
    })
    .await?;

    // Declared: the address on 8080, and a STATIC service whose address (no host answers
    // there) sends its port 80 to the endpoint's port 9090.
    let with_external = format!(
        "{workloads}\
externalServices:
  - name: ext-api
    namespace: eg-locked
    hosts: [api.ext.example]
    addresses: [{ip}/32]
    ports: [{{number: 8080, name: http, protocol: HTTP}}]
  - name: ext-static
    namespace: eg-locked
    hosts: [static.ext.example]
    addresses: [192.0.2.80]
    ports: [{{number: 80, name: http}}]
    resolution: STATIC
    endpoints: [{{address: {ip}, ports: {{http: 9090}}}}]
",
        ip = ext.ip
    );
    mesh.set_state(&with_external).await?;
    eventually("the external services reach n1", || {
        n1.state().snapshot().external_services().count() == 2
    })
    .await?;
    let seen = round_trip(locked, declared.addr(), b"declared").await?;
    assert_eq!(
        seen.ip(),
        IpAddr::from(locked.ip),
        "not the pod's own address"
    );
    let static_addr: SocketAddr = "192.0.2.80:80".parse()?;
    let before = other_port.seen().len();
    let seen = round_trip(locked, static_addr, b"static").await?;
    assert_eq!(seen.ip(), IpAddr::from(locked.ip));
    assert_eq!(
        other_port.seen().len(),
        before + 1,
        "the endpoint was not reached"
    );
    eventually("the access log names the external service", || {
        !access_lines(&log, &[&src, &dst, "\"dst.service\":\"api.ext.example\""]).is_empty()
    })
    .await?;
    // The STATIC endpoint dialled directly on its own port is the service's too; a port
    // neither service declares is still refused.
    round_trip(locked, other_port.addr(), b"endpoint").await?;
    refused(locked, undeclared.addr()).await?;
    assert!(
        undeclared.seen().is_empty(),
        "an undeclared port was reached"
    );

    drop((declared, other_port, undeclared));
    mesh.shutdown().await;
    Ok(())
}

/// The pod's resolv.conf as `ip netns exec` shows it (`/etc/netns/<name>/resolv.conf`);
/// removed on Drop. Its nameserver is never reached for mesh names: port 53 is captured.
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn write(pod: &Pod, nameserver: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let dir = std::path::PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
        )?;
        Ok(ResolvConf(dir))
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_resolves_a_declared_external_host_to_its_vip_and_reaches_the_service(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_egress_dns")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("ext", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, ext) = (topo.pod("client"), topo.pod("ext"));
    // The VIP as the controller allocates them (240.240.0.0/16); the service's only
    // instance is the server outside the mesh, on 9090.
    let state = format!(
        "workloads:\n{}    outboundPolicy: REGISTRY_ONLY\n\
externalServices:
  - name: billing
    namespace: eg-dns
    hosts: [billing.ext.example]
    ports: [{{number: 80, name: http, targetPort: 9090}}]
    resolution: STATIC
    endpoints: [{{address: {ip}}}]
    vips: [{{host: billing.ext.example, address: 240.240.7.7}}]
",
        workload(client, "eg-dns", "client", "n1", true),
        ip = ext.ip
    );
    let _conf = ResolvConf::write(client, ext.ip)?;
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1"], &state, ca, |_, c| {
        c.dns = ambit_ztunnel::dns::DnsSettings::default();
    })
    .await?;
    mesh.wait_enrolled("n1", &uid("eg-dns", client), true)
        .await?;
    let server = ReplyServer::start(ext, 9090)?;

    // The C library's resolver, through the captured port 53: ztunnel answers the VIP.
    let netns = client.netns.clone();
    let out = blocking(move || {
        ambit_tests::exec_in(&netns, &["getent", "ahostsv4", "billing.ext.example."])
    })
    .await?;
    let vip = out.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(vip, "240.240.7.7", "getent printed {out:?}");

    // Dialled at the VIP, ztunnel sends it to the STATIC endpoint's target port.
    let seen = round_trip(client, format!("{vip}:80").parse()?, b"billing").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    assert_eq!(server.seen().len(), 1);

    drop(server);
    mesh.shutdown().await;
    Ok(())
}
