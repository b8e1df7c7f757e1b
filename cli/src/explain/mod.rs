//! `ambitctl explain SOURCE DESTINATION`: why a connection (or, with `--method`, an HTTP
//! request) is allowed or denied. It reads the proxies' live snapshots ([`source`]), names
//! the source and destination in them ([`resolve`]), and runs the proxies' own decision
//! functions on them ([`walk`]): capture, the source ztunnel's outbound decision, the
//! waypoint's L7 policy and route, the destination ztunnel's L4 policy. Each step
//! ([`report`]) names the policy and rule that decided and the fields that did or did not
//! match, as recorded by the policy engine's own evaluation; the last access-log events of
//! the proxies on the way follow. Text by default, `-o json` for scripts. `--kubernetes`
//! reads a cluster's proxies instead of the local mesh's, through the API server.

mod report;
mod resolve;
mod source;
mod walk;

use std::path::PathBuf;

use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::Context;

use crate::status::Output;
use report::{Explanation, Outcome, Step};
use source::{KubeMesh, LocalMesh, MeshSource};
use walk::Query;

/// Options of `ambitctl explain`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source: a pod (`name` or `namespace/name`), or a service account
    /// (`namespace/sa`, explained from one of its pods).
    source: String,
    /// The destination: a service (`name.namespace`, its full hostname, or
    /// `namespace/name`), a pod (`namespace/name`) or an address; `:port` optional.
    destination: String,
    /// The destination port, when DESTINATION does not carry one.
    #[arg(long)]
    port: Option<u16>,
    /// Explain an HTTP request with this method (at the waypoint); without it, a TCP
    /// connection.
    #[arg(long)]
    method: Option<String>,
    /// The request path (with --method).
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header `name=value` (with --method; repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// `table` (text) or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    output: Output,
    #[command(flatten)]
    cluster: crate::cluster::ClusterArgs,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?}: write a header as name=value"))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mesh: Box<dyn MeshSource> = if args.cluster.kubernetes {
        Box::new(KubeMesh::connect(
            args.cluster.kubeconfig.as_deref(),
            &args.cluster.namespace,
        )?)
    } else {
        let state = ClusterState::load(&args.state_dir).context("ambitctl explain")?;
        Box::new(LocalMesh { state })
    };
    let query = Query {
        source: args.source.clone(),
        destination: args.destination.clone(),
        port: args.port,
        method: args.method.clone(),
        path: args.path.clone(),
        headers: args.headers.clone(),
    };
    let e = walk::explain(mesh.as_ref(), &query)?;
    if matches!(args.output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", text(&e));
    }
    Ok(())
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Allowed => "ALLOWED",
        Outcome::Denied => "DENIED",
        Outcome::Refused => "REFUSED",
        Outcome::Passthrough => "PASSTHROUGH",
        Outcome::Unknown => "UNKNOWN",
    }
}

/// The explanation as an operator reads it.
fn text(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = &e.source;
    let _ = writeln!(
        o,
        "{} ({}, {}, {}){} -> {} ({}){}\n",
        s.pod,
        s.ip,
        s.node,
        s.identity,
        if s.by_service_account {
            " [by its service account]"
        } else {
            ""
        },
        e.destination,
        e.destination_kind,
        e.request
            .as_ref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    );
    for (i, st) in e.steps.iter().enumerate() {
        step_text(&mut o, i + 1, st);
    }
    let _ = writeln!(
        o,
        "\n{} at {}: {}",
        outcome_word(e.outcome),
        e.decided_at,
        e.reason
    );
    for log in &e.access_log {
        let _ = writeln!(
            o,
            "\nlast access-log events of {} for this source:",
            log.proxy
        );
        if let Some(err) = &log.error {
            let _ = writeln!(o, "  (unreadable: {err})");
        } else if log.events.is_empty() {
            let _ = writeln!(o, "  (none)");
        }
        for ev in &log.events {
            let _ = writeln!(o, "  {}", event_text(ev));
        }
    }
    o
}

fn step_text(o: &mut String, n: usize, st: &Step) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "{n}. {:<8} {:<24} {:<11} {}",
        st.step,
        st.proxy,
        outcome_word(st.outcome),
        st.summary
    );
    if let Some(route) = &st.route {
        let _ = writeln!(o, "   route: {route}");
    }
    for m in &st.route_matches {
        let _ = writeln!(o, "     {m}");
    }
    let Some(p) = &st.policy else {
        return;
    };
    match (&p.decided_by, p.allowed) {
        (Some(by), _) => {
            let action = p
                .trace
                .policy(&by.policy)
                .map(|t| format!("{:?}", t.action).to_uppercase())
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "   policy {} ({action}) rule {} matched:",
                by.policy, by.rule
            );
        }
        (None, true) if p.trace.policies.is_empty() => {
            let _ = writeln!(o, "   no policy applies");
        }
        (None, true) => {
            let _ = writeln!(o, "   no DENY rule matched and no ALLOW policy applies:");
        }
        (None, false) => {
            let _ = writeln!(o, "   no ALLOW policy matched:");
        }
    }
    for f in &p.fields {
        let _ = writeln!(
            o,
            "     {} rule {}: {} {} (request had {:?})",
            f.policy,
            f.rule,
            f.check.field,
            if f.check.matched {
                "matched"
            } else {
                "did not match"
            },
            f.check.seen
        );
    }
}

/// One access-log event on a line: the fields that say what happened.
fn event_text(ev: &serde_json::Value) -> String {
    let keys = [
        "timestamp",
        "direction",
        "src.addr",
        "dst.addr",
        "dst.service",
        "method",
        "path",
        "status",
        "flags",
        "outcome",
        "response_flags",
        "reason",
        "denied_by",
        "message",
    ];
    keys.iter()
        .filter_map(|k| match &ev[*k] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) if s.is_empty() || s == "-" => None,
            serde_json::Value::String(s) => Some(format!("{k}={s}")),
            v => Some(format!("{k}={v}")),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
