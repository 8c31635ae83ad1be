//! The clustermem memory host: donates RAM to the cluster as slabs and serves page reads and
//! writes to compute hosts over TCP.
//!
//! One thread per client connection: a connection's requests are answered in order (clients
//! rely on it: a read queued after a write sees the write), replies are batched into one send
//! while more requests are already buffered, and a misbehaving client (bad frames, a dropped
//! connection) loses only its own connection.
//!
//! # Slab lifetime and session resumption
//!
//! Regions are not persistent, and a crashed client must not leak a host's memory, but a
//! client must survive the loss of a TCP connection. So:
//!
//! - A connection reaches only the slabs it owns (allocated, or adopted by `Resume`): any
//!   other slab id is refused with `NoSuchSlab`.
//! - A connection that never sends `Resume` has its slabs freed when it ends.
//! - `Resume { session }` (after `Hello`; `session` a non-zero random token the client chose)
//!   binds the connection to that session. When a bound connection ends, its slabs become
//!   *orphans* of the session (counted in `HostStats::orphaned_slabs`) instead of being freed.
//! - A later `Resume` of the same session adopts the orphans: they are owned by the new
//!   connection as if it had allocated them, contents intact; the reply is `Ok`.
//! - Orphans not adopted within the grace period ([`MemoryHost::with_orphan_grace`], default
//!   [`DEFAULT_ORPHAN_GRACE`]) are freed; the accept loop looks at least every 100 ms. A grace
//!   of zero frees a bound connection's slabs when it ends, as without `Resume`.
//! - A `Resume` of a session a live connection holds takes it over: the old connection stops
//!   serving (it checks the session's generation at least every 100 ms), and the `Resume`
//!   waits up to 2 s for it to end, then adopts its slabs. If it has not ended by then (stuck
//!   sending to a dead peer) the reply is `Error HostFault` and the client may send `Resume`
//!   again on the same connection; the old slabs are orphaned when it does end.
//! - `Resume` with token 0, or naming another session than the one the connection is bound
//!   to, is `Error BadRequest`; a second `Resume` of the same session on one connection is a
//!   retry.
//! - Request ids grow across a session's connections (a client replays unanswered requests
//!   with their old ids). Writes are applied at most once per session: after `Resume`, a
//!   write (`WritePages`, `WriteLines`, `XorLines`, `DiscardPages`) whose id an earlier
//!   connection of the session already handled is acknowledged without being applied again
//!   (`XorLines` is not idempotent, and an overwrite replayed after a later XOR would undo
//!   it), or refused again with the same error if it was refused; a replayed `AllocSlab` that
//!   was granted is answered with the same slab; a read is answered again. (A session
//!   remembers its latest 1024 refused writes and 1024 allocations for this.)

mod sessions;
mod store;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clustermem_net::{FrameReader, FrameWriter, RecvError};
use clustermem_proto::{
    ErrorCode, Message, FEATURE_CHASE_POINTERS, FEATURE_XOR_LINES, HELLO_ASKS_FEATURES, HELLO_LOW_LATENCY,
    LINE_SIZE, MAX_PAYLOAD, MAX_VERSION, MIN_VERSION, PAGE_SIZE,
};
use sessions::{Binding, Outcomes, Sessions};
use store::{Refusal, Slab, Store};
use thiserror::Error;

/// MemTotal plus SwapTotal from /proc/meminfo, in bytes, if readable: the most a host on this
/// machine can hold before the kernel's OOM killer takes it (slabs are `MAP_NORESERVE`).
pub fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Buffered replies this large (a page or more) are sent before the next request is read.
const FLUSH_PAGES_AT: usize = PAGE_SIZE;

