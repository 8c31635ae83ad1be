//! Redundancy on the fault path: reads that gather K of a span's shards, write-backs to every
//! copy or shard, the consequences of a host's death, and rebuilding what it held.
//!
//! A rebuild copies a span's lost copy or shard onto a new host in batches of pages read
//! from the survivors. Write-backs keep flowing meanwhile: they go to the new slab too, whole
//! for a page the rebuild has not reached (so it is then current and the rebuild skips it),
//! sparse after. A batch read before such a write-back is therefore never written over it.

use std::time::Instant;

use clustermem_proto::{Message, LINE_SIZE, PAGE_SIZE};

use super::{Core, PageState, Placement, ShardState, SlabRef};
use crate::dirty::gather_lines;
use crate::transport::Pending;

/// Pages read per rebuild request.
const REBUILD_BATCH: usize = 64;
/// Rebuild batches in flight per span: enough to keep the links busy, few enough that
/// faults are not queued behind much rebuild traffic.
const REBUILD_DEPTH: usize = 4;
/// Spans rebuilt at once.
pub(super) const REBUILDS_AT_ONCE: usize = 2;

/// What a gather's pages are for.
#[derive(Debug)]
pub(super) enum GatherFor {
    /// A thread faulted on the (single) page.
    Fault { write: bool, started: Instant },
    /// Rebuilding shard `shard` of the span, for rebuild job `job`.
    Rebuild { shard: usize, job: u64 },
    /// Prefetching the pages.
    Prefetch,
}

/// A read that needs K shards of pages `first..first + count` (one span).
#[derive(Debug)]
pub(super) struct Gather {
    purpose: GatherFor,
    region: u32,
    first: usize,
    count: usize,
    /// Shard s of page k at `(s * count + k) * shard_len`.
    buf: Vec<u8>,
    /// Shards requested (arrived ones included); a failed request clears its bit.
    asked: u64,
    /// Shards arrived.
    have: u64,
    /// Shards whose host refused the read: not asked again.
    refused: u64,
}

/// A span's shard being copied onto a new host.
#[derive(Debug)]
pub(super) struct RebuildJob {
    region: u32,
    span: usize,
    shard: usize,
    /// Unique among the runtime's rebuilds (slab ids are only unique per host, and a shard
    /// may be rebuilt again after its first target died: an old batch must not land there).
    job: u64,
    /// Next page (in the span) to request.
    next: usize,
    inflight: usize,
}

impl Gather {
    /// Some shards are here, not all.
    pub(super) fn partly_here(&self) -> bool {
        self.have != 0
    }

    /// The pages a fault's or prefetch's gather reads (`None` for a rebuild's, which copies
    /// host data and installs nothing): region, first page, count.
    pub(super) fn installs(&self) -> Option<(u32, usize, usize)> {
        match self.purpose {
            GatherFor::Fault { .. } | GatherFor::Prefetch => Some((self.region, self.first, self.count)),
            GatherFor::Rebuild { .. } => None,
        }
    }
}

impl RebuildJob {
    pub(super) fn new(region: u32, span: usize, shard: usize, job: u64) -> Self {
        Self { region, span, shard, job, next: 0, inflight: 0 }
    }
}

