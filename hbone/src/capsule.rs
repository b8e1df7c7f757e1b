//! UDP datagrams inside an HBONE stream: the capsule protocol (RFC 9297) as CONNECT-UDP
//! (RFC 9298) uses it over HTTP/2, where there is no QUIC DATAGRAM frame and every datagram
//! travels as a DATAGRAM capsule on the request stream.
//!
//! A capsule is `type (varint) | length (varint) | value (length bytes)`, varints being
//! QUIC's (RFC 9000 section 16). A DATAGRAM capsule is type `0x00` and its value is
//! `context id (varint) | payload`; CONNECT-UDP's payloads are UDP payloads under context
//! id 0. So one datagram of `n` bytes costs `n + 3` (n < 63) to `n + 5` bytes on the stream.
//!
//! Decoding is incremental ([`Decoder`]): the stream hands over whatever bytes arrived, the
//! decoder yields whole datagram payloads. What a hostile peer can send it:
//!
//! - a capsule of an unknown type: skipped without being buffered, whatever its length
//!   (RFC 9297 section 3.2 says unknown types are ignored);
//! - a DATAGRAM whose context id is not 0: dropped (RFC 9298 section 5 says so for
//!   unknown contexts);
//! - a DATAGRAM longer than [`MAX_DATAGRAM`] (no UDP payload is) or with no room for its
//!   context id: an error, and the caller ends the stream ([`CapsuleError`]);
//! - a varint or capsule cut short by the end of the stream: [`Decoder::finish`] says so.
//!
//! Memory per stream is bounded by one datagram plus one read.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The DATAGRAM capsule type (RFC 9297 section 3.5).
pub const DATAGRAM_CAPSULE: u64 = 0x00;

/// The context id of UDP payloads in CONNECT-UDP (RFC 9298 section 4).
pub const UDP_PAYLOAD_CONTEXT: u64 = 0;

/// The largest UDP payload (IPv4's 65,535-byte packet less its 20-byte IP and 8-byte UDP
/// headers is 65,507; IPv6's is 65,527 without jumbograms). A DATAGRAM capsule may carry at
/// most this after its context id.
pub const MAX_DATAGRAM: usize = 65_527;

/// The largest value a QUIC varint can hold (2^62 - 1).
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Why a capsule stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsuleError {
    /// A DATAGRAM capsule announced more than a UDP payload can be.
    #[error("DATAGRAM capsule of {length} bytes exceeds the largest UDP payload ({max} bytes + context id)")]
    Oversized {
        /// The capsule length the peer announced.
        length: u64,
        /// [`MAX_DATAGRAM`].
        max: usize,
    },
    /// A DATAGRAM capsule too short to hold its context id.
    #[error("DATAGRAM capsule of {length} bytes cannot hold its context id")]
    MissingContext {
        /// The capsule length the peer announced.
        length: u64,
    },
    /// The stream ended inside a capsule or one of its varints.
    #[error("stream ended inside a capsule ({buffered} bytes of an unfinished capsule)")]
    Truncated {
        /// Bytes of the unfinished capsule that had arrived.
        buffered: usize,
    },
}

/// Appends `value` as a QUIC varint (the shortest encoding). Values above [`MAX_VARINT`]
/// cannot be encoded; the codec never produces one (its lengths are bounded by
/// [`MAX_DATAGRAM`]), so they are clamped rather than panicking.
pub fn put_varint(value: u64, out: &mut BytesMut) {
    let value = value.min(MAX_VARINT);
    if value < 1 << 6 {
        out.put_u8(value as u8);
    } else if value < 1 << 14 {
        out.put_u16(0x4000 | value as u16);
    } else if value < 1 << 30 {
        out.put_u32(0x8000_0000 | value as u32);
    } else {
        out.put_u64(0xc000_0000_0000_0000 | value);
    }
}

/// Reads a QUIC varint from the front of `input`: its value and encoded length, or `None`
/// when `input` holds only part of it.
pub fn get_varint(input: &[u8]) -> Option<(u64, usize)> {
    let first = *input.first()?;
    let len = 1usize << (first >> 6);
    let bytes = input.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &bytes[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, len))
}

/// Appends one DATAGRAM capsule carrying `payload` under context id 0. A payload over
/// [`MAX_DATAGRAM`] is not a UDP payload; callers read from UDP sockets, which cannot
/// produce one.
pub fn put_datagram(payload: &[u8], out: &mut BytesMut) {
    // Context id 0 is one byte.
    let length = 1 + payload.len() as u64;
    out.reserve(payload.len() + 10);
    put_varint(DATAGRAM_CAPSULE, out);
    put_varint(length, out);
    put_varint(UDP_PAYLOAD_CONTEXT, out);
    out.put_slice(payload);
}

