//! The clustermem wire format: framed, versioned, checksummed binary messages.
//!
//! A frame is a fixed 24-byte header followed by a payload:
//!
//! ```text
//! 0      2       3      4          12          16         20        24
//! | magic | version | kind | request id | payload len | crc32c | reserved | payload ... |
//! ```
//!
//! All integers are little-endian. The CRC32C covers the first 16 header bytes and the payload,
//! so a flipped bit anywhere but the reserved word is caught. Requests carry a client-chosen
//! request id that the reply echoes, so many requests may be in flight on one connection
//! (pipelining); a memory host answers each connection's requests in order.
//!
//! The crate does no I/O. Every decoder is total: any byte string yields a value or a
//! [`DecodeError`], never a panic (see the proptest in `tests` and the fuzz target in `fuzz/`).

mod message;

pub use message::{
    encode_write_lines_prefix, write_pages_prefix, ErrorCode, HostStats, Message, FEATURE_CHASE_POINTERS,
    FEATURE_XOR_LINES, HELLO_ASKS_FEATURES, HELLO_LOW_LATENCY, MAX_CHASE_HOPS,
};

use thiserror::Error;

/// Size of a page as the protocol moves it.
pub const PAGE_SIZE: usize = 4096;
/// Size of a cache line: the unit of sparse write-back.
pub const LINE_SIZE: usize = 64;
/// Cache lines in a page.
pub const LINES_PER_PAGE: usize = PAGE_SIZE / LINE_SIZE;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// Marks the start of every frame (the bytes `0xC7 0x3E` on the wire).
pub const MAGIC: u16 = 0x3EC7;
/// The oldest protocol version this build speaks.
pub const MIN_VERSION: u8 = 1;
/// The newest protocol version this build speaks.
pub const MAX_VERSION: u8 = 1;
/// Largest payload a peer may send: 16 MiB (4096 pages), enough for a prefetch block.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Why a byte string is not a valid frame or message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame does not start with [`MAGIC`]: the peer is not a clustermem peer or the
    /// stream lost its framing.
    #[error("bad frame magic {found:#06x} (expected {MAGIC:#06x}): not a clustermem peer?")]
    BadMagic {
        /// The two bytes found instead.
        found: u16,
    },
    /// The frame's version is outside what this build speaks.
    #[error("unsupported protocol version {0} (this build speaks {MIN_VERSION}..={MAX_VERSION})")]
    UnsupportedVersion(u8),
    /// The message kind byte names no message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The header announces a payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u64),
    /// The checksum does not match: the frame was damaged in transit.
    #[error("checksum mismatch: header says {expected:#010x}, frame hashes to {actual:#010x}")]
    BadChecksum {
        /// The CRC carried by the header.
        expected: u32,
        /// The CRC computed over what arrived.
        actual: u32,
    },
    /// The payload is shorter or longer than its message kind requires.
    #[error("{kind} payload malformed: {why}")]
    Malformed {
        /// Name of the message kind.
        kind: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of this frame.
    pub version: u8,
    /// Message kind byte (see [`Message::kind`]).
    pub kind: u8,
    /// Request id, echoed by the reply.
    pub request_id: u64,
    /// Length of the payload that follows.
    pub payload_len: u32,
    /// CRC32C over header bytes 0..16 and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and checks a header: magic, version, kind and payload bound. The checksum can
    /// only be checked once the payload is in: see [`FrameHeader::verify`].
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = bytes[2];
        if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = bytes[3];
        message::kind_name(kind).ok_or(DecodeError::UnknownKind(kind))?;
        let request_id = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
        let payload_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if payload_len as usize > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLarge(u64::from(payload_len)));
        }
        let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        Ok(Self { version, kind, request_id, payload_len, crc })
    }

    /// Checks the CRC against the header fields and `payload`.
    pub fn verify(&self, payload: &[u8]) -> Result<(), DecodeError> {
        let actual = frame_crc(&self.prefix(), payload);
        if actual != self.crc {
            return Err(DecodeError::BadChecksum { expected: self.crc, actual });
        }
        if payload.len() != self.payload_len as usize {
            return Err(DecodeError::Malformed {
                kind: message::kind_name(self.kind).unwrap_or("frame"),
                why: "payload length differs from header",
            });
        }
        Ok(())
    }

    fn prefix(&self) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        p[2] = self.version;
        p[3] = self.kind;
        p[4..12].copy_from_slice(&self.request_id.to_le_bytes());
        p[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        p
    }

    /// Serialises the header (with its CRC already filled in).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..16].copy_from_slice(&self.prefix());
        h[16..20].copy_from_slice(&self.crc.to_le_bytes());
        h
    }
}

