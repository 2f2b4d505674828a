//! Workloads besides recorded traces: generators of multi-turn chat sessions ([`chat`]) and of
//! agent-style bursts sharing a long system prompt ([`agent`]), with knobs for sessions, turns,
//! think time and rate. They are the simulator's stand-in for real traffic, shipped as code (a
//! few parameters) rather than as data.
//!
//! A generator emits the same [`TraceRequest`]s a Mooncake trace parses into, so everything
//! downstream (the simulator, [`write_trace`] for replaying the workload against real agents or
//! another router) treats them alike. Prompts are streams of 512-token chunks named by hash id
//! ([`crate::trace`]): a request's prompt is a prefix of its stream, so two requests share
//! exactly the tokens their streams share. Ids are allocated by one [`Chunks`] counter per
//! generation, so different sessions never share a chunk unless they share a system prompt.
//!
//! Arrivals are open-loop: a session's next turn is scheduled when the previous answer would
//! have finished (`ttft_estimate_ms + output_tokens × decode_ms_per_token`) plus the think time,
//! whatever the simulated fleet actually did. A recorded trace has the same property.

pub mod agent;
pub mod chat;
mod rng;

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::trace::{TRACE_BLOCK_TOKENS, TraceRequest};

pub use agent::AgentConfig;
pub use chat::ChatConfig;

/// Which requests a run replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum WorkloadKind {
    /// A Mooncake JSONL trace (`--trace FILE`).
    #[default]
    Trace,
    /// Generated multi-turn chat sessions ([`ChatConfig`]).
    Chat,
    /// Generated agent runs: bursts of requests sharing a long system prompt ([`AgentConfig`]).
    Agent,
}

impl WorkloadKind {
    /// The name used in flags and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Trace => "trace",
            WorkloadKind::Chat => "chat",
            WorkloadKind::Agent => "agent",
        }
    }
}

/// The generators' flags (`kvfleet sim --workload chat|agent ...`). Each default is documented
/// in docs/benchmarks.md with why it looks like real traffic.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// What to replay: a trace file, or generated chat or agent traffic.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Trace)]
    pub workload: WorkloadKind,
    /// Generated workloads: sessions (chat conversations or agent runs) to start.
    #[arg(long, value_name = "N")]
    pub sessions: Option<u32>,
    /// Generated workloads: new sessions per second (Poisson arrivals).
    #[arg(long, value_name = "PER_S")]
    pub session_rate: Option<f64>,
    /// Generated workloads: mean turns per chat session, or steps per agent run (geometric).
    #[arg(long, value_name = "MEAN")]
    pub turns: Option<f64>,
    /// Generated workloads: mean seconds between an answer and the next turn (a user reading
    /// and typing; an agent's tool running), exponential.
    #[arg(long, value_name = "S")]
    pub think_time: Option<f64>,
    /// Agent workload: mean requests per burst (parallel tool calls / sub-agents), geometric.
    #[arg(long, value_name = "MEAN")]
    pub fanout: Option<f64>,
    /// Generated workloads: tokens of each system prompt (rounded up to 512).
    #[arg(long, value_name = "TOKENS")]
    pub system_prompt_tokens: Option<u32>,
    /// Generated workloads: seed of the generator (the same seed gives the same requests).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub workload_seed: u64,
    /// Write the requests replayed (generated, read, or shaped by --curve) as a Mooncake JSONL
    /// trace to FILE. With --curve and no --planner that is all it does: the shaping tool.
    #[arg(long, value_name = "FILE")]
    pub write_trace: Option<std::path::PathBuf>,
}

impl WorkloadArgs {
    /// The chat generator's config with these flags applied over the defaults.
    pub fn chat(&self) -> ChatConfig {
        let mut c = ChatConfig::default();
        if let Some(v) = self.sessions {
            c.sessions = v;
        }
        if let Some(v) = self.session_rate {
            c.session_rate = v;
        }
        if let Some(v) = self.turns {
            c.turns = v;
        }
        if let Some(v) = self.think_time {
            c.think_time_s = v;
        }
        if let Some(v) = self.system_prompt_tokens {
            c.system_prompt_tokens = v;
        }
        c.seed = self.workload_seed;
        c
    }

