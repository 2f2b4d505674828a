//! Worker load: what workers report, what the router's own decisions add, and the blend of both.
//!
//! Every frontend routes to the same workers, so no single router's decisions describe a
//! worker's load. Workers therefore publish their live load periodically ([`WorkerLoad`]), and
//! each router blends the latest report with its own decisions made since (the report cannot
//! include those yet). Decisions the report already covers stop counting separately; requests
//! that finished since the report are taken off it. A decision's prefill part ends when the
//! worker's KV events show the prompt's last block stored (or the driver says so); the whole
//! decision ends when the request finishes or after a timeout.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RequestId;

/// A worker's live load, as it reports it (or as the router estimates it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerLoad {
    /// Prompt tokens admitted but not yet prefilled.
    pub prefill_tokens: u64,
    /// KV blocks held by running requests.
    pub decode_blocks: u64,
    /// Requests waiting to be scheduled.
    pub queue_depth: u32,
}

/// What a worker can hold, told to the router when the worker joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerCapacity {
    /// KV blocks in the worker's device tier; 0 when unknown (never considered full).
    pub kv_blocks: u64,
    /// Queue depth at which the worker counts as overloaded; `None` for no limit.
    pub max_queue_depth: Option<u32>,
}

/// The part of a load that own decisions contribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Contribution {
    pub(crate) prefill_tokens: u64,
    pub(crate) decode_blocks: u64,
}

impl Contribution {
    fn add(&mut self, other: Contribution) {
        self.prefill_tokens += other.prefill_tokens;
        self.decode_blocks += other.decode_blocks;
    }
    fn sub(&mut self, other: Contribution) {
        self.prefill_tokens = self.prefill_tokens.saturating_sub(other.prefill_tokens);
        self.decode_blocks = self.decode_blocks.saturating_sub(other.decode_blocks);
    }
}

/// One worker's load bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct LoadState {
    /// The latest report and when it arrived.
    report: Option<(WorkerLoad, Duration)>,
    /// Contributions of requests the report covers that have ended (or finished prefill) since.
    retired: Contribution,
    /// Sum of contributions of in-flight decisions the report does not cover yet.
    unreported: Contribution,
    /// Own decisions in the order they were made, until a report covers them.
    pending: VecDeque<(Duration, RequestId)>,
    /// How many entries of `pending` are still live (the rest ended before any report).
    live_pending: usize,
}

impl LoadState {
    /// The blended load: report − retired + unreported.
    pub(crate) fn effective(&self) -> WorkerLoad {
        let (mut load, queue_depth) = match self.report {
            Some((report, _)) => (
                Contribution {
                    prefill_tokens: report.prefill_tokens,
                    decode_blocks: report.decode_blocks,
                },
                report.queue_depth,
            ),
            None => (Contribution::default(), 0),
        };
        load.sub(self.retired);
        load.add(self.unreported);
        WorkerLoad {
            prefill_tokens: load.prefill_tokens,
            decode_blocks: load.decode_blocks,
            queue_depth,
        }
    }

    /// Counts a new own decision.
    pub(crate) fn decided(
        &mut self,
        request: RequestId,
        contribution: Contribution,
        now: Duration,
    ) {
        self.unreported.add(contribution);
        self.pending.push_back((now, request));
        self.live_pending += 1;
    }

    /// Takes in a report that arrived at `now`: decisions made up to `now - lag` are covered by
    /// it. `cover` marks one decision as reported and returns what it contributed, or `None`
    /// when it has already ended.
    pub(crate) fn report(
        &mut self,
        load: WorkerLoad,
        now: Duration,
        lag: Duration,
        mut cover: impl FnMut(RequestId) -> Option<Contribution>,
    ) {
        let horizon = now.saturating_sub(lag);
        while let Some(&(at, request)) = self.pending.front() {
            if at > horizon {
                break;
            }
            self.pending.pop_front();
            if let Some(contribution) = cover(request) {
                self.unreported.sub(contribution);
                self.live_pending = self.live_pending.saturating_sub(1);
            }
        }
        self.report = Some((load, now));
        self.retired = Contribution::default();
    }

    /// A decision stopped contributing `contribution`: it finished or timed out (`ended`), or
    /// only its prefill part is done. `reported` says whether the latest report covers it.
    pub(crate) fn retire(&mut self, contribution: Contribution, reported: bool, ended: bool) {
        if reported {
            self.retired.add(contribution);
        } else {
            self.unreported.sub(contribution);
            if ended {
                self.live_pending = self.live_pending.saturating_sub(1);
            }
        }
    }

    /// Drops entries of decisions that ended before any report covered them, once they
    /// dominate the queue, so it stays bounded when no reports arrive.
    pub(crate) fn compact(&mut self, mut live: impl FnMut(RequestId) -> bool) {
        if self.pending.len() > 64 && self.pending.len() > 2 * self.live_pending {
            self.pending.retain(|(_, request)| live(*request));
            self.live_pending = self.pending.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(prefill_tokens: u64, decode_blocks: u64) -> Contribution {
        Contribution {
            prefill_tokens,
            decode_blocks,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn decisions_newer_than_the_report_add_to_it_and_older_ones_do_not() {
        let mut state = LoadState::default();
        state.decided(RequestId(1), c(100, 7), ms(10));
        state.decided(RequestId(2), c(50, 4), ms(30));
        assert_eq!(state.effective().prefill_tokens, 150);
        // The report at 20 ms covers request 1 only.
        let report = WorkerLoad {
            prefill_tokens: 1000,
            decode_blocks: 40,
            queue_depth: 3,
        };
        let mut covered = Vec::new();
        state.report(report, ms(20), Duration::ZERO, |r| {
            covered.push(r);
            Some(c(100, 7))
        });
        assert_eq!(covered, [RequestId(1)]);
        assert_eq!(
            state.effective(),
            WorkerLoad {
                prefill_tokens: 1050,
                decode_blocks: 44,
                queue_depth: 3
            }
        );
        // Request 1 finishes: the report still counts it, so it comes off the report.
        state.retire(c(100, 7), true, true);
        // Request 2 finishes before any report covers it.
        state.retire(c(50, 4), false, true);
        assert_eq!(
            state.effective(),
            WorkerLoad {
                prefill_tokens: 900,
                decode_blocks: 33,
                queue_depth: 3
            }
        );
        // A fresh report replaces the old one and forgets what was retired against it.
        state.report(WorkerLoad::default(), ms(40), Duration::ZERO, |_| None);
        assert_eq!(state.effective(), WorkerLoad::default());
    }

    #[test]
    fn retiring_more_than_the_report_says_saturates_at_zero() {
        let mut state = LoadState::default();
        state.report(WorkerLoad::default(), ms(1), Duration::ZERO, |_| None);
        state.retire(c(10, 10), true, true);
        assert_eq!(state.effective(), WorkerLoad::default());
    }

    #[test]
    fn the_pending_queue_is_compacted_when_mostly_dead() {
        let mut state = LoadState::default();
        for i in 0..200 {
            state.decided(RequestId(i), c(1, 1), ms(i as u64));
            if i % 4 != 0 {
                state.retire(c(1, 1), false, true);
            }
        }
        state.compact(|r| r.0 % 4 == 0);
        assert_eq!(state.pending.len(), 50);
        assert_eq!(
            state.effective(),
            WorkerLoad {
                prefill_tokens: 50,
                decode_blocks: 50,
                queue_depth: 0
            }
        );
    }
}