/// One DATAGRAM capsule with `payload`, as bytes ready to send.
pub fn datagram(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    put_datagram(payload, &mut out);
    out.freeze()
}

/// Turns the bytes of a capsule stream back into datagram payloads.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes received and not yet consumed.
    buf: BytesMut,
    /// Bytes of an unknown capsule still to skip (they may not have arrived yet).
    skipping: u64,
    /// Unknown capsules and foreign-context datagrams skipped so far.
    skipped: u64,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Hands the decoder bytes read from the stream.
    pub fn push(&mut self, mut chunk: &[u8]) {
        // Bytes of a capsule being skipped are dropped on arrival, never buffered (when
        // bytes are still buffered, they come first in the stream and are skipped first).
        let skip = if self.buf.is_empty() {
            (self.skipping.min(chunk.len() as u64)) as usize
        } else {
            0
        };
        self.skipping -= skip as u64;
        chunk = &chunk[skip..];
        self.buf.extend_from_slice(chunk);
    }

    /// Capsules skipped so far (unknown types, datagrams of another context).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The next whole datagram payload, `Ok(None)` when more bytes are needed.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, CapsuleError> {
        loop {
            if self.skipping > 0 {
                let skip = (self.skipping.min(self.buf.len() as u64)) as usize;
                self.buf.advance(skip);
                self.skipping -= skip as u64;
                if self.skipping > 0 {
                    return Ok(None);
                }
            }
            let Some((kind, kind_len)) = get_varint(&self.buf) else {
                return Ok(None);
            };
            let Some((length, length_len)) = get_varint(&self.buf[kind_len..]) else {
                return Ok(None);
            };
            let header = kind_len + length_len;
            if kind != DATAGRAM_CAPSULE {
                self.buf.advance(header);
                self.skipping = length;
                self.skipped += 1;
                continue;
            }
            // The longest context id we accept is 8 bytes; a longer capsule is no UDP payload.
            if length > (MAX_DATAGRAM + 8) as u64 {
                return Err(CapsuleError::Oversized {
                    length,
                    max: MAX_DATAGRAM,
                });
            }
            let length = length as usize;
            if self.buf.len() < header + length {
                // Room for the whole capsule now, so the rest arrives without regrowing.
                self.buf.reserve(header + length - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(header);
            let mut value = self.buf.split_to(length);
            let Some((context, context_len)) = get_varint(&value) else {
                return Err(CapsuleError::MissingContext {
                    length: length as u64,
                });
            };
            if context != UDP_PAYLOAD_CONTEXT {
                self.skipped += 1;
                continue;
            }
            value.advance(context_len);
            if value.len() > MAX_DATAGRAM {
                return Err(CapsuleError::Oversized {
                    length: length as u64,
                    max: MAX_DATAGRAM,
                });
            }
            return Ok(Some(value.freeze()));
        }
    }

    /// The stream ended: an error if it ended inside a capsule.
    pub fn finish(&self) -> Result<(), CapsuleError> {
        if self.buf.is_empty() && self.skipping == 0 {
            Ok(())
        } else {
            Err(CapsuleError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(value: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_varint(value, &mut out);
        out.to_vec()
    }

    fn drain(decoder: &mut Decoder) -> Result<Vec<Bytes>, CapsuleError> {
        let mut out = Vec::new();
        while let Some(d) = decoder.next_datagram()? {
            out.push(d);
        }
        Ok(out)
    }

    #[test]
    fn varints_use_the_shortest_encoding_and_read_back() {
        // RFC 9000 appendix A.1's examples.
        assert_eq!(varint(37), [0x25]);
        assert_eq!(varint(15_293), [0x7b, 0xbd]);
        assert_eq!(varint(494_878_333), [0x9d, 0x7f, 0x3e, 0x7d]);
        assert_eq!(
            varint(151_288_809_941_952_652),
            [0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]
        );
        for value in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            MAX_VARINT,
        ] {
            let bytes = varint(value);
            assert_eq!(get_varint(&bytes), Some((value, bytes.len())), "{value}");
        }
        // A non-shortest encoding is still a valid varint (RFC 9000 16).
        assert_eq!(get_varint(&[0x40, 0x25]), Some((37, 2)));
        assert_eq!(varint(u64::MAX), varint(MAX_VARINT));
    }

    #[test]
    fn truncated_varints_wait_for_more() {
        assert_eq!(get_varint(&[]), None);
        assert_eq!(get_varint(&[0x7b]), None);
        assert_eq!(get_varint(&[0xc2, 0x19, 0x7c]), None);
    }

    #[test]
    fn datagram_capsule_layout() {
        // type 0, length 4 (context byte + 3), context 0, payload.
        assert_eq!(datagram(b"abc").as_ref(), [0, 4, 0, b'a', b'b', b'c']);
        let big = vec![7u8; 100];
        let encoded = datagram(&big);
        assert_eq!(&encoded[..4], [0x00, 0x40, 101, 0x00]);
        assert_eq!(encoded.len(), 104);
        // An empty UDP payload is a valid datagram.
        assert_eq!(datagram(b"").as_ref(), [0, 1, 0]);
    }

    #[test]
    fn decodes_datagrams_split_at_every_byte() {
        let mut stream = BytesMut::new();
        let payloads: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![], vec![9; 70], vec![1; 20_000]];
        for p in &payloads {
            put_datagram(p, &mut stream);
        }
        // One byte at a time: every split point of every varint and payload.
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        for byte in stream.iter() {
            decoder.push(std::slice::from_ref(byte));
            got.extend(drain(&mut decoder).unwrap());
        }
        assert_eq!(got, payloads);
        decoder.finish().unwrap();
        // All at once.
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert_eq!(drain(&mut decoder).unwrap(), payloads);
    }

    #[test]
    fn unknown_capsules_are_skipped_without_buffering() {
        let mut stream = BytesMut::new();
        put_datagram(b"before", &mut stream);
        // An unknown type announcing 1 MiB; only its first bytes arrive at first.
        put_varint(0x2a, &mut stream);
        put_varint(1 << 20, &mut stream);
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert_eq!(drain(&mut decoder).unwrap(), [Bytes::from("before")]);
        let filler = vec![0xffu8; 64 * 1024];
        for _ in 0..16 {
            decoder.push(&filler);
            assert_eq!(drain(&mut decoder).unwrap(), Vec::<Bytes>::new());
            assert!(decoder.buf.len() <= 16, "skipped bytes were buffered");
        }
        decoder.push(&datagram(b"after"));
        assert_eq!(drain(&mut decoder).unwrap(), [Bytes::from("after")]);
        assert_eq!(decoder.skipped(), 1);
        decoder.finish().unwrap();
    }

    #[test]
    fn datagrams_of_another_context_are_dropped() {
        let mut stream = BytesMut::new();
        put_varint(DATAGRAM_CAPSULE, &mut stream);
        put_varint(3, &mut stream);
        put_varint(2, &mut stream); // context id 2
        stream.put_slice(b"xy");
        put_datagram(b"kept", &mut stream);
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert_eq!(drain(&mut decoder).unwrap(), [Bytes::from("kept")]);
        assert_eq!(decoder.skipped(), 1);
    }

    #[test]
    fn oversized_and_contextless_datagrams_are_errors() {
        let mut stream = BytesMut::new();
        put_varint(DATAGRAM_CAPSULE, &mut stream);
        put_varint(MAX_VARINT, &mut stream);
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert!(matches!(
            decoder.next_datagram(),
            Err(CapsuleError::Oversized { .. })
        ));

        // Announced just over a UDP payload with a one-byte context id.
        let mut stream = BytesMut::new();
        put_varint(DATAGRAM_CAPSULE, &mut stream);
        put_varint(MAX_DATAGRAM as u64 + 2, &mut stream);
        put_varint(0, &mut stream);
        stream.put_slice(&vec![0; MAX_DATAGRAM + 1]);
        let mut decoder = Decoder::new();
        decoder.push(&stream);
        assert!(matches!(
            decoder.next_datagram(),
            Err(CapsuleError::Oversized { .. })
        ));

        let mut decoder = Decoder::new();
        decoder.push(&[0x00, 0x00]);
        assert_eq!(
            decoder.next_datagram(),
            Err(CapsuleError::MissingContext { length: 0 })
        );
    }

    #[test]
    fn a_stream_ending_inside_a_capsule_is_truncated() {
        let mut decoder = Decoder::new();
        decoder.push(&[0x00, 0x40]); // a two-byte length cut after its first byte
        assert_eq!(decoder.next_datagram(), Ok(None));
        assert_eq!(
            decoder.finish(),
            Err(CapsuleError::Truncated { buffered: 2 })
        );

        let mut decoder = Decoder::new();
        decoder.push(&datagram(b"hello")[..5]);
        assert_eq!(decoder.next_datagram(), Ok(None));
        assert!(decoder.finish().is_err());

        // Inside an unknown capsule being skipped.
        let mut decoder = Decoder::new();
        decoder.push(&[0x21, 0x10, 1, 2]);
        assert_eq!(decoder.next_datagram(), Ok(None));
        assert!(decoder.finish().is_err());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic sweep of hostile inputs: every result is a value or an error.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2_000 {
            let mut decoder = Decoder::new();
            let len = (seed % 64) as usize;
            let mut input = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push(seed as u8);
            }
            decoder.push(&input);
            while let Ok(Some(_)) = decoder.next_datagram() {}
            let _ = decoder.finish();
        }
    }
}
