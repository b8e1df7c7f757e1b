//! The container images: `scripts/images.sh` builds one image per component from this
//! workspace's binaries, each image's binary runs in its image, and `ambitctl install` with the
//! same registry and tag names exactly those images. Needs root (buildah).
//!
//! The test passes the binaries `cargo test --workspace` already built (`--bin-dir`), so it
//! costs seconds rather than a release build; the script itself is the one users run.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use ambit_tests::{require_root, workspace_bin};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The images buildah holds under `registry`, as `name:tag`.
fn images_under(registry: &str) -> BTreeSet<String> {
    let out = run(Command::new("buildah").args([
        "--storage-driver",
        "vfs",
        "images",
        "--format",
        "{{.Name}}:{{.Tag}}",
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // buildah shows bare names under the implicit `localhost/`.
        .map(|l| l.trim().trim_start_matches("localhost/").to_owned())
        .filter(|l| l.starts_with(registry))
        .collect()
}

/// Removes the test's images even when an assertion fails.
struct RemoveImages(Vec<String>);

impl Drop for RemoveImages {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("buildah")
                .args(["--storage-driver", "vfs", "rmi", "--force", image])
                .output();
        }
    }
}

#[test]
fn images_build_run_their_binary_and_match_the_install() {
    if !require_root("images_build_run_their_binary_and_match_the_install") {
        return;
    }
    let registry = "registry.example.test/ambit-ci";
    let tag = format!("test-{}", std::process::id());
    let expected: BTreeSet<String> = ["ztunnel", "controller", "waypoint"]
        .iter()
        .map(|c| format!("{registry}/{c}:{tag}"))
        .collect();
    let _cleanup = RemoveImages(expected.iter().cloned().collect());

    let bin_dir = workspace_bin("ztunnel")
        .parent()
        .expect("a binary lives in a directory")
        .to_owned();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    // --check runs each image's binary with --version inside the image and fails otherwise.
    let out = run(Command::new("bash")
        .arg(root.join("scripts/images.sh"))
        .args(["--bin-dir"])
        .arg(&bin_dir)
        .args(["--registry", registry, "--tag", &tag, "--check"]));
    let log = String::from_utf8_lossy(&out.stderr);
    for (component, binary) in [
        ("ztunnel", "ztunnel"),
        ("controller", "ambit-controller"),
        ("waypoint", "waypoint"),
    ] {
        let checked = format!("checked {registry}/{component}:{tag}: {binary} ");
        assert!(
            log.contains(&checked),
            "no '{checked}' in the script's output:\n{log}"
        );
    }
    assert_eq!(images_under(registry), expected);

    // The install names exactly the images the script built.
    let out = run(Command::new(workspace_bin("ambitctl")).args([
        "install",
        "--enable-waypoints",
        "--registry",
        registry,
        "--tag",
        &tag,
    ]));
    let rendered: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("image: ")
                .or_else(|| l.strip_prefix("value: ").filter(|v| v.contains(registry)))
        })
        .map(|v| v.trim_matches('"').to_owned())
        .collect();
    assert_eq!(
        rendered, expected,
        "the install names other images than the script built"
    );
}
