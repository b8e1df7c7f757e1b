//! `ambitctl apply -f FILE`: check a file of Kubernetes YAML with the controller's own parser
//! (so errors name the file, the document and the field exactly as the controller would) and
//! against the folder it joins (objects in namespaces that exist), then copy it into the
//! local mesh's objects folder, which the controller watches: the change is live.
//!
//! The file is held to the controller's input limits (size, nesting depth), with the same
//! flags and environment variables, so a file `apply` accepts is one the controller reads.

use std::path::{Path, PathBuf};

use ambit_controller::source::limits::{
    InputLimits, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FILE_BYTES, MAX_DEPTH_LIMIT,
};
use ambit_controller::source::local::{parse_file_limited, read_file, Scanner};
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
    /// Largest file the controller reads, in bytes (as the controller's flag).
    #[arg(long, env = "AMBIT_LOCAL_MAX_FILE_BYTES", default_value_t = DEFAULT_MAX_FILE_BYTES)]
    local_max_file_bytes: u64,
    /// Deepest nesting the controller parses (as the controller's flag).
    #[arg(long, env = "AMBIT_LOCAL_MAX_YAML_DEPTH", default_value_t = DEFAULT_MAX_DEPTH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_DEPTH_LIMIT as u64))]
    local_max_yaml_depth: usize,
}

impl Args {
    fn limits(&self) -> InputLimits {
        InputLimits {
            max_file_bytes: self.local_max_file_bytes,
            max_depth: self.local_max_yaml_depth,
        }
    }
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
    let limits = args.limits();
    let text = match read_file(&args.file, &limits) {
        Ok(text) => text,
        Err(e) => bail!(
            "{} was not applied:\n  {}",
            args.file.display(),
            error_chain(&e)
        ),
    };
    let problems = check(&args.file, &text, &folder, &limits)?;
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
    // Written beside under a name without a manifest extension, which the controller ignores,
    // then renamed: it never reads half a file.
    ambit_runtime::fs::write_atomic(&dest, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", dest.display()))?;
    println!(
        "{} applied as {} (the controller picks it up now)",
        args.file.display(),
        dest.display()
    );
    Ok(())
}

/// Every problem the controller would report with `file` (whose content is `text`) in
/// `folder`, naming `file`.
fn check(
    file: &Path,
    text: &str,
    folder: &Path,
    limits: &InputLimits,
) -> anyhow::Result<Vec<String>> {
    if let Err(errors) = parse_file_limited(file, text, limits) {
        return Ok(errors.iter().map(|e| error_chain(e)).collect());
    }
    // Cross-file checks (namespaces that exist) need the folder: scan a copy with the file in
    // its place.
    let name = file
        .file_name()
        .with_context(|| format!("{} names no file", file.display()))?;
    // One scratch folder per check, not per process: checks may run side by side (the tests
    // do), and one's clean-up must not delete another's copy.
    static CHECKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = std::env::temp_dir().join(format!("ambitctl-apply-{}-{n}", std::process::id()));
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
        std::fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))?;
        let scan = Scanner::with_limits(&scratch, *limits).scan();
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
        let out = check(&file, yaml, &dir, &InputLimits::default()).unwrap();
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
        let jwks = problems("apiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec: {targetRefs: [{kind: Service, name: web}], jwtRules: [{issuer: idp, jwks: '{not json'}]}\n");
        assert_eq!(jwks.len(), 1, "{jwks:?}");
        assert!(
            jwks[0]
                .contains(".new.yaml: document 1: spec.jwtRules[0].jwks: not a JSON Web Key Set"),
            "{jwks:?}"
        );
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

    #[test]
    fn a_bad_external_service_is_refused_naming_file_document_and_field() {
        let xs = |spec: &str| {
            format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: s, namespace: demo}}\n---\napiVersion: networking.ambit.dev/v1\nkind: ExternalService\nmetadata: {{name: x, namespace: demo}}\nspec: {spec}\n")
        };
        let host = problems(&xs("{hosts: ['api_example.com'], ports: [{number: 443}]}"));
        assert_eq!(host.len(), 1, "{host:?}");
        assert!(
            host[0].ends_with(".new.yaml: document 2: spec.hosts[0]: \"api_example.com\" is not a DNS name (letters, digits, '-' and '.')"),
            "{host:?}"
        );
        let port = problems(&xs("{hosts: [api.example.com], ports: [{number: 65536}]}"));
        assert_eq!(port.len(), 1, "{port:?}");
        assert!(
            port[0].ends_with(
                ".new.yaml: document 2: spec.ports[0].number: 65536 is not a port number (1-65535)"
            ),
            "{port:?}"
        );
        assert!(problems(&xs(
            "{hosts: [api.example.com], addresses: [203.0.113.0/24], ports: [{number: 443}]}"
        ))
        .is_empty());
    }

    #[test]
    fn a_bad_peer_authentication_is_refused_naming_file_document_and_field() {
        let pa = |spec: &str| {
            format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: s, namespace: demo}}\n---\napiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: demo}}\nspec: {spec}\n")
        };
        let mode = problems(&pa("{mtls: {mode: STRIKT}}"));
        assert_eq!(mode.len(), 1, "{mode:?}");
        assert!(
            mode[0].contains(".new.yaml: document 2")
                && mode[0].contains("spec.mtls.mode: unknown variant `STRIKT`"),
            "{mode:?}"
        );
        let port = problems(&pa(
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {'70000': {mode: STRICT}}}",
        ));
        assert_eq!(port.len(), 1, "{port:?}");
        assert!(
            port[0].ends_with(".new.yaml: document 2: spec.portLevelMtls[70000]: \"70000\" is not a port number (1-65535)"),
            "{port:?}"
        );
        assert!(problems(&pa(
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}"
        ))
        .is_empty());
    }

    #[test]
    fn the_controllers_input_limits_apply() {
        let dir = folder();
        let attempt = |name: &str, text: &str, limits: InputLimits| {
            let file = dir.with_extension(name);
            std::fs::write(&file, text).unwrap();
            let args = Args {
                file: file.clone(),
                state_dir: dir.clone(),
                objects: Some(dir.clone()),
                dry_run: false,
                local_max_file_bytes: limits.max_file_bytes,
                local_max_yaml_depth: limits.max_depth,
            };
            let out = run(&args).map(|()| String::new());
            std::fs::remove_file(&file).unwrap();
            format!("{:#}", out.expect_err("applied"))
        };
        let nested = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
            "[".repeat(200_000)
        );
        let msg = attempt("nested.yaml", &nested, InputLimits::default());
        assert!(
            msg.contains("nested.yaml: document 1: refused before parsing: nesting deeper than 64 levels at line 3, column"),
            "{msg}"
        );
        let big = format!("# {}\n", "x".repeat(2000));
        let limits = InputLimits {
            max_file_bytes: 1000,
            ..InputLimits::default()
        };
        let msg = attempt("big.yaml", &big, limits);
        assert!(
            msg.contains("big.yaml: refused before parsing: 2003 bytes is over the limit of 1000 bytes per file"),
            "{msg}"
        );
        // Nothing reached the folder.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ns.yaml")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
