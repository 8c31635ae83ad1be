//! Framed clustermem connections over TCP, shared by the memory host and the compute runtime.
//!
//! The socket is non-blocking. A reader that finds nothing to read either sleeps in `poll(2)`
//! or, inside a *spin window*, busy-polls: on this kind of VM waking a sleeping thread costs
//! tens of microseconds, more than the rest of a page fetch, so a side that expects an answer
//! soon may spin for it. The window is bounded, so an idle connection never burns a core,
//! and a spinner gives its CPU away every [`YIELD_EVERY`]: a thread woken onto the same CPU
//! (on a shared machine, the program a memory host serves) waits that long at most, not a
//! scheduler slice.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use clustermem_proto::{DecodeError, FrameHeader, Message, HEADER_LEN};
use thiserror::Error;

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum RecvError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The socket failed, or the peer vanished mid-frame.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame; the stream has lost its framing.
    #[error("malformed frame")]
    Decode(#[from] DecodeError),
    /// No frame arrived within the deadline.
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
}

/// Reads frames from a non-blocking TCP stream through one reusable buffer.
#[derive(Debug)]
pub struct FrameReader {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The frame `recv` returned last (kind, payload range in `buf`): its bytes stay put
    /// until the next `recv`.
    last: Option<(u8, usize, usize)>,
    /// Frames `recv` has returned.
    frames: u64,
}

const READ_CHUNK: usize = 256 << 10;
/// How long a busy-poll runs before it yields its CPU once (`sched_yield`, about 1 us when
/// nothing else wants the CPU). Short, because a woken thread does not preempt the spinner:
/// a program woken from a fault onto the CPU of a spinning embedded host ran only at the
/// host's next yield (traced: 4.7 us on average with 20 us here, up to 15; 1.2 us with 3).
/// With 1 us a remote fault's p50 in `bench random --low-latency` was 1.2-1.3 us lower than
/// with 3, and 2.2 us lower than with 10 (the intervals alternating every 8 ms within one run,
/// host and program measured against the same clock; yielding at every empty poll did as
/// well as 1 us).
pub const YIELD_EVERY: Duration = Duration::from_micros(1);
/// The reader's buffer: many frames of the largest prefetch run (64 pages), so the partial
/// frame at its end is moved to the front (`make_room`) once per many frames, not per frame.
const READ_BUFFER: usize = 4 << 20;

