//! Change logs: persistent undo entries for the lines of a range that changed between two
//! calls.
//!
//! `region.log_changes(range)` copies the range; `stop()` compares it with the range now and
//! appends the pre-images of the changed lines (clipped to the range) as one CRC32C-checked
//! record to a side log (`POOL.changes`), synced before `stop` returns. `region.undo(id)`
//! writes them back in one failure-atomic transaction and appends an "undone" record.
//!
//! Where it stops working: the copy taken at `log_changes` costs RAM and time proportional to
//! the range; the side log only grows (no compaction yet).

use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::layout::{lines_of, LINE_BYTES};
use crate::region::{PersistentRegion, PmemError};
use crate::storage::{FileStorage, Storage};

/// Identifies one change log of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ChangeLogId(pub u64);

/// What a pool's change log holds about one recorded set of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangeLogInfo {
    /// Its id.
    pub id: ChangeLogId,
    /// How many (clipped) lines changed.
    pub lines: u32,
    /// Whether it was undone.
    pub undone: bool,
}

/// Records changes to a range until [`ChangeLog::stop`]; dropping it records nothing.
#[derive(Debug)]
pub struct ChangeLog<'r> {
    region: &'r PersistentRegion,
    range: Range<usize>,
    before: Vec<u8>,
}

impl<'r> ChangeLog<'r> {
    pub(crate) fn new(region: &'r PersistentRegion, range: Range<usize>, before: Vec<u8>) -> Self {
        Self { region, range, before }
    }

    /// Persists the pre-images of the lines of the range that changed since
    /// [`PersistentRegion::log_changes`]; returns the id to [`PersistentRegion::undo`] them.
    pub fn stop(self) -> Result<ChangeLogId, PmemError> {
        self.region.store_change_log(&self.range, &self.before)
    }
}

const MAGIC: u32 = u32::from_le_bytes(*b"CMCL");
const HEADER: usize = 32;
const KIND_LOG: u32 = 1;
const KIND_UNDONE: u32 = 2;

#[derive(Debug)]
struct Entry {
    id: u64,
    at: u64,
    len: usize,
    lines: u32,
    undone: bool,
}

/// The side log of change records.
#[derive(Debug)]
pub(crate) struct ChangeStore {
    storage: Option<Arc<dyn Storage>>,
    tail: u64,
    next_id: u64,
    logs: Vec<Entry>,
}

/// A file created on first write, so pools that never use change logs get no side file.
#[derive(Debug)]
pub(crate) struct LazyFile {
    path: PathBuf,
    file: OnceLock<FileStorage>,
}

