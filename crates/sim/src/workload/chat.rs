//! Multi-turn chat sessions: each turn's prompt is the system prompt, every earlier turn (user
//! message and answer) and the new user message, so a conversation's turns share an ever
//! longer prefix, and conversations using the same system prompt share that.
//!
//! ```text
//! session start    Poisson, `session_rate` per second
//! system prompt    one of `system_prompts` (Zipf 1.0 popularity), `system_prompt_tokens` long
//! turns            geometric, mean `turns`, at most `max_turns`; the session also ends when the
//!                  next prompt would exceed `max_context`
//! first message    a pasted document (log-normal around `document_tokens`) with probability
//!                  `document_share`, otherwise a question like any other
//! user message     log-normal around `user_tokens` (σ 1.0), 4..=8,192 tokens
//! answer           log-normal around `answer_tokens` (σ 0.8), 16..=2,048 tokens
//! next turn        when the answer would be complete (`ttft_estimate_ms` + answer ×
//!                  `decode_ms_per_token`) plus a think time, exponential around `think_time_s`
//! ```
//!
//! The answer's tokens re-enter the next prompt as new chunks of the conversation's stream: the
//! engine's cached copy of its own output (pseudo-tokens in the mock) does not match them, so
//! the simulated reuse is a lower bound of what an engine caching generated blocks would get.

use crate::trace::{TRACE_BLOCK_TOKENS, TraceRequest};

use super::rng::{Rng, zipf};
use super::{Chunks, Stream, WorkloadError, at_least_one, finish, positive, seconds};

/// The chat generator's knobs; [`ChatConfig::default`] is what docs/benchmarks.md measures.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatConfig {
    /// Conversations to start.
    pub sessions: u32,
    /// New conversations per second.
    pub session_rate: f64,
    /// Mean turns per conversation.
    pub turns: f64,
    /// Most turns a conversation has.
    pub max_turns: u32,
    /// Mean seconds between an answer and the next user message.
    pub think_time_s: f64,
    /// Distinct system prompts (applications) sessions are spread over.
    pub system_prompts: u32,
    /// Tokens of each system prompt (rounded up to whole 512-token chunks).
    pub system_prompt_tokens: u32,
    /// Mean tokens of a user message.
    pub user_tokens: f64,
    /// Mean tokens of an answer.
    pub answer_tokens: f64,
    /// Share of conversations that open with a pasted document.
    pub document_share: f64,
    /// Mean tokens of such a document.
    pub document_tokens: f64,
    /// Longest prompt a conversation reaches before the user starts a new one.
    pub max_context: u32,
    /// Time to first token assumed when timing the next turn, ms.
    pub ttft_estimate_ms: f64,
    /// Time per answer token assumed when timing the next turn, ms.
    pub decode_ms_per_token: f64,
    /// The generator's seed.
    pub seed: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            sessions: 2000,
            session_rate: 2.5,
            turns: 3.5,
            max_turns: 40,
            think_time_s: 30.0,
            system_prompts: 8,
            system_prompt_tokens: 1024,
            user_tokens: 150.0,
            answer_tokens: 350.0,
            document_share: 0.5,
            document_tokens: 10_000.0,
            max_context: 65_536,
            ttft_estimate_ms: 200.0,
            decode_ms_per_token: 15.0,
            seed: 1,
        }
    }
}

