//! The DaemonSet configures ztunnel through environment variables; each one must be a name
//! ztunnel's clap options actually read (`env = "..."`), or the setting is silently ignored.
//! The values must also parse: ztunnel's own `Args` is run on the flags they stand for.

// Test helpers panic on unexpected input, as the tests themselves do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ambit_manifests::{render, InstallOptions, Object};
use ambit_ztunnel::config::{Args, Config};
use clap::{CommandFactory, Parser};

#[test]
fn ztunnel_reads_every_variable_the_daemonset_sets() {
    // env name -> long flag, from ztunnel's command definition.
    let command = Args::command();
    let flags: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_owned();
            Some((env, a.get_long()?.to_owned()))
        })
        .collect();

    let opts = InstallOptions {
        root_ca: None,
        ..InstallOptions::default()
    };
    let ds = render(&opts)
        .unwrap()
        .into_iter()
        .flat_map(|f| f.objects)
        .find_map(|o| match o {
            Object::DaemonSet(ds) => Some(ds),
            _ => None,
        })
        .unwrap();
    let container = &ds.spec.template.spec.unwrap().containers[0];

    let mut argv = vec!["ztunnel".to_owned()];
    for var in container.env.clone().unwrap() {
        let flag = flags.get(&var.name).unwrap_or_else(|| {
            panic!(
                "the DaemonSet sets {} but ztunnel reads no such variable (it reads {:?})",
                var.name,
                flags.keys()
            )
        });
        // Downward-API values are filled by the kubelet; stand in a plausible one.
        let value = var.value.unwrap_or_else(|| "node-1".to_owned());
        argv.push(format!("--{flag}={value}"));
    }
    let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let config = Config::try_from(args).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert_eq!(config.node, "node-1");
    assert_eq!(config.trust_domain, "cluster.local");
    assert_eq!(config.netns_dir, std::path::Path::new("/var/run/netns"));
}
