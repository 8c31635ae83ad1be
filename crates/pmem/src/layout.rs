//! On-disk layout of a pool file: header slots, data area, redo log records.
//!
//! ```text
//! [0, 4096)                      header: two 512-byte slots (A at 0, B at 512)
//! [4096, 4096+data)              data area: the region's committed contents
//! [4096+data, 4096+data+log)     redo log, reused from offset 0 after each checkpoint
//! ```
//!
//! A checkpoint writes the slot the current one is not, with `seq + 1`; a torn slot fails its
//! CRC and the other, older slot is used. Each checkpoint starts a new log *epoch* (= `seq`), and
//! every record carries its epoch and LSN, so recovery replays from log offset 0 exactly the
//! records `checkpoint_lsn, checkpoint_lsn+1, ...` of the current epoch and stops at the first
//! record that is torn, stale (older epoch) or out of sequence. Because recovery always ends
//! with a checkpoint (a new epoch), a position of the log is written at most once per epoch,
//! and a valid record found there is always the one written for that LSN in that epoch.

use std::ops::Range;

/// Bytes before the data area.
pub const HEADER_BYTES: u64 = 4096;
/// Size of one header slot.
const SLOT_BYTES: usize = 512;
/// Bytes of a slot covered by its CRC.
const SLOT_USED: usize = 48;
/// `"CMPMPOOL"` little-endian.
pub const POOL_MAGIC: u64 = u64::from_le_bytes(*b"CMPMPOOL");
/// Current layout version.
pub const POOL_VERSION: u32 = 1;
/// Tracking and diff granularity.
pub const LINE_BYTES: usize = 64;

/// The header's content (one slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Size of the data area (the region).
    pub data_bytes: u64,
    /// Size of the redo log area.
    pub log_bytes: u64,
    /// Checkpoint sequence number; also the log epoch.
    pub seq: u64,
    /// LSN of the first record the log may hold.
    pub checkpoint_lsn: u64,
}

/// Why a header slot was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// Not a clustermem pool.
    Magic,
    /// Magic right, checksum wrong: damaged or torn.
    Checksum,
    /// Written by another layout version.
    Version(u32),
}

impl Header {
    /// Offset of the log area in the pool file.
    pub fn log_offset(&self) -> u64 {
        HEADER_BYTES + self.data_bytes
    }

    /// Expected total file length.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES + self.data_bytes + self.log_bytes
    }

    /// Byte offset of this header's slot (slots alternate with `seq`).
    pub fn slot_offset(&self) -> u64 {
        (self.seq % 2) * SLOT_BYTES as u64
    }

    /// Encodes into one slot.
    pub fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(&POOL_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&POOL_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.log_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.checkpoint_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SLOT_USED]);
        b[SLOT_USED..SLOT_USED + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one slot.
    pub fn decode(b: &[u8; SLOT_BYTES]) -> Result<Self, SlotError> {
        if u64_at(b, 0) != POOL_MAGIC {
            return Err(SlotError::Magic);
        }
        if crc32c::crc32c(&b[..SLOT_USED]) != u32_at(b, SLOT_USED) {
            return Err(SlotError::Checksum);
        }
        let version = u32_at(b, 8);
        if version != POOL_VERSION {
            return Err(SlotError::Version(version));
        }
        Ok(Self {
            data_bytes: u64_at(b, 16),
            log_bytes: u64_at(b, 24),
            seq: u64_at(b, 32),
            checkpoint_lsn: u64_at(b, 40),
        })
    }

    /// Picks the newest valid slot of the two at the start of `page` (the first 1024 bytes).
    pub fn choose(page: &[u8; 2 * SLOT_BYTES]) -> Result<Self, SlotError> {
        let (a, b) = page.split_at(SLOT_BYTES);
        let a = Self::decode(a.try_into().expect("slot size"));
        let b = Self::decode(b.try_into().expect("slot size"));
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if a.seq >= b.seq { a } else { b }),
            (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok(h),
            // Report the most specific reason: a version mismatch, then damage, then "not a pool".
            (Err(a), Err(b)) => Err(match (a, b) {
                (SlotError::Version(v), _) | (_, SlotError::Version(v)) => SlotError::Version(v),
                (SlotError::Checksum, _) | (_, SlotError::Checksum) => SlotError::Checksum,
                _ => SlotError::Magic,
            }),
        }
    }
}

