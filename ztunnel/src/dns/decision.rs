//! What to answer to one DNS query: a pure function of a state snapshot, the asking pod's
//! namespace and the query's bytes. The socket loops in [`super::server`] only act on it.
//!
//! The query arrives as the pod's resolver sent it: already expanded with the pod's search
//! list (`echo` from a pod in `demo` is first asked as `echo.demo.svc.cluster.local`), so the
//! usual case is a name equal to a service's hostname. Names a resolver sends as they are
//! (the last try of the search list, or a resolver without one) are matched the way
//! Kubernetes' search list would have expanded them: `<svc>.<ns>` and `<svc>.<ns>.svc` for
//! any namespace, and a bare `<svc>` only for a service in the pod's own namespace.
//!
//! A mesh name is a service with at least one VIP (a headless service has none: its name is
//! left to the cluster's DNS, which answers with the pods), or a host of an ExternalService
//! the controller allocated VIPs to (matched by its exact name; a wildcard host has none).
//! For it:
//! - `A` / `AAAA`: the VIPs of that family, authoritative, TTL [`TTL`]; none of that family
//!   is NODATA (NOERROR, no answer), never NXDOMAIN: the name exists.
//! - any other type (SRV, TXT...): forwarded, so the cluster's DNS still answers what it
//!   knows; an NXDOMAIN coming back is turned into NODATA ([`relay`]), because the mesh
//!   knows the name exists and a negative answer for it would be cached against A too.
//!
//! Everything else is forwarded to the pod's upstream unchanged. A message that is not a
//! well-formed query gets FORMERR (its ID and opcode are echoed when the 12-byte header
//! reads; anything shorter, or a *response*, gets nothing: there is no one to answer, and
//! answering responses could loop); an opcode other than QUERY gets NOTIMP.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::state::State;

/// TTL of the answers for mesh names: short enough that a VIP change reaches clients that
/// cache within half a minute, long enough that a chatty client does not ask per connection.
pub const TTL: u32 = 30;

/// The UDP payload size advertised in our EDNS answers (the figure of DNS flag day 2020: no
/// IP fragmentation on any usual path).
pub const EDNS_PAYLOAD: u16 = 1232;

/// Who is asking: the facts about the pod the answer depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker {
    /// The pod's namespace: a bare service name means a service there.
    pub namespace: Arc<str>,
    /// The cluster's DNS domain (`cluster.local`): service hostnames are
    /// `<svc>.<ns>.svc.<domain>`.
    pub cluster_domain: Arc<str>,
}

/// How one query ended, for metrics and logs (a fixed set: never a peer-chosen value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A mesh name's A/AAAA records were answered.
    Answered,
    /// A mesh name without a VIP of the asked family: NOERROR, no answer.
    NoData,
    /// Sent to the pod's upstream and relayed.
    Forwarded,
    /// Malformed: FORMERR (or nothing, when there was no header to answer to).
    Malformed,
    /// An opcode other than QUERY: NOTIMP.
    NotImplemented,
    /// Over the pod's query rate: REFUSED.
    RateLimited,
    /// The upstream did not answer usably: SERVFAIL.
    UpstreamFailed,
}

impl Outcome {
    /// The metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::NoData => "nodata",
            Outcome::Forwarded => "forwarded",
            Outcome::Malformed => "malformed",
            Outcome::NotImplemented => "not_implemented",
            Outcome::RateLimited => "rate_limited",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

/// A query to send upstream, and what [`relay`] needs to check and fix the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The query's ID: the upstream's answer must carry it.
    pub id: u16,
    /// The question: the upstream's answer must be about it.
    pub question: Query,
    /// The name is a mesh name (asked for a type the mesh does not answer itself).
    pub mesh_name: bool,
    /// The query's header, to build a SERVFAIL from when the upstream fails.
    header: Metadata,
    /// Whether the query carried EDNS (a SERVFAIL then carries it too).
    edns: bool,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this message back; `outcome` says what it is.
    Reply {
        /// The encoded response.
        message: Vec<u8>,
        /// What it answers.
        outcome: Outcome,
    },
    /// Send the query's bytes, unchanged, to the pod's upstream and [`relay`] its answer.
    Forward(Forward),
    /// Answer nothing: fewer than 12 bytes (no ID to answer to), or a response.
    Drop,
}

