//! What `explain` reports: one [`Step`] per proxy on the way, the policy evaluation of a
//! step with the fields that decided ([`PolicyStep`]), and the whole [`Explanation`]. Plain
//! serialisable values: `-o json` prints them as they are, the text form reads them.

use std::net::{IpAddr, SocketAddr};

use ambit_policy::{Check, RuleRef, Trace};
use serde::Serialize;
use serde_json::Value;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The step lets the connection on.
    Pass,
    /// The connection (or request) is allowed end to end.
    Allowed,
    /// A policy refused it.
    Denied,
    /// A proxy refused it for another reason (unknown destination, no endpoint, a loop).
    Refused,
    /// It leaves the mesh as plain TCP.
    Passthrough,
    /// What happens cannot be told from the state (say, a pod whose capture failed).
    Unknown,
}

/// The policy evaluation of one step.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStep {
    /// The reason the proxy logs.
    pub reason: String,
    pub allowed: bool,
    /// The rule that decided; `None` when no ALLOW policy applies (allowed) or none of
    /// those that apply matched (denied).
    pub decided_by: Option<RuleRef>,
    /// The fields of the deciding rule that matched; when no rule decided, the fields that
    /// did not match in each rule of the ALLOW policies (denied) or of the DENY policies
    /// (allowed).
    pub fields: Vec<Field>,
    /// Everything the evaluation looked at.
    pub trace: Trace,
}

/// A field check, with the rule it belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct Field {
    pub policy: String,
    pub rule: usize,
    #[serde(flatten)]
    pub check: Check,
}

impl PolicyStep {
    /// The step of an evaluation that gave `reason`, recorded in `trace`.
    pub fn new(reason: String, trace: Trace) -> Self {
        let mut fields = Vec::new();
        if let (Some(by), Some(rule)) = (&trace.decided_by, trace.deciding_rule()) {
            fields.extend(rule.deciding().map(|c| Field {
                policy: by.policy.clone(),
                rule: by.rule,
                check: c.clone(),
            }));
        } else {
            // Denied: why no ALLOW rule matched. Allowed: why no DENY rule did.
            let action = if trace.allowed {
                ambit_policy::Action::Deny
            } else {
                ambit_policy::Action::Allow
            };
            for p in trace.policies.iter().filter(|p| p.action == action) {
                for r in &p.rules {
                    if r.unknowable {
                        fields.push(Field {
                            policy: p.policy.clone(),
                            rule: r.rule,
                            check: Check {
                                field: "(rule)".into(),
                                clause: String::new(),
                                seen: "names what cannot be known here".into(),
                                matched: false,
                            },
                        });
                    }
                    fields.extend(r.deciding().map(|c| Field {
                        policy: p.policy.clone(),
                        rule: r.rule,
                        check: c.clone(),
                    }));
                }
            }
        }
        PolicyStep {
            reason,
            allowed: trace.allowed,
            decided_by: trace.decided_by.clone(),
            fields,
            trace,
        }
    }
}

/// One proxy's part.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `capture`, `outbound`, `waypoint`, `inbound`.
    pub step: &'static str,
    /// `ztunnel on node1`, `waypoint shop/waypoint`.
    pub proxy: String,
    pub outcome: Outcome,
    /// What it decides, in one sentence.
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyStep>,
    /// The route rule that matched (`namespace/name` and its index among the service's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// For each route rule of the service, whether each of its matches took the request,
    /// or the first condition that did not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route_matches: Vec<String>,
}

/// The source as the mesh knows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceInfo {
    pub pod: String,
    pub node: String,
    pub ip: IpAddr,
    pub identity: String,
    /// Found by its service account rather than named.
    pub by_service_account: bool,
}

/// Access-log events of one proxy that mention the source.
#[derive(Debug, Clone, Serialize)]
pub struct LogEvents {
    pub proxy: String,
    pub events: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole explanation.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub source: SourceInfo,
    /// The destination address the source connects to.
    pub destination: SocketAddr,
    /// What the destination names (`service shop/api`, `pod shop/api-0`, `unknown`).
    pub destination_kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    pub steps: Vec<Step>,
    /// The last step's outcome: what the connection meets.
    pub outcome: Outcome,
    /// The step that decided it.
    pub decided_at: String,
    /// The reason the deciding proxy gives.
    pub reason: String,
    pub access_log: Vec<LogEvents>,
}

pub fn step(step: &'static str, proxy: String, outcome: Outcome, summary: String) -> Step {
    Step {
        step,
        proxy,
        outcome,
        summary,
        status: None,
        policy: None,
        route: None,
        route_matches: Vec::new(),
    }
}
