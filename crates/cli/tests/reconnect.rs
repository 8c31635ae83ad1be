//! A connection cut mid-request is re-established and its requests replayed; a killed host
//! that comes back is redialed and rebuilt onto; a slow link that keeps answering is not taken
//! for a dead host. Real host processes, a real TCP proxy that cuts or slows the connection,
//! real SIGKILL.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermem_runtime::{Runtime, RuntimeConfig, PAGE_SIZE};
use common::{bin, json, output_with_timeout, require_userfaultfd, stderr, HostProcess};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A TCP proxy on loopback to `upstream`. The first connection through it is cut (both
/// sides shut down) once `cut_after` bytes have gone from client to host, which is in the
/// middle of some request; later connections pass everything. Returns its address and the
/// number of connections it accepted.
fn cutting_proxy(upstream: String, cut_after: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let Ok(host) = TcpStream::connect(&upstream) else { return };
            let limit = if n == 0 { cut_after } else { usize::MAX };
            let (c2, h2) = (client.try_clone().expect("clone"), host.try_clone().expect("clone"));
            std::thread::spawn(move || pipe(h2, c2, usize::MAX, None));
            std::thread::spawn(move || pipe(client, host, limit, None));
        }
    });
    (addr, accepted)
}

/// A TCP proxy on loopback to `upstream` that passes at most `bytes_per_s` from client to
/// host (replies pass at full speed). Returns its address.
fn slow_proxy(upstream: String, bytes_per_s: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(host) = TcpStream::connect(&upstream) else { return };
            let (c2, h2) = (client.try_clone().expect("clone"), host.try_clone().expect("clone"));
            std::thread::spawn(move || pipe(h2, c2, usize::MAX, None));
            std::thread::spawn(move || pipe(client, host, usize::MAX, Some(bytes_per_s)));
        }
    });
    addr
}