/// Decides what to answer to `query` (one DNS message, as received) from `asker`.
pub fn decide(state: &State, asker: &Asker, query: &[u8]) -> Decision {
    let Some(header) = read_header(query) else {
        return Decision::Drop;
    };
    if header.message_type == MessageType::Response {
        return Decision::Drop;
    }
    if header.op_code != OpCode::Query {
        return error_reply(&header, None, ResponseCode::NotImp, Outcome::NotImplemented);
    }
    let message = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return error_reply(&header, None, ResponseCode::FormErr, Outcome::Malformed),
    };
    // RFC 9619: a query carries exactly one question.
    let [question] = message.queries.as_slice() else {
        return error_reply(&header, None, ResponseCode::FormErr, Outcome::Malformed);
    };
    let edns = message.edns.is_some();
    let service = if question.query_class() == DNSClass::IN {
        mesh_name(state, asker, question)
    } else {
        None
    };
    let family = match question.query_type() {
        RecordType::A => Some(false),
        RecordType::AAAA => Some(true),
        _ => None,
    };
    match (service, family) {
        (Some(vips), Some(v6)) => {
            let mut response = response_to(&header.metadata, question, edns);
            response.metadata.authoritative = true;
            for vip in vips.iter().map(|ip| ip.to_canonical()) {
                let rdata = match vip {
                    IpAddr::V4(v4) if !v6 => RData::A(A(v4)),
                    IpAddr::V6(v6addr) if v6 => RData::AAAA(AAAA(v6addr)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(question.name().clone(), TTL, rdata));
            }
            let outcome = if response.answers.is_empty() {
                Outcome::NoData
            } else {
                Outcome::Answered
            };
            encode(&response, &header, outcome)
        }
        (service, _) => Decision::Forward(Forward {
            id: header.id,
            question: question.clone(),
            mesh_name: service.is_some(),
            header: header.metadata,
            edns,
        }),
    }
}

/// The REFUSED answer to `query` (over the pod's rate): its ID, opcode and, when it parses,
/// its question. `None` when there is no header to answer to, or it is a response.
pub fn refuse(query: &[u8]) -> Option<Vec<u8>> {
    let header = read_header(query)?;
    if header.message_type == MessageType::Response {
        return None;
    }
    let parsed = Message::from_vec(query).ok();
    let question = parsed.as_ref().and_then(|m| match m.queries.as_slice() {
        [q] => Some(q),
        _ => None,
    });
    match error_reply(
        &header,
        question,
        ResponseCode::Refused,
        Outcome::RateLimited,
    ) {
        Decision::Reply { message, .. } => Some(message),
        _ => None,
    }
}

/// Why the upstream's answer was not relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// It does not parse as a DNS message.
    #[error("the upstream's answer is not a DNS message")]
    Malformed,
    /// It is not a response to our query (another ID, a query, another question).
    #[error("the upstream's answer is not a response to the query (id or question differ)")]
    Mismatch,
}

