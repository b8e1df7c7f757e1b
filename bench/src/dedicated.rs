//! Running a pair of ztunnels in dedicated mode on a [`NetnsPair`]: one in the client's
//! namespace, one in the server's, each capturing the namespace it runs in and carrying its
//! traffic over HBONE (HTTP/2 CONNECT over TLS 1.3 with mutual SPIFFE certificates) to the
//! other. Two implementations are known:
//!
//! - [`Flavor::Ambit`]: our `ztunnel --mode dedicated` with a static state file and an
//!   in-process CA (a generated ECDSA P-256 root); it installs its own capture rules.
//! - [`Flavor::Peer`]: a ztunnel that reads Istio's settings (`PROXY_MODE=dedicated`,
//!   `FAKE_CA=true`, `LOCAL_XDS_PATH`, `XDS_ADDRESS=""`), e.g. Istio's own built with its
//!   `testing` feature. It installs no rules in dedicated mode (on a node, Istio's CNI
//!   plugin installs them in each pod), so the harness installs them, as [`PeerRules`] says:
//!   by default the same capture rules Ambit's ztunnel puts in its namespace (mangle and nat,
//!   the same marks and ports, which is also what Istio's in-pod rules do), so both proxies
//!   pay the same netfilter cost per packet; or only the one rule Istio's own namespaced
//!   tests use (`nat OUTPUT` redirects TCP to 15001 unless it leaves by `lo` or carries the
//!   proxy's packet mark), which leaves the peer's packets a far shorter path through the
//!   kernel than the Ambit side's. Inbound HBONE is addressed to 15008 directly.
//!
//! A third flavor, [`Flavor::Floor`], is no ztunnel: `floor_relay` only moves bytes (over
//! plain TCP, or with [`FloorTunnel::Tls`] over mutual TLS, but never HTTP/2) under the same
//! capture rules as Ambit's, on the same ports, so its figures are the most any proxy pair
//! could reach on this path.
//!
//! Every flavor gets the same worker-thread count; the ztunnels the same log level; nothing
//! else is tuned.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_hbone::ca::CertificateAuthority;
use ambitctl::local::net;
use anyhow::{bail, Context};

use crate::pair::{NetnsPair, CLIENT_IP, SERVER_IP};
use crate::tools::Daemon;

/// The packet mark both implementations put on their own sockets (so the capture rules let
/// them through): 0x539, the number Istio's ambient mode uses.
pub const PACKET_MARK: u32 = 1337;

/// The nat chain the harness adds for a peer; named so it cannot collide with a proxy's own.
const PEER_CHAIN: &str = "BENCH_PEER_OUTPUT";

/// Which implementation a pair runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// Ambit's ztunnel binary at this path.
    Ambit(PathBuf),
    /// A ztunnel that understands Istio's settings, at this path.
    Peer(PathBuf),
    /// The byte relay (`floor_relay`) at this path: the floor no proxy pair can beat.
    Floor(PathBuf, FloorTunnel),
}

/// How the floor's relays carry the bytes between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorTunnel {
    /// Plain TCP: the least any proxy pair on this path does.
    Plain,
    /// TLS 1.3 with mutual SPIFFE certificates, one handshake per connection, as HBONE's
    /// (rustls with ring): the least a pair that keeps the mesh's promise does.
    Tls,
}

/// Which side of the pair a floor relay runs on (its certificate and the one it expects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorSide {
    Client,
    Server,
}

/// The capture rules the harness installs for a peer, which installs none of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PeerRules {
    /// The rules Ambit's ztunnel installs in dedicated mode, applied with its own code: both
    /// proxies' packets take the same path through netfilter, as on a node where every pod
    /// carries its mesh's capture rules.
    #[default]
    Mesh,
    /// Only a `nat OUTPUT` redirect to 15001: no mangle table, and no conntrack on the
    /// server side. The peer's kernel path is then much shorter than Ambit's (in one profile,
    /// netfilter was a third of the Ambit ztunnel's CPU samples), which measures the rules as
    /// much as the proxies.
    Redirect,
}

