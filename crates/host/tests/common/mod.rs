//! A blocking test client for a real host over loopback TCP, shared by the host's
//! integration tests.

use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use clustermem_host::RunningHost;
use clustermem_net::{FrameReader, FrameWriter};
use clustermem_proto::{ErrorCode, HostStats, Message, MAX_VERSION, MIN_VERSION};

const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a reply was, owned so it outlives the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Resumed(u64),
    Slab(u64),
    Data(u64, Vec<u8>),
    Stats(HostStats),
    Hello { features: u64 },
    Chain(Vec<u64>),
    Error(ErrorCode, String),
    Other(String),
}

/// A blocking test client: one request at a time.
pub struct Client {
    reader: FrameReader,
    next_id: u64,
}

impl Client {
    pub fn connect(host: &RunningHost) -> Self {
        Self::connect_with(host, 0).0
    }

    /// Connects with `Hello` flags `flags`; returns the host's feature bits too.
    pub fn connect_with(host: &RunningHost, flags: u8) -> (Self, u64) {
        let stream = TcpStream::connect(host.addr()).expect("connect");
        let mut c = Self { reader: FrameReader::new(stream).expect("reader"), next_id: 1 };
        let hello = Message::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, flags };
        match c.call_raw(&hello) {
            Ok(Reply::Hello { features }) => (c, features),
            other => panic!("Hello: {other:?}"),
        }
    }

    /// Sends `msg` and waits for its reply; `Err` when the connection fails.
    pub fn call_raw(&mut self, msg: &Message<'_>) -> Result<Reply, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = FrameWriter::new();
        out.push(id, msg);
        out.flush_to(self.reader.stream()).map_err(|e| format!("send: {e}"))?;
        let (rid, reply) =
            self.reader.recv(None, Some(Instant::now() + REPLY_TIMEOUT)).map_err(|e| format!("recv: {e}"))?;
        assert_eq!(rid, id, "replies come in order");
        Ok(match reply {
            Message::Ok => Reply::Ok,
            Message::Resumed { slabs } => Reply::Resumed(slabs),
            Message::SlabAllocated { slab_id } => Reply::Slab(slab_id),
            Message::Pages { first_page, data } => Reply::Data(first_page, data.to_vec()),
            Message::Stats(s) => Reply::Stats(s),
            Message::HelloOk { features, .. } => Reply::Hello { features },
            Message::Chain { addresses } => Reply::Chain(
                addresses
                    .chunks_exact(8)
                    .map(|a| u64::from_le_bytes(a.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Message::Error { code, message } => Reply::Error(code, message.to_string()),
            other => Reply::Other(format!("{other:?}")),
        })
    }

    /// Numbers the next request `id` (a replay reuses an earlier connection's ids).
    #[allow(dead_code)] // Not every test binary replays.
    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }

    pub fn call(&mut self, msg: &Message<'_>) -> Reply {
        self.call_raw(msg).expect("a reply")
    }

    #[allow(dead_code)] // Not every test binary allocates.
    pub fn alloc(&mut self, bytes: u64) -> u64 {
        match self.call(&Message::AllocSlab { bytes, region: 1 }) {
            Reply::Slab(id) => id,
            other => panic!("AllocSlab: {other:?}"),
        }
    }

    pub fn stats(&mut self) -> HostStats {
        match self.call(&Message::GetStats) {
            Reply::Stats(s) => s,
            other => panic!("GetStats: {other:?}"),
        }
    }
}
