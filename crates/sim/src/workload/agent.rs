//! Agent runs: bursts of requests sharing a long system prompt (instructions and tool schemas)
//! and the run's context so far, one burst per step.
//!
//! ```text
//! run start        Poisson, `run_rate` per second
//! system prompt    one of `system_prompts` agent kinds with Zipf(`zipf`) popularity (one hot
//!                  prompt, a tail of rarer ones), `system_prompt_tokens` long
//! task             log-normal around `task_tokens` (σ 0.8)
//! steps            geometric, mean `steps`, at most `max_steps`; the run also ends when its
//!                  context would exceed `max_context`
//! burst            geometric, mean `fanout`, at most `max_fanout` requests (parallel tool calls,
//!                  sub-agents), arriving within `burst_spread_ms`; each is the shared context
//!                  plus instructions of its own (log-normal around `request_tokens`) and answers
//!                  log-normal around `output_tokens` (σ 0.7)
//! next step        when the burst's slowest answer would be complete, plus the tools' time
//!                  (exponential around `tool_time_s`); the context grows by every answer and a
//!                  tool result (log-normal around `result_tokens`)
//! ```
//!
//! The shared context is kept a whole number of 512-token chunks long (the trace format's
//! granularity), so siblings of a burst share all of it.

use crate::trace::{TRACE_BLOCK_TOKENS, TraceRequest};

use super::rng::{Rng, zipf};
use super::{Chunks, Stream, WorkloadError, at_least_one, finish, positive, seconds};

/// The agent generator's knobs; [`AgentConfig::default`] is what docs/benchmarks.md measures.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Agent runs to start.
    pub runs: u32,
    /// New runs per second.
    pub run_rate: f64,
    /// Mean steps (bursts) per run.
    pub steps: f64,
    /// Most steps a run takes.
    pub max_steps: u32,
    /// Mean requests per burst.
    pub fanout: f64,
    /// Most requests in one burst.
    pub max_fanout: u32,
    /// Mean seconds the tools take between a burst's answers and the next burst.
    pub tool_time_s: f64,
    /// Distinct agent kinds (system prompts).
    pub system_prompts: u32,
    /// Zipf exponent of their popularity.
    pub zipf: f64,
    /// Tokens of each system prompt (rounded up to whole 512-token chunks).
    pub system_prompt_tokens: u32,
    /// Mean tokens of a run's task.
    pub task_tokens: f64,
    /// Mean tokens of one request's own instructions.
    pub request_tokens: f64,
    /// Mean tokens of a tool result added to the context after a step.
    pub result_tokens: f64,
    /// Mean tokens of an answer.
    pub output_tokens: f64,
    /// Longest context a run reaches.
    pub max_context: u32,
    /// A burst's requests arrive within this many ms.
    pub burst_spread_ms: f64,
    /// Time to first token assumed when timing the next step, ms.
    pub ttft_estimate_ms: f64,
    /// Time per answer token assumed when timing the next step, ms.
    pub decode_ms_per_token: f64,
    /// The generator's seed.
    pub seed: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            runs: 300,
            run_rate: 0.5,
            steps: 5.0,
            max_steps: 30,
            fanout: 3.0,
            max_fanout: 16,
            tool_time_s: 2.0,
            system_prompts: 8,
            zipf: 1.2,
            system_prompt_tokens: 6144,
            task_tokens: 600.0,
            request_tokens: 250.0,
            result_tokens: 800.0,
            output_tokens: 200.0,
            max_context: 65_536,
            burst_spread_ms: 20.0,
            ttft_estimate_ms: 200.0,
            decode_ms_per_token: 15.0,
            seed: 1,
        }
    }
}

fn chunk_aligned(tokens: u32) -> u32 {
    (tokens as usize).div_ceil(TRACE_BLOCK_TOKENS) as u32 * TRACE_BLOCK_TOKENS as u32
}