/// How long a low-latency connection busy-polls for its next request after a reply.
const SPIN_WINDOW: Duration = Duration::from_micros(200);
/// How long any other connection busy-polls for its next request after one: a client that
/// faults in a stream sends the next within tens of microseconds, and waking a sleeping
/// connection thread costs ~8 us on a VM. A remote fault's p50 in `bench random` (default
/// mode) was 11 us lower with it (50.4 -> 39.2 us, with and without alternating every 8 ms
/// within one run); a core is busy only while requests keep coming.
const SHORT_SPIN_WINDOW: Duration = Duration::from_micros(50);
/// The default of [`MemoryHost::with_busy_poll`]: how long a connection busy-polls after a
/// request that came within this long of the one before (a busy client). The window covers
/// the gaps a program leaves between faults while it computes: a thread that sleeps lets its
/// CPU halt, and on a VM waking a halted CPU took ~33 us (traced in redis SET under
/// `clustermem run`: the wake-up of the sleeping connection thread was delivered by the idle
/// CPU 33 us after the request's send, and 31% of remote faults waited over 20 us for the
/// host). With it, redis SET under `run` did 54.6 K requests/s against 48.2 K without (five
/// alternated runs each). The price: a busy client's connection thread keeps a CPU busy
/// (it yields it every microsecond, `clustermem_net::YIELD_EVERY`) until its client pauses.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_millis(1);
/// The longest busy-poll window: a polling thread looks at the shutdown flag and its
/// session only between polls.
pub const MAX_BUSY_POLL: Duration = SHUTDOWN_POLL;
/// How often blocked threads look at the shutdown flag (and connections at their session's
/// generation, and the accept loop at orphans).
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// How long a disconnected session's slabs wait for it to resume, unless configured: long
/// enough for a client to notice a dead connection and reconnect, short enough that a client
/// that died does not hold a host's memory for long.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// Why a memory host could not start or stopped.
#[derive(Debug, Error)]
pub enum HostError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Accepting connections failed.
    #[error("accept failed")]
    Accept(#[source] io::Error),
}

/// A memory host bound to its address, ready to serve.
#[derive(Debug)]
pub struct MemoryHost {
    listener: TcpListener,
    store: Arc<Store>,
    sessions: Arc<Sessions>,
    shutdown: Arc<AtomicBool>,
    options: ServeOptions,
}

/// What every connection of a host is served with.
#[derive(Debug, Clone, Copy)]
struct ServeOptions {
    /// The host answers `ChasePointers` (see [`MemoryHost::without_pointer_chasing`]).
    chasing: bool,
    /// See [`MemoryHost::with_busy_poll`].
    busy_poll: Duration,
}

