//! Connections from the runtime to memory hosts.
//!
//! Each host has one TCP connection, split in two halves owned by the fault handler: the
//! [`FrameReader`] and a [`Link`] (the writer plus the queue of requests awaiting replies).
//! Splitting lets the handler install a page straight out of the reader's buffer while it
//! queues write-backs on other links, with no copy and no lock. A host answers a
//! connection's requests in order, so the reply to the oldest pending request is next.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clustermem_net::{FrameReader, FrameWriter, RecvError};
use clustermem_proto::{
    ErrorCode, Message, FEATURE_CHASE_POINTERS, FEATURE_XOR_LINES, HELLO_ASKS_FEATURES, HELLO_LOW_LATENCY,
    MAX_VERSION, MIN_VERSION,
};

use crate::RuntimeError;

/// How long connecting and the handshake may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a pending request was for, so its reply can be applied.
#[derive(Debug)]
pub(crate) enum Pending {
    /// A page fetch for a fault (or a flush) of region `region`.
    Fetch {
        /// Region id.
        region: u32,
        /// Page index in the region.
        page: usize,
        /// The fault was a write: install writable and dirty.
        write: bool,
        /// When the fault was read.
        started: Instant,
        /// Byte offset of the faulting access in its page, when the kernel reports it.
        offset: Option<u16>,
    },
    /// A page write-back of region `region`; an error reply means its data is lost.
    WriteBack {
        /// Region id.
        region: u32,
        /// Page index in the region.
        page: usize,
    },
    /// A prefetch of `count` adjacent pages from `first` of region `region`.
    Prefetch {
        /// Region id.
        region: u32,
        /// First page index.
        first: usize,
        /// Pages requested.
        count: u32,
    },
    /// The old contents of a discarded page of an erasure-coded region, read to zero it on
    /// its hosts (see `Core::zero_start`).
    Zero {
        /// Region id.
        region: u32,
        /// Page index in the region.
        page: usize,
        /// Names this zeroing of the page (a later one may follow while this reply is due).
        token: u64,
    },
    /// A pointer prefetch of one page.
    Chase(ChaseRead),
    /// A `ChasePointers` request.
    ChaseList(ChainRequest),
    /// Shard `shard` of gather `gather` (a read that needs K of a span's shards: an
    /// erasure-coded fault, or a rebuild's read of surviving copies).
    Part {
        /// Gather id.
        gather: u64,
        /// Shard index in the span's placement.
        shard: u8,
    },
    /// A barrier: replies to everything sent before it have arrived.
    Barrier(u64),
    /// A reply nobody waits for (slab frees, abandoned pointer prefetches).
    Ignore,
}

impl Pending {
    /// A read a faulting thread may be asleep on (a page fetch, or a shard of one).
    pub(crate) fn is_demand_read(&self) -> bool {
        matches!(self, Pending::Fetch { .. } | Pending::Part { .. })
    }

    /// Drops the purpose of this pending request in place (its reply will be ignored),
    /// keeping `demand_reads`, its link's count, right.
    pub(crate) fn ignore(&mut self, demand_reads: &mut usize) {
        *demand_reads -= usize::from(self.is_demand_read());
        *self = Pending::Ignore;
    }
}

/// A pointer prefetch of page `page` of region `region`, which a fetched page pointed to at
/// byte `offset`, `depth` hops from the last page a thread was seen to need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChaseRead {
    pub(crate) region: u32,
    pub(crate) page: usize,
    pub(crate) offset: u16,
    pub(crate) depth: u8,
    /// Its host was asked for the chain past it (so its arrival adds nothing).
    pub(crate) host_follows: bool,
}

/// A `ChasePointers` asked of host `host_asked` for region `region`: `hops` pointers from
/// address `start`, which lies `depth` hops ahead of the last page a thread was seen to need.
/// (The chain goes on elsewhere if it ended at a span another host holds.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainRequest {
    pub(crate) region: u32,
    pub(crate) host_asked: usize,
    pub(crate) start: u64,
    pub(crate) depth: u8,
    pub(crate) hops: u8,
}

