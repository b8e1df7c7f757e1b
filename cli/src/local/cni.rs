//! Pods made the way a Kubernetes node makes them: the local mesh creates a pod's network
//! namespace (the sandbox), then calls its node's CNI chain exactly as a container runtime
//! does, and only then starts the pod's process. The chain is Debian's
//! containernetworking-plugins, `bridge` with `host-local` addresses, followed by
//! `ambit-cni`, which installs the pod's capture rules and tells the node's ztunnel, so an
//! enrolled pod is captured before its first process runs. Deleting a pod runs DEL through
//! the chain in reverse (rules removed, veth and addresses released) before its namespace goes.
//!
//! Per node, under `<state-dir>/cni/<node>/`, what a node's `/etc/cni/net.d` and
//! `/var/lib/cni` hold: `10-ambit.conflist` and the `host-local` reservations (`ipam/`).
//! Every call runs inside the node's namespace (the node is the "host" of the CNI spec): the
//! bridge `cni0`, the pods' host-side veths and the gateway addresses live there, never in the
//! machine's own namespace.
//!
//! A call is one process: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;
//! K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`, as containerd passes them) and `CNI_PATH` in
//! the environment, the plugin's entry of the conflist on stdin with the list's `cniVersion`
//! and `name`, the previous plugin's result as `prevResult`, and `runtimeConfig` for the
//! capabilities the entry declares. The local mesh's pods have fixed addresses (the objects
//! folder says them), so they are requested through the `ips` capability, as runtimes request
//! static addresses; `host-local` refuses an address outside the node's range or taken.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::net::{self, NetError};

