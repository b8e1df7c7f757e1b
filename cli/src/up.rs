//! `ambitctl up`: run a whole ambient mesh on this machine (root, Linux). Builds the cluster
//! (`ambitctl::local::cluster`), then either leaves it running (`--detach`) or stays in the
//! foreground showing what happens (`ambitctl::local::watch`) until Ctrl-C, which tears it
//! all down. A failure half-way tears down what was made.

use std::path::PathBuf;
use std::time::Duration;

use ambitctl::local::cluster::{self, Binaries, Running, UpOptions};
use ambitctl::local::objects::SampleSpec;
use ambitctl::local::state::{ClusterState, DEFAULT_PREFIX, DEFAULT_STATE_DIR};
use ambitctl::local::watch::{Pretty, Tail};

use anyhow::{bail, Context};

/// Options of `ambitctl up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Pods per node (the sample app's servers and clients, spread over the nodes).
    #[arg(long, default_value_t = 3)]
    pods_per_node: usize,
    /// Namespaces to enroll in the mesh (label ambit.dev/dataplane-mode=ambient).
    #[arg(long, value_delimiter = ',', default_value = "demo")]
    enroll: Vec<String>,
    /// Use this folder of Kubernetes YAML instead of the generated sample (Pods need
    /// spec.nodeName and status.podIP in 10.77.<node>.0/24).
    #[arg(long)]
    objects: Option<PathBuf>,
    /// Where state, logs and the objects folder live.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Prefix of the network namespaces' names (tests use their own).
    #[arg(long, default_value = DEFAULT_PREFIX, hide = true)]
    netns_prefix: String,
    /// Controller replicas to run (1 to 5), each serving discovery and the CA on the
    /// fabric's address (replica i on ports 15012+100i and 15014+100i); they elect a leader
    /// with a lock file in the state dir, and the ztunnels and waypoints are given all of
    /// them, so killing one leaves the mesh with the others.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=cluster::MAX_CONTROLLERS as u64))]
    controllers: usize,
    /// Start the cluster and return; `ambitctl down` stops it.
    #[arg(long)]
    detach: bool,
    /// Whether the ztunnels capture the pods' UDP to the pod networks (10.77.k.0/24 and
    /// fd77:k::/64 of every node) and carry it over CONNECT-UDP between enrolled pods;
    /// `false` leaves the pods' IPv4 UDP alone and their IPv6 UDP dropped, DNS aside.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    udp_capture: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ambitctl up needs root (it creates network namespaces and iptables rules inside them): run it with sudo");
    }
    if args.nodes == 0 || args.pods_per_node == 0 {
        bail!("--nodes and --pods-per-node must be at least 1");
    }
    let bins = Binaries::locate()?;
    let opts = UpOptions {
        state_dir: args.state_dir.clone(),
        prefix: args.netns_prefix.clone(),
        objects: args.objects.clone(),
        sample: SampleSpec {
            nodes: args.nodes,
            pods_per_node: args.pods_per_node,
            enroll: args.enroll.clone(),
        },
        controllers: args.controllers,
        udp_capture: args.udp_capture,
    };
    eprintln!(
        "ambitctl: building {} node(s) under {} ...",
        args.nodes,
        args.state_dir.display()
    );
    let mut signals = Signals::catch()?;
    let mut running: Option<Running> = None;
    let built = cluster::up(&opts, &bins, &mut running);
    if built.is_ok() && signals.pending() {
        eprintln!("ambitctl: interrupted, removing what was made");
        teardown(&opts.state_dir, &opts.prefix, running);
        return Ok(());
    }
    if let Err(err) = built {
        eprintln!("ambitctl: start-up failed, removing what was made");
        teardown(&opts.state_dir, &opts.prefix, running);
        return Err(err).context("ambitctl up");
    }
    let Some(mut running) = running else {
        bail!("ambitctl up: nothing was started");
    };
    print_summary(&running.state);
    if args.detach {
        println!(
            "\nRunning in the background. Stop it with: ambitctl down --state-dir {}",
            args.state_dir.display()
        );
        // The children live on in their own process groups; do not reap them.
        running.children.clear();
        return Ok(());
    }
    println!("\nWatching (Ctrl-C stops and removes everything):\n");
    let result = follow(&running.state, &mut signals);
    eprintln!("\nambitctl: stopping and removing the local cluster ...");
    let state_dir = running.state.state_dir.clone();
    let prefix = running.state.prefix.clone();
    teardown(&state_dir, &prefix, Some(running));
    result
}

