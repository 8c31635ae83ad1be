//! Redundancy on the fault path: reads that decode a page from K shards of its stripe when its
//! own host is lost, write-backs to every copy or to a data shard and its parity, zeroing an
//! erasure-coded page on its hosts, the consequences of a host's death, and rebuilding what it
//! held.
//!
//! A rebuild copies a span's lost copy or shard onto a new host in batches of stripes read
//! from the survivors. Write-backs keep flowing meanwhile and go to the new slab too: on a
//! stripe the rebuild has not read yet they are overwritten by what it reads later (which
//! includes them); on a stripe whose reads are in flight they make the batch stale, and the
//! stripe is read again; on a stripe already written they apply as on any live shard.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use clustermem_proto::{write_pages_prefix, Message, LINE_SIZE, PAGE_SIZE};

use super::{Core, PageState, ShardState, SlabRef};
use crate::dirty::{diff_lines, gather_lines};
use crate::transport::Pending;

/// Stripes read per rebuild request.
const REBUILD_BATCH: usize = 64;
/// Rebuild batches in flight per span: enough to keep the links busy, few enough that
/// faults are not queued behind much rebuild traffic.
const REBUILD_DEPTH: usize = 4;
/// Spans rebuilt at once.
pub(super) const REBUILDS_AT_ONCE: usize = 2;

/// How far a rebuild has got with one stripe (page index in every shard's slab) of its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Not read yet: a write meanwhile lands before the read, which then includes it.
    Todo,
    /// Its reads are in flight.
    Reading,
    /// Written to while its reads were in flight: what they bring is old; read again.
    Stale,
    /// Current on the new slab.
    Done,
}

/// What a gather's pages are for.
#[derive(Debug)]
pub(super) enum GatherFor {
    /// A thread faulted on the (single) page.
    Fault { write: bool, started: Instant },
    /// Rebuilding the target shard, for rebuild job `job`.
    Rebuild { job: u64 },
    /// Prefetching the pages.
    Prefetch,
    /// Zeroing the (single) page on its hosts (zeroing `token`): its old contents give the
    /// parity change.
    Zero { token: u64 },
}

/// A read of stripes `stripe..stripe + count` of one span from enough of its shards to
/// decode the target shard's pages.
#[derive(Debug)]
pub(super) struct Gather {
    purpose: GatherFor,
    region: u32,
    span: usize,
    stripe: usize,
    count: usize,
    /// The placement slot whose pages are wanted: the pages' data shard, or the one rebuilt.
    target: usize,
    /// The region page of the target's first page (faults, prefetches and zeroing).
    first_page: usize,
    /// Code shard c's pages (data shards, then parity) at `c * count * PAGE_SIZE`.
    buf: Vec<u8>,
    /// Slots asked (arrived ones included).
    asked: u64,
    /// Code shards arrived.
    have: u64,
    /// Slots whose host refused the read: not asked again.
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
    /// Next stripe to consider.
    next: usize,
    inflight: usize,
}

impl Gather {
    /// Some shards are here, not all.
    pub(super) fn partly_here(&self) -> bool {
        self.have != 0
    }

    /// The pages a fault's or prefetch's gather reads (`None` for a rebuild's or a zeroing's,
    /// which install nothing): region, first page, count.
    pub(super) fn installs(&self) -> Option<(u32, usize, usize)> {
        match self.purpose {
            GatherFor::Fault { .. } | GatherFor::Prefetch => Some((self.region, self.first_page, self.count)),
            GatherFor::Rebuild { .. } | GatherFor::Zero { .. } => None,
        }
    }
}

impl RebuildJob {
    pub(super) fn new(region: u32, span: usize, shard: usize, job: u64) -> Self {
        Self { region, span, shard, job, next: 0, inflight: 0 }
    }
}

/// Whether a write to `stripe` goes to a shard in `state`, and marks the stripe stale if the
/// shard is being rebuilt and the stripe's reads are in flight. A rebuilt stripe takes
/// writes as a live shard does; one not read yet takes none (its read, later on the same
/// links, includes the write; or it holds no data and stays zeros).
fn reaches(state: &mut ShardState, stripe: usize) -> bool {
    match state {
        ShardState::Lost => false,
        ShardState::Live => true,
        ShardState::Rebuilding { progress, .. } => {
            if progress[stripe] == Progress::Reading {
                progress[stripe] = Progress::Stale;
            }
            progress[stripe] == Progress::Done
        }
    }
}