fn frame_crc(prefix: &[u8; 16], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(prefix), payload)
}

/// Builds a complete frame around `payload` parts (concatenated in order), returning the
/// header to send before them. Splitting the payload lets a caller send page data straight
/// from memory with `writev` instead of copying it into a buffer first.
pub fn frame_header(kind: u8, request_id: u64, payload_parts: &[&[u8]]) -> FrameHeader {
    let len: usize = payload_parts.iter().map(|p| p.len()).sum();
    assert!(len <= MAX_PAYLOAD, "payload of {len} bytes exceeds MAX_PAYLOAD");
    let mut header = FrameHeader {
        version: MAX_VERSION,
        kind,
        request_id,
        payload_len: u32::try_from(len).expect("bounded by MAX_PAYLOAD"),
        crc: 0,
    };
    let mut crc = crc32c::crc32c(&header.prefix());
    for part in payload_parts {
        crc = crc32c::crc32c_append(crc, part);
    }
    header.crc = crc;
    header
}

/// Encodes `msg` as one contiguous frame (header + payload).
pub fn encode_frame(request_id: u64, msg: &Message<'_>) -> Vec<u8> {
    let mut payload = Vec::with_capacity(msg.payload_len_hint());
    msg.encode_payload(&mut payload);
    let header = frame_header(msg.kind(), request_id, &[&payload]);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&payload);
    out
}

