//! The CNI specification's side of the plugin (version 1.0, and the older result formats a
//! chained plugin passes through): the environment, the network configuration on stdin, the
//! error object, and the VERSION answer. Pure parsing; nothing here touches the system.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec version this plugin implements.
pub const SPEC_VERSION: &str = "1.0.0";
/// Versions of the configuration and result formats this plugin accepts. ADD passes
/// `prevResult` through untouched, so any format the runtime speaks is fine; CHECK exists
/// since 0.4.0.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The spec's well-known error codes (section "Error"); 100 and up are this plugin's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 2: unsupported field in the network configuration.
    UnsupportedField = 2,
    /// 3: container unknown or does not exist (nothing for the runtime to clean up).
    UnknownContainer = 3,
    /// 4: invalid necessary environment variables.
    InvalidEnv = 4,
    /// 5: I/O failure (reading the configuration from stdin).
    Io = 5,
    /// 6: failed to decode content (the configuration is not JSON).
    Decode = 6,
    /// 7: invalid network configuration.
    InvalidConfig = 7,
    /// 11: try again later (a transient condition).
    TryAgainLater = 11,
    /// 100: the capture rules could not be installed in the pod's namespace.
    CaptureFailed = 100,
    /// 101: CHECK found the pod enrolled but its capture rules missing or not current.
    CaptureMissing = 101,
    /// 102: the capture rules could not be removed from the pod's namespace.
    RemoveFailed = 102,
}

/// A CNI error: printed as the spec's JSON object on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error ({code:?}): {msg}: {details}")]
pub struct CniError {
    /// The spec's code.
    pub code: Code,
    /// A short message.
    pub msg: String,
    /// What exactly was wrong, and where.
    pub details: String,
}

impl CniError {
    /// An error with `code`.
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object for a runtime speaking `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_value(Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or(Value::Null)
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Set up (for us: capture) the container's network.
    Add,
    /// Tear it down; idempotent, and must succeed on a missing namespace.
    Del,
    /// Check it is as ADD left it.
    Check,
    /// Report the supported versions.
    Version,
}

/// The environment the runtime sets for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: required on ADD and CHECK, optional on DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, as key/value pairs.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH`.
    pub path: String,
}

impl Env {
    /// Reads the variables through `get` (the process environment, or a table in tests).
    /// Every missing or malformed one is named in one error (code 4).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    "invalid CNI_COMMAND",
                    format!("CNI_COMMAND={other:?} is not ADD, DEL, CHECK or VERSION"),
                ))
            }
            None => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    "missing CNI_COMMAND",
                    "CNI_COMMAND is not set (ADD, DEL, CHECK or VERSION)",
                ))
            }
        };
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: String::new(),
            args: BTreeMap::new(),
            path: String::new(),
        };
        if command == Command::Version {
            return Ok(env);
        }
        let mut missing = Vec::new();
        for (name, slot) in [
            ("CNI_CONTAINERID", &mut env.container_id),
            ("CNI_IFNAME", &mut env.ifname),
            ("CNI_PATH", &mut env.path),
        ] {
            match nonempty(name) {
                Some(v) => *slot = v,
                None => missing.push(name),
            }
        }
        if command != Command::Del && env.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                "missing environment variables",
                format!("not set or empty: {}", missing.join(", ")),
            ));
        }
        if let Some(raw) = nonempty("CNI_ARGS") {
            env.args = parse_args(&raw)?;
        }
        Ok(env)
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut args = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                args.insert(k.to_owned(), v.to_owned());
            }
            _ => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    "invalid CNI_ARGS",
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                ))
            }
        }
    }
    Ok(args)
}

/// Which iptables implementation to drive (as ztunnel's `--iptables-backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `iptables-restore` on `PATH`.
    #[default]
    Default,
    /// `iptables-nft-restore`.
    Nft,
    /// `iptables-legacy-restore`.
    Legacy,
}

/// The plugin's entry in the network configuration list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The format version the runtime speaks.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// Our plugin type (`ambit-cni`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The previous plugin's result: passed through unchanged on ADD.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// ztunnel's node directory: `cni.sock` and the last state it acknowledged.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This node's name, to read ztunnel's kept state when ztunnel is not answering.
    #[serde(default)]
    pub node_name: Option<String>,
    /// How long to wait for ztunnel's answer, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The iptables implementation; must be the one ztunnel uses.
    #[serde(default)]
    pub iptables_backend: Backend,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(ambit_ztunnel::node_dir::DEFAULT_DIR)
}

fn default_timeout_ms() -> u64 {
    2000
}

