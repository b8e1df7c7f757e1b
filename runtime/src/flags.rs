//! Command-line groups every binary flattens (`#[command(flatten)]`) into its own clap
//! `Args`, so that one setting has one flag, one environment variable and one meaning
//! everywhere. Older spellings stay as hidden aliases so existing invocations keep working.
//!
//! | group | flags (env) |
//! | --- | --- |
//! | [`MeshArgs`] | `--trust-domain` (`AMBIT_TRUST_DOMAIN`) |
//! | [`ControlPlaneArgs`] | `--controller`, `--static-state`, `--ca-address`, `--ca-root-file`, `--controller-identity`, `--credential-file`, `--cert-validity-seconds` |
//! | [`ProxyOpsArgs`] | `--metrics-addr`, `--readiness-addr`, `--admin-addr` |
//! | [`RuntimeArgs`] | `--worker-threads` (`AMBIT_WORKER_THREADS`) |
//! | [`crate::logging::LogArgs`] | `--log-format`, `--log-level` |
//!
//! Each binary keeps the flags only it has (ztunnel's `--netns-dir`, the waypoint's
//! `--gateway`, the controller's `--local-dir`...), named in the same style: durations end
//! in `-seconds`, addresses to listen on in `-addr` or `listen`.

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;

use ambit_hbone::identity::IdentityError;
use ambit_hbone::Identity;
use ambit_proto::ports;

/// Lifetime of workload certificates unless configured: a day, rotated at half-life.
pub const DEFAULT_CERT_VALIDITY_SECONDS: u64 = 24 * 3600;

/// The mesh every component belongs to.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MeshArgs {
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = ambit_proto::DEFAULT_TRUST_DOMAIN, env = "AMBIT_TRUST_DOMAIN")]
    pub trust_domain: String,
}

/// Where a proxy gets its state and certificates: the controller (discovery and CA), or a
/// static file; and how it checks and authenticates to the controller.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ControlPlaneArgs {
    /// The controller (discovery, and the CA unless --ca-address), e.g.
    /// https://10.77.0.1:15012; several replicas separated by commas
    /// (https://10.77.0.1:15012,https://10.77.0.1:15112): a new connection tries the one
    /// that answered last, then the others.
    #[arg(long, env = "AMBIT_CONTROLLER")]
    pub controller: Option<String>,
    /// Read the mesh state from this file instead of a controller.
    #[arg(long, env = "AMBIT_STATIC_STATE")]
    pub static_state: Option<PathBuf>,
    /// The CA's address, when it is not the controller.
    #[arg(long, env = "AMBIT_CA_ADDRESS", alias = "ca")]
    pub ca_address: Option<String>,
    /// PEM root(s) of the mesh, which the controller's and the CA's TLS certificates must
    /// chain to.
    #[arg(long, env = "AMBIT_CA_ROOT_FILE", alias = "roots")]
    pub ca_root_file: Option<PathBuf>,
    /// The SPIFFE identity the controller must prove (default:
    /// spiffe://<trust-domain>/ns/ambit-system/sa/ambit-controller).
    #[arg(long, env = "AMBIT_CONTROLLER_IDENTITY")]
    pub controller_identity: Option<String>,
    /// File holding the bearer token the controller and CA authenticate us by (a projected
    /// service account token, or the local mode's node credential); re-read per use.
    #[arg(long, env = "AMBIT_CREDENTIAL_FILE", alias = "token-file")]
    pub credential_file: Option<PathBuf>,
    /// Lifetime asked of the CA for workload certificates, in seconds.
    #[arg(long, default_value_t = DEFAULT_CERT_VALIDITY_SECONDS, env = "AMBIT_CERT_VALIDITY_SECONDS")]
    pub cert_validity_seconds: u64,
}

impl ControlPlaneArgs {
    /// The identity the controller must prove: `--controller-identity`, else the install's
    /// default in `trust_domain`.
    pub fn controller_identity(&self, trust_domain: &str) -> Result<Identity, IdentityError> {
        match &self.controller_identity {
            Some(v) => v.parse(),
            None => Ok(crate::control::default_controller_identity(trust_domain)),
        }
    }
}