impl AgentConfig {
    /// The same config with `factor` times the run rate (and as many more runs, so the run
    /// covers the same span of time).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            run_rate: self.run_rate * factor,
            runs: (f64::from(self.runs) * factor).round() as u32,
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        positive("session-rate", self.run_rate)?;
        positive("turns", self.steps)?;
        positive("fanout", self.fanout)?;
        positive("task_tokens", self.task_tokens)?;
        positive("request_tokens", self.request_tokens)?;
        positive("result_tokens", self.result_tokens)?;
        positive("output_tokens", self.output_tokens)?;
        seconds("think-time", self.tool_time_s)?;
        at_least_one("system_prompts", self.system_prompts)?;
        Ok(())
    }

    /// The requests, sorted by arrival.
    pub fn generate(&self) -> Result<Vec<TraceRequest>, WorkloadError> {
        self.validate()?;
        let mut rng = Rng::new(self.seed ^ 0xa6e7);
        let mut chunks = Chunks::default();
        let system_len = chunk_aligned(self.system_prompt_tokens.max(1));
        let system_chunks = system_len as usize / TRACE_BLOCK_TOKENS;
        let systems: Vec<Vec<u64>> = (0..self.system_prompts)
            .map(|_| chunks.take(system_chunks))
            .collect();
        let popularity = zipf(systems.len(), self.zipf);
        let mut requests = Vec::new();
        let mut start = 0.0;
        for _ in 0..self.runs {
            start += rng.exponential(1.0 / self.run_rate);
            let mut shared = Stream::new(systems[rng.weighted(&popularity)].clone());
            let mut context =
                chunk_aligned(system_len + rng.tokens(self.task_tokens, 0.8, 16, 16_384));
            shared.cover(context, &mut chunks);
            let steps = rng.geometric(self.steps).min(self.max_steps.max(1));
            let mut at = start;
            for _ in 0..steps {
                let fanout = rng.geometric(self.fanout).min(self.max_fanout.max(1));
                let mut slowest: f64 = 0.0;
                let mut answers = 0u32;
                let mut burst = Vec::new();
                for _ in 0..fanout {
                    let own = rng.tokens(self.request_tokens, 0.8, 8, 8192);
                    let input = context + own;
                    let output = rng.tokens(self.output_tokens, 0.7, 4, 4096);
                    let mut stream = shared.clone();
                    stream.cover(input, &mut chunks);
                    let offset = rng.unit() * self.burst_spread_ms / 1e3;
                    burst.push(stream.request(at + offset, input, output));
                    slowest = slowest.max(
                        offset
                            + (self.ttft_estimate_ms
                                + f64::from(output) * self.decode_ms_per_token)
                                / 1e3,
                    );
                    answers += output;
                }
                if burst.iter().any(|r| r.input_length > self.max_context) {
                    break;
                }
                requests.extend(burst);
                let result = rng.tokens(self.result_tokens, 1.0, 16, 32_768);
                context = chunk_aligned(context + answers + result);
                shared.cover(context, &mut chunks);
                at += slowest + rng.exponential(self.tool_time_s.max(1e-9));
            }
        }
        Ok(finish(requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadStats;

    #[test]
    fn bursts_share_the_system_prompt_and_the_context() {
        let config = AgentConfig {
            runs: 1,
            steps: 6.0,
            fanout: 4.0,
            ..AgentConfig::default()
        };
        let requests = config.generate().unwrap();
        assert!(requests.len() >= 2, "{}", requests.len());
        let system_chunks = 6144 / 512;
        for r in &requests {
            assert_eq!(
                r.hash_ids[..system_chunks],
                requests[0].hash_ids[..system_chunks]
            );
        }
        // Requests within 20 ms of each other are one burst: they share all but their own part.
        for pair in requests.windows(2) {
            let gap = pair[1]
                .arrival
                .saturating_sub(pair[0].arrival)
                .as_secs_f64();
            let common = pair[0]
                .hash_ids
                .iter()
                .zip(&pair[1].hash_ids)
                .take_while(|(a, b)| a == b)
                .count();
            if gap < 0.020 {
                let shorter = pair[0].hash_ids.len().min(pair[1].hash_ids.len());
                assert!(common + 1 >= shorter, "siblings share their context");
            } else {
                // The next step carries the previous one's context and more.
                assert!(pair[1].input_length > pair[0].input_length);
            }
        }
    }

    #[test]
    fn the_defaults_have_a_hot_system_prompt_and_bursts() {
        let requests = AgentConfig::default().generate().unwrap();
        let stats = WorkloadStats::of(&requests);
        assert!(stats.requests > 2000, "{stats:?}");
        assert!(stats.reuse > 0.6, "{stats:?}");
        let mut by_prompt = std::collections::BTreeMap::new();
        for r in &requests {
            *by_prompt.entry(r.hash_ids[0]).or_insert(0usize) += 1;
        }
        let hottest = *by_prompt.values().max().unwrap();
        assert!(
            hottest * 4 > requests.len(),
            "one prompt carries a large share: {by_prompt:?}"
        );
        assert_eq!(by_prompt.len(), 8);
        assert_eq!(requests, AgentConfig::default().generate().unwrap());
        let bad = AgentConfig {
            fanout: f64::NAN,
            ..AgentConfig::default()
        };
        assert_eq!(bad.generate().unwrap_err().field, "fanout");
    }
}
