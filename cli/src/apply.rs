//! `ambitctl apply -f FILE`: check a file of Kubernetes YAML with the controller's own parser
//! (so errors name the file, the document and the field exactly as the controller would) and
//! against the folder it joins (objects in namespaces that exist), then copy it into the
//! local mesh's objects folder, which the controller watches: the change is live.

use std::path::{Path, PathBuf};

use ambit_controller::source::local::{parse_file, Scanner};
use ambitctl::local::objects::error_chain;
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::{bail, Context};

/// Options of `ambitctl apply`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The YAML file to add (or replace, by file name) in the objects folder.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// The local mesh's state directory (its cluster.json names the objects folder).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The objects folder, when not the running local mesh's.
    #[arg(long)]
    objects: Option<PathBuf>,
    /// Only check; copy nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let folder = match &args.objects {
        Some(d) => d.clone(),
        None => {
            ClusterState::load(&args.state_dir)
                .context("finding the objects folder (or give --objects DIR)")?
                .objects_dir
        }
    };
    let problems = check(&args.file, &folder)?;
    if !problems.is_empty() {
        bail!(
            "{} was not applied:\n  {}",
            args.file.display(),
            problems.join("\n  ")
        );
    }
    let name = args
        .file
        .file_name()
        .with_context(|| format!("{} names no file", args.file.display()))?;
    let dest = folder.join(name);
    if args.dry_run {
        println!(
            "{} is valid (would be written to {})",
            args.file.display(),
            dest.display()
        );
        return Ok(());
    }
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    // Written beside and renamed, under a name the controller ignores, so it never reads
    // half a file.
    let tmp = folder.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
    println!(
        "{} applied as {} (the controller picks it up now)",
        args.file.display(),
        dest.display()
    );
    Ok(())
}

/// Every problem the controller would report with `file` in `folder`, naming `file`.
fn check(file: &Path, folder: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if let Err(errors) = parse_file(file, &text) {
        return Ok(errors.iter().map(|e| error_chain(e)).collect());
    }
    // Cross-file checks (namespaces that exist) need the folder: scan a copy with the file in
    // its place.
    let name = file
        .file_name()
        .with_context(|| format!("{} names no file", file.display()))?;
    let scratch = std::env::temp_dir().join(format!("ambitctl-apply-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| -> anyhow::Result<Vec<String>> {
        for entry in
            std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", folder.display()))?;
            if entry.path().is_file() && entry.file_name() != name {
                std::fs::copy(entry.path(), scratch.join(entry.file_name()))
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
        let copy = scratch.join(name);
        std::fs::write(&copy, &text).with_context(|| format!("writing {}", copy.display()))?;
        let scan = Scanner::new(&scratch).scan();
        let copy_s = copy.display().to_string();
        Ok(scan
            .errors
            .iter()
            .map(|e| error_chain(e))
            .filter(|e| e.starts_with(&copy_s))
            .map(|e| e.replacen(&copy_s, &file.display().to_string(), 1))
            .collect())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambitctl-apply-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n",
        )
        .unwrap();
        dir
    }

    fn problems(yaml: &str) -> Vec<String> {
        let dir = folder();
        let file = dir.with_extension("new.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = check(&file, &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&file).unwrap();
        out
    }

    #[test]
    fn errors_name_the_file_document_and_field() {
        let bad = problems("apiVersion: v1\nkind: Namespace\nmetadata: {name: [oops\n");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains(".new.yaml: document 1"), "{bad:?}");
        let unknown = problems("apiVersion: v1\nkind: Gizmo\nmetadata: {name: g}\n");
        assert!(unknown[0].contains("unknown kind v1/Gizmo"), "{unknown:?}");
        let field = problems("apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}\n");
        assert!(field[0].contains("unknown field"), "{field:?}");
        let ns = problems(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: s, namespace: nowhere}\n",
        );
        assert!(
            ns[0].contains("namespace \"nowhere\", which does not exist"),
            "{ns:?}"
        );
        assert!(problems(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: s, namespace: demo}\n"
        )
        .is_empty());
    }
}
