//! The disaggregation decision: whether a request's prompt is prefilled on a prefill worker
//! before its decode worker generates, and on which one. Pure and clock-free like the rest of
//! the crate, so the agent's fleet router and `kvfleet sim` make the very same decision.
//!
//! [`choose_prefill`] runs after the decode worker was picked (its [`Decision`] says how much of
//! the prompt it already caches) and follows the model's [`DisaggregationPolicy`]:
//!
//! 1. the prompt's part the decode worker does not cache (`prompt_tokens` minus its overlap in
//!    blocks of the router's block size) must be at least `min_remote_prefill_tokens`, else the
//!    decode worker prefills it ([`PrefillDecision::LocalShort`]);
//! 2. when every prefill candidate's queued prefill tokens plus that part would exceed
//!    `max_prefill_queue_tokens`, no prefill worker is picked at all
//!    ([`PrefillDecision::LocalQueueFull`]): nothing is counted on a worker that will not run it;
//! 3. otherwise the router picks among the prefill candidates, KV-aware (the one caching most
//!    of the prompt wins, load-balanced otherwise); no candidate means
//!    [`PrefillDecision::LocalNoPrefillWorker`];
//! 4. a pick whose own queue would overflow (the router preferred it for the prefix it holds,
//!    though another had room) is released at once: [`PrefillDecision::LocalQueueFull`];
//! 5. else the pick stands ([`PrefillDecision::Remote`]) and stays counted in that worker's
//!    load until the caller calls [`Router::finished`] with its request id.

use std::time::Duration;

use kvfleet_proto::WorkerId;
use kvfleet_proto::api::DisaggregationPolicy;

use crate::{Decision, RequestId, RouteRequest, Router};

/// How a disaggregated model's request is prefilled (the agent counts these in
/// `kvfleet_fleet_prefill_decisions_total{decision}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrefillDecision {
    /// On a prefill worker.
    Remote,
    /// By the decode worker: the uncached part of the prompt is below
    /// `min_remote_prefill_tokens`.
    LocalShort,
    /// By the decode worker: the chosen prefill worker's queue would exceed
    /// `max_prefill_queue_tokens`.
    LocalQueueFull,
    /// By the decode worker: no ready prefill worker of the model is reachable.
    LocalNoPrefillWorker,
}

impl PrefillDecision {
    /// Every decision, in metric order.
    pub const ALL: [PrefillDecision; 4] = [
        PrefillDecision::Remote,
        PrefillDecision::LocalShort,
        PrefillDecision::LocalQueueFull,
        PrefillDecision::LocalNoPrefillWorker,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefillDecision::Remote => "remote",
            PrefillDecision::LocalShort => "local_short",
            PrefillDecision::LocalQueueFull => "local_queue_full",
            PrefillDecision::LocalNoPrefillWorker => "local_no_prefill_worker",
        }
    }

    /// Its position in [`PrefillDecision::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What [`choose_prefill`] decided: the decision, and the prefill worker's pick when it is
/// [`PrefillDecision::Remote`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillChoice {
    /// Why the prompt is prefilled where it is.
    pub decision: PrefillDecision,
    /// The prefill worker's decision (counted in its load until [`Router::finished`]).
    pub pick: Option<Decision>,
}

