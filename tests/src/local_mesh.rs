//! The local mesh as the end-to-end tests drive it: `ambitctl up --detach` with a state dir
//! and namespace prefix of the test's own, torn down by `ambitctl down` when the [`Mesh`]
//! drops (also on panic), plus the few things the tests do inside its pods (an HTTP echo
//! server, one HTTP request) and a bounded wait. Runs the built binaries (`ambitctl`,
//! `ambit-controller`, `ztunnel`, `waypoint`, `ambit-cni`) of this target dir. Anything using it must run
//! under `flock /tmp/ambit-localmesh.lock`: the local mesh's addresses are fixed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ambitctl::local::net;
use ambitctl::local::state::{ClusterState, PodState};

/// The directory holding this test's binaries' siblings (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/local_mesh-<hash> -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for name in [
        "ambitctl",
        "ambit-controller",
        "ztunnel",
        "waypoint",
        "ambit-cni",
    ] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build it with `cargo build -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni`",
            dir.join(name).display()
        );
    }
    dir
}

/// Runs the built `ambitctl` with `args`.
pub fn ambitctl(args: &[&str]) -> Output {
    Command::new(bin_dir().join("ambitctl"))
        .args(args)
        .output()
        .expect("run ambitctl")
}

/// A running local mesh; dropping it runs `ambitctl down` (also when the test panics).
pub struct Mesh {
    pub state_dir: PathBuf,
    pub prefix: String,
}

impl Mesh {
    /// `tag` keeps this test's namespaces and state dir apart from other tests'.
    pub fn up(test: &str, tag: &str, pods_per_node: &str) -> Option<Mesh> {
        Self::up_with(
            test,
            tag,
            &["--nodes", "2", "--pods-per-node", pods_per_node],
        )
    }

    /// `ambitctl up --detach` with `extra` arguments.
    pub fn up_with(test: &str, tag: &str, extra: &[&str]) -> Option<Mesh> {
        if !crate::require_root(test) {
            return None;
        }
        let prefix = format!("lm{tag}{:x}", std::process::id());
        let state_dir = std::env::temp_dir().join(format!("ambit-{prefix}"));
        let mesh = Mesh { state_dir, prefix };
        let sd = mesh.state_dir.display().to_string();
        let mut args = vec!["up", "--detach"];
        args.extend_from_slice(extra);
        args.extend(["--state-dir", &sd, "--netns-prefix", &mesh.prefix]);
        let out = ambitctl(&args);
        assert!(
            out.status.success(),
            "ambitctl up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(mesh)
    }

    /// Its `cluster.json`.
    pub fn state(&self) -> ClusterState {
        ClusterState::load(&self.state_dir).expect("cluster.json")
    }

    /// Pods of its `cluster.json` by name, in the order asked.
    pub fn pods<const N: usize>(&self, names: [&str; N]) -> [PodState; N] {
        let state = self.state();
        names.map(|name| {
            state
                .pods
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("pod {name} in cluster.json"))
                .clone()
        })
    }

    /// A log file under its state dir's `logs/` (empty when missing).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("logs").join(name)).unwrap_or_default()
    }

    /// The sample's first client's log.
    pub fn client_log(&self) -> String {
        self.log("sample-demo-client-1.log")
    }

    /// `ambitctl down` for this mesh.
    pub fn down(&self) -> Output {
        let sd = self.state_dir.display().to_string();
        ambitctl(&["down", "--state-dir", &sd, "--netns-prefix", &self.prefix])
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let out = self.down();
        if !out.status.success() {
            eprintln!("ambitctl down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Polls `f` until it returns true or `secs` pass; panics with `what` (and `context()`).
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An HTTP/1.1 server in `netns` answering each request with the head it received.
pub fn http_echo_in(netns: &str, addr: SocketAddr) {
    use std::io::{Read as _, Write as _};
    let listener = net::in_netns(netns, move || std::net::TcpListener::bind(addr))
        .expect("enter the pod")
        .expect("bind in the pod");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let body = String::from_utf8_lossy(&head).into_owned();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

/// One HTTP/1.1 request for `/orders/1` from inside `netns`; the whole response.
pub fn http_from(netns: &str, dst: SocketAddr, method: &str) -> String {
    http_to(netns, dst, method, "/orders/1")
}

/// One HTTP/1.1 request for `path` from inside `netns`; the whole response.
pub fn http_to(netns: &str, dst: SocketAddr, method: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let request =
        format!("{method} {path} HTTP/1.1\r\nhost: api.shop\r\nconnection: close\r\n\r\n");
    net::in_netns(netns, move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("enter the pod")
    .unwrap_or_else(|e| format!("error: {e}"))
}

/// A fresh directory under the temp dir, named after `tag` and this process.
pub fn tempfile_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ambit-{tag}-{:x}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("objects dir");
    dir
}
