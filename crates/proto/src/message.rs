//! Message payloads: one variant per kind byte, borrowed from the frame so page data is never
//! copied by decoding.

use crate::{DecodeError, LINE_SIZE, PAGE_SIZE};

/// [`Message::Hello`] flag: busy-poll this connection while it is active.
pub const HELLO_LOW_LATENCY: u8 = 1;
/// [`Message::Hello`] flag: the client reads [`Message::HelloOk`]'s `features` (clients older
/// than feature bits would refuse the extra field, so a host sends it only when asked).
pub const HELLO_ASKS_FEATURES: u8 = 2;
/// [`Message::HelloOk`] feature bit: the host answers [`Message::ChasePointers`].
pub const FEATURE_CHASE_POINTERS: u64 = 1;
/// [`Message::HelloOk`] feature bit: the host applies [`Message::XorLines`], and every
/// replayed write of a resumed session at most once (what erasure coding needs).
pub const FEATURE_XOR_LINES: u64 = 2;
/// Most pointers one [`Message::ChasePointers`] follows.
pub const MAX_CHASE_HOPS: u8 = 64;

/// Why a memory host refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Granting the request would exceed the host's donated capacity.
    OutOfCapacity,
    /// The slab id names no slab of this host that the client owns.
    NoSuchSlab,
    /// The page range lies outside the slab.
    OutOfRange,
    /// The request is not valid in this state (e.g. before the handshake).
    BadRequest,
    /// No protocol version in the client's range is spoken by the host.
    VersionMismatch,
    /// The host failed to do what was asked (a system call failed).
    HostFault,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    fn to_u16(self) -> u16 {
        match self {
            Self::OutOfCapacity => 1,
            Self::NoSuchSlab => 2,
            Self::OutOfRange => 3,
            Self::BadRequest => 4,
            Self::VersionMismatch => 5,
            Self::HostFault => 6,
            Self::Other(c) => c,
        }
    }

    fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::OutOfCapacity,
            2 => Self::NoSuchSlab,
            3 => Self::OutOfRange,
            4 => Self::BadRequest,
            5 => Self::VersionMismatch,
            6 => Self::HostFault,
            c => Self::Other(c),
        }
    }
}

/// A memory host's accounting, as reported by [`Message::Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// Bytes the host donates.
    pub capacity_bytes: u64,
    /// Bytes granted to slabs.
    pub used_bytes: u64,
    /// Live slabs.
    pub slabs: u64,
    /// Connected clients.
    pub clients: u64,
    /// Slabs whose session's connection ended and that wait, for the host's grace period, to
    /// be adopted by a [`Message::Resume`] (counted in `slabs` and `used_bytes` too). On the
    /// wire an optional fifth field: a 32-byte payload from an older host decodes with 0.
    pub orphaned_slabs: u64,
    /// Distinct client regions the slabs belong to (by session and region tag). On the wire
    /// an optional sixth field: a 40-byte payload from an older host decodes with 0.
    pub regions: u64,
}

