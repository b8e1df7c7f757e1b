//! ztunnel's DNS proxy decision (`ambit_ztunnel::dns::decision`): what a pod's query gets
//! (`decide`), the REFUSED of a rate-limited one (`refuse`), and the check of an upstream's
//! answer before it is relayed (`relay`). All three read bytes an enrolled pod (or its
//! resolver) chose.
//!
//! Inputs: queries for the mesh's names in every form a pod asks them (and other names and
//! types, with EDNS or not) mutated with DNS's own tokens (labels, compression pointers,
//! counts, types); upstream answers built for those queries, mutated the same way.
//!
//! Properties: nothing panics; nothing is answered unless the input has a 12-byte query
//! header; every reply parses as a response carrying the query's ID; records in an answer
//! are the state's VIPs; a relayed answer is a response with the forwarded query's ID.

use std::sync::Arc;

use ambit_proto::discovery as pb;
use ambit_ztunnel::dns::decision::{decide, refuse, relay, Asker, Decision, Outcome};
use ambit_ztunnel::state::{State, Store};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use proptest::prelude::*;

use crate::mutate;

const VIPS: [[u8; 4]; 2] = [[10, 96, 0, 10], [10, 96, 1, 10]];

fn state() -> Arc<State> {
    static STATE: std::sync::OnceLock<Arc<State>> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            let service = |ns: &str, name: &str, vip: [u8; 4]| pb::Resource {
                kind: Some(pb::resource::Kind::Service(pb::Service {
                    name: name.into(),
                    namespace: ns.into(),
                    hostname: format!("{name}.{ns}.svc.cluster.local"),
                    vips: vec![
                        vip.to_vec(),
                        vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    ],
                    ..Default::default()
                })),
            };
            let mut store = Store::new(None);
            store
                .apply(pb::Push {
                    nonce: "n1".into(),
                    full_state: true,
                    version: 1,
                    upserts: vec![
                        service("demo", "echo", VIPS[0]),
                        service("other", "db", VIPS[1]),
                    ],
                    removals: vec![],
                    trust_roots: vec![],
                })
                .unwrap_or_else(|e| panic!("fixture state: {e}"));
            store.snapshot()
        })
        .clone()
}

fn asker() -> Asker {
    Asker {
        namespace: Arc::from("demo"),
        cluster_domain: Arc::from("cluster.local"),
    }
}

fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x0a0b;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).unwrap_or_else(|e| panic!("{name}: {e}")),
        rtype,
    ));
    if edns {
        m.set_edns(Edns::new());
    }
    m.to_vec().unwrap_or_else(|e| panic!("encode: {e}"))
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for name in [
        "echo.demo.svc.cluster.local.",
        "echo.demo.",
        "echo.",
        "db.other.svc.",
        "example.com.",
        ".",
    ] {
        for (rtype, edns) in [
            (RecordType::A, false),
            (RecordType::AAAA, true),
            (RecordType::SRV, false),
        ] {
            out.push(query(name, rtype, edns));
        }
    }
    out
}

/// Tokens of DNS's wire format: labels of the mesh's names, compression pointers, counts,
/// types and classes.
const DNS_WORDS: &[&[u8]] = &[
    b"\x04echo",
    b"\x04demo",
    b"\x03svc",
    b"\x07cluster\x05local\x00",
    b"\x00",
    b"\xc0\x0c",
    b"\xc0\x00",
    b"\xc0",
    b"\x3f",
    b"\x40",
    b"\x00\x01\x00\x01",
    b"\x00\x1c\x00\x01",
    b"\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
    b"\x00\x02",
    b"\xff\xff",
    b"\x80",
];

fn check(input: Vec<u8>) -> Result<(), TestCaseError> {
    let state = state();
    let decision = decide(&state, &asker(), &input);
    let header_query = input.len() >= 12 && input[2] & 0x80 == 0;
    match &decision {
        Decision::Drop => prop_assert!(!header_query || input.len() < 12),
        Decision::Reply { message, outcome } => {
            prop_assert!(header_query, "answered a non-query: {input:?}");
            let m = Message::from_vec(message)
                .map_err(|e| TestCaseError::fail(format!("our reply does not parse: {e}")))?;
            prop_assert_eq!(m.metadata.message_type, MessageType::Response);
            prop_assert_eq!(m.metadata.id, u16::from_be_bytes([input[0], input[1]]));
            for r in &m.answers {
                match &r.data {
                    RData::A(a) => prop_assert!(VIPS.contains(&a.0.octets())),
                    RData::AAAA(a) => prop_assert_eq!(a.0.octets()[0], 0xfd),
                    other => prop_assert!(false, "answered with {other:?}"),
                }
            }
            if *outcome == Outcome::Answered {
                prop_assert!(!m.answers.is_empty());
            }
        }
        Decision::Forward(f) => {
            prop_assert!(header_query);
            // Any bytes may come back; a relayed one is a response to this query.
            for answer in upstream_answers(f, &input) {
                if let Ok(relayed) = relay(f, &answer) {
                    let m = Message::from_vec(&relayed)
                        .map_err(|e| TestCaseError::fail(format!("relayed junk: {e}")))?;
                    prop_assert_eq!(m.metadata.id, f.id);
                    prop_assert_eq!(m.metadata.message_type, MessageType::Response);
                }
            }
        }
    }
    if let Some(refused) = refuse(&input) {
        let m = Message::from_vec(&refused)
            .map_err(|e| TestCaseError::fail(format!("REFUSED does not parse: {e}")))?;
        prop_assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }
    Ok(())
}

/// Answers an upstream could give `f`: a proper one (NXDOMAIN), and the input itself
/// (mutated bytes standing in for a hostile or broken upstream).
fn upstream_answers(f: &ambit_ztunnel::dns::decision::Forward, input: &[u8]) -> Vec<Vec<u8>> {
    let mut m = Message::response(f.id, hickory_proto::op::OpCode::Query);
    m.metadata.response_code = ResponseCode::NXDomain;
    m.add_query(f.question.clone());
    let mut out = vec![input.to_vec()];
    if let Ok(bytes) = m.to_vec() {
        out.push(bytes);
    }
    out
}

#[test]
fn dns_decision() {
    let inputs = prop_oneof![
        4 => mutate::mutated(seeds(), DNS_WORDS, 6),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ];
    crate::fuzz("dns", 3000, inputs, check);
}
