//! A stand-in application for pods: a TCP server that first tells the client what it sees
//! (`local=<addr> peer=<addr>\n`: what an app and its logs would see) and then echoes bytes; and
//! a client that connects from inside a pod. Plain std threads and blocking sockets, so the
//! fixture does not depend on the runtime of the code under test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::ns::in_netns;
use crate::topology::Pod;

/// Socket timeouts of test clients and servers: long enough for a loaded CI machine, short
/// enough that a broken capture fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server saw of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The address the connection was accepted on.
    pub local: SocketAddr,
    /// The client address, as the app sees it.
    pub peer: SocketAddr,
}

/// The reply server running in a pod; stops accepting on Drop.
#[derive(Debug)]
pub struct ReplyServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl ReplyServer {
    /// Listens on 0.0.0.0:`port` inside `pod`.
    pub fn start(pod: &Pod, port: u16) -> anyhow::Result<Self> {
        Self::listen(pod, Ipv4Addr::UNSPECIFIED.into(), pod.ip.into(), port)
    }

    /// Listens on the pod's IPv6 address, `[ip6]:port`, inside `pod`.
    pub fn start_v6(pod: &Pod, port: u16) -> anyhow::Result<Self> {
        Self::listen(pod, pod.ip6.into(), pod.ip6.into(), port)
    }

    fn listen(pod: &Pod, bind: IpAddr, reachable: IpAddr, port: u16) -> anyhow::Result<Self> {
        let listener = in_netns(&pod.netns, move || TcpListener::bind((bind, port)))?
            .with_context(|| format!("cannot listen on {bind} port {port} in {}", pod.netns))?;
        // Polled, so Drop can stop the loop without a connection from inside the namespace.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::Builder::new()
            .name(format!("reply-{}", pod.name))
            .spawn({
                let (stop, seen) = (stop.clone(), seen.clone());
                move || accept_loop(&listener, &stop, &seen)
            })?;
        Ok(Self {
            addr: SocketAddr::new(reachable, port),
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// The pod IP and port the server is reachable at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection accepted so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for ReplyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, seen: &Mutex<Vec<Seen>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Seen { local, peer });
                std::thread::spawn(move || serve(stream, Seen { local, peer }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                eprintln!("reply server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(mut stream: TcpStream, seen: Seen) {
    let greeting = format!("local={} peer={}\n", seen.local, seen.peer);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if stream.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Connects from inside `pod` to `dst` (blocking, with [`IO_TIMEOUT`]s).
pub fn connect_from(pod: &Pod, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = in_netns(&pod.netns, move || {
        TcpStream::connect_timeout(&dst, IO_TIMEOUT)
    })?
    .with_context(|| format!("{}: cannot connect to {dst}", pod.netns))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Reads the reply server's greeting line from a (blocking) stream.
pub fn read_greeting(stream: &mut TcpStream) -> anyhow::Result<Seen> {
    let mut line = String::new();
    // One byte at a time, so no echoed bytes are swallowed into a buffer.
    let mut reader = BufReader::with_capacity(1, stream);
    reader.read_line(&mut line).context("no greeting")?;
    parse_greeting(&line)
}

/// Parses `local=<addr> peer=<addr>`.
pub fn parse_greeting(line: &str) -> anyhow::Result<Seen> {
    let mut local = None;
    let mut peer = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("local=") {
            local = Some(v.parse()?);
        } else if let Some(v) = word.strip_prefix("peer=") {
            peer = Some(v.parse()?);
        }
    }
    match (local, peer) {
        (Some(local), Some(peer)) => Ok(Seen { local, peer }),
        _ => bail!("not a greeting: {line:?}"),
    }
}

/// Writes `payload` and reads back as many bytes (the echo).
pub fn echo(stream: &mut TcpStream, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream
        .read_exact(&mut back)
        .context("echo did not come back")?;
    Ok(back)
}
