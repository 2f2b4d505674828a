//! What a simulation run reports, as serde types (the `--json` output) and a text table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kvfleet_kv_router::{EventCounters, PredictionSummary, RouteCounters, RoutingMode};
use serde::{Deserialize, Serialize};

use crate::stats::Percentiles;

/// One run: one routing mode over one trace on one fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// The routing mode.
    pub mode: RoutingMode,
    /// Workers in the fleet.
    pub workers: usize,
    /// The mock profile's name.
    pub profile: String,
    /// KV blocks per worker (the engine's pool).
    pub kv_blocks_per_worker: u32,
    /// Blocks per worker in the lower KV tiers: G2 (host memory) and G3 (disk); 0 when off.
    #[serde(default)]
    pub tier_blocks_per_worker: [u64; 2],
    /// Prompt blocks onboarded from G2 and G3 over every worker: hits that were not
    /// recomputed (they are part of `cached_tokens`).
    #[serde(default)]
    pub tier_hit_blocks: [u64; 2],
    /// Tokens per KV block.
    pub block_size: u32,
    /// Delay of KV events and load reports on their way to the router, ms.
    pub event_delay_ms: f64,
    /// Interval between load reports, ms.
    pub load_report_interval_ms: f64,
    /// Factor applied to trace timestamps.
    pub time_scale: f64,
    /// Requests in the trace (after `limit`).
    pub requests: u64,
    /// Requests that produced their last token.
    pub completed: u64,
    /// Requests refused before reaching an engine (see `rejections`).
    pub rejected: u64,
    /// Why requests were refused, by reason, with counts.
    pub rejections: Vec<Rejection>,
    /// Requests the engine aborted (an executor failure; the mock never fails).
    pub aborted: u64,
    /// Times a request found every worker overloaded and waited at the frontend for a retry.
    pub overload_retries: u64,
    /// Prompt tokens of completed requests.
    pub prompt_tokens: u64,
    /// Of those, tokens found in the chosen engine's prefix cache at admission.
    pub cached_tokens: u64,
    /// Output tokens of completed requests.
    pub output_tokens: u64,
    /// `cached_tokens / prompt_tokens`: the fraction of prompt tokens that were not recomputed.
    pub prefix_hit_rate: f64,
    /// Time to first token (arrival → first token), ms.
    pub ttft_ms: Percentiles,
    /// Gap between consecutive tokens of a request, over every gap, ms (0.5 % buckets).
    pub itl_ms: Percentiles,
    /// Arrival → last token, ms.
    pub e2e_ms: Percentiles,
    /// TTFT at each whole percent 0..=100 (101 points), ms: the CDF the plot draws.
    pub ttft_cdf_ms: Vec<f64>,
    /// Output tokens per second of virtual time (first arrival → last token).
    pub output_tokens_per_s: f64,
    /// Prompt tokens per second of virtual time.
    pub prompt_tokens_per_s: f64,
    /// Virtual time covered, s.
    pub virtual_duration_s: f64,
    /// Wall-clock time the run took, s (the only field that differs between identical runs).
    pub wall_time_s: f64,
    /// Preemptions (recomputes) over all engines.
    pub preemptions: u64,
    /// Per-worker load, in worker-id order.
    pub per_worker: Vec<WorkerReport>,
    /// The router's routing counters (its `hit_blocks / blocks` is the overlap it predicted).
    pub router_routes: RouteCounters,
    /// The router's KV event counters (gaps or broken chains would be a simulator bug).
    pub router_events: EventCounters,
    /// How the TTFT the router predicted for each request (from routing to first token, on the
    /// worker it chose) compared with the actual one.
    pub ttft_prediction: PredictionSummary,
    /// Prefill workers among `workers` (0: every worker serves aggregated).
    #[serde(default)]
    pub prefill_workers: usize,
    /// How many requests the disaggregation decision prefilled where, by decision
    /// (`remote`, `local_short`, ...); empty when the fleet is aggregated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefill_decisions: BTreeMap<String, u64>,
}

/// Requests refused for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Why, in words.
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// One worker's share of the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The worker id (1-based).
    pub worker: u64,
    /// Requests routed to it and completed.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Of those, served from its prefix cache.
    pub cached_tokens: u64,
    /// Prompt tokens it computed (`prompt_tokens - cached_tokens`): its prefill load.
    pub computed_prompt_tokens: u64,
    /// Output tokens it generated.
    pub output_tokens: u64,
    /// Its prefix hit rate.
    pub prefix_hit_rate: f64,
    /// Engine steps it ran.
    pub steps: u64,
    /// Preemptions on it.
    pub preemptions: u64,
}

/// Several runs over the same trace and fleet (the `--mode all` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The trace file.
    pub trace: String,
    /// One report per mode, in the order run.
    pub runs: Vec<SimReport>,
}

impl Comparison {
    /// A Markdown table of the headline figures, one row per mode.
    pub fn markdown_table(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| mode | prefix hit rate | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | \
             ITL p99 | E2E p50 | E2E p99 | TTFT prediction error p50 / p90 | output tok/s | \
             requests per worker (min–max) | computed prompt tokens per worker (min–max) | \
             wall time |\n",
        );
        out.push_str(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | \
             ---: | ---: | ---: |\n",
        );
        for r in &self.runs {
            let requests = min_max(r.per_worker.iter().map(|w| w.requests));
            let computed = min_max(r.per_worker.iter().map(|w| w.computed_prompt_tokens));
            let _ = writeln!(
                out,
                "| {} | {:.1} % | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} % / {:.1} % | {:.0} | {}–{} | {:.1}M–{:.1}M | {:.1} s |",
                r.mode,
                r.prefix_hit_rate * 100.0,
                ms(r.ttft_ms.mean),
                ms(r.ttft_ms.p50),
                ms(r.ttft_ms.p90),
                ms(r.ttft_ms.p99),
                ms(r.itl_ms.p50),
                ms(r.itl_ms.p99),
                ms(r.e2e_ms.p50),
                ms(r.e2e_ms.p99),
                r.ttft_prediction.rel_p50 * 100.0,
                r.ttft_prediction.rel_p90 * 100.0,
                r.output_tokens_per_s,
                requests.0,
                requests.1,
                computed.0 as f64 / 1e6,
                computed.1 as f64 / 1e6,
                r.wall_time_s,
            );
        }
        out
    }
}

fn min_max(values: impl Iterator<Item = u64>) -> (u64, u64) {
    values.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// A latency for a table: ms below 10 s, else s.
pub(crate) fn ms(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1} s", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0} ms")
    } else {
        format!("{value:.1} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_formatted_for_reading() {
        let cases = [(3.04, "3.0 ms"), (250.4, "250 ms"), (12_345.0, "12.3 s")];
        for (value, text) in cases {
            assert_eq!(ms(value), text);
        }
    }
}
