//! `ambitctl check --pre`: can this node run ztunnel? Everything is probed for real rather than
//! guessed from version numbers: each kernel feature of the capture rules is tried with one
//! rule in a scratch network namespace (the kernel loads a missing module on demand, so a rule
//! that is refused means the feature is really absent), then ztunnel's own capture code
//! ([`ambit_ztunnel::capture::iptables::apply`]) installs its complete rules and policy routing
//! there. The scratch namespace is deleted afterwards, also when a probe fails.
//!
//! When a feature is refused, the fix names its kernel module and whether this kernel has it
//! loaded (`/proc/modules`), built in or available under `/lib/modules/<release>`.

use std::path::{Path, PathBuf};

use ambit_ztunnel::capture::iptables;
use ambitctl::local::net;
use ambitctl::local::objects::error_chain;

use super::report::{Check, Report};

/// The directories the node's install uses.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Where the container runtime keeps pod network namespaces.
    pub netns: PathBuf,
    /// The CNI configuration directory.
    pub cni_conf: PathBuf,
    /// The CNI plugin directory.
    pub cni_bin: PathBuf,
}

/// An IP family's tools.
#[derive(Debug, Clone, Copy)]
struct Family {
    /// `iptables` or `ip6tables`.
    tool: &'static str,
    /// What the probes' names say (`IPv4`).
    name: &'static str,
    /// The wildcard address TPROXY delivers to.
    any: &'static str,
    /// The family's TPROXY core module.
    tproxy_module: &'static str,
}

const V4: Family = Family {
    tool: "iptables",
    name: "IPv4",
    any: "0.0.0.0",
    tproxy_module: "nf_tproxy_ipv4",
};
const V6: Family = Family {
    tool: "ip6tables",
    name: "IPv6",
    any: "::",
    tproxy_module: "nf_tproxy_ipv6",
};

/// One kernel feature the capture rules use, and a rule that needs exactly it.
struct Feature {
    name: &'static str,
    table: &'static str,
    /// The rule, after `-A`.
    rule: fn(Family) -> String,
    /// Its kernel modules (beside the family's own, for TPROXY).
    modules: &'static [&'static str],
    /// The kernel option that provides it.
    config: &'static str,
}

/// The features of the rules ztunnel installs in each pod (capture/iptables.rs): the marks
/// and ports are its defaults.
const FEATURES: &[Feature] = &[
    Feature {
        name: "TPROXY target",
        table: "mangle",
        rule: |f| {
            format!(
                "PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TPROXY --on-port 15006 --on-ip {} --tproxy-mark 0x111/0xfff",
                f.any
            )
        },
        modules: &["xt_TPROXY"],
        config: "CONFIG_NETFILTER_XT_TARGET_TPROXY",
    },
    Feature {
        name: "mark match",
        table: "mangle",
        rule: |_| "OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN".into(),
        modules: &["xt_mark"],
        config: "CONFIG_NETFILTER_XT_MARK",
    },
    Feature {
        name: "connmark match and CONNMARK target",
        table: "mangle",
        rule: |_| {
            "OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff".into()
        },
        modules: &["xt_connmark"],
        config: "CONFIG_NETFILTER_XT_CONNMARK",
    },
    Feature {
        name: "REDIRECT target (nat)",
        table: "nat",
        rule: |_| {
            "OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15001"
                .into()
        },
        modules: &["xt_REDIRECT", "nf_nat"],
        config: "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
    },
    Feature {
        name: "conntrack match",
        table: "filter",
        rule: |_| "INPUT -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN".into(),
        modules: &["xt_conntrack"],
        config: "CONFIG_NETFILTER_XT_MATCH_CONNTRACK",
    },
];

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

pub fn run(dirs: &Dirs) -> anyhow::Result<Report> {
    let release = read_trimmed("/proc/sys/kernel/osrelease");
    let target = format!(
        "node {}, kernel {release}: pre-install checks",
        read_trimmed("/proc/sys/kernel/hostname")
    );
    let mut checks = Vec::new();
    let tools = tools(&mut checks);
    let root = nix::unistd::geteuid().is_root();
    if !root {
        checks.push(Check::fail(
            "root",
            "not running as root: the kernel probes need a scratch network namespace",
            "run `sudo ambitctl check --pre`",
        ));
    } else if tools {
        probes(&release, &mut checks);
    }
    checks.push(directory(
        "netns directory",
        &dirs.netns,
        "ztunnel finds each pod's network namespace there (AMBIT_NETNS_DIR)",
        "pass --netns-dir with your container runtime's directory (containerd and CRI-O: /var/run/netns) and set the same as ztunnel's AMBIT_NETNS_DIR (04-ztunnel.yaml mounts it from the host)",
    ));
    checks.push(cni_conf(&dirs.cni_conf));
    checks.push(directory(
        "CNI plugin directory",
        &dirs.cni_bin,
        "install-cni copies ambit-cni there",
        "pass --cni-bin-dir with the directory your CNI's plugins live in, and set it as AMBIT_CNI_BIN_DIR of the install-cni container (04-ztunnel.yaml)",
    ));
    Ok(Report { target, checks })
}

