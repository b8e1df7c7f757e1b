//! Running things inside a network namespace from a test: commands (`ip netns exec`) and
//! closures (on a helper thread that has `setns`-ed into the namespace; the test's own threads
//! never move).

use std::fs::File;
use std::process::Command;

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns add` puts namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Runs `cmd` (program and arguments) inside namespace `ns`; returns stdout, or an error with
/// the command line and stderr.
pub fn exec_in(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(cmd);
    run("ip", &full)
}

/// Runs a host command; returns stdout, or an error with the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result. Sockets created by
/// `f` stay in `ns` wherever they are used afterwards.
pub fn in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = format!("{NETNS_RUN_DIR}/{ns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    let handle = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || -> anyhow::Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter {path}"))?;
            Ok(f())
        })
        .context("cannot spawn a thread")?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