/// A proxy's operations listeners.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ProxyOpsArgs {
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value_t = any_addr(ports::METRICS), env = "AMBIT_METRICS_ADDR", alias = "metrics")]
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value_t = any_addr(ports::READINESS), env = "AMBIT_READINESS_ADDR", alias = "readiness")]
    pub readiness_addr: SocketAddr,
    /// Admin (config dump, certificates, log level); keep it on loopback.
    #[arg(long, default_value_t = loopback_addr(ports::ADMIN), env = "AMBIT_ADMIN_ADDR", alias = "admin")]
    pub admin_addr: SocketAddr,
}

/// The threads a proxy's connections run on.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RuntimeArgs {
    /// Threads that run the connections (default: one per CPU). One costs less CPU per
    /// request under light load: with several, a thread that wakes for work wakes another to
    /// share it, which mostly finds none; more serve more requests at once.
    #[arg(long, env = "AMBIT_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,
}

impl RuntimeArgs {
    /// A multi-thread runtime builder with I/O and timers, its threads named `name` and
    /// as many as `--worker-threads` says.
    pub fn builder(&self, name: &str) -> tokio::runtime::Builder {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name(name);
        if let Some(n) = self.worker_threads {
            builder.worker_threads(n.get());
        }
        builder
    }
}

/// `0.0.0.0:<port>`: a port served on every address.
pub fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// `127.0.0.1:<port>`: a port only the node itself reaches.
pub fn loopback_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        mesh: MeshArgs,
        #[command(flatten)]
        control: ControlPlaneArgs,
        #[command(flatten)]
        ops: ProxyOpsArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    #[test]
    fn defaults_are_the_contract_ports() {
        let cli = Cli::try_parse_from(["proxy"]).expect("parse");
        assert_eq!(cli.ops.metrics_addr.to_string(), "0.0.0.0:15020");
        assert_eq!(cli.ops.readiness_addr.to_string(), "0.0.0.0:15021");
        assert_eq!(cli.ops.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(cli.mesh.trust_domain, "cluster.local");
        assert_eq!(cli.control.cert_validity_seconds, 86_400);
        assert_eq!(
            cli.control
                .controller_identity(&cli.mesh.trust_domain)
                .expect("identity")
                .to_string(),
            "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller"
        );
    }

    #[test]
    fn old_spellings_still_parse_as_the_new_flags() {
        let old = Cli::try_parse_from([
            "waypoint",
            "--roots",
            "/r.pem",
            "--token-file",
            "/t",
            "--ca",
            "https://ca:15012",
            "--metrics",
            "127.0.0.1:1",
            "--readiness",
            "127.0.0.1:2",
            "--admin",
            "127.0.0.1:3",
        ])
        .expect("old spellings");
        let new = Cli::try_parse_from([
            "waypoint",
            "--ca-root-file",
            "/r.pem",
            "--credential-file",
            "/t",
            "--ca-address",
            "https://ca:15012",
            "--metrics-addr",
            "127.0.0.1:1",
            "--readiness-addr",
            "127.0.0.1:2",
            "--admin-addr",
            "127.0.0.1:3",
        ])
        .expect("new spellings");
        assert_eq!(old.control, new.control);
        assert_eq!(old.ops, new.ops);
    }

    #[test]
    fn old_spellings_are_hidden_from_help() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--ca-root-file"), "{help}");
        assert!(help.contains("AMBIT_CA_ROOT_FILE"), "{help}");
        for old in ["--roots", "--token-file", "--ca ", "--metrics ", "--admin "] {
            assert!(!help.contains(old), "{old} shown in\n{help}");
        }
    }

    #[test]
    fn worker_threads_size_the_runtime() {
        let one = Cli::try_parse_from(["proxy", "--worker-threads", "1"]).expect("parse");
        let rt = one.runtime.builder("test").build().expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 1);
        let three = Cli::try_parse_from(["proxy", "--worker-threads=3"]).expect("parse");
        let rt = three.runtime.builder("test").build().expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 3);
        let err = Cli::try_parse_from(["proxy", "--worker-threads", "0"]).expect_err("zero");
        assert!(err.to_string().contains("--worker-threads"), "{err}");
    }
}
