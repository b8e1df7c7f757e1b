//! The rule every certificate check applies: a certificate is healthy while more than a
//! quarter of its lifetime is left. Proxies renew at half-life, so a certificate past three
//! quarters of its life means renewal has been failing for a quarter of a lifetime (six hours
//! with the default 24 h), long enough to act on and early enough to act before it expires.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
