//! The CONNECT-UDP capsule decoder (`ambit_hbone::capsule::Decoder`): it reads the bytes a
//! peer's HBONE stream carries for a UDP flow.
//!
//! Inputs: arbitrary bytes, and well-formed streams (DATAGRAM capsules of generated
//! payloads, interleaved with capsules of other types and other contexts), each handed to
//! the decoder in generated chunks.
//!
//! Properties: nothing panics; how the bytes are split into reads never changes what is
//! decoded (datagrams, then error or not); no datagram exceeds the largest UDP payload; a
//! well-formed stream decodes to exactly its payloads, in order, and ends clean.

use ambit_hbone::capsule::{self, CapsuleError, Decoder, MAX_DATAGRAM};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

/// Decodes `input` handed over in reads of the given sizes (cycled): the datagrams, then
/// the error that stopped decoding or the end-of-stream verdict.
fn decode(input: &[u8], reads: &[usize]) -> (Vec<Bytes>, Result<(), CapsuleError>) {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = reads.iter().cycle();
    while at < input.len() {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(1)
            .clamp(1, input.len() - at);
        decoder.push(&input[at..at + n]);
        at += n;
        loop {
            match decoder.next_datagram() {
                Ok(Some(d)) => out.push(d),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    let end = decoder.finish();
    (out, end)
}

fn check_any((input, reads): (Vec<u8>, Vec<usize>)) -> Result<(), TestCaseError> {
    let whole = decode(&input, &[input.len().max(1)]);
    let split = decode(&input, &reads);
    prop_assert_eq!(&whole, &split, "the split changed what was decoded");
    for d in &whole.0 {
        prop_assert!(d.len() <= MAX_DATAGRAM);
    }
    Ok(())
}

/// One capsule of a well-formed stream: a datagram, or something the decoder must skip.
#[derive(Debug, Clone)]
enum Piece {
    Datagram(Vec<u8>),
    Unknown { kind: u64, value: Vec<u8> },
    OtherContext { context: u64, value: Vec<u8> },
}

fn piece() -> impl Strategy<Value = Piece> {
    let payload = || {
        prop_oneof![
            4 => prop::collection::vec(any::<u8>(), 0..80),
            1 => prop::collection::vec(any::<u8>(), 0..3000),
        ]
    };
    prop_oneof![
        6 => payload().prop_map(Piece::Datagram),
        1 => (1u64..=capsule::MAX_VARINT, payload())
            .prop_map(|(kind, value)| Piece::Unknown { kind, value }),
        1 => (1u64..=capsule::MAX_VARINT, payload())
            .prop_map(|(context, value)| Piece::OtherContext { context, value }),
    ]
}

fn check_well_formed((pieces, reads): (Vec<Piece>, Vec<usize>)) -> Result<(), TestCaseError> {
    let mut stream = BytesMut::new();
    let mut expected = Vec::new();
    for p in &pieces {
        match p {
            Piece::Datagram(d) => {
                capsule::put_datagram(d, &mut stream);
                expected.push(Bytes::from(d.clone()));
            }
            Piece::Unknown { kind, value } => {
                capsule::put_varint(*kind, &mut stream);
                capsule::put_varint(value.len() as u64, &mut stream);
                stream.extend_from_slice(value);
            }
            Piece::OtherContext { context, value } => {
                let mut inner = BytesMut::new();
                capsule::put_varint(*context, &mut inner);
                inner.extend_from_slice(value);
                capsule::put_varint(capsule::DATAGRAM_CAPSULE, &mut stream);
                capsule::put_varint(inner.len() as u64, &mut stream);
                stream.extend_from_slice(&inner);
            }
        }
    }
    let (got, end) = decode(&stream, &reads);
    prop_assert_eq!(end, Ok(()));
    prop_assert_eq!(got, expected);
    Ok(())
}

#[test]
fn capsule_decoder() {
    let reads = || prop::collection::vec(1usize..200, 1..8);
    crate::fuzz(
        "capsule_any",
        2000,
        (prop::collection::vec(any::<u8>(), 0..256), reads()),
        check_any,
    );
    crate::fuzz(
        "capsule_well_formed",
        500,
        (prop::collection::vec(piece(), 0..12), reads()),
        check_well_formed,
    );
}