/// Bytes of both header slots.
pub const SLOTS_BYTES: usize = 2 * SLOT_BYTES;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// `"CMRL"`: start of a redo record.
const REC_MAGIC: u32 = u32::from_le_bytes(*b"CMRL");
/// Fixed record header: magic, crc, epoch, lsn, payload length, entry count.
pub const REC_HEADER_BYTES: usize = 32;
/// Per-entry overhead: data offset (u64) and length (u8).
pub const ENTRY_HEADER_BYTES: usize = 9;

/// Builds one redo record: a transaction's changed bytes, each entry inside one 64-byte line.
///
/// A record is its own commit record: the CRC32C covers the epoch, LSN and every entry, so a
/// record is applied whole or, if torn, not at all.
#[derive(Debug, Default)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    entries: u32,
}

impl RecordBuilder {
    /// Starts an empty record (reusing the buffer).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.buf.resize(REC_HEADER_BYTES, 0);
        self.entries = 0;
    }

    /// Adds `bytes` (at most one line, not crossing a line boundary) at data offset `offset`.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) {
        debug_assert!(!bytes.is_empty() && bytes.len() <= LINE_BYTES);
        debug_assert_eq!(offset / LINE_BYTES as u64, (offset + bytes.len() as u64 - 1) / LINE_BYTES as u64);
        self.buf.extend_from_slice(&offset.to_le_bytes());
        #[expect(clippy::cast_possible_truncation, reason = "len <= 64")]
        self.buf.push(bytes.len() as u8);
        self.buf.extend_from_slice(bytes);
        self.entries += 1;
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        self.buf.len().max(REC_HEADER_BYTES)
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Seals the record for `epoch`/`lsn` and returns its bytes.
    pub fn finish(&mut self, epoch: u64, lsn: u64) -> &[u8] {
        let payload = self.buf.len() - REC_HEADER_BYTES;
        let b = &mut self.buf;
        b[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&epoch.to_le_bytes());
        b[16..24].copy_from_slice(&lsn.to_le_bytes());
        b[24..28].copy_from_slice(&u32::try_from(payload).expect("record < 4 GiB").to_le_bytes());
        b[28..32].copy_from_slice(&self.entries.to_le_bytes());
        let crc = crc32c::crc32c(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// One entry of a decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Data-area offset.
    pub offset: u64,
    /// New bytes.
    pub bytes: &'a [u8],
}

/// A validated record: its entries and its encoded length.
#[derive(Debug)]
pub struct Record<'a> {
    payload: &'a [u8],
    entries: u32,
    /// Encoded length in the log.
    pub len: usize,
}

impl<'a> Record<'a> {
    /// Decodes the record at the start of `log` if it is intact, belongs to `epoch`, has LSN
    /// `lsn`, and every entry lies inside one line of a data area of `data_bytes`; `None`
    /// otherwise (torn, stale, foreign or garbage bytes: the end of the log).
    pub fn decode(log: &'a [u8], epoch: u64, lsn: u64, data_bytes: u64) -> Option<Self> {
        if log.len() < REC_HEADER_BYTES || u32_at(log, 0) != REC_MAGIC {
            return None;
        }
        if u64_at(log, 8) != epoch || u64_at(log, 16) != lsn {
            return None;
        }
        let payload_len = usize::try_from(u32_at(log, 24)).ok()?;
        let len = REC_HEADER_BYTES.checked_add(payload_len)?;
        let whole = log.get(..len)?;
        if crc32c::crc32c(&whole[8..]) != u32_at(log, 4) {
            return None;
        }
        let rec = Self { payload: &whole[REC_HEADER_BYTES..], entries: u32_at(log, 28), len };
        // Validate every entry once so that applying cannot fail half-way.
        let mut n = 0u32;
        for e in raw_entries(rec.payload) {
            let e = e?;
            let end = e.offset.checked_add(e.bytes.len() as u64)?;
            let line = LINE_BYTES as u64;
            if e.bytes.is_empty() || end > data_bytes || e.offset / line != (end - 1) / line {
                return None;
            }
            n += 1;
        }
        (n == rec.entries).then_some(rec)
    }

