//! Where a pool's bytes live: a small positional-I/O trait, a real file, and a simulated disk.
//!
//! Every byte the region persists goes through [`Storage`], so the same commit, checkpoint and
//! recovery code runs over a real file and over [`SimDisk`], which can "crash": it keeps what
//! was synced plus a random, torn subset of what was not. That is what the seeded crash tests
//! use to prove recovery exact without killing processes or real power.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::rng::SplitMix64;

/// Positional, syncable byte storage for one pool.
///
/// Implementations MUST make `sync` a barrier: every `write_at` that returned before `sync`
/// was called is durable when `sync` returns. Writes not yet synced may survive a crash in
/// part, in any order, torn at any byte.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Writes all of `buf` at byte `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills all of `buf` from byte `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length (new bytes read as zero).
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// A [`Storage`] over a real file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wraps an open read-write file.
    pub fn new(file: File) -> Self {
        Self { file }
    }
}

impl Storage for FileStorage {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// Sector size at which [`SimDisk`] tears unsynced writes.
pub const SIM_SECTOR_BYTES: usize = 512;

/// An in-memory disk that can simulate a crash.
///
/// Reads see every write. [`SimDisk::crash`] returns the disk as it would be found after power
/// loss: the image at the last `sync`, plus, for each later write, a random subset of its
/// sectors, one of which may itself be torn at a random byte. It can also be told to fail every
/// operation after a number of writes ([`SimDisk::fail_after_writes`]), to crash in the middle
/// of a multi-step procedure such as recovery.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    inner: Arc<Mutex<SimInner>>,
}

#[derive(Debug, Default)]
struct SimInner {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Unsynced writes in issue order.
    pending: Vec<(u64, Vec<u8>)>,
    writes_left: Option<u64>,
    syncs: u64,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After `n` more successful writes, every write and sync fails (a dead disk), so the code
    /// under test stops where a crash would stop it.
    pub fn fail_after_writes(&self, n: u64) {
        self.lock().writes_left = Some(n);
    }

    /// Number of completed syncs.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The disk found after a crash now: synced bytes plus a random torn subset of the rest.
    pub fn crash(&self, rng: &mut SplitMix64) -> SimDisk {
        let g = self.lock();
        let mut image = g.durable.clone();
        for (offset, data) in &g.pending {
            let off = usize::try_from(*offset).expect("sim offsets fit usize");
            if image.len() < off + data.len() {
                // A write past the end extends the file only if some of it lands.
                if rng.below(2) == 0 {
                    continue;
                }
                image.resize(off + data.len(), 0);
            }
            let mut pos = 0;
            while pos < data.len() {
                // Sectors are aligned on the disk, not on the write.
                let sector_end = ((off + pos) / SIM_SECTOR_BYTES + 1) * SIM_SECTOR_BYTES - off;
                let end = sector_end.min(data.len());
                match rng.below(8) {
                    0..=3 => {} // lost
                    4..=6 => image[off + pos..off + end].copy_from_slice(&data[pos..end]),
                    _ => {
                        // Torn inside the sector: a prefix landed.
                        let cut = pos + rng.below((end - pos) as u64 + 1) as usize;
                        image[off + pos..off + cut].copy_from_slice(&data[pos..cut]);
                    }
                }
                pos = end;
            }
        }
        let inner = SimInner { durable: image.clone(), current: image, ..SimInner::default() };
        SimDisk { inner: Arc::new(Mutex::new(inner)) }
    }

    fn check_alive(g: &mut SimInner, is_write: bool) -> io::Result<()> {
        match &mut g.writes_left {
            Some(0) => Err(io::Error::other("simulated disk failure")),
            Some(n) if is_write => {
                *n -= 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Storage for SimDisk {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        Self::check_alive(&mut g, true)?;
        let off = usize::try_from(offset).map_err(io::Error::other)?;
        if g.current.len() < off + buf.len() {
            g.current.resize(off + buf.len(), 0);
        }
        g.current[off..off + buf.len()].copy_from_slice(buf);
        g.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        let off = usize::try_from(offset).map_err(io::Error::other)?;
        let src = g
            .current
            .get(off..off + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut g = self.lock();
        Self::check_alive(&mut g, false)?;
        g.durable = g.current.clone();
        g.pending.clear();
        g.syncs += 1;
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        Self::check_alive(&mut g, true)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        g.current.resize(len, 0);
        // A size change is metadata: model it as durable only after the next sync, like data.
        let data = g.current.get(g.durable.len().min(len)..).map(<[u8]>::to_vec).unwrap_or_default();
        let at = g.durable.len().min(len) as u64;
        g.pending.push((at, data));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_may_tear() {
        let disk = SimDisk::new();
        disk.write_at(&[1u8; 4096], 0).unwrap();
        disk.sync().unwrap();
        disk.write_at(&[2u8; 4096], 0).unwrap();
        let mut rng = SplitMix64::new(7);
        let mut saw_mixed = false;
        for _ in 0..64 {
            let after = disk.crash(&mut rng);
            let mut buf = [0u8; 4096];
            after.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 1 || b == 2));
            saw_mixed |= buf.contains(&1) && buf.contains(&2);
        }
        assert!(saw_mixed, "a crash should sometimes tear an unsynced write");
    }

    #[test]
    fn fail_after_writes_stops_the_disk() {
        let disk = SimDisk::new();
        disk.fail_after_writes(1);
        disk.write_at(&[1], 0).unwrap();
        assert!(disk.write_at(&[1], 1).is_err());
        assert!(disk.sync().is_err());
    }
}
