//! Running things inside a network namespace from a test: commands (`ip netns exec`) and
//! closures (on a helper thread that has `setns`-ed into the namespace; the test's own threads
//! never move). Thin `anyhow` wrappers over `ambitctl::local::net`, which `ambitctl up` uses too.

use ambitctl::local::net;

/// Where `ip netns add` puts namespace files.
pub const NETNS_RUN_DIR: &str = net::NETNS_RUN_DIR;

/// Runs `cmd` (program and arguments) inside namespace `ns`; returns stdout, or an error with
/// the command line and stderr.
pub fn exec_in(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    Ok(net::exec_in(ns, cmd)?)
}

/// Runs a host command; returns stdout, or an error with the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    Ok(net::run(program, args)?)
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result. Sockets created by
/// `f` stay in `ns` wherever they are used afterwards.
pub fn in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Ok(net::in_netns(ns, f)?)
}
