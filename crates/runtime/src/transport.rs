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

use clustermem_net::{FrameReader, FrameWriter};
use clustermem_proto::{ErrorCode, Message, HELLO_LOW_LATENCY, MAX_VERSION, MIN_VERSION};

use crate::RuntimeError;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A pointer prefetch of page `page` of region `region`, which a fetched page pointed to
    /// at byte `offset`; `depth` hops from the last page a thread was seen to need.
    Chase {
        /// Region id.
        region: u32,
        /// Page index in the region.
        page: usize,
        /// Byte offset in the page that was pointed to.
        offset: u16,
        /// Hops since a thread last needed a page of this chain.
        depth: u8,
    },
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

/// The sending half of a host connection, and its pending requests.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) addr: SocketAddr,
    pub(crate) writer: FrameWriter,
    /// Requests awaiting replies: id, purpose, when sent.
    pub(crate) pending: VecDeque<(u64, Pending, Instant)>,
    next_id: u64,
    pub(crate) capacity_bytes: u64,
    pub(crate) allocated_bytes: u64,
    /// Set when the host stopped answering; no request is sent after that.
    pub(crate) dead: Option<String>,
}

impl Link {
    /// Queues `msg`, remembering what its reply is for.
    pub(crate) fn send(&mut self, msg: &Message<'_>, pending: Pending) {
        let id = self.take_id();
        self.writer.push(id, msg);
        self.pending.push_back((id, pending, Instant::now()));
    }

    /// Queues a frame whose payload is `prefix` then `data` (page data straight from memory).
    pub(crate) fn send_parts(&mut self, kind: u8, prefix: &[u8], data: &[u8], pending: Pending) -> u64 {
        let id = self.take_id();
        self.writer.push_parts(kind, id, prefix, data);
        self.pending.push_back((id, pending, Instant::now()));
        (clustermem_proto::HEADER_LEN + prefix.len() + data.len()) as u64
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Connects to a memory host and performs the version handshake.
pub(crate) fn connect(addr: &str, low_latency: bool) -> Result<(Link, FrameReader), RuntimeError> {
    let unreachable = |why: String| RuntimeError::HostUnreachable { addr: addr.to_string(), why };
    let sock_addr = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| unreachable("resolves to no address".into()))?;
    let stream =
        TcpStream::connect_timeout(&sock_addr, CONNECT_TIMEOUT).map_err(|e| unreachable(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
    let mut reader = FrameReader::new(stream).map_err(|e| unreachable(e.to_string()))?;
    let mut writer = FrameWriter::new();
    let flags = if low_latency { HELLO_LOW_LATENCY } else { 0 };
    writer.push(1, &Message::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, flags });
    writer.flush_to(reader.stream()).map_err(|e| unreachable(e.to_string()))?;
    let (_, reply) = reader
        .recv(None, Some(Instant::now() + CONNECT_TIMEOUT))
        .map_err(|e| unreachable(format!("handshake failed: {e}")))?;
    let capacity_bytes = match reply {
        Message::HelloOk { capacity_bytes, .. } => capacity_bytes,
        Message::Error { code: ErrorCode::VersionMismatch, message } => {
            return Err(unreachable(format!("incompatible protocol: {message}")))
        }
        other => return Err(unreachable(format!("unexpected handshake reply {other:?}"))),
    };
    let link = Link {
        addr: sock_addr,
        writer,
        pending: VecDeque::new(),
        next_id: 1,
        capacity_bytes,
        allocated_bytes: 0,
        dead: None,
    };
    Ok((link, reader))
}
