//! The ztunnel binary: parse flags, start logging, run the [`App`] until SIGTERM/SIGINT or
//! an admin `/quitquitquit`, then drain (pods un-captured, open connections given the drain
//! deadline) and exit 0.

use std::process::ExitCode;

use ambit_ztunnel::app::{App, DefaultCa};
use ambit_ztunnel::config::{Args, Config};
use ambit_ztunnel::drain::{signal_handler, DrainOutcome};
use ambit_ztunnel::telemetry::error_chain;
use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    let args = Args::parse();
    let logging = match args.log.init() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("ztunnel: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ztunnel")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, logging)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ztunnel failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, logging: ambit_ztunnel::telemetry::LogHandle) -> anyhow::Result<()> {
    let config = Config::try_from(args).context("invalid configuration")?;
    let ca = DefaultCa::from_config(&config).context("cannot set up the CA client")?;
    let app = App::start_with_logging(config, ca, Some(logging))
        .await
        .context("cannot start")?;
    tokio::select! {
        signal = signal_handler() => tracing::info!(?signal, "signal received; draining"),
        () = app.shutdown_requested() => tracing::info!("shutdown requested; draining"),
    }
    match app.shutdown().await {
        DrainOutcome::Complete => tracing::info!("drained; exiting"),
        DrainOutcome::DeadlineExceeded { remaining } => {
            tracing::info!(remaining, "drain deadline passed; exiting")
        }
    }
    Ok(())
}
