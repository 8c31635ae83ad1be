//! `clustermem status`: is each memory host up, and how full is it?
//!
//! Each host is asked over its own connection (Hello, then GetStats), all at once, so one
//! unreachable host costs the timeout once, not once per host.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use clustermem_net::{FrameReader, FrameWriter, RecvError};
use clustermem_proto::{HostStats, Message, MAX_VERSION, MIN_VERSION};
use serde::Serialize;

use crate::duration::parse_duration;

/// `clustermem status` arguments.
#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 when every host is up, 1 when any is down, 2 on bad usage.\n\
    REGIONS counts the client regions with memory on the host; SHARDS (\"slabs\" in --json) its \
    slabs, each one copy or erasure shard of one span of a region; CLIENTS the host's connections \
    other than this query's own; ORPHANED the slabs of dropped connections kept for them to \
    resume.")]
pub struct StatusArgs {
    /// Memory hosts to ask, comma-separated host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// Print exactly one JSON object on stdout:
    /// {"hosts": [{"addr", "up", "error", "capacity_bytes", "used_bytes", "free_bytes",
    /// "regions", "slabs", "clients", "orphaned_slabs"}]} (numbers are null for a host that is
    /// down).
    #[arg(long)]
    json: bool,
    /// How long to wait for each host to connect and answer (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
}

/// One host's answer, as printed by `--json`.
#[derive(Debug, Serialize)]
struct HostRow {
    addr: String,
    up: bool,
    error: Option<String>,
    capacity_bytes: Option<u64>,
    used_bytes: Option<u64>,
    free_bytes: Option<u64>,
    regions: Option<u64>,
    slabs: Option<u64>,
    clients: Option<u64>,
    orphaned_slabs: Option<u64>,
}

impl HostRow {
    fn new(addr: &str, answer: Result<HostStats, String>) -> Self {
        match answer {
            Ok(s) => Self {
                addr: addr.to_string(),
                up: true,
                error: None,
                capacity_bytes: Some(s.capacity_bytes),
                used_bytes: Some(s.used_bytes),
                free_bytes: Some(s.capacity_bytes.saturating_sub(s.used_bytes)),
                regions: Some(s.regions),
                slabs: Some(s.slabs),
                // The host counts this query's own connection.
                clients: Some(s.clients.saturating_sub(1)),
                orphaned_slabs: Some(s.orphaned_slabs),
            },
            Err(e) => Self {
                addr: addr.to_string(),
                up: false,
                error: Some(e),
                capacity_bytes: None,
                used_bytes: None,
                free_bytes: None,
                regions: None,
                slabs: None,
                clients: None,
                orphaned_slabs: None,
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    hosts: Vec<HostRow>,
}

/// Runs `clustermem status`; the exit status says whether every host is up.
pub fn run(args: &StatusArgs) -> ExitCode {
    let answers: Vec<Result<HostStats, String>> = std::thread::scope(|s| {
        let asks: Vec<_> = args.hosts.iter().map(|h| s.spawn(|| ask(h, args.timeout))).collect();
        asks.into_iter().map(|a| a.join().unwrap_or_else(|_| Err("internal error".into()))).collect()
    });
    let report =
        Report { hosts: args.hosts.iter().zip(answers).map(|(addr, a)| HostRow::new(addr, a)).collect() };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("clustermem status: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print_table(&report.hosts);
    }
    if report.hosts.iter().all(|h| h.up) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_table(rows: &[HostRow]) {
    let size = |v: Option<u64>| v.map_or_else(|| "-".to_string(), crate::human_bytes);
    let count = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    // The state goes last: a down host's reason may be long.
    let mut table =
        vec![["HOST", "CAPACITY", "USED", "FREE", "REGIONS", "SHARDS", "CLIENTS", "ORPHANED", "STATE"]
            .map(String::from)];
    for r in rows {
        let state = match &r.error {
            None => "up".to_string(),
            Some(e) => format!("down: {e}"),
        };
        table.push([
            r.addr.clone(),
            size(r.capacity_bytes),
            size(r.used_bytes),
            size(r.free_bytes),
            count(r.regions),
            count(r.slabs),
            count(r.clients),
            count(r.orphaned_slabs),
            state,
        ]);
    }
    let widths: Vec<usize> =
        (0..table[0].len()).map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0)).collect();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, &w)| format!("{cell:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

/// Connects to `addr`, says Hello and asks for the host's stats, all within `timeout`.
fn ask(addr: &str, timeout: Duration) -> Result<HostStats, String> {
    let deadline = Instant::now() + timeout;
    let targets: Vec<_> = addr.to_socket_addrs().map_err(|e| format!("cannot resolve: {e}"))?.collect();
    let mut last = format!("{addr:?} resolves to no address");
    let mut stream = None;
    for target in targets {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = format!("timed out after {timeout:?}");
            break;
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = connect_error(&e, timeout),
        }
    }
    let stream = stream.ok_or(last)?;
    let _ = stream.set_nodelay(true);
    let mut reader = FrameReader::new(stream).map_err(|e| e.to_string())?;
    let mut out = FrameWriter::new();
    out.push(1, &Message::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, flags: 0 });
    out.push(2, &Message::GetStats);
    out.flush_to(reader.stream()).map_err(|e| format!("send failed: {e}"))?;
    let recv_error = |e: RecvError| match e {
        RecvError::TimedOut(_) => format!("no answer within {timeout:?}"),
        RecvError::Closed => "the host closed the connection".to_string(),
        RecvError::Decode(e) => format!("not a clustermem host? ({e})"),
        RecvError::Io(e) => format!("connection failed: {e}"),
    };
    match reader.recv(None, Some(deadline)).map_err(recv_error)? {
        (_, Message::HelloOk { .. }) => {}
        (_, Message::Error { message, .. }) => return Err(format!("refused: {message}")),
        (_, other) => return Err(format!("unexpected answer to Hello: kind {}", other.kind())),
    }
    match reader.recv(None, Some(deadline)).map_err(recv_error)? {
        (_, Message::Stats(s)) => Ok(s),
        (_, Message::Error { message, .. }) => Err(format!("refused: {message}")),
        (_, other) => Err(format!("unexpected answer to GetStats: kind {}", other.kind())),
    }
}

fn connect_error(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("timed out after {timeout:?}")
        }
        _ => e.to_string(),
    }
}
