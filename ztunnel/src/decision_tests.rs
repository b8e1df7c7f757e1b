//! Table tests of outbound and inbound decisions against one fixture mesh.

use super::*;
use crate::state::fixtures::{self, *};
use crate::state::Store;
use ambit_proto::discovery as pb;
use pb::{PolicyAction as A, PolicyScope as S};
use rand::rngs::StdRng;
use rand::SeedableRng;

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/app/sa/waypoint";

fn zoned(mut w: pb::Workload, zone: &str) -> pb::Workload {
    w.zone = zone.into();
    w
}

/// client (node-1, z1); s1 (node-1, z1), s2 (node-2, z1), s3 (node-3, z2); a waypoint; a
/// pod behind it; a pod outside the mesh; services over them.
fn mesh() -> Arc<State> {
    let mut legacy = workload("legacy", "l", "default", "node-2", "10.0.4.1");
    legacy.tunnel_protocol = pb::TunnelProtocol::None as i32;
    legacy
        .addresses
        .push(crate::state::ip_to_bytes(ip("fd00::4:1")));
    let mut wp = workload("app", "wp", "waypoint", "node-2", "10.0.5.1");
    wp.is_waypoint = true;
    let mut guarded = workload("app", "guarded", "guarded", "node-2", "10.0.6.1");
    guarded.waypoint = Some(gateway("10.0.5.1", WAYPOINT_ID));
    let mut behind_wp = service("app", "wp-svc", "10.96.0.5", 80, 8080, &["app/s2"]);
    behind_wp.waypoint = Some(gateway("10.0.5.1", WAYPOINT_ID));
    let mut behind_wp_vip = service("app", "wp-vip-svc", "10.96.0.7", 80, 8080, &["app/s2"]);
    behind_wp_vip.waypoint = Some(gateway("10.96.0.9", WAYPOINT_ID));
    let mut empty = service(
        "app",
        "empty",
        "10.96.0.4",
        80,
        8080,
        &["app/s1", "app/gone"],
    );
    empty.endpoints[0].ready = false;
    let mut s2 = zoned(workload("app", "s2", "s2", "node-2", "10.0.2.20"), "z1");
    s2.addresses
        .push(crate::state::ip_to_bytes(ip("fd00::2:20")));
    let mut wp_down = service("app", "wp-down-svc", "10.96.0.11", 80, 8080, &["app/s2"]);
    wp_down.waypoint = Some(gateway("10.96.0.12", WAYPOINT_ID));
    let mut override_port = service("app", "override", "10.96.0.8", 80, 8080, &["app/s3"]);
    override_port.endpoints[0].ports.insert(80, 9999);
    let push = full(
        1,
        vec![
            res_w(zoned(
                workload("client", "c", "curl", "node-1", "10.0.1.10"),
                "z1",
            )),
            res_w(zoned(
                workload("app", "s1", "s1", "node-1", "10.0.1.20"),
                "z1",
            )),
            res_w(s2),
            res_w(zoned(
                workload("app", "s3", "s3", "node-3", "10.0.3.20"),
                "z2",
            )),
            res_w(legacy),
            res_w(wp),
            res_w(guarded),
            res_s(service(
                "app",
                "web",
                "10.96.0.1",
                80,
                8080,
                &["app/s3", "app/s2", "app/s1"],
            )),
            res_s(service(
                "app",
                "remote",
                "10.96.0.2",
                80,
                8080,
                &["app/s3", "app/s2"],
            )),
            res_s(service("app", "far", "10.96.0.3", 80, 8080, &["app/s3"])),
            res_s(empty),
            res_s(behind_wp),
            res_s(behind_wp_vip),
            res_s(service(
                "app",
                "waypoint",
                "10.96.0.9",
                15008,
                15008,
                &["app/wp"],
            )),
            res_s(service(
                "legacy",
                "old",
                "10.96.0.6",
                80,
                9000,
                &["legacy/l"],
            )),
            res_s(override_port),
            res_s(service("app", "web6", "fd00:96::1", 80, 8080, &["app/s2"])),
            res_s(wp_down),
            res_s(service(
                "app",
                "waypoint-down",
                "10.96.0.12",
                15008,
                15008,
                &[],
            )),
            res_a(fixtures::policy(
                "app",
                "deny-9090",
                S::Namespace,
                A::Deny,
                vec![pb::Rule {
                    to: vec![pb::Operation {
                        ports: vec![9090],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )),
            res_a(fixtures::policy(
                "app",
                "deny-v6-block",
                S::Namespace,
                A::Deny,
                vec![pb::Rule {
                    from: vec![pb::Source {
                        ip_blocks: vec![pb::IpBlock {
                            address: crate::state::ip_to_bytes(ip("fd00:bad::")),
                            prefix_len: 32,
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )),
            res_a(fixtures::policy(
                "legacy",
                "principals-only",
                S::Namespace,
                A::Allow,
                vec![pb::Rule {
                    from: vec![pb::Source {
                        principals: vec![presence()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )),
        ],
    );
    let mut store = Store::new(None);
    store.apply(push).expect("fixture applies");
    store.snapshot()
}

fn first(_: &Service, _: &[Candidate<'_>]) -> usize {
    0
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

/// A compact view of a decision for table comparison.
fn summary(o: &Outbound) -> String {
    match o {
        Outbound::Passthrough { destination, .. } => format!("passthrough {destination}"),
        Outbound::Hbone {
            peer,
            authority,
            expected_identity,
            service,
            ..
        } => format!(
            "hbone {peer} {authority} {expected_identity} svc={}",
            service.as_ref().map(|s| &*s.name).unwrap_or("-")
        ),
        Outbound::Waypoint {
            peer,
            authority,
            expected_identity,
            ..
        } => format!("waypoint {peer} {authority} {expected_identity}"),
        Outbound::Refuse(r) => format!("refuse {r}"),
        Outbound::SelfDial { destination } => format!("self-dial {destination}"),
        Outbound::External {
            destination,
            service,
        } => format!("external {destination} {}", service.key()),
        Outbound::Blocked { reason, .. } => format!("blocked {reason}"),
        Outbound::ExternalDns {
            host,
            port,
            service,
        } => format!("external-dns {host}:{port} {}", service.key()),
    }
}

#[test]
fn outbound_table() {
    let s = mesh();
    let client = s.workload_by_uid("client/c").unwrap().clone();
    let waypoint = s.workload_by_uid("app/wp").unwrap().clone();
    let s2 = s.workload_by_uid("app/s2").unwrap().clone();
    let cases: Vec<(&str, &Arc<Workload>, &str, &str)> = vec![
        (
            "unknown address",
            &client,
            "8.8.8.8:443",
            "passthrough 8.8.8.8:443",
        ),
        (
            "pod address",
            &client,
            "10.0.2.20:8080",
            "hbone 10.0.2.20:15008 10.0.2.20:8080 spiffe://cluster.local/ns/app/sa/s2 svc=-",
        ),
        (
            "VIP prefers same node",
            &client,
            "10.96.0.1:80",
            "hbone 10.0.1.20:15008 10.0.1.20:8080 spiffe://cluster.local/ns/app/sa/s1 svc=web",
        ),
        (
            "VIP then same zone",
            &client,
            "10.96.0.2:80",
            "hbone 10.0.2.20:15008 10.0.2.20:8080 spiffe://cluster.local/ns/app/sa/s2 svc=remote",
        ),
        (
            "VIP then anywhere",
            &client,
            "10.96.0.3:80",
            "hbone 10.0.3.20:15008 10.0.3.20:8080 spiffe://cluster.local/ns/app/sa/s3 svc=far",
        ),
        (
            "endpoint port override",
            &client,
            "10.96.0.8:80",
            "hbone 10.0.3.20:15008 10.0.3.20:9999 spiffe://cluster.local/ns/app/sa/s3 svc=override",
        ),
        (
            "port not exposed",
            &client,
            "10.96.0.1:81",
            "refuse service app/web does not expose port 81",
        ),
        (
            "no ready endpoint",
            &client,
            "10.96.0.4:80",
            "refuse service app/empty has no ready endpoint for port 80",
        ),
        (
            "service waypoint",
            &client,
            "10.96.0.5:80",
            "waypoint 10.0.5.1:15008 10.96.0.5:80 spiffe://cluster.local/ns/app/sa/waypoint",
        ),
        (
            "waypoint addressed by VIP resolves to its pod",
            &client,
            "10.96.0.7:80",
            "waypoint 10.0.5.1:15008 10.96.0.7:80 spiffe://cluster.local/ns/app/sa/waypoint",
        ),
        (
            "the waypoint itself goes to the endpoint",
            &waypoint,
            "10.96.0.5:80",
            "hbone 10.0.2.20:15008 10.0.2.20:8080 spiffe://cluster.local/ns/app/sa/s2 svc=wp-svc",
        ),
        (
            "workload waypoint",
            &client,
            "10.0.6.1:8080",
            "waypoint 10.0.5.1:15008 10.0.6.1:8080 spiffe://cluster.local/ns/app/sa/waypoint",
        ),
        (
            "waypoint to its guarded pod",
            &waypoint,
            "10.0.6.1:8080",
            "hbone 10.0.6.1:15008 10.0.6.1:8080 spiffe://cluster.local/ns/app/sa/guarded svc=-",
        ),
        (
            "waypoint without a ready pod",
            &client,
            "10.96.0.11:80",
            "refuse waypoint 10.96.0.12 (spiffe://cluster.local/ns/app/sa/waypoint) has no ready endpoint",
        ),
        (
            "IPv6 VIP picks the endpoint's IPv6 address",
            &client,
            "[fd00:96::1]:80",
            "hbone [fd00::2:20]:15008 [fd00::2:20]:8080 spiffe://cluster.local/ns/app/sa/s2 svc=web6",
        ),
        (
            "IPv6 pod address",
            &client,
            "[fd00::2:20]:8080",
            "hbone [fd00::2:20]:15008 [fd00::2:20]:8080 spiffe://cluster.local/ns/app/sa/s2 svc=-",
        ),
        (
            "pod outside the mesh",
            &client,
            "10.0.4.1:9000",
            "passthrough 10.0.4.1:9000",
        ),
        (
            "IPv6 of a pod outside the mesh",
            &client,
            "[fd00::4:1]:9000",
            "passthrough [fd00::4:1]:9000",
        ),
        // IPv6 that cannot be meshed is not let out: an address the mesh does not know may
        // be a meshed pod's IPv6 that the mesh has no record of.
        (
            "unknown IPv6 address",
            &client,
            "[2001:db8::1]:443",
            "refuse 2001:db8::1 is not an IPv6 address the mesh knows: IPv6 that cannot be meshed is not let out",
        ),
        (
            "IPv6 of a meshed pod the mesh only knows by IPv4",
            &client,
            "[fd00::1:20]:8080",
            "refuse fd00::1:20 is not an IPv6 address the mesh knows: IPv6 that cannot be meshed is not let out",
        ),
        (
            "IPv4-mapped unknown address is IPv4",
            &client,
            "[::ffff:8.8.8.8]:443",
            "passthrough 8.8.8.8:443",
        ),
        (
            "VIP of pods outside the mesh",
            &client,
            "10.96.0.6:80",
            "passthrough 10.0.4.1:9000",
        ),
        (
            "IPv4-mapped destination",
            &client,
            "[::ffff:10.0.2.20]:8080",
            "hbone 10.0.2.20:15008 10.0.2.20:8080 spiffe://cluster.local/ns/app/sa/s2 svc=-",
        ),
        // An un-NATed connection to the outbound listener reports the listener itself as its
        // original destination; passing it through would dial 15001 again, forever.
        (
            "loopback outbound listener",
            &client,
            "127.0.0.1:15001",
            "self-dial 127.0.0.1:15001",
        ),
        (
            "any loopback address",
            &client,
            "127.0.0.53:15053",
            "self-dial 127.0.0.53:15053",
        ),
        (
            "IPv6 loopback",
            &client,
            "[::1]:15006",
            "self-dial [::1]:15006",
        ),
        (
            "IPv4-mapped loopback",
            &client,
            "[::ffff:127.0.0.1]:15001",
            "self-dial 127.0.0.1:15001",
        ),
        (
            "unspecified address connects locally",
            &client,
            "0.0.0.0:15001",
            "self-dial 0.0.0.0:15001",
        ),
        (
            "IPv6 unspecified address",
            &s2,
            "[::]:15008",
            "self-dial [::]:15008",
        ),
        (
            "IPv6 loopback app port stays in the pod",
            &client,
            "[::1]:8080",
            "passthrough [::1]:8080",
        ),
        (
            "the pod's own address, HBONE port",
            &client,
            "10.0.1.10:15008",
            "self-dial 10.0.1.10:15008",
        ),
        (
            "the pod's own address, inbound port",
            &client,
            "10.0.1.10:15006",
            "self-dial 10.0.1.10:15006",
        ),
        (
            "the pod's own IPv6 address",
            &s2,
            "[fd00::2:20]:15001",
            "self-dial [fd00::2:20]:15001",
        ),
        // Not loops: another pod's 15008 is its HBONE port (a mesh peer dialling it directly
        // is refused at that peer, not here), loopback on other ports is the pod's own app.
        (
            "another pod's HBONE port",
            &client,
            "10.0.2.20:15008",
            "hbone 10.0.2.20:15008 10.0.2.20:15008 spiffe://cluster.local/ns/app/sa/s2 svc=-",
        ),
        (
            "loopback app port",
            &client,
            "127.0.0.1:8080",
            "passthrough 127.0.0.1:8080",
        ),
        (
            "ops port on loopback is the pod's own business",
            &client,
            "127.0.0.1:15000",
            "passthrough 127.0.0.1:15000",
        ),
    ];
    for (name, source, dst, want) in cases {
        let got = summary(&outbound(&s, source, sa(dst), &first));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn udp_flows_decide_as_tcp_but_never_through_a_waypoint() {
    let s = mesh();
    let client = s.workload_by_uid("client/c").unwrap().clone();
    let first = |_: &Service, _: &[Candidate<'_>]| 0;
    let cases = [
        (
            "meshed pod",
            "10.0.2.20:5353",
            "hbone 10.0.2.20:15008 10.0.2.20:5353 spiffe://cluster.local/ns/app/sa/s2 svc=-",
        ),
        (
            "pod behind a waypoint",
            "10.0.6.1:8080",
            "refuse UDP to 10.0.6.1:8080 is not carried: its destination is behind a waypoint, which carries TCP only",
        ),
        (
            "service behind a waypoint",
            "10.96.0.5:80",
            "refuse UDP to 10.96.0.5:80 is not carried: its destination is behind a waypoint, which carries TCP only",
        ),
        ("pod outside the mesh", "10.0.4.1:53", "passthrough 10.0.4.1:53"),
    ];
    for (name, dst, want) in cases {
        assert_eq!(
            summary(&outbound_udp(&s, &client, sa(dst), &first)),
            want,
            "{name}"
        );
        // Everything but the waypoint is the TCP decision.
        if !want.starts_with("refuse") {
            assert_eq!(summary(&outbound(&s, &client, sa(dst), &first)), want);
        }
    }
}

#[test]
fn balancer_modes() {
    let s = mesh();
    let svc = s.service_by_vip(ip("10.96.0.1")).unwrap();
    let all: Vec<Candidate> = svc
        .endpoints
        .iter()
        .map(|e| Candidate {
            workload: s.workload_by_uid(&e.workload_uid).unwrap(),
            endpoint: e,
        })
        .collect();
    let b = Balancer::with_rng(StdRng::seed_from_u64(1));

    let mut lc = (**svc).clone();
    lc.load_balancing = LoadBalancing::LeastConnections;
    let _g1 = b.track(all[0].workload.uid.clone());
    let _g2 = b.track(all[1].workload.uid.clone());
    assert_eq!(b.choose(&lc, &all), 2, "the idle endpoint");
    {
        let _g3 = b.track(all[2].workload.uid.clone());
        let _g4 = b.track(all[2].workload.uid.clone());
        assert_eq!(b.connections(&all[2].workload.uid), 2);
        assert_ne!(b.choose(&lc, &all), 2);
    }
    assert_eq!(b.connections(&all[2].workload.uid), 0, "guards release");

    let mut rr = (**svc).clone();
    rr.load_balancing = LoadBalancing::RoundRobin;
    let picks: Vec<usize> = (0..6).map(|_| b.choose(&rr, &all)).collect();
    assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);

    // Random: deterministic under a seed, spread over every candidate.
    let pick = |seed| {
        let b = Balancer::with_rng(StdRng::seed_from_u64(seed));
        (0..60).map(|_| b.choose(svc, &all)).collect::<Vec<_>>()
    };
    assert_eq!(pick(9), pick(9));
    let p = pick(9);
    assert!((0..3).all(|i| p.contains(&i)), "{p:?}");
}

/// Name, pod behind the listener, peer identity, authority, accepted reason or refusal.
type InboundCase<'a> = (
    &'a str,
    &'a Workload,
    Option<&'a Identity>,
    &'a str,
    Result<&'a str, (u16, &'a str)>,
);

#[test]
fn inbound_table() {
    let s = mesh();
    let client: Identity = "spiffe://cluster.local/ns/client/sa/curl".parse().unwrap();
    let waypoint: Identity = WAYPOINT_ID.parse().unwrap();
    let s1 = s.workload_by_uid("app/s1").unwrap();
    let guarded = s.workload_by_uid("app/guarded").unwrap();
    let legacy = s.workload_by_uid("legacy/l").unwrap();
    let from = ip("10.0.1.10");
    let cases: Vec<InboundCase> = vec![
        (
            "accepted",
            s1,
            Some(&client),
            "10.0.1.20:8080",
            Ok("no ALLOW policy applies"),
        ),
        (
            "malformed authority",
            s1,
            Some(&client),
            "web:80",
            Err((400, "is not an ip:port")),
        ),
        (
            "spoofed authority",
            s1,
            Some(&client),
            "10.0.2.20:8080",
            Err((400, "10.0.2.20 is not the pod behind this listener (app/s1")),
        ),
        (
            "ztunnel port loop",
            s1,
            Some(&client),
            "10.0.1.20:15008",
            Err((400, "port 15008 is one of ztunnel's own ports")),
        ),
        (
            "admin port loop",
            s1,
            Some(&client),
            "10.0.1.20:15000",
            Err((400, "loop")),
        ),
        (
            "no identity",
            s1,
            None,
            "10.0.1.20:8080",
            Err((401, "without a peer identity")),
        ),
        (
            "policy denies",
            s1,
            Some(&client),
            "10.0.1.20:9090",
            Err((403, "denied by app/deny-9090 (rule 0)")),
        ),
        (
            "waypoint bypass",
            guarded,
            Some(&client),
            "10.0.6.1:8080",
            Err((403, "must be reached through its waypoint")),
        ),
        (
            "through the waypoint",
            guarded,
            Some(&waypoint),
            "10.0.6.1:8080",
            Ok("no ALLOW"),
        ),
        (
            "not in the mesh",
            legacy,
            Some(&client),
            "10.0.4.1:9000",
            Err((503, "not in the mesh")),
        ),
    ];
    for (name, pod, peer, authority, want) in cases {
        let got = inbound(&s, pod, peer, from, authority);
        match (want, &got) {
            (
                Ok(reason),
                Inbound::Accept {
                    reason: r,
                    destination,
                    ..
                },
            ) => {
                assert!(r.contains(reason), "{name}: {got:?}");
                assert_eq!(destination.to_string(), authority, "{name}");
            }
            (
                Err((status, reason)),
                Inbound::Refuse {
                    status: st,
                    reason: r,
                    ..
                },
            ) => {
                assert_eq!(*st, status, "{name}: {got:?}");
                assert!(r.contains(reason), "{name}: {r:?} lacks {reason:?}");
            }
            _ => panic!("{name}: {got:?} but wanted {want:?}"),
        }
    }
}

#[test]
fn inbound_ipv6() {
    let s = mesh();
    let s2 = s.workload_by_uid("app/s2").unwrap();
    let client: Identity = "spiffe://cluster.local/ns/client/sa/curl".parse().unwrap();
    let decide = |from: &str, authority: &str| inbound(&s, s2, Some(&client), ip(from), authority);
    // The pod's IPv6 address as `[addr]:port`, from an IPv6 client.
    let ok = decide("fd00::1:10", "[fd00::2:20]:8080");
    assert!(
        matches!(ok, Inbound::Accept { destination, .. } if destination == sa("[fd00::2:20]:8080")),
        "{ok:?}"
    );
    // A DENY with an IPv6 ipBlock stops clients inside it, of either transport.
    let denied = decide("fd00:bad::7", "[fd00::2:20]:8080");
    assert!(
        matches!(denied, Inbound::Refuse { status: 403, ref reason, ref denied_by }
            if reason.contains("app/deny-v6-block") && denied_by.as_deref() == Some("app/deny-v6-block")),
        "{denied:?}"
    );
    let plain = super::inbound_plaintext(
        &s,
        s2,
        ip("fd00:bad::7"),
        sa("[fd00::2:20]:8080"),
        MtlsMode::Permissive,
    );
    assert!(
        matches!(plain, Inbound::Refuse { status: 403, .. }),
        "{plain:?}"
    );
    // ... and nobody outside it, nor an IPv4 client.
    assert!(matches!(
        decide("fd00:bae::7", "[fd00::2:20]:8080"),
        Inbound::Accept { .. }
    ));
    assert!(matches!(
        decide("10.0.1.10", "[fd00::2:20]:8080"),
        Inbound::Accept { .. }
    ));
    // Another pod's IPv6, a ztunnel port over IPv6, an unbracketed IPv6 authority.
    for (authority, status) in [
        ("[fd00::1:20]:8080", 400),
        ("[fd00::2:20]:15008", 400),
        ("fd00::2:20:8080", 400),
    ] {
        let got = decide("fd00::1:10", authority);
        assert!(
            matches!(got, Inbound::Refuse { status: st, .. } if st == status),
            "{authority}: {got:?}"
        );
    }
}

#[test]
fn inbound_plaintext() {
    let s = mesh();
    let s1 = s.workload_by_uid("app/s1").unwrap();
    let from = ip("10.0.9.9");
    let strict = super::inbound_plaintext(&s, s1, from, sa("10.0.1.20:8080"), MtlsMode::Strict);
    assert!(
        matches!(strict, Inbound::Refuse { status: 401, ref reason, denied_by: None } if reason == "plaintext refused: mTLS STRICT by the proxy's default"),
        "{strict:?}"
    );
    let ok = super::inbound_plaintext(&s, s1, from, sa("10.0.1.20:8080"), MtlsMode::Permissive);
    assert!(matches!(ok, Inbound::Accept { .. }), "{ok:?}");
    let denied = super::inbound_plaintext(&s, s1, from, sa("10.0.1.20:9090"), MtlsMode::Permissive);
    assert!(
        matches!(denied, Inbound::Refuse { status: 403, .. }),
        "{denied:?}"
    );
    let looped =
        super::inbound_plaintext(&s, s1, from, sa("10.0.1.20:15006"), MtlsMode::Permissive);
    assert!(
        matches!(looped, Inbound::Refuse { status: 400, .. }),
        "{looped:?}"
    );

    // A principal-only ALLOW policy cannot match plaintext (no identity), HBONE passes.
    let mut mesh_legacy = (**s.workload_by_uid("legacy/l").unwrap()).clone();
    mesh_legacy.protocol = TunnelProtocol::Hbone;
    let plain = super::inbound_plaintext(
        &s,
        &mesh_legacy,
        from,
        sa("10.0.4.1:9000"),
        MtlsMode::Permissive,
    );
    assert!(
        matches!(plain, Inbound::Refuse { status: 403, ref reason, ref denied_by }
            if reason.contains("legacy/principals-only") && denied_by.as_deref() == Some("no ALLOW policy matched (legacy/principals-only)")),
        "{plain:?}"
    );
    let id: Identity = "spiffe://cluster.local/ns/client/sa/curl".parse().unwrap();
    let tunnelled = inbound(&s, &mesh_legacy, Some(&id), from, "10.0.4.1:9000");
    assert!(matches!(tunnelled, Inbound::Accept { .. }), "{tunnelled:?}");
}

/// PeerAuthentication on the plaintext path: what each level says, as a connection to
/// workload `web` (labels app=web) or `db` of namespace `shop` meets it.
#[test]
fn inbound_plaintext_follows_peer_authentication() {
    use pb::MtlsMode as M;
    let mut web = workload("shop", "web", "web", "node-1", "10.0.7.1");
    web.labels.insert("app".into(), "web".into());
    let mut db = workload("shop", "db", "db", "node-1", "10.0.7.2");
    db.labels.insert("app".into(), "db".into());
    let other = workload("other", "o", "o", "node-1", "10.0.7.3");
    let state = |pas: Vec<pb::PeerAuthentication>| {
        let mut upserts = vec![res_w(web.clone()), res_w(db.clone()), res_w(other.clone())];
        upserts.extend(pas.into_iter().map(res_pa));
        let mut store = Store::new(Some("node-1"));
        store.apply(full(1, upserts)).expect("apply");
        store.snapshot()
    };
    let mesh_strict = peer_auth("ambit-system", "mesh", S::Global, M::Strict, &[], &[]);
    let mesh_permissive = peer_auth("ambit-system", "mesh", S::Global, M::Permissive, &[], &[]);
    let ns_strict = peer_auth("shop", "strict", S::Namespace, M::Strict, &[], &[]);
    let web_8080 = peer_auth(
        "shop",
        "web-8080",
        S::WorkloadSelector,
        M::Unset,
        &[("app", "web")],
        &[(8080, M::Permissive)],
    );
    let web_disable = peer_auth(
        "shop",
        "web",
        S::WorkloadSelector,
        M::Disable,
        &[("app", "web")],
        &[],
    );
    let from = ip("10.0.9.9");
    // (policies, ztunnel's default, destination, Ok(()) accepted / Err(reason) refused 401)
    type Case<'a> = (
        Vec<pb::PeerAuthentication>,
        MtlsMode,
        &'a str,
        Result<(), &'a str>,
    );
    let cases: Vec<Case> = vec![
        (vec![], MtlsMode::Permissive, "10.0.7.1:80", Ok(())),
        (
            vec![],
            MtlsMode::Strict,
            "10.0.7.1:80",
            Err("mTLS STRICT by the proxy's default"),
        ),
        // The mesh level overrides --strict-inbound either way.
        (
            vec![mesh_permissive.clone()],
            MtlsMode::Strict,
            "10.0.7.1:80",
            Ok(()),
        ),
        (
            vec![mesh_strict.clone()],
            MtlsMode::Permissive,
            "10.0.7.3:80",
            Err("STRICT by PeerAuthentication ambit-system/mesh (mesh)"),
        ),
        // Namespace STRICT: every workload and port of it, not other namespaces.
        (
            vec![ns_strict.clone()],
            MtlsMode::Permissive,
            "10.0.7.2:8080",
            Err("STRICT by PeerAuthentication shop/strict (namespace)"),
        ),
        (
            vec![ns_strict.clone()],
            MtlsMode::Permissive,
            "10.0.7.3:8080",
            Ok(()),
        ),
        // ... but PERMISSIVE on web's 8080 only: web's other ports and db's 8080 stay STRICT.
        (
            vec![ns_strict.clone(), web_8080.clone()],
            MtlsMode::Permissive,
            "10.0.7.1:8080",
            Ok(()),
        ),
        (
            vec![ns_strict.clone(), web_8080.clone()],
            MtlsMode::Permissive,
            "10.0.7.1:9090",
            Err("STRICT by PeerAuthentication shop/strict (namespace)"),
        ),
        (
            vec![ns_strict.clone(), web_8080.clone()],
            MtlsMode::Permissive,
            "10.0.7.2:8080",
            Err("shop/strict"),
        ),
        // A workload policy over its namespace's; DISABLE lets plaintext in.
        (
            vec![mesh_strict.clone(), ns_strict.clone(), web_disable.clone()],
            MtlsMode::Strict,
            "10.0.7.1:80",
            Ok(()),
        ),
    ];
    for (i, (pas, default, dst, want)) in cases.into_iter().enumerate() {
        let s = state(pas);
        let dst = sa(dst);
        let pod = s.workload_by_ip(dst.ip()).expect("pod").clone();
        let got = super::inbound_plaintext(&s, &pod, from, dst, default);
        match (want, &got) {
            (Ok(()), Inbound::Accept { .. }) => {}
            (
                Err(why),
                Inbound::Refuse {
                    status: 401,
                    reason,
                    ..
                },
            ) if reason.contains(why) => {}
            _ => panic!("case {i} ({dst}): want {want:?}, got {got:?}"),
        }
        // HBONE is never refused by a mode: every mode accepts mTLS.
        let id: Identity = "spiffe://cluster.local/ns/client/sa/curl".parse().unwrap();
        let tunnelled = inbound(&s, &pod, Some(&id), from, &dst.to_string());
        assert!(
            matches!(tunnelled, Inbound::Accept { .. }),
            "case {i}: {tunnelled:?}"
        );
    }
}

/// Egress: what a REGISTRY_ONLY and an ALLOW_ANY pod may reach, and where a declared
/// external service's connections go.
#[test]
fn egress_table() {
    let mut closed = workload("locked", "c", "default", "node-1", "10.0.1.50");
    closed.outbound_policy = pb::OutboundPolicy::RegistryOnly as i32;
    let open = workload("open", "o", "default", "node-1", "10.0.1.51");
    let server = workload("app", "srv", "default", "node-2", "10.0.2.50");
    let mut outside = workload("legacy", "out", "default", "node-2", "10.0.4.50");
    outside.tunnel_protocol = pb::TunnelProtocol::None as i32;
    let external =
        |name: &str, cidr: Option<&str>, resolution, endpoints: Vec<pb::ExternalEndpoint>| {
            pb::Resource {
                kind: Some(pb::resource::Kind::ExternalService(pb::ExternalService {
                    name: name.into(),
                    namespace: "ext".into(),
                    hosts: vec![format!("{name}.example.com")],
                    addresses: cidr.into_iter().map(block).collect(),
                    ports: vec![pb::ExternalPort {
                        number: 443,
                        name: "https".into(),
                        protocol: "HTTPS".into(),
                        target_port: 0,
                        tls: None,
                    }],
                    resolution: resolution as i32,
                    endpoints,
                    vips: Vec::new(),
                    waypoint: None,
                })),
            }
        };
    // Bound to a waypoint: its connections go there, except the waypoint's own.
    let mut pay = external(
        "pay",
        Some("198.18.0.0/24"),
        pb::ExternalResolution::None,
        vec![],
    );
    if let Some(pb::resource::Kind::ExternalService(x)) = &mut pay.kind {
        x.waypoint = Some(gateway(
            "10.0.3.9",
            "spiffe://cluster.local/ns/ext/sa/egress",
        ));
    }
    let mut wp = workload("ext", "egress", "egress", "node-1", "10.0.3.9");
    wp.is_waypoint = true;
    let push = full(
        1,
        vec![
            res_w(closed),
            res_w(open),
            res_w(server),
            res_w(outside),
            res_w(wp),
            pay,
            res_s(service("app", "srv", "10.96.0.50", 80, 8080, &["app/srv"])),
            external(
                "api",
                Some("192.0.2.0/24"),
                pb::ExternalResolution::None,
                vec![],
            ),
            external(
                "db",
                Some("203.0.113.10/32"),
                pb::ExternalResolution::Static,
                vec![pb::ExternalEndpoint {
                    address: "198.51.100.7".into(),
                    ports: [("https".to_string(), 8443)].into(),
                }],
            ),
        ],
    );
    let mut store = Store::new(None);
    store.apply(push).expect("fixture applies");
    let s = store.snapshot();
    let closed = s.workload_by_uid("locked/c").unwrap().clone();
    let open = s.workload_by_uid("open/o").unwrap().clone();
    let wp = s.workload_by_uid("ext/egress").unwrap().clone();
    let blocked = |dst: &str| {
        format!("blocked outbound policy REGISTRY_ONLY of namespace locked: {dst} is neither a mesh destination nor a declared ExternalService")
    };
    let cases: Vec<(&str, &Arc<Workload>, &str, String)> = vec![
        (
            "unknown, ALLOW_ANY",
            &open,
            "8.8.8.8:443",
            "passthrough 8.8.8.8:443".into(),
        ),
        (
            "unknown, REGISTRY_ONLY",
            &closed,
            "8.8.8.8:443",
            blocked("8.8.8.8:443"),
        ),
        (
            "declared network, REGISTRY_ONLY",
            &closed,
            "192.0.2.9:443",
            "external 192.0.2.9:443 ext/api".into(),
        ),
        (
            "declared network, ALLOW_ANY",
            &open,
            "192.0.2.9:443",
            "external 192.0.2.9:443 ext/api".into(),
        ),
        (
            "declared network, undeclared port",
            &closed,
            "192.0.2.9:80",
            blocked("192.0.2.9:80"),
        ),
        (
            "STATIC: its address goes to an endpoint on the endpoint's port",
            &closed,
            "203.0.113.10:443",
            "external 198.51.100.7:8443 ext/db".into(),
        ),
        (
            "STATIC: an endpoint dialled directly",
            &closed,
            "198.51.100.7:8443",
            "external 198.51.100.7:8443 ext/db".into(),
        ),
        (
            "mesh service, REGISTRY_ONLY",
            &closed,
            "10.96.0.50:80",
            "hbone 10.0.2.50:15008 10.0.2.50:8080 spiffe://cluster.local/ns/app/sa/default svc=srv"
                .into(),
        ),
        (
            "a known pod outside the mesh is in the registry",
            &closed,
            "10.0.4.50:22",
            "passthrough 10.0.4.50:22".into(),
        ),
        (
            "bound to a waypoint: tunnelled to it, the dialled address as authority",
            &closed,
            "198.18.0.5:443",
            "waypoint 10.0.3.9:15008 198.18.0.5:443 spiffe://cluster.local/ns/ext/sa/egress".into(),
        ),
        (
            "bound to a waypoint, undeclared port: not the service's",
            &closed,
            "198.18.0.5:80",
            blocked("198.18.0.5:80"),
        ),
        (
            "the waypoint itself dials the destination",
            &wp,
            "198.18.0.5:443",
            "external 198.18.0.5:443 ext/pay".into(),
        ),
        (
            "unknown IPv6, REGISTRY_ONLY names the policy",
            &closed,
            "[2001:db8::1]:443",
            blocked("[2001:db8::1]:443"),
        ),
    ];
    for (name, src, dst, want) in cases {
        let got = summary(&outbound(&s, src, sa(dst), &first));
        assert_eq!(got, want, "{name}");
    }
}

/// A connection to an external host's allocated VIP goes where the service's resolution says.
#[test]
fn external_vips_map_back_to_their_service() {
    let mut client = workload("locked", "c", "default", "node-1", "10.0.1.50");
    client.outbound_policy = pb::OutboundPolicy::RegistryOnly as i32;
    let external = |name: &str,
                    resolution: pb::ExternalResolution,
                    endpoint: Option<&str>,
                    vip: [u8; 4]| pb::Resource {
        kind: Some(pb::resource::Kind::ExternalService(pb::ExternalService {
            name: name.into(),
            namespace: "ext".into(),
            hosts: vec![format!("{name}.example.com")],
            ports: vec![pb::ExternalPort {
                number: 80,
                name: "http".into(),
                protocol: "HTTP".into(),
                target_port: 8080,
                tls: None,
            }],
            resolution: resolution as i32,
            endpoints: endpoint
                .map(|a| pb::ExternalEndpoint {
                    address: a.into(),
                    ports: Default::default(),
                })
                .into_iter()
                .collect(),
            vips: vec![pb::ExternalVip {
                host: format!("{name}.example.com"),
                address: vip.to_vec(),
            }],
            ..Default::default()
        })),
    };
    let mut store = Store::new(None);
    store
        .apply(full(
            1,
            vec![
                res_w(client),
                external(
                    "st",
                    pb::ExternalResolution::Static,
                    Some("198.51.100.9"),
                    [240, 240, 0, 1],
                ),
                external("dns", pb::ExternalResolution::Dns, None, [240, 240, 0, 2]),
                external(
                    "dnsep",
                    pb::ExternalResolution::Dns,
                    Some("backend.example.net"),
                    [240, 240, 0, 3],
                ),
                external("none", pb::ExternalResolution::None, None, [240, 240, 0, 4]),
                {
                    let mut bound =
                        external("bound", pb::ExternalResolution::Dns, None, [240, 240, 0, 5]);
                    if let Some(pb::resource::Kind::ExternalService(x)) = &mut bound.kind {
                        x.waypoint = Some(gateway(
                            "10.0.3.9",
                            "spiffe://cluster.local/ns/ext/sa/egress",
                        ));
                    }
                    bound
                },
            ],
        ))
        .expect("fixture applies");
    let s = store.snapshot();
    let client = s.workload_by_uid("locked/c").unwrap().clone();
    let cases = [
        ("240.240.0.1:80", "external 198.51.100.9:8080 ext/st"),
        ("240.240.0.2:80", "external-dns dns.example.com:8080 ext/dns"),
        ("240.240.0.3:80", "external-dns backend.example.net:8080 ext/dnsep"),
        ("240.240.0.1:81", "refuse external service ext/st does not declare port 81"),
        // The waypoint resolves the VIP's host itself; ztunnel only carries the tunnel.
        (
            "240.240.0.5:80",
            "waypoint 10.0.3.9:15008 240.240.0.5:80 spiffe://cluster.local/ns/ext/sa/egress",
        ),
        ("240.240.0.5:81", "refuse external service ext/bound does not declare port 81"),
        (
            "240.240.0.4:80",
            "refuse external service ext/none has resolution NONE and no endpoint: its VIP 240.240.0.4 leads nowhere (declare addresses, or use resolution STATIC or DNS)",
        ),
    ];
    for (dst, want) in cases {
        assert_eq!(
            summary(&outbound(&s, &client, sa(dst), &first)),
            want,
            "{dst}"
        );
    }
}
