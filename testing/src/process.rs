//! Child processes (a controller, a ztunnel, a waypoint) that never outlive the test: killed
//! when the handle drops, also when the test panics, and able to show their log when they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::wait::WAIT;

/// How long a process may take to exit after a signal.
const EXIT: Duration = Duration::from_secs(10);

/// A running child process, killed on drop if still running.
#[derive(Debug)]
pub struct Proc {
    /// The process; its pid, its exit status.
    pub child: Child,
    /// Where its output goes, when the test asked for a log.
    pub log: Option<PathBuf>,
}

impl Proc {
    /// Starts `bin args`, stdout and stderr both written to `log`, stdin empty.
    pub fn spawn(bin: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let mut command = Command::new(bin);
        command.args(args);
        Self::start(command, log)
    }

    /// Starts a prepared command (its environment, its arguments), stdout and stderr both
    /// written to `log`, stdin empty.
    pub fn start(mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log {}", log.display()))?;
        let child = command
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(Proc {
            child,
            log: Some(log),
        })
    }

    /// Guards a child the test started itself (with its own redirections).
    pub fn adopt(child: Child) -> Self {
        Proc { child, log: None }
    }

    /// Names the file holding the child's output, for [`Proc::logs`].
    pub fn with_log(mut self, log: PathBuf) -> Self {
        self.log = Some(log);
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far (empty when there is none or it cannot be read).
    pub fn logs(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    /// Fails with the log when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("exited early ({status}): {}", self.logs());
        }
        Ok(())
    }

    /// Waits (for at most [`WAIT`]) until `GET path` on `addr` answers 200, failing early with
    /// the log if the process exits first.
    pub fn wait_http_ok(&mut self, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.check_alive()?;
            if matches!(crate::net::http_get(addr, path), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("GET {path} on {addr} never answered 200: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` and waits (bounded) for the exit status.
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> anyhow::Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, signal)?;
        let deadline = Instant::now() + EXIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("did not exit after {signal}: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_process_is_killed() -> anyhow::Result<()> {
        let proc = Proc::adopt(Command::new("sleep").arg("60").spawn()?);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.pid())?);
        drop(proc);
        // Reaped by the drop: the pid no longer names our child.
        assert!(nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_err());
        Ok(())
    }

    #[test]
    fn an_exited_process_fails_check_alive_with_its_log() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("ambit-testing-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("out.log");
        let args = ["-c".to_string(), "echo refused to start".to_string()];
        let mut proc = Proc::spawn(Path::new("/bin/sh"), &args, log)?;
        std::thread::sleep(Duration::from_millis(200));
        let err = wait_err(&mut proc);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("refused to start"), "{err}");
        Ok(())
    }

    fn wait_err(proc: &mut Proc) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match proc.check_alive() {
                Err(e) => return e.to_string(),
                Ok(()) if Instant::now() > deadline => return "still running".into(),
                Ok(()) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