impl FrameReader {
    /// Wraps `stream`, switching it to non-blocking mode.
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, buf: vec![0; READ_BUFFER], start: 0, end: 0, last: None, frames: 0 })
    }

    /// Whether a whole frame is already buffered (the next `recv` will not touch the socket).
    pub fn has_buffered_frame(&self) -> bool {
        let avail = &self.buf[self.start..self.end];
        match avail.get(..HEADER_LEN) {
            Some(h) => match FrameHeader::decode(h.try_into().expect("header")) {
                Ok(hdr) => avail.len() >= HEADER_LEN + hdr.payload_len as usize,
                Err(_) => true, // the error is ready to report
            },
            None => false,
        }
    }

    /// Reads one frame. Busy-polls until `spin_until`, then sleeps in `poll(2)` until a frame
    /// arrives or `deadline` passes. Returns the request id and the message, borrowing the
    /// reader's buffer until the next call.
    pub fn recv(
        &mut self,
        spin_until: Option<Instant>,
        deadline: Option<Instant>,
    ) -> Result<(u64, Message<'_>), RecvError> {
        self.last = None;
        let header = loop {
            if self.end - self.start >= HEADER_LEN {
                let head: &[u8; HEADER_LEN] =
                    self.buf[self.start..self.start + HEADER_LEN].try_into().expect("header");
                let header = FrameHeader::decode(head)?;
                if self.end - self.start >= HEADER_LEN + header.payload_len as usize {
                    break header;
                }
                self.make_room(HEADER_LEN + header.payload_len as usize);
            } else {
                self.make_room(HEADER_LEN);
            }
            self.fill(spin_until, deadline)?;
        };
        let payload_start = self.start + HEADER_LEN;
        let payload_end = payload_start + header.payload_len as usize;
        self.start = payload_end;
        let payload = &self.buf[payload_start..payload_end];
        header.verify(payload)?;
        let msg = Message::decode(header.kind, payload)?;
        self.last = Some((header.kind, payload_start, payload_end));
        self.frames += 1;
        Ok((header.request_id, msg))
    }

    /// How many frames `recv` has returned: a caller that keeps using the last one after
    /// `recv` returned it checks that this has not moved.
    pub fn frames_received(&self) -> u64 {
        self.frames
    }

    /// The message `recv` returned last, again (decoded from the same bytes, which stay in
    /// the buffer until the next `recv`); None after a failed `recv`.
    pub fn last_message(&self) -> Option<Message<'_>> {
        let (kind, start, end) = self.last?;
        Message::decode(kind, &self.buf[start..end]).ok()
    }

    /// Ensures `need` bytes fit from `start`, compacting or growing the buffer.
    fn make_room(&mut self, need: usize) {
        if self.start == self.end {
            // Empty: start over at the front, so one-page replies land in the same few
            // cache-warm kilobytes rather than walk through the whole (cold) buffer.
            self.start = 0;
            self.end = 0;
        }
        if self.start + need <= self.buf.len() {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if need > self.buf.len() {
            self.buf.resize(need.next_power_of_two(), 0);
        }
    }

    fn fill(&mut self, spin_until: Option<Instant>, deadline: Option<Instant>) -> Result<(), RecvError> {
        let mut spun_since: Option<Instant> = None;
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) if self.start == self.end => return Err(RecvError::Closed),
                Ok(0) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection mid-frame",
                    )))
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if spin_until.is_some_and(|s| now < s) {
                        let since = *spun_since.get_or_insert(now);
                        if now - since >= YIELD_EVERY {
                            // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
                            unsafe { libc::sched_yield() };
                            spun_since = Some(Instant::now());
                        } else {
                            std::hint::spin_loop();
                        }
                        continue;
                    }
                    let timeout = match deadline {
                        Some(d) if now >= d => return Err(RecvError::TimedOut(Duration::ZERO)),
                        Some(d) => i32::try_from((d - now).as_millis() + 1).unwrap_or(i32::MAX),
                        None => -1,
                    };
                    wait_readable(self.stream.as_raw_fd(), timeout)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The underlying stream (for writing replies and shutting down).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Sleeps until `fd` is readable or `timeout_ms` passes (-1: forever).
