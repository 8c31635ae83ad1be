//! Session resumption against a real host over loopback TCP: slabs survive a dropped
//! connection when the client resumes its session, and are freed when it does not.

mod common;

use std::time::{Duration, Instant};

use clustermem_host::{MemoryHost, RunningHost};
use clustermem_proto::{ErrorCode, HostStats, Message, PAGE_SIZE};
use common::{Client, Reply};

fn host(grace: Duration) -> RunningHost {
    MemoryHost::bind("127.0.0.1:0", 64 << 20).expect("bind").with_orphan_grace(grace).spawn()
}

/// Polls the host's stats until `done` holds, failing after `within`.
fn wait_for_stats(host: &RunningHost, within: Duration, done: impl Fn(&HostStats) -> bool) -> HostStats {
    let mut probe = Client::connect(host);
    let deadline = Instant::now() + within;
    loop {
        let s = probe.stats();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never reached the expected state: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection bound to `session`, which is new.
fn new_session(host: &RunningHost, session: u64) -> Client {
    let mut c = Client::connect(host);
    assert_eq!(c.call(&Message::Resume { session }), Reply::Resumed(0), "a new session");
    c
}

/// Drops `client` (bound to `session`, owning `slabs` slabs) and, once the host has orphaned
/// them, resumes the session on a new connection.
fn resume_on_a_new_connection(host: &RunningHost, client: Client, session: u64, slabs: u64) -> Client {
    drop(client);
    wait_for_stats(host, Duration::from_secs(5), |s| s.orphaned_slabs == slabs);
    let mut again = Client::connect(host);
    assert_eq!(again.call(&Message::Resume { session }), Reply::Resumed(slabs));
    again
}

fn page_of(byte: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| byte ^ (i % 256) as u8).collect()
}

/// Allocates a 16-page slab and writes page 3 on a connection bound to `session`.
fn client_with_a_page(host: &RunningHost, session: Option<u64>) -> (Client, u64, Vec<u8>) {
    let mut c = Client::connect(host);
    if let Some(session) = session {
        assert_eq!(c.call(&Message::Resume { session }), Reply::Resumed(0), "a new session");
    }
    let slab = c.alloc(16 * PAGE_SIZE as u64);
    let page = page_of(0x5A);
    assert_eq!(c.call(&Message::WritePages { slab_id: slab, first_page: 3, data: &page }), Reply::Ok);
    (c, slab, page)
}

#[test]
fn a_resumed_session_gets_its_slabs_back_intact() {
    let host = host(Duration::from_secs(30));
    let (c, slab, page) = client_with_a_page(&host, Some(0xC0FFEE));
    drop(c);
    let s = wait_for_stats(&host, Duration::from_secs(5), |s| s.orphaned_slabs == 1 && s.clients == 1);
    assert_eq!(s.used_bytes, 16 * PAGE_SIZE as u64, "orphans keep their memory");

    let mut again = Client::connect(&host);
    assert_eq!(again.call(&Message::Resume { session: 0xC0FFEE }), Reply::Resumed(1));
    assert_eq!(again.stats().orphaned_slabs, 0, "adopted");
    assert_eq!(
        again.call(&Message::ReadPages { slab_id: slab, first_page: 3, count: 1 }),
        Reply::Data(3, page.clone())
    );
    let offset = 3 * PAGE_SIZE as u64 + 1000;
    assert_eq!(
        again.call(&Message::ReadBytes { slab_id: slab, offset, len: 700 }),
        Reply::Data(offset, page[1000..1700].to_vec())
    );
    // Owned again: this connection may free it.
    assert_eq!(again.call(&Message::FreeSlab { slab_id: slab }), Reply::Ok);
    assert_eq!(again.stats().used_bytes, 0);
}

#[test]
fn without_resume_slabs_are_freed_at_disconnect() {
    let host = host(Duration::from_secs(30));
    let (c, _, _) = client_with_a_page(&host, None);
    drop(c);
    let s = wait_for_stats(&host, Duration::from_secs(5), |s| s.used_bytes == 0);
    assert_eq!((s.slabs, s.orphaned_slabs), (0, 0));
}

#[test]
fn orphans_are_freed_after_the_grace_period() {
    let grace = Duration::from_secs(1);
    let host = host(grace);
    let (c, slab, _) = client_with_a_page(&host, Some(77));
    drop(c);
    let dropped = Instant::now();
    wait_for_stats(&host, Duration::from_secs(5), |s| s.orphaned_slabs == 1);
    let s = wait_for_stats(&host, Duration::from_secs(5), |s| s.used_bytes == 0);
    assert!(dropped.elapsed() >= grace - Duration::from_millis(100), "freed before the grace period");
    assert_eq!((s.slabs, s.orphaned_slabs), (0, 0));
    // Too late: resuming adopts nothing.
    let mut late = Client::connect(&host);
    assert_eq!(late.call(&Message::Resume { session: 77 }), Reply::Resumed(0));
    assert!(matches!(
        late.call(&Message::ReadPages { slab_id: slab, first_page: 3, count: 1 }),
        Reply::Error(ErrorCode::NoSuchSlab, _)
    ));
}

#[test]
fn zero_grace_frees_a_sessions_slabs_at_disconnect() {
    let host = host(Duration::ZERO);
    let (c, _, _) = client_with_a_page(&host, Some(5));
    drop(c);
    let s = wait_for_stats(&host, Duration::from_secs(5), |s| s.used_bytes == 0);
    assert_eq!((s.slabs, s.orphaned_slabs), (0, 0));
}

/// The client reconnects while the host still thinks the old connection is alive: the new
/// connection takes the session over and the old one is closed.
#[test]
fn resume_takes_over_a_connection_the_host_thinks_alive() {
    let host = host(Duration::from_secs(30));
    let (mut old, slab, page) = client_with_a_page(&host, Some(0xABCD));
    let mut new = Client::connect(&host);
    let asked = Instant::now();
    assert_eq!(new.call(&Message::Resume { session: 0xABCD }), Reply::Resumed(1));
    assert!(asked.elapsed() < Duration::from_secs(2), "took over within the wait");
    assert_eq!(
        new.call(&Message::ReadPages { slab_id: slab, first_page: 3, count: 1 }),
        Reply::Data(3, page)
    );
    assert!(old.call_raw(&Message::GetStats).is_err(), "the old connection is closed");
    assert_eq!(new.call(&Message::FreeSlab { slab_id: slab }), Reply::Ok, "the new one owns the slab");
    let s = new.stats();
    assert_eq!((s.used_bytes, s.orphaned_slabs, s.clients), (0, 0, 1));
}

#[test]
fn bad_resumes_are_refused() {
    let host = host(Duration::from_secs(30));
    let mut c = Client::connect(&host);
    assert!(matches!(c.call(&Message::Resume { session: 0 }), Reply::Error(ErrorCode::BadRequest, _)));
    assert_eq!(c.call(&Message::Resume { session: 9 }), Reply::Resumed(0));
    assert_eq!(c.call(&Message::Resume { session: 9 }), Reply::Resumed(0), "a retry of the same session");
    assert!(matches!(c.call(&Message::Resume { session: 10 }), Reply::Error(ErrorCode::BadRequest, _)));
    let slab = c.alloc(PAGE_SIZE as u64);
    assert!(matches!(
        c.call(&Message::ReadBytes { slab_id: slab, offset: 0, len: 0 }),
        Reply::Error(ErrorCode::BadRequest, _)
    ));
    assert!(matches!(
        c.call(&Message::ReadBytes { slab_id: slab, offset: 4000, len: 97 }),
        Reply::Error(ErrorCode::OutOfRange, _)
    ));
    assert!(matches!(
        c.call(&Message::ReadBytes { slab_id: slab + 1, offset: 0, len: 1 }),
        Reply::Error(ErrorCode::NoSuchSlab, _)
    ));
}

/// A read whose reply could not fit one frame is refused, and the connection keeps serving.
#[test]
fn a_read_too_large_for_one_reply_is_refused() {
    let host = host(Duration::from_secs(30));
    let mut c = Client::connect(&host);
    let slab = c.alloc(4097 * PAGE_SIZE as u64);
    assert!(matches!(
        c.call(&Message::ReadPages { slab_id: slab, first_page: 0, count: 4097 }),
        Reply::Error(ErrorCode::OutOfRange, _)
    ));
    assert!(matches!(
        c.call(&Message::ReadPages { slab_id: slab, first_page: 0, count: 1 }),
        Reply::Data(0, _)
    ));
}

/// A client reaches its own slabs only: another's slab id, even a valid one, is refused for
/// reads, writes, discards and chases, and its owner's data stays intact.
#[test]
fn another_clients_slabs_are_out_of_reach() {
    let host = host(Duration::from_secs(30));
    let (mut owner, slab, page) = client_with_a_page(&host, None);
    let mut other = Client::connect(&host);
    let refused = |reply: Reply| matches!(reply, Reply::Error(ErrorCode::NoSuchSlab, _));
    assert!(refused(other.call(&Message::ReadPages { slab_id: slab, first_page: 3, count: 1 })));
    assert!(refused(other.call(&Message::ReadBytes { slab_id: slab, offset: 0, len: 8 })));
    let zeros = vec![0u8; PAGE_SIZE];
    assert!(refused(other.call(&Message::WritePages { slab_id: slab, first_page: 3, data: &zeros })));
    assert!(refused(other.call(&Message::DiscardPages { slab_id: slab, first_page: 3, count: 1 })));
    assert!(refused(other.call(&Message::FreeSlab { slab_id: slab })));
    let table = slab.to_le_bytes();
    let chase =
        Message::ChasePointers { start: 1 << 40, hops: 4, base: 1 << 40, span_bytes: 1 << 20, slabs: &table };
    assert_eq!(other.call(&chase), Reply::Chain(Vec::new()));
    assert_eq!(
        owner.call(&Message::ReadPages { slab_id: slab, first_page: 3, count: 1 }),
        Reply::Data(3, page)
    );
}

/// `XorLines` is not idempotent: a client replaying it on a resumed session (its reply was lost
/// with the old connection) must not have it applied twice, while a new one is applied.
#[test]
fn a_replayed_xor_is_applied_once_per_session() {
    let host = host(Duration::from_secs(30));
    let session = 0xD1CE;
    let mut first = new_session(&host, session);
    let slab = first.alloc(16 * PAGE_SIZE as u64);
    first.set_next_id(100);
    let xor = |byte: u8| vec![byte; 64];
    let (a, b) = (xor(0x0F), xor(0xF0));
    let request = |lines| Message::XorLines { slab_id: slab, page: 2, line_mask: 1 << 5, lines };
    assert_eq!(first.call(&request(&a)), Reply::Ok);
    let mut again = resume_on_a_new_connection(&host, first, session, 1);
    again.set_next_id(100);
    assert_eq!(again.call(&request(&a)), Reply::Ok, "the replay is acknowledged");
    assert_eq!(again.call(&request(&b)), Reply::Ok, "id 101 is new");
    let offset = 2 * PAGE_SIZE as u64 + 5 * 64;
    assert_eq!(
        again.call(&Message::ReadBytes { slab_id: slab, offset, len: 64 }),
        Reply::Data(offset, vec![0xFF; 64]),
        "0x0F once, then 0xF0"
    );
}

/// A write the host refused, replayed on a resumed session (the refusal was lost with the old
/// connection), is refused again with the same error: acknowledging it would tell the client
/// the host holds data it never wrote.
#[test]
fn a_replayed_refused_write_is_refused_again() {
    let host = host(Duration::from_secs(30));
    let session = 0xB0B;
    let mut first = new_session(&host, session);
    let slab = first.alloc(16 * PAGE_SIZE as u64);
    first.set_next_id(300);
    let lines = vec![0x77; 64];
    let outside = Message::WriteLines { slab_id: slab, page: 99, line_mask: 1, lines: &lines };
    let inside = Message::WriteLines { slab_id: slab, page: 1, line_mask: 1, lines: &lines };
    let Reply::Error(ErrorCode::OutOfRange, why) = first.call(&outside) else {
        panic!("page 99 of 16 is refused")
    };
    assert_eq!(first.call(&inside), Reply::Ok);
    let mut again = resume_on_a_new_connection(&host, first, session, 1);
    again.set_next_id(300);
    assert_eq!(
        again.call(&outside),
        Reply::Error(ErrorCode::OutOfRange, why.clone()),
        "refused again, not acknowledged"
    );
    assert_eq!(again.call(&inside), Reply::Ok, "the applied one is acknowledged");
    assert!(
        matches!(again.call(&outside), Reply::Error(ErrorCode::OutOfRange, _)),
        "and a new one is refused"
    );
}

/// An allocation replayed on a resumed session (its reply lost with the old connection) gets
/// the slab it made, not a second one the client would never learn of (and never free).
#[test]
fn a_replayed_allocation_gets_the_same_slab() {
    let host = host(Duration::from_secs(30));
    let session = 0xA110C;
    let mut first = new_session(&host, session);
    first.set_next_id(500);
    let alloc = Message::AllocSlab { bytes: 16 * PAGE_SIZE as u64, region: 1 };
    let Reply::Slab(slab) = first.call(&alloc) else { panic!("allocated") };
    let mut again = resume_on_a_new_connection(&host, first, session, 1);
    again.set_next_id(500);
    assert_eq!(again.call(&alloc), Reply::Slab(slab), "the replay gets the slab it made");
    let stats = again.stats();
    assert_eq!(stats.slabs, 1, "{stats:?}");
    let Reply::Slab(other) = again.call(&alloc) else { panic!("a new request allocates") };
    assert_ne!(other, slab);
}

/// A replayed overwrite the host had applied must not be applied again either: it would undo
/// an XOR that came after it (a discarded parity page, then a change XORed into it).
#[test]
fn a_replayed_overwrite_does_not_undo_a_later_xor() {
    let host = host(Duration::from_secs(30));
    let session = 0xFEED;
    let mut first = new_session(&host, session);
    let slab = first.alloc(16 * PAGE_SIZE as u64);
    first.set_next_id(200);
    let lines = vec![0x3C; 64];
    let page = |p| Message::ReadBytes { slab_id: slab, offset: p * PAGE_SIZE as u64, len: 64 };
    assert_eq!(
        first.call(&Message::WritePages { slab_id: slab, first_page: 1, data: &page_of(7) }),
        Reply::Ok
    );
    assert_eq!(first.call(&Message::DiscardPages { slab_id: slab, first_page: 4, count: 1 }), Reply::Ok);
    let xor = |p| Message::XorLines { slab_id: slab, page: p, line_mask: 1, lines: &lines };
    assert_eq!(first.call(&xor(1)), Reply::Ok);
    assert_eq!(first.call(&xor(4)), Reply::Ok);
    let mut again = resume_on_a_new_connection(&host, first, session, 1);
    // The whole unanswered tail again, in order, with its ids.
    again.set_next_id(200);
    assert_eq!(
        again.call(&Message::WritePages { slab_id: slab, first_page: 1, data: &page_of(7) }),
        Reply::Ok
    );
    assert_eq!(again.call(&Message::DiscardPages { slab_id: slab, first_page: 4, count: 1 }), Reply::Ok);
    assert_eq!(again.call(&xor(1)), Reply::Ok);
    assert_eq!(again.call(&xor(4)), Reply::Ok);
    let expected: Vec<u8> = page_of(7)[..64].iter().map(|b| b ^ 0x3C).collect();
    assert_eq!(again.call(&page(1)), Reply::Data(PAGE_SIZE as u64, expected), "written once, XORed once");
    assert_eq!(
        again.call(&page(4)),
        Reply::Data(4 * PAGE_SIZE as u64, lines.clone()),
        "zeroed once, XORed once"
    );
    // Past the replayed ids, writes apply again.
    assert_eq!(again.call(&xor(4)), Reply::Ok);
    assert_eq!(again.call(&page(4)), Reply::Data(4 * PAGE_SIZE as u64, vec![0; 64]));
}