impl MemoryHost {
    /// Binds `addr` and prepares to donate `capacity_bytes`.
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Debug, capacity_bytes: u64) -> Result<Self, HostError> {
        let bind_err = |source| HostError::Bind { addr: format!("{addr:?}"), source };
        let listener = TcpListener::bind(&addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            store: Arc::new(Store::new(capacity_bytes)),
            sessions: Arc::new(Sessions::new(DEFAULT_ORPHAN_GRACE)),
            shutdown: Arc::new(AtomicBool::new(false)),
            options: ServeOptions { chasing: true, busy_poll: DEFAULT_BUSY_POLL },
        })
    }

    /// Refuses `ChasePointers` and does not offer it: the host spends no CPU following
    /// clients' pointers (they chase their chains themselves, a round trip per hop).
    #[must_use]
    pub fn without_pointer_chasing(mut self) -> Self {
        self.options.chasing = false;
        self
    }

    /// Sets how long a connection busy-polls for its client's next request while the client
    /// is busy (its last request came within that long of the one before): requests are read
    /// without a wake-up, at the price of a CPU kept busy while the client is (yielded to
    /// any other thread that wants it). Zero: 50 us after each request (200 us for a
    /// low-latency client), then sleep. At most [`MAX_BUSY_POLL`] (longer is taken as that).
    #[must_use]
    pub fn with_busy_poll(mut self, window: Duration) -> Self {
        self.options.busy_poll = window.min(MAX_BUSY_POLL);
        self
    }

    /// Sets how long the slabs of a resumable session whose connection ended are kept for it
    /// to come back (see the crate documentation); zero frees them at once.
    #[must_use]
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.sessions = Arc::new(Sessions::new(grace));
        self
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The flag that stops [`MemoryHost::serve`] when set (e.g. from a signal handler).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shutdown)
    }

    /// Serves clients until the shutdown flag is set, then closes every connection.
    pub fn serve(self) -> Result<(), HostError> {
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        while !self.shutdown.load(Ordering::Acquire) {
            // At least every SHUTDOWN_POLL: the accept below waits no longer than that.
            self.sessions.reap(&self.store);
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let store = Arc::clone(&self.store);
                    let sessions = Arc::clone(&self.sessions);
                    let shutdown = Arc::clone(&self.shutdown);
                    let options = self.options;
                    let spawned = std::thread::Builder::new()
                        .name(format!("host-conn-{peer}"))
                        .spawn(move || serve_client(stream, &store, &sessions, &shutdown, options));
                    match spawned {
                        Ok(handle) => workers.push(handle),
                        Err(e) => eprintln!("clustermem host: cannot start a thread for {peer}: {e}"),
                    }
                    workers.retain(|w| !w.is_finished());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ms = i32::try_from(SHUTDOWN_POLL.as_millis()).expect("small");
                    clustermem_net::wait_readable(self.listener.as_raw_fd(), ms)
                        .map_err(HostError::Accept)?;
                }
                Err(e) if is_transient_accept_error(&e) => {
                    eprintln!("clustermem host: accept: {e} (continuing)");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(HostError::Accept(e)),
            }
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    }

    /// Serves on a background thread; the host stops when the returned handle is dropped.
    pub fn spawn(self) -> RunningHost {
        let addr = self.local_addr();
        let shutdown = self.shutdown_flag();
        let thread = std::thread::Builder::new()
            .name("memory-host".into())
            .spawn(move || {
                if let Err(e) = self.serve() {
                    eprintln!("clustermem: embedded memory host stopped: {e}");
                }
            })
            .expect("spawning the embedded host thread");
        RunningHost { addr, shutdown, thread: Some(thread) }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == io::ErrorKind::Interrupted
}

/// A memory host serving on a background thread (the embedded host of a client command).
#[derive(Debug)]
pub struct RunningHost {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RunningHost {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One client's session: the slabs it owns and a cache of slab lookups, so the hot path takes
/// no lock on the host-wide slab table.
struct Session<'a> {
    store: &'a Store,
    sessions: &'a Sessions,
    /// Set by `Resume`: the slabs outlive the connection for the grace period.
    binding: Option<Binding>,
    owned: HashSet<u64>,
    /// Whose slabs these are, for counting regions: the session token once bound.
    owner: u64,
    cache: HashMap<u64, Arc<Slab>>,
    /// The highest request id handled since `Resume` (ids grow across a session's connections).
    handled_through: u64,
    /// What the session's earlier connections handled: a replayed write up to it was applied
    /// already and is only acknowledged (or refused again, if it was refused).
    replayed_through: u64,
    /// What became of this session's requests (its earlier connections' and this one's) that
    /// a replay must get again.
    outcomes: Outcomes,
    low_latency: bool,
    greeted: bool,
    /// The host answers `ChasePointers` (see [`MemoryHost::without_pointer_chasing`]).
    chasing: bool,
}

impl Session<'_> {
    /// Slab `id`, if this client owns it: a client reads and writes its own slabs only.
    fn slab(&mut self, id: u64) -> Result<&Arc<Slab>, Refusal> {
        if !self.owned.contains(&id) {
            return Err((ErrorCode::NoSuchSlab, format!("this client owns no slab {id}")));
        }
        if !self.cache.contains_key(&id) {
            let slab =
                self.store.get(id).ok_or((ErrorCode::NoSuchSlab, format!("no slab {id} on this host")))?;
            self.cache.insert(id, slab);
        }
        Ok(&self.cache[&id])
    }

