//! The in-pod capture rules: rendered as `iptables-restore` documents (pure, unit-tested), applied
//! atomically with `iptables-restore --noflush`, plus the policy routing that TPROXY needs.
//!
//! Everything here acts on the network namespace of the *calling thread* (commands are spawned as
//! children of it and inherit it), so callers run it on the pod's
//! [`NetnsWorker`](super::netns::NetnsWorker). Rules live in our own chains (`AMBIT_PRERT`, `AMBIT_OUTPUT`),
//! reached by one jump each from the built-in chains, so removal deletes exactly what we added and
//! re-applying replaces our rules in one transaction instead of stacking duplicates.
//!
//! The rule set (per family; for the `mangle`/`nat` split and the marks, see [`render_apply`]):
//! - outbound: the app's new TCP connections, except to loopback and except ztunnel's own marked
//!   sockets, are REDIRECTed to the outbound port (15001); `SO_ORIGINAL_DST` gives the target.
//! - inbound plaintext: new TCP connections arriving from outside are TPROXYed to 15006 and marked;
//!   `ip rule fwmark <tproxy mark> lookup <table>` + `local 0.0.0.0/0 dev lo` in that table
//!   deliver them locally whatever their destination.
//! - inbound HBONE: 15008 is exempt from TPROXY; ztunnel listens on it in the pod directly.
//! - connections ztunnel opens to the app *from the client's IP* (IP_TRANSPARENT, marked) get a
//!   connmark when they arrive on `lo`; the app's replies take that mark back and are routed to
//!   `lo` by the same table, instead of out of the pod towards the real client.
//! - DNS, when `dns_port` is set: UDP and TCP to port 53 (except to loopback and except
//!   ztunnel's marked sockets) are REDIRECTed to the DNS proxy's port (15053).
//! - UDP, when `udp_capture` names networks of the family: the app's datagrams to them are
//!   marked in `mangle OUTPUT`, routed back in through `lo` by the TPROXY table, and TPROXYed
//!   in `mangle PREROUTING` to `127.0.0.1:<udp_port>` (`[::1]` for IPv6) with their
//!   destination intact. Other IPv4 UDP is left alone; other IPv6 UDP is dropped (below).
//!
//! IPv6 gets the same capture ([`render_apply_v6`], applied with `ip6tables-restore` beside the
//! IPv4 rules and removed with them): the same chains, marks and ports in `ip6tables`'
//! `mangle` and `nat`, REDIRECT to `[::1]:15001`, TPROXY to `[::]:15006`, and
//! `ip -6 rule/route` for the TPROXY table. What cannot be meshed is dropped, never let
//! through: in the IPv6 `filter` table only loopback, link-level ICMPv6 and TCP (which the
//! rules above steer to ztunnel) pass, and of UDP only what ztunnel handles (the captured
//! networks' datagrams, which leave by `lo`; DNS; ztunnel's own), so other IPv6 UDP and the
//! rest are closed; and a pod whose
//! IPv6 the mesh does not know ([`Ipv6Capture::Closed`]) gets only the closing `filter` rules,
//! as does a kernel without IPv6 capture support.
//!
//! The rules belong to the pod's enrollment, not to a ztunnel process: they stay when ztunnel
//! stops or dies (a pod nobody serves is refused, never let through), and a starting ztunnel
//! adopts them. An empty marker chain (`AMBIT_V1_<hash>`, see [`marker_chain`]) records the
//! format and the exact rule set; [`apply`] leaves rules that carry the current marker
//! untouched, and replaces any other version in one `iptables-restore` transaction.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// Chain in `mangle` PREROUTING: inbound TPROXY and the connmark of ztunnel's transparent dials.
pub const CHAIN_PREROUTING: &str = "AMBIT_PRERT";
/// Chain in `mangle` OUTPUT (mark restore) and `nat` OUTPUT (outbound REDIRECT).
pub const CHAIN_OUTPUT: &str = "AMBIT_OUTPUT";
/// Every chain we own starts with this; nothing else is ever touched.
const OWN_PREFIX: &str = "AMBIT_";
/// Marker chains start with this, then the rules' format version.
const MARKER_PREFIX: &str = "AMBIT_V";
/// Version of the rule set's layout; bump it when a change must not be mistaken for the old.
const RULES_FORMAT: u32 = 1;

/// Chain in the IPv6 `filter` INPUT: the fail-closed rules for arriving packets.
pub const CHAIN_INPUT: &str = "AMBIT_INPUT";

/// (table, built-in chain, our chain) for the IPv6 `filter` jumps, installed in both modes
/// (with [`JUMPS`] as well when IPv6 is captured). `filter` OUTPUT shares its chain name with
/// the `nat`/`mangle` one: another table, so another chain entirely.
const JUMPS_V6_FILTER: [(&str, &str, &str); 2] = [
    ("filter", "INPUT", CHAIN_INPUT),
    ("filter", "OUTPUT", CHAIN_OUTPUT),
];

/// ICMPv6 multicast listener query, report, done and v2 report (130, 131, 132, 143): switches
/// that snoop multicast forward neighbour solicitations only to listeners that reported. They
/// carry group addresses, nothing an application could use as a channel.
const ICMPV6_LINK_MLD: [u8; 4] = [130, 131, 132, 143];
/// ICMPv6 router solicitation and advertisement, neighbour solicitation and advertisement,
/// redirect (133-137): without them the pod cannot resolve its gateway. Accepted only with hop
/// limit 255 (RFC 4861), which no router forwards, so they cannot come from off the link.
const ICMPV6_LINK_ND: [u8; 5] = [133, 134, 135, 136, 137];

/// (table, built-in chain, our chain) for every jump we install.
const JUMPS: [(&str, &str, &str); 3] = [
    ("mangle", "PREROUTING", CHAIN_PREROUTING),
    ("mangle", "OUTPUT", CHAIN_OUTPUT),
    ("nat", "OUTPUT", CHAIN_OUTPUT),
];

/// Which iptables implementation to drive. The rules are the same for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Whatever `iptables-restore` on `PATH` is (nft or legacy, as the distribution chose).
    #[default]
    Default,
    /// `iptables-nft-restore`.
    Nft,
    /// `iptables-legacy-restore` (x_tables), for hosts whose other tools still use it.
    Legacy,
}

impl Backend {
    fn restore_program(self) -> &'static str {
        match self {
            Backend::Default => "iptables-restore",
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    fn save_program(self) -> &'static str {
        match self {
            Backend::Default => "iptables-save",
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }

    fn restore6_program(self) -> &'static str {
        match self {
            Backend::Default => "ip6tables-restore",
            Backend::Nft => "ip6tables-nft-restore",
            Backend::Legacy => "ip6tables-legacy-restore",
        }
    }

    fn save6_program(self) -> &'static str {
        match self {
            Backend::Default => "ip6tables-save",
            Backend::Nft => "ip6tables-nft-save",
            Backend::Legacy => "ip6tables-legacy-save",
        }
    }
}

/// What happens to a pod's IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6Capture {
    /// Captured like IPv4 (the pod has an IPv6 address the mesh knows): its TCP goes through
    /// ztunnel's IPv6 listeners, everything else but loopback and link-level ICMPv6 is dropped.
    #[default]
    Captured,
    /// Closed: every IPv6 packet but loopback, link-level ICMPv6 and the configured port
    /// exclusions is dropped (the mesh knows no IPv6 address of the pod, so its IPv6 could not
    /// be meshed: inbound HBONE could not name it, policy could not match it).
    Closed,
}

