//! Picking the next token from logits: greedy, temperature, top-k, top-p, min-p, with a
//! per-request seeded RNG so the same seed and prompt give the same tokens on any worker. The
//! logits are first biased and penalised ([`crate::adjust`]) when the request asks for it; log
//! probabilities are always those of the model's unmodified distribution. Stop tokens and
//! `max_tokens` are the caller's business (it sees every sampled token).

use std::borrow::Cow;

use kvfleet_proto::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adjust::{History, adjust};

/// One sampled token with its log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// log P(token) under the model's unmodified distribution.
    pub logprob: f32,
    /// The `logprobs` most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// A sampler for one request.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// log-softmax of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

/// The `k` largest entries of `values` as (index, value), largest first; ties by lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(values.len());
    let cmp = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

impl Sampler {
    /// A sampler for `params`; without a seed in the params, `fallback_seed` seeds it.
    pub fn new(params: &SamplingParams, fallback_seed: u64) -> Self {
        Self {
            params: params.clone(),
            rng: ChaCha8Rng::seed_from_u64(params.seed.unwrap_or(fallback_seed)),
        }
    }

    /// Samples from `logits` (one entry per vocabulary token), with no penalties (as for a
    /// sequence without history).
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_after(logits, &History::default())
    }

    /// Samples from `logits` after the bias and penalties that `history` calls for.
    pub fn sample_after(&mut self, logits: &[f32], history: &History<'_>) -> Sampled {
        let logprobs = log_softmax(logits);
        let adjusted = if self.params.adjusts_logits() {
            let mut adjusted = logits.to_vec();
            adjust(&self.params, history, &mut adjusted);
            Cow::Owned(adjusted)
        } else {
            Cow::Borrowed(logits)
        };
        let token = if self.params.is_greedy() || logits.len() <= 1 {
            top_k(&adjusted, 1).first().map_or(0, |&(i, _)| i)
        } else {
            self.sample_stochastic(&adjusted)
        };
        let top = match self.params.logprobs {
            Some(n) if n > 0 => top_k(&logprobs, n as usize),
            _ => Vec::new(),
        };
        Sampled {
            token,
            logprob: logprobs
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
            top,
        }
    }

    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            p.top_k as usize
        };
        // Candidates best first; top-k then top-p over the temperature-scaled distribution.
        // Tokens masked to -inf (a grammar) are never candidates.
        let mut cands = top_k(logits, k);
        cands.retain(|c| c.1.is_finite());
        if cands.is_empty() {
            return top_k(logits, 1).first().map_or(0, |&(i, _)| i);
        }
        let t = p.temperature.max(1e-5);
        let max = cands.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cands
            .iter()
            .map(|&(_, l)| f64::from((l - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.min_p > 0.0 {
            // Best first: the most likely token is the first, and it always stays.
            let floor = probs.first().copied().unwrap_or(0.0) * f64::from(p.min_p);
            let keep = probs.iter().take_while(|&&pr| pr >= floor).count().max(1);
            cands.truncate(keep);
            probs.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (c, pr) in cands.iter().zip(&probs) {
            if r < *pr {
                return c.0;
            }
            r -= pr;
        }
        cands.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::greedy(4)
        }
    }

    #[test]
    fn sampling_cases() {
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0];
        // (params, allowed tokens)
        let cases: Vec<(SamplingParams, Vec<u32>)> = vec![
            (SamplingParams::greedy(4), vec![1]), // tie between 1 and 3: lowest id
            (params(1.0, 2, 1.0, 7), vec![1, 3]),
            (params(1.0, 0, 0.5, 7), vec![1, 3]),
            (params(0.01, 0, 1.0, 9), vec![1, 3]),
            (params(2.0, 0, 1.0, 3), vec![0, 1, 2, 3, 4]),
            // min-p 0.5 at temperature 1: tokens 1 and 3 (e^3), not 2 (e^2 < e^3 / 2).
            (
                SamplingParams {
                    min_p: 0.5,
                    ..params(1.0, 0, 1.0, 5)
                },
                vec![1, 3],
            ),
            // A bias makes the least likely token the greedy choice.
            (
                SamplingParams {
                    logit_bias: vec![(4, 10.0)],
                    ..SamplingParams::greedy(4)
                },
                vec![4],
            ),
        ];
        for (p, allowed) in cases {
            let mut s = Sampler::new(&p, 0);
            for _ in 0..50 {
                let tok = s.sample(&logits).token;
                assert!(allowed.contains(&tok), "{p:?} gave {tok}");
            }
        }
    }

    #[test]
    fn same_seed_same_tokens_and_logprobs_are_normalised() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            logprobs: Some(3),
            ..params(1.0, 0, 1.0, 42)
        };
        let run = || {
            let mut s = Sampler::new(&p, 0);
            (0..20).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let out = Sampler::new(&p, 0).sample(&logits);
        assert_eq!(out.top.len(), 3);
        assert!(out.top[0].1 >= out.top[1].1 && out.top[1].1 >= out.top[2].1);
        let total: f64 = log_softmax(&logits)
            .iter()
            .map(|&l| f64::from(l).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-4);
    }

    /// Penalties change the choice (and only the choice: logprobs stay the model's), greedy and
    /// sampled alike.
    #[test]
    fn penalties_steer_the_choice_but_not_the_logprobs() {
        let logits = [1.0, 3.0, 2.0, 0.0];
        let history = History {
            prompt: &[],
            carried: &[],
            output: &[1, 1],
        };
        let penalised = SamplingParams {
            frequency_penalty: 1.0,
            logprobs: Some(0),
            ..SamplingParams::greedy(4)
        };
        let plain = Sampler::new(&SamplingParams::greedy(4), 0).sample_after(&logits, &history);
        let steered = Sampler::new(&penalised, 0).sample_after(&logits, &history);
        assert_eq!((plain.token, steered.token), (1, 2));
        assert_eq!(steered.logprob, log_softmax(&logits)[2]);
        let mut hot = Sampler::new(
            &SamplingParams {
                presence_penalty: 2.0,
                repetition_penalty: 2.0,
                ..params(0.05, 0, 1.0, 11)
            },
            0,
        );
        for _ in 0..20 {
            assert_eq!(hot.sample_after(&logits, &history).token, 2);
        }
    }
}