    /// Answers one request into `out`. Returns false when the connection must close.
    fn handle(&mut self, id: u64, msg: &Message<'_>, out: &mut FrameWriter) -> bool {
        if !self.greeted {
            return self.hello(id, msg, out);
        }
        let result = match *msg {
            // A replayed write this session already applied: applying it again could undo a
            // later one the host also applied (an overwrite after an XOR), and an XOR is not
            // idempotent. Reads are answered again: their replies were lost.
            _ if is_write(msg) && self.binding.is_some() && id <= self.replayed_through => {
                match self.outcomes.refusal(id) {
                    Some((code, text)) => Err((*code, text.clone())),
                    None => {
                        out.push(id, &Message::Ok);
                        Ok(())
                    }
                }
            }
            // A replayed allocation that was made: the same slab again (its id was lost with
            // the connection; a second slab would be one the client never learns of).
            Message::AllocSlab { .. }
                if self.binding.is_some()
                    && id <= self.replayed_through
                    && self.outcomes.allocation(id).is_some_and(|s| self.owned.contains(&s)) =>
            {
                let slab_id = self.outcomes.allocation(id).expect("checked above");
                out.push(id, &Message::SlabAllocated { slab_id });
                Ok(())
            }
            Message::AllocSlab { bytes, region } => {
                self.store.alloc(bytes, (self.owner, region)).map(|(slab_id, slab)| {
                    self.owned.insert(slab_id);
                    self.cache.insert(slab_id, slab);
                    if self.binding.is_some() {
                        self.outcomes.allocated(id, slab_id);
                    }
                    out.push(id, &Message::SlabAllocated { slab_id });
                })
            }
            Message::FreeSlab { slab_id } => {
                if self.owned.remove(&slab_id) && self.store.free(slab_id) {
                    self.cache.remove(&slab_id);
                    out.push(id, &Message::Ok);
                    Ok(())
                } else {
                    Err((ErrorCode::NoSuchSlab, format!("this client owns no slab {slab_id}")))
                }
            }
            Message::ReadPages { slab_id, first_page, count } => self.slab(slab_id).and_then(|slab| {
                // The reply (page index, then the pages) must fit one frame.
                if 8 + count as usize * PAGE_SIZE > MAX_PAYLOAD {
                    return Err((
                        ErrorCode::OutOfRange,
                        format!(
                            "{count} pages do not fit one reply (at most {})",
                            (MAX_PAYLOAD - 8) / PAGE_SIZE
                        ),
                    ));
                }
                let slab = Arc::clone(slab);
                let start = out.begin_frame();
                out.payload().extend_from_slice(&first_page.to_le_bytes());
                match slab.read_pages(first_page, u64::from(count), out.payload()) {
                    Ok(()) => {
                        out.finish_frame(start, Message::Pages { first_page, data: &[] }.kind(), id);
                        Ok(())
                    }
                    Err(refusal) => {
                        out.payload().truncate(start);
                        Err(refusal)
                    }
                }
            }),
            Message::ReadBytes { slab_id, offset, len } => self.slab(slab_id).and_then(|slab| {
                let slab = Arc::clone(slab);
                let start = out.begin_frame();
                out.payload().extend_from_slice(&offset.to_le_bytes());
                match slab.read_bytes(offset, u64::from(len), out.payload()) {
                    Ok(()) => {
                        out.finish_frame(start, Message::Pages { first_page: offset, data: &[] }.kind(), id);
                        Ok(())
                    }
                    Err(refusal) => {
                        out.payload().truncate(start);
                        Err(refusal)
                    }
                }
            }),
            Message::WritePages { slab_id, first_page, data } => self
                .slab(slab_id)
                .and_then(|s| s.write_pages(first_page, data))
                .map(|()| out.push(id, &Message::Ok)),
            Message::WriteLines { slab_id, page, line_mask, lines } => self
                .slab(slab_id)
                .and_then(|s| s.write_lines(page, line_mask, lines))
                .map(|()| out.push(id, &Message::Ok)),
            Message::XorLines { slab_id, page, line_mask, lines } => self
                .slab(slab_id)
                .and_then(|s| s.xor_lines(page, line_mask, lines))
                .map(|()| out.push(id, &Message::Ok)),
            Message::DiscardPages { slab_id, first_page, count } => self
                .slab(slab_id)
                .and_then(|s| s.discard_pages(first_page, u64::from(count)))
                .map(|()| out.push(id, &Message::Ok)),
            Message::Resume { session } => {
                self.sessions.resume(session, &mut self.binding, self.store).map(|resumed| {
                    self.owner = session;
                    self.replayed_through = resumed.handled_through;
                    self.handled_through = resumed.handled_through;
                    self.outcomes = resumed.outcomes;
                    let slabs = resumed.adopted.len() as u64;
                    self.owned.extend(resumed.adopted);
                    out.push(id, &Message::Resumed { slabs });
                })
            }
            Message::GetStats => {
                out.push(id, &Message::Stats(self.store.stats()));
                Ok(())
            }
            Message::ChasePointers { .. } if !self.chasing => Err((
                ErrorCode::BadRequest,
                "this host does not follow pointers (--no-pointer-chasing)".into(),
            )),
            Message::ChasePointers { start, hops, base, span_bytes, slabs } => {
                let chain = self.chase(start, hops, base, span_bytes, slabs);
                out.push(id, &Message::Chain { addresses: &chain });
                Ok(())
            }
            _ => Err((ErrorCode::BadRequest, format!("{msg:?} is not a request"))),
        };
        if let Err((code, text)) = result {
            out.push(id, &Message::Error { code, message: &text });
            if self.binding.is_some() && is_write(msg) && id > self.replayed_through {
                self.outcomes.refused(id, (code, text));
            }
        }
        if self.binding.is_some() {
            self.handled_through = self.handled_through.max(id);
        }
        true
    }