/// The spec version the local mesh's conflists are written in (the Debian plugins and
/// `ambit-cni` all speak it).
pub const CNI_VERSION: &str = "1.0.0";
/// The network's name (the conflist's `name`, and `host-local`'s directory).
pub const NETWORK: &str = "ambit-local";
/// The pod's interface, as kubelets name it.
pub const IFNAME: &str = "eth0";
/// The node's bridge, as the reference `bridge` plugin names it by default.
pub const BRIDGE: &str = "cni0";
/// Where distributions install the reference plugins: Debian's package, then upstream's
/// tarball.
pub const PLUGIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];
/// The reference plugins the chain needs.
pub const STANDARD_PLUGINS: [&str; 2] = ["bridge", "host-local"];
/// A PATH for the plugins (they run `iptables-restore`, `ip`).
const PLUGIN_ENV_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a CNI call or the chain's set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The reference plugins are not installed.
    #[error(
        "the CNI plugins {missing} are not installed (looked in {dirs}): the local mesh creates \
         its pods through a real CNI chain (bridge and host-local, then ambit-cni); install \
         Debian's containernetworking-plugins (`apt-get install containernetworking-plugins`), \
         or put the reference plugins in /opt/cni/bin"
    )]
    PluginsMissing { missing: String, dirs: String },
    /// `ambit-cni` is not next to ambitctl.
    #[error(
        "ambit-cni not found at {} (it is looked for next to ambitctl); build it with: \
         cargo build -p ambit-cni",
        path.display()
    )]
    AmbitCniMissing { path: PathBuf },
    /// A plugin named in the conflist is in none of the `CNI_PATH` directories.
    #[error("CNI plugin {plugin:?} is in none of {dirs}")]
    NotFound { plugin: String, dirs: String },
    /// The conflist could not be written or read.
    #[error("cannot access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The conflist is not what we write.
    #[error("{} is not a CNI network configuration list", path.display())]
    Conflist {
        path: PathBuf,
        #[source]
        source: Option<serde_json::Error>,
    },
    /// A plugin could not be run at all.
    #[error("cannot run CNI plugin {}", plugin.display())]
    Spawn {
        plugin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A plugin failed; `msg` and `details` are its error object's (or its stderr).
    #[error("CNI {command} of pod {pod}: {plugin} failed (code {code}): {msg}{details}")]
    Plugin {
        command: &'static str,
        pod: String,
        plugin: String,
        code: i64,
        msg: String,
        details: String,
    },
    /// A plugin succeeded but printed something that is not a result.
    #[error("CNI {command} of pod {pod}: {plugin} printed no JSON result: {text:?}")]
    Output {
        command: &'static str,
        pod: String,
        plugin: String,
        text: String,
    },
    /// The chain gave the pod another address than the one it asked for.
    #[error("CNI ADD of pod {pod}: asked for {want}, the chain's result says {got}")]
    Address {
        pod: String,
        want: Ipv4Addr,
        got: String,
    },
    /// The pod's namespace could not be made or prepared.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// The plugin directories to search (`CNI_PATH`): `ambit-cni`'s first (the one built beside
/// ambitctl), then the reference plugins'. Fails, saying what to install, when `bridge` or
/// `host-local` is in none of `plugin_dirs`.
pub fn plugin_path(ambit_cni: &Path, plugin_dirs: &[&str]) -> Result<Vec<PathBuf>, CniError> {
    if !ambit_cni.is_file() {
        return Err(CniError::AmbitCniMissing {
            path: ambit_cni.to_owned(),
        });
    }
    let missing: Vec<&str> = STANDARD_PLUGINS
        .iter()
        .copied()
        .filter(|p| !plugin_dirs.iter().any(|d| Path::new(d).join(p).is_file()))
        .collect();
    if !missing.is_empty() {
        return Err(CniError::PluginsMissing {
            missing: missing.join(" and "),
            dirs: plugin_dirs.join(", "),
        });
    }
    let own = ambit_cni.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(std::iter::once(own)
        .chain(plugin_dirs.iter().map(PathBuf::from).filter(|d| d.is_dir()))
        .collect())
}

/// `<state-dir>/cni/<node>`: the node's CNI configuration and address reservations.
pub fn node_dir(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("cni").join(node)
}

/// The node's conflist.
pub fn conflist_path(state_dir: &Path, node: &str) -> PathBuf {
    node_dir(state_dir, node).join("10-ambit.conflist")
}

/// The conflist of node k (1-based): `bridge` (gateway 10.77.k.1 and fd77:k::1 on `cni0`)
/// with `host-local` handing out the node's plan (10.77.k.2-249 and their IPv6 twins), then
/// `ambit-cni` pointed at the node's ztunnel directory.
pub fn conflist(
    ipam_dir: &Path,
    k: usize,
    ztunnel_dir: &Path,
    node: &str,
) -> Result<Value, CniError> {
    let range = |first: IpAddr, last: IpAddr, gateway: IpAddr, subnet: String| {
        json!({"subnet": subnet, "rangeStart": first.to_string(), "rangeEnd": last.to_string(),
               "gateway": gateway.to_string()})
    };
    let last = net::MAX_POD_INDEX;
    let v4 = range(
        net::pod_ip(k, 0)?.into(),
        net::pod_ip(k, last)?.into(),
        net::pod_gateway(k)?.into(),
        net::pod_subnet(k)?,
    );
    let v6 = range(
        net::pod_ip6(k, 0)?.into(),
        net::pod_ip6(k, last)?.into(),
        net::pod_gateway6(k)?.into(),
        net::pod_subnet6(k)?,
    );
    Ok(json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
                "capabilities": {"ips": true},
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[v4], [v6]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                }
            },
            {"type": "ambit-cni", "dataDir": ztunnel_dir, "nodeName": node}
        ]
    }))
}