pub fn wait_readable(fd: i32, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Collects outgoing frames and sends them in as few system calls as possible.
#[derive(Debug)]
pub struct FrameWriter {
    buf: Vec<u8>,
    /// Buffer kept after a flush, at most (see [`FrameWriter::keep_after_flush`]).
    idle_capacity: usize,
}

impl Default for FrameWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(READ_CHUNK), idle_capacity: MAX_IDLE_CAPACITY }
    }

    /// Keeps up to `bytes` of buffer between flushes (default 1 MiB). A memory host sending
    /// batches of multi-page replies wants more: a buffer given back and grown again costs a
    /// page fault and a page clear per 4 KiB, which was a tenth of a host's time on a
    /// sequential read; a compute host bounding its memory wants less.
    pub fn keep_after_flush(mut self, bytes: usize) -> Self {
        self.idle_capacity = bytes;
        self
    }

    /// Queues `msg` with `request_id`.
    pub fn push(&mut self, request_id: u64, msg: &Message<'_>) {
        let start = self.buf.len();
        self.buf.resize(start + HEADER_LEN, 0);
        msg.encode_payload(&mut self.buf);
        self.seal(start, msg.kind(), request_id);
    }

    /// Queues a frame whose payload is `prefix` followed by `data`, copying `data` once.
    pub fn push_parts(&mut self, kind: u8, request_id: u64, prefix: &[u8], data: &[u8]) {
        let start = self.buf.len();
        self.buf.resize(start + HEADER_LEN, 0);
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(data);
        self.seal(start, kind, request_id);
    }

    /// Starts a frame whose payload the caller appends to [`FrameWriter::payload`]; finish it
    /// with [`FrameWriter::finish_frame`].
    pub fn begin_frame(&mut self) -> usize {
        let start = self.buf.len();
        self.buf.resize(start + HEADER_LEN, 0);
        start
    }

    /// The buffer to append a begun frame's payload to.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Seals a frame begun at `start` (see [`FrameWriter::begin_frame`]).
    pub fn finish_frame(&mut self, start: usize, kind: u8, request_id: u64) {
        self.seal(start, kind, request_id);
    }

    fn seal(&mut self, start: usize, kind: u8, request_id: u64) {
        let header = clustermem_proto::frame_header(kind, request_id, &[&self.buf[start + HEADER_LEN..]]);
        self.buf[start..start + HEADER_LEN].copy_from_slice(&header.encode());
    }

    /// The bytes queued: whole frames.
    pub fn queued(&self) -> &[u8] {
        &self.buf
    }

    /// Queues frames already encoded (e.g. replayed from an earlier connection).
    pub fn push_encoded(&mut self, frames: &[u8]) {
        self.buf.extend_from_slice(frames);
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Sends everything queued on a non-blocking stream, waiting for room when the socket
    /// buffer is full.
    pub fn flush_to(&mut self, stream: &TcpStream) -> io::Result<()> {
        let mut sent = 0;
        let mut out = stream;
        while sent < self.buf.len() {
            match out.write(&self.buf[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
                    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                        let err = io::Error::last_os_error();
                        if err.kind() != io::ErrorKind::Interrupted {
                            return Err(err);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        if self.buf.capacity() > self.idle_capacity.max(READ_CHUNK) {
            // A flush of many dirty pages queues them all; keeping that much buffer between
            // flushes would cost the local memory the runtime is bounding.
            self.buf = Vec::with_capacity(READ_CHUNK);
        }
        Ok(())
    }
}

/// Buffer a writer keeps after a flush, at most.
const MAX_IDLE_CAPACITY: usize = 4 * READ_CHUNK;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn frames_cross_a_socket_in_order_and_split_writes_reassemble() {
        let (a, b) = pair();
        let mut w = FrameWriter::new();
        let page = vec![3u8; 4096];
        for i in 0..100u64 {
            w.push(i, &Message::WritePages { slab_id: 1, first_page: i, data: &page });
        }
        let bytes = std::mem::take(&mut w.buf);
        let sender = std::thread::spawn(move || {
            let mut a = a;
            // Dribble the bytes in odd-sized pieces so frames straddle reads.
            for chunk in bytes.chunks(1000) {
                a.write_all(chunk).unwrap();
            }
        });
        let mut r = FrameReader::new(b).unwrap();
        for i in 0..100u64 {
            let (id, msg) = r.recv(None, None).unwrap();
            assert_eq!(id, i);
            assert_eq!(msg, Message::WritePages { slab_id: 1, first_page: i, data: &page });
        }
        sender.join().unwrap();
        assert!(matches!(r.recv(None, None), Err(RecvError::Closed)));
    }

    #[test]
    fn the_last_frame_can_be_read_again_until_the_next_recv() {
        let (mut a, b) = pair();
        let mut w = FrameWriter::new();
        let (one, two) = (vec![1u8; 4096], vec![2u8; 4096]);
        w.push(7, &Message::Pages { first_page: 1, data: &one });
        w.push(8, &Message::Pages { first_page: 2, data: &two });
        a.write_all(&std::mem::take(&mut w.buf)).unwrap();
        let mut r = FrameReader::new(b).unwrap();
        assert_eq!((r.frames_received(), r.last_message()), (0, None));
        r.recv(None, None).unwrap();
        assert_eq!(r.frames_received(), 1);
        assert_eq!(r.last_message(), Some(Message::Pages { first_page: 1, data: &one }));
        r.recv(None, None).unwrap();
        assert_eq!(r.frames_received(), 2);
        assert_eq!(r.last_message(), Some(Message::Pages { first_page: 2, data: &two }));
        drop(a);
        assert!(r.recv(None, None).is_err());
        assert_eq!((r.frames_received(), r.last_message()), (2, None), "a failed recv leaves nothing");
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let (mut a, b) = pair();
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = FrameReader::new(b).unwrap();
        assert!(matches!(r.recv(None, None), Err(RecvError::Decode(DecodeError::BadMagic { .. }))));
    }

    #[test]
    fn deadline_ends_the_wait() {
        let (_a, b) = pair();
        let mut r = FrameReader::new(b).unwrap();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert!(matches!(r.recv(None, Some(deadline)), Err(RecvError::TimedOut(_))));
    }
}
