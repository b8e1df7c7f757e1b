//! Network namespaces of pods: finding one by pod IP, holding it open, and running code inside it.
//!
//! A network namespace is a per-*thread* attribute on Linux: `setns(2)` moves only the calling
//! thread, and whatever that thread creates afterwards (sockets, child processes) lives in the
//! namespace it was in at creation time, for good. So ztunnel never moves its tokio workers.
//! Instead each enrolled pod gets one [`NetnsWorker`]: a small dedicated std thread that enters the
//! pod's namespace once, at start, and then runs closures sent to it (create a listener, create an
//! outbound socket, spawn `iptables-restore`). The sockets it makes are handed back as plain std
//! sockets and driven by the main runtime like any other.
//!
//! Why not a tokio runtime per pod, or "setns, work, setns back" on the caller's thread (Istio's
//! ztunnel does the latter)? A runtime per pod multiplies threads that all do I/O, when only socket
//! *creation* needs the namespace. Switching back and forth on a shared worker thread is cheaper
//! (two syscalls, no hop), but a failed switch-back would leave a runtime worker silently in a pod's
//! namespace; a thread that never leaves its namespace cannot get that wrong. The price is one
//! mostly idle thread per enrolled pod and a channel round trip per socket created.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;

use nix::sched::{setns, CloneFlags};

/// Stack of a namespace worker thread: it only makes sockets and spawns short commands.
const WORKER_STACK: usize = 256 * 1024;

/// Errors from finding, opening or entering network namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The directory that should hold namespace files could not be listed.
    #[error("cannot list network namespaces under {dir}")]
    ReadDir {
        /// The configured namespace directory.
        dir: PathBuf,
        /// Why listing failed.
        #[source]
        source: std::io::Error,
    },
    /// A namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Why opening failed.
        #[source]
        source: std::io::Error,
    },
    /// `setns` into the namespace failed (not a network namespace file, or not permitted).
    #[error("cannot enter network namespace {path}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The errno from `setns`.
        #[source]
        source: nix::Error,
    },
    /// No namespace in the directory carries the address.
    #[error("no network namespace under {dir} has address {ip}")]
    NotFound {
        /// The configured namespace directory.
        dir: PathBuf,
        /// The pod IP that was looked for.
        ip: IpAddr,
    },
    /// More than one namespace carries the address, so picking one would be a guess.
    #[error("several network namespaces under {dir} have address {ip}: {paths:?}")]
    Ambiguous {
        /// The configured namespace directory.
        dir: PathBuf,
        /// The pod IP that was looked for.
        ip: IpAddr,
        /// Every namespace file that matched.
        paths: Vec<PathBuf>,
    },
    /// A thread to work inside the namespace could not be started.
    #[error("cannot start a thread for network namespace {path}")]
    Spawn {
        /// The namespace file.
        path: PathBuf,
        /// Why the thread could not start.
        #[source]
        source: std::io::Error,
    },
    /// The namespace's worker thread stopped, or the job panicked, before answering.
    #[error("the worker thread of network namespace {path} stopped before answering")]
    WorkerGone {
        /// The namespace file.
        path: PathBuf,
    },
}

/// An open network namespace: the file it was found at and an owned descriptor that keeps it
/// alive (a namespace outlives `ip netns del` while someone holds it). Cheap to clone.
#[derive(Debug, Clone)]
pub struct NetnsHandle {
    path: Arc<Path>,
    fd: Arc<File>,
}

impl NetnsHandle {
    /// Opens the namespace file at `path` (e.g. `/var/run/netns/pod-a`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        let fd = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: Arc::from(path),
            fd: Arc::new(fd),
        })
    }

    /// The namespace the calling thread is in now (dedicated mode: ztunnel beside one workload).
    pub fn current() -> Result<Self, NetnsError> {
        // thread-self, not self: the calling thread may have entered another namespace.
        Self::open("/proc/thread-self/ns/net")
    }

    /// Where this namespace was found.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the *calling thread* into this namespace. Only for threads that never return to a
    /// shared pool: namespace workers and one-shot helper threads.
    fn enter(&self) -> Result<(), NetnsError> {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.to_path_buf(),
            source,
        })
    }

    /// The raw descriptor, for comparisons in tests and logs.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Finds the network namespace whose interfaces carry `ip`, among the files in `dir`.
///
/// Every file is opened and entered in turn from one short-lived helper thread, which lists the
/// interface addresses there. Files that are not network namespaces are skipped. This blocks for
/// a few milliseconds per namespace: call it from a blocking context.
pub fn find_by_ip(dir: &Path, ip: IpAddr) -> Result<NetnsHandle, NetnsError> {
    let mut found: Vec<NetnsHandle> = scan(dir)?
        .into_iter()
        .filter(|(_, addrs)| addrs.contains(&ip))
        .map(|(handle, _)| handle)
        .collect();
    match found.len() {
        0 => Err(NetnsError::NotFound {
            dir: dir.to_path_buf(),
            ip,
        }),
        1 => Ok(found.remove(0)),
        _ => Err(NetnsError::Ambiguous {
            dir: dir.to_path_buf(),
            ip,
            paths: found.iter().map(|h| h.path.to_path_buf()).collect(),
        }),
    }
}