/// Decodes one complete frame from the front of `bytes`; returns the request id, the message
/// and how many bytes it took. `Ok(None)` means more bytes are needed.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<(u64, Message<'_>, usize)>, DecodeError> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let header = FrameHeader::decode(head.try_into().expect("HEADER_LEN bytes"))?;
    let end = HEADER_LEN + header.payload_len as usize;
    let Some(payload) = bytes.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    header.verify(payload)?;
    let msg = Message::decode(header.kind, payload)?;
    Ok(Some((header.request_id, msg, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(msg: Message<'_>) {
        let frame = encode_frame(42, &msg);
        let (id, back, used) = decode_frame(&frame).unwrap().unwrap();
        assert_eq!(id, 42);
        assert_eq!(used, frame.len());
        assert_eq!(back, msg);
    }

    #[test]
    fn every_message_roundtrips() {
        let page = vec![7u8; PAGE_SIZE];
        let lines = vec![9u8; 3 * LINE_SIZE];
        roundtrip(Message::Hello { min_version: 1, max_version: 3, flags: HELLO_LOW_LATENCY });
        roundtrip(Message::HelloOk { version: 1, capacity_bytes: 8 << 30, features: 0 });
        roundtrip(Message::HelloOk { version: 1, capacity_bytes: 8 << 30, features: FEATURE_CHASE_POINTERS });
        roundtrip(Message::AllocSlab { bytes: 64 << 20, region: 3 });
        roundtrip(Message::SlabAllocated { slab_id: 7 });
        roundtrip(Message::FreeSlab { slab_id: 7 });
        roundtrip(Message::DiscardPages { slab_id: 7, first_page: 3, count: 9 });
        roundtrip(Message::ReadPages { slab_id: 1, first_page: 2, count: 3 });
        roundtrip(Message::Pages { first_page: 2, data: &page });
        roundtrip(Message::WritePages { slab_id: 1, first_page: 5, data: &page });
        roundtrip(Message::WriteLines { slab_id: 1, page: 9, line_mask: 0b1011, lines: &lines });
        roundtrip(Message::XorLines { slab_id: 1, page: 9, line_mask: 0b1011, lines: &lines });
        roundtrip(Message::Ok);
        roundtrip(Message::GetStats);
        roundtrip(Message::Stats(HostStats {
            capacity_bytes: 1,
            used_bytes: 2,
            slabs: 3,
            clients: 4,
            orphaned_slabs: 5,
            regions: 6,
        }));
        roundtrip(Message::Error { code: ErrorCode::OutOfCapacity, message: "full" });
        roundtrip(Message::ReadBytes { slab_id: 3, offset: 4096 * 5 + 1024, len: 1024 });
        roundtrip(Message::Pages { first_page: 4096 * 5 + 1024, data: &page[..1024] });
        roundtrip(Message::Resume { session: 0xdead_beef_1234 });
        roundtrip(Message::Resumed { slabs: 3 });
        let slabs: Vec<u8> = [5u64, 0, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        roundtrip(Message::ChasePointers {
            start: 0x7f00_0040,
            hops: 16,
            base: 0x7f00_0000,
            span_bytes: 1 << 26,
            slabs: &slabs,
        });
        roundtrip(Message::Chain { addresses: &slabs });
        roundtrip(Message::Chain { addresses: &[] });
    }

    /// The wire layouts other implementations rely on, byte for byte.
    #[test]
    fn new_kinds_have_fixed_layouts() {
        let msg = Message::ReadBytes { slab_id: 1, offset: 2, len: 3 };
        assert_eq!(msg.kind(), 15);
        let mut payload = Vec::new();
        msg.encode_payload(&mut payload);
        assert_eq!(payload, [&1u64.to_le_bytes()[..], &2u64.to_le_bytes(), &3u32.to_le_bytes()].concat());
        let msg = Message::Resume { session: 7 };
        assert_eq!(msg.kind(), 16);
        payload.clear();
        msg.encode_payload(&mut payload);
        assert_eq!(payload, 7u64.to_le_bytes());
        assert!(Message::decode(16, &[0; 7]).is_err(), "short Resume");
        assert!(Message::decode(15, &[0; 21]).is_err(), "ReadBytes with trailing bytes");
        assert!(Message::decode(7, &0u64.to_le_bytes()).is_err(), "Pages without data");
        let msg = Message::Resumed { slabs: 9 };
        assert_eq!(msg.kind(), 17);
        payload.clear();
        msg.encode_payload(&mut payload);
        assert_eq!(payload, 9u64.to_le_bytes());
        let slabs = 9u64.to_le_bytes();
        let msg = Message::ChasePointers { start: 1, hops: 2, base: 3, span_bytes: 4, slabs: &slabs };
        assert_eq!(msg.kind(), 18);
        payload.clear();
        msg.encode_payload(&mut payload);
        let want = [&1u64.to_le_bytes()[..], &[2], &3u64.to_le_bytes(), &4u64.to_le_bytes(), &slabs].concat();
        assert_eq!(payload, want);
        let mut bad = want.clone();
        bad[8] = 0;
        assert!(Message::decode(18, &bad).is_err(), "no hops");
        bad[8] = MAX_CHASE_HOPS + 1;
        assert!(Message::decode(18, &bad).is_err(), "too many hops");
        assert!(Message::decode(18, &want[..25]).is_err(), "no span table");
        assert!(Message::decode(18, &want[..30]).is_err(), "a torn slab id");
        assert!(Message::decode(18, &[&want[..9], &[0; 8], &want[17..]].concat()).is_ok(), "base 0");
        let span0 = [&want[..17], &0u64.to_le_bytes(), &want[25..]].concat();
        assert!(Message::decode(18, &span0).is_err(), "empty spans");
        assert_eq!(Message::Chain { addresses: &[] }.kind(), 19);
        assert!(Message::decode(19, &[0; 12]).is_err(), "a torn address");
        let lines = [7u8; 64];
        let msg = Message::XorLines { slab_id: 5, page: 6, line_mask: 1 << 9, lines: &lines };
        assert_eq!(msg.kind(), 20);
        payload.clear();
        msg.encode_payload(&mut payload);
        let want =
            [&5u64.to_le_bytes()[..], &6u64.to_le_bytes(), &(1u64 << 9).to_le_bytes(), &lines].concat();
        assert_eq!(payload, want, "the layout of WriteLines");
        assert!(Message::decode(20, &want[..want.len() - 1]).is_err(), "lines short of the mask");
        let mut frame = encode_frame(1, &Message::Ok);
        frame[3] = 21;
        assert_eq!(decode_frame(&frame), Err(DecodeError::UnknownKind(21)), "21 is still free");
    }

    /// A host from before feature bits (or not asked for them) sends two fields.
    #[test]
    fn hello_ok_without_features_decodes_with_none() {
        let payload = [&[1u8][..], &(8u64 << 30).to_le_bytes()].concat();
        assert_eq!(
            Message::decode(2, &payload),
            Ok(Message::HelloOk { version: 1, capacity_bytes: 8 << 30, features: 0 })
        );
        let mut encoded = Vec::new();
        Message::HelloOk { version: 1, capacity_bytes: 8 << 30, features: 0 }.encode_payload(&mut encoded);
        assert_eq!(encoded, payload, "no features: the layout older clients read");
    }

    /// A host from before `orphaned_slabs` sends four fields, one from before `regions` five;
    /// they still decode.
    #[test]
    fn stats_from_an_older_host_decode_with_no_orphans() {
        let payload: Vec<u8> = [10u64, 20, 30, 40].iter().flat_map(|v| v.to_le_bytes()).collect();
        let old = HostStats {
            capacity_bytes: 10,
            used_bytes: 20,
            slabs: 30,
            clients: 40,
            orphaned_slabs: 0,
            regions: 0,
        };
        assert_eq!(Message::decode(12, &payload), Ok(Message::Stats(old)));
        let torn = [&payload[..], &[1, 2, 3, 4]].concat();
        assert!(Message::decode(12, &torn).is_err(), "a torn fifth field is refused");
        let five = [&payload[..], &7u64.to_le_bytes()].concat();
        assert_eq!(Message::decode(12, &five), Ok(Message::Stats(HostStats { orphaned_slabs: 7, ..old })));
    }

    /// A client from before region tags sends `AllocSlab` with the size alone.
    #[test]
    fn alloc_slab_from_an_older_client_decodes_untagged() {
        assert_eq!(
            Message::decode(3, &(1u64 << 20).to_le_bytes()),
            Ok(Message::AllocSlab { bytes: 1 << 20, region: 0 })
        );
        assert!(Message::decode(3, &[0; 12]).is_err(), "a torn region field is refused");
    }

    #[test]
    fn short_input_asks_for_more() {
        let frame = encode_frame(1, &Message::ReadPages { slab_id: 1, first_page: 0, count: 1 });
        for cut in 0..frame.len() {
            assert_eq!(decode_frame(&frame[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn flipped_bit_is_caught() {
        let frame = encode_frame(1, &Message::WritePages { slab_id: 1, first_page: 0, data: &[1; 4096] });
        for byte in (0..frame.len()).filter(|b| !(20..24).contains(b)) {
            let mut bad = frame.clone();
            bad[byte] ^= 0x10;
            // A damaged length may also just ask for more bytes; what must never happen is
            // accepting the frame.
            assert!(!matches!(decode_frame(&bad), Ok(Some(_))), "flip in byte {byte} went unnoticed");
        }
    }

    #[test]
    fn header_rejects_foreign_and_future_frames() {
        let mut frame = encode_frame(1, &Message::Ok);
        frame[0] = b'G';
        assert!(matches!(decode_frame(&frame), Err(DecodeError::BadMagic { .. })));
        let mut frame = encode_frame(1, &Message::Ok);
        frame[2] = MAX_VERSION + 1;
        assert_eq!(decode_frame(&frame), Err(DecodeError::UnsupportedVersion(MAX_VERSION + 1)));
        let mut frame = encode_frame(1, &Message::Ok);
        frame[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_frame(&frame), Err(DecodeError::PayloadTooLarge(u64::from(u32::MAX))));
    }

    #[test]
    fn write_lines_needs_one_line_per_mask_bit() {
        let lines = [0u8; 2 * LINE_SIZE];
        let msg = Message::WriteLines { slab_id: 1, page: 0, line_mask: 0b111, lines: &lines };
        let mut payload = Vec::new();
        msg.encode_payload(&mut payload);
        assert!(matches!(
            Message::decode(msg.kind(), &payload),
            Err(DecodeError::Malformed { kind: "WriteLines", .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Decoding never panics, whatever arrives.
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
        }

        /// Decoding a payload of any kind never panics either (headers with a valid CRC).
        #[test]
        fn payload_decode_is_total(kind in 0u8..32, payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(kind, &payload);
        }

        #[test]
        fn read_pages_roundtrips(slab in any::<u64>(), first in any::<u64>(), count in any::<u32>(), id in any::<u64>()) {
            let msg = Message::ReadPages { slab_id: slab, first_page: first, count };
            let frame = encode_frame(id, &msg);
            prop_assert_eq!(decode_frame(&frame), Ok(Some((id, msg, frame.len()))));
        }

        #[test]
        fn read_bytes_and_resume_roundtrip(slab in any::<u64>(), offset in any::<u64>(), len in any::<u32>(), id in any::<u64>()) {
            let msg = Message::ReadBytes { slab_id: slab, offset, len };
            let frame = encode_frame(id, &msg);
            prop_assert_eq!(decode_frame(&frame), Ok(Some((id, msg, frame.len()))));
            let msg = Message::Resume { session: offset };
            let frame = encode_frame(id, &msg);
            prop_assert_eq!(decode_frame(&frame), Ok(Some((id, msg, frame.len()))));
        }
    }
}