/// One protocol message. Requests go client -> host; each gets exactly one reply with the
/// same request id (`HelloOk`, `SlabAllocated`, `Pages`, `Ok`, `Stats`, `Resumed` or `Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Opens a session: the client speaks versions `min_version..=max_version`.
    Hello {
        /// Oldest version the client speaks.
        min_version: u8,
        /// Newest version the client speaks.
        max_version: u8,
        /// Bit 0 ([`HELLO_LOW_LATENCY`]): the host should busy-poll this connection for a short
        /// while after each reply instead of sleeping, trading a core for latency. Bit 1
        /// ([`HELLO_ASKS_FEATURES`]): reply with the host's feature bits.
        flags: u8,
    },
    /// The host accepts, choosing `version`.
    HelloOk {
        /// The version both sides use from now on.
        version: u8,
        /// The host's total donated capacity.
        capacity_bytes: u64,
        /// `FEATURE_*` bits the host supports. On the wire an optional third field, sent only
        /// to a client whose `Hello` set [`HELLO_ASKS_FEATURES`]; absent, it decodes as 0.
        features: u64,
    },
    /// Reserve `bytes` (a multiple of the page size) of host memory as a new slab.
    AllocSlab {
        /// Size of the slab.
        bytes: u64,
        /// Which of the client's regions the slab holds (a shard or copy of) — any
        /// client-chosen tag, for `clustermem status`; 0 when untagged. On the wire an
        /// optional second field: an 8-byte payload from an older client decodes with 0.
        region: u64,
    },
    /// The new slab's id.
    SlabAllocated {
        /// Host-unique slab id.
        slab_id: u64,
    },
    /// Release a slab and its memory.
    FreeSlab {
        /// The slab to free.
        slab_id: u64,
    },
    /// Read `count` pages starting at `first_page` of a slab.
    ReadPages {
        /// The slab.
        slab_id: u64,
        /// First page index within the slab.
        first_page: u64,
        /// Number of pages.
        count: u32,
    },
    /// Contents answering `ReadPages` (`first_page` and `count * PAGE_SIZE` bytes) or
    /// `ReadBytes` (the byte `offset` in `first_page` and exactly `len` bytes). The decoder
    /// only requires non-empty data: the requester knows what it asked for and must check the
    /// length.
    Pages {
        /// First page index, or the byte offset for `ReadBytes` (echoed, so replies are
        /// self-describing).
        first_page: u64,
        /// The bytes read.
        data: &'a [u8],
    },
    /// Overwrite whole pages.
    WritePages {
        /// The slab.
        slab_id: u64,
        /// First page index.
        first_page: u64,
        /// A whole number of pages.
        data: &'a [u8],
    },
    /// Overwrite some 64-byte lines of one page, atomically with respect to readers.
    WriteLines {
        /// The slab.
        slab_id: u64,
        /// Page index within the slab.
        page: u64,
        /// Bit `i` set: line `i` follows, in ascending order.
        line_mask: u64,
        /// `popcount(line_mask) * LINE_SIZE` bytes.
        lines: &'a [u8],
    },
    /// XOR some 64-byte lines into one page (`page[line] ^= data`), atomically with respect to
    /// readers: how an erasure-coded region updates a parity page by the change of one of its
    /// data pages. Not idempotent: a host applies each write's request id at most once per
    /// session (a replayed one already applied is only acknowledged).
    XorLines {
        /// The slab.
        slab_id: u64,
        /// Page index within the slab.
        page: u64,
        /// Bit `i` set: line `i` follows, in ascending order.
        line_mask: u64,
        /// `popcount(line_mask) * LINE_SIZE` bytes.
        lines: &'a [u8],
    },
    /// Success with nothing to return.
    Ok,
    /// Ask for the host's accounting.
    GetStats,
    /// The host's accounting.
    Stats(HostStats),
    /// The request failed.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: &'a str,
    },
    /// Forget `count` pages from `first_page` of a slab: they read as zeros afterwards and the
    /// host gives their memory back (the program freed them).
    DiscardPages {
        /// The slab.
        slab_id: u64,
        /// First page index within the slab.
        first_page: u64,
        /// Number of pages.
        count: u32,
    },
    /// Read `len` bytes from byte `offset` of a slab, any alignment: erasure-coded shards of
    /// pages are smaller than a page. Answered by `Pages { first_page: offset, data }` with
    /// exactly `len` bytes; each page the range touches is read atomically with respect to
    /// writes, as for `ReadPages`.
    ReadBytes {
        /// The slab.
        slab_id: u64,
        /// Byte offset within the slab.
        offset: u64,
        /// Bytes to read: at least 1, and the reply must fit a frame (`MAX_PAYLOAD - 8`).
        len: u32,
    },
    /// Binds this connection to the client-chosen, non-zero session token `session` (sent
    /// right after `Hello`). When a bound connection ends its slabs are kept for the host's
    /// grace period as orphans of the session, and a later connection that resumes the same
    /// session adopts them: a client survives the loss of its TCP connection. Answered by
    /// `Resumed` once any orphans are adopted.
    Resume {
        /// The session token.
        session: u64,
    },
    /// The reply to `Resume`: how many slabs this connection adopted. A client that expected
    /// some and got none is talking to a host that restarted (or whose grace ran out): its
    /// data there is gone.
    Resumed {
        /// Slabs adopted.
        slabs: u64,
    },
    /// Follow a chain of pointers through this host's copy of a region, near the data: a
    /// linked structure costs the client one round trip per `hops` pointers instead of one
    /// per pointer. From the 64-byte line holding `start`, the host takes the line's first
    /// 8-byte value that points into the region (and not into the same line), records it, and
    /// goes on from the line it points to, until `hops` values are recorded, a line holds no
    /// such value, or a value points into a span with no copy here. Answered by `Chain`. Only
    /// advice: the host's copy may be older than the client's.
    ChasePointers {
        /// Region address to start from.
        start: u64,
        /// Pointers to follow: 1 to [`MAX_CHASE_HOPS`].
        hops: u8,
        /// The region's first address.
        base: u64,
        /// Bytes per span: the address `v` lies in span `(v - base) / span_bytes`, at that
        /// offset of the span's slab (non-zero).
        span_bytes: u64,
        /// Per span, the little-endian u64 id of the slab holding its copy on this host, 0
        /// where this host holds none: non-empty, a whole number of ids.
        slabs: &'a [u8],
    },
    /// The reply to `ChasePointers`: the values recorded, in chain order, as little-endian
    /// u64s (possibly none).
    Chain {
        /// The addresses, 8 bytes each.
        addresses: &'a [u8],
    },
}

