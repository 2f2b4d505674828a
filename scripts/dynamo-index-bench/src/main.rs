//! kvfleet's KV index against Dynamo's, on one event stream, in one process run.
//!
//! The stream comes from a Mooncake-format trace (`hash_ids` per request): requests go to
//! `--workers` simulated engines by their first block (prefix affinity), each engine keeps an
//! LRU cache of `--capacity` blocks, and every request emits what a real engine would: a
//! `Stored` event for the part of its prompt the engine did not hold (with its parent) and a
//! `Removed` event for what that pushed out (leaves first, as engines free a sequence tail
//! first). Each trace block becomes `--expand` KV blocks (a Mooncake block is 512 tokens; 32
//! gives kvfleet's 16-token blocks). `--copies N` replays the trace N times under disjoint
//! hashes, for a larger index.
//!
//! Every index gets the very same events, converted to its own types before the clock starts,
//! and answers the very same lookups: the trace's prompts against the final index. Measured:
//!
//! - **ingest**: events applied per second, drained (for Dynamo's thread-pool indexer, the
//!   time until `flush_and_wait` returns, so queued is not counted as applied);
//! - **find matches**: per-lookup latency p50/p99/mean (kvfleet: `Router::overlaps`, every
//!   worker's held prefix; Dynamo: `find_matches`, every worker's score);
//! - **memory**: resident-set growth while the events are applied (each event is dropped once
//!   applied, in both, so both can reuse its memory): run each index in its own process
//!   (`--only NAME`) for this figure, as `scripts/bench-dynamo-index.sh` does.
//!
//! As a cross-check, the lookups' answers are compared: every worker's matched prefix must be
//! the same in both indexes, or the run says how many differ.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dynamo_kv_router::indexer::SyncIndexer;
use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash as DynLocal, RouterEvent,
};
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, RadixTree, ThreadPoolIndexer};
use kvfleet_kv_router::{Router, RouterConfig, WorkerCapacity};
use kvfleet_proto::hash::{chain, BlockHash, LocalBlockHash, SequenceHash};
use kvfleet_proto::{KvEvent, KvEventData, Tier, WorkerId};

struct Args {
    trace: String,
    workers: u64,
    capacity: usize,
    expand: u64,
    copies: u64,
    flash_threads: usize,
    round_robin: bool,
    only: Vec<String>,
}

const USAGE: &str = "usage: dynamo-index-bench TRACE.jsonl [--workers 32] [--capacity 26624] \
[--expand 32] [--copies 1] [--flash-threads 1] [--route affinity|round-robin] [--only kvfleet,dynamo-radix,dynamo-flash]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        trace: String::new(),
        workers: 32,
        capacity: 26_624,
        expand: 32,
        copies: 1,
        flash_threads: 1,
        round_robin: false,
        only: vec![
            "kvfleet".into(),
            "dynamo-radix".into(),
            "dynamo-flash".into(),
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--workers" => args.workers = num(&value("--workers")?)?,
            "--capacity" => args.capacity = num(&value("--capacity")?)?,
            "--expand" => args.expand = num(&value("--expand")?)?,
            "--copies" => args.copies = num(&value("--copies")?)?,
            "--flash-threads" => args.flash_threads = num(&value("--flash-threads")?)?,
            "--route" => {
                args.round_robin = match value("--route")?.as_str() {
                    "affinity" => false,
                    "round-robin" => true,
                    other => {
                        return Err(format!("--route is affinity or round-robin, not {other}"))
                    }
                }
            }
            "--only" => args.only = value("--only")?.split(',').map(String::from).collect(),
            "-h" | "--help" => return Err(USAGE.into()),
            other if other.starts_with('-') => {
                return Err(format!("unknown flag {other}\n{USAGE}"))
            }
            other => args.trace = other.into(),
        }
    }
    if args.trace.is_empty() {
        return Err(USAGE.into());
    }
    if args.workers == 0 || args.expand == 0 || args.copies == 0 || args.flash_threads == 0 {
        return Err(format!(
            "--workers, --expand, --copies and --flash-threads must be ≥ 1\n{USAGE}"
        ));
    }
    Ok(args)
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

/// One request's prompt as KV blocks: (local, sequence) hashes, in order.
type Prompt = Vec<(u64, u64)>;

