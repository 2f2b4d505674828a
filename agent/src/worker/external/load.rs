//! The engine's own view of its load, read from its Prometheus `/metrics`: requests running and
//! waiting in its scheduler, and how full its KV cache is. Better than the adapter's count
//! alone: the engine knows which requests it has admitted into its batch and which wait, and
//! how much of its cache they hold; the adapter only knows how many it sent.
//!
//! | engine | running | waiting | KV cache used (0–1) |
//! | --- | --- | --- | --- |
//! | vllm | `vllm:num_requests_running` | `vllm:num_requests_waiting` | `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before V1) |
//! | sglang | `sglang:num_running_reqs` | `sglang:num_queue_reqs` | `sglang:token_usage` |
//! | llamacpp (`--metrics`) | `llamacpp:requests_processing` | `llamacpp:requests_deferred` | `llamacpp:kv_cache_usage_ratio` (older servers) |
//!
//! Series with labels (a model name, a data-parallel rank) are summed. An `openai` server is
//! not asked: its metrics, if any, are unknown. [`parse`] is pure; [`poll`] is the task that
//! fetches.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::super::protocol::WireEngine;

/// How often the engine's `/metrics` is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A reading older than this is not used (the engine stopped answering its `/metrics`).
pub const FRESH_FOR: Duration = Duration::from_secs(3);

/// One reading of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLoad {
    pub running: u32,
    pub waiting: u32,
    /// Fraction of the KV cache in use, where the engine says.
    pub kv_usage: Option<f64>,
}

struct Names {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    kv_usage: &'static [&'static str],
}

fn names(kind: WireEngine) -> Option<Names> {
    match kind {
        WireEngine::Vllm => Some(Names {
            running: &["vllm:num_requests_running"],
            waiting: &["vllm:num_requests_waiting"],
            kv_usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        }),
        WireEngine::Sglang => Some(Names {
            running: &["sglang:num_running_reqs"],
            waiting: &["sglang:num_queue_reqs"],
            kv_usage: &["sglang:token_usage"],
        }),
        WireEngine::LlamaCpp => Some(Names {
            running: &["llamacpp:requests_processing"],
            waiting: &["llamacpp:requests_deferred"],
            kv_usage: &["llamacpp:kv_cache_usage_ratio"],
        }),
        WireEngine::OpenAi | WireEngine::Native | WireEngine::Mock => None,
    }
}

/// Whether this engine's `/metrics` is worth asking.
pub fn has_metrics(kind: WireEngine) -> bool {
    names(kind).is_some()
}

/// The load in a Prometheus text exposition, or `None` when it names neither the running nor
/// the waiting requests (metrics switched off, or another engine).
pub fn parse(kind: WireEngine, text: &str) -> Option<EngineLoad> {
    let names = names(kind)?;
    let mut running = None::<f64>;
    let mut waiting = None::<f64>;
    // The first name in the list that appears wins (a newer name over its older alias).
    let mut kv: Vec<Option<f64>> = vec![None; names.kv_usage.len()];
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = sample(line) else {
            continue;
        };
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        if names.running.contains(&name) {
            *running.get_or_insert(0.0) += value;
        } else if names.waiting.contains(&name) {
            *waiting.get_or_insert(0.0) += value;
        } else if let Some(i) = names.kv_usage.iter().position(|n| *n == name) {
            *kv[i].get_or_insert(0.0) += value;
        }
    }
    if running.is_none() && waiting.is_none() {
        return None;
    }
    let count = |v: Option<f64>| v.unwrap_or(0.0).round().min(f64::from(u32::MAX)) as u32;
    Some(EngineLoad {
        running: count(running),
        waiting: count(waiting),
        kv_usage: kv.into_iter().flatten().next().map(|u| u.clamp(0.0, 1.0)),
    })
}

/// A sample line's metric name and value: `name value [timestamp]` or
/// `name{labels} value [timestamp]` (label values may hold spaces).
fn sample(line: &str) -> Option<(&str, f64)> {
    let (name, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (&line[..open], line.get(close + 1..)?)
        }
        None => line.split_once(char::is_whitespace)?,
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name.trim(), value))
}

/// What the worker loop reads: the last reading and when it was taken.
pub type Latest = watch::Receiver<Option<(Instant, EngineLoad)>>;

