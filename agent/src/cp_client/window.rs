//! Heartbeat windows: what each worker served between two heartbeats the control plane took,
//! as the [`WorkerWindow`] sums and latency histograms the planner adds up.
//!
//! Nothing here counts anything: the figures are the worker's own cumulative counters and
//! histograms (its engine's, sent up in every status report, the ones `/metrics` shows), and
//! a window is the difference between a worker's last report and its report as of the last
//! heartbeat the control plane took (the baseline). A heartbeat that fails leaves the
//! baselines where they were, so the next one's window covers both intervals: nothing is lost
//! and nothing counted twice. A worker whose process restarted counts from zero again (its
//! incarnation changed); a worker that went away sends its last window once more heartbeats
//! go through. Pure bookkeeping with time passed in: [`Windows::draft`], then
//! [`Windows::acknowledge`] once the heartbeat is taken.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kvfleet_proto::WorkerId;
use kvfleet_proto::api::WorkerWindow;
use kvfleet_proto::histogram::LatencyHistogram;
use tokio::time::Instant;

use crate::worker::protocol::WireStatus;

/// The longest window the control plane accepts ([`WorkerWindow::invalid_reason`]). A longer
/// one (heartbeats failed for over an hour) is dropped: it says nothing about the next
/// interval, and the control plane would refuse the heartbeat that carried it.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// One worker's cumulative serving figures since its process started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub finished: u64,
    pub output_tokens: u64,
    pub ttft: LatencyHistogram,
    pub itl: LatencyHistogram,
}

impl Totals {
    /// The totals in a worker's status report.
    pub fn of(status: &WireStatus) -> Self {
        Self {
            requests: status.admitted,
            prompt_tokens: status.prefix_query_tokens,
            cached_tokens: status.prefix_hit_tokens,
            finished: status.finished,
            output_tokens: status.output_tokens,
            ttft: status.latencies.ttft.clone(),
            itl: status.latencies.itl.clone(),
        }
    }

    /// What was added since `earlier`, an earlier report of the same incarnation.
    fn since(&self, earlier: &Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(earlier.requests),
            prompt_tokens: self.prompt_tokens.saturating_sub(earlier.prompt_tokens),
            cached_tokens: self.cached_tokens.saturating_sub(earlier.cached_tokens),
            finished: self.finished.saturating_sub(earlier.finished),
            output_tokens: self.output_tokens.saturating_sub(earlier.output_tokens),
            ttft: self.ttft.since(&earlier.ttft),
            itl: self.itl.since(&earlier.itl),
        }
    }
}

/// One worker as its last status report showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub worker: WorkerId,
    /// Which start of its process the report is from (its totals restart with each).
    pub incarnation: u64,
    /// Whether it serves (ready or draining): only those send a window, so the control plane
    /// counts the workers that served.
    pub serving: bool,
    pub totals: Totals,
    /// Requests waiting for admission.
    pub queue_depth: u64,
    /// Prompt tokens admitted or waiting, not yet prefilled.
    pub pending_prefill_tokens: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
}

impl Sample {
    /// A worker's sample from its status report.
    pub fn of(worker: WorkerId, incarnation: u64, serving: bool, status: &WireStatus) -> Self {
        Self {
            worker,
            incarnation,
            serving,
            totals: Totals::of(status),
            queue_depth: u64::from(status.waiting),
            pending_prefill_tokens: status.prefill_tokens,
            kv_blocks_used: status.kv_blocks_used.min(status.kv_blocks_total),
            kv_blocks_total: status.kv_blocks_total,
        }
    }
}

/// The windows of one heartbeat, and the baselines they advance to once it is taken.
#[derive(Debug)]
pub struct Draft {
    at: Instant,
    /// Per worker: the window to send.
    pub windows: BTreeMap<WorkerId, WorkerWindow>,
    /// Per worker in `windows`: the incarnation and totals that become its baseline.
    sent: BTreeMap<WorkerId, (u64, Totals)>,
    /// Workers that no longer run: forgotten once the draft is taken.
    gone: Vec<WorkerId>,
}

/// The baselines: every worker's totals as of the last heartbeat the control plane took.
#[derive(Debug)]
pub struct Windows {
    /// When the last heartbeat taken was composed: the start of the open window.
    since: Instant,
    baselines: BTreeMap<WorkerId, (u64, Totals)>,
    /// Each worker's latest sample, so a worker that goes away while heartbeats fail still
    /// sends what it served last.
    last_seen: BTreeMap<WorkerId, Sample>,
}