/// What an engine reported, in neutral form, converted per index before timing.
enum Event {
    Stored {
        worker: u64,
        parent: Option<u64>,
        blocks: Vec<(u64, u64)>,
    },
    Removed {
        worker: u64,
        blocks: Vec<u64>,
    },
}

/// A block's content hash from (trace block id, part, copy): kvfleet's own block hash (XXH3)
/// over the three numbers, so distinct triples never collide in practice.
fn mix(id: u64, part: u64, copy: u64) -> u64 {
    let words = [id as u32, (id >> 32) as u32, part as u32, copy as u32];
    kvfleet_proto::hash::local_block_hash(&words).0
}

fn load_prompts(args: &Args) -> Result<Vec<Prompt>, String> {
    let text = std::fs::read_to_string(&args.trace).map_err(|e| format!("{}: {e}", args.trace))?;
    let mut traces = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", args.trace, n + 1))?;
        let ids = value["hash_ids"]
            .as_array()
            .ok_or(format!("{}:{}: no hash_ids", args.trace, n + 1))?
            .iter()
            .map(|v| {
                v.as_u64().ok_or(format!(
                    "{}:{}: a hash id is not a number",
                    args.trace,
                    n + 1
                ))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        traces.push(ids);
    }
    let mut prompts = Vec::with_capacity(traces.len() * args.copies as usize);
    for copy in 0..args.copies {
        for ids in &traces {
            let mut prompt = Vec::with_capacity(ids.len() * args.expand as usize);
            let mut parent: Option<SequenceHash> = None;
            for &id in ids {
                for part in 0..args.expand {
                    let local = LocalBlockHash(mix(id, part, copy));
                    let seq = chain(parent, local);
                    prompt.push((local.0, seq.0));
                    parent = Some(seq);
                }
            }
            prompts.push(prompt);
        }
    }
    Ok(prompts)
}

/// An engine's LRU cache of blocks. Stamps are given tail first, so a block's parent is always
/// newer than the block and eviction takes leaves first: the chains stay whole.
#[derive(Default)]
struct EngineCache {
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
}

fn simulate(prompts: &[Prompt], args: &Args) -> Vec<Event> {
    let mut engines: Vec<EngineCache> = (0..args.workers).map(|_| EngineCache::default()).collect();
    let mut clock = 0u64;
    let mut events = Vec::new();
    for (n, prompt) in prompts.iter().enumerate() {
        let Some(&(_, first)) = prompt.first() else {
            continue;
        };
        let worker = if args.round_robin {
            n as u64 % args.workers
        } else {
            first % args.workers
        };
        let cache = &mut engines[worker as usize];
        let held = prompt
            .iter()
            .take_while(|(_, seq)| cache.stamp_of.contains_key(seq))
            .count();
        if held < prompt.len() {
            events.push(Event::Stored {
                worker,
                parent: held.checked_sub(1).map(|i| prompt[i].1),
                blocks: prompt[held..].to_vec(),
            });
        }
        for &(_, seq) in prompt.iter().rev() {
            clock += 1;
            if let Some(old) = cache.stamp_of.insert(seq, clock) {
                cache.by_stamp.remove(&old);
            }
            cache.by_stamp.insert(clock, seq);
        }
        let mut removed = Vec::new();
        while cache.stamp_of.len() > args.capacity {
            let Some((_, seq)) = cache.by_stamp.pop_first() else {
                break;
            };
            cache.stamp_of.remove(&seq);
            removed.push(seq);
        }
        if !removed.is_empty() {
            events.push(Event::Removed {
                worker,
                blocks: removed,
            });
        }
    }
    events
}

fn kvfleet_events(events: &[Event]) -> Vec<KvEvent> {
    let mut next_id: HashMap<u64, u64> = HashMap::new();
    events
        .iter()
        .map(|event| {
            let (worker, data) = match event {
                Event::Stored {
                    worker,
                    parent,
                    blocks,
                } => (
                    *worker,
                    KvEventData::Stored {
                        parent: parent.map(SequenceHash),
                        blocks: blocks
                            .iter()
                            .map(|&(local, seq)| BlockHash {
                                local: LocalBlockHash(local),
                                sequence: SequenceHash(seq),
                            })
                            .collect(),
                    },
                ),
                Event::Removed { worker, blocks } => (
                    *worker,
                    KvEventData::Removed {
                        blocks: blocks.iter().map(|&s| SequenceHash(s)).collect(),
                    },
                ),
            };
            let id = next_id.entry(worker).or_default();
            *id += 1;
            KvEvent {
                worker: WorkerId(worker),
                event_id: *id - 1,
                tier: Tier::G1,
                data,
            }
        })
        .collect()
}

fn dynamo_events(events: &[Event]) -> Vec<RouterEvent> {
    let mut next_id: HashMap<u64, u64> = HashMap::new();
    events
        .iter()
        .map(|event| {
            let (worker, data) = match event {
                Event::Stored {
                    worker,
                    parent,
                    blocks,
                } => (
                    *worker,
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(ExternalSequenceBlockHash),
                        start_position: None,
                        blocks: blocks
                            .iter()
                            .map(|&(local, seq)| KvCacheStoredBlockData {
                                block_hash: ExternalSequenceBlockHash(seq),
                                tokens_hash: DynLocal(local),
                                mm_extra_info: None,
                            })
                            .collect(),
                    }),
                ),
                Event::Removed { worker, blocks } => (
                    *worker,
                    KvCacheEventData::Removed(KvCacheRemoveData {
                        block_hashes: blocks
                            .iter()
                            .map(|&s| ExternalSequenceBlockHash(s))
                            .collect(),
                    }),
                ),
            };
            let id = next_id.entry(worker).or_default();
            *id += 1;
            RouterEvent::new(
                worker,
                KvCacheEvent {
                    event_id: *id - 1,
                    data,
                    dp_rank: 0,
                },
            )
        })
        .collect()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Row {
    name: String,
    events: usize,
    blocks: usize,
    ingest: Duration,
    errors: usize,
    lookups: Vec<Duration>,
    rss_growth: u64,
    answers: Vec<Vec<(u64, u32)>>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted_scores(mut scores: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    scores.retain(|&(_, s)| s > 0);
    scores.sort_unstable();
    scores
}

fn run_kvfleet(events: &[Event], prompts: &[Prompt], args: &Args, blocks: usize) -> Row {
    let mut router = Router::new(RouterConfig::default());
    for id in 0..args.workers {
        let capacity = WorkerCapacity {
            kv_blocks: args.capacity as u64,
            max_queue_depth: None,
        };
        if let Err(e) = router.add_worker(WorkerId(id), capacity) {
            eprintln!("kvfleet: add_worker {id}: {e}");
        }
    }
    let converted = kvfleet_events(events);
    let queries: Vec<Vec<SequenceHash>> = prompts
        .iter()
        .map(|p| p.iter().map(|&(_, s)| SequenceHash(s)).collect())
        .collect();
    let before = rss_bytes();
    let now = Duration::from_secs(1);
    let mut errors = 0;
    let start = Instant::now();
    // Each event is dropped once applied, as Dynamo's indexes consume theirs: both can reuse
    // that memory, so the resident-set growth compares like with like.
    for event in converted {
        if router.apply(&event, now).is_err() {
            errors += 1;
        }
    }
    let ingest = start.elapsed();
    let rss_growth = rss_bytes().saturating_sub(before);
    let mut lookups = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    for query in &queries {
        let start = Instant::now();
        let overlaps = router.overlaps(query, None, now);
        lookups.push(start.elapsed());
        answers.push(sorted_scores(
            overlaps.iter().map(|o| (o.worker.0, o.blocks)).collect(),
        ));
    }
    Row {
        name: "kvfleet (Router)".into(),
        events: events.len(),
        blocks,
        ingest,
        errors,
        lookups,
        rss_growth,
        answers,
    }
}

fn run_dynamo_radix(events: &[Event], prompts: &[Prompt], blocks: usize) -> Row {
    let mut tree = RadixTree::new();
    let converted = dynamo_events(events);
    let queries: Vec<Vec<DynLocal>> = prompts
        .iter()
        .map(|p| p.iter().map(|&(l, _)| DynLocal(l)).collect())
        .collect();
    let before = rss_bytes();
    let mut errors = 0;
    let start = Instant::now();
    for event in converted {
        if tree.apply_event(event).is_err() {
            errors += 1;
        }
    }
    let ingest = start.elapsed();
    let rss_growth = rss_bytes().saturating_sub(before);
    let mut lookups = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    for query in queries {
        let start = Instant::now();
        let scores = tree.find_matches(query, false);
        lookups.push(start.elapsed());
        answers.push(sorted_scores(
            scores
                .scores
                .iter()
                .map(|(w, &s)| (w.worker_id, s))
                .collect(),
        ));
    }
    Row {
        name: "Dynamo RadixTree".into(),
        events: events.len(),
        blocks,
        ingest,
        errors,
        lookups,
        rss_growth,
        answers,
    }
}

fn run_dynamo_flash(
    events: &[Event],
    prompts: &[Prompt],
    args: &Args,
    blocks: usize,
) -> Result<Row, String> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Err(format!("tokio: {e}")),
    };
    let indexer =
        ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), args.flash_threads, 16);
    let converted = dynamo_events(events);
    let queries: Vec<Vec<DynLocal>> = prompts
        .iter()
        .map(|p| p.iter().map(|&(l, _)| DynLocal(l)).collect())
        .collect();
    let before = rss_bytes();
    let mut errors = 0;
    let start = Instant::now();
    for event in converted {
        if indexer.enqueue_event(event).is_err() {
            errors += 1;
        }
    }
    if runtime.block_on(indexer.flush_and_wait()).is_err() {
        errors += 1;
    }
    let ingest = start.elapsed();
    let rss_growth = rss_bytes().saturating_sub(before);
    let backend = indexer.backend();
    let mut lookups = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    for query in &queries {
        let start = Instant::now();
        let scores = backend.find_matches(query, false);
        lookups.push(start.elapsed());
        answers.push(sorted_scores(
            scores
                .scores
                .iter()
                .map(|(w, &s)| (w.worker_id, s))
                .collect(),
        ));
    }
    Ok(Row {
        name: format!(
            "Dynamo ThreadPoolIndexer<ConcurrentRadixTreeCompressed>, {} thread(s)",
            args.flash_threads
        ),
        events: events.len(),
        blocks,
        ingest,
        errors,
        lookups,
        rss_growth,
        answers,
    })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let prompts = load_prompts(&args)?;
    let events = simulate(&prompts, &args);
    let blocks: usize = events
        .iter()
        .map(|e| match e {
            Event::Stored { blocks, .. } => blocks.len(),
            Event::Removed { blocks, .. } => blocks.len(),
        })
        .sum();
    let stored = events
        .iter()
        .filter(|e| matches!(e, Event::Stored { .. }))
        .count();
    println!(
        "trace {}: {} prompts, {} workers × {} blocks ({} routing), expand {}, copies {}: {} events ({} stored, {} removed), {} blocks in them",
        args.trace,
        prompts.len(),
        args.workers,
        args.capacity,
        if args.round_robin { "round-robin" } else { "prefix-affinity" },
        args.expand,
        args.copies,
        events.len(),
        stored,
        events.len() - stored,
        blocks
    );
    let mut rows = Vec::new();
    for which in &args.only {
        match which.as_str() {
            "kvfleet" => rows.push(run_kvfleet(&events, &prompts, &args, blocks)),
            "dynamo-radix" => rows.push(run_dynamo_radix(&events, &prompts, blocks)),
            "dynamo-flash" => rows.push(run_dynamo_flash(&events, &prompts, &args, blocks)?),
            other => return Err(format!("unknown index {other}\n{USAGE}")),
        }
    }
    println!();
    println!("| index | events/s (drained) | blocks/s | errors | find-matches p50 | p99 | mean | RSS growth |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &mut rows {
        row.lookups.sort_unstable();
        let mean = row.lookups.iter().sum::<Duration>() / row.lookups.len().max(1) as u32;
        let secs = row.ingest.as_secs_f64().max(1e-9);
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.2} µs | {:.2} µs | {:.2} µs | {:.1} MiB |",
            row.name,
            row.events as f64 / secs,
            row.blocks as f64 / secs,
            row.errors,
            percentile(&row.lookups, 0.5).as_secs_f64() * 1e6,
            percentile(&row.lookups, 0.99).as_secs_f64() * 1e6,
            mean.as_secs_f64() * 1e6,
            row.rss_growth as f64 / 1048576.0,
        );
    }
    if let Some((first, rest)) = rows.split_first() {
        for row in rest {
            let differ = first
                .answers
                .iter()
                .zip(&row.answers)
                .filter(|(a, b)| a != b)
                .count();
            println!(
                "lookups whose per-worker matches differ, {} vs {}: {differ} of {}",
                first.name,
                row.name,
                first.answers.len()
            );
        }
    }
    Ok(())
}