/// What both implementations of a pair are run with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The capture rules the peer gets.
    pub peer_rules: PeerRules,
    /// Runtime worker threads of each proxy.
    pub worker_threads: usize,
    /// Log level (`warn` keeps the per-connection access-log lines out of the measurement).
    pub log_level: String,
    /// Where config files and logs go.
    pub dir: PathBuf,
}

impl Flavor {
    /// One line on how this flavor is run, for the report.
    pub fn describe(&self, s: &Settings) -> String {
        match self {
            Flavor::Ambit(bin) => format!(
                "{} --mode dedicated --static-state <file> --local-ca-cert/--local-ca-key <generated ECDSA P-256 root> --log-level {} --drain-seconds 1, TOKIO_WORKER_THREADS={}; capture rules its own",
                bin.display(),
                s.log_level,
                s.worker_threads
            ),
            Flavor::Peer(bin) => format!(
                "{} with PROXY_MODE=dedicated FAKE_CA=true XDS_ADDRESS= LOCAL_XDS_PATH=<file> PROXY_WORKLOAD_INFO=bench/<side>/<side> ZTUNNEL_WORKER_THREADS={} PACKET_MARK={PACKET_MARK} ENABLE_ORIG_SRC=false RUST_LOG={} CONNECTION_TERMINATION_DEADLINE=1s; {}",
                bin.display(),
                s.worker_threads,
                s.log_level,
                match s.peer_rules {
                    PeerRules::Mesh => "capture rules installed by the harness, the same as Ambit's",
                    PeerRules::Redirect => "outbound redirected to 15001 by one nat OUTPUT rule of the harness (no other capture rules)",
                }
            ),
            Flavor::Floor(bin, tunnel) => format!(
                "{}: byte relay, {}, no HTTP/2, 256 KiB copy buffers, TOKIO_WORKER_THREADS={}; capture rules installed by the harness, the same as Ambit's",
                bin.display(),
                match tunnel {
                    FloorTunnel::Plain => "plain TCP between the relays",
                    FloorTunnel::Tls =>
                        "TLS 1.3 mTLS between the relays (HBONE's rustls settings, a handshake per connection)",
                },
                s.worker_threads
            ),
        }
    }
}

/// A running pair; dropping it stops both processes and removes what the harness installed.
#[derive(Debug)]
pub struct ZtunnelPair {
    /// The client side's proxy.
    pub client: Daemon,
    /// The server side's proxy.
    pub server: Daemon,
    /// Namespaces holding the harness's redirect for the peer.
    rules_in: Vec<String>,
    /// Namespaces holding Ambit's capture rules (its ztunnel's own, or the harness's for
    /// another flavor): they outlive the process (a stopped ztunnel fails closed), so the
    /// harness un-enrolls them as an operator would.
    ambit_rules_in: Vec<String>,
}