    /// Follows a `ChasePointers` chain through the slabs named in `slabs` (see the message):
    /// the values recorded, as little-endian bytes. A slab not here, a line out of its range
    /// or a line without a pointer ends the chain early: the answer is advice, never an error.
    fn chase(&mut self, start: u64, hops: u8, base: u64, span_bytes: u64, slabs: &[u8]) -> Vec<u8> {
        const LINE: u64 = LINE_SIZE as u64;
        let mut chain = Vec::with_capacity(8 * usize::from(hops));
        let Some(end) =
            span_bytes.checked_mul((slabs.len() / 8) as u64).and_then(|len| base.checked_add(len))
        else {
            return chain;
        };
        let inside = |v: u64| (base..end).contains(&v);
        let mut line = Vec::with_capacity(LINE_SIZE);
        let mut at = start;
        while chain.len() < 8 * usize::from(hops) && inside(at) {
            let (span, offset) = (((at - base) / span_bytes) as usize, (at - base) % span_bytes);
            let slab_id = u64::from_le_bytes(slabs[8 * span..8 * span + 8].try_into().expect("8 bytes"));
            // 0 (no copy here) is never a slab id: refused like any slab this client lacks.
            let Ok(slab) = self.slab(slab_id) else { break };
            line.clear();
            if slab.read_bytes(offset & !(LINE - 1), LINE, &mut line).is_err() {
                break;
            }
            let here = at & !(LINE - 1);
            let next = line
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .find(|&v| inside(v) && v & !(LINE - 1) != here);
            let Some(next) = next else { break };
            chain.extend_from_slice(&next.to_le_bytes());
            at = next;
        }
        chain
    }

    fn hello(&mut self, id: u64, msg: &Message<'_>, out: &mut FrameWriter) -> bool {
        let Message::Hello { min_version, max_version, flags } = *msg else {
            out.push(id, &Message::Error { code: ErrorCode::BadRequest, message: "expected Hello first" });
            return false;
        };
        let version = max_version.min(MAX_VERSION);
        if version < min_version.max(MIN_VERSION) {
            let text = format!(
                "client speaks versions {min_version}..={max_version}, host speaks {MIN_VERSION}..={MAX_VERSION}"
            );
            out.push(id, &Message::Error { code: ErrorCode::VersionMismatch, message: &text });
            return false;
        }
        self.greeted = true;
        self.low_latency = flags & HELLO_LOW_LATENCY != 0;
        let asked = flags & HELLO_ASKS_FEATURES != 0;
        let chase = if self.chasing { FEATURE_CHASE_POINTERS } else { 0 };
        let features = if asked { chase | FEATURE_XOR_LINES } else { 0 };
        out.push(id, &Message::HelloOk { version, capacity_bytes: self.store.capacity_bytes(), features });
        true
    }
}