const KINDS: [&str; 20] = [
    "Hello",
    "HelloOk",
    "AllocSlab",
    "SlabAllocated",
    "FreeSlab",
    "ReadPages",
    "Pages",
    "WritePages",
    "WriteLines",
    "Ok",
    "GetStats",
    "Stats",
    "Error",
    "DiscardPages",
    "ReadBytes",
    "Resume",
    "Resumed",
    "ChasePointers",
    "Chain",
    "XorLines",
];

/// Name of a kind byte, or `None` when it names no message.
pub(crate) fn kind_name(kind: u8) -> Option<&'static str> {
    KINDS.get(usize::from(kind).checked_sub(1)?).copied()
}

/// Reads fixed-size fields from a payload, failing (never panicking) when it runs short.
struct Reader<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Malformed { kind: self.kind, why: "payload too short" });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// The remaining bytes; the payload is consumed.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed { kind: self.kind, why: "trailing bytes" })
        }
    }
}

fn whole_pages(kind: &'static str, data: &[u8]) -> Result<(), DecodeError> {
    if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) {
        return Err(DecodeError::Malformed { kind, why: "data is not a whole number of pages" });
    }
    Ok(())
}

impl<'a> Message<'a> {
    /// The kind byte of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::HelloOk { .. } => 2,
            Self::AllocSlab { .. } => 3,
            Self::SlabAllocated { .. } => 4,
            Self::FreeSlab { .. } => 5,
            Self::ReadPages { .. } => 6,
            Self::Pages { .. } => 7,
            Self::WritePages { .. } => 8,
            Self::WriteLines { .. } => 9,
            Self::Ok => 10,
            Self::GetStats => 11,
            Self::Stats(_) => 12,
            Self::Error { .. } => 13,
            Self::DiscardPages { .. } => 14,
            Self::ReadBytes { .. } => 15,
            Self::Resume { .. } => 16,
            Self::Resumed { .. } => 17,
            Self::ChasePointers { .. } => 18,
            Self::Chain { .. } => 19,
            Self::XorLines { .. } => 20,
        }
    }

    pub(crate) fn payload_len_hint(&self) -> usize {
        match self {
            Self::Pages { data, .. } | Self::WritePages { data, .. } => 16 + data.len(),
            Self::WriteLines { lines, .. } | Self::XorLines { lines, .. } => 24 + lines.len(),
            Self::Error { message, .. } => 2 + message.len(),
            Self::ChasePointers { slabs, .. } => 25 + slabs.len(),
            Self::Chain { addresses } => addresses.len(),
            _ => 32,
        }
    }

    /// Appends this message's payload to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Hello { min_version, max_version, flags } => {
                out.extend_from_slice(&[min_version, max_version, flags]);
            }
            Self::HelloOk { version, capacity_bytes, features } => {
                out.push(version);
                out.extend_from_slice(&capacity_bytes.to_le_bytes());
                if features != 0 {
                    out.extend_from_slice(&features.to_le_bytes());
                }
            }
            Self::ChasePointers { start, hops, base, span_bytes, slabs } => {
                out.extend_from_slice(&start.to_le_bytes());
                out.push(hops);
                out.extend_from_slice(&base.to_le_bytes());
                out.extend_from_slice(&span_bytes.to_le_bytes());
                out.extend_from_slice(slabs);
            }
            Self::Chain { addresses } => out.extend_from_slice(addresses),
            Self::AllocSlab { bytes, region } => {
                out.extend_from_slice(&bytes.to_le_bytes());
                out.extend_from_slice(&region.to_le_bytes());
            }
            Self::SlabAllocated { slab_id } | Self::FreeSlab { slab_id } => {
                out.extend_from_slice(&slab_id.to_le_bytes());
            }
            Self::ReadBytes { slab_id, offset, len } => {
                out.extend_from_slice(&slab_id.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Self::Resume { session } => out.extend_from_slice(&session.to_le_bytes()),
            Self::Resumed { slabs } => out.extend_from_slice(&slabs.to_le_bytes()),
            Self::ReadPages { slab_id, first_page, count }
            | Self::DiscardPages { slab_id, first_page, count } => {
                out.extend_from_slice(&slab_id.to_le_bytes());
                out.extend_from_slice(&first_page.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Self::Pages { first_page, data } => {
                out.extend_from_slice(&first_page.to_le_bytes());
                out.extend_from_slice(data);
            }
            Self::WritePages { slab_id, first_page, data } => {
                out.extend_from_slice(&write_pages_prefix(slab_id, first_page));
                out.extend_from_slice(data);
            }
            Self::WriteLines { slab_id, page, line_mask, lines }
            | Self::XorLines { slab_id, page, line_mask, lines } => {
                encode_write_lines_prefix(out, slab_id, page, line_mask);
                out.extend_from_slice(lines);
            }
            Self::Ok | Self::GetStats => {}
            Self::Stats(s) => {
                for v in [s.capacity_bytes, s.used_bytes, s.slabs, s.clients, s.orphaned_slabs, s.regions] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Self::Error { code, message } => {
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        }
    }

    /// Decodes a payload of the given kind. Total: never panics.
    pub fn decode(kind: u8, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let name = kind_name(kind).ok_or(DecodeError::UnknownKind(kind))?;
        let mut r = Reader { kind: name, rest: payload };
        let msg = match kind {
            1 => Self::Hello { min_version: r.u8()?, max_version: r.u8()?, flags: r.u8()? },
            2 => Self::HelloOk {
                version: r.u8()?,
                capacity_bytes: r.u64()?,
                // Absent from hosts older than feature bits, and when not asked for.
                features: if r.rest.is_empty() { 0 } else { r.u64()? },
            },
            18 => {
                let (start, hops, base, span_bytes) = (r.u64()?, r.u8()?, r.u64()?, r.u64()?);
                let slabs = r.rest();
                if !(1..=MAX_CHASE_HOPS).contains(&hops) {
                    return Err(DecodeError::Malformed { kind: name, why: "hops out of range" });
                }
                if span_bytes == 0 || slabs.is_empty() || !slabs.len().is_multiple_of(8) {
                    return Err(DecodeError::Malformed { kind: name, why: "bad span table" });
                }
                Self::ChasePointers { start, hops, base, span_bytes, slabs }
            }
            19 => {
                let addresses = r.rest();
                if !addresses.len().is_multiple_of(8) {
                    return Err(DecodeError::Malformed { kind: name, why: "addresses are not whole u64s" });
                }
                Self::Chain { addresses }
            }
            3 => Self::AllocSlab {
                bytes: r.u64()?,
                // Absent from clients older than region tags.
                region: if r.rest.is_empty() { 0 } else { r.u64()? },
            },
            4 => Self::SlabAllocated { slab_id: r.u64()? },
            5 => Self::FreeSlab { slab_id: r.u64()? },
            6 => Self::ReadPages { slab_id: r.u64()?, first_page: r.u64()?, count: r.u32()? },
            14 => Self::DiscardPages { slab_id: r.u64()?, first_page: r.u64()?, count: r.u32()? },
            15 => Self::ReadBytes { slab_id: r.u64()?, offset: r.u64()?, len: r.u32()? },
            16 => Self::Resume { session: r.u64()? },
            17 => Self::Resumed { slabs: r.u64()? },
            7 => {
                let first_page = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(DecodeError::Malformed { kind: name, why: "no data" });
                }
                Self::Pages { first_page, data }
            }
            8 => {
                let slab_id = r.u64()?;
                let first_page = r.u64()?;
                let data = r.rest();
                whole_pages(name, data)?;
                Self::WritePages { slab_id, first_page, data }
            }
            9 | 20 => {
                let slab_id = r.u64()?;
                let page = r.u64()?;
                let line_mask = r.u64()?;
                let lines = r.rest();
                if lines.len() != line_mask.count_ones() as usize * LINE_SIZE || line_mask == 0 {
                    return Err(DecodeError::Malformed {
                        kind: name,
                        why: "line data does not match the line mask",
                    });
                }
                if kind == 9 {
                    Self::WriteLines { slab_id, page, line_mask, lines }
                } else {
                    Self::XorLines { slab_id, page, line_mask, lines }
                }
            }
            10 => Self::Ok,
            11 => Self::GetStats,
            12 => Self::Stats(HostStats {
                capacity_bytes: r.u64()?,
                used_bytes: r.u64()?,
                slabs: r.u64()?,
                clients: r.u64()?,
                // Absent from hosts older than session resumption.
                orphaned_slabs: if r.rest.is_empty() { 0 } else { r.u64()? },
                // Absent from hosts older than region tags.
                regions: if r.rest.is_empty() { 0 } else { r.u64()? },
            }),
            13 => {
                let code = ErrorCode::from_u16(r.u16()?);
                let message = std::str::from_utf8(r.rest())
                    .map_err(|_| DecodeError::Malformed { kind: name, why: "message is not UTF-8" })?;
                Self::Error { code, message }
            }
            _ => return Err(DecodeError::UnknownKind(kind)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// The fixed part of a `WritePages` payload; the caller sends the pages after it (from
/// memory, with `writev`).
pub fn write_pages_prefix(slab_id: u64, first_page: u64) -> [u8; 16] {
    let mut prefix = [0u8; 16];
    prefix[..8].copy_from_slice(&slab_id.to_le_bytes());
    prefix[8..].copy_from_slice(&first_page.to_le_bytes());
    prefix
}

/// Appends the fixed part of a `WriteLines` or `XorLines` payload; the caller appends the lines (or sends
/// them from memory with `writev`).
pub fn encode_write_lines_prefix(out: &mut Vec<u8>, slab_id: u64, page: u64, line_mask: u64) {
    out.extend_from_slice(&slab_id.to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&line_mask.to_le_bytes());
}
