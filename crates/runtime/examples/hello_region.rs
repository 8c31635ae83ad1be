//! A 1 GiB region with 64 MiB of local memory, backed by an embedded memory host.
//! Run as root (userfaultfd): `cargo run --release -p clustermem-runtime --example hello_region`
use clustermem_runtime::{Runtime, RuntimeConfig};

fn main() -> Result<(), clustermem_runtime::RuntimeError> {
    let runtime = Runtime::start(RuntimeConfig { local_mem_bytes: 64 << 20, ..Default::default() })?;
    let mut region = runtime.map(1 << 30)?;
    let bytes = region.as_mut_slice();
    for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
        *b = (i >> 12) as u8; // one store per page: 262144 pages, 16x what fits locally
    }
    let ok = bytes.iter().enumerate().step_by(4096).all(|(i, &b)| b == (i >> 12) as u8);
    let s = runtime.stats().snapshot();
    println!(
        "verified={ok} fetched={} evicted={} written_back={}",
        s.pages_fetched, s.pages_evicted, s.pages_written_back
    );
    Ok(())
}