/// Copies `from` to `to` (at most `bytes_per_s`, if given) until either ends or `limit` bytes
/// have passed; then shuts both down.
fn pipe(mut from: TcpStream, mut to: TcpStream, limit: usize, bytes_per_s: Option<u64>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passed = 0usize;
    let started = Instant::now();
    loop {
        let want = buf.len().min(limit - passed);
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                passed += n;
                if passed >= limit {
                    break;
                }
                if let Some(rate) = bytes_per_s {
                    let due = started + Duration::from_secs_f64(passed as f64 / rate as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn a_connection_cut_mid_request_is_resumed_and_nothing_is_lost() {
    require_userfaultfd();
    let host = HostProcess::start("512M");
    // The fill alone sends ~64 MiB of write-backs: the cut lands mid-run, mid-frame.
    let (proxy, accepted) = cutting_proxy(host.addr.clone(), 24 << 20);
    let mut cmd = Command::new(bin());
    cmd.args(["bench", "random", "--size", "64M", "--local-mem", "16M", "--ops", "100000", "--json"]);
    cmd.args(["--hosts", &proxy]);
    let out = output_with_timeout(cmd, TIMEOUT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report = json(&out);
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["hosts_lost"], 0, "{report}\n{err}");
    assert!(err.contains("reconnected"), "the cut was noticed and healed: {err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one cut, one reconnection");
}

/// erasure:2+1 on three hosts, each behind a cutting proxy: the requests a host had applied
/// but not answered when its connection was cut are replayed, among them `XorLines` (parity
/// updates), which it must not apply twice. Then a host is killed, and the pages it held are
/// decoded through parity and verified: a doubled update shows as a wrong page. (Four spans,
/// so every host holds data of some and parity of others.)
#[test]
fn erasure_parity_stays_exact_across_cut_connections() {
    require_userfaultfd();
    let mut hosts: Vec<HostProcess> = (0..3).map(|_| HostProcess::start("512M")).collect();
    let proxies: Vec<(String, Arc<AtomicUsize>)> =
        hosts.iter().map(|h| cutting_proxy(h.addr.clone(), 6 << 20)).collect();
    let list = proxies.iter().map(|(addr, _)| addr.as_str()).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(bin());
    cmd.args(["bench", "random", "--size", "256M", "--local-mem", "32M", "--ops", "150000", "--json"]);
    cmd.args(["--hosts", &list, "--redundancy", "erasure:2+1"]);
    let started = std::time::Instant::now();
    let bench = std::thread::spawn(move || output_with_timeout(cmd, TIMEOUT));
    while proxies.iter().any(|(_, accepted)| accepted.load(Ordering::SeqCst) < 2) {
        assert!(!bench.is_finished() && started.elapsed() < TIMEOUT, "a connection was never cut");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!bench.is_finished(), "the run ended before the kill: make it longer");
    hosts[0].kill9();
    let out = bench.join().expect("the bench thread");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report = json(&out);
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["hosts_lost"], 1, "{report}\n{err}");
    assert_eq!(report["reconnects"], 3, "{report}\n{err}");
    assert!(report["degraded_reads"].as_u64().unwrap() > 0, "pages were decoded through parity: {report}");
}

/// Starts `clustermem host` at a fixed address (to restart it there after a kill).
fn host_at(addr: &str) -> std::process::Child {
    let mut child = Command::new(bin())
        .args(["host", "--listen", addr, "--capacity", "1G"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning clustermem host");
    for _ in 0..100 {
        if TcpStream::connect(addr).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("host at {addr} did not start listening");
}

/// replicate:2 over two hosts: when one is killed, the other already holds every span's
/// only surviving copy, so there is nowhere to rebuild until the killed host is restarted;
/// it is then redialed and the rebuild goes onto it, before the run ends.
#[test]
fn a_killed_host_restarted_at_its_address_is_rebuilt_onto() {
    require_userfaultfd();
    let a = HostProcess::start("1G");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").port()
    };
    let b_addr = format!("127.0.0.1:{port}");
    let mut b = host_at(&b_addr);
    let hosts = format!("{},{b_addr}", a.addr);
    let mut cmd = Command::new(bin());
    cmd.args(["bench", "random", "--size", "64M", "--local-mem", "16M", "--ops", "200000", "--json"]);
    cmd.args(["--hosts", &hosts, "--redundancy", "replicate:2"]);
    let bench = std::thread::spawn(move || output_with_timeout(cmd, TIMEOUT));
    std::thread::sleep(Duration::from_millis(2500));
    let _ = b.kill();
    let _ = b.wait();
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = host_at(&b_addr);
    let out = bench.join().expect("the bench thread");
    let _ = b.kill();
    let _ = b.wait();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report = json(&out);
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["hosts_lost"], 1, "{report}\n{err}");
    assert!(err.contains("answers again"), "the restarted host was redialed: {err}");
    assert!(report["pages_rebuilt"].as_u64().unwrap() > 0, "{report}");
    assert!(report["rebuild_s"].as_f64().is_some(), "the rebuild finished: {report}\n{err}");
}

/// A program writes a region four times its local memory through a slow link: write-backs
/// queue faster than the link carries them, so requests wait longer than the request
/// timeout, but the host answers all along and is not dead (it once was declared dead, and
/// the region's pages lost, by the age of the oldest unanswered request alone).
#[test]
fn a_slow_link_that_keeps_answering_is_not_a_dead_host() {
    require_userfaultfd();
    let host = HostProcess::start("256M");
    // ~6 MiB of write-backs at 2 MiB/s: ~3 s, three times the timeout below.
    let proxy = slow_proxy(host.addr.clone(), 2 << 20);
    let timeout = Duration::from_secs(1);
    let rt = Runtime::start(RuntimeConfig {
        hosts: vec![proxy],
        local_mem_bytes: 2 << 20,
        slab_bytes: 1 << 20,
        request_timeout: timeout,
        ..RuntimeConfig::default()
    })
    .expect("starting the runtime");
    let len = 8 << 20;
    let mut region = rt.map(len).expect("mapping the region");
    let byte = |i: usize| (i.wrapping_mul(2_654_435_761) >> 9) as u8;
    let started = Instant::now();
    for (i, b) in region.as_mut_slice().iter_mut().enumerate() {
        *b = byte(i);
    }
    region.flush().expect("the host answered every write-back");
    let took = started.elapsed();
    assert!(took > 2 * timeout, "the link was slow enough to test anything ({took:?})");
    let bad = region.as_slice().iter().enumerate().position(|(i, &b)| b != byte(i));
    assert_eq!(bad, None, "first wrong byte of {len}");
    let stats = rt.stats().snapshot();
    assert_eq!(stats.hosts_lost, 0);
    assert!(stats.pages_fetched >= (len / PAGE_SIZE / 2) as u64, "read back from the host: {stats:?}");
}
