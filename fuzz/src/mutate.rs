//! Mutations of valid seeds: the inputs that reach past a parser's first checks are the
//! ones that are almost right.
//!
//! A mutated input is a seed plus a short list of edits. Proptest shrinks the list (fewer
//! edits, smaller ones), so a failure comes back as "seed N with these two edits".

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of a byte string. Positions are [`Index`]es, scaled to the length at the time
/// the edit applies.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Flip one bit.
    Flip(Index, u8),
    /// Overwrite one byte with a value near an edge.
    Set(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Insert a word of the target's dictionary (tokens of its grammar).
    Word(Index, Index),
    /// Remove up to this many bytes.
    Delete(Index, usize),
    /// Copy a range to another place (repeats structure: nesting, lists).
    Repeat(Index, usize, Index),
    /// Cut the input here.
    Truncate(Index),
    /// Replace the tail with the tail of another seed.
    Splice(Index, Index, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let edge = prop_oneof![
        Just(0u8),
        Just(0xff),
        Just(0x7f),
        Just(0x80),
        Just(1),
        any::<u8>()
    ];
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        1 => (any::<Index>(), edge).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| Edit::Word(i, w)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), 1usize..64, any::<Index>()).prop_map(|(i, n, j)| Edit::Repeat(i, n, j)),
        1 => (any::<Index>()).prop_map(Edit::Truncate),
        1 => (any::<Index>(), any::<Index>(), any::<Index>()).prop_map(|(i, s, j)| Edit::Splice(i, s, j)),
    ]
}

/// Applies `edits` to `input`; `dict` and `seeds` feed [`Edit::Word`] and [`Edit::Splice`].
pub fn apply(input: &mut Vec<u8>, edits: &[Edit], dict: &[&[u8]], seeds: &[Vec<u8>]) {
    // `Index::index(n)` needs n > 0; positions in an empty input are 0, which also makes
    // every insertion land at the end (len + 1 slots).
    let at = |i: &Index, len: usize| i.index(len + 1);
    for e in edits {
        let len = input.len();
        match e {
            Edit::Flip(i, bit) if len > 0 => input[i.index(len)] ^= 1 << bit,
            Edit::Set(i, b) if len > 0 => input[i.index(len)] = *b,
            Edit::Insert(i, bytes) => {
                let p = at(i, len);
                input.splice(p..p, bytes.iter().copied());
            }
            Edit::Word(i, w) if !dict.is_empty() => {
                let p = at(i, len);
                input.splice(p..p, dict[w.index(dict.len())].iter().copied());
            }
            Edit::Delete(i, n) if len > 0 => {
                let p = i.index(len);
                let end = (p + n).min(len);
                input.drain(p..end);
            }
            Edit::Repeat(i, n, j) if len > 0 => {
                let p = i.index(len);
                let end = (p + n).min(len);
                let chunk: Vec<u8> = input[p..end].to_vec();
                let q = at(j, len);
                input.splice(q..q, chunk);
            }
            Edit::Truncate(i) => input.truncate(at(i, len)),
            Edit::Splice(i, s, j) if !seeds.is_empty() => {
                let other = &seeds[s.index(seeds.len())];
                let p = at(i, len);
                let q = at(j, other.len());
                input.truncate(p);
                input.extend_from_slice(&other[q..]);
            }
            _ => {}
        }
    }
}

/// One of `seeds`, unchanged or with up to `max_edits` edits.
pub fn mutated(
    seeds: Vec<Vec<u8>>,
    dict: &'static [&'static [u8]],
    max_edits: usize,
) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty(), "mutations need at least one seed");
    let n = seeds.len();
    (0..n, prop::collection::vec(edit(), 0..=max_edits)).prop_map(move |(s, edits)| {
        let mut input = seeds[s].clone();
        apply(&mut input, &edits, dict, &seeds);
        input
    })
}

/// Words that matter to YAML's grammar (and JSON's), for [`mutated`] text.
pub const YAML_WORDS: &[&[u8]] = &[
    b"[",
    b"]",
    b"{",
    b"}",
    b", ",
    b": ",
    b":",
    b"- ",
    b"? ",
    b"\n",
    b"\n  ",
    b"\n- ",
    b"  ",
    b"\t",
    b"#",
    b" # c",
    b"\"",
    b"'",
    b"|\n",
    b">-\n",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!str ",
    b"!!binary ",
    b"!t ",
    b"---\n",
    b"...\n",
    b"%YAML 1.2\n",
    b"~",
    b"null",
    b"true",
    b"0",
    b"-1",
    b"65535",
    b"65536",
    b"4294967296",
    b"1e999",
    b".nan",
    b"0x1F",
    b"0o17",
    b"1_000",
    b"\\u0000",
    b"\xc3\xa9",
    b"\xef\xbb\xbf",
    b"10.0.0.1",
    b"::1",
    b"fd00::1",
    b"10.0.0.0/8",
    b"10.0.0.1/33",
    b"::/0",
    b"*",
    b"spiffe://",
    b"cluster.local/ns/a/sa/b",
];