/// Marks the stripes among `stripes` whose rebuild reads are in flight stale: a write to
/// them is being sent.
pub(super) fn written_during_rebuild(state: &mut ShardState, stripes: std::ops::Range<usize>) {
    if let ShardState::Rebuilding { progress, .. } = state {
        for p in &mut progress[stripes] {
            if *p == Progress::Reading {
                *p = Progress::Stale;
            }
        }
    }
}

impl Core {
    /// Decodes pages `first..first + count` of region `id` (one run in a chunk) from the
    /// other shards of their stripes, for `purpose`: their own host is lost.
    pub(super) fn gather_pages(&mut self, id: u32, first: usize, count: usize, purpose: GatherFor) {
        let Some(region) = self.regions.get(&id) else { return };
        let span = first / region.slab_pages;
        let (data_shard, stripe) = region.redundancy.locate(first % region.slab_pages);
        self.gather_insert(Gather {
            purpose,
            region: id,
            span,
            stripe,
            count,
            target: region.redundancy.slot(data_shard, stripe),
            first_page: first,
            buf: Vec::new(),
            asked: 0,
            have: 0,
            refused: 0,
        });
    }

    fn gather_insert(&mut self, mut g: Gather) {
        let Some(region) = self.regions.get(&g.region) else { return };
        g.buf = vec![0u8; region.redundancy.shards() * g.count * PAGE_SIZE];
        let gid = self.next_gather;
        self.next_gather += 1;
        self.gathers.insert(gid, g);
        self.gather_dispatch(gid);
    }

    /// Asks live shards other than the target until enough are asked.
    fn gather_dispatch(&mut self, gid: u64) {
        let Core { gathers, regions, links, .. } = self;
        let Some(g) = gathers.get_mut(&gid) else { return };
        let Some(region) = regions.get(&g.region) else {
            gathers.remove(&gid);
            return;
        };
        let needed = region.redundancy.needed();
        let count = u32::try_from(g.count).expect("a gather is at most a batch of pages");
        if let Some(placement) = region.slabs[g.span].as_ref() {
            for (i, shard) in placement.shards.iter().enumerate() {
                if g.asked.count_ones() as usize >= needed {
                    break;
                }
                if (g.asked | g.refused) & (1 << i) != 0
                    || i == g.target
                    || !matches!(shard.state, ShardState::Live)
                {
                    continue;
                }
                links[shard.slab.host].send(
                    &Message::ReadPages { slab_id: shard.slab.slab_id, first_page: g.stripe as u64, count },
                    Pending::Part { gather: gid, shard: i as u8 },
                );
                g.asked |= 1 << i;
            }
        }
        if (g.asked.count_ones() as usize) < needed {
            self.gather_fail(gid, "fewer of its hosts are alive than a read needs");
        }
    }

    /// Asks afresh, under a new id, after a shard failed to arrive (or was read again on a
    /// resumed connection): shards read at different times may straddle a write-back to the
    /// stripe, and would not decode to one state. The replies still due to the old id are
    /// dropped.
    pub(super) fn gather_restart(&mut self, gid: u64) {
        let Some(mut g) = self.gathers.remove(&gid) else { return };
        g.asked = 0;
        g.have = 0;
        self.gather_insert(g);
    }

    /// A reply to shard `shard` of gather `gid`.
    pub(super) fn on_part(&mut self, gid: u64, shard: u8, msg: &Message<'_>) {
        let Some(g) = self.gathers.get_mut(&gid) else { return };
        let Some(redundancy) = self.regions.get(&g.region).map(|r| r.redundancy) else { return };
        let shard_bytes = g.count * PAGE_SIZE;
        match msg {
            Message::Pages { data, .. } if data.len() == shard_bytes => {
                let code = redundancy.code(usize::from(shard), g.stripe);
                g.buf[code * shard_bytes..(code + 1) * shard_bytes].copy_from_slice(data);
                g.have |= 1 << code;
                self.last_part = Instant::now();
                self.stats.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
                if g.have.count_ones() as usize >= redundancy.needed() {
                    self.gather_complete(gid);
                }
            }
            other => {
                eprintln!("clustermem: a shard read was refused ({other:?}); trying another shard");
                g.refused |= 1 << shard;
                self.gather_restart(gid);
            }
        }
    }