/// `(nf_tables)` or `(legacy)` out of `iptables v1.8.9 (nf_tables)`.
fn backend_of(version: &str) -> Option<&str> {
    let open = version.rfind('(')?;
    let close = version[open..].find(')')? + open;
    Some(&version[open + 1..close])
}

/// The iptables tools ztunnel runs (and `ip`); returns whether all are usable.
fn tools(checks: &mut Vec<Check>) -> bool {
    let mut backends: Vec<(&str, String)> = Vec::new();
    let mut all = true;
    for tool in [
        "iptables",
        "ip6tables",
        "iptables-restore",
        "ip6tables-restore",
        "iptables-save",
        "ip6tables-save",
    ] {
        match net::run(tool, &["--version"]) {
            Ok(out) => {
                let version = out.lines().next().unwrap_or_default().trim().to_owned();
                if let Some(b) = backend_of(&version) {
                    backends.push((tool, b.to_owned()));
                }
                if !tool.contains('-') {
                    checks.push(Check::ok(tool, version));
                }
            }
            Err(e) => {
                all = false;
                checks.push(Check::fail(
                    tool,
                    format!("cannot run: {}", error_chain(&e)),
                    "install the iptables package (it ships iptables, ip6tables and their -save/-restore tools); ztunnel captures IPv6 beside IPv4, so it needs both",
                ));
            }
        }
    }
    let first = backends.first().map(|(_, b)| b.clone()).unwrap_or_default();
    let odd: Vec<String> = backends
        .iter()
        .filter(|(_, b)| *b != first)
        .map(|(t, b)| format!("{t} uses {b}"))
        .collect();
    if !backends.is_empty() {
        if odd.is_empty() {
            checks.push(Check::ok(
                "iptables backend",
                format!("{first} for all of iptables, ip6tables and their -save/-restore"),
            ));
        } else {
            all = false;
            checks.push(Check::fail(
                "iptables backend",
                format!("iptables uses {first} but {}", odd.join(", ")),
                "make every iptables tool use one backend, the one the node's other tools (kube-proxy, the CNI) use: e.g. `update-alternatives --set iptables /usr/sbin/iptables-nft` and `update-alternatives --set ip6tables /usr/sbin/ip6tables-nft` (or both -legacy)",
            ));
        }
    }
    match net::run("ip", &["-V"]) {
        Ok(out) => checks.push(Check::ok("ip (iproute2)", out.trim().to_owned())),
        Err(e) => {
            all = false;
            checks.push(Check::fail(
                "ip (iproute2)",
                format!("cannot run: {}", error_chain(&e)),
                "install iproute2: ztunnel adds the TPROXY policy route with `ip rule` and `ip route`",
            ));
        }
    }
    all
}

/// A scratch namespace, deleted when dropped.
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = net::del_netns(&self.0) {
            eprintln!("ambitctl check: removing scratch namespace {}: {e}", self.0);
        }
    }
}

/// Each feature in each family, then ztunnel's whole capture, in a scratch namespace.
fn probes(release: &str, checks: &mut Vec<Check>) {
    let name = format!("ambitchk-{}", std::process::id());
    if let Err(e) = net::add_netns(&name) {
        checks.push(Check::fail(
            "scratch network namespace",
            format!("cannot create one: {}", error_chain(&e)),
            "ztunnel creates nothing of the sort, but it enters pod namespaces: run on the node itself as root, with iproute2 and CAP_SYS_ADMIN",
        ));
        return;
    }
    let scratch = Scratch(name);
    for family in [V4, V6] {
        for f in FEATURES {
            let rule = (f.rule)(family);
            let mut args = vec![family.tool, "-w", "5", "-t", f.table, "-A"];
            args.extend(rule.split_whitespace());
            let check = format!("{} {}", family.name, f.name);
            match net::exec_in(&scratch.0, &args) {
                Ok(_) => checks.push(Check::ok(
                    check,
                    format!("{} accepted a probe rule ({})", family.tool, f.table),
                )),
                Err(e) => {
                    let mut modules: Vec<&str> = f.modules.to_vec();
                    if f.name.starts_with("TPROXY") {
                        modules.push(family.tproxy_module);
                    }
                    checks.push(Check::fail(
                        check,
                        format!(
                            "{} refused `-t {} -A {rule}`: {}",
                            family.tool,
                            f.table,
                            error_chain(&e)
                        ),
                        module_fix(release, &modules, f.config),
                    ));
                }
            }
        }
    }
    let scratch_name = scratch.0.clone();
    let applied = net::in_netns(&scratch_name, || {
        iptables::apply(&iptables::RuleConfig::default())
    });
    let check = "ztunnel's capture rules";
    match applied {
        Ok(Ok(_)) => checks.push(Check::ok(
            check,
            "ztunnel's complete IPv4 and IPv6 rules and TPROXY policy routing installed in a scratch namespace",
        )),
        Ok(Err(e)) => checks.push(Check::fail(
            check,
            format!("installing them in a scratch namespace failed: {}", error_chain(&e)),
            "fix the features failing above; if none fails, the message names the rule or route the kernel refused",
        )),
        Err(e) => checks.push(Check::fail(
            check,
            format!("cannot enter the scratch namespace: {}", error_chain(&e)),
            "run as root on the node itself",
        )),
    }
}

