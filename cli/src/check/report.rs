//! What a check found: its outcome, what was seen and what to do, as every target
//! ([`super::pre`], [`super::local`], [`super::kube`]) reports it and `ambitctl check` prints it.

use serde::Serialize;

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// As it should be.
    Ok,
    /// Works, but something is missing or about to go wrong; does not fail the command.
    Warn,
    /// Broken: the mesh (or an install on this node) will not work until it is fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, naming the object (`ztunnel on node2`, `CRD trafficpolicies...`).
    pub name: String,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do, for a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            outcome: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            name: name.into(),
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            outcome: Outcome::Warn,
            ..Check::fail(name, detail, fix)
        }
    }
}

/// A titled list of checks, as printed.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was checked (`node X, kernel Y`, `local mesh in DIR`, `cluster at URL`).
    pub target: String,
    pub checks: Vec<Check>,
}

impl Report {
    /// How many checks failed.
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .count()
    }
}