    /// Shard `shard` of gather `gid` will not arrive (its host died): ask again.
    pub(super) fn part_lost(&mut self, gid: u64, _shard: u8) {
        self.gather_restart(gid);
    }

    fn gather_complete(&mut self, gid: u64) {
        let Some(mut g) = self.gathers.remove(&gid) else { return };
        let Some(region) = self.regions.get(&g.region) else { return };
        let per_shard = g.count * PAGE_SIZE;
        let from = match &region.coder {
            Some(coder) => {
                let target = region.redundancy.code(g.target, g.stripe);
                if g.have & (1 << target) == 0 {
                    let parity = target >= region.redundancy.needed();
                    if let Err(why) = coder.reconstruct(&mut g.buf, per_shard, g.have, parity) {
                        self.gathers.insert(gid, g);
                        return self.gather_fail(gid, &why);
                    }
                }
                target
            }
            // A copy: whichever arrived.
            None => g.have.trailing_zeros() as usize,
        } * per_shard;
        let content = &g.buf[from..from + per_shard];
        match g.purpose {
            GatherFor::Rebuild { job } => {
                self.rebuild_write(g.region, g.span, g.stripe, g.count, g.target, job, content);
            }
            GatherFor::Fault { write, started } => {
                self.stats.degraded_reads.fetch_add(1, Relaxed);
                // (Assembled here, not one reply's bytes: nothing to defer.)
                self.install_fetched(g.region, g.first_page, content, write, started, None);
            }
            GatherFor::Prefetch => {
                self.stats.degraded_reads.fetch_add(g.count as u64, Relaxed);
                self.install_prefetched(g.region, g.first_page, content);
            }
            GatherFor::Zero { token } => {
                self.stats.degraded_reads.fetch_add(1, Relaxed);
                self.zero_on_hosts(g.region, g.first_page, token, content);
            }
        }
    }

    fn gather_fail(&mut self, gid: u64, why: &str) {
        let Some(g) = self.gathers.remove(&gid) else { return };
        match g.purpose {
            GatherFor::Fault { .. } => {
                let Some(r) = self.regions.get_mut(&g.region) else { return };
                let state = r.pages[g.first_page];
                r.pages[g.first_page] &= !(PageState::FETCHING | PageState::WANTED);
                if state & PageState::RESIDENT == 0 {
                    r.record_loss(g.first_page, why);
                    let addr = r.addr(g.first_page);
                    self.poison(addr);
                }
            }
            GatherFor::Rebuild { job } => {
                eprintln!("clustermem: rebuild of a span abandoned: {why}");
                self.rebuild_abandon(g.region, g.span, g.target, job);
            }
            // A thread waiting for one of the pages gets a fetch of its own (or the loss).
            GatherFor::Prefetch => {
                for page in g.first_page..g.first_page + g.count {
                    self.drop_prefetch(g.region, page);
                }
            }
            // The stripe is lost beyond its redundancy: the page reads as zeros here all the
            // same; its hosts keep what they had.
            GatherFor::Zero { token } => {
                eprintln!(
                    "clustermem: a discarded page's old contents cannot be read ({why}); left on its hosts"
                );
                self.zero_finish(g.region, g.first_page, token);
            }
        }
    }

