//! The DNS decision against state fixtures: which names are the mesh's, what each query type
//! gets, and what malformed input gets.

use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;
use crate::state::fixtures::*;
use crate::state::Store;

fn state() -> Arc<State> {
    let mut store = Store::new(None);
    let mut dual = service("demo", "dual", "10.96.0.20", 80, 8080, &[]);
    dual.vips
        .push(vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20]);
    let mut headless = service("demo", "headless", "10.96.0.30", 80, 8080, &[]);
    headless.vips.clear();
    store
        .apply(full(
            1,
            vec![
                res_s(service("demo", "echo", "10.96.0.10", 80, 8080, &[])),
                res_s(service("other", "db", "10.96.1.10", 5432, 5432, &[])),
                res_s(dual),
                res_s(headless),
                ambit_proto::discovery::Resource {
                    kind: Some(ambit_proto::discovery::resource::Kind::ExternalService(
                        ambit_proto::discovery::ExternalService {
                            name: "api".into(),
                            namespace: "ext".into(),
                            hosts: vec!["api.example.com".into(), "*.wild.example".into()],
                            ports: vec![ambit_proto::discovery::ExternalPort {
                                number: 443,
                                ..Default::default()
                            }],
                            vips: vec![
                                ambit_proto::discovery::ExternalVip {
                                    host: "api.example.com".into(),
                                    address: vec![240, 240, 1, 2],
                                },
                                ambit_proto::discovery::ExternalVip {
                                    host: "api.example.com".into(),
                                    address: vec![
                                        0xfd, 0, 2, 0x40, 2, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2,
                                    ],
                                },
                            ],
                            ..Default::default()
                        },
                    )),
                },
            ],
        ))
        .expect("fixture state applies");
    store.snapshot()
}

