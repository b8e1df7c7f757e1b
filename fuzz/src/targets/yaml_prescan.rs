//! The controller's nesting pre-scan of the local folder's files
//! (`ambit_controller::source::limits::check_nesting`), against the parser it protects.
//!
//! Inputs: soups of YAML's own tokens (brackets, indicators, quotes, block scalars,
//! comments, document markers, indentation) and the corpus mesh mutated with them.
//!
//! Property: the pre-scan never reports less nesting than serde_yaml builds. If it did, a
//! file could pass the depth limit and still reach the parser deeper than the limit allows.
//! (Aliases are left out: they repeat a collection built elsewhere, which costs the parser
//! no nesting in the text, and serde_yaml bounds their expansion itself.)

use proptest::prelude::*;

use crate::mutate;

const WORDS: &[&[u8]] = &[
    b"[", b"]", b"{", b"}", b", ", b",", b": ", b":", b"- ", b"-", b"? ", b"\n", b"\n ", b"\n  ",
    b"\n- ", b"  ", b" ", b"#", b" #", b"\"", b"'", b"''", b"\\\"", b"|\n", b"|-\n", b">\n",
    b"|2\n", b"!!str ", b"!t ", b"---\n", b"--- ", b"...\n", b"a", b"b", b"x y", b"1", b"~",
];

/// Depth of a parsed value: collections inside collections, keys included.
fn depth(v: &serde_yaml::Value) -> usize {
    use serde_yaml::Value;
    match v {
        Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        Value::Tagged(t) => depth(&t.value),
        _ => 0,
    }
}

fn inputs() -> impl Strategy<Value = String> {
    let soup = prop::collection::vec(prop::sample::select(WORDS), 0..60)
        .prop_map(|w| String::from_utf8_lossy(&w.concat()).into_owned());
    let mesh = mutate::mutated(
        vec![include_bytes!("../../corpus/controller/mesh.yaml").to_vec()],
        WORDS,
        8,
    )
    .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    prop_oneof![3 => soup, 1 => mesh]
}

fn check(text: &str) -> Result<(), TestCaseError> {
    use serde::Deserialize as _;
    let Ok(measured) = ambit_controller::source::limits::check_nesting(text, 10_000) else {
        return Ok(());
    };
    if text.contains('&') {
        return Ok(());
    }
    for doc in serde_yaml::Deserializer::from_str(text) {
        let Ok(value) = serde_yaml::Value::deserialize(doc) else {
            return Ok(());
        };
        let d = depth(&value);
        prop_assert!(
            d <= measured,
            "the pre-scan measured {measured}, the parser built depth {d}"
        );
    }
    Ok(())
}

#[test]
fn yaml_prescan_never_underestimates() {
    crate::fuzz("yaml_prescan", 3000, inputs(), |text| check(&text));
}
