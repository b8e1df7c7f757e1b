//! Naming things as an operator does: the source (a pod, or a service account) and the
//! destination (a service by hostname or `namespace/name`, a pod, an address), resolved in
//! a ztunnel's state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_ztunnel::state::{State, Workload};
use anyhow::{bail, Context};

/// Finds the source workload.
pub fn find_source(state: &State, name: &str) -> anyhow::Result<(Arc<Workload>, bool)> {
    let (ns, short) = match name.split_once('/') {
        Some((ns, n)) => (Some(ns), n),
        None => (None, name),
    };
    let pods: Vec<&Arc<Workload>> = state
        .workloads()
        .filter(|w| &*w.name == short && ns.is_none_or(|ns| &*w.namespace == ns))
        .collect();
    match pods.as_slice() {
        [one] => return Ok(((*one).clone(), false)),
        [] => {}
        many => {
            let names: Vec<String> = many.iter().map(|w| w.describe()).collect();
            bail!(
                "{name:?} names several pods: {}; say namespace/name",
                names.join(", ")
            )
        }
    }
    if let Some(ns) = ns {
        // A service account: any of its pods (they share identity and policy).
        if let Some(w) = state
            .workloads()
            .find(|w| &*w.namespace == ns && &*w.service_account == short)
        {
            return Ok((w.clone(), true));
        }
    }
    bail!("{name:?} is no pod (namespace/name or name) and no service account (namespace/sa) the mesh knows")
}

/// What the destination resolves to: an address, and what it names.
pub fn find_destination(
    state: &State,
    source: &Workload,
    dest: &str,
    port: Option<u16>,
) -> anyhow::Result<(SocketAddr, String)> {
    let family = |ips: &[IpAddr]| {
        let like = source.addresses.first().copied();
        ips.iter()
            .copied()
            .find(|ip| like.is_none_or(|l| l.is_ipv4() == ip.is_ipv4()))
            .or_else(|| ips.first().copied())
    };
    let need_port =
        |what: &str| port.with_context(|| format!("{what}: give a port (--port, or host:port)"));
    if let Ok(addr) = dest.parse::<SocketAddr>() {
        return Ok((addr, describe_addr(state, addr.ip())));
    }
    if let Ok(ip) = dest.parse::<IpAddr>() {
        return Ok((
            SocketAddr::new(ip, need_port(dest)?),
            describe_addr(state, ip),
        ));
    }
    let (host, port) = match dest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("{dest:?}: bad port"))?,
            ),
        ),
        None => (dest, port),
    };
    let need_port =
        |what: &str| port.with_context(|| format!("{what}: give a port (--port, or host:port)"));
    let service = state.services().find(|s| {
        let h = &*s.hostname;
        h == host
            || h.strip_prefix(host)
                .is_some_and(|rest| rest.starts_with('.'))
            || format!("{}/{}", s.namespace, s.name) == host
    });
    if let Some(svc) = service {
        let vip = family(&svc.vips).with_context(|| format!("service {} has no VIP", svc.key()))?;
        let port = match (port, svc.ports.as_slice()) {
            (Some(p), _) => p,
            (None, [only]) => only.port,
            (None, _) => need_port(&format!("service {}", svc.key()))?,
        };
        return Ok((
            SocketAddr::new(vip, port),
            format!("service {}/{}", svc.namespace, svc.name),
        ));
    }
    if let Some((ns, name)) = host.split_once('/') {
        if let Some(w) = state
            .workloads()
            .find(|w| &*w.namespace == ns && &*w.name == name)
        {
            let ip = family(&w.addresses).with_context(|| format!("pod {host} has no address"))?;
            return Ok((SocketAddr::new(ip, need_port(host)?), format!("pod {host}")));
        }
    }
    bail!("{dest:?} is no service, pod or address the mesh knows (services: name.namespace or namespace/name; pods: namespace/name)")
}

fn describe_addr(state: &State, ip: IpAddr) -> String {
    if let Some(s) = state.service_by_vip(ip) {
        format!("service {}/{}", s.namespace, s.name)
    } else if let Some(w) = state.workload_by_ip(ip) {
        format!("pod {}/{}", w.namespace, w.name)
    } else {
        "an address the mesh does not know".into()
    }
}
