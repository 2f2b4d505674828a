//! Bytes of memory per indexed block, and the time of the whole-index operations.
//!
//! Two measurements, side by side: the index's own estimate from its structures' capacities
//! ([`kvfleet_kv_router::IndexStats::heap_bytes`]: hash table buckets and control bytes, the
//! block arena, runs and holder slab), and the growth of the process's resident set while the
//! fleet is built (from `/proc/self/statm`, Linux only; it includes allocator overhead and the
//! router's other state). No counting allocator: that would need `unsafe`, which the workspace denies.
//!
//! `cargo bench -p kvfleet-kv-router --bench memory`

// A benchmark report is printed output by design.
#![allow(clippy::print_stdout)]

mod common;

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The fleets measured: (workers, replicas per chain).
const CASES: [(u64, u64); 4] = [(100, 1), (100, 2), (1000, 2), (1000, 4)];

/// Set to a case's index to measure that case alone (in a fresh process, so one case's freed
/// memory does not flatter or blur the next one's resident-set growth).
const CASE_VAR: &str = "KVFLEET_MEMORY_CASE";

fn main() {
    if let Some(case) = std::env::var(CASE_VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        if let Some(&(workers, replicas)) = CASES.get(case) {
            measure(workers, replicas);
        }
        return;
    }
    println!(
        "| workers | replicas per chain | unique blocks | (block, worker) entries | shared (≥3 holders) | estimate bytes/block | estimate bytes/entry | RSS growth bytes/block | remove_worker | restore_worker |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    for case in 0..CASES.len() {
        let status = std::process::Command::new(&exe)
            .env(CASE_VAR, case.to_string())
            .status()
            .expect("re-running the bench binary");
        assert!(status.success(), "case {case} failed: {status}");
    }
}

fn measure(workers: u64, replicas: u64) {
    let before = resident_bytes();
    let (router, chains) = common::fleet(workers, 1_000_000, replicas);
    // The request chains the fleet builder returns are not part of the index.
    let chain_bytes: usize = chains.iter().map(|c| c.capacity() * 8 + 24).sum();
    let after = resident_bytes();
    let stats = router.index_stats();
    let rss = match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.1}",
            a.saturating_sub(b).saturating_sub(chain_bytes as u64) as f64 / stats.blocks as f64
        ),
        _ => "n/a".to_owned(),
    };
    // The rare whole-index operations, timed once on the full index: a worker leaving (one
    // pass over the index's runs) and re-syncing a worker from its snapshot (a pass plus the
    // inserts, in arena order).
    let mut router = router;
    let worker = kvfleet_proto::WorkerId(1);
    let snapshot = router.worker_snapshot(worker).expect("worker 1 exists");
    let held: usize = snapshot.tiers.iter().map(|t| t.blocks.len()).sum();
    let started = std::time::Instant::now();
    router.restore_worker(&snapshot).expect("worker 1 exists");
    let restore = started.elapsed();
    let started = std::time::Instant::now();
    router.remove_worker(worker);
    let remove = started.elapsed();
    println!(
        "| {workers} | {replicas} | {} | {} | {} | {:.1} | {:.1} | {rss} | {:.1} ms | {:.1} ms ({held} blocks) |",
        stats.blocks,
        stats.entries,
        stats.shared_blocks,
        stats.heap_bytes as f64 / stats.blocks as f64,
        stats.heap_bytes as f64 / stats.entries as f64,
        remove.as_secs_f64() * 1e3,
        restore.as_secs_f64() * 1e3,
    );
}