/// Send buffer a link keeps between flushes: the periodic flusher queues at most 512 pages
/// a round (about 2.1 MiB of frames) and eviction a few hundred more.
const WRITER_KEEPS: usize = 4 << 20;

/// The sending half of a host connection, and its pending requests.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) addr: SocketAddr,
    pub(crate) writer: FrameWriter,
    /// Requests awaiting replies: id, purpose, when sent.
    pub(crate) pending: VecDeque<(u64, Pending, Instant)>,
    /// How many of `pending` are demand reads (see [`Pending::is_demand_read`]); entries are
    /// turned into `Ignore` in place with [`Pending::ignore`], which keeps it right.
    pub(crate) demand_reads: usize,
    next_id: u64,
    pub(crate) capacity_bytes: u64,
    pub(crate) allocated_bytes: u64,
    /// The host follows pointer chains (`Message::ChasePointers`).
    pub(crate) chases_pointers: bool,
    /// The host applies `XorLines` and replayed writes once (`FEATURE_XOR_LINES`): it can hold
    /// shards of erasure-coded regions.
    pub(crate) xors_lines: bool,
    /// Set when the host stopped answering; no request is sent after that.
    pub(crate) dead: Option<String>,
    /// When the host last answered anything: one that keeps answering is alive, however
    /// long the requests queued behind a slow link wait.
    pub(crate) last_heard: Instant,
    /// The session the connection is bound to: a new connection resuming it gets the slabs
    /// back (see `Message::Resume`).
    pub(crate) session: u64,
    /// The frames of `pending`, byte for byte from `journal_head`, each ending at the
    /// matching `journal_ends` entry: replayed in order on a new connection after the old one
    /// dropped, with their ids. Every data request but `XorLines` is a read or an overwrite,
    /// so a replayed one the host had already applied would change nothing, but the host
    /// applies each write once per id in a session all the same (an `XorLines` is not
    /// idempotent, and an overwrite replayed after it would undo it).
    journal: Vec<u8>,
    journal_head: usize,
    journal_ends: VecDeque<usize>,
}

impl Link {
    /// Queues `msg`, remembering what its reply is for.
    pub(crate) fn send(&mut self, msg: &Message<'_>, pending: Pending) {
        let id = self.take_id();
        let start = self.writer.len();
        self.writer.push(id, msg);
        self.journal(start);
        self.demand_reads += usize::from(pending.is_demand_read());
        self.pending.push_back((id, pending, Instant::now()));
    }

    /// Queues a frame whose payload is `prefix` then `data` (page data straight from memory).
    pub(crate) fn send_parts(&mut self, kind: u8, prefix: &[u8], data: &[u8], pending: Pending) -> u64 {
        let id = self.take_id();
        let start = self.writer.len();
        self.writer.push_parts(kind, id, prefix, data);
        self.journal(start);
        self.demand_reads += usize::from(pending.is_demand_read());
        self.pending.push_back((id, pending, Instant::now()));
        (clustermem_proto::HEADER_LEN + prefix.len() + data.len()) as u64
    }

    /// Keeps a copy of the frame just queued from `start` in the writer.
    fn journal(&mut self, start: usize) {
        self.journal.extend_from_slice(&self.writer.queued()[start..]);
        self.journal_ends.push_back(self.journal.len());
    }

    /// The oldest pending request was answered: forgets it.
    pub(crate) fn ack(&mut self) -> Option<(u64, Pending, Instant)> {
        let done = self.pending.pop_front()?;
        self.demand_reads -= usize::from(done.1.is_demand_read());
        self.last_heard = Instant::now();
        if let Some(end) = self.journal_ends.pop_front() {
            self.journal_head = end;
        }
        if self.journal_ends.is_empty() {
            self.journal.clear();
            self.journal_head = 0;
        } else if self.journal_head > (1 << 20) && self.journal_head * 2 > self.journal.len() {
            // Compact now and then, not per reply.
            self.journal.drain(..self.journal_head);
            for end in &mut self.journal_ends {
                *end -= self.journal_head;
            }
            self.journal_head = 0;
        }
        Some(done)
    }

