//! Installing the plugin on a node: the binary into the CNI bin directory, and our entry at the
//! end of the `plugins` of the node's network configuration list (the first `.conflist` in the
//! CNI configuration directory, by name, which is the one the runtime uses). Removing both on
//! uninstall. Every write is atomic (temp file, rename), and installing twice changes nothing.
//!
//! The edit itself ([`add_to_conflist`], [`remove_from_conflist`]) is pure, so it is unit-tested;
//! the file handling around it is thin.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Our plugin type, as it appears in a conflist and as the binary's name.
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// Errors from installing or uninstalling.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration list is not what the CNI spec describes.
    #[error("{path} is not a CNI configuration list: {reason}")]
    BadConflist {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// There is no configuration list to chain onto.
    #[error("no .conflist file in {0}: the cluster's CNI has not written its configuration yet")]
    NoConflist(PathBuf),
}

/// Our entry in the configuration list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// ztunnel's node directory (`dataDir`).
    pub data_dir: PathBuf,
    /// The node's name (`nodeName`), for reading ztunnel's kept state.
    pub node_name: Option<String>,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), PLUGIN_TYPE.into());
        m.insert("dataDir".into(), self.data_dir.display().to_string().into());
        if let Some(node) = &self.node_name {
            m.insert("nodeName".into(), node.clone().into());
        }
        Value::Object(m)
    }
}

fn plugins_of<'a>(list: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, InstallError> {
    let bad = |reason: &str| InstallError::BadConflist {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    list.as_object_mut()
        .ok_or_else(|| bad("not a JSON object"))?
        .get_mut("plugins")
        .ok_or_else(|| bad("no \"plugins\" list"))?
        .as_array_mut()
        .ok_or_else(|| bad("\"plugins\" is not a list"))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Adds (or refreshes) our entry as the last plugin of the list in `text`. Returns the new text,
/// or `None` when it already is exactly there.
pub fn add_to_conflist(
    text: &str,
    path: &Path,
    entry: &Entry,
) -> Result<Option<String>, InstallError> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| InstallError::BadConflist {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let plugins = plugins_of(&mut list, path)?;
    let ours = entry.to_json();
    if plugins.last() == Some(&ours) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(None);
    }
    // Last, after whatever sets up the interface and addresses: we need its result.
    plugins.retain(|p| !is_ours(p));
    plugins.push(ours);
    render(&list).map(Some)
}

/// Removes our entry from the list in `text`; `None` when it holds none.
pub fn remove_from_conflist(text: &str, path: &Path) -> Result<Option<String>, InstallError> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| InstallError::BadConflist {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let plugins = plugins_of(&mut list, path)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    render(&list).map(Some)
}

fn render(list: &Value) -> Result<String, InstallError> {
    let mut out = serde_json::to_string_pretty(list).map_err(|e| InstallError::BadConflist {
        path: PathBuf::new(),
        reason: e.to_string(),
    })?;
    out.push('\n');
    Ok(out)
}

/// The first `.conflist` in `dir`, by name (the runtime's choice too).
pub fn first_conflist(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = std::fs::read_dir(dir).map_err(|source| InstallError::Io {
        what: "cannot list",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut lists: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist") && p.is_file())
        .collect();
    lists.sort();
    Ok(lists.into_iter().next())
}

/// Writes `bytes` to `path` whole or not at all ([`ambit_runtime::fs::write_atomic`]), so the
/// runtime never reads half a file; `mode` is the new file's permissions.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    ambit_runtime::fs::write_atomic(path, bytes, mode).map_err(|source| InstallError::Io {
        what: "cannot replace",
        path: path.to_path_buf(),
        source,
    })
}

/// What [`install`] and [`uninstall`] did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The binary written or removed.
    pub binary: Option<PathBuf>,
    /// The configuration list changed.
    pub conflist: Option<PathBuf>,
}

/// Copies `binary` to `<bin_dir>/ambit-cni` and chains our entry onto the first conflist.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<Report, InstallError> {
    let conflist = first_conflist(conf_dir)?
        .ok_or_else(|| InstallError::NoConflist(conf_dir.to_path_buf()))?;
    let bytes = std::fs::read(binary).map_err(|source| InstallError::Io {
        what: "cannot read",
        path: binary.to_path_buf(),
        source,
    })?;
    // The binary first: a conflist naming a plugin that is not there fails every pod.
    let target = bin_dir.join(PLUGIN_TYPE);
    write_atomic(&target, &bytes, 0o755)?;
    let text = std::fs::read_to_string(&conflist).map_err(|source| InstallError::Io {
        what: "cannot read",
        path: conflist.clone(),
        source,
    })?;
    let changed = match add_to_conflist(&text, &conflist, entry)? {
        Some(new) => {
            write_atomic(&conflist, new.as_bytes(), 0o644)?;
            Some(conflist)
        }
        None => None,
    };
    Ok(Report {
        binary: Some(target),
        conflist: changed,
    })
}