/// Line mask of `n` lines from line 0.
fn low_lines(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl Core {
    /// Reads pages `first..first + count` of region `id` (all in one span) from enough of
    /// their shards, for `purpose`.
    pub(super) fn gather_start(&mut self, id: u32, first: usize, count: usize, purpose: GatherFor) {
        let Some(region) = self.regions.get(&id) else { return };
        let r = region.redundancy;
        let gid = self.next_gather;
        self.next_gather += 1;
        let buf = vec![0u8; r.shards() * count * r.shard_len()];
        self.gathers
            .insert(gid, Gather { purpose, region: id, first, count, buf, asked: 0, have: 0, refused: 0 });
        self.gather_dispatch(gid);
    }

    /// Asks live shards (data shards first: they need no decoding) until K are asked.
    fn gather_dispatch(&mut self, gid: u64) {
        let Core { gathers, regions, links, .. } = self;
        let Some(g) = gathers.get_mut(&gid) else { return };
        let Some(region) = regions.get(&g.region) else {
            gathers.remove(&gid);
            return;
        };
        let (needed, sl) = (region.redundancy.needed(), region.redundancy.shard_len());
        let skip = match g.purpose {
            GatherFor::Rebuild { shard, .. } => Some(shard),
            GatherFor::Fault { .. } | GatherFor::Prefetch => None,
        };
        let offset = ((g.first % region.slab_pages) * sl) as u64;
        let len = u32::try_from(g.count * sl).expect("a gather is at most a batch of pages");
        if let Some(placement) = region.slabs[g.first / region.slab_pages].as_ref() {
            for (i, shard) in placement.shards.iter().enumerate() {
                if g.asked.count_ones() as usize >= needed {
                    break;
                }
                if (g.asked | g.refused) & (1 << i) != 0
                    || skip == Some(i)
                    || !matches!(shard.state, ShardState::Live)
                {
                    continue;
                }
                links[shard.slab.host].send(
                    &Message::ReadBytes { slab_id: shard.slab.slab_id, offset, len },
                    Pending::Part { gather: gid, shard: i as u8 },
                );
                g.asked |= 1 << i;
            }
        }
        if (g.asked.count_ones() as usize) < needed {
            self.gather_fail(gid, "fewer of its hosts are alive than a read needs");
        }
    }

    /// A reply to shard `shard` of gather `gid`.
    pub(super) fn on_part(&mut self, gid: u64, shard: u8, msg: &Message<'_>) {
        let Some(g) = self.gathers.get_mut(&gid) else { return };
        let bit = 1u64 << shard;
        let shard_bytes = g.buf.len() / self.regions.get(&g.region).map_or(1, |r| r.redundancy.shards());
        match msg {
            Message::Pages { data, .. } if data.len() == shard_bytes => {
                let at = usize::from(shard) * shard_bytes;
                g.buf[at..at + shard_bytes].copy_from_slice(data);
                g.have |= bit;
                self.last_part = Instant::now();
                self.stats.bytes_fetched.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let needed = self.regions.get(&g.region).map_or(1, |r| r.redundancy.needed());
                if g.have.count_ones() as usize >= needed {
                    self.gather_complete(gid);
                }
            }
            other => {
                eprintln!("clustermem: a shard read was refused ({other:?}); trying another shard");
                g.asked &= !bit;
                g.refused |= bit;
                self.gather_dispatch(gid);
            }
        }
    }

    /// Shard `shard` of gather `gid` will not arrive (its host died): ask another.
    pub(super) fn part_lost(&mut self, gid: u64, shard: u8) {
        if let Some(g) = self.gathers.get_mut(&gid) {
            g.asked &= !(1u64 << shard);
            self.gather_dispatch(gid);
        }
    }

    fn gather_complete(&mut self, gid: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(mut g) = self.gathers.remove(&gid) else { return };
        let Some(region) = self.regions.get(&g.region) else { return };
        let needed = region.redundancy.needed();
        // Shard s of every page of the gather is `buf[s * per_shard..][..per_shard]`. The
        // code works byte by byte, so one decode serves the whole batch.
        let per_shard = g.count * region.redundancy.shard_len();
        if let Some(coder) = &region.coder {
            let data_mask = low_lines(needed);
            let all_data = g.have & data_mask == data_mask;
            let parity_wanted = matches!(g.purpose, GatherFor::Rebuild { shard, .. } if shard >= needed);
            if !all_data || parity_wanted {
                if let Err(why) = coder.reconstruct(&mut g.buf, per_shard, g.have, parity_wanted) {
                    self.gathers.insert(gid, g);
                    return self.gather_fail(gid, &why);
                }
            }
            if !all_data {
                self.stats.degraded_reads.fetch_add(g.count as u64, Relaxed);
            }
        }
        let sl = region.redundancy.shard_len();
        let erasure = region.coder.is_some();
        let buf = std::mem::take(&mut g.buf);
        match g.purpose {
            GatherFor::Rebuild { shard, job } => {
                // The shard being rebuilt (decoded above), or any copy that arrived.
                let from = if erasure { shard } else { g.have.trailing_zeros() as usize } * per_shard;
                self.rebuild_write(g.region, g.first, g.count, shard, job, &buf[from..from + per_shard]);
                self.rebuild_batch_done(g.region, g.first, shard, job, false);
            }
            // Only erasure-coded pages are gathered for faults and prefetches: page k is the
            // k-th piece of each data shard, in order (for one page, the data shards as they
            // lie in the buffer).
            GatherFor::Fault { write, started } => {
                self.install_fetched(g.region, g.first, &buf[..PAGE_SIZE], write, started);
            }
            GatherFor::Prefetch => {
                let mut pages = vec![0u8; g.count * PAGE_SIZE];
                for (k, page) in pages.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    for (i, piece) in page.chunks_exact_mut(sl).enumerate() {
                        piece.copy_from_slice(&buf[i * per_shard + k * sl..][..sl]);
                    }
                }
                self.install_prefetched(g.region, g.first, &pages);
            }
        }
    }

    fn gather_fail(&mut self, gid: u64, why: &str) {
        let Some(g) = self.gathers.remove(&gid) else { return };
        match g.purpose {
            GatherFor::Fault { .. } => {
                let Some(r) = self.regions.get_mut(&g.region) else { return };
                let state = r.pages[g.first];
                r.pages[g.first] &= !(PageState::FETCHING | PageState::WANTED);
                if state & PageState::RESIDENT == 0 {
                    r.record_loss(g.first, why);
                    let addr = r.addr(g.first);
                    self.poison(addr);
                }
            }
            GatherFor::Rebuild { shard, job } => {
                eprintln!("clustermem: rebuild of a span abandoned: {why}");
                self.rebuild_batch_done(g.region, g.first, shard, job, true);
            }
            // A thread waiting for one of the pages gets a fetch of its own (or the loss).
            GatherFor::Prefetch => {
                for page in g.first..g.first + g.count {
                    self.drop_prefetch(g.region, page);
                }
            }
        }
    }

    /// Writes the rebuilt shard of pages `first..first + count` (`content`: shard_len bytes a
    /// page) into the new slab, skipping pages already made current by a write-back.
    fn rebuild_write(&mut self, id: u32, first: usize, count: usize, shard: usize, job: u64, content: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let Core { regions, links, stats, scratch, .. } = self;
        let Some(region) = regions.get_mut(&id) else { return };
        let sl = region.redundancy.shard_len();
        let base = first % region.slab_pages;
        let Some(placement) = region.slabs[first / region.slab_pages].as_mut() else { return };
        let target = &mut placement.shards[shard];
        let slab_id = target.slab.slab_id;
        let ShardState::Rebuilding { done, job: current } = &mut target.state else { return };
        if *current != job {
            return;
        }
        let link = &mut links[target.slab.host];
        // (host page, line mask) being gathered into `scratch` after its prefix.
        let mut open: Option<(u64, u64)> = None;
        let mut lines: Vec<u8> = Vec::with_capacity(PAGE_SIZE);
        let mut send = |hp: u64, mask: u64, lines: &mut Vec<u8>, scratch: &mut Vec<u8>| {
            scratch.clear();
            clustermem_proto::encode_write_lines_prefix(scratch, slab_id, hp, mask);
            let kind = Message::WriteLines { slab_id: 0, page: 0, line_mask: 1, lines: &[] }.kind();
            let bytes = link.send_parts(kind, scratch, lines, Pending::Ignore);
            stats.bytes_rebuilt.fetch_add(bytes, Relaxed);
            lines.clear();
        };
        for k in 0..count {
            let p = base + k;
            if std::mem::replace(&mut done[p], true) {
                continue;
            }
            let off = p * sl;
            let hp = (off / PAGE_SIZE) as u64;
            let mask = low_lines(sl / LINE_SIZE) << ((off % PAGE_SIZE) / LINE_SIZE);
            match open {
                Some((open_hp, m)) if open_hp == hp => open = Some((hp, m | mask)),
                Some((open_hp, m)) => {
                    send(open_hp, m, &mut lines, scratch);
                    open = Some((hp, mask));
                }
                None => open = Some((hp, mask)),
            }
            lines.extend_from_slice(&content[k * sl..(k + 1) * sl]);
            stats.pages_rebuilt.fetch_add(1, Relaxed);
        }
        if let Some((hp, m)) = open {
            send(hp, m, &mut lines, scratch);
        }
    }

    /// A rebuild batch of job `job` finished (or `failed`: the span can no longer be read:
    /// the new slab is given back and the shard stays lost).
    fn rebuild_batch_done(&mut self, id: u32, first: usize, shard: usize, job: u64, failed: bool) {
        let Some(region) = self.regions.get(&id) else { return };
        let span = first / region.slab_pages;
        let Some(j) = self.rebuilds.iter_mut().find(|j| j.job == job) else { return };
        j.inflight -= 1;
        if !failed {
            return;
        }
        let Some(s) =
            self.regions.get_mut(&id).and_then(|r| r.slabs[span].as_mut()).map(|p| &mut p.shards[shard])
        else {
            return;
        };
        if matches!(s.state, ShardState::Rebuilding { job: current, .. } if current == job) {
            s.state = ShardState::Lost;
            let slab = s.slab;
            self.free_slab(slab);
        }
    }

    /// Keeps every active rebuild's batches in flight; a span whose batches are all written
    /// gets its shard back as live.
    pub(super) fn pump_rebuilds(&mut self) {
        let mut i = 0;
        while i < self.rebuilds.len() {
            let (id, span, shard, job) = {
                let j = &self.rebuilds[i];
                (j.region, j.span, j.shard, j.job)
            };
            let Some(region) = self.regions.get_mut(&id) else {
                self.rebuilds.swap_remove(i);
                continue;
            };
            let slab_pages = region.slab_pages;
            let span_pages = (region.pages.len() - span * slab_pages).min(slab_pages);
            let base = span * slab_pages;
            let Some(target) = region.slabs[span].as_mut().map(|p| &mut p.shards[shard]) else {
                self.rebuilds.swap_remove(i);
                continue;
            };
            let ShardState::Rebuilding { done, job: current } = &mut target.state else {
                // Its new host died too, or the batch reads failed: queued again or lost.
                self.rebuilds.swap_remove(i);
                continue;
            };
            if *current != job {
                self.rebuilds.swap_remove(i);
                continue;
            }
            let j = &mut self.rebuilds[i];
            let mut batches = Vec::new();
            while j.inflight + batches.len() < REBUILD_DEPTH && j.next < span_pages {
                // Pages never written back read as zeros on every host, the new slab too.
                while j.next < span_pages
                    && (done[j.next] || region.pages[base + j.next] & PageState::ON_HOST == 0)
                {
                    done[j.next] = true;
                    j.next += 1;
                }
                if j.next == span_pages {
                    break;
                }
                let n = REBUILD_BATCH.min(span_pages - j.next);
                batches.push((base + j.next, n));
                j.next += n;
            }
            if j.next == span_pages && j.inflight == 0 && batches.is_empty() {
                target.state = ShardState::Live;
                self.rebuilds.swap_remove(i);
                continue;
            }
            j.inflight += batches.len();
            for (first, n) in batches {
                self.gather_start(id, first, n, GatherFor::Rebuild { shard, job });
            }
            i += 1;
        }
    }

    /// Sends the write-back of resident, write-protected `page` of region `id` (`data`),
    /// whose lines `mask` changed, to every copy or shard holding data: changed lines (or
    /// the whole page past the threshold) to each copy; changed data lines to their data
    /// shards and the parity lines at the changed positions, computed from the page, to
    /// each parity shard. Returns the bytes sent.
    pub(super) fn send_write_back(&mut self, id: u32, page: usize, data: &[u8], mask: u64) -> u64 {
        let Core { regions, links, scratch, config, parity, .. } = self;
        let region = regions.get_mut(&id).expect("caller checked");
        let sp = page % region.slab_pages;
        let needed = region.redundancy.needed();
        let placement: &mut Placement =
            region.slabs[page / region.slab_pages].as_mut().expect("caller checked the page is committed");
        let mut bytes = 0;
        // Parity at every line position written below, for all parity shards at once.
        if let Some(coder) = &region.coder {
            let lps = coder.lines_per_shard();
            let rebuilding =
                placement.shards.iter().any(|s| matches!(s.state, ShardState::Rebuilding { .. }));
            let positions = if rebuilding {
                low_lines(lps)
            } else {
                (0..needed).fold(0, |acc, d| acc | ((mask >> (d * lps)) & low_lines(lps)))
            };
            parity.resize((region.redundancy.shards() - needed) * lps * LINE_SIZE, 0);
            coder.parity_lines(data, positions, parity);
        }
        for (i, shard) in placement.shards.iter_mut().enumerate() {
            let whole = match &mut shard.state {
                ShardState::Lost => continue,
                ShardState::Live => false,
                // Not reached by the rebuild yet: the whole page makes it current.
                ShardState::Rebuilding { done, .. } => !std::mem::replace(&mut done[sp], true),
            };
            let SlabRef { host, slab_id, .. } = shard.slab;
            let link = &mut links[host];
            let pending = Pending::WriteBack { region: id, page };
            let Some(coder) = &region.coder else {
                bytes += if whole || mask.count_ones() > config.line_threshold {
                    let mut prefix = [0u8; 16];
                    prefix[..8].copy_from_slice(&slab_id.to_le_bytes());
                    prefix[8..].copy_from_slice(&(sp as u64).to_le_bytes());
                    let kind = Message::WritePages { slab_id: 0, first_page: 0, data: &[] }.kind();
                    link.send_parts(kind, &prefix, data, pending)
                } else {
                    scratch.clear();
                    clustermem_proto::encode_write_lines_prefix(scratch, slab_id, sp as u64, mask);
                    let prefix_len = scratch.len();
                    gather_lines(data, mask, scratch);
                    let kind = Message::WriteLines { slab_id: 0, page: 0, line_mask: 1, lines: &[] }.kind();
                    let (prefix, lines) = scratch.split_at(prefix_len);
                    link.send_parts(kind, prefix, lines, pending)
                };
                continue;
            };
            let lps = coder.lines_per_shard();
            let all = low_lines(lps);
            // Line positions (within a shard) this shard must rewrite.
            let positions = if whole {
                all
            } else if i < needed {
                (mask >> (i * lps)) & all
            } else {
                (0..needed).fold(0, |acc, d| acc | ((mask >> (d * lps)) & all))
            };
            if positions == 0 {
                continue;
            }
            let off = sp * lps * LINE_SIZE;
            let host_mask = positions << ((off % PAGE_SIZE) / LINE_SIZE);
            scratch.clear();
            clustermem_proto::encode_write_lines_prefix(
                scratch,
                slab_id,
                (off / PAGE_SIZE) as u64,
                host_mask,
            );
            let prefix_len = scratch.len();
            let mut rest = positions;
            while rest != 0 {
                let l = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let at = (i * lps + l) * LINE_SIZE;
                if i < needed {
                    scratch.extend_from_slice(&data[at..at + LINE_SIZE]);
                } else {
                    scratch.extend_from_slice(&parity[at - needed * lps * LINE_SIZE..][..LINE_SIZE]);
                }
            }
            let kind = Message::WriteLines { slab_id: 0, page: 0, line_mask: 1, lines: &[] }.kind();
            let (prefix, lines) = scratch.split_at(prefix_len);
            bytes += link.send_parts(kind, prefix, lines, pending);
        }
        bytes
    }

    /// Marks every shard on dead host `h` lost: spans that keep enough shards are queued for
    /// rebuild; the others' pages that live only on the hosts are lost.
    pub(super) fn shards_lost(&mut self, h: usize, why: &str) {
        for (&id, r) in &mut self.regions {
            let needed = r.redundancy.needed();
            for span in 0..r.slabs.len() {
                let Some(p) = r.slabs[span].as_mut() else { continue };
                let mut hit = Vec::new();
                for (i, shard) in p.shards.iter_mut().enumerate() {
                    if shard.slab.host == h && !matches!(shard.state, ShardState::Lost) {
                        shard.state = ShardState::Lost;
                        hit.push(i);
                    }
                }
                if hit.is_empty() {
                    continue;
                }
                if p.live() >= needed {
                    if r.redundancy.shards() > 1 {
                        self.rebuild_queue.extend(hit.into_iter().map(|i| (id, span, i)));
                    }
                    continue;
                }
                let end = ((span + 1) * r.slab_pages).min(r.pages.len());
                for page in span * r.slab_pages..end {
                    if PageState::only_on_host(r.pages[page]) {
                        r.record_loss(page, why);
                    }
                }
            }
        }
    }

    /// Re-sends the fetch of `page` for a thread to a surviving copy, or fails it.
    pub(super) fn refetch(&mut self, id: u32, page: usize, write: bool, started: Instant, why: &str) {
        let Some(r) = self.regions.get_mut(&id) else { return };
        if r.pages[page] & PageState::RESIDENT != 0 {
            return;
        }
        if r.coder.is_some() {
            self.gather_start(id, page, 1, GatherFor::Fault { write, started });
            return;
        }
        match r.read_copy(page) {
            Some((slab, slab_page)) => {
                self.links[slab.host].send(
                    &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count: 1 },
                    Pending::Fetch { region: id, page, write, started, offset: None },
                );
            }
            None => {
                r.pages[page] &= !(PageState::FETCHING | PageState::WANTED);
                r.record_loss(page, why);
                let addr = r.addr(page);
                self.poison(addr);
            }
        }
    }

    /// Slabs of ours on host `h` that hold data (what a resumed session must get back).
    pub(super) fn slabs_on(&self, h: usize) -> u64 {
        let shards = self.regions.values().flat_map(|r| r.slabs.iter().flatten()).flat_map(|p| &p.shards);
        shards.filter(|s| s.slab.host == h && !matches!(s.state, ShardState::Lost)).count() as u64
    }

    /// Spans waiting for or being rebuilt.
    pub(super) fn rebuilds_pending(&self) -> usize {
        self.rebuild_queue.len() + self.rebuilds.len()
    }
}
