//! ztunnel's configuration: the command line ([`Args`], clap, every flag also an environment
//! variable for the DaemonSet) and the validated [`Config`] the app is built from. Tests build
//! a [`Config`] directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_hbone::Identity;
use ambit_runtime::flags::{ControlPlaneArgs, MeshArgs, ProxyOpsArgs, RuntimeArgs};

use crate::capture::RuleConfig;
use crate::dns::{DnsArgs, DnsSettings};
use crate::limits::{LimitArgs, Limits};
use crate::proxy::Reevaluation;
use crate::telemetry::LogArgs;

/// Why the command line does not describe a runnable ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither a controller nor a static state file was given (or both were).
    #[error("give exactly one of --controller and --static-state")]
    StateSource,
    /// No CA to ask for certificates.
    #[error("no CA: give --controller, --ca-address, or --local-ca-cert/--local-ca-key")]
    NoCa,
    /// A URL flag is not an `http(s)://host:port` URL.
    #[error("{flag} {value:?} is not an http:// or https:// URL")]
    Url { flag: &'static str, value: String },
    /// An https controller without the root to verify it.
    #[error("{flag} uses https: give --ca-root-file with the mesh root that signed it")]
    NoRoot { flag: &'static str },
    /// --controller-identity is not a SPIFFE identity of the trust domain.
    #[error("--controller-identity {value:?} is not a SPIFFE identity")]
    ControllerIdentity {
        value: String,
        #[source]
        source: ambit_hbone::identity::IdentityError,
    },
    /// The local CA needs both files.
    #[error("--local-ca-cert and --local-ca-key go together")]
    LocalCa,
}

/// How ztunnel finds its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// One ztunnel per node, capturing every enrolled pod's namespace (in-pod redirection).
    #[default]
    Node,
    /// ztunnel beside one workload (a VM), capturing the namespace it runs in.
    Dedicated,
}

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ztunnel", version, about = "Ambit's node proxy")]
pub struct Args {
    /// This node's name: pods scheduled here are the ones ztunnel captures.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    #[command(flatten)]
    pub control: ControlPlaneArgs,
    /// Sign workload certificates in-process with this CA certificate (local mode, tests).
    #[arg(long, env = "AMBIT_LOCAL_CA_CERT")]
    pub local_ca_cert: Option<PathBuf>,
    /// The local CA's private key.
    #[arg(long, env = "AMBIT_LOCAL_CA_KEY")]
    pub local_ca_key: Option<PathBuf>,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Where pods' network namespaces are found.
    #[arg(long, default_value = "/var/run/netns", env = "AMBIT_NETNS_DIR")]
    pub netns_dir: PathBuf,
    /// Networks, IPv4 or IPv6 (comma-separated CIDRs: typically the pod and service
    /// networks of each family, e.g. `10.244.0.0/16,fd00::/8`), whose UDP from enrolled pods
    /// is captured and, to destinations in the mesh, carried over HBONE (CONNECT-UDP). IPv4
    /// UDP to other networks is left alone; IPv6 UDP to other networks is dropped, as all
    /// IPv6 that cannot be meshed. Empty (the default): IPv4 UDP is left alone and IPv6 UDP
    /// dropped, DNS aside. Node mode only.
    #[arg(long, value_delimiter = ',', env = "AMBIT_UDP_CAPTURE_CIDRS")]
    pub udp_capture_cidrs: Vec<ipnet::IpNet>,
    /// ztunnel's own mTLS mode is STRICT rather than PERMISSIVE: plaintext inbound to
    /// enrolled pods is refused wherever no PeerAuthentication (mesh, namespace, workload or
    /// port) sets a mode. A mesh-level PeerAuthentication overrides it.
    #[arg(long, env = "AMBIT_STRICT_INBOUND")]
    pub strict_inbound: bool,
    /// What a policy change does to open inbound connections: `close` re-checks them and
    /// closes those it now denies; `keep` leaves them open (Istio's behaviour).
    #[arg(long, value_enum, default_value_t = Reevaluation::Close, env = "AMBIT_POLICY_REEVALUATION")]
    pub policy_reevaluation: Reevaluation,
    /// Node (in-pod capture) or dedicated (capture ztunnel's own namespace).
    #[arg(long, value_enum, default_value_t = Mode::Node, env = "AMBIT_MODE")]
    pub mode: Mode,
    #[command(flatten)]
    pub ops: ProxyOpsArgs,
    /// Seconds open connections get to finish on shutdown or un-enrollment.
    #[arg(long, default_value_t = 5, env = "AMBIT_DRAIN_SECONDS")]
    pub drain_seconds: u64,
    /// Seconds a ztunnel that handed its listeners to a successor keeps its open connections
    /// before it exits (it exits earlier once the last one ends).
    #[arg(long, default_value_t = 3600, env = "AMBIT_UPGRADE_DRAIN_SECONDS")]
    pub upgrade_drain_seconds: u64,
    /// How a starting ztunnel takes over from the one running on this node: `listeners`
    /// receives its listening sockets over the node directory's hand-over socket; `reuseport`
    /// (testing, debugging) binds its own beside them with SO_REUSEPORT and then tells the
    /// old one to drain, as when the hand-over fails.
    #[arg(long, value_enum, default_value_t = HandoverMode::Listeners, env = "AMBIT_HANDOVER")]
    pub handover: HandoverMode,
    /// The node directory: last acknowledged state and workload certificates (owner-only),
    /// so a restart serves before the controller answers.
    #[arg(long, default_value = crate::node_dir::DEFAULT_DIR, env = "AMBIT_DATA_DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// How a starting ztunnel takes over from the one running on its node (see
/// `crate::handover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HandoverMode {
    /// Receive the running ztunnel's listening sockets; no listener ever closes.
    #[default]
    Listeners,
    /// Bind our own listeners beside the running ones (SO_REUSEPORT), then ask it to drain:
    /// the fallback path, forced.
    Reuseport,
}