impl Windows {
    /// Windows that open at `start`; a worker first seen later counts from zero.
    pub fn new(start: Instant) -> Self {
        Self {
            since: start,
            baselines: BTreeMap::new(),
            last_seen: BTreeMap::new(),
        }
    }

    /// The windows of a heartbeat composed at `now` from `samples` (the workers running now).
    /// The baselines move only when the draft is [acknowledged](Self::acknowledge).
    pub fn draft(&mut self, now: Instant, samples: &[Sample]) -> Draft {
        for s in samples {
            self.last_seen.insert(s.worker, s.clone());
        }
        let running: BTreeSet<WorkerId> = samples.iter().map(|s| s.worker).collect();
        let mut draft = Draft {
            at: now,
            windows: BTreeMap::new(),
            sent: BTreeMap::new(),
            gone: self
                .last_seen
                .keys()
                .filter(|id| !running.contains(id))
                .copied()
                .collect(),
        };
        let seconds = now.saturating_duration_since(self.since);
        if seconds.is_zero() {
            draft.gone.clear();
            return draft;
        }
        let too_long = seconds > MAX_WINDOW;
        if too_long {
            tracing::warn!(
                seconds = seconds.as_secs(),
                "dropping the heartbeat windows: longer than the control plane accepts"
            );
        }
        for s in self.last_seen.values().filter(|s| s.serving) {
            let served = match self.baselines.get(&s.worker) {
                Some((incarnation, base)) if *incarnation == s.incarnation => s.totals.since(base),
                _ => s.totals.clone(),
            };
            draft
                .sent
                .insert(s.worker, (s.incarnation, s.totals.clone()));
            if too_long {
                continue;
            }
            draft.windows.insert(
                s.worker,
                WorkerWindow {
                    seconds: seconds.as_secs_f64(),
                    requests: served.requests,
                    prompt_tokens: served.prompt_tokens,
                    cached_tokens: served.cached_tokens.min(served.prompt_tokens),
                    finished: served.finished,
                    output_tokens: served.output_tokens,
                    ttft: served.ttft,
                    itl: served.itl,
                    queue_depth: s.queue_depth,
                    pending_prefill_tokens: s.pending_prefill_tokens,
                    kv_blocks_used: s.kv_blocks_used,
                    kv_blocks_total: s.kv_blocks_total,
                },
            );
        }
        draft
    }