    /// The agent generator's config with these flags applied over the defaults.
    pub fn agent(&self) -> AgentConfig {
        let mut c = AgentConfig::default();
        if let Some(v) = self.sessions {
            c.runs = v;
        }
        if let Some(v) = self.session_rate {
            c.run_rate = v;
        }
        if let Some(v) = self.turns {
            c.steps = v;
        }
        if let Some(v) = self.think_time {
            c.tool_time_s = v;
        }
        if let Some(v) = self.fanout {
            c.fanout = v;
        }
        if let Some(v) = self.system_prompt_tokens {
            c.system_prompt_tokens = v;
        }
        c.seed = self.workload_seed;
        c
    }
}

/// A generator config that cannot produce a workload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("workload setting `{field}`: {reason}")]
pub struct WorkloadError {
    /// The setting at fault (as the flag names it).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// A duration knob, seconds: finite and not negative.
pub(crate) fn seconds(field: &'static str, value: f64) -> Result<(), WorkloadError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(WorkloadError {
            field,
            reason: format!("{value} must be a finite number of seconds, ≥ 0"),
        })
    }
}

/// A count knob that needs at least one.
pub(crate) fn at_least_one(field: &'static str, value: u32) -> Result<(), WorkloadError> {
    if value >= 1 {
        Ok(())
    } else {
        Err(WorkloadError {
            field,
            reason: "needs at least one".into(),
        })
    }
}

pub(crate) fn positive(field: &'static str, value: f64) -> Result<(), WorkloadError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(WorkloadError {
            field,
            reason: format!("{value} must be a positive finite number"),
        })
    }
}

/// Hands out 512-token chunk ids, each once.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    next: u64,
}

impl Chunks {
    pub(crate) fn take(&mut self, count: usize) -> Vec<u64> {
        let start = self.next;
        self.next += count as u64;
        (start..self.next).collect()
    }
}

/// A token stream: a list of chunk ids. A prompt is the stream's first `tokens` tokens.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stream {
    ids: Vec<u64>,
}

impl Stream {
    pub(crate) fn new(ids: Vec<u64>) -> Self {
        Self { ids }
    }

    /// Makes sure the stream covers `tokens` tokens, with new chunks from `chunks`.
    pub(crate) fn cover(&mut self, tokens: u32, chunks: &mut Chunks) {
        let needed = (tokens as usize).div_ceil(TRACE_BLOCK_TOKENS);
        if needed > self.ids.len() {
            let more = chunks.take(needed - self.ids.len());
            self.ids.extend(more);
        }
    }

    /// The request for the stream's first `input` tokens (which it must cover).
    pub(crate) fn request(&self, arrival_s: f64, input: u32, output: u32) -> TraceRequest {
        let chunks = (input as usize).div_ceil(TRACE_BLOCK_TOKENS);
        TraceRequest {
            line: 0,
            arrival: Duration::from_secs_f64(arrival_s.max(0.0)),
            input_length: input.max(1),
            output_length: output.max(1),
            hash_ids: self.ids[..chunks.min(self.ids.len())].to_vec(),
        }
    }
}

/// Sorts generated requests by arrival (stable: a burst keeps its order) and numbers them as
/// lines of a trace, which also keys each request's unique padding tokens.
pub(crate) fn finish(mut requests: Vec<TraceRequest>) -> Vec<TraceRequest> {
    requests.sort_by_key(|r| r.arrival);
    for (i, r) in requests.iter_mut().enumerate() {
        r.line = i + 1;
    }
    requests
}

