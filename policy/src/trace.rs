//! What an evaluation looked at, step by step: which policies, which of their rules, which
//! fields of each rule, the value the request had and whether it matched. The evaluation
//! itself reports to an [`Observer`] as it goes (`eval::evaluate_observed`), so a
//! [`Trace`] is never a second opinion: it is the decision's own record. Proxies observe
//! nothing ([`Unobserved`], which compiles away); `ambitctl explain` records.

use serde::Serialize;

use crate::model::{Action, Policy};

/// A policy and the index of its rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// `namespace/name`.
    pub policy: String,
    pub rule: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (rule {})", self.policy, self.rule)
    }
}

/// Where in a rule a field was checked, as operators write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clause<'a> {
    /// `from[i].source`.
    From(usize),
    /// `to[i].operation`.
    To(usize),
    /// `when[i]`, with the condition's key.
    When(usize, &'a str),
}

impl std::fmt::Display for Clause<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Clause::From(i) => write!(f, "from[{i}].source"),
            Clause::To(i) => write!(f, "to[{i}].operation"),
            Clause::When(i, key) => write!(f, "when[{i}]({key})"),
        }
    }
}

/// Receives each step of an evaluation, in order. Every method has an empty default.
pub trait Observer {
    /// A policy is looked at (its rules follow).
    fn policy(&mut self, _policy: &Policy) {}
    /// Rule `index` of the current policy is tried; `unknowable`: it is an ALLOW rule naming
    /// something that cannot be known here, so it is skipped without checking a field.
    fn rule(&mut self, _index: usize, _unknowable: bool) {}
    /// One field of the current rule was checked: `field` is its name as written
    /// (`principals`, `notPorts`, `values`), `seen` gives the value the request had.
    fn check(
        &mut self,
        _clause: Clause<'_>,
        _field: &str,
        _seen: &dyn Fn() -> String,
        _matched: bool,
    ) {
    }
    /// The current rule matched or not.
    fn rule_done(&mut self, _matched: bool) {}
    /// The verdict: allowed or not, and the rule that decided (none when no ALLOW policy
    /// applies, or when ALLOW policies apply and none matched).
    fn decided(&mut self, _allowed: bool, _by: Option<&RuleRef>) {}
}

/// Observes nothing: what the proxies evaluate with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl Observer for Unobserved {}

/// One field check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `from[0].source.principals`, `to[0].operation.methods`, `when[1](source.ip).values`.
    pub field: String,
    /// The clause it belongs to: `from[0].source`, `to[0].operation`, `when[1](source.ip)`.
    pub clause: String,
    /// The value the request had (`cluster.local/ns/a/sa/b`, `DELETE`, `10.0.0.1`).
    pub seen: String,
    pub matched: bool,
}

/// One rule tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleTrace {
    pub rule: usize,
    pub matched: bool,
    /// An ALLOW rule naming what cannot be known here (HTTP fields at L4, JWT claims):
    /// it never matches, and no field was checked.
    pub unknowable: bool,
    /// The fields checked, in order. A clause stops at its first mismatch, so in a rule
    /// that did not match, the mismatches are the fields that decided.
    pub checks: Vec<Check>,
}

impl RuleTrace {
    /// The checks that decided the rule: for a match, those of the clauses that matched
    /// (a `from` alternative that failed before another matched is left out); otherwise
    /// those that did not match.
    pub fn deciding(&self) -> impl Iterator<Item = &Check> {
        let failed = |clause: &str| self.checks.iter().any(|c| c.clause == clause && !c.matched);
        self.checks.iter().filter(move |c| {
            if self.matched {
                !failed(&c.clause)
            } else {
                !c.matched
            }
        })
    }
}

/// One policy looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyTrace {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    /// The rules tried, in order; evaluation stops at the first that matches.
    pub rules: Vec<RuleTrace>,
}

/// Everything an evaluation looked at, in order. A policy is absent when evaluation did
/// not need it (a DENY after another DENY matched).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub policies: Vec<PolicyTrace>,
    /// An evaluation ran to its verdict (a decision may refuse before policy runs).
    pub evaluated: bool,
    /// The verdict.
    pub allowed: bool,
    /// The rule that decided; `None` when no ALLOW policy applies (allowed) or none of
    /// those that apply matched (denied).
    pub decided_by: Option<RuleRef>,
}

impl Trace {
    /// The trace of `policy` (`namespace/name`).
    pub fn policy(&self, policy: &str) -> Option<&PolicyTrace> {
        self.policies.iter().find(|p| p.policy == policy)
    }

    /// The trace of the rule that decided, if a rule did.
    pub fn deciding_rule(&self) -> Option<&RuleTrace> {
        let by = self.decided_by.as_ref()?;
        self.policy(&by.policy)?
            .rules
            .iter()
            .find(|r| r.rule == by.rule)
    }

    fn current_rule(&mut self) -> Option<&mut RuleTrace> {
        self.policies.last_mut().and_then(|p| p.rules.last_mut())
    }
}

impl Observer for Trace {
    fn policy(&mut self, policy: &Policy) {
        self.policies.push(PolicyTrace {
            policy: policy.key(),
            action: policy.action,
            rules: Vec::new(),
        });
    }

    fn rule(&mut self, index: usize, unknowable: bool) {
        if let Some(p) = self.policies.last_mut() {
            p.rules.push(RuleTrace {
                rule: index,
                matched: false,
                unknowable,
                checks: Vec::new(),
            });
        }
    }

    fn check(&mut self, clause: Clause<'_>, field: &str, seen: &dyn Fn() -> String, matched: bool) {
        if let Some(r) = self.current_rule() {
            let clause = clause.to_string();
            r.checks.push(Check {
                field: format!("{clause}.{field}"),
                clause,
                seen: seen(),
                matched,
            });
        }
    }

    fn rule_done(&mut self, matched: bool) {
        if let Some(r) = self.current_rule() {
            r.matched = matched;
        }
    }

    fn decided(&mut self, allowed: bool, by: Option<&RuleRef>) {
        self.evaluated = true;
        self.allowed = allowed;
        self.decided_by = by.cloned();
    }
}