/// Marks, ports and routing numbers of the capture rules. The defaults are the numbers operators
/// know from Istio's ambient mode, so existing firewall exceptions keep working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// SO_MARK carried by every socket ztunnel opens in a pod: never captured.
    pub mark: u32,
    /// The bits of the packet mark that belong to us; others are left to other tools.
    pub mask: u32,
    /// Mark for packets TPROXYed to the inbound port and for replies to transparent dials.
    pub tproxy_mark: u32,
    /// Routing table holding `local 0.0.0.0/0 dev lo`.
    pub route_table: u32,
    /// Priority of the `fwmark` policy-routing rule (before `main` at 32766).
    pub rule_priority: u32,
    /// Outbound capture port (REDIRECT target).
    pub outbound_port: u16,
    /// Inbound plaintext capture port (TPROXY target).
    pub inbound_port: u16,
    /// Inbound HBONE port: listened on directly, never TPROXYed.
    pub hbone_port: u16,
    /// Destination ports of inbound connections that bypass capture (dedicated mode: e.g. ssh,
    /// ztunnel's admin/metrics/readiness ports).
    pub inbound_exclude_ports: Vec<u16>,
    /// Sources whose inbound connections bypass capture: e.g. the address kubelet's health
    /// probes come from (Istio SNATs them to 169.254.7.127), so probes reach the app as before.
    pub inbound_exclude_sources: Vec<ipnet::Ipv4Net>,
    /// Destination ports of outbound connections that bypass capture.
    pub outbound_exclude_ports: Vec<u16>,
    /// The iptables implementation.
    pub backend: Backend,
    /// Whether the pod's IPv6 is captured or closed.
    pub ipv6: Ipv6Capture,
    /// DNS capture port (REDIRECT target of UDP and TCP to port 53), when the DNS proxy is
    /// on; `None` leaves the pod's DNS alone.
    pub dns_port: Option<u16>,
    /// Networks whose UDP the pod sends is captured (TPROXYed to `udp_port` on the
    /// family's loopback) and carried over CONNECT-UDP when the destination is in the mesh.
    /// No IPv4 network leaves the pod's IPv4 UDP alone (DNS aside); no IPv6 network leaves
    /// its IPv6 UDP dropped (DNS aside), as is all IPv6 UDP to networks not listed.
    pub udp_capture: Vec<ipnet::IpNet>,
    /// The UDP capture port (TPROXY target on 127.0.0.1 and [::1]).
    pub udp_port: u16,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            mark: 0x539,
            mask: 0xfff,
            tproxy_mark: 0x111,
            route_table: 133,
            rule_priority: 32764,
            outbound_port: 15001,
            inbound_port: 15006,
            hbone_port: 15008,
            inbound_exclude_ports: Vec::new(),
            inbound_exclude_sources: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            backend: Backend::Default,
            ipv6: Ipv6Capture::default(),
            dns_port: None,
            udp_capture: Vec::new(),
            udp_port: 15001,
        }
    }
}

impl RuleConfig {
    /// Defaults for dedicated mode, where ztunnel shares the namespace it captures: its
    /// admin, metrics and readiness ports and ssh stay reachable, and its own connections to
    /// the controller (15012) are not captured even when made without the socket factory.
    pub fn dedicated() -> Self {
        Self {
            inbound_exclude_ports: vec![22, 15000, 15020, 15021],
            outbound_exclude_ports: vec![15012],
            ..Self::default()
        }
    }

    fn fwmark(&self) -> String {
        format!("{:#x}/{:#x}", self.tproxy_mark, self.mask)
    }

    /// Whether the pod's IPv4 UDP to some network is captured (the IPv4 capture socket is
    /// needed).
    pub fn captures_udp_v4(&self) -> bool {
        !self.udp_networks(Family::V4).is_empty()
    }

    /// Whether the pod's IPv6 UDP to some network is captured: networks are listed and the
    /// pod's IPv6 is captured (the IPv6 capture socket is needed).
    pub fn captures_udp_v6(&self) -> bool {
        self.ipv6 == Ipv6Capture::Captured && !self.udp_networks(Family::V6).is_empty()
    }

    /// The captured UDP networks of one family.
    fn udp_networks(&self, family: Family) -> Vec<&ipnet::IpNet> {
        self.udp_capture
            .iter()
            .filter(|net| match family {
                Family::V4 => matches!(net, ipnet::IpNet::V4(_)),
                Family::V6 => matches!(net, ipnet::IpNet::V6(_)),
            })
            .collect()
    }
}

/// Errors from running iptables and iproute2.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The program could not be started (not installed, not on `PATH`).
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// The rules document could not be written to `iptables-restore`.
    #[error("cannot feed rules to {program}")]
    Stdin {
        /// The program.
        program: &'static str,
        /// The write error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// What of ours is present in a namespace, as read from `iptables-save`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Per table, our chains that exist.
    pub chains: BTreeMap<String, Vec<String>>,
    /// (table, built-in chain, our chain) -> how many identical jumps exist.
    pub jumps: BTreeMap<(String, String, String), usize>,
}