/// Writes requests as a Mooncake JSONL trace (timestamps in whole ms), which
/// [`crate::trace::parse_trace`] reads back.
pub fn write_trace(requests: &[TraceRequest], out: &mut impl Write) -> std::io::Result<()> {
    for r in requests {
        let line = serde_json::json!({
            "timestamp": r.arrival.as_millis() as u64,
            "input_length": r.input_length,
            "output_length": r.output_length,
            "hash_ids": r.hash_ids,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Summary figures of a workload, for logs and docs.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkloadStats {
    /// Requests.
    pub requests: usize,
    /// Seconds from the first arrival to the last.
    pub duration_s: f64,
    /// Mean prompt tokens.
    pub mean_input: f64,
    /// Mean output tokens.
    pub mean_output: f64,
    /// Share of prompt tokens an unlimited prefix cache would hold (chunk-level reuse).
    pub reuse: f64,
}

impl WorkloadStats {
    /// The figures of `requests`.
    pub fn of(requests: &[TraceRequest]) -> Self {
        if requests.is_empty() {
            return Self::default();
        }
        let n = requests.len() as f64;
        let input: u64 = requests.iter().map(|r| u64::from(r.input_length)).sum();
        let output: u64 = requests.iter().map(|r| u64::from(r.output_length)).sum();
        // A chunk seen before is reusable as far as the prompt's prefix agrees: count whole
        // chunks whose prefix (the chain up to them) was seen.
        let mut seen = std::collections::HashSet::new();
        let mut reused = 0u64;
        for r in requests {
            let mut chain = 0u64;
            let mut matching = true;
            for (i, &id) in r.hash_ids.iter().enumerate() {
                chain = chain
                    .wrapping_mul(0x100_0000_01b3)
                    .wrapping_add(id ^ 0x9e37);
                let tokens = (r.input_length as usize)
                    .saturating_sub(i * TRACE_BLOCK_TOKENS)
                    .min(TRACE_BLOCK_TOKENS) as u64;
                if matching && seen.contains(&chain) {
                    reused += tokens;
                } else {
                    matching = false;
                }
                seen.insert(chain);
            }
        }
        let first = requests.first().map_or(Duration::ZERO, |r| r.arrival);
        let last = requests.last().map_or(Duration::ZERO, |r| r.arrival);
        Self {
            requests: requests.len(),
            duration_s: last.saturating_sub(first).as_secs_f64(),
            mean_input: input as f64 / n,
            mean_output: output as f64 / n,
            reuse: reused as f64 / input.max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::parse_trace;

    #[test]
    fn streams_make_prompts_that_share_exactly_their_common_chunks() {
        let mut chunks = Chunks::default();
        let mut stream = Stream::new(chunks.take(2));
        stream.cover(1500, &mut chunks);
        let a = stream.request(0.0, 1100, 5);
        let b = stream.request(1.0, 1500, 5);
        assert_eq!(a.hash_ids, [0, 1, 2]);
        assert_eq!(b.hash_ids, [0, 1, 2]);
        let mut sibling = stream.clone();
        sibling.cover(2000, &mut chunks);
        stream.cover(1600, &mut chunks);
        assert_eq!(sibling.request(0.0, 2000, 1).hash_ids, [0, 1, 2, 3]);
        assert_eq!(stream.request(0.0, 1600, 1).hash_ids, [0, 1, 2, 4]);
    }

    #[test]
    fn written_traces_parse_back() {
        let requests = finish(vec![
            Stream::new(vec![4, 5]).request(0.25, 600, 3),
            Stream::new(vec![4]).request(0.1, 10, 1),
        ]);
        assert_eq!(requests[0].input_length, 10);
        let mut out = Vec::new();
        write_trace(&requests, &mut out).unwrap();
        let back = parse_trace(&out[..]).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].hash_ids, [4, 5]);
        assert_eq!(back[1].arrival, Duration::from_millis(250));
        assert_eq!(back[0].line, 1);
    }

    #[test]
    fn stats_count_reuse_of_shared_prefixes() {
        let requests = vec![
            Stream::new(vec![1, 2]).request(0.0, 1024, 1),
            Stream::new(vec![1, 3]).request(1.0, 1024, 1),
            Stream::new(vec![9, 2]).request(2.0, 1024, 1),
        ];
        let stats = WorkloadStats::of(&requests);
        // Only the second request's first chunk was seen before (as a prefix).
        assert!((stats.reuse - 512.0 / 3072.0).abs() < 1e-9, "{stats:?}");
        assert_eq!(stats.duration_s, 2.0);
    }
}
