//! Kills child processes running transactions at random moments and at every failpoint, and
//! checks that each recovered pool is exactly a committed prefix. `harness = false`: this
//! binary is also the crash child (re-executed with `CLUSTERMEM_PMEM_CRASH_CHILD` set).

use clustermem_pmem::{crashtest, maybe_run_crash_child, CrashTestOptions};

fn main() {
    maybe_run_crash_child();
    let dir = std::env::temp_dir().join(format!("clustermem-pmem-crashtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let iterations = std::env::var("CRASHTEST_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let seed = std::env::var("CRASHTEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let opts = CrashTestOptions { iterations, seed, ..CrashTestOptions::new(dir.join("crash.pool")) };
    let report = crashtest(&opts).expect("crash test runs");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report.violations, 0, "{:#?}", report.violation_details);
    assert_eq!(report.iterations, iterations);
    assert!(report.failpoint_kills > 0, "no failpoint was ever reached");
    assert!(report.committed_tx_checked > 0, "no transaction committed");
    println!("crashtest: ok");
}