impl LazyFile {
    fn get(&self, create: bool) -> io::Result<Option<&FileStorage>> {
        if let Some(f) = self.file.get() {
            return Ok(Some(f));
        }
        let r = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(&self.path);
        match r {
            Ok(f) => Ok(Some(self.file.get_or_init(|| FileStorage::new(f)))),
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Storage for LazyFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.get(true)?.expect("created").write_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.get(false)? {
            Some(f) => f.read_at(buf, offset),
            None if buf.is_empty() => Ok(()),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn sync(&self) -> io::Result<()> {
        match self.get(false)? {
            Some(f) => f.sync(),
            None => Ok(()),
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.get(false)?.map_or(Ok(0), Storage::len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.get(true)?.expect("created").set_len(len)
    }
}

impl ChangeStore {
    /// A change store kept in the file at `path`, created on first use.
    pub(crate) fn lazy_file(path: PathBuf) -> LazyFile {
        LazyFile { path, file: OnceLock::new() }
    }

    /// Scans the side log's valid prefix.
    pub(crate) fn open(storage: Option<Arc<dyn Storage>>) -> Result<Self, PmemError> {
        let mut s = Self { storage, tail: 0, next_id: 1, logs: Vec::new() };
        let Some(st) = &s.storage else { return Ok(s) };
        let len = st.len().map_err(PmemError::io("reading the change log length"))?;
        let mut all = vec![0u8; usize::try_from(len).map_err(|_| PmemError::NotAPool)?];
        st.read_at(&mut all, 0).map_err(PmemError::io("reading the change log"))?;
        let mut at = 0usize;
        while let Some((kind, id, entries, rec_len)) = decode(&all[at..]) {
            match kind {
                KIND_LOG => {
                    s.logs.push(Entry { id, at: at as u64, len: rec_len, lines: entries, undone: false });
                }
                _ => {
                    if let Some(e) = s.logs.iter_mut().find(|e| e.id == id) {
                        e.undone = true;
                    }
                }
            }
            s.next_id = s.next_id.max(id + 1);
            at += rec_len;
        }
        s.tail = at as u64;
        Ok(s)
    }

    fn storage(&self) -> Result<&Arc<dyn Storage>, PmemError> {
        self.storage.as_ref().ok_or(PmemError::NoChangeLogStorage)
    }

    fn write_record(
        &mut self,
        kind: u32,
        id: u64,
        entries: u32,
        payload: &[u8],
    ) -> Result<(u64, usize), PmemError> {
        let mut rec = vec![0u8; HEADER];
        rec[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        rec[8..12].copy_from_slice(&kind.to_le_bytes());
        rec[12..16].copy_from_slice(&entries.to_le_bytes());
        rec[16..24].copy_from_slice(&id.to_le_bytes());
        rec[24..28].copy_from_slice(&u32::try_from(payload.len()).expect("change log < 4 GiB").to_le_bytes());
        rec.extend_from_slice(payload);
        let crc = crc32c::crc32c(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let at = self.tail;
        let st = self.storage()?;
        st.write_at(&rec, at).map_err(PmemError::io("appending to the change log"))?;
        st.sync().map_err(PmemError::io("syncing the change log"))?;
        self.tail += rec.len() as u64;
        Ok((at, rec.len()))
    }

    /// Records the pre-images (`before`) of the lines of the range at `start` that differ in
    /// `now`.
    pub(crate) fn append(
        &mut self,
        start: usize,
        before: &[u8],
        now: &[u8],
    ) -> Result<ChangeLogId, PmemError> {
        self.storage()?;
        let end = start + before.len();
        let mut payload = Vec::new();
        let mut lines = 0u32;
        for line in lines_of(&(start..end)) {
            let a = (line * LINE_BYTES).max(start);
            let b = (line * LINE_BYTES + LINE_BYTES).min(end);
            if before[a - start..b - start] != now[a - start..b - start] {
                payload.extend_from_slice(&(a as u64).to_le_bytes());
                #[expect(clippy::cast_possible_truncation, reason = "at most one line")]
                payload.push((b - a) as u8);
                payload.extend_from_slice(&before[a - start..b - start]);
                lines += 1;
            }
        }
        let id = self.next_id;
        let (at, len) = self.write_record(KIND_LOG, id, lines, &payload)?;
        self.next_id += 1;
        self.logs.push(Entry { id, at, len, lines, undone: false });
        Ok(ChangeLogId(id))
    }

    /// The pre-images of log `id`, as (offset, bytes).
    pub(crate) fn lines_of(&self, id: ChangeLogId) -> Result<Vec<(usize, Vec<u8>)>, PmemError> {
        let e =
            self.logs.iter().find(|e| e.id == id.0 && !e.undone).ok_or(PmemError::UnknownChangeLog(id.0))?;
        let mut rec = vec![0u8; e.len];
        self.storage()?.read_at(&mut rec, e.at).map_err(PmemError::io("reading the change log"))?;
        if decode(&rec).is_none() {
            return Err(PmemError::UnknownChangeLog(id.0));
        }
        let mut out = Vec::new();
        let mut p = &rec[HEADER..];
        while p.len() >= 9 {
            let off = usize::try_from(u64::from_le_bytes(p[..8].try_into().expect("8 bytes")))
                .unwrap_or(usize::MAX);
            let n = usize::from(p[8]);
            out.push((off, p[9..9 + n].to_vec()));
            p = &p[9 + n..];
        }
        Ok(out)
    }

    /// Appends the "undone" mark for `id`.
    pub(crate) fn mark_undone(&mut self, id: ChangeLogId) -> Result<(), PmemError> {
        self.write_record(KIND_UNDONE, id.0, 0, &[])?;
        if let Some(e) = self.logs.iter_mut().find(|e| e.id == id.0) {
            e.undone = true;
        }
        Ok(())
    }

    pub(crate) fn list(&self) -> Result<Vec<ChangeLogInfo>, PmemError> {
        self.storage()?;
        Ok(self
            .logs
            .iter()
            .map(|e| ChangeLogInfo { id: ChangeLogId(e.id), lines: e.lines, undone: e.undone })
            .collect())
    }
}

/// Validates one record at the start of `b`: (kind, id, entries, length).
fn decode(b: &[u8]) -> Option<(u32, u64, u32, usize)> {
    let h = b.get(..HEADER)?;
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != MAGIC {
        return None;
    }
    let len = HEADER + usize::try_from(u32_at(24)).ok()?;
    let rec = b.get(..len)?;
    if crc32c::crc32c(&rec[8..]) != u32_at(4) {
        return None;
    }
    let kind = u32_at(8);
    let entries = u32_at(12);
    let id = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    // Entries must parse exactly and stay within one line each.
    let mut p = &rec[HEADER..];
    let mut n = 0;
    while !p.is_empty() {
        let k = usize::from(*p.get(8)?);
        if k == 0 || k > LINE_BYTES {
            return None;
        }
        p = p.get(9 + k..)?;
        n += 1;
    }
    ((kind == KIND_LOG || kind == KIND_UNDONE) && n == entries).then_some((kind, id, entries, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SimDisk;

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_ignored() {
        let disk = SimDisk::new();
        let st: Arc<dyn Storage> = Arc::new(disk.clone());
        let mut s = ChangeStore::open(Some(Arc::clone(&st))).unwrap();
        let before = vec![0u8; 256];
        let mut now = before.clone();
        now[70] = 1;
        now[200] = 2;
        let id = s.append(10, &before[10..], &now[10..]).unwrap();
        assert_eq!(s.list().unwrap()[0].lines, 2);
        // A torn record after it.
        disk.write_at(&[0x43, 0x4d, 0x43, 0x4c, 1, 2, 3], s.tail).unwrap();
        let s2 = ChangeStore::open(Some(st)).unwrap();
        assert_eq!(s2.list().unwrap(), vec![ChangeLogInfo { id, lines: 2, undone: false }]);
        let lines = s2.lines_of(id).unwrap();
        assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), vec![64, 192]);
    }
}
