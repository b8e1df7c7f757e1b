//! `ambit-cni`: run by the container runtime as a CNI plugin (when `CNI_COMMAND` is set), or by
//! the ztunnel DaemonSet's init container as `ambit-cni install` / `ambit-cni uninstall`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ambit_cni::install::{self, Entry};
use ambit_cni::plugin;
use ambit_cni::spec::{self, CniError, Code, Env};
use clap::{Parser, Subcommand};

/// Ambit's chained CNI plugin and its installer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Copy this binary into the CNI bin directory and chain the plugin onto the node's
    /// first conflist (idempotent).
    Install {
        /// The node's CNI bin directory (as mounted into this container).
        #[arg(long, default_value = "/opt/cni/bin", env = "AMBIT_CNI_BIN_DIR")]
        cni_bin_dir: PathBuf,
        /// The node's CNI configuration directory (as mounted into this container).
        #[arg(long, default_value = "/etc/cni/net.d", env = "AMBIT_CNI_CONF_DIR")]
        cni_conf_dir: PathBuf,
        /// ztunnel's node directory as the node (where the plugin runs) sees it.
        #[arg(long, default_value = ambit_ztunnel::node_dir::DEFAULT_DIR, env = "AMBIT_DATA_DIR")]
        data_dir: PathBuf,
        /// This node's name, so the plugin can read ztunnel's kept state while ztunnel is away.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
    },
    /// Remove the plugin from every conflist of the directory, then the binary.
    Uninstall {
        /// The node's CNI bin directory.
        #[arg(long, default_value = "/opt/cni/bin", env = "AMBIT_CNI_BIN_DIR")]
        cni_bin_dir: PathBuf,
        /// The node's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d", env = "AMBIT_CNI_CONF_DIR")]
        cni_conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // The runtime's call: the environment says so. Anything else is the installer.
    if std::env::var_os("CNI_COMMAND").is_some() || std::env::args_os().len() == 1 {
        return cni_call();
    }
    match installer(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn installer(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Install {
            cni_bin_dir,
            cni_conf_dir,
            data_dir,
            node_name,
        } => {
            let me = std::env::current_exe()?;
            let entry = Entry {
                data_dir,
                node_name,
            };
            let r = install::install(&me, &cni_bin_dir, &cni_conf_dir, &entry)?;
            eprintln!(
                "ambit-cni: installed {}; conflist {}",
                r.binary
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                r.conflist
                    .map(|p| format!("{} updated", p.display()))
                    .unwrap_or_else(|| "already up to date".into())
            );
        }
        Cmd::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => {
            let r = install::uninstall(&cni_bin_dir, &cni_conf_dir)?;
            eprintln!("ambit-cni: uninstalled ({r:?})");
        }
    }
    Ok(())
}

/// One CNI call: the result (or the spec's error object) on stdout, a line per decision on
/// stderr, and a non-zero exit on error.
fn cni_call() -> ExitCode {
    let outcome = Env::parse(|k| std::env::var(k).ok())
        .map_err(|error| plugin::Failure {
            cni_version: spec::SPEC_VERSION.into(),
            error,
        })
        .and_then(|env| {
            let mut stdin = Vec::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_end(&mut stdin)
                .map_err(|e| plugin::Failure {
                    cni_version: spec::SPEC_VERSION.into(),
                    error: CniError::new(
                        Code::Io,
                        "cannot read the network configuration",
                        e.to_string(),
                    ),
                })?;
            let id = env.container_id.clone();
            let mut log = |line: String| eprintln!("ambit-cni {:?} {id}: {line}", env.command);
            plugin::run(&env, &stdin, &mut log)
        });
    let (value, code) = match outcome {
        Ok(Some(v)) => (Some(v), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(f) => {
            eprintln!("ambit-cni: {}", f.error);
            (Some(f.error.to_json(&f.cni_version)), ExitCode::FAILURE)
        }
    };
    if let Some(v) = value {
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        // Nothing sensible is left to do if the runtime closed our stdout.
        let _ = std::io::stdout().lock().write_all(&line);
    }
    code
}
