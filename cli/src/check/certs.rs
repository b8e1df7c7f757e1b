//! The rule every certificate check applies: a certificate is healthy while more than a
//! quarter of its lifetime is left. Proxies renew at half-life, so a certificate past three
//! quarters of its life means renewal has been failing for a quarter of a lifetime (six hours
//! with the default 24 h), long enough to act on and early enough to act before it expires.
//! [`certificate`] applies it to an entry of ztunnel's admin `/certs`.

use std::time::Duration;

use serde_json::Value;

use super::report::Check;

/// How much of a certificate's life is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// More than a quarter of the lifetime left.
    Fresh,
    /// A quarter or less left: renewal is failing.
    Expiring,
    /// Past its not-after.
    Expired,
}

/// The health of a certificate valid for `lifetime` with `left` to go.
pub fn health(left: Duration, lifetime: Duration) -> Health {
    if left.is_zero() {
        Health::Expired
    } else if left.saturating_mul(4) > lifetime {
        Health::Fresh
    } else {
        Health::Expiring
    }
}

/// `1d02h`, `5h07m`, `42s`: short enough for a table cell.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn rfc3339(v: &Value) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
}

/// One entry of ztunnel's admin `/certs` on `node` against the quarter-of-lifetime rule (the
/// local mesh and a cluster read the same endpoint).
pub fn certificate(node: &str, c: &Value) -> Check {
    let identity = c["identity"].as_str().unwrap_or("?");
    let name = format!("certificate {identity} on {node}");
    let fix_ca = "ztunnel renews at half-life, so renewal is failing: check the controller (its CA) and the ztunnel's log";
    let last_error = c["last_error"]
        .as_str()
        .map(|e| format!("; last renewal error: {e}"))
        .unwrap_or_default();
    let (Some(nb), Some(na), Some(left)) = (
        rfc3339(&c["not_before"]),
        rfc3339(&c["not_after"]),
        c["expires_in_seconds"].as_u64(),
    ) else {
        return Check::fail(
            name,
            format!(
                "no certificate yet (state {}){last_error}",
                c["state"].as_str().unwrap_or("?")
            ),
            fix_ca,
        );
    };
    let lifetime = Duration::try_from(na - nb).unwrap_or_default();
    let left = Duration::from_secs(left);
    let detail = format!(
        "expires in {} of a {} lifetime{last_error}",
        human(left),
        human(lifetime)
    );
    match health(left, lifetime) {
        Health::Fresh => Check::ok(name, detail),
        Health::Expiring => {
            Check::fail(name, format!("{detail}: less than a quarter left"), fix_ca)
        }
        Health::Expired => Check::fail(name, format!("expired{last_error}"), fix_ca),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_quarter_of_the_lifetime_is_the_line() {
        let h = |left_s: u64, life_s: u64| {
            health(Duration::from_secs(left_s), Duration::from_secs(life_s))
        };
        let day = 86_400;
        assert_eq!(h(day, day), Health::Fresh);
        assert_eq!(h(day / 2, day), Health::Fresh, "at rotation time");
        assert_eq!(h(day / 4 + 1, day), Health::Fresh);
        assert_eq!(h(day / 4, day), Health::Expiring);
        assert_eq!(h(1, day), Health::Expiring);
        assert_eq!(h(0, day), Health::Expired);
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(3599)), "59m59s");
        assert_eq!(human(Duration::from_secs(6 * 3600 + 7 * 60)), "6h07m");
        assert_eq!(human(Duration::from_secs(26 * 3600)), "1d02h");
    }

    #[test]
    fn certificates_are_judged_on_the_quarter_rule() {
        let entry = |left: u64| {
            json!({
                "identity": "spiffe://cluster.local/ns/demo/sa/echo", "state": "ready",
                "not_before": "2030-01-01T00:00:00Z", "not_after": "2030-01-02T00:00:00Z",
                "expires_in_seconds": left,
            })
        };
        let fresh = certificate("node1", &entry(20 * 3600));
        assert_eq!(
            fresh.outcome,
            crate::check::report::Outcome::Ok,
            "{fresh:?}"
        );
        assert_eq!(fresh.detail, "expires in 20h00m of a 1d00h lifetime");
        let old = certificate("node1", &entry(5 * 3600));
        assert_eq!(old.outcome, crate::check::report::Outcome::Fail);
        assert!(old
            .name
            .contains("spiffe://cluster.local/ns/demo/sa/echo on node1"));
        assert!(old
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("renewal is failing"));
        let pending = certificate(
            "node2",
            &json!({"identity": "spiffe://x/ns/a/sa/b", "state": "pending", "last_error": "CA unreachable"}),
        );
        assert_eq!(pending.outcome, crate::check::report::Outcome::Fail);
        assert!(pending.detail.contains("CA unreachable"), "{pending:?}");
    }
}