    /// Writes the rebuilt target shard of stripes `stripe..stripe + count` (`content`, a page
    /// each) into the new slab, except stripes written to while they were read (read again).
    #[allow(clippy::too_many_arguments)] // One batch's coordinates, passed through once.
    fn rebuild_write(
        &mut self,
        id: u32,
        span: usize,
        stripe: usize,
        count: usize,
        shard: usize,
        job: u64,
        content: &[u8],
    ) {
        let Core { regions, links, stats, rebuilds, .. } = self;
        let Some(j) = rebuilds.iter_mut().find(|j| j.job == job) else { return };
        j.inflight -= 1;
        let Some(target) =
            regions.get_mut(&id).and_then(|r| r.slabs[span].as_mut()).map(|p| &mut p.shards[shard])
        else {
            return;
        };
        let slab_id = target.slab.slab_id;
        let ShardState::Rebuilding { progress, job: current } = &mut target.state else { return };
        if *current != job {
            return;
        }
        let link = &mut links[target.slab.host];
        let mut run: Option<usize> = None;
        let mut send = |from: usize, to: usize| {
            let data = &content[(from - stripe) * PAGE_SIZE..(to - stripe) * PAGE_SIZE];
            let prefix = write_pages_prefix(slab_id, from as u64);
            let kind = Message::WritePages { slab_id: 0, first_page: 0, data: &[] }.kind();
            stats.bytes_rebuilt.fetch_add(link.send_parts(kind, &prefix, data, Pending::Ignore), Relaxed);
            stats.pages_rebuilt.fetch_add((to - from) as u64, Relaxed);
        };
        for (q, p) in progress.iter_mut().enumerate().skip(stripe).take(count) {
            let write = *p == Progress::Reading;
            match *p {
                Progress::Reading => *p = Progress::Done,
                Progress::Stale => {
                    *p = Progress::Todo;
                    j.next = j.next.min(q);
                }
                Progress::Todo | Progress::Done => {}
            }
            match (run, write) {
                (None, true) => run = Some(q),
                (Some(from), false) => {
                    send(from, q);
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            send(from, stripe + count);
        }
    }

    /// The span can no longer be read for rebuild job `job`: the new slab is given back and
    /// the shard stays lost.
    fn rebuild_abandon(&mut self, id: u32, span: usize, shard: usize, job: u64) {
        if let Some(j) = self.rebuilds.iter_mut().find(|j| j.job == job) {
            j.inflight -= 1;
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

    /// Keeps every active rebuild's batches in flight; a span whose stripes are all written
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
            let redundancy = region.redundancy;
            let span_pages = (region.pages.len() - span * region.slab_pages).min(region.slab_pages);
            let stripes = redundancy.shard_pages(span_pages);
            let base = span * region.slab_pages;
            let Some(target) = region.slabs[span].as_mut().map(|p| &mut p.shards[shard]) else {
                self.rebuilds.swap_remove(i);
                continue;
            };
            let ShardState::Rebuilding { progress, job: current } = &mut target.state else {
                // Its new host died too, or the batch reads failed: queued again or lost.
                self.rebuilds.swap_remove(i);
                continue;
            };
            if *current != job {
                self.rebuilds.swap_remove(i);
                continue;
            }
            // Stripes holding no data page ever written back read as zeros on every host,
            // the new slab too.
            let holds_data = |q: usize| {
                redundancy
                    .stripe_pages(q)
                    .any(|sp| sp < span_pages && region.pages[base + sp] & PageState::ON_HOST != 0)
            };
            let j = &mut self.rebuilds[i];
            let mut batches = Vec::new();
            while j.inflight + batches.len() < REBUILD_DEPTH && j.next < stripes {
                while j.next < stripes && (progress[j.next] != Progress::Todo || !holds_data(j.next)) {
                    if progress[j.next] == Progress::Todo {
                        progress[j.next] = Progress::Done;
                    }
                    j.next += 1;
                }
                let from = j.next;
                // One batch, one row: the same roles on every stripe it decodes.
                while j.next < stripes
                    && j.next - from < REBUILD_BATCH
                    && redundancy.same_chunk(from, j.next)
                    && progress[j.next] == Progress::Todo
                    && holds_data(j.next)
                {
                    progress[j.next] = Progress::Reading;
                    j.next += 1;
                }
                if j.next > from {
                    batches.push((from, j.next - from));
                }
            }
            // Every stripe passed is done or being read; a stale one moved `next` back.
            if j.next == stripes && j.inflight == 0 && batches.is_empty() {
                target.state = ShardState::Live;
                self.rebuilds.swap_remove(i);
                continue;
            }
            j.inflight += batches.len();
            for (stripe, count) in batches {
                self.gather_insert(Gather {
                    purpose: GatherFor::Rebuild { job },
                    region: id,
                    span,
                    stripe,
                    count,
                    target: shard,
                    first_page: 0,
                    buf: Vec::new(),
                    asked: 0,
                    have: 0,
                    refused: 0,
                });
            }
            i += 1;
        }
    }

    /// Sends the write-back of resident, write-protected `page` of region `id` (`data`),
    /// whose lines `mask` changed, to every copy (changed lines, or the whole page past the
    /// threshold), or, erasure-coded, to its data shard and, as XORs of their coded change
    /// (`delta`: the changed lines XOR their clean contents, in mask order), to each parity
    /// shard. Returns the bytes sent.
    pub(super) fn send_write_back(
        &mut self,
        id: u32,
        page: usize,
        data: &[u8],
        mask: u64,
        delta: &[u8],
    ) -> u64 {
        let Core { regions, links, scratch, config, .. } = self;
        let region = regions.get_mut(&id).expect("caller checked");
        let redundancy = region.redundancy;
        let (data_shard, stripe) = redundancy.locate(page % region.slab_pages);
        let placement =
            region.slabs[page / region.slab_pages].as_mut().expect("caller checked the page is committed");
        let (whole, coded) = (mask.count_ones() > config.line_threshold, region.coder.is_some());
        let mut bytes = 0;
        for (slot, shard) in placement.shards.iter_mut().enumerate() {
            // Every copy, or the data shard (parity shards: below).
            let copy = !coded || redundancy.code(slot, stripe) == data_shard;
            if !copy || !reaches(&mut shard.state, stripe) {
                continue;
            }
            let SlabRef { host, slab_id, .. } = shard.slab;
            let link = &mut links[host];
            let pending = Pending::WriteBack { region: id, page };
            if whole {
                let kind = Message::WritePages { slab_id: 0, first_page: 0, data: &[] }.kind();
                bytes += link.send_parts(kind, &write_pages_prefix(slab_id, stripe as u64), data, pending);
                continue;
            }
            scratch.clear();
            clustermem_proto::encode_write_lines_prefix(scratch, slab_id, stripe as u64, mask);
            let prefix_len = scratch.len();
            gather_lines(data, mask, scratch);
            let (prefix, lines) = scratch.split_at(prefix_len);
            let kind = Message::WriteLines { slab_id: 0, page: 0, line_mask: 1, lines: &[] }.kind();
            bytes += link.send_parts(kind, prefix, lines, pending);
        }
        if coded {
            bytes += self.send_parity_change(id, page, mask, delta, true);
        }
        bytes
    }

    /// Sends each parity shard of erasure-coded `page` of region `id` the coded change of its
    /// lines `mask` (`delta`: new XOR old of those lines, in mask order) as an XOR, answered
    /// as a write-back of the page (`write_back`) or not at all. Returns the bytes sent (0 for
    /// a region of copies, or no change).
    fn send_parity_change(&mut self, id: u32, page: usize, mask: u64, delta: &[u8], write_back: bool) -> u64 {
        let Core { regions, links, scratch, parity, .. } = self;
        if mask == 0 {
            return 0;
        }
        let Some(region) = regions.get_mut(&id) else { return 0 };
        let Some(coder) = &region.coder else { return 0 };
        let redundancy = region.redundancy;
        let (data_shard, stripe) = redundancy.locate(page % region.slab_pages);
        let Some(placement) = region.slabs[page / region.slab_pages].as_mut() else { return 0 };
        let needed = redundancy.needed();
        parity.resize((redundancy.shards() - needed) * delta.len(), 0);
        coder.parity_delta(data_shard, delta, parity);
        let kind = Message::XorLines { slab_id: 0, page: 0, line_mask: 1, lines: &[] }.kind();
        let mut bytes = 0;
        for (slot, shard) in placement.shards.iter_mut().enumerate() {
            let code = redundancy.code(slot, stripe);
            if code < needed || !reaches(&mut shard.state, stripe) {
                continue;
            }
            scratch.clear();
            clustermem_proto::encode_write_lines_prefix(scratch, shard.slab.slab_id, stripe as u64, mask);
            let change = &parity[(code - needed) * delta.len()..][..delta.len()];
            let pending = if write_back { Pending::WriteBack { region: id, page } } else { Pending::Ignore };
            bytes += links[shard.slab.host].send_parts(kind, scratch, change, pending);
        }
        bytes
    }

    /// Starts zeroing page `page` of erasure-coded region `id` on its hosts (the program
    /// discarded it; the caller marked it in flight): its parity must lose the page's
    /// contents, so they are read first. A fault on it meanwhile waits.
    pub(super) fn zero_start(&mut self, id: u32, page: usize) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        self.next_zeroing += 1;
        let token = self.next_zeroing;
        region.zeroing.insert(page, token);
        match region.read_copy(page) {
            Some((slab, slab_page)) => self.links[slab.host].send(
                &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count: 1 },
                Pending::Zero { region: id, page, token },
            ),
            None if region.readable(page) => self.gather_pages(id, page, 1, GatherFor::Zero { token }),
            None => self.zero_finish(id, page, token),
        }
    }

