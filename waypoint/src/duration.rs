//! Go-style durations (`"10s"`, `"250ms"`, `"1m30s"`, `"1.5s"`) as Gateway API and Istio
//! write them.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a sequence of `<number><unit>` with units h, m, s, ms, us, ns.
    #[error("invalid duration {0:?}: expected e.g. \"10s\", \"250ms\", \"1m30s\"")]
    Invalid(String),
}

/// Parses a Go-style duration.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(s.to_string());
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().map_err(|_| invalid())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(invalid());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let cases = [
            ("10s", Some(10_000)),
            ("250ms", Some(250)),
            ("1m30s", Some(90_000)),
            ("1.5s", Some(1_500)),
            ("0", Some(0)),
            ("", None),
            ("10", None),
            ("5x", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).ok().map(|d| d.as_millis() as u64), want, "{s}");
        }
    }
}