/// Where the state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// The controller's discovery service.
    Controller(String),
    /// A YAML file, re-read when its modification time changes.
    StaticFile(PathBuf),
}

/// Where certificates come from (the app's default CA client; tests may inject their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `CreateCertificate` over gRPC at this URL.
    Grpc(String),
    /// Sign in-process with this CA (cert, key PEM files).
    Local { cert: PathBuf, key: PathBuf },
    /// None configured: the caller must inject a CA client.
    Injected,
}

/// Everything the app needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub state: StateSource,
    pub ca: CaSource,
    pub ca_root_file: Option<PathBuf>,
    /// What the controller's TLS certificate must prove.
    pub controller_identity: Identity,
    pub credential_file: Option<PathBuf>,
    pub trust_domain: String,
    pub mode: Mode,
    pub netns_dir: PathBuf,
    pub rules: RuleConfig,
    pub strict_inbound: bool,
    pub policy_reevaluation: Reevaluation,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub drain_deadline: Duration,
    /// How long open connections are kept after handing over to a successor.
    pub upgrade_drain_deadline: Duration,
    /// How to take over from a running ztunnel on this node.
    pub handover: HandoverMode,
    pub cert_validity: Duration,
    /// How often a static state file is checked for changes.
    pub static_poll: Duration,
    /// Connection and handshake caps, timeouts, descriptor reserve.
    pub limits: Limits,
    /// The node directory ([`crate::node_dir`]); `None` keeps nothing on disk (tests).
    pub data_dir: Option<PathBuf>,
    /// The DNS proxy (node mode only).
    pub dns: DnsSettings,
}

impl Config {
    /// A config for tests: loopback ops ports on ephemeral ports, static state.
    pub fn for_tests(node: &str, state: PathBuf, netns_dir: PathBuf) -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            node: node.to_string(),
            state: StateSource::StaticFile(state),
            ca: CaSource::Injected,
            ca_root_file: None,
            controller_identity: default_controller_identity(
                ambit_hbone::identity::DEFAULT_TRUST_DOMAIN,
            ),
            credential_file: None,
            trust_domain: ambit_hbone::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            mode: Mode::Node,
            netns_dir,
            rules: RuleConfig::default(),
            strict_inbound: false,
            policy_reevaluation: Reevaluation::Close,
            metrics_addr: local,
            readiness_addr: local,
            admin_addr: local,
            drain_deadline: Duration::from_secs(2),
            upgrade_drain_deadline: Duration::from_secs(30),
            handover: HandoverMode::Listeners,
            cert_validity: ambit_hbone::ca::DEFAULT_CERT_VALIDITY,
            static_poll: Duration::from_millis(500),
            limits: Limits::default(),
            data_dir: None,
            // Tests that look at DNS turn it on; the others keep their pods' DNS untouched.
            dns: DnsSettings::disabled(),
        }
    }
}

pub use ambit_runtime::control::default_controller_identity;