/// Whether a module is loaded, built in, or available, as this kernel's files say.
#[derive(Debug, PartialEq, Eq)]
enum ModuleState {
    Loaded,
    BuiltIn,
    Available,
    Absent,
}

fn module_state(module: &str, proc_modules: &str, builtin: &str, dep: &str) -> ModuleState {
    let ko = format!("/{module}.ko");
    if proc_modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some(module))
    {
        ModuleState::Loaded
    } else if builtin.lines().any(|l| l.ends_with(&ko)) {
        ModuleState::BuiltIn
    } else if dep
        .lines()
        .filter_map(|l| l.split(':').next())
        .any(|p| p.ends_with(&ko) || p.contains(&format!("{ko}.")))
    {
        ModuleState::Available
    } else {
        ModuleState::Absent
    }
}

/// What to do about refused rules whose feature lives in `modules`.
fn module_fix(release: &str, modules: &[&str], config: &str) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (loaded, builtin, dep) = (
        read("/proc/modules"),
        read(&format!("/lib/modules/{release}/modules.builtin")),
        read(&format!("/lib/modules/{release}/modules.dep")),
    );
    let mut load = Vec::new();
    let mut facts = Vec::new();
    for m in modules {
        let state = module_state(m, &loaded, &builtin, &dep);
        facts.push(format!("{m}: {state:?}").to_lowercase());
        if state == ModuleState::Available {
            load.push(*m);
        }
    }
    if load.is_empty() {
        format!(
            "this kernel lacks the feature ({}; looked in /proc/modules and /lib/modules/{release}): use a kernel built with {config}",
            facts.join(", ")
        )
    } else {
        format!(
            "load the module: `modprobe {}` (and list it in /etc/modules-load.d/ambit.conf for reboots); {}",
            load.join(" && modprobe "),
            facts.join(", ")
        )
    }
}

/// A directory that must exist.
fn directory(name: &str, path: &Path, why: &str, fix: &str) -> Check {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Check::ok(name, format!("{} exists: {why}", path.display())),
        Ok(_) => Check::fail(name, format!("{} is not a directory", path.display()), fix),
        Err(e) => Check::fail(name, format!("{}: {e}", path.display()), fix),
    }
}

/// The CNI configuration directory: ambit-cni chains itself onto the first `.conflist`.
fn cni_conf(dir: &Path) -> Check {
    let name = "CNI configuration";
    let fix_dir = "pass --cni-conf-dir with the directory your cluster's CNI writes its configuration to (usually /etc/cni/net.d) and set it as AMBIT_CNI_CONF_DIR of the install-cni container (04-ztunnel.yaml)";
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Check::fail(name, format!("{}: {e}", dir.display()), fix_dir),
    };
    let mut lists: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conflist"))
        .collect();
    lists.sort();
    match lists.first() {
        Some(first) => Check::ok(
            name,
            format!("{}: ambit-cni will chain onto {first}", dir.display()),
        ),
        None => Check::fail(
            name,
            format!("no .conflist in {}", dir.display()),
            "install the cluster's CNI first (ambit-cni chains after it); a CNI that writes a single-plugin .conf is not supported yet",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_read_from_version_lines() {
        assert_eq!(backend_of("iptables v1.8.9 (nf_tables)"), Some("nf_tables"));
        assert_eq!(
            backend_of("ip6tables-restore v1.8.7 (legacy)"),
            Some("legacy")
        );
        assert_eq!(backend_of("iptables v1.4.21"), None);
    }

    #[test]
    fn module_states_come_from_the_kernel_files() {
        let loaded = "xt_mark 12288 3 - Live 0x0\nnf_nat 61440 1 xt_REDIRECT, Live 0x0\n";
        let builtin = "kernel/net/netfilter/xt_conntrack.ko\n";
        let dep = "kernel/net/netfilter/xt_TPROXY.ko.zst: kernel/net/ipv4/netfilter/nf_tproxy_ipv4.ko.zst\n";
        let s = |m| module_state(m, loaded, builtin, dep);
        assert_eq!(s("xt_mark"), ModuleState::Loaded);
        assert_eq!(s("xt_conntrack"), ModuleState::BuiltIn);
        assert_eq!(s("xt_TPROXY"), ModuleState::Available);
        assert_eq!(s("xt_socket"), ModuleState::Absent);
    }
}
