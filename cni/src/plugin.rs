//! ADD, DEL, CHECK and VERSION: what the plugin does for one call of the runtime.
//!
//! - ADD: is the pod in the mesh? ztunnel answers from its state (`query`); if it does not
//!   answer, the state it last acknowledged (node directory) does. If so, the capture rules go
//!   into the pod's namespace now, before any of its containers runs: until ztunnel serves the
//!   pod its connections are refused, never let out in plaintext. Then ztunnel is told (`added`)
//!   and adopts the pod at once. `prevResult` is printed back unchanged.
//! - DEL: tells ztunnel, and removes our rules from the namespace if it still exists and holds
//!   any. A namespace that is gone, or holds nothing of ours, is success (DEL is idempotent).
//! - CHECK: an enrolled pod must carry exactly the rules ztunnel would install.
//!
//! Re-running ADD is harmless: `capture::iptables::apply` leaves current rules untouched and
//! replaces others in one transaction, never adding a second jump.

use std::path::Path;
use std::time::Duration;

use ambit_ztunnel::capture::iptables::{self, Ipv6Capture, RuleConfig};
use ambit_ztunnel::capture::netns::{NetnsError, NetnsHandle, NetnsWorker};
use ambit_ztunnel::cni::{Op, PodRef};
use serde_json::Value;

use crate::client;
use crate::spec::{self, Backend, CniError, Code, Command, Env, NetConf};

/// What to print on success: ADD's result, VERSION's answer, nothing for DEL and CHECK.
pub type Output = Option<Value>;

/// A failed call: the error and the `cniVersion` to report it in.
#[derive(Debug)]
pub struct Failure {
    /// The runtime's version when the configuration said it, else the spec's.
    pub cni_version: String,
    /// The error.
    pub error: CniError,
}

/// Runs one call. `log` gets one line per decision (the runtime keeps the plugin's stderr).
pub fn run(env: &Env, stdin: &[u8], log: &mut dyn FnMut(String)) -> Result<Output, Failure> {
    if env.command == Command::Version {
        // VERSION's stdin carries only `cniVersion`, and may be empty.
        let asked: Option<String> = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned));
        return Ok(Some(spec::version_result(asked.as_deref())));
    }
    let fail = |cni_version: &str| {
        let v = cni_version.to_owned();
        move |error: CniError| Failure {
            cni_version: v,
            error,
        }
    };
    let conf = NetConf::parse(stdin).map_err(fail(spec::SPEC_VERSION))?;
    let pod = pod_ref(env, &conf).map_err(fail(&conf.cni_version))?;
    let rules = RuleConfig {
        backend: match conf.iptables_backend {
            Backend::Default => iptables::Backend::Default,
            Backend::Nft => iptables::Backend::Nft,
            Backend::Legacy => iptables::Backend::Legacy,
        },
        // As ztunnel decides it (a pod with an IPv6 address is captured in both families,
        // one without has its IPv6 closed), so adoption does not rewrite the IPv6 rules.
        // Until ztunnel serves the pod either way refuses its IPv6.
        ipv6: if pod.ips.iter().any(std::net::IpAddr::is_ipv6) {
            Ipv6Capture::Captured
        } else {
            Ipv6Capture::Closed
        },
        ..RuleConfig::default()
    };
    let result = match env.command {
        Command::Add => add(&conf, &pod, rules, log),
        Command::Del => del(&conf, &pod, rules, log).map(|()| None),
        Command::Check => check(&conf, &pod, rules, log).map(|()| None),
        Command::Version => Ok(None),
    };
    result.map_err(fail(&conf.cni_version))
}

/// The pod as ztunnel's protocol names it.
fn pod_ref(env: &Env, conf: &NetConf) -> Result<PodRef, CniError> {
    let arg = |k: &str| env.args.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(PodRef {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        namespace: arg("K8S_POD_NAMESPACE"),
        name: arg("K8S_POD_NAME"),
        uid: arg("K8S_POD_UID"),
        ips: conf.prev_ips()?,
    })
}

/// Whether the pod is in the mesh: ztunnel's answer, else the kept state's verdict.
fn enrolled(conf: &NetConf, pod: &PodRef, log: &mut dyn FnMut(String)) -> bool {
    let timeout = Duration::from_millis(conf.timeout_ms);
    match client::ask(&conf.data_dir, Op::Query, pod, timeout) {
        Ok(enrolled) => {
            log(format!(
                "ztunnel says the pod is {}in the mesh",
                if enrolled { "" } else { "not " }
            ));
            enrolled
        }
        Err(e) => {
            let kept = conf
                .node_name
                .as_deref()
                .and_then(|node| client::kept_verdict(&conf.data_dir, node, pod));
            let enrolled = kept.as_ref().is_some_and(|v| v.enrolled());
            log(format!(
                "{}; from ztunnel's kept state: {}",
                error_chain(&e),
                match &kept {
                    Some(v) => v.reason(pod),
                    None => "none readable, so the pod is not known to be in the mesh".into(),
                }
            ));
            enrolled
        }
    }
}