/// The answer to send back to the pod for `upstream`, the upstream's answer to `forward`:
/// its bytes unchanged, except NXDOMAIN for a mesh name, which becomes NODATA (see the
/// module docs). An answer that is not a response to our question is refused.
pub fn relay(forward: &Forward, upstream: &[u8]) -> Result<Vec<u8>, RelayError> {
    let mut message = Message::from_vec(upstream).map_err(|_| RelayError::Malformed)?;
    let same_question = match message.queries.as_slice() {
        [q] => {
            q.name().eq_ignore_root(forward.question.name())
                && q.query_type() == forward.question.query_type()
                && q.query_class() == forward.question.query_class()
        }
        // A truncated answer may leave the question out.
        [] => message.metadata.truncation,
        _ => false,
    };
    if message.metadata.message_type != MessageType::Response
        || message.metadata.id != forward.id
        || !same_question
    {
        return Err(RelayError::Mismatch);
    }
    if forward.mesh_name && message.metadata.response_code == ResponseCode::NXDomain {
        message.metadata.response_code = ResponseCode::NoError;
        return message.to_vec().map_err(|_| RelayError::Malformed);
    }
    Ok(upstream.to_vec())
}

/// The SERVFAIL answer to a forwarded query whose upstream failed (no answer, or a bad
/// one). `None` only if encoding failed (it cannot for these fields).
pub fn servfail(forward: &Forward) -> Option<Vec<u8>> {
    let mut response = response_to(&forward.header, &forward.question, forward.edns);
    response.metadata.response_code = ResponseCode::ServFail;
    response.to_vec().ok()
}

/// The VIPs of the mesh name `question` asks for: a service's (see the module docs), else
/// an external host's the controller allocated (by its exact name).
fn mesh_name<'s>(state: &'s State, asker: &Asker, question: &Query) -> Option<&'s [IpAddr]> {
    let mut labels = Vec::with_capacity(8);
    for label in question.name().iter() {
        // Service hostnames are DNS-1123 labels: anything else cannot be one, and
        // refusing it here keeps escaped dots out of the joined name.
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    let name = labels.join(".");
    let domain = &*asker.cluster_domain;
    let candidate = match labels.as_slice() {
        [] => return None,
        [svc] => format!("{svc}.{}.svc.{domain}", asker.namespace),
        [svc, ns] => format!("{svc}.{ns}.svc.{domain}"),
        [svc, ns, svc_label] if svc_label == "svc" => format!("{svc}.{ns}.svc.{domain}"),
        _ => name.clone(),
    };
    state
        .service_by_hostname(&candidate)
        .filter(|s| !s.vips.is_empty())
        .map(|s| s.vips.as_slice())
        .or_else(|| state.external_vips(&name))
}

/// The query's header, when it has one.
fn read_header(query: &[u8]) -> Option<Header> {
    Header::read(&mut BinDecoder::new(query)).ok()
}

/// An empty response to `question` with the query's ID, opcode, RD and CD.
fn response_to(request: &Metadata, question: &Query, edns: bool) -> Message {
    let mut response = Message::response(request.id, request.op_code);
    response.metadata = Metadata::response_from_request(request);
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    if edns {
        let mut opt = Edns::new();
        opt.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(opt);
    }
    response
}

/// An error response (FORMERR, NOTIMP, REFUSED) to a query with this header.
fn error_reply(
    header: &Header,
    question: Option<&Query>,
    code: ResponseCode,
    outcome: Outcome,
) -> Decision {
    let mut response = Message::response(header.id, header.op_code);
    response.metadata = Metadata::response_from_request(&header.metadata);
    response.metadata.response_code = code;
    if let Some(q) = question {
        response.add_query(q.clone());
    }
    encode(&response, header, outcome)
}

fn encode(response: &Message, header: &Header, outcome: Outcome) -> Decision {
    match response.to_vec() {
        Ok(message) => Decision::Reply { message, outcome },
        // Encoding what we built cannot fail (names came from a parsed message, counts are
        // small); if it ever did, a bare SERVFAIL header still answers the client.
        Err(_) => {
            let mut bare = Message::response(header.id, header.op_code);
            bare.metadata.response_code = ResponseCode::ServFail;
            match bare.to_vec() {
                Ok(message) => Decision::Reply {
                    message,
                    outcome: Outcome::UpstreamFailed,
                },
                Err(_) => Decision::Drop,
            }
        }
    }
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
