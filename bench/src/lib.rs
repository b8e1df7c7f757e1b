//! Measurement helpers shared by Ambit's benchmarks (`bench/src/bin/*`): latency
//! percentiles and the table every benchmark prints, with the ratio of each measured path
//! to the direct one from the same run.
//!
//! - [`pair`], [`tools`], [`dedicated`]: the side-by-side harness (`ztunnel_peer`), which runs
//!   two ztunnel implementations in dedicated mode on the same two namespaces and drives
//!   iperf3, sockperf and wrk through them.
//! - [`servers`]: the sink, echo and HBONE forwarding ends the other benchmarks measure against.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

pub mod dedicated;
pub mod pair;
pub mod servers;
pub mod tools;

/// A binary a benchmark drives: the one its option `flag` names (`given`), else `name` beside
/// the benchmark's own binary, where cargo builds the workspace's binaries in the same
/// profile. Fails when there is none, saying how to build it (`build`, a cargo command).
pub fn binary(
    flag: &str,
    given: Option<&Path>,
    name: &str,
    build: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("{flag} {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating this benchmark's binary")?;
    let bin = exe
        .parent()
        .context("no directory for this benchmark's binary")?
        .join(name);
    if !bin.is_file() {
        bail!(
            "{} not found: build it in the same profile first ({build}), or pass {flag}",
            bin.display()
        );
    }
    Ok(bin)
}

/// Latency samples of one path.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    sorted: bool,
    values: Vec<Duration>,
}

impl Samples {
    /// Room for `n` samples, so recording does not allocate while measuring.
    pub fn with_capacity(n: usize) -> Self {
        Samples {
            sorted: false,
            values: Vec::with_capacity(n),
        }
    }

    pub fn record(&mut self, sample: Duration) {
        self.sorted = false;
        self.values.push(sample);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `p`-th percentile (0..=100), nearest rank; zero when empty.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.values.is_empty() {
            return Duration::ZERO;
        }
        if !self.sorted {
            self.values.sort_unstable();
            self.sorted = true;
        }
        let rank = ((p / 100.0) * self.values.len() as f64).ceil() as usize;
        self.values[rank.clamp(1, self.values.len()) - 1]
    }
}

/// Microseconds, for tables.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// One row: a metric measured on the direct path and on the path under test.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub direct: f64,
    pub measured: f64,
}

/// Prints rows as a fixed-width table with the measured/direct ratio.
pub fn print_table(title: &str, measured_name: &str, rows: &[Row]) {
    println!("{title}");
    let width = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<width$}  {:>12}  {:>12}  {:>14}",
        "metric",
        "direct",
        measured_name,
        format!("{measured_name}/direct"),
    );
    for row in rows {
        let ratio = if row.direct == 0.0 {
            f64::NAN
        } else {
            row.measured / row.direct
        };
        println!(
            "{:<width$}  {:>12.1}  {:>12.1}  {:>14.2}",
            row.metric, row.direct, row.measured, ratio
        );
    }
}

/// Median, minimum and maximum of `values` (the median of an even count is the mean of the
/// middle two); NaN for none.
pub fn median_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn proc_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context as _;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is parenthesised and may hold spaces, so split after its last `)`;
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after it.
    let rest = stat.rsplit(')').next().context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    // USER_HZ is 100 on every Linux architecture we run on.
    Ok((utime + stime) / 100.0)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(value
        .split_whitespace()
        .next()
        .with_context(|| format!("empty {field}"))?
        .parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median_spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(median_spread(&[]).0.is_nan());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100u64 {
            s.record(Duration::from_micros(i));
        }
        assert_eq!(s.percentile(50.0), Duration::from_micros(50));
        assert_eq!(s.percentile(99.0), Duration::from_micros(99));
        assert_eq!(s.percentile(100.0), Duration::from_micros(100));
        assert_eq!(s.percentile(0.0), Duration::from_micros(1));
    }
}
