//! Runs the transaction benchmark and prints its JSON report (used by `bench/pmdk/run.sh`
//! when no `clustermem` binary is at hand).
//!
//! `bench_tx --pool PATH [--updates-per-tx N] [--threads N] [--seconds S] [--async]`

use std::time::Duration;

use clustermem_pmem::{bench_tx, TxBenchOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = TxBenchOptions::new("/tmp/clustermem-bench.pool");
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--pool" => opts.pool = val().into(),
            "--updates-per-tx" => opts.updates_per_tx = val().parse().unwrap_or_else(|_| usage("bad number")),
            "--threads" => opts.threads = val().parse().unwrap_or_else(|_| usage("bad number")),
            "--seconds" => {
                opts.duration =
                    Duration::from_secs_f64(val().parse().unwrap_or_else(|_| usage("bad number")));
            }
            "--async" => opts.async_commit = true,
            "--json" => {}
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    match bench_tx(&opts) {
        Ok(r) => println!("{}", serde_json::to_string(&r).expect("json")),
        Err(e) => {
            eprintln!("bench_tx: {e}");
            std::process::exit(1);
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("bench_tx: {why}\nusage: bench_tx --pool PATH [--updates-per-tx N] [--threads N] [--seconds S] [--async]");
    std::process::exit(2)
}