    /// The control plane took `draft`'s heartbeat (or refused it for good): its windows are
    /// counted, the next ones start where they ended.
    pub fn acknowledge(&mut self, draft: Draft) {
        self.since = draft.at;
        self.baselines.extend(draft.sent);
        for id in draft.gone {
            self.baselines.remove(&id);
            self.last_seen.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    /// A worker that served `requests` requests of 100 prompt tokens (40 cached) and 10
    /// output tokens each, first tokens after 50 ms and the other tokens 20 ms apart.
    fn status(requests: u64, waiting: u32, kv_used: u64) -> WireStatus {
        let mut s = WireStatus {
            admitted: requests,
            prefix_query_tokens: 100 * requests,
            prefix_hit_tokens: 40 * requests,
            finished: requests,
            output_tokens: 10 * requests,
            waiting,
            prefill_tokens: 7,
            kv_blocks_used: kv_used,
            kv_blocks_total: 64,
            ..WireStatus::default()
        };
        for _ in 0..requests {
            s.latencies.ttft.observe_seconds(0.050);
            for _ in 0..9 {
                s.latencies.itl.observe_seconds(0.020);
            }
        }
        s
    }

    fn sample(worker: WorkerId, incarnation: u64, requests: u64) -> Sample {
        Sample::of(worker, incarnation, true, &status(requests, 2, 12))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_window_is_the_difference_since_the_last_heartbeat_taken() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let first = windows.draft(t0 + secs(5), &[sample(W1, 1, 3)]);
        let w = &first.windows[&W1];
        assert_eq!((w.seconds, w.requests, w.finished), (5.0, 3, 3));
        assert_eq!(
            (w.prompt_tokens, w.cached_tokens, w.output_tokens),
            (300, 120, 30)
        );
        assert_eq!((w.ttft.count(), w.itl.count()), (3, 27));
        assert_eq!((w.queue_depth, w.pending_prefill_tokens), (2, 7));
        assert_eq!((w.kv_blocks_used, w.kv_blocks_total), (12, 64));
        assert_eq!(w.invalid_reason(), None);
        windows.acknowledge(first);

        let second = windows.draft(t0 + secs(10), &[sample(W1, 1, 8)]);
        let w = &second.windows[&W1];
        assert_eq!((w.seconds, w.requests, w.prompt_tokens), (5.0, 5, 500));
        assert_eq!((w.ttft.count(), w.itl.count()), (5, 45));
        assert!((w.ttft.sum_seconds() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn a_failed_heartbeat_merges_into_the_next_and_nothing_counts_twice() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let taken = windows.draft(t0 + secs(5), &[sample(W1, 1, 2)]);
        windows.acknowledge(taken);
        // This heartbeat fails: its draft is dropped without acknowledging.
        let lost = windows.draft(t0 + secs(10), &[sample(W1, 1, 6)]);
        assert_eq!(lost.windows[&W1].requests, 4);
        drop(lost);
        let retry = windows.draft(t0 + secs(12), &[sample(W1, 1, 7)]);
        let w = &retry.windows[&W1];
        assert_eq!((w.seconds, w.requests, w.ttft.count()), (7.0, 5, 5));
        windows.acknowledge(retry);
        let next = windows.draft(t0 + secs(17), &[sample(W1, 1, 7)]);
        assert_eq!(next.windows[&W1].requests, 0, "already counted");
        assert_eq!(next.windows[&W1].seconds, 5.0);
    }

    #[test]
    fn windows_over_any_run_of_failures_add_up_to_the_totals() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let mut counted = 0;
        let mut seconds = 0.0;
        for beat in 1..=40u64 {
            let draft = windows.draft(t0 + secs(beat), &[sample(W1, 1, beat * beat)]);
            // Every third heartbeat fails.
            if beat % 3 != 0 {
                counted += draft.windows[&W1].requests;
                seconds += draft.windows[&W1].seconds;
                windows.acknowledge(draft);
            }
        }
        // The 40th heartbeat went through: every request and second is in exactly one window.
        assert_eq!(counted, 40 * 40);
        assert_eq!(seconds, 40.0);
    }

    #[test]
    fn a_restarted_worker_counts_from_zero_and_a_new_one_from_its_start() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let d = windows.draft(t0 + secs(5), &[sample(W1, 1, 9)]);
        windows.acknowledge(d);
        // W1's process restarted (incarnation 2) and served 2; W2 appeared and served 3.
        let d = windows.draft(t0 + secs(10), &[sample(W1, 2, 2), sample(W2, 1, 3)]);
        assert_eq!(d.windows[&W1].requests, 2);
        assert_eq!(d.windows[&W2].requests, 3);
        assert_eq!(d.windows[&W2].seconds, 5.0);
    }

    #[test]
    fn only_serving_workers_send_a_window_and_a_starting_one_keeps_its_baseline() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let starting = Sample::of(W2, 1, false, &status(0, 0, 0));
        let d = windows.draft(t0 + secs(5), &[sample(W1, 1, 1), starting]);
        assert!(d.windows.contains_key(&W1) && !d.windows.contains_key(&W2));
        windows.acknowledge(d);
        let d = windows.draft(t0 + secs(10), &[sample(W1, 1, 1), sample(W2, 1, 4)]);
        assert_eq!(d.windows[&W2].requests, 4);
    }

    #[test]
    fn a_worker_gone_sends_its_last_window_until_a_heartbeat_takes_it() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let d = windows.draft(t0 + secs(5), &[sample(W1, 1, 1), sample(W2, 1, 1)]);
        windows.acknowledge(d);
        // W2 served 2 more, then stopped; the next heartbeat fails.
        let d = windows.draft(t0 + secs(10), &[sample(W1, 1, 1), sample(W2, 1, 3)]);
        drop(d);
        let d = windows.draft(t0 + secs(15), &[sample(W1, 1, 1)]);
        assert_eq!(
            d.windows[&W2].requests, 2,
            "its last sample, since its baseline"
        );
        windows.acknowledge(d);
        let d = windows.draft(t0 + secs(20), &[sample(W1, 1, 1)]);
        assert!(!d.windows.contains_key(&W2), "forgotten once taken");
    }

    #[test]
    fn a_window_longer_than_the_wire_allows_is_dropped_and_the_next_starts_fresh() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        let d = windows.draft(t0 + MAX_WINDOW + secs(1), &[sample(W1, 1, 5)]);
        assert!(d.windows.is_empty());
        windows.acknowledge(d);
        let d = windows.draft(t0 + MAX_WINDOW + secs(6), &[sample(W1, 1, 6)]);
        let w = &d.windows[&W1];
        assert_eq!((w.seconds, w.requests), (5.0, 1));
    }

    #[test]
    fn no_time_no_window() {
        let t0 = Instant::now();
        let mut windows = Windows::new(t0);
        assert!(windows.draft(t0, &[sample(W1, 1, 5)]).windows.is_empty());
    }
}