impl NetConf {
    /// Parses stdin: not JSON is code 6, a JSON value that is not a valid configuration is 7,
    /// an unsupported `cniVersion` is 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "cannot decode the network configuration",
                format!("stdin is not JSON: {e}"),
            )
        })?;
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "cniVersion {:?} is not one of {SUPPORTED_VERSIONS:?}",
                    conf.cni_version
                ),
            ));
        }
        if conf.timeout_ms == 0 || conf.timeout_ms > 60_000 {
            return Err(CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                format!("timeoutMs {} is not within 1..=60000", conf.timeout_ms),
            ));
        }
        Ok(conf)
    }

    /// The addresses in `prevResult.ips[].address` (`10.1.2.3/24`); malformed ones are an
    /// invalid configuration.
    pub fn prev_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(Value::as_array)
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let raw = ip.get("address").and_then(Value::as_str).unwrap_or("");
            let addr = raw.split('/').next().unwrap_or("");
            let parsed: IpAddr = addr.parse().map_err(|_| {
                CniError::new(
                    Code::InvalidConfig,
                    "invalid prevResult",
                    format!("prevResult.ips[{i}].address {raw:?} is not an address/prefix"),
                )
            })?;
            out.push(parsed);
        }
        Ok(out)
    }
}

/// The VERSION answer for a runtime that asked with `cni_version` (if any).
pub fn version_result(asked: Option<&str>) -> Value {
    let version = asked
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(SPEC_VERSION);
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::parse(|k| map.get(k).cloned())
    }

    const FULL: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a;K8S_POD_UID=u-1",
        ),
    ];

    #[test]
    fn environment_is_parsed_and_every_missing_variable_named() {
        let e = env(&FULL).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(e.args["K8S_POD_UID"], "u-1");

        let err = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnv);
        assert_eq!(
            err.details,
            "not set or empty: CNI_CONTAINERID, CNI_PATH, CNI_NETNS"
        );
        // DEL needs no namespace; VERSION needs nothing but the command.
        let del: Vec<_> = FULL
            .iter()
            .map(|(k, v)| {
                if *k == "CNI_COMMAND" {
                    (*k, "DEL")
                } else {
                    (*k, *v)
                }
            })
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(env(&del).unwrap().netns, None);
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        for bad in [vec![], vec![("CNI_COMMAND", "UPDATE")]] {
            assert_eq!(env(&bad).unwrap_err().code, Code::InvalidEnv);
        }
        let mut bad_args = FULL.to_vec();
        bad_args[5] = ("CNI_ARGS", "K8S_POD_NAME");
        let err = env(&bad_args).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnv);
        assert!(err.details.contains("CNI_ARGS"), "{err}");
    }

    #[test]
    fn configuration_errors_have_the_specs_codes() {
        let ok = br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni",
            "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/24"},{"address":"fd00::3/64"}]}}"#;
        let conf = NetConf::parse(ok).unwrap();
        assert_eq!(
            conf.prev_ips().unwrap(),
            vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::3".parse().unwrap()
            ]
        );
        assert_eq!(conf.data_dir, PathBuf::from("/var/lib/ambit/ztunnel"));
        for (input, code) in [
            (&b"{not json"[..], Code::Decode),
            (&b""[..], Code::Decode),
            (br#"{"name":"k8s","type":"ambit-cni"}"#, Code::InvalidConfig),
            (br#"[1,2]"#, Code::InvalidConfig),
            (
                br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","timeoutMs":"x"}"#,
                Code::InvalidConfig,
            ),
            (
                br#"{"cniVersion":"0.2.0","name":"k8s","type":"ambit-cni"}"#,
                Code::IncompatibleVersion,
            ),
            (
                br#"{"cniVersion":"9.9.9","name":"k8s","type":"ambit-cni"}"#,
                Code::IncompatibleVersion,
            ),
        ] {
            let got = NetConf::parse(input).map(|_| ()).unwrap_err();
            assert_eq!(got.code, code, "{}: {got}", String::from_utf8_lossy(input));
        }
        let bad_ip = br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni",
            "prevResult":{"ips":[{"address":"banana/24"}]}}"#;
        let err = NetConf::parse(bad_ip).unwrap().prev_ips().unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.details.contains("banana"));
    }

    #[test]
    fn errors_and_version_are_the_specs_json() {
        let err = CniError::new(Code::InvalidEnv, "m", "d");
        assert_eq!(
            err.to_json("0.4.0"),
            serde_json::json!({"cniVersion":"0.4.0","code":4,"msg":"m","details":"d"})
        );
        assert_eq!(
            version_result(Some("0.4.0")),
            serde_json::json!({"cniVersion":"0.4.0",
                "supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]})
        );
        assert_eq!(version_result(Some("7.0.0"))["cniVersion"], "1.0.0");
    }
}
