//! `clustermem status` against real host processes and an address where nothing listens; and
//! `clustermem host --orphan-grace` as a client that resumes sessions sees it.

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clustermem_net::{FrameReader, FrameWriter};
use clustermem_proto::{Message, MAX_VERSION, MIN_VERSION};
use clustermem_runtime::{Redundancy, Runtime, RuntimeConfig};
use common::{json, require_userfaultfd, run_with_timeout, stderr, HostProcess};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A raw protocol client: sends `requests` after Hello and checks none is refused.
fn client(addr: &str, requests: &[Message<'_>]) -> FrameReader {
    let mut reader = FrameReader::new(TcpStream::connect(addr).expect("connect")).expect("reader");
    let mut out = FrameWriter::new();
    out.push(0, &Message::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, flags: 0 });
    for (i, r) in requests.iter().enumerate() {
        out.push(i as u64 + 1, r);
    }
    out.flush_to(reader.stream()).expect("send");
    for _ in 0..=requests.len() {
        let (id, reply) = reader.recv(None, Some(Instant::now() + TIMEOUT)).expect("reply");
        assert!(!matches!(reply, Message::Error { .. }), "request {id} refused: {reply:?}");
    }
    reader
}

/// A loopback address with nothing listening on it.
fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn status(hosts: &str, json: bool) -> std::process::Output {
    let mut args = vec!["status", "--hosts", hosts, "--timeout", "2s"];
    if json {
        args.push("--json");
    }
    run_with_timeout(&args, TIMEOUT)
}

#[test]
fn status_reports_up_and_down_hosts() {
    let a = HostProcess::start("64M");
    let b = HostProcess::start("32M");
    let dead = dead_addr();
    // Two regions of one client: three slabs.
    let slab = |region| Message::AllocSlab { bytes: 1 << 20, region };
    let _holder = client(&a.addr, &[slab(1), slab(1), slab(2)]);
    let hosts = format!("{},{},{dead}", a.addr, b.addr);

    let out = status(&hosts, false);
    assert_eq!(out.status.code(), Some(1), "a host is down: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one row per host: {text}");
    assert!(lines[0].starts_with("HOST") && lines[0].ends_with("STATE"), "{text}");
    assert!(lines[0].contains("REGIONS") && lines[0].contains("SHARDS"), "{text}");
    assert!(lines[1].starts_with(&a.addr) && lines[1].ends_with("up"), "{text}");
    assert!(
        lines[1].contains("64.0 MiB") && lines[1].contains("3.0 MiB") && lines[1].contains("61.0 MiB"),
        "{text}"
    );
    assert!(lines[2].starts_with(&b.addr) && lines[2].ends_with("up"), "{text}");
    assert!(lines[3].starts_with(&dead) && lines[3].ends_with("down: connection refused"), "{text}");

    let out = status(&hosts, true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let r = json(&out);
    let rows = r["hosts"].as_array().expect("hosts array");
    assert_eq!(rows.len(), 3, "{r}");
    assert_eq!(rows[0]["addr"], a.addr.as_str());
    assert_eq!(rows[0]["up"], true);
    assert!(rows[0]["error"].is_null(), "{r}");
    assert_eq!(rows[0]["capacity_bytes"], 64 << 20);
    assert_eq!(rows[0]["used_bytes"], 3 << 20);
    assert_eq!((rows[0]["regions"].clone(), rows[0]["slabs"].clone()), (2.into(), 3.into()), "{r}");
    assert_eq!(rows[0]["clients"], 1, "the holder, not the query itself: {r}");
    assert_eq!(rows[0]["orphaned_slabs"], 0);
    assert_eq!((rows[1]["up"].clone(), rows[1]["used_bytes"].clone()), (true.into(), 0.into()));
    assert_eq!(rows[1]["capacity_bytes"], 32 << 20);
    assert_eq!(rows[2]["up"], false);
    assert!(rows[2]["error"].as_str().is_some_and(|e| e.contains("refused")), "{r}");
    assert!(rows[2]["used_bytes"].is_null(), "{r}");

    let out = status(&format!("{},{}", a.addr, b.addr), true);
    assert_eq!(out.status.code(), Some(0), "all up: {}", stderr(&out));
}

/// A real host with `--orphan-grace 2s`: a resumed session's slab outlives its connection as
/// an orphan, then is freed once the grace period passes.
#[test]
fn orphan_grace_flag_keeps_then_frees_a_sessions_slab() {
    let host = HostProcess::start_with("64M", &["--orphan-grace", "2s"]);
    let session = client(
        &host.addr,
        &[Message::Resume { session: 42 }, Message::AllocSlab { bytes: 1 << 20, region: 1 }],
    );
    drop(session);
    let dropped = Instant::now();
    let stats = |out: &std::process::Output| json(out)["hosts"][0].clone();
    let mut seen_orphan = false;
    loop {
        let out = status(&host.addr, true);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let h = stats(&out);
        if h["orphaned_slabs"] == 1 {
            assert_eq!(h["used_bytes"], 1 << 20, "an orphan keeps its memory: {h}");
            seen_orphan = true;
        }
        if h["used_bytes"] == 0 {
            assert_eq!(h["orphaned_slabs"], 0, "{h}");
            break;
        }
        assert!(dropped.elapsed() < Duration::from_secs(15), "orphan never freed: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen_orphan, "the slab was freed without being orphaned first");
    assert!(dropped.elapsed() >= Duration::from_millis(1900), "freed before the grace period");
}

/// What a runtime placed, as the hosts report it: two replicated regions spread over three
/// hosts show up as regions and shards (one slab per copy of each span).
#[test]
fn status_counts_a_runtimes_regions_and_shards() {
    require_userfaultfd();
    let hosts: Vec<HostProcess> = (0..3).map(|_| HostProcess::start("64M")).collect();
    let addrs: Vec<String> = hosts.iter().map(|h| h.addr.clone()).collect();
    let rt = Runtime::start(RuntimeConfig {
        hosts: addrs.clone(),
        local_mem_bytes: 1 << 20,
        slab_bytes: 1 << 20,
        redundancy: Redundancy::Replicate(2),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let _a = rt.map(4 << 20).expect("region a");
    let _b = rt.map(4 << 20).expect("region b");
    let out = status(&addrs.join(","), true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = json(&out);
    let rows = r["hosts"].as_array().expect("hosts array");
    let total = |field: &str| rows.iter().map(|h| h[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!(total("slabs"), 2 * 2 * 4, "two regions of four spans, two copies each: {r}");
    for h in rows {
        assert!(h["regions"].as_u64().unwrap() <= 2, "{r}");
        assert_eq!(h["regions"] == 0, h["slabs"] == 0, "{r}");
    }
    assert!(rows.iter().any(|h| h["regions"] == 2), "a host holds shards of both: {r}");
}
