//! Which resolver a pod's forwarded queries go to, decided once when the pod is enrolled.
//!
//! In order:
//! 1. `--dns-upstream`, when given: the same resolvers for every pod (an operator who wants
//!    all pods' lookups to go to one place).
//! 2. The pod's own resolv.conf, where ztunnel can see it: `/etc/netns/<name>/resolv.conf`
//!    for a namespace named `<name>` (the file `ip netns exec` shows the pod as its
//!    `/etc/resolv.conf`; local mode's pods use it).
//! 3. ztunnel's own `/etc/resolv.conf`, loopback resolvers left out (a loopback address
//!    means something else inside the pod). On Kubernetes that is the cluster DNS, the
//!    resolver a pod with the default `ClusterFirst` policy has too.
//!
//! Forwarded queries leave from inside the pod (marked, so not captured again), so the
//! upstream sees the pod's own address, as it would have without the mesh.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::DnsSettings;

/// Where the pods' resolv.conf files of `ip netns` live.
const NETNS_ETC: &str = "/etc/netns";
/// ztunnel's own resolver configuration.
const OWN_RESOLV_CONF: &str = "/etc/resolv.conf";
/// resolv.conf(5): resolvers past the third are ignored.
const MAX_NAMESERVERS: usize = 3;

/// The `nameserver` addresses of a resolv.conf, on port 53, in order (at most three, as the
/// C library uses). Lines it cannot read are skipped, as the C library does.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // A link-local scope (`fe80::1%eth0`) names an interface of the file's own
            // namespace; it cannot be dialled as written.
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_NAMESERVERS)
        .collect()
}

/// The upstream resolvers of the pod whose namespace file is `netns` (see the module docs).
/// Empty when none is known: its forwarded queries then get SERVFAIL.
pub fn for_pod(settings: &DnsSettings, netns: &Path) -> Vec<SocketAddr> {
    for_pod_in(
        settings,
        netns,
        Path::new(NETNS_ETC),
        Path::new(OWN_RESOLV_CONF),
    )
}

fn for_pod_in(
    settings: &DnsSettings,
    netns: &Path,
    netns_etc: &Path,
    own: &Path,
) -> Vec<SocketAddr> {
    if !settings.upstreams.is_empty() {
        return settings.upstreams.clone();
    }
    let pods = netns
        .file_name()
        .map(|name| netns_etc.join(name).join("resolv.conf"))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| nameservers(&text))
        .unwrap_or_default();
    if !pods.is_empty() {
        return pods;
    }
    std::fs::read_to_string(own)
        .map(|text| nameservers(&text))
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.ip().is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_like_the_c_library() {
        let conf = "# comment\nsearch demo.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\nnameserver fd00::a\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions ndots:5\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n";
        assert_eq!(
            nameservers(conf),
            [
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::a]:53".parse().unwrap(),
                "1.1.1.1:53".parse().unwrap(),
            ]
        );
    }

    #[test]
    fn configured_then_the_pods_file_then_ours_without_loopback() {
        let dir = std::env::temp_dir().join(format!("ambit-dns-upstream-{}", std::process::id()));
        let etc = dir.join("netns");
        std::fs::create_dir_all(etc.join("pod-a")).unwrap();
        std::fs::write(etc.join("pod-a/resolv.conf"), "nameserver 10.0.0.53\n").unwrap();
        let own = dir.join("resolv.conf");
        std::fs::write(&own, "nameserver 127.0.0.53\nnameserver 10.0.0.1\n").unwrap();
        let mut settings = DnsSettings::default();
        let pod_a = Path::new("/var/run/netns/pod-a");
        let pod_b = Path::new("/var/run/netns/pod-b");
        assert_eq!(
            for_pod_in(&settings, pod_a, &etc, &own),
            ["10.0.0.53:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            for_pod_in(&settings, pod_b, &etc, &own),
            ["10.0.0.1:53".parse::<SocketAddr>().unwrap()]
        );
        settings.upstreams = vec!["10.9.9.9:5353".parse().unwrap()];
        assert_eq!(for_pod_in(&settings, pod_a, &etc, &own), settings.upstreams);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