/// Decides where the prompt of `request` (whose decode worker `decode` was picked) is
/// prefilled, under `policy`, among `prefill_candidates` (the model's ready, reachable prefill
/// workers). A prefill pick is made under the id `prefill_request`. See the module docs.
pub fn choose_prefill(
    router: &mut Router,
    request: &RouteRequest<'_>,
    decode: &Decision,
    policy: &DisaggregationPolicy,
    prefill_candidates: &[WorkerId],
    prefill_request: RequestId,
    now: Duration,
) -> PrefillChoice {
    let local = |decision| PrefillChoice {
        decision,
        pick: None,
    };
    let block_size = u64::from(router.config().block_size.get());
    let cached = u64::from(decode.overlap_blocks) * block_size;
    let uncached = u64::from(request.prompt_tokens).saturating_sub(cached);
    if uncached < u64::from(policy.min_remote_prefill_tokens) {
        return local(PrefillDecision::LocalShort);
    }
    // Each candidate's queue before this request (the pick itself adds to it).
    let queued: Vec<(WorkerId, u64)> = prefill_candidates
        .iter()
        .map(|&worker| {
            let load = router.worker_load(worker).map_or(0, |l| l.prefill_tokens);
            (worker, load)
        })
        .collect();
    let full =
        |queued: u64| queued.saturating_add(uncached) > u64::from(policy.max_prefill_queue_tokens);
    if !queued.is_empty() && queued.iter().all(|(_, q)| full(*q)) {
        return local(PrefillDecision::LocalQueueFull);
    }
    let prefill = RouteRequest {
        id: prefill_request,
        candidates: Some(prefill_candidates),
        ..*request
    };
    let Ok(pick) = router.select(&prefill, now) else {
        return local(PrefillDecision::LocalNoPrefillWorker);
    };
    let before = queued
        .iter()
        .find(|(worker, _)| *worker == pick.worker)
        .map_or(0, |(_, q)| *q);
    if full(before) {
        router.finished(pick.request, now);
        return local(PrefillDecision::LocalQueueFull);
    }
    PrefillChoice {
        decision: PrefillDecision::Remote,
        pick: Some(pick),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RouterConfig, WorkerCapacity, WorkerLoad};
    use kvfleet_proto::hash::{BlockSize, block_hashes};
    use kvfleet_proto::{KvEvent, KvEventData, SequenceHash, Tier};

    const DECODE: WorkerId = WorkerId(1);
    const PREFILL_A: WorkerId = WorkerId(2);
    const PREFILL_B: WorkerId = WorkerId(3);

    fn router() -> Router {
        let mut router = Router::new(RouterConfig {
            block_size: BlockSize::new(16).unwrap(),
            ..RouterConfig::default()
        });
        for id in [DECODE, PREFILL_A, PREFILL_B] {
            router.add_worker(id, WorkerCapacity::default()).unwrap();
        }
        router
    }

    fn prompt(first: u32, len: u32) -> Vec<u32> {
        (first..first + len).collect()
    }

    fn hashes(tokens: &[u32]) -> Vec<SequenceHash> {
        block_hashes(tokens, BlockSize::new(16).unwrap())
            .iter()
            .map(|b| b.sequence)
            .collect()
    }

    fn store(router: &mut Router, worker: WorkerId, tokens: &[u32], event_id: u64) {
        let event = KvEvent {
            worker,
            event_id,
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent: None,
                blocks: block_hashes(tokens, BlockSize::new(16).unwrap()),
            },
        };
        router.apply(&event, Duration::ZERO).unwrap();
    }

    fn policy(min: u32, max_queue: u32) -> DisaggregationPolicy {
        DisaggregationPolicy {
            min_remote_prefill_tokens: min,
            max_prefill_queue_tokens: max_queue,
            prefill_timeout_ms: 30_000,
        }
    }

    fn queue(router: &mut Router, worker: WorkerId, prefill_tokens: u64) {
        let load = WorkerLoad {
            prefill_tokens,
            decode_blocks: 0,
            queue_depth: 0,
        };
        router.apply_load(worker, load, Duration::ZERO).unwrap();
    }

    /// Picks the decode worker, then decides the prefill; returns the choice.
    fn decide(
        router: &mut Router,
        tokens: &[u32],
        policy: DisaggregationPolicy,
        candidates: &[WorkerId],
    ) -> PrefillChoice {
        let hashes = hashes(tokens);
        let request = RouteRequest::new(RequestId(10), &hashes, tokens.len() as u32);
        let decode = router
            .select(&request.with_candidates(&[DECODE]), Duration::ZERO)
            .unwrap();
        choose_prefill(
            router,
            &request,
            &decode,
            &policy,
            candidates,
            RequestId(11),
            Duration::ZERO,
        )
    }

    #[test]
    fn decisions_table() {
        use PrefillDecision::*;
        /// The prefill worker a row expects.
        enum Pick {
            No,
            Any,
            Is(WorkerId),
        }
        use Pick::*;
        // (what, policy, prompt tokens, tokens the decode worker caches, queued on A and B,
        // candidates, expected decision, expected prefill worker: `Any` where both prefill
        // workers are equally good and the router's rendezvous tie-break picks one)
        let both = [PREFILL_A, PREFILL_B];
        type Row<'a> = (
            &'a str,
            DisaggregationPolicy,
            u32,
            usize,
            (u64, u64),
            &'a [WorkerId],
            PrefillDecision,
            Pick,
        );
        let rows: [Row<'_>; 11] = [
            (
                "short prompt",
                policy(256, 16384),
                128,
                0,
                (0, 0),
                &both,
                LocalShort,
                No,
            ),
            (
                "at the threshold",
                policy(256, 16384),
                256,
                0,
                (0, 0),
                &both,
                Remote,
                Any,
            ),
            (
                "cached mostly",
                policy(256, 16384),
                1024,
                800,
                (0, 0),
                &both,
                LocalShort,
                No,
            ),
            (
                "cached a little",
                policy(256, 16384),
                1024,
                512,
                (0, 0),
                &both,
                Remote,
                Any,
            ),
            (
                "0: always remote",
                policy(0, 16384),
                16,
                0,
                (0, 0),
                &both,
                Remote,
                Any,
            ),
            (
                "queue too small",
                policy(0, 1000),
                1024,
                0,
                (0, 0),
                &both,
                LocalQueueFull,
                No,
            ),
            (
                "queue just fits",
                policy(0, 1024),
                1024,
                0,
                (0, 0),
                &both,
                Remote,
                Any,
            ),
            (
                "both queues full",
                policy(0, 1500),
                1024,
                0,
                (600, 700),
                &both,
                LocalQueueFull,
                No,
            ),
            (
                "the idle one",
                policy(0, 1500),
                1024,
                0,
                (600, 0),
                &both,
                Remote,
                Is(PREFILL_B),
            ),
            (
                "no candidate",
                policy(0, 16384),
                1024,
                0,
                (0, 0),
                &[],
                LocalNoPrefillWorker,
                No,
            ),
            (
                "one full candidate",
                policy(0, 1500),
                1024,
                0,
                (600, 0),
                &[PREFILL_A],
                LocalQueueFull,
                No,
            ),
        ];
        for (what, policy, len, cached, (qa, qb), candidates, decision, worker) in rows {
            let mut router = router();
            let tokens = prompt(0, len);
            store(&mut router, DECODE, &tokens[..cached], 0);
            queue(&mut router, PREFILL_A, qa);
            queue(&mut router, PREFILL_B, qb);
            let choice = decide(&mut router, &tokens, policy, candidates);
            assert_eq!(choice.decision, decision, "{what}");
            let picked = choice.pick.as_ref().map(|p| p.worker);
            match worker {
                No => assert_eq!(picked, None, "{what}"),
                Is(expected) => assert_eq!(picked, Some(expected), "{what}"),
                Any => assert!(
                    picked.is_some_and(|w| candidates.contains(&w)),
                    "{what}: {picked:?}"
                ),
            }
            // A pick stays counted on its worker; no decision leaves load behind otherwise.
            let loads =
                [PREFILL_A, PREFILL_B].map(|w| router.worker_load(w).unwrap().prefill_tokens);
            let expected = [(PREFILL_A, qa), (PREFILL_B, qb)]
                .map(|(w, q)| q + if picked == Some(w) { u64::from(len) } else { 0 });
            assert_eq!(loads, expected, "{what}");
        }
    }

    #[test]
    fn a_full_worker_picked_for_its_prefix_is_released() {
        // A caches 768 of 1024 tokens and has 64 queued; B caches nothing and is idle. The
        // router prefers A, but 64 + 1024 uncached on the decode worker > 1050.
        let mut router = router();
        let tokens = prompt(0, 1024);
        store(&mut router, PREFILL_A, &tokens[..768], 0);
        queue(&mut router, PREFILL_A, 64);
        let choice = decide(
            &mut router,
            &tokens,
            policy(0, 1050),
            &[PREFILL_A, PREFILL_B],
        );
        assert_eq!(
            choice,
            PrefillChoice {
                decision: PrefillDecision::LocalQueueFull,
                pick: None
            }
        );
        let loads = [PREFILL_A, PREFILL_B].map(|w| router.worker_load(w).unwrap().prefill_tokens);
        assert_eq!(loads, [64, 0], "the released pick left nothing behind");
        // With room on A the same prompt goes there.
        router.finished(RequestId(10), Duration::ZERO);
        queue(&mut router, PREFILL_A, 0);
        let choice = decide(
            &mut router,
            &tokens,
            policy(0, 1050),
            &[PREFILL_A, PREFILL_B],
        );
        assert_eq!(
            choice.pick.map(|p| (p.worker, p.overlap_blocks)),
            Some((PREFILL_A, 48))
        );
    }
}