    /// The read of page `page`'s old contents for zeroing `token` failed (its host refused
    /// or died): they are decoded from its stripe, unless the zeroing is over.
    pub(super) fn zero_retry(&mut self, id: u32, page: usize, token: u64) {
        let Some(region) = self.regions.get(&id).filter(|r| r.zeroing.get(&page) == Some(&token)) else {
            return;
        };
        if region.readable(page) {
            self.gather_pages(id, page, 1, GatherFor::Zero { token });
        } else {
            self.zero_finish(id, page, token);
        }
    }

    /// The old contents of page `page` being zeroed (zeroing `token`) arrived: zero it on its
    /// data shard and XOR its coded contents out of each parity shard.
    pub(super) fn zero_on_hosts(&mut self, id: u32, page: usize, token: u64, old: &[u8]) {
        let Core { regions, links, .. } = self;
        let Some(region) = regions.get_mut(&id).filter(|r| r.zeroing.get(&page) == Some(&token)) else {
            // A discard of the whole stripe row overtook it.
            return;
        };
        let redundancy = region.redundancy;
        let (data_shard, stripe) = redundancy.locate(page % region.slab_pages);
        if let Some(placement) = region.slabs[page / region.slab_pages].as_mut() {
            let slot = redundancy.slot(data_shard, stripe);
            let shard = &mut placement.shards[slot];
            if reaches(&mut shard.state, stripe) {
                let msg = Message::DiscardPages {
                    slab_id: shard.slab.slab_id,
                    first_page: stripe as u64,
                    count: 1,
                };
                links[shard.slab.host].send(&msg, Pending::Ignore);
            }
        }
        // The change is the old contents (the new ones are zeros).
        let mask = diff_lines(old, &[0u8; PAGE_SIZE]);
        let mut delta = Vec::with_capacity(mask.count_ones() as usize * LINE_SIZE);
        gather_lines(old, mask, &mut delta);
        self.send_parity_change(id, page, mask, &delta, false);
        self.zero_finish(id, page, token);
    }

