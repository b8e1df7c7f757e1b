//! The standard load tools the side-by-side harness drives (iperf3, sockperf, wrk, nginx):
//! reading their reports, and running servers as processes inside a namespace.
//!
//! Parsers take the tools' own output so a figure can always be traced back to what the tool
//! printed; each fails with the text it could not read rather than returning a zero.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What iperf3's receiver counted (`-J`, `end.sum_received`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf {
    /// Bytes the server received.
    pub bytes: u64,
    /// Over how long.
    pub seconds: f64,
}

impl Iperf {
    /// Gigabits per second.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Reads `iperf3 -J` output.
pub fn parse_iperf3(json: &str) -> anyhow::Result<Iperf> {
    let v: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("iperf3 did not print JSON: {}", excerpt(json)))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 failed: {err}");
    }
    let sum = v
        .pointer("/end/sum_received")
        .with_context(|| format!("no end.sum_received in iperf3's report: {}", excerpt(json)))?;
    let bytes = sum
        .get("bytes")
        .and_then(serde_json::Value::as_u64)
        .context("iperf3's end.sum_received.bytes is not a count")?;
    let seconds = sum
        .get("seconds")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3's end.sum_received.seconds is not a number")?;
    Ok(Iperf { bytes, seconds })
}

/// Round-trip times of `sockperf ping-pong --full-rtt`, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingPong {
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Round trips measured (after sockperf's warm-up).
    pub round_trips: u64,
}

/// Reads sockperf's summary (its colour escapes are ignored).
pub fn parse_sockperf(text: &str) -> anyhow::Result<PingPong> {
    let clean = strip_ansi(text);
    let after = |line: &str, key: &str| -> Option<f64> {
        let rest = line.split(key).nth(1)?;
        let number: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        number.parse().ok()
    };
    let (mut avg, mut p50, mut p99, mut n) = (None, None, None, None);
    for line in clean.lines() {
        if line.contains("avg-rtt=") {
            avg = after(line, "avg-rtt=");
        } else if line.contains("percentile 50.000 =") {
            p50 = after(line, "percentile 50.000 =");
        } else if line.contains("percentile 99.000 =") {
            p99 = after(line, "percentile 99.000 =");
        } else if line.contains("[Valid Duration]") {
            n = after(line, "ReceivedMessages=");
        }
    }
    match (avg, p50, p99, n) {
        (Some(avg_us), Some(p50_us), Some(p99_us), Some(n)) => Ok(PingPong {
            avg_us,
            p50_us,
            p99_us,
            round_trips: n as u64,
        }),
        _ => bail!(
            "sockperf's report lacks avg-rtt, p50, p99 or the message count: {}",
            excerpt(&clean)
        ),
    }
}

/// What wrk reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wrk {
    /// Completed requests.
    pub requests: u64,
    /// `Requests/sec`.
    pub per_second: f64,
    /// Connect, read, write errors and timeouts together.
    pub socket_errors: u64,
    /// Responses that were not 2xx or 3xx.
    pub non_2xx: u64,
}

/// Reads wrk's plain-text report.
pub fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let (mut requests, mut per_second) = (None, None);
    let (mut socket_errors, mut non_2xx) = (0, 0);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            per_second = rest.trim().parse().ok();
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse().unwrap_or(0);
        }
    }
    match (requests, per_second) {
        (Some(requests), Some(per_second)) => Ok(Wrk {
            requests,
            per_second,
            socket_errors,
            non_2xx,
        }),
        _ => bail!(
            "wrk's report lacks the request count or Requests/sec: {}",
            excerpt(text)
        ),
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn excerpt(text: &str) -> String {
    let t = text.trim();
    if t.chars().count() <= 400 {
        t.to_owned()
    } else {
        format!("{}...", t.chars().take(400).collect::<String>())
    }
}

/// A long-running process inside a namespace (`ip netns exec` replaces itself with the
/// program, so [`Daemon::pid`] is the program's own pid). Its output goes to a log file; it is
/// stopped on drop (SIGTERM, then SIGKILL after a grace period).
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
}

impl Daemon {
    /// Starts `program args` in namespace `ns` with `env` added, logging to `log`.
    pub fn spawn(
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({}) in {ns}", program.display()))?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            log,
            grace: Duration::from_secs(10),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops it: SIGTERM, then SIGKILL when it has not exited within the grace period.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // The pid is our own unreaped child, so it cannot have been reused.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_receiver_sum_and_errors() {
        let ok = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bytes":10485760,"seconds":1.0},
            "sum_received":{"start":0,"end":1.0,"seconds":1.0,"bytes":1250000000,"bits_per_second":1e10,"sender":true}}}"#;
        let r = parse_iperf3(ok).unwrap();
        assert_eq!(r.bytes, 1_250_000_000);
        assert!((r.gbps() - 10.0).abs() < 1e-9);
        let failed = r#"{"start":{"connected":[]},"intervals":[],"end":{},
            "error":"unable to connect to server: Connection refused"}"#;
        let err = parse_iperf3(failed).unwrap_err().to_string();
        assert!(err.contains("Connection refused"), "{err}");
        assert!(parse_iperf3("iperf3: error").is_err());
    }

    #[test]
    fn sockperf_full_rtt_summary() {
        let text = "sockperf: [Total Run] RunTime=1.002 sec; Warm up time=400 msec; SentMessages=53015; ReceivedMessages=53014\n\
            sockperf: ========= Printing statistics for Server No: 0\n\
            sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=32478; ReceivedMessages=32478\n\
            sockperf: \u{1b}[2;35m====> avg-rtt=16.920 (std-dev=56.264)\u{1b}[0m\n\
            sockperf: ---> percentile 99.000 =   22.843\n\
            sockperf: ---> percentile 90.000 =   18.447\n\
            sockperf: ---> percentile 50.000 =   14.130\n";
        let r = parse_sockperf(text).unwrap();
        assert_eq!(
            r,
            PingPong {
                avg_us: 16.920,
                p50_us: 14.130,
                p99_us: 22.843,
                round_trips: 32478
            }
        );
        assert!(parse_sockperf("sockperf: Test ended\n").is_err());
    }

    #[test]
    fn wrk_report_with_errors() {
        let text = "Running 1s test @ http://10.78.0.2:8080/1k\n  2 threads and 16 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   521.07us  210.11us   4.10ms   80.00%\n\
            \x20 12345 requests in 1.00s, 15.27MB read\n\
            \x20 Socket errors: connect 2, read 3, write 0, timeout 1\n\
            \x20 Non-2xx or 3xx responses: 7\n\
            Requests/sec:  12339.81\nTransfer/sec:     15.26MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(
            r,
            Wrk {
                requests: 12345,
                per_second: 12339.81,
                socket_errors: 6,
                non_2xx: 7
            }
        );
        assert!(parse_wrk("unable to connect to 10.78.0.2:8080 Connection refused").is_err());
    }
}
