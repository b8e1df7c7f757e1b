//! Reading the Prometheus / OpenMetrics text exposition the proxies serve: just enough to
//! take samples (`name{labels} value`) out of it. Comments, types and timestamps are
//! skipped; a malformed line is skipped too, since one bad series must not hide the rest.

use std::collections::BTreeMap;

/// The most samples taken from one exposition: a proxy's is a few hundred lines, and a
/// controller scraping many proxies must not be made to hold an unbounded amount.
pub const MAX_SAMPLES: usize = 50_000;

/// One sample of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name as written (`istio_tcp_connections_opened_total`, `..._bucket`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, or `""`.
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// Every well-formed sample of `text`, at most [`MAX_SAMPLES`].
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .take(MAX_SAMPLES)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Labels up to the closing `}`; returns them and what follows.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_escapes_and_special_values() {
        let text = "# HELP x y\n# TYPE istio_tcp_connections_opened counter\n\
            istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"a\\\"b\\\\c\\nd\"} 12\n\
            ambit_xds_connection_state 1\n\
            h_bucket{le=\"+Inf\"} 3\n\
            h_bucket{le=\"0.5\"} 1.5 1700000000\n\
            bad{unterminated=\"x} 1\n\
            novalue{a=\"b\"}\n\
            # EOF\n";
        let got = parse(text);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].name, "istio_tcp_connections_opened_total");
        assert_eq!(got[0].label("reporter"), "source");
        assert_eq!(got[0].label("source_workload"), "a\"b\\c\nd");
        assert_eq!(got[0].value, 12.0);
        assert_eq!(
            (got[1].name.as_str(), got[1].value),
            ("ambit_xds_connection_state", 1.0)
        );
        assert_eq!(got[2].label("le"), "+Inf");
        assert_eq!(got[3].value, 1.5);
        assert_eq!(got[0].label("missing"), "");
    }
}