fn teardown(state_dir: &std::path::Path, prefix: &str, running: Option<Running>) {
    let report = cluster::down(state_dir, prefix);
    if let Some(mut r) = running {
        for child in &mut r.children {
            // Already signalled by down(); this only reaps them.
            let _ = child.wait();
        }
    }
    for p in &report.problems {
        eprintln!("ambitctl: cleanup: {p}");
    }
    eprintln!(
        "ambitctl: stopped {} process(es), deleted {} namespace(s)",
        report.stopped.len(),
        report.namespaces.len()
    );
}

fn print_summary(state: &ClusterState) {
    println!("\nLocal mesh is up.\n");
    println!(
        "  controller  {} (in namespace {}), metrics http://{}:{}/metrics, objects folder {}",
        state.controller_url,
        state.fabric,
        ambitctl::local::net::FABRIC_IP,
        ambitctl::local::cluster::CONTROLLER_OPS_PORT,
        state.objects_dir.display()
    );
    for c in &state.more_controllers {
        println!(
            "  {}  {} (another replica: discovery and CA), metrics http://{}/metrics; the leader is named in {}/leader",
            c.name,
            c.url,
            c.ops,
            state.state_dir.display()
        );
    }
    for n in &state.nodes {
        println!(
            "  {:<10}  {} netns {}  ztunnel metrics http://{}:15020/metrics, readiness :15021, admin 127.0.0.1:15000",
            n.name, n.ip, n.netns, n.ip
        );
    }
    println!();
    println!("  {:<22} {:<14} {:<8} runs", "pod", "ip", "node");
    for p in &state.pods {
        let runs = match &p.sample {
            Some(ambitctl::local::objects::Sample::Server { port }) => {
                format!("sample server :{port}")
            }
            Some(ambitctl::local::objects::Sample::Client { target }) => {
                format!("sample client -> {target}")
            }
            Some(ambitctl::local::objects::Sample::Waypoint { gateway }) => {
                format!("waypoint {gateway} (HBONE :15008, metrics :15020)")
            }
            None => "-".to_owned(),
        };
        println!(
            "  {:<22} {:<14} {:<8} {runs}",
            format!("{}/{}", p.namespace, p.name),
            p.ip,
            p.node,
        );
    }
    let sd = state.state_dir.display();
    println!("\nWhere to look:");
    println!("  ambitctl status --state-dir {sd}");
    if let Some(n) = state.nodes.first() {
        println!("  ambitctl proxy-config {} --state-dir {sd}", n.name);
    }
    println!("  logs: {sd}/logs/  (ztunnel-<node>.log: JSON access log; controller.log)");
    println!("  try:  ambitctl apply --state-dir {sd} -f {sd}/examples/deny-client.yaml");
    println!(
        "  or edit the YAML in {} (watched live)",
        state.objects_dir.display()
    );
    // Plumbing note: the pods are reachable only from inside the cluster's namespaces.
    println!(
        "  a shell in a pod: ip netns exec {} sh",
        state
            .pods
            .first()
            .map_or(state.fabric.as_str(), |p| p.netns.as_str())
    );
}

/// Prints what happens until Ctrl-C (or until the controller dies).
/// SIGINT and SIGTERM, caught from the start: a Ctrl-C while the cluster is being built must
/// not kill `up` half-way (its children live in their own process groups and would be left
/// behind); it is acted on once the build returns.
struct Signals {
    rt: tokio::runtime::Runtime,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for signals and the log follower")?;
        let (interrupt, terminate) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                ))
            })
            .context("catching SIGINT and SIGTERM")?;
        Ok(Signals {
            rt,
            interrupt,
            terminate,
        })
    }

    /// Whether a signal arrived already.
    fn pending(&mut self) -> bool {
        let Signals {
            rt,
            interrupt,
            terminate,
        } = self;
        rt.block_on(async {
            tokio::select! {
                biased;
                _ = interrupt.recv() => true,
                _ = terminate.recv() => true,
                () = tokio::time::sleep(Duration::from_millis(1)) => false,
            }
        })
    }
}

/// Prints what happens until Ctrl-C or SIGTERM (or until every controller replica died).
fn follow(state: &ClusterState, signals: &mut Signals) -> anyhow::Result<()> {
    let mut tail = Tail::of_cluster(state);
    let mut pretty = Pretty::default();
    let controllers: Vec<i32> = state
        .controller_procs()
        .iter()
        .map(|(_, p)| p.pid)
        .collect();
    let Signals {
        rt,
        interrupt,
        terminate,
    } = signals;
    rt.block_on(async {
        loop {
            for (source, line) in tail.poll() {
                if let Some(out) = pretty.format(&source, &line) {
                    println!("{out}");
                }
            }
            if !controllers.is_empty()
                && controllers
                    .iter()
                    .all(|pid| !ambitctl::local::procs::alive(*pid))
            {
                bail!(
                    "the controller exited; see {}/logs/controller*.log",
                    state.state_dir.display()
                );
            }
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    })
}