impl ZtunnelPair {
    /// Starts both sides and waits until each reports ready on its readiness port.
    pub fn start(flavor: &Flavor, pair: &NetnsPair, s: &Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&s.dir)?;
        let sides = [("client", &pair.client), ("server", &pair.server)];
        let mut rules_in = Vec::new();
        let mut ambit_rules_in = Vec::new();
        let mut daemons = Vec::new();
        match flavor {
            Flavor::Ambit(bin) => {
                let ca =
                    CertificateAuthority::generate("cluster.local", Duration::from_secs(86400))?;
                let pem = ca.to_pem();
                let (cert, key, state) = (
                    s.dir.join("ca.pem"),
                    s.dir.join("ca-key.pem"),
                    s.dir.join("ambit-state.yaml"),
                );
                std::fs::write(&cert, &pem.cert_pem)?;
                std::fs::write(&key, &pem.key_pem)?;
                std::fs::write(&state, ambit_state())?;
                for (side, ns) in sides {
                    let args: Vec<String> = vec![
                        "--node".into(),
                        side.into(),
                        "--mode".into(),
                        "dedicated".into(),
                        "--static-state".into(),
                        path(&state),
                        "--local-ca-cert".into(),
                        path(&cert),
                        "--local-ca-key".into(),
                        path(&key),
                        "--log-level".into(),
                        s.log_level.clone(),
                        // Teardown between paths only: nothing is open when it stops.
                        "--drain-seconds".into(),
                        "1".into(),
                        // Its own node directory, never the host's default one.
                        "--data-dir".into(),
                        path(&s.dir.join(format!("ambit-{side}-data"))),
                    ];
                    ambit_rules_in.push(ns.clone());
                    let env = tokio_workers(s);
                    let log = s.dir.join(format!("ambit-{side}.log"));
                    daemons.push(Daemon::spawn(
                        &format!("Ambit's ztunnel ({side})"),
                        ns,
                        bin,
                        &args,
                        &env,
                        log,
                    )?);
                }
            }
            Flavor::Peer(bin) => {
                let config = s.dir.join("peer-local-xds.yaml");
                std::fs::write(&config, peer_local_config())?;
                for (side, ns) in sides {
                    match s.peer_rules {
                        PeerRules::Mesh => {
                            install_ambit_rules(ns)?;
                            ambit_rules_in.push(ns.clone());
                        }
                        PeerRules::Redirect => {
                            install_peer_redirect(ns)?;
                            rules_in.push(ns.clone());
                        }
                    }
                    let env: Vec<(String, String)> = [
                        ("PROXY_MODE", "dedicated".to_owned()),
                        ("FAKE_CA", "true".to_owned()),
                        ("XDS_ADDRESS", String::new()),
                        ("CA_ADDRESS", String::new()),
                        ("LOCAL_XDS_PATH", path(&config)),
                        ("PROXY_WORKLOAD_INFO", format!("bench/{side}/{side}")),
                        ("NODE_NAME", side.to_owned()),
                        ("ZTUNNEL_WORKER_THREADS", s.worker_threads.to_string()),
                        ("PACKET_MARK", PACKET_MARK.to_string()),
                        // The app shares the proxy's namespace, so a dial from the client's
                        // address would route its replies out of the namespace: Istio's own
                        // dedicated-mode tests turn this off too.
                        ("ENABLE_ORIG_SRC", "false".to_owned()),
                        ("RUST_LOG", s.log_level.clone()),
                        // Teardown between paths only, as --drain-seconds for Ambit's.
                        ("CONNECTION_TERMINATION_DEADLINE", "1s".to_owned()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    let log = s.dir.join(format!("peer-{side}.log"));
                    daemons.push(Daemon::spawn(
                        &format!("peer ztunnel ({side})"),
                        ns,
                        bin,
                        &[],
                        &env,
                        log,
                    )?);
                }
            }
            Flavor::Floor(bin, tunnel) => {
                let mut args = Vec::new();
                if *tunnel == FloorTunnel::Tls {
                    write_floor_pki(&s.dir)?;
                    args.extend(["--tls-dir".to_owned(), path(&s.dir)]);
                }
                for (side, ns) in sides {
                    install_ambit_rules(ns)?;
                    ambit_rules_in.push(ns.clone());
                    let mut args = args.clone();
                    args.extend(["--side".to_owned(), side.to_owned()]);
                    let env = tokio_workers(s);
                    let log = s.dir.join(format!("floor-{side}.log"));
                    daemons.push(Daemon::spawn(
                        &format!("floor relay ({side})"),
                        ns,
                        bin,
                        &args,
                        &env,
                        log,
                    )?);
                }
            }
        }
        let server = daemons.pop().context("no server daemon")?;
        let client = daemons.pop().context("no client daemon")?;
        let mut started = ZtunnelPair {
            client,
            server,
            rules_in,
            ambit_rules_in,
        };
        started.wait_ready(pair)?;
        Ok(started)
    }

    fn wait_ready(&mut self, pair: &NetnsPair) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (daemon, ns) in [
            (&mut self.client, &pair.client),
            (&mut self.server, &pair.server),
        ] {
            loop {
                daemon.check_running()?;
                let ready = http_get(ns, (Ipv4Addr::LOCALHOST, 15021), "/healthz/ready")
                    .is_ok_and(|(status, _)| status == 200);
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} not ready on 127.0.0.1:15021 after 30 s; its log:\n{}",
                        daemon.name(),
                        daemon.log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Connections the server side's proxy has counted (`istio_tcp_connections_opened_total`,
    /// every series), and the bytes it has counted both ways (`istio_tcp_sent_bytes_total` plus
    /// `istio_tcp_received_bytes_total`, so which direction an implementation calls "received"
    /// does not matter): the proof that traffic went through it, since both implementations
    /// export these names.
    pub fn server_counters(&self, pair: &NetnsPair) -> anyhow::Result<(f64, f64)> {
        let (status, body) = http_get(&pair.server, (Ipv4Addr::LOCALHOST, 15020), "/metrics")?;
        if status != 200 {
            bail!("metrics of {} answered {status}", self.server.name());
        }
        let text = String::from_utf8_lossy(&body);
        Ok((
            metric_sum(&text, "istio_tcp_connections_opened_total"),
            metric_sum(&text, "istio_tcp_sent_bytes_total")
                + metric_sum(&text, "istio_tcp_received_bytes_total"),
        ))
    }

    /// Stops both sides and removes the harness's rules; fails if capture rules remain, since
    /// they would turn the next path's measurement into something else.
    pub fn stop(mut self, pair: &NetnsPair) -> anyhow::Result<()> {
        self.client.stop();
        self.server.stop();
        for ns in std::mem::take(&mut self.rules_in) {
            remove_peer_redirect(&ns)?;
        }
        for ns in std::mem::take(&mut self.ambit_rules_in) {
            unenroll_ambit(&ns)?;
        }
        for ns in [&pair.client, &pair.server] {
            let nat = net::exec_in(ns, &["iptables-save", "-t", "nat"])?;
            let mangle = net::exec_in(ns, &["iptables-save", "-t", "mangle"])?;
            if nat.contains("REDIRECT") || mangle.contains("TPROXY") {
                bail!("capture rules left in {ns} after the proxies stopped:\n{nat}\n{mangle}");
            }
        }
        Ok(())
    }
}

impl Drop for ZtunnelPair {
    fn drop(&mut self) {
        self.client.stop();
        self.server.stop();
        for ns in &self.rules_in {
            let _ = remove_peer_redirect(ns);
        }
        for ns in &self.ambit_rules_in {
            let _ = unenroll_ambit(ns);
        }
    }
}

/// Installs Ambit's dedicated-mode capture rules in `ns` for a peer, with ztunnel's own code.
fn install_ambit_rules(ns: &str) -> anyhow::Result<()> {
    net::in_netns(ns, || {
        ambit_ztunnel::capture::iptables::apply(
            &ambit_ztunnel::capture::iptables::RuleConfig::dedicated(),
        )
    })?
    .with_context(|| format!("installing capture rules for the peer in {ns}"))?;
    Ok(())
}

/// Removes Ambit's dedicated-mode capture rules from `ns`, with ztunnel's own code.
fn unenroll_ambit(ns: &str) -> anyhow::Result<()> {
    net::in_netns(ns, || {
        ambit_ztunnel::capture::iptables::remove(
            &ambit_ztunnel::capture::iptables::RuleConfig::dedicated(),
        )
    })?
    .with_context(|| format!("removing Ambit's capture rules in {ns}"))
}

/// The worker-thread count for our own binaries, which size their runtime from tokio's
/// variable (the peer reads its own, `ZTUNNEL_WORKER_THREADS`).
fn tokio_workers(s: &Settings) -> Vec<(String, String)> {
    vec![(
        "TOKIO_WORKER_THREADS".to_owned(),
        s.worker_threads.to_string(),
    )]
}

/// Certificates for the TLS floor: `client.pem`, `server.pem` (chains), their keys and
/// `ca.pem`, for `spiffe://cluster.local/ns/bench/sa/<side>`.
fn write_floor_pki(dir: &Path) -> anyhow::Result<()> {
    let pki = ambit_hbone::testing::TestPki::new("cluster.local");
    let pem = |ders: &[rustls_pki_types::CertificateDer<'_>]| -> String {
        ders.iter().map(|d| ambit_hbone::cert::to_pem(d)).collect()
    };
    for side in ["client", "server"] {
        let cert = pki.issue_for("bench", side);
        std::fs::write(dir.join(format!("{side}.pem")), pem(cert.chain()))?;
        std::fs::write(dir.join(format!("{side}-key.pem")), cert.private_key_pem())?;
        if side == "client" {
            std::fs::write(dir.join("ca.pem"), pem(cert.roots()))?;
        }
    }
    Ok(())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Ambit's static state: both sides enrolled (HBONE), each on the "node" its ztunnel is named.
fn ambit_state() -> String {
    format!(
        "workloads:\n\
         \x20 - {{name: client, namespace: bench, serviceAccount: client, node: client, addresses: [{CLIENT_IP}], protocol: HBONE}}\n\
         \x20 - {{name: server, namespace: bench, serviceAccount: server, node: server, addresses: [{SERVER_IP}], protocol: HBONE}}\n"
    )
}

/// The same two workloads in the local-config format Istio's ztunnel reads (`LOCAL_XDS_PATH`:
/// its workload fields in camelCase plus a per-workload `services` map).
fn peer_local_config() -> String {
    let workload = |name: &str, ip: Ipv4Addr| {
        format!(
            "- uid: bench/{name}\n  name: {name}\n  namespace: bench\n  serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {name}\n  services: {{}}\n"
        )
    };
    format!(
        "workloads:\n{}{}",
        workload("client", CLIENT_IP),
        workload("server", SERVER_IP)
    )
}

fn install_peer_redirect(ns: &str) -> anyhow::Result<()> {
    let mark = format!("{PACKET_MARK:#x}/0xfff");
    let rules: [&[&str]; 5] = [
        &["-t", "nat", "-N", PEER_CHAIN],
        &["-t", "nat", "-A", PEER_CHAIN, "-o", "lo", "-j", "RETURN"],
        &[
            "-t", "nat", "-A", PEER_CHAIN, "-m", "mark", "--mark", &mark, "-j", "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            PEER_CHAIN,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
        &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", PEER_CHAIN],
    ];
    for rule in rules {
        let mut cmd = vec!["iptables", "-w"];
        cmd.extend_from_slice(rule);
        net::exec_in(ns, &cmd)
            .with_context(|| format!("installing the peer's redirect in {ns}"))?;
    }
    Ok(())
}

fn remove_peer_redirect(ns: &str) -> anyhow::Result<()> {
    let rules: [&[&str]; 3] = [
        &["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", PEER_CHAIN],
        &["-t", "nat", "-F", PEER_CHAIN],
        &["-t", "nat", "-X", PEER_CHAIN],
    ];
    for rule in rules {
        let mut cmd = vec!["iptables", "-w"];
        cmd.extend_from_slice(rule);
        net::exec_in(ns, &cmd).with_context(|| format!("removing the peer's redirect in {ns}"))?;
    }
    Ok(())
}

/// The sum of every series of Prometheus metric `name` in `text`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET path` over HTTP/1.0 from inside namespace `ns` (HTTP/1.0, so the body is simply what
/// comes before the server closes). Returns the status and the body.
pub fn http_get(ns: &str, addr: (Ipv4Addr, u16), path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.0);
    let response = net::in_netns(ns, move || -> std::io::Result<Vec<u8>> {
        let timeout = Duration::from_secs(3);
        let mut s =
            std::net::TcpStream::connect_timeout(&std::net::SocketAddr::from(addr), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })??;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, response[head_end + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_every_series_of_exactly_that_name() {
        let text = "# TYPE istio_tcp_connections_opened counter\n\
            istio_tcp_connections_opened_total{reporter=\"destination\"} 3\n\
            istio_tcp_connections_opened_total{reporter=\"source\"} 4\n\
            istio_tcp_connections_opened_total_other 100\n\
            istio_tcp_received_bytes_total 1.5e3\n";
        assert_eq!(metric_sum(text, "istio_tcp_connections_opened_total"), 7.0);
        assert_eq!(metric_sum(text, "istio_tcp_received_bytes_total"), 1500.0);
        assert_eq!(metric_sum(text, "missing"), 0.0);
    }

    #[test]
    fn both_configs_name_the_same_two_workloads() {
        let ambit = ambit_state();
        let peer = peer_local_config();
        for ip in [CLIENT_IP, SERVER_IP] {
            assert!(ambit.contains(&ip.to_string()), "{ambit}");
            assert!(peer.contains(&ip.to_string()), "{peer}");
        }
        assert!(
            peer.contains("serviceAccount: server") && ambit.contains("serviceAccount: server")
        );
    }
}
