//! `ambitctl sample server|client` (hidden): the local mesh's sample app, run by `ambitctl up`
//! inside pod namespaces.
//!
//! The server greets each connection with one line saying which pod answered and which peer
//! address it saw (so a user sees that ztunnel preserved the client IP), then echoes. The
//! client connects to a target every interval and prints one JSON line per attempt (ok with the
//! greeting and round trip, or the failure), which `ambitctl up` pretty-prints and tests read.
//! Plain blocking std I/O: one connection at a time is all a demo needs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// The sample app's roles.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, clap::Subcommand)]
enum Role {
    /// Reply with this pod's name and the peer address seen, then echo.
    Server {
        /// The pod's name, as `namespace/name`.
        #[arg(long)]
        name: String,
        /// Port to listen on (all addresses).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Connect to a target periodically and print each result as a JSON line.
    Client {
        /// The pod's name, as `namespace/name`.
        #[arg(long)]
        name: String,
        /// Where to connect (a service VIP or pod address, `ip:port`).
        #[arg(long)]
        target: SocketAddr,
        /// Time between attempts, e.g. `1s`, `500ms`.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        every: Duration,
    },
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1),
        None => (s.strip_suffix('s').unwrap_or(s), 1000),
    };
    num.parse::<u64>()
        .map(|n| Duration::from_millis(n * unit))
        .map_err(|_| format!("{s:?} is not an interval such as 1s or 500ms"))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    match &args.role {
        Role::Server { name, port } => serve(name, *port),
        Role::Client {
            name,
            target,
            every,
        } => client(name, *target, *every),
    }
}

fn serve(name: &str, port: u16) -> anyhow::Result<()> {
    // Pods are dual-stack: `[::]` takes both families (IPv4 clients as IPv4-mapped
    // addresses, shown unmapped in the greeting); a kernel without IPv6 gets IPv4 only.
    let listener = match TcpListener::bind(("::", port)) {
        Ok(l) => l,
        Err(_) => TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("binding 0.0.0.0:{port}"))?,
    };
    let bound = listener.local_addr()?;
    eprintln!("sample server {name} listening on {bound}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            // A client that goes away mid-echo is normal; nothing to report.
            let _ = answer(&name, conn);
        });
    }
    Ok(())
}

fn answer(name: &str, mut conn: TcpStream) -> std::io::Result<()> {
    let unmapped = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let peer = unmapped(conn.peer_addr()?);
    let local = unmapped(conn.local_addr()?);
    writeln!(conn, "hello from {name} ({local}); you are {peer}")?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        conn.write_all(line.as_bytes())?;
        line.clear();
    }
    Ok(())
}

/// One attempt's result, as printed.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    /// Seconds since the epoch.
    pub time: f64,
    /// `namespace/name` of the client pod.
    pub client: String,
    /// The target address.
    pub target: String,
    /// Whether the greeting and the echo came back.
    pub ok: bool,
    /// The server's greeting (when ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// What went wrong (when not ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Round trip of connect + greeting + echo, in milliseconds.
    pub ms: u64,
}

fn client(name: &str, target: SocketAddr, every: Duration) -> anyhow::Result<()> {
    for seq in 0u64.. {
        let start = Instant::now();
        let result = attempt(target, seq);
        let attempt = Attempt {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
            client: name.to_owned(),
            target: target.to_string(),
            ok: result.is_ok(),
            ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            reply: result.as_ref().ok().cloned(),
            error: result.err(),
        };
        println!("{}", serde_json::to_string(&attempt)?);
        std::io::stdout().flush()?;
        std::thread::sleep(every.saturating_sub(start.elapsed()));
    }
    Ok(())
}

/// Connects, reads the greeting, checks one echo. Errors are words for the user.
fn attempt(target: SocketAddr, seq: u64) -> Result<String, String> {
    let timeout = Duration::from_secs(3);
    let mut conn = TcpStream::connect_timeout(&target, timeout).map_err(|e| describe(&e))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| describe(&e))?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| describe(&e))?);
    let mut greeting = String::new();
    match reader.read_line(&mut greeting) {
        Ok(0) => return Err("connection closed before any reply (refused by the mesh?)".into()),
        Ok(_) => {}
        Err(e) => return Err(describe(&e)),
    }
    let ping = format!("ping {seq}\n");
    conn.write_all(ping.as_bytes()).map_err(|e| describe(&e))?;
    let mut echo = String::new();
    match reader.read_line(&mut echo) {
        Ok(_) if echo == ping => Ok(greeting.trim_end().to_owned()),
        Ok(_) => Err(format!("echo came back as {echo:?}")),
        Err(e) => Err(describe(&e)),
    }
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => "connection reset (refused by the mesh?)".into(),
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn greets_with_the_peer_and_echoes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            answer("demo/echo-1", conn).unwrap();
        });
        let reply = attempt(addr, 7).unwrap();
        assert!(reply.starts_with("hello from demo/echo-1"), "{reply}");
        assert!(reply.contains("you are 127.0.0.1:"), "{reply}");
    }
}