    /// Zeroing `token` of `page` is over: it is a fresh page, and a thread waiting on it gets
    /// zeros.
    pub(super) fn zero_finish(&mut self, id: u32, page: usize, token: u64) {
        let Some(region) = self.regions.get_mut(&id) else { return };
        if region.zeroing.get(&page) != Some(&token) {
            return;
        }
        region.zeroing.remove(&page);
        let state = std::mem::take(&mut region.pages[page]);
        if state & PageState::WANTED != 0 {
            let zeros = std::mem::take(&mut self.zero_page);
            self.install(id, page, &zeros, false);
            self.zero_page = zeros;
        }
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

    /// Re-sends the fetch of `page` for a thread to a surviving copy, decodes it from its
    /// stripe, or fails it.
    pub(super) fn refetch(&mut self, id: u32, page: usize, write: bool, started: Instant, why: &str) {
        let Some(r) = self.regions.get_mut(&id) else { return };
        if r.pages[page] & PageState::RESIDENT != 0 {
            return;
        }
        match r.read_copy(page) {
            Some((slab, slab_page)) => {
                self.links[slab.host].send(
                    &Message::ReadPages { slab_id: slab.slab_id, first_page: slab_page, count: 1 },
                    Pending::Fetch { region: id, page, write, started, offset: None },
                );
            }
            None if r.coder.is_some() && r.readable(page) => {
                self.gather_pages(id, page, 1, GatherFor::Fault { write, started });
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