/// Every URL of `value` (one, or several controller replicas separated by commas) is
/// `http://` or `https://`.
fn check_url(flag: &'static str, value: &str) -> Result<(), ConfigError> {
    let mut urls = ambit_hbone::control::split_addresses(value).peekable();
    let ok = urls.peek().is_some()
        && urls.all(|u| u.starts_with("http://") || u.starts_with("https://"));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Url {
            flag,
            value: value.to_string(),
        })
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        let c = &a.control;
        let state = match (&c.controller, &c.static_state) {
            (Some(c), None) => {
                check_url("--controller", c)?;
                StateSource::Controller(c.clone())
            }
            (None, Some(path)) => StateSource::StaticFile(path.clone()),
            _ => return Err(ConfigError::StateSource),
        };
        let ca = match (&a.local_ca_cert, &a.local_ca_key, &c.ca_address) {
            (Some(cert), Some(key), _) => CaSource::Local {
                cert: cert.clone(),
                key: key.clone(),
            },
            (Some(_), None, _) | (None, Some(_), _) => return Err(ConfigError::LocalCa),
            (None, None, Some(addr)) => {
                check_url("--ca-address", addr)?;
                CaSource::Grpc(addr.clone())
            }
            (None, None, None) => match &c.controller {
                Some(c) => CaSource::Grpc(c.clone()),
                None => return Err(ConfigError::NoCa),
            },
        };
        for (flag, url) in [
            ("--controller", c.controller.as_deref()),
            ("--ca-address", c.ca_address.as_deref()),
        ] {
            if url.is_some_and(|u| u.starts_with("https://")) && c.ca_root_file.is_none() {
                return Err(ConfigError::NoRoot { flag });
            }
        }
        let controller_identity =
            c.controller_identity(&a.mesh.trust_domain)
                .map_err(|source| ConfigError::ControllerIdentity {
                    value: c.controller_identity.clone().unwrap_or_default(),
                    source,
                })?;
        let rules = match a.mode {
            Mode::Node => RuleConfig {
                udp_capture: a.udp_capture_cidrs.clone(),
                ..RuleConfig::default()
            },
            Mode::Dedicated => {
                // ztunnel shares the namespace it captures: its own ports (also when moved
                // by flags) and its controller must stay reachable.
                let mut rules = RuleConfig::dedicated();
                for port in [
                    a.ops.metrics_addr.port(),
                    a.ops.readiness_addr.port(),
                    a.ops.admin_addr.port(),
                ] {
                    if !rules.inbound_exclude_ports.contains(&port) {
                        rules.inbound_exclude_ports.push(port);
                    }
                }
                rules
            }
        };
        Ok(Config {
            node: a.node,
            state,
            ca,
            ca_root_file: a.control.ca_root_file,
            controller_identity,
            credential_file: a.control.credential_file,
            trust_domain: a.mesh.trust_domain,
            mode: a.mode,
            netns_dir: a.netns_dir,
            rules,
            strict_inbound: a.strict_inbound,
            policy_reevaluation: a.policy_reevaluation,
            metrics_addr: a.ops.metrics_addr,
            readiness_addr: a.ops.readiness_addr,
            admin_addr: a.ops.admin_addr,
            drain_deadline: Duration::from_secs(a.drain_seconds),
            upgrade_drain_deadline: Duration::from_secs(a.upgrade_drain_seconds),
            handover: a.handover,
            cert_validity: Duration::from_secs(a.control.cert_validity_seconds),
            static_poll: Duration::from_secs(1),
            limits: a.limits.into(),
            data_dir: Some(a.data_dir),
            dns: a.dns.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["ztunnel", "--node", "n1"];
        full.extend_from_slice(args);
        Config::try_from(Args::parse_from(full))
    }

    #[test]
    fn controller_is_also_the_ca_and_https_needs_a_root() {
        let err = parse(&["--controller", "https://10.0.0.1:15012"]).unwrap_err();
        assert!(matches!(err, ConfigError::NoRoot { .. }), "{err}");
        let cfg = parse(&[
            "--controller",
            "https://10.0.0.1:15012",
            "--ca-root-file",
            "/r.pem",
        ])
        .unwrap();
        assert_eq!(cfg.ca, CaSource::Grpc("https://10.0.0.1:15012".into()));
        assert_eq!(cfg.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(
            cfg.data_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/ambit/ztunnel"))
        );
    }

    #[test]
    fn the_controller_may_be_several_replicas_each_a_url() {
        let both = "https://10.77.0.1:15012,https://10.77.0.1:15112";
        let cfg = parse(&["--controller", both, "--ca-root-file", "/r.pem"]).unwrap();
        assert!(matches!(&cfg.state, StateSource::Controller(u) if u == both));
        assert!(matches!(&cfg.ca, CaSource::Grpc(u) if u == both));
        for bad in ["https://10.77.0.1:15012,10.77.0.1:15112", " , "] {
            let err = parse(&["--controller", bad, "--ca-root-file", "/r.pem"]).unwrap_err();
            assert!(matches!(err, ConfigError::Url { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn an_upgrade_keeps_connections_an_hour_and_takes_the_listeners_by_default() {
        let base = ["--static-state", "/s.yaml", "--ca-address", "http://ca:1"];
        let cfg = parse(&base).unwrap();
        assert_eq!(cfg.upgrade_drain_deadline, Duration::from_secs(3600));
        assert_eq!(cfg.handover, HandoverMode::Listeners);
        let mut args = base.to_vec();
        args.extend(["--upgrade-drain-seconds", "7", "--handover", "reuseport"]);
        let cfg = parse(&args).unwrap();
        assert_eq!(cfg.upgrade_drain_deadline, Duration::from_secs(7));
        assert_eq!(cfg.handover, HandoverMode::Reuseport);
    }

    #[test]
    fn exactly_one_state_source_and_some_ca() {
        assert!(matches!(parse(&[]), Err(ConfigError::StateSource)));
        assert!(matches!(
            parse(&["--static-state", "/s.yaml"]),
            Err(ConfigError::NoCa)
        ));
        let cfg = parse(&[
            "--static-state",
            "/s.yaml",
            "--local-ca-cert",
            "/c",
            "--local-ca-key",
            "/k",
            "--strict-inbound",
        ])
        .unwrap();
        assert!(cfg.strict_inbound);
        assert!(matches!(cfg.ca, CaSource::Local { .. }));
    }

    #[test]
    fn udp_capture_networks_are_a_node_mode_flag() {
        let cfg = parse(&[
            "--static-state",
            "/s.yaml",
            "--local-ca-cert",
            "/c",
            "--local-ca-key",
            "/k",
        ])
        .unwrap();
        assert!(cfg.rules.udp_capture.is_empty());
        assert_eq!(cfg.limits.pod_udp_flows, 1024);
        assert_eq!(cfg.limits.udp_idle_timeout, Duration::from_secs(60));
        let cfg = parse(&[
            "--static-state",
            "/s.yaml",
            "--local-ca-cert",
            "/c",
            "--local-ca-key",
            "/k",
            "--udp-capture-cidrs",
            "10.80.0.0/16,fd00:80::/64,10.96.0.0/12",
            "--pod-udp-flow-limit",
            "7",
            "--udp-idle-timeout-seconds",
            "5",
        ])
        .unwrap();
        assert_eq!(
            cfg.rules.udp_capture,
            [
                "10.80.0.0/16".parse().unwrap(),
                "fd00:80::/64".parse().unwrap(),
                "10.96.0.0/12".parse::<ipnet::IpNet>().unwrap()
            ]
        );
        assert_eq!(cfg.limits.pod_udp_flows, 7);
        assert_eq!(cfg.limits.udp_idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn limits_have_defaults_and_flags() {
        let base = ["--static-state", "/s.yaml", "--ca-address", "http://ca:1"];
        let cfg = parse(&base).unwrap();
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.limits.pod_connections, 4096);
        assert_eq!(cfg.limits.first_byte_timeout, Duration::from_secs(30));
        let mut args = base.to_vec();
        args.extend([
            "--pod-connection-limit",
            "10",
            "--node-handshake-limit",
            "3",
            "--plaintext-idle-timeout-seconds",
            "7",
        ]);
        let cfg = parse(&args).unwrap();
        assert_eq!(cfg.limits.pod_connections, 10);
        assert_eq!(cfg.limits.node_handshakes, 3);
        assert_eq!(cfg.limits.plaintext_idle_timeout, Duration::from_secs(7));
    }

    #[test]
    fn policy_changes_close_open_connections_unless_told_to_keep_them() {
        let base = [
            "--static-state",
            "/s.yaml",
            "--local-ca-cert",
            "/c",
            "--local-ca-key",
            "/k",
        ];
        assert_eq!(
            parse(&base).unwrap().policy_reevaluation,
            Reevaluation::Close
        );
        let mut keep = base.to_vec();
        keep.extend(["--policy-reevaluation", "keep"]);
        assert_eq!(
            parse(&keep).unwrap().policy_reevaluation,
            Reevaluation::Keep
        );
    }
}