/// Reads `{base}/metrics` every [`POLL_INTERVAL`] until the receiver is gone. A server that has
/// no `/metrics` (404), or whose page names none of its load, is asked no more: the worker's
/// own count stands, and the log says so once.
pub fn poll(client: reqwest::Client, base: String, kind: WireEngine) -> Latest {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let url = format!("{base}/metrics");
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        let mut announced = false;
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let response = client.get(&url).timeout(POLL_INTERVAL).send().await;
            let text = match response {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    tracing::info!(%url, "the engine serves no /metrics: load is this worker's own count");
                    return;
                }
                Ok(r) if r.status().is_success() => match r.text().await {
                    Ok(text) => text,
                    Err(_) => continue,
                },
                // A busy or restarting server: try again next time; the reading ages out.
                _ => continue,
            };
            match parse(kind, &text) {
                Some(load) => {
                    if !announced {
                        tracing::info!(%url, running = load.running, waiting = load.waiting,
                            "load read from the engine's /metrics");
                        announced = true;
                    }
                    let _ = tx.send(Some((Instant::now(), load)));
                }
                None => {
                    tracing::info!(%url, "the engine's /metrics names no load: load is this worker's own count");
                    return;
                }
            }
        }
    });
    rx
}

/// Running and waiting as reported: the engine's split where a fresh reading exists, never
/// fewer in all than the requests this worker has sent and not seen finish (the engine's page
/// lags by up to a poll interval); else this worker's count, split by its slots.
pub fn blend(
    reading: Option<(Instant, EngineLoad)>,
    now: Instant,
    in_flight: u32,
    slots: u32,
) -> (u32, u32) {
    match reading.filter(|(at, _)| now.saturating_duration_since(*at) < FRESH_FOR) {
        Some((_, load)) => {
            let total = in_flight.max(load.running.saturating_add(load.waiting));
            let running = load.running.min(total);
            (running, total - running)
        }
        None => (in_flight.min(slots), in_flight.saturating_sub(slots)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As vLLM 0.10 (V1) serves it, trimmed.
    const VLLM: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B\"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 0.25
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B\"} 0.25
vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B\"} 1234.0
";

    /// llama-server 0.5 with `--metrics`, as the test suite's build prints it, trimmed.
    const LLAMACPP: &str = "\
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 0
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 4
";

    const SGLANG: &str = "\
sglang:num_running_reqs{model_name=\"Qwen/Qwen2.5-7B\"} 12.0
sglang:num_queue_reqs{model_name=\"Qwen/Qwen2.5-7B\"} 0.0
sglang:token_usage{model_name=\"Qwen/Qwen2.5-7B\"} 0.62
";

    #[test]
    fn each_engines_page_gives_its_load() {
        assert_eq!(
            parse(WireEngine::Vllm, VLLM),
            Some(EngineLoad {
                running: 5,
                waiting: 7,
                kv_usage: Some(0.5)
            })
        );
        assert_eq!(
            parse(WireEngine::LlamaCpp, LLAMACPP),
            Some(EngineLoad {
                running: 1,
                waiting: 4,
                kv_usage: None
            })
        );
        assert_eq!(
            parse(WireEngine::Sglang, SGLANG),
            Some(EngineLoad {
                running: 12,
                waiting: 0,
                kv_usage: Some(0.62)
            })
        );
        // The pre-V1 name still counts; a page of another engine names nothing of this one.
        let old = "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.9\n";
        assert_eq!(parse(WireEngine::Vllm, old).unwrap().kv_usage, Some(0.9));
        assert_eq!(parse(WireEngine::Vllm, SGLANG), None);
        assert_eq!(parse(WireEngine::OpenAi, VLLM), None);
        assert_eq!(parse(WireEngine::Vllm, ""), None);
    }

    #[test]
    fn odd_lines_are_skipped_not_trusted() {
        let text = "vllm:num_requests_running{model_name=\"a b}c\"} 2\n\
                    vllm:num_requests_waiting NaN\n\
                    vllm:num_requests_waiting -3\n\
                    vllm:num_requests_waiting{x=\"1\"} 1e12\n\
                    vllm:kv_cache_usage_perc 7\n\
                    garbage\n{}\n";
        let load = parse(WireEngine::Vllm, text).unwrap();
        assert_eq!(load.running, 2);
        assert_eq!(load.waiting, u32::MAX);
        assert_eq!(load.kv_usage, Some(1.0));
    }

    #[test]
    fn a_fresh_reading_splits_the_load_and_never_undercounts() {
        let now = Instant::now();
        let load = |running, waiting| EngineLoad {
            running,
            waiting,
            kv_usage: None,
        };
        // The engine's split, with more waiting than the slots would say.
        assert_eq!(blend(Some((now, load(1, 3))), now, 4, 4), (1, 3));
        // Sent but not on the engine's page yet: counted as waiting.
        assert_eq!(blend(Some((now, load(1, 0))), now, 3, 4), (1, 2));
        // Stale: this worker's own count, split by its slots.
        let old = now - FRESH_FOR - Duration::from_millis(1);
        assert_eq!(blend(Some((old, load(0, 9))), now, 5, 4), (4, 1));
        assert_eq!(blend(None, now, 2, 4), (2, 0));
    }
}
