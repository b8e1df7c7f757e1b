//! The ztunnel binary: parse flags, start logging, run the [`App`] until SIGTERM/SIGINT or
//! an admin `/quitquitquit`, then drain (listeners closed, open connections given the drain
//! deadline; pods stay captured, so they are refused until a ztunnel serves them again) and
//! exit 0. Replaced by a successor on the node (an upgrade, see `handover`), it stops
//! accepting and exits once its last connection ends or the upgrade drain deadline passes.

use std::process::ExitCode;

use ambit_ztunnel::app::{App, DefaultCa};
use ambit_ztunnel::config::{Args, Config};
use ambit_ztunnel::drain::{signal_handler, DrainOutcome};
use ambit_ztunnel::telemetry::error_chain;
use anyhow::Context;
use clap::Parser;

/// The allocator, and when it hands memory back.
#[cfg(feature = "mimalloc")]
mod allocator {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    // mimalloc rather than glibc's malloc, because memory must come back after a flood.
    // Measured with the 10,000-connection hold of tests/tests/ztunnel_attacks.rs (RSS
    // baseline / peak / after, KiB): glibc 15,324 / 23,216 / 22,220 (+45% left behind: freed
    // chunks stay in its per-thread arenas, it only trims the top of the main heap).
    // mimalloc's version 2, not the version 3 the crate builds by default: v3 waits 1 s
    // before it purges a freed page and 10 s before its arenas do (v3: +18.4%, +19.1%,
    // +10.6% after the hold). Built with `no_thp`: with transparent huge pages its eagerly
    // committed arenas were backed by 2 MiB pages and the idle baseline doubled (31 MB).
    // jemalloc would do as well but its C build adds minutes to a cold CI run; mimalloc is a
    // few C files.
    #[global_allocator]
    static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

    /// How often, at most, a runtime worker that goes idle collects its heap.
    const COLLECT_EVERY: Duration = Duration::from_secs(1);

    thread_local! {
        static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// Run by each runtime worker as it parks. mimalloc frees a page only on the thread that
    /// owns it, when that thread next allocates: memory that another thread freed (a
    /// connection accepted on one worker and closed on the other) waited for its owner to be
    /// busy again, and an idle ztunnel after a flood kept its peak (v2 alone: +5% to +19%
    /// after the hold, and once +35.5% for the 15 s the test waits). Collecting as a worker
    /// goes idle, at most once a second so that a busy worker parking thousands of times a
    /// second pays nothing, hands those pages back.
    pub fn on_park() {
        let now = Instant::now();
        let due = LAST_COLLECT.with(|last| match last.get() {
            Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
            _ => {
                last.set(Some(now));
                true
            }
        });
        if due {
            collect();
        }
    }

    #[allow(unsafe_code)]
    fn collect() {
        // SAFETY: `mi_collect` takes no pointers; it frees and purges the calling thread's
        // own heap (and, forced, reclaims pages left by exited threads), which mimalloc, as
        // the global allocator, has already set up.
        unsafe { libmimalloc_sys::mi_collect(true) }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let logging = match args.log.init() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("ztunnel: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    // Before any socket: the connection caps are sized from the limit in force.
    match ambit_ztunnel::limits::raise_nofile() {
        Ok(nofile) => tracing::info!(was = nofile.was, now = nofile.now, "descriptor limit"),
        Err(e) => tracing::warn!(error = %error_chain(&e), "descriptor limit not raised"),
    }
    let mut builder = args.runtime.builder("ztunnel");
    #[cfg(feature = "mimalloc")]
    builder.on_thread_park(allocator::on_park);
    let runtime = match builder.build() {
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
    let upgraded = tokio::select! {
        signal = signal_handler() => {
            tracing::info!(?signal, "signal received; draining");
            None
        }
        () = app.shutdown_requested() => {
            tracing::info!("shutdown requested; draining");
            None
        }
        succession = app.replaced() => Some(succession),
    };
    let outcome = match upgraded {
        None => app.shutdown().await,
        Some(succession) => {
            tracing::info!(
                ?succession,
                "a successor serves this node; no longer accepting, open connections are kept until they end"
            );
            // The successor's rollout stops us too (Kubernetes deletes the old pod once the
            // new one is ready): the connections keep their upgrade deadline regardless.
            let drain = app.drain_after_upgrade();
            tokio::pin!(drain);
            loop {
                tokio::select! {
                    outcome = &mut drain => break outcome,
                    signal = signal_handler() => tracing::info!(
                        ?signal,
                        "signal received while draining after an upgrade; connections keep their deadline"
                    ),
                }
            }
        }
    };
    match outcome {
        DrainOutcome::Complete => tracing::info!("drained; exiting"),
        DrainOutcome::DeadlineExceeded { remaining } => {
            tracing::info!(remaining, "drain deadline passed; exiting")
        }
    }
    Ok(())
}