/// Whether `msg` is a write (applied at most once per session; see the module docs).
fn is_write(msg: &Message<'_>) -> bool {
    matches!(
        msg,
        Message::WritePages { .. }
            | Message::WriteLines { .. }
            | Message::XorLines { .. }
            | Message::DiscardPages { .. }
    )
}

fn serve_client(
    stream: TcpStream,
    store: &Store,
    sessions: &Sessions,
    shutdown: &AtomicBool,
    options: ServeOptions,
) {
    let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let mut reader = match FrameReader::new(stream) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("clustermem host: {peer}: {e}");
            return;
        }
    };
    store.clients.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        store,
        sessions,
        binding: None,
        owned: HashSet::new(),
        owner: store.connection_owner(),
        cache: HashMap::new(),
        handled_through: 0,
        replayed_through: 0,
        outcomes: Outcomes::default(),
        low_latency: false,
        greeted: false,
        chasing: options.chasing,
    };
    // Replies to prefetches are batches of 256 KiB frames: keep a buffer that fits a few.
    let mut out = FrameWriter::new().keep_after_flush(8 << 20);
    let mut last_request = Instant::now();
    // When the last request that was not already waiting behind another arrived: a burst of
    // pipelined requests is one arrival, so a client that sends bursts now and then is not
    // taken for a busy one.
    let mut last_arrival: Option<Instant> = None;
    let mut busy_client = false;
    loop {
        // Send replies once the requests already here are answered (one send for a batch of
        // small replies), or as soon as they carry pages: a demand read answered ahead of a
        // prefetch batch must not wait while that batch is copied behind it.
        if !out.is_empty() && (!reader.has_buffered_frame() || out.len() >= FLUSH_PAGES_AT) {
            if let Err(e) = out.flush_to(reader.stream()) {
                eprintln!("clustermem host: {peer}: send failed: {e}");
                break;
            }
        }
        if shutdown.load(Ordering::Acquire) {
            break;
        }
        if session.binding.as_ref().is_some_and(Binding::superseded) {
            eprintln!("clustermem host: {peer}: its session was resumed by a newer connection; closing");
            break;
        }
        let after_any = if session.low_latency { SPIN_WINDOW } else { SHORT_SPIN_WINDOW };
        let window = if busy_client { options.busy_poll.max(after_any) } else { after_any };
        let queued = reader.has_buffered_frame();
        let outcome = reader.recv(Some(last_request + window), Some(Instant::now() + SHUTDOWN_POLL));
        match outcome {
            Ok((id, msg)) => {
                let now = Instant::now();
                if !queued {
                    busy_client = last_arrival.is_some_and(|t| now - t <= options.busy_poll);
                    last_arrival = Some(now);
                }
                last_request = now;
                if !session.handle(id, &msg, &mut out) {
                    let _ = out.flush_to(reader.stream());
                    break;
                }
            }
            Err(RecvError::TimedOut(_)) => {}
            // A client that goes away, even with replies unread (a reset), is not news.
            Err(RecvError::Closed) => break,
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(RecvError::Decode(e)) => {
                // Framing is lost: say why and close this connection only.
                let text = format!("malformed frame: {e}");
                eprintln!("clustermem host: {peer}: {text}; closing the connection");
                out.push(0, &Message::Error { code: ErrorCode::BadRequest, message: &text });
                let _ = out.flush_to(reader.stream());
                break;
            }
            Err(e) => {
                eprintln!("clustermem host: {peer}: {e}");
                break;
            }
        }
    }
    match session.binding {
        Some(binding) => {
            sessions.end(binding, session.owned, store, session.handled_through, &session.outcomes);
        }
        None => {
            for slab_id in session.owned {
                store.free(slab_id);
            }
        }
    }
    store.clients.fetch_sub(1, Ordering::Relaxed);
    let _ = reader.stream().shutdown(std::net::Shutdown::Both);
}
