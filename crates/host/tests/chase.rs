//! `ChasePointers` against a real host over loopback TCP: the host follows a linked chain
//! through a client's slabs, one pointer per 64-byte line, and stops where its copy ends.

mod common;

use clustermem_host::MemoryHost;
use clustermem_proto::{
    ErrorCode, Message, FEATURE_CHASE_POINTERS, FEATURE_XOR_LINES, HELLO_ASKS_FEATURES, PAGE_SIZE,
};
use common::{Client, Reply};

const BASE: u64 = 0x7f00_0000_0000;
/// Four pages per span; span 1 lives on some other host.
const SPAN: u64 = 4 * PAGE_SIZE as u64;

/// Writes the 8-byte `words` at region address `at` (inside `slab`, which holds span `span`).
fn put(c: &mut Client, slab: u64, span: u64, at: u64, words: &[u64]) {
    let rel = at - BASE - span * SPAN;
    let page = rel / PAGE_SIZE as u64;
    let mut data = match c.call(&Message::ReadPages { slab_id: slab, first_page: page, count: 1 }) {
        Reply::Data(_, data) => data,
        other => panic!("ReadPages: {other:?}"),
    };
    let offset = (rel % PAGE_SIZE as u64) as usize;
    for (i, w) in words.iter().enumerate() {
        data[offset + 8 * i..offset + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    assert_eq!(c.call(&Message::WritePages { slab_id: slab, first_page: page, data: &data }), Reply::Ok);
}

#[test]
fn the_host_follows_a_chain_through_its_own_spans() {
    let host = MemoryHost::bind("127.0.0.1:0", 1 << 20).expect("bind").spawn();
    assert_eq!(Client::connect_with(&host, 0).1, 0, "features only when asked for");
    let (mut c, features) = Client::connect_with(&host, HELLO_ASKS_FEATURES);
    assert_eq!(features, FEATURE_CHASE_POINTERS | FEATURE_XOR_LINES);
    let (a, b) = (c.alloc(SPAN), c.alloc(SPAN));
    let slabs: Vec<u8> = [a, 0, b].iter().flat_map(|id| id.to_le_bytes()).collect();
    // start (span 0) -> n1 (span 2) -> n2 (span 0) -> n3 (span 1, not here).
    let (start, n1, n2, n3) = (BASE + 0x40, BASE + 2 * SPAN + 0x1080, BASE + 0x2100, BASE + SPAN + 8);
    // Values that are not pointers into the region, and one into the node's own line, are
    // passed over.
    put(&mut c, a, 0, start, &[7, start + 8, BASE + 3 * SPAN, n1]);
    put(&mut c, b, 2, n1, &[n2, 9]);
    put(&mut c, a, 0, n2, &[0, n3]);
    // A cycle.
    put(&mut c, a, 0, BASE + 0x3000, &[BASE + 0x3040]);
    put(&mut c, a, 0, BASE + 0x3040, &[BASE + 0x3000]);
    let mut chase = |start: u64, hops: u8| {
        let msg = Message::ChasePointers { start, hops, base: BASE, span_bytes: SPAN, slabs: &slabs };
        match c.call(&msg) {
            Reply::Chain(chain) => chain,
            other => panic!("ChasePointers: {other:?}"),
        }
    };
    assert_eq!(chase(start, 16), [n1, n2, n3], "ends past the value pointing off this host");
    assert_eq!(chase(start, 2), [n1, n2], "at most `hops`");
    assert_eq!(chase(n1, 16), [n2, n3]);
    assert_eq!(chase(BASE + 0x2000, 16), [], "a line without pointers");
    assert_eq!(chase(BASE - 8, 16), [], "a start outside the region");
    assert_eq!(chase(n3, 16), [], "a start in a span held elsewhere");
    assert_eq!(chase(start, 16), [n1, n2, n3], "the same answer again");
    // A cycle is followed until the hops run out.
    assert_eq!(chase(BASE + 0x3000, 5), [0x3040, 0x3000, 0x3040, 0x3000, 0x3040].map(|o| BASE + o));
    // A slab id this host does not have ends the chain, and the host serves on.
    let mut other = Client::connect(&host);
    let bogus: Vec<u8> = [u64::MAX, 0, b].iter().flat_map(|id| id.to_le_bytes()).collect();
    let msg = Message::ChasePointers { start, hops: 4, base: BASE, span_bytes: SPAN, slabs: &bogus };
    assert_eq!(other.call(&msg), Reply::Chain(Vec::new()));
    assert_eq!(other.stats().slabs, 2);
}

#[test]
fn a_host_told_not_to_chase_neither_offers_nor_answers_it() {
    let host = MemoryHost::bind("127.0.0.1:0", 1 << 20).expect("bind").without_pointer_chasing().spawn();
    let (mut c, features) = Client::connect_with(&host, HELLO_ASKS_FEATURES);
    assert_eq!(features, FEATURE_XOR_LINES, "no pointer chasing offered");
    let a = c.alloc(SPAN);
    let msg = Message::ChasePointers {
        start: BASE,
        hops: 4,
        base: BASE,
        span_bytes: SPAN,
        slabs: &a.to_le_bytes(),
    };
    assert!(matches!(c.call(&msg), Reply::Error(ErrorCode::BadRequest, m) if m.contains("pointer")));
    assert_eq!(c.stats().slabs, 1, "the connection serves on");
}

#[test]
fn odd_span_tables_end_the_chain_without_an_error() {
    let host = MemoryHost::bind("127.0.0.1:0", 1 << 20).expect("bind").spawn();
    let (mut c, _) = Client::connect_with(&host, HELLO_ASKS_FEATURES);
    // A slab of one page where the table says spans are four: the chain reaches past it.
    let short = c.alloc(PAGE_SIZE as u64);
    let slabs: Vec<u8> = [short, short].iter().flat_map(|id| id.to_le_bytes()).collect();
    put(&mut c, short, 0, BASE, &[BASE + 2 * PAGE_SIZE as u64]);
    let msg = Message::ChasePointers { start: BASE, hops: 8, base: BASE, span_bytes: SPAN, slabs: &slabs };
    assert_eq!(c.call(&msg), Reply::Chain(vec![BASE + 2 * PAGE_SIZE as u64]), "past the slab's end: stop");
    // A region reaching past the end of the address space.
    let top = u64::MAX - 100;
    let msg = Message::ChasePointers { start: top, hops: 8, base: top, span_bytes: SPAN, slabs: &slabs };
    assert_eq!(c.call(&msg), Reply::Chain(Vec::new()));
    assert_eq!(c.stats().slabs, 1, "the connection serves on");
}
