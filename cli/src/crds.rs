//! `ambitctl crds`: print only Ambit's CRDs, for operators who manage CRDs separately from the
//! rest of the install (e.g. before an upgrade, or with a different tool).

use ambit_manifests::{ManifestFile, Object};

use crate::output::{self, Format};

/// Options of `ambitctl crds`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Yaml)]
    output: Format,
}

/// Prints the CRDs.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let objects = ambit_manifests::crds::all()?
        .into_iter()
        .map(Object::CustomResourceDefinition)
        .collect();
    let file = ManifestFile {
        name: "01-crds.yaml",
        objects,
    };
    output::print(&[file], args.output)
}