    /// The record's entries (already validated by [`Record::decode`]).
    pub fn entries(&self) -> impl Iterator<Item = Entry<'a>> + 'a {
        raw_entries(self.payload).map_while(Option::from)
    }
}

/// Parses entries; `Some(None)` marks a malformed tail.
fn raw_entries(payload: &[u8]) -> impl Iterator<Item = Option<Entry<'_>>> + '_ {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(head) = rest.get(..ENTRY_HEADER_BYTES) else {
            rest = &[];
            return Some(None);
        };
        let offset = u64_at(head, 0);
        let n = usize::from(head[8]);
        let Some(bytes) = rest.get(ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + n) else {
            rest = &[];
            return Some(None);
        };
        rest = &rest[ENTRY_HEADER_BYTES + n..];
        Some(Some(Entry { offset, bytes }))
    })
}

/// Lines (by index) that `range` touches.
pub fn lines_of(range: &Range<usize>) -> Range<usize> {
    range.start / LINE_BYTES..range.end.div_ceil(LINE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header { data_bytes: 1 << 20, log_bytes: 1 << 16, seq: 3, checkpoint_lsn: 9 }
    }

    #[test]
    fn header_round_trips_and_newest_slot_wins() {
        let old = Header { seq: 2, ..header() };
        let new = header();
        let mut page = [0u8; SLOTS_BYTES];
        page[..512].copy_from_slice(&old.encode());
        page[512..].copy_from_slice(&new.encode());
        assert_eq!(Header::choose(&page), Ok(new));
        // A torn newest slot falls back to the older one.
        page[512 + 20] ^= 1;
        assert_eq!(Header::choose(&page), Ok(old));
    }

    #[test]
    fn header_rejections_are_specific() {
        let mut page = [0u8; SLOTS_BYTES];
        assert_eq!(Header::choose(&page), Err(SlotError::Magic));
        page[..512].copy_from_slice(&header().encode());
        page[20] ^= 0xff;
        assert_eq!(Header::choose(&page), Err(SlotError::Checksum));
        let mut slot = header().encode();
        slot[8] = 2;
        let crc = crc32c::crc32c(&slot[..SLOT_USED]);
        slot[SLOT_USED..SLOT_USED + 4].copy_from_slice(&crc.to_le_bytes());
        page[..512].copy_from_slice(&slot);
        assert_eq!(Header::choose(&page), Err(SlotError::Version(2)));
    }

    #[test]
    fn record_round_trips_and_rejects_any_flipped_bit() {
        let mut b = RecordBuilder::default();
        b.reset();
        b.push(64, &[1, 2, 3]);
        b.push(130, &[9; 62]);
        let bytes = b.finish(5, 77).to_vec();
        let rec = Record::decode(&bytes, 5, 77, 4096).expect("valid record");
        assert_eq!(rec.len, bytes.len());
        let entries: Vec<_> = rec.entries().collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], Entry { offset: 64, bytes: &[1, 2, 3] });
        assert_eq!(entries[1].offset, 130);
        // Wrong epoch, wrong LSN, out-of-range data: rejected.
        assert!(Record::decode(&bytes, 4, 77, 4096).is_none());
        assert!(Record::decode(&bytes, 5, 78, 4096).is_none());
        assert!(Record::decode(&bytes, 5, 77, 128).is_none());
        // Every single-bit flip and every truncation is caught.
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Record::decode(&bad, 5, 77, 4096).is_none(), "bit {i}");
        }
        for n in 0..bytes.len() {
            assert!(Record::decode(&bytes[..n], 5, 77, 4096).is_none(), "len {n}");
        }
    }
}