impl Existing {
    /// True when nothing of ours is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.values().all(Vec::is_empty) && self.jumps.values().all(|n| *n == 0)
    }

    fn jump_count(&self, table: &str, hook: &str, chain: &str) -> usize {
        self.jumps
            .get(&(table.to_owned(), hook.to_owned(), chain.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

/// Reads our chains and jumps out of an `iptables-save` dump. Other rules are ignored.
pub fn parse_save(dump: &str) -> Existing {
    let mut existing = Existing::default();
    let mut table = String::new();
    for line in dump.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(OWN_PREFIX) {
                existing
                    .chains
                    .entry(table.clone())
                    .or_default()
                    .push(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            // Only the exact jump we install counts; a hand-written rule mentioning our chain
            // with extra matches is someone else's business.
            let words: Vec<&str> = rule.split_whitespace().collect();
            if let [hook, "-j", target] = words[..] {
                if target.starts_with(OWN_PREFIX) && !hook.starts_with(OWN_PREFIX) {
                    *existing
                        .jumps
                        .entry((table.clone(), hook.to_owned(), target.to_owned()))
                        .or_default() += 1;
                }
            }
        }
    }
    existing
}

/// The marker chain of `cfg`'s rule set: the format version and a hash of the rules, so a
/// ztunnel recognises rules it would install itself and adopts them as they are.
pub fn marker_chain(cfg: &RuleConfig) -> String {
    // FNV-1a: stable across builds and platforms (std's hashers are not).
    let hash = render_rules(cfg, &Existing::default(), None, Family::V4)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    // 32 bits of it keep the name within iptables' 28 characters.
    format!("{MARKER_PREFIX}{RULES_FORMAT}_{:08x}", hash as u32)
}

/// Whether `existing` is exactly `cfg`'s rule set as [`apply`] installs it (marker, chains and
/// one jump each): then a starting ztunnel adopts the rules without touching them.
pub fn is_current(cfg: &RuleConfig, existing: &Existing) -> bool {
    let has = |table: &str, chain: &str| {
        existing
            .chains
            .get(table)
            .is_some_and(|cs| cs.iter().any(|c| c == chain))
    };
    has("nat", &marker_chain(cfg))
        && JUMPS
            .iter()
            .all(|(t, h, c)| has(t, c) && existing.jump_count(t, h, c) == 1)
}

/// Renders the `iptables-restore --noflush` document that installs (or re-installs) the rules.
///
/// Declaring a chain in a `--noflush` restore creates it, or empties it if it exists, so our
/// rules are replaced wholesale; the jumps are only added when `existing` lacks them, and marker
/// chains of other versions are deleted. The whole document commits atomically per table: a
/// pod is never half-captured, nor uncaptured while its rules are replaced.
pub fn render_apply(cfg: &RuleConfig, existing: &Existing) -> String {
    render_rules(cfg, existing, Some(&marker_chain(cfg)), Family::V4)
}

/// The address family a rule document is for: the rules are the same but for the loopback
/// network and the wildcard address TPROXY delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn unspecified(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }

    /// The loopback address the UDP capture socket listens on.
    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1",
            Family::V6 => "::1",
        }
    }

    /// `ip`'s family flag.
    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The local route of the TPROXY table: everything is delivered locally.
    fn any_net(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// The `mangle` and `nat` capture of one family. `marker` is declared in `nat` (IPv4 only:
/// adoption is decided on the IPv4 rules; the IPv6 ones are re-applied in one transaction).
fn render_rules(
    cfg: &RuleConfig,
    existing: &Existing,
    marker: Option<&str>,
    family: Family,
) -> String {
    let mark = format!("{:#x}/{:#x}", cfg.mark, cfg.mask);
    let tproxy = cfg.fwmark();
    let udp_nets = cfg.udp_networks(family);
    let mut doc = String::new();
    let mut line = |s: String| {
        doc.push_str(&s);
        doc.push('\n');
    };

    line("*mangle".into());
    line(format!(":{CHAIN_PREROUTING} - [0:0]"));
    line(format!(":{CHAIN_OUTPUT} - [0:0]"));
    // ztunnel's own dials to the app (marked, looped back to this namespace): remember the
    // connection so the app's replies can be steered back to ztunnel (see mangle OUTPUT).
    line(format!(
        "-A {CHAIN_PREROUTING} -i lo -m mark --mark {mark} -j CONNMARK --set-xmark {tproxy}"
    ));
    // The app's UDP to the captured networks, marked in mangle OUTPUT (below) and so routed
    // back in through `lo` by the TPROXY table: handed to the UDP capture listener with its
    // destination untouched (IP_RECVORIGDSTADDR tells it). Only the flow's original
    // direction: the app's *replies* to ztunnel's transparent sends carry the restored mark
    // too, and must reach the socket they answer. TPROXY gives a datagram of a flow ztunnel
    // already answers to that flow's connected socket before the listener.
    if !udp_nets.is_empty() {
        line(format!(
            "-A {CHAIN_PREROUTING} -i lo -p udp -m mark --mark {tproxy} -m conntrack --ctdir ORIGINAL -j TPROXY --on-port {} --on-ip {} --tproxy-mark {tproxy}",
            cfg.udp_port,
            family.localhost()
        ));
    }
    // Anything else on loopback is the pod talking to itself, or outbound traffic already
    // REDIRECTed to 127.0.0.1:15001 (or [::1]:15001): not inbound traffic.
    line(format!("-A {CHAIN_PREROUTING} -i lo -j RETURN"));
    // The source exclusions are IPv4 networks (kubelet's probe address).
    if family == Family::V4 {
        for net in &cfg.inbound_exclude_sources {
            line(format!("-A {CHAIN_PREROUTING} -s {net} -p tcp -j RETURN"));
        }
    }
    // HBONE is addressed to the pod IP and ztunnel listens on it in the pod: no steering needed.
    for port in std::iter::once(cfg.hbone_port).chain(cfg.inbound_exclude_ports.iter().copied()) {
        line(format!(
            "-A {CHAIN_PREROUTING} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    // TPROXY keeps the packet untouched (local_addr on the accepted socket is the original
    // destination) and marks it so the policy route delivers it locally.
    //
    // Only the opening SYN is steered. Later packets are addressed to the pod's own IP, so the
    // kernel finds the accepted socket by its addresses anyway; and connections that predate
    // enrollment must not be touched: conntrack sees their first packet after enrollment as
    // NEW (loose pickup), and TPROXYing it would land on our listener and be reset.
    line(format!(
        "-A {CHAIN_PREROUTING} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TPROXY --on-port {} --on-ip {} --tproxy-mark {tproxy}",
        cfg.inbound_port,
        family.unspecified()
    ));
    // With UDP capture, ztunnel's own UDP keeps its mark: restoring the TPROXY mark on the
    // datagrams it sends to the app *as the client* (whose flow the connmark above marks)
    // would steer them into the UDP capture below as if the client's app had sent them.
    if !udp_nets.is_empty() {
        line(format!(
            "-A {CHAIN_OUTPUT} -p udp -m mark --mark {mark} -j RETURN"
        ));
    }
    // Replies of connections marked above get the mark back, and with it the route to `lo`.
    // Only our mask bits are restored, so other tools' mark bits survive.
    line(format!(
        "-A {CHAIN_OUTPUT} -m connmark --mark {tproxy} -j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}",
        mask = cfg.mask
    ));
    // UDP capture: the app's datagrams to the captured networks get the TPROXY mark, which
    // routes them to `lo` (table above) and so to the PREROUTING rule. Not ztunnel's own
    // (marked, returned above), not replies, and not DNS, which nat OUTPUT sends to the DNS proxy
    // (it must stay ahead of this).
    if !udp_nets.is_empty() {
        if cfg.dns_port.is_some() {
            line(format!(
                "-A {CHAIN_OUTPUT} -p udp -m udp --dport 53 -j RETURN"
            ));
        }
        for net in &udp_nets {
            line(format!(
                "-A {CHAIN_OUTPUT} -d {net} -p udp -m conntrack --ctdir ORIGINAL -j MARK --set-xmark {tproxy}"
            ));
        }
    }
    for (table, hook, chain) in JUMPS.iter().filter(|(t, _, _)| *t == "mangle") {
        if existing.jump_count(table, hook, chain) == 0 {
            line(format!("-A {hook} -j {chain}"));
        }
    }
    line("COMMIT".into());

    line("*nat".into());
    if let Some(marker) = marker {
        line(format!(":{marker} - [0:0]"));
        for old in existing.chains.get("nat").into_iter().flatten() {
            if old.starts_with(MARKER_PREFIX) && old != marker {
                line(format!("-X {old}"));
            }
        }
    }
    line(format!(":{CHAIN_OUTPUT} - [0:0]"));
    // Loopback and the pod's own IP (routed via lo) are in-pod traffic, not mesh traffic.
    line(format!("-A {CHAIN_OUTPUT} -o lo -j RETURN"));
    line(format!(
        "-A {CHAIN_OUTPUT} -d {} -j RETURN",
        family.loopback()
    ));
    // ztunnel's own sockets (HBONE to other nodes, dials to the app) must never loop back.
    line(format!(
        "-A {CHAIN_OUTPUT} -p tcp -m mark --mark {mark} -j RETURN"
    ));
    for port in &cfg.outbound_exclude_ports {
        line(format!(
            "-A {CHAIN_OUTPUT} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    // DNS: the pod's queries to any resolver off its loopback go to ztunnel's DNS proxy,
    // over UDP and TCP; ztunnel's own queries to the upstream carry the mark and leave.
    if let Some(dns) = cfg.dns_port {
        line(format!(
            "-A {CHAIN_OUTPUT} -p udp -m mark --mark {mark} -j RETURN"
        ));
        line(format!(
            "-A {CHAIN_OUTPUT} -p udp -m udp --dport 53 -j REDIRECT --to-ports {dns}"
        ));
        line(format!(
            "-A {CHAIN_OUTPUT} -p tcp -m tcp --dport 53 --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports {dns}"
        ));
    }
    // SYN only, for the same reason as TPROXY: NAT binds a connection at the first packet
    // conntrack sees, and for a connection older than the rules that is not a SYN.
    line(format!(
        "-A {CHAIN_OUTPUT} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    for (table, hook, chain) in JUMPS.iter().filter(|(t, _, _)| *t == "nat") {
        if existing.jump_count(table, hook, chain) == 0 {
            line(format!("-A {hook} -j {chain}"));
        }
    }
    line("COMMIT".into());
    doc
}

/// Renders the `ip6tables-restore --noflush` document for an enrolled pod's IPv6, as
/// `cfg.ipv6` says.
///
/// [`Ipv6Capture::Captured`]: the `mangle` and `nat` capture of [`render_apply`] for IPv6
/// (REDIRECT to `[::1]:<outbound>`, TPROXY to `[::]:<inbound>`, the same marks), and a
/// `filter` that lets through only what that capture handles: TCP, loopback, the link-level
/// ICMPv6 of [`ICMPV6_LINK_ND`] and [`ICMPV6_LINK_MLD`], and ICMPv6 errors about connections
/// conntrack knows (`RELATED`: packet too big keeps path MTU discovery working). Of UDP, only
/// what ztunnel handles passes: what carries the TPROXY mark (routed to `lo`: the app's
/// datagrams to the captured IPv6 networks, its replies to CONNECT-UDP flows ztunnel
/// delivers), DNS to the proxy, ztunnel's own
/// marked datagrams (to the upstream resolver with DNS capture; else, to the captured
/// networks only: a flow's passthrough) and replies to those. Other IPv6 UDP (and any other
/// protocol) is dropped instead of leaving the pod in plaintext.
///
/// [`Ipv6Capture::Closed`]: only the `filter` rules, which let through loopback and the
/// link-level ICMPv6; everything else is refused: on the way out with an ICMPv6
/// "administratively prohibited" to the app (its connect fails at once, so a dual-stack
/// client falls back to IPv4, which is captured, instead of waiting for a timeout); on the way
/// in by a silent drop (answering would mean sending IPv6 out of the pod). `mangle`/`nat`
/// chains of an earlier capture are deleted in the same document. The configured port
/// exclusions mean "not meshed, on purpose" (dedicated mode: ssh, the ops ports, the
/// controller), so they stay open: new connections to an inbound-excluded port and from the
/// pod to an outbound-excluded port, and the reply direction of connections that were let in
/// or out. Nothing else can open a connection, so the reply rule only ever matches those.
///
/// Same chain discipline as [`render_apply`]: our chains are refilled, jumps added once, and
/// the document commits per table atomically, so IPv6 is never open in between.
pub fn render_apply_v6(cfg: &RuleConfig, existing: &Existing) -> String {
    let mut doc = render_filter_v6(cfg, existing);
    match cfg.ipv6 {
        Ipv6Capture::Captured => doc.push_str(&render_rules(cfg, existing, None, Family::V6)),
        Ipv6Capture::Closed => {
            // Left by an earlier capture of the pod's IPv6: steering to listeners that are
            // no longer open would only reset what the filter now drops anyway.
            let captured = Existing {
                chains: existing
                    .chains
                    .iter()
                    .filter(|(t, _)| *t != "filter")
                    .map(|(t, c)| (t.clone(), c.clone()))
                    .collect(),
                jumps: existing
                    .jumps
                    .iter()
                    .filter(|((t, _, _), _)| t != "filter")
                    .map(|(k, n)| (k.clone(), *n))
                    .collect(),
            };
            if let Some(removal) = render_remove(&captured) {
                doc.push_str(&removal);
            }
        }
    }
    doc
}

/// The IPv6 `filter` rules of [`render_apply_v6`].
fn render_filter_v6(cfg: &RuleConfig, existing: &Existing) -> String {
    let mut doc = String::new();
    let mut line = |s: String| {
        doc.push_str(&s);
        doc.push('\n');
    };
    line("*filter".into());
    for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
        line(format!(":{chain} - [0:0]"));
    }
    line(format!("-A {CHAIN_INPUT} -i lo -j RETURN"));
    line(format!("-A {CHAIN_OUTPUT} -o lo -j RETURN"));
    for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
        for t in ICMPV6_LINK_ND {
            line(format!(
                "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq 255 -j RETURN"
            ));
        }
        for t in ICMPV6_LINK_MLD {
            line(format!(
                "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
            ));
        }
    }
    match cfg.ipv6 {
        Ipv6Capture::Captured => {
            // Every new TCP connection is steered to ztunnel by `mangle`/`nat` (or excluded
            // on purpose), so TCP passes here, as it does for IPv4.
            for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
                line(format!("-A {chain} -p tcp -j RETURN"));
                line(format!(
                    "-A {chain} -p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN"
                ));
            }
            // UDP carrying the TPROXY mark is routed to `lo` by the TPROXY table, so it
            // cannot leave the pod: the app's datagrams to the captured networks (marked in
            // `mangle OUTPUT`) and its replies to ztunnel's transparent sends (the connmark
            // restored), which CONNECT-UDP delivers whatever this node captures. `-o lo`
            // does not pass them: this hook still sees the route they had before `mangle`
            // re-routed them.
            line(format!(
                "-A {CHAIN_OUTPUT} -p udp -m mark --mark {} -j RETURN",
                cfg.fwmark()
            ));
            // DNS capture carries UDP: the pod's queries REDIRECTed to ztunnel's [::1]
            // listener, ztunnel's own (marked) queries to the upstream, and the answers to
            // both. UDP capture: ztunnel's marked datagrams to the captured networks (a
            // passthrough flow), and their answers. Only flows let through here can have a
            // reply direction.
            let udp_nets = cfg.udp_networks(Family::V6);
            let mark = format!("{:#x}/{:#x}", cfg.mark, cfg.mask);
            if let Some(dns) = cfg.dns_port {
                line(format!(
                    "-A {CHAIN_OUTPUT} -d ::1/128 -p udp -m udp --dport {dns} -j RETURN"
                ));
                line(format!(
                    "-A {CHAIN_OUTPUT} -p udp -m mark --mark {mark} -j RETURN"
                ));
            } else {
                for net in &udp_nets {
                    line(format!(
                        "-A {CHAIN_OUTPUT} -d {net} -p udp -m mark --mark {mark} -j RETURN"
                    ));
                }
            }
            if cfg.dns_port.is_some() || !udp_nets.is_empty() {
                for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
                    line(format!(
                        "-A {chain} -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN"
                    ));
                }
            }
        }
        Ipv6Capture::Closed => {
            if !cfg.inbound_exclude_ports.is_empty() || !cfg.outbound_exclude_ports.is_empty() {
                for chain in [CHAIN_INPUT, CHAIN_OUTPUT] {
                    line(format!(
                        "-A {chain} -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN"
                    ));
                }
            }
            for port in &cfg.inbound_exclude_ports {
                line(format!(
                    "-A {CHAIN_INPUT} -p tcp -m tcp --dport {port} -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -j RETURN"
                ));
            }
            for port in &cfg.outbound_exclude_ports {
                line(format!(
                    "-A {CHAIN_OUTPUT} -p tcp -m tcp --dport {port} -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -j RETURN"
                ));
            }
        }
    }
    line(format!("-A {CHAIN_INPUT} -j DROP"));
    line(format!(
        "-A {CHAIN_OUTPUT} -j REJECT --reject-with icmp6-adm-prohibited"
    ));
    for (table, hook, chain) in JUMPS_V6_FILTER {
        if existing.jump_count(table, hook, chain) == 0 {
            line(format!("-A {hook} -j {chain}"));
        }
    }
    line("COMMIT".into());
    doc
}

/// Renders the document that deletes every jump to our chains (duplicates included) and then
/// our chains. `None` when there is nothing to delete.
pub fn render_remove(existing: &Existing) -> Option<String> {
    if existing.is_empty() {
        return None;
    }
    let mut doc = String::new();
    let tables: std::collections::BTreeSet<&String> = existing
        .chains
        .keys()
        .chain(existing.jumps.keys().map(|(t, _, _)| t))
        .collect();
    for table in tables {
        // `writeln!` into a String cannot fail.
        let _ = writeln!(doc, "*{table}");
        for ((t, hook, chain), count) in &existing.jumps {
            if t == table {
                for _ in 0..*count {
                    let _ = writeln!(doc, "-D {hook} -j {chain}");
                }
            }
        }
        for chain in existing.chains.get(table).into_iter().flatten() {
            let _ = writeln!(doc, "-F {chain}");
            let _ = writeln!(doc, "-X {chain}");
        }
        let _ = writeln!(doc, "COMMIT");
    }
    Some(doc)
}

/// Whether `ip -4 rule show` (or `ip -6 rule show`) output holds our fwmark rule.
pub fn has_policy_rule(cfg: &RuleConfig, rules: &str) -> bool {
    let pref = format!("{}:", cfg.rule_priority);
    let needle = format!("fwmark {} lookup {}", cfg.fwmark(), cfg.route_table);
    rules
        .lines()
        .any(|l| l.trim_start().starts_with(&pref) && l.contains(&needle))
}

/// The `ip` arguments for our policy rule, with `verb` = `add` or `del`.
fn policy_rule_args(cfg: &RuleConfig, family: Family, verb: &'static str) -> Vec<String> {
    [family.ip_flag(), "rule", verb, "pref"]
        .into_iter()
        .map(String::from)
        .chain([
            cfg.rule_priority.to_string(),
            "fwmark".into(),
            cfg.fwmark(),
            "lookup".into(),
            cfg.route_table.to_string(),
        ])
        .collect()
}

/// Dumps the current namespace's rules with the configured backend.
pub fn save(backend: Backend) -> Result<String, IptablesError> {
    run(backend.save_program(), &[], None)
}

/// Dumps the current namespace's IPv6 rules with the configured backend.
pub fn save_v6(backend: Backend) -> Result<String, IptablesError> {
    run(backend.save6_program(), &[], None)
}

/// Whether the kernel has an IPv6 stack at all. Without one (`ipv6.disable=1`) there is no
/// IPv6 to close and `ip6tables-restore` could not run. `thread-self`, because `/proc/net` is
/// the namespace of the process's main thread, not of the namespace worker calling this.
pub(crate) fn ipv6_present() -> bool {
    std::path::Path::new("/proc/thread-self/net/if_inet6").exists()
}

/// Installs the rules and policy routing in the calling thread's namespace, or adopts them:
/// IPv4 rules already [`is_current`] are left untouched, any others are replaced atomically.
/// Idempotent: applying twice leaves exactly one copy. Returns whether the IPv4 rules were
/// adopted as they were.
///
/// IPv6 goes first ([`render_apply_v6`], re-declared in one transaction, so never open in
/// between), so a pod never has IPv4 capture while its IPv6 is still open; if that fails the
/// whole apply fails, and whatever an earlier apply installed stays.
pub fn apply(cfg: &RuleConfig) -> Result<bool, IptablesError> {
    if ipv6_present() {
        if cfg.ipv6 == Ipv6Capture::Captured {
            install_routing(cfg, Family::V6)?;
        }
        let existing = parse_save(&save_v6(cfg.backend)?);
        run(
            cfg.backend.restore6_program(),
            &["-w", "5", "--noflush"],
            Some(&render_apply_v6(cfg, &existing)),
        )?;
        if cfg.ipv6 == Ipv6Capture::Closed {
            // What an earlier capture of the pod's IPv6 routed; nothing is marked for it now.
            remove_routing(cfg, Family::V6)?;
        }
    }
    install_routing(cfg, Family::V4)?;
    let existing = parse_save(&save(cfg.backend)?);
    if is_current(cfg, &existing) {
        return Ok(true);
    }
    let doc = render_apply(cfg, &existing);
    run(
        cfg.backend.restore_program(),
        &["-w", "5", "--noflush"],
        Some(&doc),
    )?;
    Ok(false)
}

/// The TPROXY table's local route and the `fwmark` rule that selects it. Installed before
/// the rules: once TPROXY rules exist, marked packets need the table to be delivered.
fn install_routing(cfg: &RuleConfig, family: Family) -> Result<(), IptablesError> {
    let table = cfg.route_table.to_string();
    run(
        "ip",
        &[
            family.ip_flag(),
            "route",
            "replace",
            "local",
            family.any_net(),
            "dev",
            "lo",
            "table",
            &table,
        ],
        None,
    )?;
    if !has_policy_rule(cfg, &run("ip", &[family.ip_flag(), "rule", "show"], None)?) {
        let args = policy_rule_args(cfg, family, "add");
        match run(
            "ip",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            None,
        ) {
            Ok(_) => {}
            // Another applier (the CNI plugin and ztunnel adopting the same new pod) added
            // it between our look and our add: the rule we want is there.
            Err(IptablesError::Failed { stderr, .. }) if stderr.contains("File exists") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes what [`install_routing`] installed; absent pieces are not an error.
fn remove_routing(cfg: &RuleConfig, family: Family) -> Result<(), IptablesError> {
    let del = policy_rule_args(cfg, family, "del");
    let del: Vec<&str> = del.iter().map(String::as_str).collect();
    // `ip rule add` happily adds duplicates (e.g. after a crash mid-apply): delete them all.
    while has_policy_rule(cfg, &run("ip", &[family.ip_flag(), "rule", "show"], None)?) {
        run("ip", &del, None)?;
    }
    let table = cfg.route_table.to_string();
    let routes = match run(
        "ip",
        &[family.ip_flag(), "route", "show", "table", &table],
        None,
    ) {
        Ok(routes) => routes,
        // IPv6 tables exist only once a route was added to them; IPv4 shows them empty.
        Err(IptablesError::Failed { stderr, .. }) if stderr.contains("table does not exist") => {
            String::new()
        }
        Err(e) => return Err(e),
    };
    if !routes.trim().is_empty() {
        run(
            "ip",
            &[family.ip_flag(), "route", "flush", "table", &table],
            None,
        )?;
    }
    Ok(())
}

/// Removes our chains, jumps, policy rules and routes (both families) from the calling
/// thread's namespace. Removing what is not there is not an error.
pub fn remove(cfg: &RuleConfig) -> Result<(), IptablesError> {
    // Rules first, so nothing is TPROXYed towards a route that is already gone.
    let existing = parse_save(&save(cfg.backend)?);
    if let Some(doc) = render_remove(&existing) {
        run(
            cfg.backend.restore_program(),
            &["-w", "5", "--noflush"],
            Some(&doc),
        )?;
    }
    remove_routing(cfg, Family::V4)?;
    // IPv6 is opened last: the pod's IPv4 is already uncaptured, so both families are
    // direct again together.
    if ipv6_present() {
        let existing = parse_save(&save_v6(cfg.backend)?);
        if let Some(doc) = render_remove(&existing) {
            run(
                cfg.backend.restore6_program(),
                &["-w", "5", "--noflush"],
                Some(&doc),
            )?;
        }
        remove_routing(cfg, Family::V6)?;
    }
    Ok(())
}

/// Runs `program args`, optionally feeding `stdin`, and returns its stdout.
fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn { program, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| IptablesError::Stdin { program, source })?;
        // Dropping the pipe closes it: restore reads to EOF before committing.
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: &str = "\
*mangle
:AMBIT_PRERT - [0:0]
:AMBIT_OUTPUT - [0:0]
-A AMBIT_PRERT -i lo -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_PRERT -i lo -j RETURN
-A AMBIT_PRERT -p tcp -m tcp --dport 15008 -j RETURN
-A AMBIT_PRERT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff
-A PREROUTING -j AMBIT_PRERT
-A OUTPUT -j AMBIT_OUTPUT
COMMIT
*nat
:AMBIT_OUTPUT - [0:0]
-A AMBIT_OUTPUT -o lo -j RETURN
-A AMBIT_OUTPUT -d 127.0.0.0/8 -j RETURN
-A AMBIT_OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN
-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15001
-A OUTPUT -j AMBIT_OUTPUT
COMMIT
";

    /// What `iptables-save` prints after FRESH was applied, plus someone else's rules.
    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:AMBIT_OUTPUT - [0:0]
:AMBIT_PRERT - [0:0]
:OTHER - [0:0]
-A PREROUTING -j AMBIT_PRERT
-A PREROUTING -j OTHER
-A OUTPUT -j AMBIT_OUTPUT
-A OUTPUT -p tcp -j AMBIT_OUTPUT
-A AMBIT_PRERT -i lo -j RETURN
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:AMBIT_OUTPUT - [0:0]
-A OUTPUT -j AMBIT_OUTPUT
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_OUTPUT -o lo -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
";

    /// FRESH with the marker chain of `cfg` declared first in `nat`.
    fn with_marker(doc: &str, cfg: &RuleConfig) -> String {
        doc.replace("*nat\n", &format!("*nat\n:{} - [0:0]\n", marker_chain(cfg)))
    }

    #[test]
    fn fresh_namespace_gets_chains_rules_and_jumps() {
        let cfg = RuleConfig::default();
        assert_eq!(
            render_apply(&cfg, &Existing::default()),
            with_marker(FRESH, &cfg)
        );
    }

    #[test]
    fn current_rules_are_adopted_and_other_versions_replaced() {
        let cfg = RuleConfig::default();
        let marker = marker_chain(&cfg);
        assert!(
            marker.starts_with("AMBIT_V1_") && marker.len() <= 28,
            "{marker}"
        );
        // What iptables-save shows after our apply: adopted as is.
        let installed = with_marker(FRESH, &cfg);
        assert!(is_current(&cfg, &parse_save(&installed)));
        // Another rule set (other exclusions) has another marker: not current.
        let other = RuleConfig {
            outbound_exclude_ports: vec![15012],
            ..RuleConfig::default()
        };
        assert_ne!(marker_chain(&other), marker);
        assert!(!is_current(&other, &parse_save(&installed)));
        // Rules of an older layout (no marker) or with a missing jump are not current.
        assert!(!is_current(&cfg, &parse_save(FRESH)));
        let no_jump = installed.replace("-A OUTPUT -j AMBIT_OUTPUT\n", "");
        assert!(!is_current(&cfg, &parse_save(&no_jump)));
        // Replacing another version deletes its marker in the same transaction.
        let doc = render_apply(&other, &parse_save(&installed));
        let nat = &doc[doc.find("*nat").unwrap()..];
        assert!(nat.contains(&format!("-X {marker}\n")), "{doc}");
        assert!(nat.contains(&format!(":{} - [0:0]\n", marker_chain(&other))));
        // And removal takes the marker along.
        let removal = render_remove(&parse_save(&installed)).unwrap();
        assert!(removal.contains(&format!("-X {marker}\n")), "{removal}");
    }

    #[test]
    fn reapply_replaces_rules_but_never_duplicates_jumps() {
        let doc = render_apply(&RuleConfig::default(), &parse_save(SAVED));
        assert!(!doc.contains("-A PREROUTING"), "{doc}");
        assert!(!doc.contains("-A OUTPUT"), "{doc}");
        // Our chains are still declared (so flushed and refilled) and the rules are all there.
        let expected: String = with_marker(FRESH, &RuleConfig::default())
            .lines()
            .filter(|l| !l.starts_with("-A PREROUTING") && !l.starts_with("-A OUTPUT"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(doc, expected);
    }

    #[test]
    fn parse_finds_only_our_chains_and_exact_jumps() {
        let existing = parse_save(SAVED);
        assert_eq!(
            existing.chains,
            BTreeMap::from([
                (
                    "mangle".to_owned(),
                    vec!["AMBIT_OUTPUT".to_owned(), "AMBIT_PRERT".to_owned()]
                ),
                ("nat".to_owned(), vec!["AMBIT_OUTPUT".to_owned()]),
            ])
        );
        let key = |t: &str, h: &str, c: &str| (t.to_owned(), h.to_owned(), c.to_owned());
        assert_eq!(
            existing.jumps,
            BTreeMap::from([
                (key("mangle", "OUTPUT", "AMBIT_OUTPUT"), 1),
                (key("mangle", "PREROUTING", "AMBIT_PRERT"), 1),
                (key("nat", "OUTPUT", "AMBIT_OUTPUT"), 2),
            ])
        );
    }

    #[test]
    fn remove_deletes_every_jump_then_our_chains_only() {
        let doc = render_remove(&parse_save(SAVED)).unwrap();
        assert_eq!(
            doc,
            "\
*mangle
-D OUTPUT -j AMBIT_OUTPUT
-D PREROUTING -j AMBIT_PRERT
-F AMBIT_OUTPUT
-X AMBIT_OUTPUT
-F AMBIT_PRERT
-X AMBIT_PRERT
COMMIT
*nat
-D OUTPUT -j AMBIT_OUTPUT
-D OUTPUT -j AMBIT_OUTPUT
-F AMBIT_OUTPUT
-X AMBIT_OUTPUT
COMMIT
"
        );
        assert!(!doc.contains("OTHER"));
        assert_eq!(
            render_remove(&parse_save("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")),
            None
        );
    }

    #[test]
    fn exclusions_and_custom_numbers_are_rendered() {
        let cfg = RuleConfig {
            mark: 0x1000,
            mask: 0xf000,
            tproxy_mark: 0x2000,
            inbound_exclude_ports: vec![22, 15021],
            inbound_exclude_sources: vec!["169.254.7.127/32".parse().unwrap()],
            outbound_exclude_ports: vec![15012],
            ..RuleConfig::default()
        };
        let doc = render_apply(&cfg, &Existing::default());
        assert!(doc.contains("-A AMBIT_PRERT -s 169.254.7.127/32 -p tcp -j RETURN\n"));
        assert!(doc.contains("-A AMBIT_PRERT -p tcp -m tcp --dport 22 -j RETURN\n"));
        assert!(doc.contains("-A AMBIT_PRERT -p tcp -m tcp --dport 15021 -j RETURN\n"));
        assert!(doc.contains("-A AMBIT_OUTPUT -p tcp -m tcp --dport 15012 -j RETURN\n"));
        assert!(doc.contains("--tproxy-mark 0x2000/0xf000"));
        assert!(doc.contains("-m mark --mark 0x1000/0xf000 -j RETURN"));
        // Exclusions come before the capturing rule, or they would never match.
        let excl = doc.find("--dport 15012").unwrap();
        assert!(excl < doc.find("REDIRECT").unwrap());
    }

    fn closed(cfg: RuleConfig) -> RuleConfig {
        RuleConfig {
            ipv6: Ipv6Capture::Closed,
            ..cfg
        }
    }

    #[test]
    fn ipv6_closed_drops_all_but_loopback_and_link_icmp() {
        let doc = render_apply_v6(&closed(RuleConfig::default()), &Existing::default());
        let lines: Vec<&str> = doc.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(
            lines[1..3],
            [":AMBIT_INPUT - [0:0]", ":AMBIT_OUTPUT - [0:0]"]
        );
        assert_eq!(
            lines[3..5],
            [
                "-A AMBIT_INPUT -i lo -j RETURN",
                "-A AMBIT_OUTPUT -o lo -j RETURN"
            ]
        );
        assert!(doc.contains(
            "-A AMBIT_OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j RETURN\n"
        ));
        assert!(doc.contains("-A AMBIT_INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j RETURN\n"));
        // Nothing but ICMPv6 of the link types is let through before the final verdicts.
        let returns: Vec<&&str> = lines.iter().filter(|l| l.ends_with("-j RETURN")).collect();
        assert_eq!(returns.len(), 2 + 2 * 9, "{doc}");
        assert!(returns
            .iter()
            .skip(2)
            .all(|l| l.contains("-p ipv6-icmp -m icmp6 --icmpv6-type 1")));
        // The verdicts close each chain; the jumps come after and the document commits.
        let tail = &lines[lines.len() - 5..];
        assert_eq!(
            tail,
            [
                "-A AMBIT_INPUT -j DROP",
                "-A AMBIT_OUTPUT -j REJECT --reject-with icmp6-adm-prohibited",
                "-A INPUT -j AMBIT_INPUT",
                "-A OUTPUT -j AMBIT_OUTPUT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn ipv6_closed_keeps_the_configured_exclusions_open() {
        let doc = render_apply_v6(&closed(RuleConfig::dedicated()), &Existing::default());
        for rule in [
            "-A AMBIT_INPUT -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
            "-A AMBIT_OUTPUT -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
            "-A AMBIT_INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -j RETURN",
            "-A AMBIT_OUTPUT -p tcp -m tcp --dport 15012 -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -j RETURN",
        ] {
            assert!(doc.contains(&format!("{rule}\n")), "{rule} missing:\n{doc}");
        }
        // Exclusions come before the verdicts, or they would never match.
        assert!(doc.find("--dport 22").unwrap() < doc.find("-j DROP").unwrap());
        assert!(doc.find("--dport 15012").unwrap() < doc.find("-j REJECT").unwrap());
        assert!(
            !render_apply_v6(&closed(RuleConfig::default()), &Existing::default())
                .contains("conntrack")
        );
    }

    #[test]
    fn ipv6_reapply_keeps_one_jump_and_remove_takes_all_of_ours() {
        let saved = "\
*filter
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:AMBIT_INPUT - [0:0]
:AMBIT_OUTPUT - [0:0]
-A INPUT -j AMBIT_INPUT
-A OUTPUT -j AMBIT_OUTPUT
-A OUTPUT -d ::1/128 -j ACCEPT
-A AMBIT_INPUT -j DROP
COMMIT
";
        let existing = parse_save(saved);
        let doc = render_apply_v6(&closed(RuleConfig::default()), &existing);
        assert!(!doc.contains("-A INPUT "), "{doc}");
        assert!(!doc.contains("-A OUTPUT "), "{doc}");
        assert_eq!(
            render_remove(&existing).unwrap(),
            "\
*filter
-D INPUT -j AMBIT_INPUT
-D OUTPUT -j AMBIT_OUTPUT
-F AMBIT_INPUT
-X AMBIT_INPUT
-F AMBIT_OUTPUT
-X AMBIT_OUTPUT
COMMIT
"
        );
    }

    /// FRESH as ip6tables-restore gets it: IPv6 loopback and wildcard, no source exclusions,
    /// no marker chain (adoption is decided on the IPv4 rules).
    fn fresh_v6() -> String {
        FRESH
            .replace("127.0.0.0/8", "::1/128")
            .replace("--on-ip 0.0.0.0", "--on-ip ::")
    }

    #[test]
    fn ipv6_captured_mirrors_the_ipv4_capture() {
        let cfg = RuleConfig {
            inbound_exclude_sources: vec!["169.254.7.127/32".parse().unwrap()],
            ..RuleConfig::default()
        };
        let doc = render_apply_v6(&cfg, &Existing::default());
        let filter_end = doc.find("COMMIT\n").unwrap() + "COMMIT\n".len();
        let (filter, capture) = doc.split_at(filter_end);
        assert_eq!(capture, fresh_v6(), "{doc}");
        assert!(
            !doc.contains("169.254"),
            "an IPv4 exclusion in ip6tables:\n{doc}"
        );
        // The filter passes TCP (steered above) and drops the rest, UDP included.
        for rule in [
            "-A AMBIT_INPUT -p tcp -j RETURN",
            "-A AMBIT_OUTPUT -p tcp -j RETURN",
            "-A AMBIT_INPUT -p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN",
            "-A AMBIT_INPUT -j DROP",
            "-A AMBIT_OUTPUT -j REJECT --reject-with icmp6-adm-prohibited",
            "-A INPUT -j AMBIT_INPUT",
        ] {
            assert!(
                filter.contains(&format!("{rule}\n")),
                "{rule} missing:\n{doc}"
            );
        }
        // Of UDP, only what the TPROXY mark routes to `lo`: replies to CONNECT-UDP flows.
        let udp: Vec<&str> = filter.lines().filter(|l| l.contains("udp")).collect();
        assert_eq!(
            udp,
            ["-A AMBIT_OUTPUT -p udp -m mark --mark 0x111/0xfff -j RETURN"],
            "{filter}"
        );
        assert!(filter.find("-p tcp").unwrap() < filter.find("-j DROP").unwrap());
    }

    #[test]
    fn ipv6_closing_a_captured_pod_deletes_its_capture_in_the_same_document() {
        let installed = format!(
            "*filter\n:AMBIT_INPUT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n-A INPUT -j AMBIT_INPUT\n-A OUTPUT -j AMBIT_OUTPUT\nCOMMIT\n{}",
            fresh_v6()
        );
        let existing = parse_save(&installed);
        // Re-applying the capture refills the chains without a second jump.
        let again = render_apply_v6(&RuleConfig::default(), &existing);
        assert!(
            !again.contains("-A PREROUTING") && !again.contains("-A OUTPUT"),
            "{again}"
        );
        let doc = render_apply_v6(&closed(RuleConfig::default()), &existing);
        assert!(doc.starts_with("*filter\n"), "{doc}");
        assert!(doc.contains("-A AMBIT_INPUT -j DROP\n"), "{doc}");
        assert!(!doc.contains("-p tcp -j RETURN"), "{doc}");
        assert!(
            !doc.contains("TPROXY") && !doc.contains("REDIRECT"),
            "{doc}"
        );
        for gone in [
            "*mangle\n-D OUTPUT -j AMBIT_OUTPUT\n-D PREROUTING -j AMBIT_PRERT\n",
            "*nat\n-D OUTPUT -j AMBIT_OUTPUT\n-F AMBIT_OUTPUT\n-X AMBIT_OUTPUT\nCOMMIT\n",
        ] {
            assert!(doc.contains(gone), "{gone} missing:\n{doc}");
        }
        // The filter jumps exist already: not added again, not deleted.
        assert!(!doc.contains("INPUT -j AMBIT_INPUT"), "{doc}");
    }

    #[test]
    fn udp_capture_marks_the_apps_udp_to_captured_networks_and_tproxies_it_on_lo() {
        let cfg = RuleConfig {
            dns_port: Some(15053),
            udp_capture: vec![
                "10.80.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
            ],
            ..RuleConfig::default()
        };
        assert_ne!(
            marker_chain(&cfg),
            marker_chain(&RuleConfig {
                udp_capture: Vec::new(),
                ..cfg.clone()
            })
        );
        let doc = render_apply(&cfg, &Existing::default());
        let mangle = &doc[..doc.find("*nat").unwrap()];
        let at = |rule: &str| {
            mangle
                .find(rule)
                .unwrap_or_else(|| panic!("{rule}:\n{doc}"))
        };
        let tproxy = at("-A AMBIT_PRERT -i lo -p udp -m mark --mark 0x111/0xfff -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x111/0xfff\n");
        let lo_return = at("-A AMBIT_PRERT -i lo -j RETURN\n");
        let own = at("-A AMBIT_OUTPUT -p udp -m mark --mark 0x539/0xfff -j RETURN\n");
        let restore =
            at("-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark");
        assert!(
            own < restore,
            "ztunnel's UDP must keep its own mark:\n{doc}"
        );
        let dns = at("-A AMBIT_OUTPUT -p udp -m udp --dport 53 -j RETURN\n");
        let mark16 = at("-A AMBIT_OUTPUT -d 10.80.0.0/16 -p udp -m conntrack --ctdir ORIGINAL -j MARK --set-xmark 0x111/0xfff\n");
        let mark12 = at("-A AMBIT_OUTPUT -d 10.96.0.0/12 -p udp -m conntrack --ctdir ORIGINAL -j MARK --set-xmark 0x111/0xfff\n");
        // TPROXY before loopback's RETURN; ztunnel's own datagrams and DNS before the mark.
        assert!(tproxy < lo_return, "{doc}");
        assert!(own < dns && dns < mark16 && mark16 < mark12, "{doc}");
        // DNS is still redirected to its proxy.
        assert!(doc.contains("-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"));
        // No IPv6 network listed: IPv6 UDP is not captured (it stays dropped by the filter).
        let v6 = render_apply_v6(&cfg, &Existing::default());
        assert!(!v6.contains("--on-port 15001 --on-ip"), "{v6}");
        assert!(!v6.contains("-j MARK"), "{v6}");
        assert!(cfg.captures_udp_v4() && !cfg.captures_udp_v6());
        // Without networks, no UDP rule at all: the rules of a node without UDP capture.
        let off = render_apply(&RuleConfig::default(), &Existing::default());
        assert!(!off.contains("-p udp"), "{off}");
    }

    #[test]
    fn ipv6_udp_capture_tproxies_the_listed_networks_and_drops_the_rest() {
        let cfg = RuleConfig {
            udp_capture: vec![
                "10.80.0.0/16".parse().unwrap(),
                "fd00:80::/64".parse().unwrap(),
                "fd96::/108".parse().unwrap(),
            ],
            ..RuleConfig::default()
        };
        assert!(cfg.captures_udp_v4() && cfg.captures_udp_v6());
        let v6 = render_apply_v6(&cfg, &Existing::default());
        let filter_end = v6.find("COMMIT\n").unwrap();
        let (filter, capture) = v6.split_at(filter_end);
        let mangle = &capture[..capture.find("*nat").unwrap()];
        let at = |rule: &str| {
            mangle
                .find(&format!("{rule}\n"))
                .unwrap_or_else(|| panic!("{rule}:\n{v6}"))
        };
        // The IPv4 rules' IPv6 twins: TPROXY to [::1] on lo, ahead of loopback's RETURN;
        // ztunnel's own datagrams keep their mark; one MARK per IPv6 network, none for IPv4.
        let tproxy = at("-A AMBIT_PRERT -i lo -p udp -m mark --mark 0x111/0xfff -m conntrack --ctdir ORIGINAL -j TPROXY --on-port 15001 --on-ip ::1 --tproxy-mark 0x111/0xfff");
        let lo_return = at("-A AMBIT_PRERT -i lo -j RETURN");
        let own = at("-A AMBIT_OUTPUT -p udp -m mark --mark 0x539/0xfff -j RETURN");
        let restore = at("-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff");
        let mark64 = at("-A AMBIT_OUTPUT -d fd00:80::/64 -p udp -m conntrack --ctdir ORIGINAL -j MARK --set-xmark 0x111/0xfff");
        let mark108 = at("-A AMBIT_OUTPUT -d fd96::/108 -p udp -m conntrack --ctdir ORIGINAL -j MARK --set-xmark 0x111/0xfff");
        assert!(tproxy < lo_return && own < restore && restore < mark64 && mark64 < mark108);
        assert!(
            !v6.contains("10.80.0.0"),
            "an IPv4 network in ip6tables:\n{v6}"
        );
        assert!(
            !mangle.contains("--dport 53"),
            "no DNS capture, no DNS rule:\n{v6}"
        );
        // The IPv4 document has its own network only, and its loopback.
        let v4 = render_apply(&cfg, &Existing::default());
        assert!(v4.contains("--on-ip 127.0.0.1 "), "{v4}");
        assert!(
            v4.contains("-A AMBIT_OUTPUT -d 10.80.0.0/16 -p udp"),
            "{v4}"
        );
        assert!(!v4.contains("fd00") && !v4.contains("fd96"), "{v4}");
        // The filter: the captured datagrams carry the TPROXY mark, which routes them to
        // `lo`; of ztunnel's own UDP only that to the listed networks (a passthrough flow)
        // leaves, and replies to those come back. No other UDP passes before the verdicts.
        let udp: Vec<&str> = filter.lines().filter(|l| l.contains("udp")).collect();
        assert_eq!(
            udp,
            [
                "-A AMBIT_OUTPUT -p udp -m mark --mark 0x111/0xfff -j RETURN",
                "-A AMBIT_OUTPUT -d fd00:80::/64 -p udp -m mark --mark 0x539/0xfff -j RETURN",
                "-A AMBIT_OUTPUT -d fd96::/108 -p udp -m mark --mark 0x539/0xfff -j RETURN",
                "-A AMBIT_INPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
                "-A AMBIT_OUTPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
            ],
            "{filter}"
        );
        assert!(filter.find("udp").unwrap() < filter.find("-j DROP").unwrap());
        // With the DNS proxy: port 53 stays ahead of the MARK (nat sends it to 15053).
        let dns = RuleConfig {
            dns_port: Some(15053),
            ..cfg.clone()
        };
        let v6 = render_apply_v6(&dns, &Existing::default());
        let mangle = &v6[v6.find("*mangle").unwrap()..v6.find("*nat").unwrap()];
        let port53 = mangle
            .find("-A AMBIT_OUTPUT -p udp -m udp --dport 53 -j RETURN\n")
            .expect(&v6);
        assert!(port53 < mangle.find("-j MARK").unwrap(), "{v6}");
        // A pod whose IPv6 is closed captures nothing of it, listed networks or not.
        let shut = closed(cfg);
        assert!(!shut.captures_udp_v6());
        let v6 = render_apply_v6(&shut, &Existing::default());
        assert!(!v6.contains("udp") && !v6.contains("TPROXY"), "{v6}");
    }

    #[test]
    fn dns_capture_redirects_port_53_but_not_ztunnels_own_queries() {
        let cfg = RuleConfig {
            dns_port: Some(15053),
            ..RuleConfig::default()
        };
        assert_ne!(marker_chain(&cfg), marker_chain(&RuleConfig::default()));
        for doc in [
            render_apply(&cfg, &Existing::default()),
            render_apply_v6(&cfg, &Existing::default()),
        ] {
            let nat = &doc[doc.find("*nat").unwrap()..];
            let own = nat
                .find("-A AMBIT_OUTPUT -p udp -m mark --mark 0x539/0xfff -j RETURN\n")
                .expect(&doc);
            let udp = nat
                .find("-A AMBIT_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053\n")
                .expect(&doc);
            let tcp = nat
                .find("-A AMBIT_OUTPUT -p tcp -m tcp --dport 53 --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15053\n")
                .expect(&doc);
            // ztunnel's own marked TCP returns before both; loopback resolvers are left alone.
            let own_tcp = nat.find("-p tcp -m mark").unwrap();
            let lo = nat.find("-o lo -j RETURN").unwrap();
            let outbound = nat.find("--to-ports 15001").unwrap();
            assert!(lo < own_tcp && own_tcp < own && own < udp && udp < tcp && tcp < outbound);
        }
        // IPv6's filter lets the DNS flows through (UDP is otherwise dropped).
        let v6 = render_apply_v6(&cfg, &Existing::default());
        let filter = &v6[..v6.find("COMMIT").unwrap()];
        for rule in [
            "-A AMBIT_OUTPUT -d ::1/128 -p udp -m udp --dport 15053 -j RETURN",
            "-A AMBIT_OUTPUT -p udp -m mark --mark 0x539/0xfff -j RETURN",
            "-A AMBIT_INPUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
        ] {
            assert!(
                filter.contains(&format!("{rule}\n")),
                "{rule} missing:\n{v6}"
            );
        }
        assert!(filter.find("-p udp").unwrap() < filter.find("-j DROP").unwrap());
        // Off: not a word about UDP or port 53.
        let off = render_apply(&RuleConfig::default(), &Existing::default());
        assert!(!off.contains("udp") && !off.contains("dport 53"), "{off}");
    }

    #[test]
    fn policy_rule_is_recognised_in_ip_rule_output() {
        let cfg = RuleConfig::default();
        let shown = "0:\tfrom all lookup local\n32764:\tfrom all fwmark 0x111/0xfff lookup 133\n32766:\tfrom all lookup main\n";
        assert!(has_policy_rule(&cfg, shown));
        let shown6 = "0:\tfrom all lookup local\n32764:\tfrom all fwmark 0x111/0xfff lookup 133\n";
        assert!(has_policy_rule(&cfg, shown6));
        assert!(!has_policy_rule(&cfg, "0:\tfrom all lookup local\n"));
        assert_eq!(
            policy_rule_args(&cfg, Family::V4, "add").join(" "),
            "-4 rule add pref 32764 fwmark 0x111/0xfff lookup 133"
        );
        assert_eq!(
            policy_rule_args(&cfg, Family::V6, "del").join(" "),
            "-6 rule del pref 32764 fwmark 0x111/0xfff lookup 133"
        );
    }
}