fn asker(ns: &str) -> Asker {
    Asker {
        namespace: Arc::from(ns),
        cluster_domain: Arc::from("cluster.local"),
    }
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn reply(d: Decision) -> (Message, Outcome) {
    match d {
        Decision::Reply { message, outcome } => (Message::from_vec(&message).unwrap(), outcome),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn addresses(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn service_names_answer_with_vips_in_every_form_a_pod_may_ask() {
    let state = state();
    let demo = asker("demo");
    for name in [
        "echo.demo.svc.cluster.local.",
        "ECHO.Demo.svc.cluster.local.",
        "echo.demo.svc.",
        "echo.demo.",
        "echo.",
    ] {
        let (m, outcome) = reply(decide(&state, &demo, &query(name, RecordType::A)));
        assert_eq!(outcome, Outcome::Answered, "{name}");
        assert_eq!(addresses(&m), ["10.96.0.10"], "{name}");
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers[0].ttl, TTL);
        // The answer names the question as asked (case included), so stub resolvers match it.
        assert_eq!(m.answers[0].name.to_ascii(), name);
        assert_eq!(m.queries[0].name().to_ascii(), name);
    }
    // Another namespace's service: by its qualified forms, never by the bare name.
    for name in ["db.other.", "db.other.svc.", "db.other.svc.cluster.local."] {
        let (m, _) = reply(decide(&state, &demo, &query(name, RecordType::A)));
        assert_eq!(addresses(&m), ["10.96.1.10"], "{name}");
    }
    assert!(matches!(
        decide(&state, &demo, &query("db.", RecordType::A)),
        Decision::Forward(Forward {
            mesh_name: false,
            ..
        })
    ));
    let (m, _) = reply(decide(
        &state,
        &asker("other"),
        &query("db.", RecordType::A),
    ));
    assert_eq!(addresses(&m), ["10.96.1.10"]);
}

#[test]
fn families_nodata_and_other_types() {
    let state = state();
    let demo = asker("demo");
    // A v4-only service asked for AAAA: the name exists, it has no such record.
    let (m, outcome) = reply(decide(&state, &demo, &query("echo.", RecordType::AAAA)));
    assert_eq!(outcome, Outcome::NoData);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let (m, _) = reply(decide(&state, &demo, &query("dual.", RecordType::AAAA)));
    assert_eq!(addresses(&m), ["fd00::20"]);
    let (m, _) = reply(decide(&state, &demo, &query("dual.", RecordType::A)));
    assert_eq!(addresses(&m), ["10.96.0.20"]);
    // Other types of a mesh name go to the cluster's DNS, marked as the mesh's.
    match decide(&state, &demo, &query("echo.", RecordType::SRV)) {
        Decision::Forward(f) => {
            assert!(f.mesh_name);
            assert_eq!(f.id, 0x4242);
        }
        other => panic!("{other:?}"),
    }
    // Headless services (no VIP) and unknown names are the upstream's.
    for name in [
        "headless.demo.svc.cluster.local.",
        "example.com.",
        "echo.demo.demo.svc.cluster.local.",
        "echo.demo.svc.cluster.local.example.",
        "a.b.c.d.e.f.",
        ".",
    ] {
        assert!(
            matches!(
                decide(&state, &demo, &query(name, RecordType::A)),
                Decision::Forward(Forward {
                    mesh_name: false,
                    ..
                })
            ),
            "{name}"
        );
    }
}

#[test]
fn edns_is_answered_with_edns() {
    let state = state();
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("echo.").unwrap(),
        RecordType::A,
    ));
    let mut opt = Edns::new();
    opt.set_max_payload(4096);
    m.set_edns(opt);
    let (answer, _) = reply(decide(&state, &asker("demo"), &m.to_vec().unwrap()));
    assert_eq!(answer.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
}

#[test]
fn malformed_queries_get_formerr_and_headerless_ones_nothing() {
    let state = state();
    let demo = asker("demo");
    assert_eq!(decide(&state, &demo, &[]), Decision::Drop);
    assert_eq!(decide(&state, &demo, &[0x12, 0x34, 1]), Decision::Drop);
    // A header claiming a question that is not there.
    let header_only = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let (m, outcome) = reply(decide(&state, &demo, &header_only));
    assert_eq!(outcome, Outcome::Malformed);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Garbage after a good header; a label running past the end.
    let mut cut = query("echo.demo.svc.cluster.local.", RecordType::A);
    cut.truncate(20);
    let (m, _) = reply(decide(&state, &demo, &cut));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Zero questions, and two.
    let none = [0x12, 0x34, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    let (m, _) = reply(decide(&state, &demo, &none));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut two = Message::query();
    two.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
    two.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
    let (m, _) = reply(decide(&state, &demo, &two.to_vec().unwrap()));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A response is never answered (two proxies must not ping-pong).
    let mut response = Message::from_vec(&query("echo.", RecordType::A)).unwrap();
    response.metadata.message_type = MessageType::Response;
    assert_eq!(
        decide(&state, &demo, &response.to_vec().unwrap()),
        Decision::Drop
    );
    // Another opcode.
    let mut notify = Message::from_vec(&query("echo.", RecordType::A)).unwrap();
    notify.metadata.op_code = OpCode::Notify;
    let (m, outcome) = reply(decide(&state, &demo, &notify.to_vec().unwrap()));
    assert_eq!(outcome, Outcome::NotImplemented);
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
}

#[test]
fn refusals_echo_id_and_question() {
    let refused = refuse(&query("echo.", RecordType::A)).expect("a header to answer to");
    let m = Message::from_vec(&refused).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.queries.len(), 1);
    assert_eq!(refuse(&[1, 2, 3]), None);
    let header_only = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let m = Message::from_vec(&refuse(&header_only).unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.queries.is_empty());
}

fn forward_of(name: &str, rtype: RecordType) -> Forward {
    match decide(&state(), &asker("demo"), &query(name, rtype)) {
        Decision::Forward(f) => f,
        other => panic!("{other:?}"),
    }
}

fn upstream_answer(f: &Forward, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::response(f.id, OpCode::Query);
    m.metadata.response_code = code;
    m.add_query(f.question.clone());
    m.to_vec().unwrap()
}

#[test]
fn relayed_answers_are_checked_and_mesh_names_never_nxdomain() {
    let f = forward_of("example.com.", RecordType::A);
    let nx = upstream_answer(&f, ResponseCode::NXDomain);
    assert_eq!(relay(&f, &nx).unwrap(), nx, "relayed unchanged");
    // Not ours: another ID, another question, a query, garbage.
    let mut other = f.clone();
    other.id ^= 1;
    assert_eq!(
        relay(&f, &upstream_answer(&other, ResponseCode::NoError)),
        Err(RelayError::Mismatch)
    );
    let mut q = Message::from_vec(&nx).unwrap();
    q.metadata.message_type = MessageType::Query;
    assert_eq!(relay(&f, &q.to_vec().unwrap()), Err(RelayError::Mismatch));
    let mut elsewhere = Message::from_vec(&nx).unwrap();
    elsewhere.queries[0] = Query::query(Name::from_ascii("evil.").unwrap(), RecordType::A);
    assert_eq!(
        relay(&f, &elsewhere.to_vec().unwrap()),
        Err(RelayError::Mismatch)
    );
    assert_eq!(relay(&f, &[0; 5]), Err(RelayError::Malformed));
    // Names compare without case (resolvers randomise it); the answer's own case is kept.
    let mut shouted = Message::from_vec(&nx).unwrap();
    shouted.queries[0] = Query::query(Name::from_ascii("EXAMPLE.com.").unwrap(), RecordType::A);
    let shouted = shouted.to_vec().unwrap();
    assert_eq!(relay(&f, &shouted), Ok(shouted.clone()));

    // SRV for a mesh name: the upstream's NXDOMAIN becomes NODATA.
    let f = forward_of("echo.", RecordType::SRV);
    let fixed = relay(&f, &upstream_answer(&f, ResponseCode::NXDomain)).unwrap();
    let m = Message::from_vec(&fixed).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.queries[0].query_class(), DNSClass::IN);

    let m = Message::from_vec(&servfail(&f).unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!((m.metadata.id, m.queries.len()), (f.id, 1));
}

#[test]
fn declared_external_hosts_answer_with_their_allocated_vips() {
    let s = state();
    for ns in ["demo", "ext"] {
        let (m, outcome) = reply(decide(
            &s,
            &asker(ns),
            &query("api.example.com.", RecordType::A),
        ));
        assert_eq!(
            (addresses(&m), outcome),
            (vec!["240.240.1.2".to_string()], Outcome::Answered)
        );
        assert!(m.metadata.authoritative);
        let (m, _) = reply(decide(
            &s,
            &asker(ns),
            &query("API.example.com.", RecordType::AAAA),
        ));
        assert_eq!(addresses(&m), vec!["fd00:240:240::102".to_string()]);
    }
    // Search-list expansions of it and undeclared names go upstream; a wildcard has no VIP.
    for name in [
        "api.example.com.demo.svc.cluster.local.",
        "other.example.com.",
        "x.wild.example.",
    ] {
        assert!(
            matches!(
                decide(&s, &asker("demo"), &query(name, RecordType::A)),
                Decision::Forward(_)
            ),
            "{name}"
        );
    }
}