/// Opens the pod's namespace; a missing one is the spec's "container unknown".
fn open_netns(pod: &PodRef) -> Result<Option<NetnsHandle>, CniError> {
    let Some(path) = pod.netns.as_deref() else {
        return Ok(None);
    };
    match NetnsHandle::open(path) {
        Ok(h) => Ok(Some(h)),
        Err(NetnsError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(CniError::new(
                Code::UnknownContainer,
                "the pod's network namespace does not exist",
                format!("CNI_NETNS={}: {source}", path.display()),
            ))
        }
        Err(e) => Err(CniError::new(
            Code::CaptureFailed,
            "cannot open the pod's network namespace",
            error_chain(&e),
        )),
    }
}

/// Runs `f` inside the namespace of `handle` (a thread that entered it).
fn inside<T: Send + 'static>(
    handle: NetnsHandle,
    code: Code,
    f: impl FnOnce() -> Result<T, iptables::IptablesError> + Send + 'static,
) -> Result<T, CniError> {
    let path = handle.path().display().to_string();
    let worker = NetnsWorker::spawn(handle).map_err(|e| {
        CniError::new(
            code,
            format!("cannot enter network namespace {path}"),
            error_chain(&e),
        )
    })?;
    worker
        .run_blocking(f)
        .map_err(|e| CniError::new(code, format!("network namespace {path}"), error_chain(&e)))?
        .map_err(|e| {
            CniError::new(
                code,
                format!("iptables in network namespace {path}"),
                error_chain(&e),
            )
        })
}

fn add(
    conf: &NetConf,
    pod: &PodRef,
    rules: RuleConfig,
    log: &mut dyn FnMut(String),
) -> Result<Output, CniError> {
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "ambit-cni is a chained plugin",
            "no prevResult: list ambit-cni after the plugin that sets up the pod's interface",
        )
    })?;
    let handle = open_netns(pod)?.ok_or_else(|| {
        CniError::new(
            Code::InvalidEnv,
            "missing environment variables",
            "CNI_NETNS",
        )
    })?;
    if enrolled(conf, pod, log) {
        let adopted = inside(handle, Code::CaptureFailed, move || iptables::apply(&rules))?;
        log(format!(
            "capture rules {} in {}",
            if adopted {
                "already current"
            } else {
                "installed"
            },
            pod.netns.as_deref().unwrap_or(Path::new("?")).display()
        ));
        // ztunnel adopts on its own when it comes back; its absence changes nothing here.
        if let Err(e) = client::ask(
            &conf.data_dir,
            Op::Added,
            pod,
            Duration::from_millis(conf.timeout_ms),
        ) {
            log(format!(
                "ztunnel not told (it adopts the pod when it starts): {}",
                error_chain(&e)
            ));
        }
    }
    Ok(Some(prev))
}

fn del(
    conf: &NetConf,
    pod: &PodRef,
    rules: RuleConfig,
    log: &mut dyn FnMut(String),
) -> Result<(), CniError> {
    if let Err(e) = client::ask(
        &conf.data_dir,
        Op::Deleted,
        pod,
        Duration::from_millis(conf.timeout_ms),
    ) {
        log(format!(
            "ztunnel not told of the deletion: {}",
            error_chain(&e)
        ));
    }
    // Gone (or never given): its rules went with it.
    let handle = match open_netns(pod) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(()),
        Err(e) if e.code == Code::UnknownContainer => return Ok(()),
        Err(e) => return Err(e),
    };
    let backend = rules.backend;
    let removed = inside(handle, Code::RemoveFailed, move || {
        // Only a namespace holding rules of ours is touched (not even our routing table).
        if iptables::parse_save(&iptables::save(backend)?).is_empty() {
            return Ok(false);
        }
        iptables::remove(&rules).map(|()| true)
    })?;
    if removed {
        log("capture rules removed".into());
    }
    Ok(())
}

fn check(
    conf: &NetConf,
    pod: &PodRef,
    rules: RuleConfig,
    log: &mut dyn FnMut(String),
) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3.") {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "CHECK needs cniVersion 0.4.0 or later",
            format!("cniVersion is {}", conf.cni_version),
        ));
    }
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult",
            "the runtime must pass the result of ADD as prevResult",
        ));
    }
    let handle = open_netns(pod)?.ok_or_else(|| {
        CniError::new(
            Code::InvalidEnv,
            "missing environment variables",
            "CNI_NETNS",
        )
    })?;
    if !enrolled(conf, pod, log) {
        return Ok(());
    }
    let backend = rules.backend;
    let marker = iptables::marker_chain(&rules);
    let current = inside(handle, Code::CaptureMissing, move || {
        let existing = iptables::parse_save(&iptables::save(backend)?);
        Ok(iptables::is_current(&rules, &existing))
    })?;
    if current {
        Ok(())
    } else {
        Err(CniError::new(
            Code::CaptureMissing,
            "the pod is in the mesh but not captured",
            format!(
                "network namespace {} lacks the current capture rules (marker {marker})",
                pod.netns.as_deref().unwrap_or(Path::new("?")).display(),
            ),
        ))
    }
}

/// `err: cause: cause`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