/// Writes node `node`'s (index k, 1-based) conflist under the state dir; returns its path.
pub fn write_conflist(
    state_dir: &Path,
    node: &str,
    k: usize,
    ztunnel_dir: &Path,
) -> Result<PathBuf, CniError> {
    let dir = node_dir(state_dir, node);
    let ipam = dir.join("ipam");
    std::fs::create_dir_all(&ipam).map_err(|source| CniError::Io {
        path: ipam.clone(),
        source,
    })?;
    let path = conflist_path(state_dir, node);
    let text =
        serde_json::to_string_pretty(&conflist(&ipam, k, ztunnel_dir, node)?).map_err(|e| {
            CniError::Conflist {
                path: path.clone(),
                source: Some(e),
            }
        })?;
    std::fs::write(&path, text).map_err(|source| CniError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// One pod as the runtime describes it to the chain.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// `CNI_CONTAINERID`: the sandbox's id (here its namespace's name).
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The addresses to request (`runtimeConfig.ips`).
    pub ips: Vec<IpAddr>,
}

impl Sandbox {
    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// A node's chain, ready to call.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The node's namespace, where the plugins run.
    pub node_netns: String,
    /// The conflist as read from disk.
    pub conflist: Value,
    /// `CNI_PATH`.
    pub path: Vec<PathBuf>,
}

impl Chain {
    /// Reads the conflist at `path`.
    pub fn load(conflist: &Path, node_netns: &str, path: Vec<PathBuf>) -> Result<Self, CniError> {
        let text = std::fs::read(conflist).map_err(|source| CniError::Io {
            path: conflist.to_owned(),
            source,
        })?;
        let value: Value = serde_json::from_slice(&text).map_err(|e| CniError::Conflist {
            path: conflist.to_owned(),
            source: Some(e),
        })?;
        if !value["plugins"].is_array() {
            return Err(CniError::Conflist {
                path: conflist.to_owned(),
                source: None,
            });
        }
        Ok(Chain {
            node_netns: node_netns.to_owned(),
            conflist: value,
            path,
        })
    }

    fn plugins(&self) -> &[Value] {
        self.conflist["plugins"]
            .as_array()
            .map_or(&[], Vec::as_slice)
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        self.path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NotFound {
                plugin: plugin_type.to_owned(),
                dirs: self
                    .path
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            })
    }

    /// The stdin of one plugin: its entry, the list's version and name, `runtimeConfig` for
    /// the capabilities it declares, the previous result.
    fn stdin(&self, entry: &Value, sandbox: &Sandbox, prev: Option<&Value>) -> Value {
        let mut conf = entry.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(obj) = conf.as_object_mut() {
            obj.remove("capabilities");
        }
        if entry["capabilities"]["ips"] == json!(true) && !sandbox.ips.is_empty() {
            let ips: Vec<String> = sandbox.ips.iter().map(IpAddr::to_string).collect();
            conf["runtimeConfig"] = json!({ "ips": ips });
        }
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    fn call(
        &self,
        command: &'static str,
        entry: &Value,
        sandbox: &Sandbox,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniError> {
        let plugin_type = entry["type"].as_str().unwrap_or_default();
        let binary = self.find(plugin_type)?;
        let stdin = serde_json::to_vec(&self.stdin(entry, sandbox, prev)).unwrap_or_default();
        let cni_path = std::env::join_paths(&self.path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(&binary)
            .env_clear()
            .env("PATH", PLUGIN_ENV_PATH)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", &sandbox.netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_ARGS", sandbox.cni_args())
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CniError::Spawn {
                plugin: binary.clone(),
                source,
            })?;
        // A plugin that fails on its environment may exit before reading: its output says why.
        if let Some(mut pipe) = child.stdin.take() {
            let _ = pipe.write_all(&stdin);
        }
        let out = child.wait_with_output().map_err(|source| CniError::Spawn {
            plugin: binary.clone(),
            source,
        })?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let error = parsed.unwrap_or(Value::Null);
            let details = error["details"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .or_else(|| (!stderr.is_empty()).then_some(stderr))
                .map_or_else(String::new, |d| format!(" ({d})"));
            return Err(CniError::Plugin {
                command,
                pod: sandbox.label(),
                plugin: plugin_type.to_owned(),
                code: error["code"].as_i64().unwrap_or(-1),
                msg: error["msg"]
                    .as_str()
                    .map_or_else(|| format!("exited with {}", out.status), str::to_owned),
                details,
            });
        }
        if text.is_empty() {
            return Ok(None);
        }
        match parsed {
            Some(v) => Ok(Some(v)),
            None => Err(CniError::Output {
                command,
                pod: sandbox.label(),
                plugin: plugin_type.to_owned(),
                text,
            }),
        }
    }

    /// ADD through the chain, each plugin getting the previous one's result; returns the last
    /// result (kept for DEL, as runtimes cache it). The pod must get `want` as its IPv4
    /// address. On failure, DEL runs through the whole chain (a runtime tears a failed sandbox
    /// down the same way) and the ADD error is returned.
    pub fn add(&self, sandbox: &Sandbox, want: Ipv4Addr) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        let result = self.add_all(sandbox, want, &mut prev);
        if result.is_err() {
            let _ = self.del(sandbox, prev.as_ref());
        }
        result
    }

    fn add_all(
        &self,
        sandbox: &Sandbox,
        want: Ipv4Addr,
        prev: &mut Option<Value>,
    ) -> Result<Value, CniError> {
        for entry in self.plugins() {
            let out = self.call("ADD", entry, sandbox, prev.as_ref())?;
            if out.is_some() {
                *prev = out;
            }
        }
        let result = prev.clone().unwrap_or(Value::Null);
        let got: Vec<&str> = result["ips"]
            .as_array()
            .map(|ips| ips.iter().filter_map(|i| i["address"].as_str()).collect())
            .unwrap_or_default();
        let want_text = want.to_string();
        if !got
            .iter()
            .any(|a| a.split('/').next() == Some(want_text.as_str()))
        {
            return Err(CniError::Address {
                pod: sandbox.label(),
                want,
                got: format!("{got:?}"),
            });
        }
        Ok(result)
    }

    /// DEL through the chain in reverse, each plugin given the ADD result as `prevResult`.
    /// Every plugin is called even when one fails (DEL must release what it can); the first
    /// failure is returned.
    pub fn del(&self, sandbox: &Sandbox, result: Option<&Value>) -> Result<(), CniError> {
        let mut first = None;
        for entry in self.plugins().iter().rev() {
            if let Err(e) = self.call("DEL", entry, sandbox, result) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_plugins_say_what_to_install() {
        let dir = std::env::temp_dir().join(format!("ambit-cni-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ambit_cni = dir.join("ambit-cni");
        std::fs::write(&ambit_cni, "").unwrap();
        let empty = dir.join("plugins");
        std::fs::create_dir_all(&empty).unwrap();
        let err = plugin_path(&ambit_cni, &[empty.to_str().unwrap()]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bridge and host-local are not installed"),
            "{text}"
        );
        assert!(
            text.contains("apt-get install containernetworking-plugins"),
            "{text}"
        );
        assert!(text.contains(empty.to_str().unwrap()), "{text}");

        std::fs::write(empty.join("bridge"), "").unwrap();
        std::fs::write(empty.join("host-local"), "").unwrap();
        let path = plugin_path(&ambit_cni, &[empty.to_str().unwrap()]).unwrap();
        assert_eq!(path, vec![dir.clone(), empty.clone()]);

        let err = plugin_path(&dir.join("nope"), &[empty.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("cargo build -p ambit-cni"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_conflist_follows_the_address_plan_and_a_plugin_gets_what_a_runtime_passes() {
        let list = conflist(Path::new("/s/ipam"), 2, Path::new("/s/zt"), "node2").unwrap();
        let ranges = &list["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges[0][0]["subnet"], "10.77.2.0/24");
        assert_eq!(ranges[0][0]["rangeStart"], "10.77.2.2");
        assert_eq!(ranges[0][0]["rangeEnd"], "10.77.2.249");
        assert_eq!(ranges[0][0]["gateway"], "10.77.2.1");
        assert_eq!(ranges[1][0]["subnet"], "fd77:2::/64");
        assert_eq!(ranges[1][0]["rangeStart"], "fd77:2::2");
        assert_eq!(ranges[1][0]["gateway"], "fd77:2::1");
        assert_eq!(list["plugins"][1]["type"], "ambit-cni");
        assert_eq!(list["plugins"][1]["nodeName"], "node2");

        let chain = Chain {
            node_netns: "n".into(),
            conflist: list.clone(),
            path: Vec::new(),
        };
        let sandbox = Sandbox {
            container_id: "lm-demo-a".into(),
            netns: "/var/run/netns/lm-demo-a".into(),
            namespace: "demo".into(),
            name: "a".into(),
            uid: "demo/a".into(),
            ips: vec!["10.77.2.5".parse().unwrap(), "fd77:2::5".parse().unwrap()],
        };
        let bridge = chain.stdin(&list["plugins"][0], &sandbox, None);
        assert_eq!(bridge["cniVersion"], CNI_VERSION);
        assert_eq!(bridge["name"], NETWORK);
        assert_eq!(
            bridge["runtimeConfig"]["ips"],
            json!(["10.77.2.5", "fd77:2::5"])
        );
        assert!(bridge.get("capabilities").is_none() && bridge.get("prevResult").is_none());
        let prev = json!({"cniVersion": CNI_VERSION, "ips": [{"address": "10.77.2.5/24"}]});
        let ours = chain.stdin(&list["plugins"][1], &sandbox, Some(&prev));
        assert_eq!(ours["prevResult"], prev);
        assert!(ours.get("runtimeConfig").is_none());
        assert_eq!(
            sandbox.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=lm-demo-a;K8S_POD_UID=demo/a"
        );
    }
}