    /// Moves onto a new connection's `writer`: every unanswered request is queued again, in
    /// order, with its old id. Returns how many.
    pub(crate) fn resume_on(&mut self, writer: FrameWriter) -> usize {
        self.writer = writer;
        self.writer.push_encoded(&self.journal[self.journal_head..]);
        let now = Instant::now();
        for (_, _, sent) in &mut self.pending {
            *sent = now;
        }
        self.pending.len()
    }

    /// How long the host has kept silent while requests waited on it: since the later of
    /// its last answer and the oldest unanswered request's send. None with nothing waiting.
    pub(crate) fn silent_for(&self) -> Option<Duration> {
        let (_, _, sent) = self.pending.front()?;
        Some((*sent).max(self.last_heard).elapsed())
    }

    /// The host is gone: drops the queued and unanswered requests, returning the latter.
    pub(crate) fn abandon(&mut self) -> VecDeque<(u64, Pending, Instant)> {
        self.writer = FrameWriter::new().keep_after_flush(WRITER_KEEPS);
        self.journal = Vec::new();
        self.journal_head = 0;
        self.journal_ends.clear();
        self.demand_reads = 0;
        std::mem::take(&mut self.pending)
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// A fresh session token: a client's sessions must not collide on a host, across processes
/// and machines; nothing depends on it being unpredictable.
pub(crate) fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish() | 1
}

/// Connects to a memory host, performs the version handshake and binds the connection to
/// `session`. Returns the link, its reader, and how many slabs of the session the host held
/// (0 for a new session).
pub(crate) fn connect(
    addr: &str,
    low_latency: bool,
    session: u64,
    timeout: Duration,
) -> Result<(Link, FrameReader, u64), RuntimeError> {
    let unreachable = |why: String| RuntimeError::HostUnreachable { addr: addr.to_string(), why };
    let sock_addr = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| unreachable("resolves to no address".into()))?;
    let stream = TcpStream::connect_timeout(&sock_addr, timeout).map_err(|e| unreachable(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
    let mut reader = FrameReader::new(stream).map_err(|e| unreachable(e.to_string()))?;
    // Room for a flusher chunk (and a round's evictions) without regrowing the buffer.
    let mut writer = FrameWriter::new().keep_after_flush(WRITER_KEEPS);
    let flags = HELLO_ASKS_FEATURES | if low_latency { HELLO_LOW_LATENCY } else { 0 };
    writer.push(1, &Message::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, flags });
    writer.push(2, &Message::Resume { session });
    writer.flush_to(reader.stream()).map_err(|e| unreachable(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let (_, reply) = reader.recv(None, Some(deadline)).map_err(|e| match e {
        RecvError::Decode(d) => RuntimeError::NotAHost {
            addr: addr.to_string(),
            why: format!("its reply is no clustermem frame ({d})"),
        },
        e => unreachable(format!("handshake failed: {e}")),
    })?;
    let (capacity_bytes, features) = match reply {
        Message::HelloOk { capacity_bytes, features, .. } => (capacity_bytes, features),
        Message::Error { code: ErrorCode::VersionMismatch, message } => {
            return Err(unreachable(format!("incompatible protocol: {message}")))
        }
        other => return Err(unreachable(format!("unexpected handshake reply {other:?}"))),
    };
    let (_, reply) = reader
        .recv(None, Some(deadline))
        .map_err(|e| unreachable(format!("resuming the session failed: {e}")))?;
    let adopted = match reply {
        Message::Resumed { slabs } => slabs,
        Message::Error { message, .. } => {
            return Err(RuntimeError::HostRefused { addr: addr.to_string(), message: message.to_string() })
        }
        other => return Err(unreachable(format!("unexpected reply to Resume {other:?} (an older host?)"))),
    };
    let link = Link {
        addr: sock_addr,
        writer,
        pending: VecDeque::new(),
        demand_reads: 0,
        next_id: 2,
        capacity_bytes,
        allocated_bytes: 0,
        chases_pointers: features & FEATURE_CHASE_POINTERS != 0,
        xors_lines: features & FEATURE_XOR_LINES != 0,
        dead: None,
        last_heard: Instant::now(),
        session,
        journal: Vec::new(),
        journal_head: 0,
        journal_ends: VecDeque::new(),
    };
    Ok((link, reader, adopted))
}