impl ChatConfig {
    /// The same config with `factor` times the session rate (and as many more sessions, so the
    /// run covers the same span of time).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            session_rate: self.session_rate * factor,
            sessions: (f64::from(self.sessions) * factor).round() as u32,
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        positive("session-rate", self.session_rate)?;
        positive("turns", self.turns)?;
        positive("user_tokens", self.user_tokens)?;
        positive("answer_tokens", self.answer_tokens)?;
        positive("document_tokens", self.document_tokens)?;
        seconds("think-time", self.think_time_s)?;
        if !(0.0..=1.0).contains(&self.document_share) {
            return Err(WorkloadError {
                field: "document_share",
                reason: format!("{} must be between 0 and 1", self.document_share),
            });
        }
        at_least_one("system_prompts", self.system_prompts)?;
        Ok(())
    }

    /// The requests, sorted by arrival.
    pub fn generate(&self) -> Result<Vec<TraceRequest>, WorkloadError> {
        self.validate()?;
        let mut rng = Rng::new(self.seed);
        let mut chunks = Chunks::default();
        let system_chunks = (self.system_prompt_tokens as usize).div_ceil(TRACE_BLOCK_TOKENS);
        let system_len = (system_chunks * TRACE_BLOCK_TOKENS) as u32;
        let systems: Vec<Vec<u64>> = (0..self.system_prompts)
            .map(|_| chunks.take(system_chunks))
            .collect();
        let popularity = zipf(systems.len(), 1.0);
        let mut requests = Vec::new();
        let mut start = 0.0;
        for _ in 0..self.sessions {
            start += rng.exponential(1.0 / self.session_rate);
            let mut stream = Stream::new(systems[rng.weighted(&popularity)].clone());
            let turns = rng.geometric(self.turns).min(self.max_turns.max(1));
            let mut context = system_len;
            let mut at = start;
            for turn in 0..turns {
                let message = if turn == 0 && rng.unit() <= self.document_share {
                    rng.tokens(self.document_tokens, 0.8, 512, 49_152)
                } else {
                    rng.tokens(self.user_tokens, 1.0, 4, 8192)
                };
                let input = context + message;
                if input > self.max_context {
                    break;
                }
                let answer = rng.tokens(self.answer_tokens, 0.8, 16, 2048);
                stream.cover(input, &mut chunks);
                requests.push(stream.request(at, input, answer));
                context = input + answer;
                at += (self.ttft_estimate_ms + f64::from(answer) * self.decode_ms_per_token) / 1e3
                    + rng.exponential(self.think_time_s.max(1e-9));
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
    fn turns_extend_their_conversation() {
        let config = ChatConfig {
            sessions: 1,
            turns: 50.0,
            document_share: 0.0,
            ..ChatConfig::default()
        };
        let requests = config.generate().unwrap();
        assert!(requests.len() >= 2, "{}", requests.len());
        for pair in requests.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(b.arrival > a.arrival);
            // The next prompt holds the previous prompt and answer.
            assert!(b.input_length > a.input_length + a.output_length);
            assert_eq!(b.hash_ids[..a.hash_ids.len()], a.hash_ids[..]);
            // At least the answer and a think time apart.
            let gap = b.arrival.saturating_sub(a.arrival).as_secs_f64();
            assert!(
                gap >= (200.0 + f64::from(a.output_length) * 15.0) / 1e3,
                "{gap}"
            );
        }
        assert!(requests.iter().all(|r| r.input_length <= 32_768));
    }

    #[test]
    fn the_defaults_look_like_chat_traffic() {
        let requests = ChatConfig::default().generate().unwrap();
        let stats = WorkloadStats::of(&requests);
        // ~4 turns per session, unless a conversation outgrows the context first.
        assert!((6500..=8500).contains(&stats.requests), "{stats:?}");
        assert!(
            stats.mean_output > 250.0 && stats.mean_output < 450.0,
            "{stats:?}"
        );
        assert!(
            stats.reuse > 0.5,
            "multi-turn prompts mostly repeat: {stats:?}"
        );
        // Sessions arrive over sessions / rate seconds and their turns trail behind.
        assert!(stats.duration_s > 150.0, "{stats:?}");
        let again = ChatConfig::default().generate().unwrap();
        assert_eq!(requests, again, "a pure function of its config");
        let other = ChatConfig {
            seed: 2,
            ..ChatConfig::default()
        };
        assert_ne!(requests, other.generate().unwrap());
    }

    #[test]
    fn scaling_the_rate_keeps_the_span() {
        let base = ChatConfig::default();
        let double = base.scaled(2.0);
        assert_eq!(double.sessions, 4000);
        assert_eq!(double.session_rate, 2.0 * base.session_rate);
        let bad = ChatConfig {
            session_rate: 0.0,
            ..base
        };
        assert_eq!(bad.generate().unwrap_err().field, "session-rate");
    }
}