/// Removes our entry from every conflist in `conf_dir`, then the binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let entries = std::fs::read_dir(conf_dir).map_err(|source| InstallError::Io {
        what: "cannot list",
        path: conf_dir.to_path_buf(),
        source,
    })?;
    let mut lists: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    for list in lists {
        let text = std::fs::read_to_string(&list).map_err(|source| InstallError::Io {
            what: "cannot read",
            path: list.clone(),
            source,
        })?;
        // Someone else's malformed file is not ours to fix.
        if let Ok(Some(new)) = remove_from_conflist(&text, &list) {
            write_atomic(&list, new.as_bytes(), 0o644)?;
            report.conflist = Some(list);
        }
    }
    // The conflist first: the runtime must stop calling the plugin before it disappears.
    let target = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Ok(()) => report.binary = Some(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Io {
                what: "cannot remove",
                path: target,
                source,
            })
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const KINDNET: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn entry() -> Entry {
        Entry {
            data_dir: "/var/lib/ambit/ztunnel".into(),
            node_name: Some("node-1".into()),
        }
    }

    fn types(text: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(text).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn install_appends_once_and_keeps_everything_else() {
        let p = Path::new("10-kindnet.conflist");
        let once = add_to_conflist(KINDNET, p, &entry()).unwrap().unwrap();
        assert_eq!(types(&once), ["ptp", "portmap", "ambit-cni"]);
        let v: Value = serde_json::from_str(&once).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.0.0/24"
        );
        assert_eq!(
            v["plugins"][2],
            serde_json::json!({"type":"ambit-cni","dataDir":"/var/lib/ambit/ztunnel","nodeName":"node-1"})
        );
        // Again: nothing to do.
        assert_eq!(add_to_conflist(&once, p, &entry()).unwrap(), None);
        // A changed entry, or ours not last (the cluster's CNI appended after us), is rewritten
        // with exactly one of ours, last.
        let mut v: Value = serde_json::from_str(&once).unwrap();
        let ours = v["plugins"].as_array_mut().unwrap().remove(2);
        v["plugins"].as_array_mut().unwrap().insert(0, ours.clone());
        v["plugins"].as_array_mut().unwrap().insert(1, ours);
        let fixed = add_to_conflist(&v.to_string(), p, &entry())
            .unwrap()
            .unwrap();
        assert_eq!(types(&fixed), ["ptp", "portmap", "ambit-cni"]);
        let other = Entry {
            node_name: Some("node-2".into()),
            ..entry()
        };
        let refreshed = add_to_conflist(&once, p, &other).unwrap().unwrap();
        assert!(refreshed.contains("node-2") && !refreshed.contains("node-1"));
    }

    #[test]
    fn uninstall_removes_only_ours() {
        let p = Path::new("10-kindnet.conflist");
        let installed = add_to_conflist(KINDNET, p, &entry()).unwrap().unwrap();
        let removed = remove_from_conflist(&installed, p).unwrap().unwrap();
        assert_eq!(types(&removed), ["ptp", "portmap"]);
        assert_eq!(
            serde_json::from_str::<Value>(&removed).unwrap(),
            serde_json::from_str::<Value>(KINDNET).unwrap()
        );
        assert_eq!(remove_from_conflist(KINDNET, p).unwrap(), None);
    }

    #[test]
    fn malformed_lists_are_refused_with_the_file_named() {
        let p = Path::new("/etc/cni/net.d/10-x.conflist");
        for text in ["{", "[]", r#"{"name":"x"}"#, r#"{"plugins":{}}"#] {
            let err = add_to_conflist(text, p, &entry()).unwrap_err();
            assert!(err.to_string().contains("10-x.conflist"), "{err}");
        }
    }

    #[test]
    fn install_and_uninstall_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let binary = dir.path().join("source-binary");
        std::fs::write(&binary, b"\x7fELF fake").unwrap();
        assert!(matches!(
            install(&binary, &bin, &conf, &entry()),
            Err(InstallError::NoConflist(_))
        ));
        std::fs::write(conf.join("20-later.conflist"), KINDNET).unwrap();
        std::fs::write(conf.join("10-kindnet.conflist"), KINDNET).unwrap();
        std::fs::write(conf.join("05-ignored.conf"), "{}").unwrap();
        let r = install(&binary, &bin, &conf, &entry()).unwrap();
        assert_eq!(r.conflist, Some(conf.join("10-kindnet.conflist")));
        let installed = bin.join("ambit-cni");
        assert_eq!(std::fs::read(&installed).unwrap(), b"\x7fELF fake");
        assert_eq!(
            std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            types(&std::fs::read_to_string(conf.join("10-kindnet.conflist")).unwrap()),
            ["ptp", "portmap", "ambit-cni"]
        );
        assert_eq!(
            std::fs::read_to_string(conf.join("20-later.conflist")).unwrap(),
            KINDNET
        );
        // Idempotent: the list is not rewritten.
        assert_eq!(
            install(&binary, &bin, &conf, &entry()).unwrap().conflist,
            None
        );
        let r = uninstall(&bin, &conf).unwrap();
        assert_eq!(r.binary, Some(installed.clone()));
        assert!(!installed.exists());
        assert_eq!(
            types(&std::fs::read_to_string(conf.join("10-kindnet.conflist")).unwrap()),
            ["ptp", "portmap"]
        );
        // No temp files left behind.
        let left: Vec<_> = std::fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.iter().all(|n| !n.contains("ambit-tmp")), "{left:?}");
        assert_eq!(uninstall(&bin, &conf).unwrap(), Report::default());
    }
}
