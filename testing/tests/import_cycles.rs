//! No two files of one crate import each other, directly or around a loop: a shared piece
//! moves down a layer instead (see `ambit_testing::imports` for how the graph is read). Run
//! with `-- --nocapture` to see every cycle found.

use std::path::{Path, PathBuf};

use ambit_testing::imports::crate_cycles;

fn workspace() -> PathBuf {
    // testing/ sits at the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_files() -> anyhow::Result<()> {
    let root = workspace();
    let mut crates: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file() && p.join("src").is_dir())
        .collect();
    crates.sort();
    assert!(
        crates.len() >= 10,
        "found only {} crates under {}",
        crates.len(),
        root.display()
    );
    let mut failures = Vec::new();
    for dir in &crates {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for cycle in crate_cycles(dir)? {
            println!("{name}: {cycle}");
            failures.push(format!("{name}: {cycle}"));
        }
    }
    assert!(
        failures.is_empty(),
        "import cycles between files of a crate (move the shared piece down a layer):\n{}",
        failures.join("\n")
    );
    Ok(())
}
