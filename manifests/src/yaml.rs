//! A small YAML writer for JSON values, safe for YAML 1.1 readers.
//!
//! Why not `serde_yaml`: it writes YAML 1.2, where `yes`, `on`, `no` and `y` are plain strings, and
//! leaves them unquoted. kubectl reads manifests with a YAML 1.1 parser, where they are booleans:
//! a trust domain `yes` or a namespace `no` (both valid names) would reach the API server as `true`
//! and `false`. So every string is written plain only when it is unambiguous to both versions
//! (a conservative character set, not a reserved word, not number-like); otherwise it is
//! double-quoted with JSON escapes, which YAML reads identically. The layout (block maps, `- `
//! sequences at their key's indentation) matches what kubectl and serde_yaml print.

use std::fmt::Write;

use serde_json::{Map, Value};

/// Words some YAML version reads as a boolean, null or float (compared case-insensitively).
const RESERVED: &[&str] = &[
    "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~", ".nan", ".inf", "-.inf",
    "+.inf",
];

/// Whether `s` can be written as a plain scalar and read back as the same string by YAML 1.1
/// and 1.2 parsers.
fn is_plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    // Starting with a letter (or `/`, a path) rules out numbers, sexagesimals (`1:20`), timestamps
    // and indicators.
    (first.is_ascii_alphabetic() || first == '/')
        && !s.ends_with(':')
        && !s.ends_with(' ')
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '@' | ' ' | ',' | '(' | ')')
        })
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// Whether a multi-line string can be written as a literal block (`|`) and read back exactly:
/// printable, no carriage returns or tabs, no line with trailing or (first line) leading spaces.
fn is_literal_safe(s: &str) -> bool {
    s.contains('\n')
        && !s.starts_with(' ')
        && !s.starts_with('\n')
        && s.lines().all(|l| !l.ends_with(' '))
        && s.chars()
            .all(|c| c == '\n' || (c.is_ascii_graphic() || c == ' '))
}

/// Writes `s` as a literal block whose lines are indented by `indent`.
fn literal(out: &mut String, s: &str, indent: usize) {
    let body = s.trim_end_matches('\n');
    // Chomping: `|-` strips the final newline, `|` keeps one, `|+` keeps them all.
    out.push_str(match s.len() - body.len() {
        0 => "|-",
        1 => "|",
        _ => "|+",
    });
    for line in body.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            pad(out, indent);
            out.push_str(line);
        }
    }
    for _ in 0..(s.len() - body.len()).saturating_sub(1) {
        out.push('\n');
    }
}

fn scalar(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) if is_plain_safe(s) => out.push_str(s),
        Value::String(s) if is_literal_safe(s) => literal(out, s, indent),
        // A JSON string literal is a valid YAML double-quoted scalar with the same meaning.
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

fn key(out: &mut String, k: &str) {
    // Keys are never block scalars: keep them on one line.
    let k = Value::String(k.to_owned());
    match &k {
        Value::String(s) if is_plain_safe(s) => out.push_str(s),
        _ => out.push_str(&k.to_string()),
    }
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
        _ => false,
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Writes a map's entries at `indent`; the first entry's padding is already written when
/// `first_inline` (a map that starts after a sequence's `- `).
fn map(out: &mut String, m: &Map<String, Value>, indent: usize, first_inline: bool) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !first_inline {
            pad(out, indent);
        }
        key(out, k);
        match v {
            Value::Object(inner) if is_block(v) => {
                out.push_str(":\n");
                map(out, inner, indent + 2, false);
            }
            Value::Array(items) if is_block(v) => {
                out.push_str(":\n");
                seq(out, items, indent);
            }
            _ => {
                out.push_str(": ");
                scalar(out, v, indent + 2);
                out.push('\n');
            }
        }
    }
}

fn seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        pad(out, indent);
        out.push_str("- ");
        match item {
            Value::Object(m) if is_block(item) => map(out, m, indent + 2, true),
            Value::Array(inner) if is_block(item) => {
                out.push('\n');
                seq(out, inner, indent + 2);
            }
            _ => {
                scalar(out, item, indent + 2);
                out.push('\n');
            }
        }
    }
}

/// One YAML document (without the `---` separator) for `value`.
pub(crate) fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if is_block(value) => map(&mut out, m, 0, false),
        Value::Array(items) if is_block(value) => seq(&mut out, items, 0),
        _ => {
            scalar(&mut out, value, 2);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ambiguous_strings_are_quoted() {
        for s in [
            "yes",
            "No",
            "ON",
            "y",
            "true",
            "null",
            "~",
            "1.10",
            "0.1.0",
            "100m",
            "1:20",
            "0777",
            "1e3",
            "",
            " x",
            "a: b",
            "a #b",
            "-x",
            "*x",
            "&x",
            "!x",
            "{x}",
            "x:",
            "2001-12-14",
            "a\nb",
            "x ",
            "a, b #c",
        ] {
            assert!(!is_plain_safe(s), "{s:?}");
            let doc = to_string(&json!({ "k": s }));
            assert!(doc.contains('"') || doc.contains("k: |"), "{s:?} -> {doc}");
            let back: Value = serde_yaml::from_str(&doc).unwrap();
            assert_eq!(back["k"], s);
        }
        for s in [
            "ambit-system",
            "cluster.local",
            "ambit/ztunnel:on",
            "app.kubernetes.io/name",
            "NET_ADMIN",
            "yesterday",
            "none",
            "/var/run/netns",
            "Who the peer is (any), within reason",
        ] {
            assert!(is_plain_safe(s), "{s:?}");
            let back: Value = serde_yaml::from_str(&to_string(&json!({ "k": s }))).unwrap();
            assert_eq!(back["k"], s);
        }
    }

    #[test]
    fn nested_structures_read_back_identically() {
        let v = json!({
            "a": { "b": [1, 2.5, { "c": "d", "e": [] }, ["x", "y"]], "f": {} },
            "g": [{ "h": { "i": null } }, true],
            "pem": "-----BEGIN X-----\nAAA\n-----END X-----\n",
            "list": ["one\ntwo", "x\n\n", "a\n\nb", "  lead\nx", "tab\t\nx", "trail \nx", "\nfirst"],
            "nested": { "deep": { "text": "l1\nl2\n" } },
        });
        let doc = to_string(&v);
        let back: Value = serde_yaml::from_str(&doc).unwrap();
        assert_eq!(back, v, "{doc}");
    }
}