/// Every network namespace among the files in `dir`, sorted by path, with the addresses of
/// its interfaces. Entered in turn from one short-lived helper thread; files that are not
/// network namespaces (or vanish meanwhile) are skipped. Blocks for a few milliseconds per
/// namespace: call it from a blocking context.
pub fn scan(dir: &Path) -> Result<Vec<(NetnsHandle, Vec<IpAddr>)>, NetnsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| NetnsError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut candidates = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetnsError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        // A namespace may vanish between listing and opening (pod deleted): not our concern.
        match NetnsHandle::open(entry.path()) {
            Ok(handle) => candidates.push(handle),
            Err(err) => tracing::debug!(error = %err, "skipping namespace candidate"),
        }
    }
    candidates.sort_by(|a, b| a.path.cmp(&b.path));

    let scan = thread::Builder::new()
        .name("netns-scan".into())
        .stack_size(WORKER_STACK)
        .spawn(move || {
            let mut found = Vec::new();
            for handle in candidates {
                // The helper thread hops from namespace to namespace and then exits, so it
                // never matters which one it is left in.
                if let Err(err) = handle.enter() {
                    tracing::debug!(error = %err, "skipping namespace candidate");
                    continue;
                }
                match addresses() {
                    Ok(addrs) => found.push((handle, addrs)),
                    Err(err) => tracing::debug!(
                        path = %handle.path.display(), error = %err, "cannot list addresses"
                    ),
                }
            }
            found
        })
        .map_err(|source| NetnsError::Spawn {
            path: dir.to_path_buf(),
            source,
        })?;
    scan.join().map_err(|_| NetnsError::WorkerGone {
        path: dir.to_path_buf(),
    })
}

/// The addresses of the calling thread's namespace's interfaces.
fn addresses() -> Result<Vec<IpAddr>, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect())
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A thread parked inside one network namespace that runs closures there (see the module docs).
/// Cloning shares the thread; it exits when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct NetnsWorker {
    netns: NetnsHandle,
    jobs: mpsc::Sender<Job>,
}

impl NetnsWorker {
    /// Starts the worker and waits until it has entered the namespace (so a bad namespace file
    /// fails here, not on first use).
    pub fn spawn(netns: NetnsHandle) -> Result<Self, NetnsError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let inner = netns.clone();
        let name = format!(
            "netns-{}",
            netns
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        thread::Builder::new()
            .name(name)
            .stack_size(WORKER_STACK)
            .spawn(move || {
                let entered = inner.enter();
                let ok = entered.is_ok();
                // The spawner waits on this; if it has gone there is nobody to serve.
                if ready_tx.send(entered).is_err() || !ok {
                    return;
                }
                // Runs until every sender is dropped. A panicking job must not take the
                // namespace thread (and every later socket of the pod) with it.
                while let Ok(job) = rx.recv() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!(netns = %inner.path.display(), "namespace job panicked");
                    }
                }
            })
            .map_err(|source| NetnsError::Spawn {
                path: netns.path.to_path_buf(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { netns, jobs }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(NetnsError::WorkerGone {
                path: netns.path.to_path_buf(),
            }),
        }
    }

    /// The namespace this worker lives in.
    pub fn netns(&self) -> &NetnsHandle {
        &self.netns
    }

    /// Runs `f` inside the namespace and waits for its result without blocking the runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move || {
            // The caller may have given up (its future dropped): nothing to report to.
            let _ = tx.send(f());
        })?;
        rx.await.map_err(|_| self.gone())
    }

    /// Runs `f` inside the namespace, blocking the calling thread until it is done. For
    /// synchronous callers (tests, shutdown paths); async code uses [`NetnsWorker::run`].
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(move || {
            let _ = tx.send(f());
        })?;
        rx.recv().map_err(|_| self.gone())
    }

    /// Queues `f` without waiting for it (used from `Drop`, which must not block).
    pub fn spawn_detached<F>(&self, f: F) -> Result<(), NetnsError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.submit(f)
    }

    fn submit<F: FnOnce() + Send + 'static>(&self, f: F) -> Result<(), NetnsError> {
        self.jobs.send(Box::new(f)).map_err(|_| self.gone())
    }

    fn gone(&self) -> NetnsError {
        NetnsError::WorkerGone {
            path: self.netns.path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_directory_names_the_directory() {
        let dir = Path::new("/nonexistent/ambit-netns");
        let err = find_by_ip(dir, "10.77.1.5".parse().unwrap()).unwrap_err();
        assert!(matches!(err, NetnsError::ReadDir { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/ambit-netns"));
    }

    #[test]
    fn non_namespace_files_are_skipped_and_reported_as_not_found() {
        let dir = std::env::temp_dir().join(format!("ambit-netns-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("not-a-netns"), b"hello").unwrap();
        let err = find_by_ip(&dir, "10.77.1.5".parse().unwrap()).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "no network namespace under {} has address 10.77.1.5",
                dir.display()
            )
        );
    }

    #[tokio::test]
    async fn worker_runs_jobs_in_the_namespace_and_survives_a_panic() {
        // Entering even the current namespace needs CAP_SYS_ADMIN: without it this unit test
        // has nothing to check (the netns tests in `ambit-tests` cover the real thing).
        let Ok(worker) = NetnsHandle::current().and_then(NetnsWorker::spawn) else {
            return;
        };
        assert_eq!(worker.run(|| 41 + 1).await.unwrap(), 42);
        assert!(worker.run(|| panic!("boom")).await.is_err());
        assert_eq!(worker.run_blocking(|| "still here").unwrap(), "still here");
    }
}
