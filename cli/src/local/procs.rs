//! Starting and stopping the local mesh's processes. Every process runs inside one of the
//! cluster's namespaces (`ip netns exec`, so no `setns` before `exec` in our own code), in its
//! own process group (a detached cluster survives the terminal), with stdout and stderr in a
//! log file and a pidfile under `<state-dir>/pids/`. Stopping is SIGTERM (ztunnel drains; its
//! pods' capture rules stay), a bounded wait, then SIGKILL.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::state::Proc;

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// Its log file could not be opened.
    #[error("cannot open log file {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The process could not be spawned.
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Its pid does not fit a pid_t.
    #[error("{what} got pid {pid}, which does not fit a pid_t")]
    Pid { what: String, pid: u32 },
}

/// `<state-dir>/pids`.
pub fn pids_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pids")
}

/// Starts `program args` inside namespace `netns`, output appended to `log`, and records a
/// pidfile `<state-dir>/pids/<label>.pid`. Returns the child (for a foreground `up` to reap)
/// and its record.
pub fn spawn_in(
    state_dir: &Path,
    label: &str,
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<(std::process::Child, Proc), ProcError> {
    let open = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcError::Log {
                path: log.to_owned(),
                source,
            })
    };
    let (out, err) = (open()?, open()?);
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: Ctrl-C in `up`'s terminal reaches only `up`, which then
        // stops everything in order; a detached cluster survives the terminal closing.
        .process_group(0)
        .spawn()
        .map_err(|source| ProcError::Spawn {
            what: format!("{label} ({})", program.display()),
            source,
        })?;
    let raw = child.id();
    let pid = i32::try_from(raw).map_err(|_| ProcError::Pid {
        what: label.to_owned(),
        pid: raw,
    })?;
    let dir = pids_dir(state_dir);
    // A missing pidfile only weakens `down` after a crash (it also scans namespaces).
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{label}.pid")), format!("{pid}\n"));
    }
    Ok((
        child,
        Proc {
            pid,
            log: log.to_owned(),
        },
    ))
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of `pid`, arguments joined by spaces (empty if it is gone).
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether a pid from a pidfile or the record still runs one of our programs (pids get reused).
pub fn ours(pid: i32) -> bool {
    let cmd = cmdline(pid);
    alive(pid)
        && (cmd.contains("ztunnel")
            || cmd.contains("ambit-controller")
            || cmd.contains("waypoint")
            || cmd.contains("sample server")
            || cmd.contains("sample client"))
}

/// SIGTERM to each pid, up to `grace` for them to exit, then SIGKILL to the rest. Returns the
/// pids that had to be killed.
pub fn stop_all(pids: &[i32], grace: Duration) -> Vec<i32> {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stubborn: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for pid in &stubborn {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    stubborn
}

/// The pids recorded in `<state-dir>/pids/*.pid`, with their labels.
pub fn recorded_pids(state_dir: &Path) -> Vec<(String, i32)> {
    let Ok(entries) = std::fs::read_dir(pids_dir(state_dir)) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let label = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".pid")?
                .to_owned();
            let pid = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((label, pid))
        })
        .collect()
}
