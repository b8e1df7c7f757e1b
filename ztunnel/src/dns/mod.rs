//! The DNS proxy: every enrolled pod's DNS (UDP and TCP to port 53, redirected by the pod's
//! capture rules to 15053 on its loopback) is answered by ztunnel for the mesh's service
//! names and forwarded to the pod's upstream resolver for everything else.
//!
//! - [`decision`]: what to answer, a pure function of a state snapshot, the asking pod and
//!   the query's bytes (hickory-proto parses and encodes; nothing here reads DNS by hand).
//! - `crate::proxy::dns`: the per-pod UDP and TCP loops, the rate limit, forwarding and
//!   relaying (the acting side, beside the other proxies).
//! - [`upstream`]: which resolver a pod's forwarded queries go to.
//!
//! Declared external hosts (ExternalService) are mesh names too: [`decision`] answers them
//! with the VIPs the controller allocated, which ztunnel's outbound proxy maps back to the
//! service.
//!
//! Not for: resolving names for ztunnel itself, or caching upstream answers (the pod's own
//! resolver and the cluster's DNS cache).

pub mod decision;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use decision::{decide, Asker, Decision, Outcome};

/// The port ztunnel's DNS listeners take in every pod (the capture rules redirect 53 there).
pub const DNS_PORT: u16 = ambit_proto::ports::DNS;

/// One family's DNS listeners in a pod, as capture opens them; `crate::proxy::dns` serves
/// them.
#[derive(Debug)]
pub struct DnsListeners {
    /// UDP on the loopback port 15053.
    pub udp: tokio::net::UdpSocket,
    /// TCP on the same address.
    pub tcp: tokio::net::TcpListener,
}

// The defaults; their reasons are in ARCHITECTURE.md ("Limits").
const DEFAULT_QUERY_RATE: u32 = 200;
const DEFAULT_QUERY_BURST: u32 = 400;
const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 2000;

/// How the DNS proxy runs (flags in [`DnsArgs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Capture and answer pods' DNS at all. Off: no DNS rules, no listeners, pods resolve
    /// as they did before ztunnel.
    pub enabled: bool,
    /// Where forwarded queries go, for every pod; empty: each pod's own resolver
    /// ([`upstream::for_pod`]).
    pub upstreams: Vec<SocketAddr>,
    /// The cluster's DNS domain (service hostnames are `<svc>.<ns>.svc.<domain>`).
    pub cluster_domain: Arc<str>,
    /// Queries per second one pod may send (sustained); 0: no limit.
    pub query_rate: u32,
    /// Queries one pod may send at once above the rate (the bucket's size).
    pub query_burst: u32,
    /// How long one upstream gets to answer before the next one is tried.
    pub upstream_timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            enabled: true,
            upstreams: Vec::new(),
            cluster_domain: Arc::from("cluster.local"),
            query_rate: DEFAULT_QUERY_RATE,
            query_burst: DEFAULT_QUERY_BURST,
            upstream_timeout: Duration::from_millis(DEFAULT_UPSTREAM_TIMEOUT_MS),
        }
    }
}

impl DnsSettings {
    /// The proxy turned off (tests that do not look at DNS, and `--dns-proxy false`).
    pub fn disabled() -> Self {
        DnsSettings {
            enabled: false,
            ..DnsSettings::default()
        }
    }
}

/// The DNS proxy's flags (flattened into ztunnel's `Args`; each also an environment variable).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DnsArgs {
    /// Capture enrolled pods' DNS (UDP and TCP port 53) and answer the mesh's service names;
    /// `false` leaves pods' DNS alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "AMBIT_DNS_PROXY")]
    pub dns_proxy: bool,
    /// Resolver(s) forwarded queries go to, `ip:port` (comma-separated); default: each pod's
    /// own, from the resolv.conf it was enrolled with.
    #[arg(long, value_delimiter = ',', env = "AMBIT_DNS_UPSTREAM")]
    pub dns_upstream: Vec<SocketAddr>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local", env = "AMBIT_CLUSTER_DOMAIN")]
    pub cluster_domain: String,
    /// DNS queries per second per pod (sustained); over it a query gets REFUSED. 0: no limit.
    #[arg(long, default_value_t = DEFAULT_QUERY_RATE, env = "AMBIT_DNS_POD_QUERY_RATE")]
    pub dns_pod_query_rate: u32,
    /// DNS queries a pod may send at once above its rate.
    #[arg(long, default_value_t = DEFAULT_QUERY_BURST, env = "AMBIT_DNS_POD_QUERY_BURST")]
    pub dns_pod_query_burst: u32,
    /// Milliseconds one upstream resolver gets before the next is tried (then SERVFAIL).
    #[arg(long, default_value_t = DEFAULT_UPSTREAM_TIMEOUT_MS, env = "AMBIT_DNS_UPSTREAM_TIMEOUT_MS")]
    pub dns_upstream_timeout_ms: u64,
}

impl From<DnsArgs> for DnsSettings {
    fn from(a: DnsArgs) -> Self {
        DnsSettings {
            enabled: a.dns_proxy,
            upstreams: a.dns_upstream,
            cluster_domain: Arc::from(a.cluster_domain.trim_end_matches('.')),
            query_rate: a.dns_pod_query_rate,
            query_burst: a.dns_pod_query_burst,
            upstream_timeout: Duration::from_millis(a.dns_upstream_timeout_ms),
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` banked. One per pod, shared by
/// its UDP and TCP listeners.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` 0 admits everything.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..20).filter(|_| bucket.take(start)).count(), 5);
        // A tenth of a second later: one more token; a second later: ten, never above five.
        assert!(bucket.take(start + Duration::from_millis(100)));
        assert!(!bucket.take(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(10);
        assert_eq!((0..20).filter(|_| bucket.take(later)).count(), 5);
        let mut unlimited = TokenBucket::new(0, 1, start);
        assert!((0..1000).all(|_| unlimited.take(start)));
    }

    #[test]
    fn flags_have_defaults() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            dns: DnsArgs,
        }
        let s = DnsSettings::from(Cli::parse_from(["x"]).dns);
        assert_eq!(s, DnsSettings::default());
        let s = DnsSettings::from(
            Cli::parse_from([
                "x",
                "--dns-proxy",
                "false",
                "--dns-upstream",
                "10.0.0.10:53,[fd00::a]:5353",
                "--cluster-domain",
                "corp.example.",
            ])
            .dns,
        );
        assert!(!s.enabled);
        assert_eq!(s.upstreams.len(), 2);
        assert_eq!(&*s.cluster_domain, "corp.example");
    }
}
