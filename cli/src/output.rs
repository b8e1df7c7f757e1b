//! The output formats shared by subcommands that print Kubernetes objects.

use std::io::Write;

use anyhow::Context;

/// How objects are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A YAML stream, one document per object.
    #[default]
    Yaml,
    /// One JSON `v1/List` holding every object.
    Json,
}

/// Prints `files` to stdout in `format`.
pub fn print(files: &[ambit_manifests::ManifestFile], format: Format) -> anyhow::Result<()> {
    let text = match format {
        Format::Yaml => ambit_manifests::to_yaml(files)?,
        Format::Json => ambit_manifests::to_json(files)? + "\n",
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}
