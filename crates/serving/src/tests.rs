//! The state machine without a socket: every leg outcome (success, peer refusal, transfer
//! timeout, worker death before and after the first token) and every release of a router pick.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use kvfleet_kv_router::RequestId;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::peer::FinishReason;
use kvfleet_proto::{NodeId, WorkerId};

use crate::*;

const DECODE_HOLD: RequestId = RequestId(1);
const PREFILL_HOLD: RequestId = RequestId(2);
const DECODE_WORKER: WorkerId = WorkerId(7);
const PREFILL_WORKER: WorkerId = WorkerId(9);
const DEADLINE: Duration = Duration::from_secs(30);
const T0: Duration = Duration::from_secs(100);

fn node(n: u128) -> NodeId {
    NodeId::from_uuid(uuid::Uuid::from_u128(n))
}

fn peer_addr() -> SocketAddr {
    "127.0.0.1:7500".parse().unwrap_or_else(|_| unreachable!())
}

fn decode(target: Target) -> Pick {
    Pick {
        worker: DECODE_WORKER,
        role: WorkerRole::Decode,
        target,
        hold: Some(DECODE_HOLD),
    }
}

fn prefill() -> PrefillPick {
    PrefillPick {
        worker: PREFILL_WORKER,
        node: node(2),
        addr: "prefill-node:7500".into(),
        hold: Some(PREFILL_HOLD),
    }
}

fn remote() -> Target {
    Target::Remote {
        node: node(3),
        addr: peer_addr(),
    }
}

fn plan(decode_target: Target, with_prefill: bool) -> Plan {
    Plan {
        decode: Some(decode(decode_target)),
        prefill: with_prefill.then(prefill),
        prefill_deadline: DEADLINE,
        unused: Vec::new(),
        migration_limit: DEFAULT_MIGRATION_LIMIT,
    }
}

fn prompt(max_tokens: u32) -> Prompt {
    Prompt {
        max_tokens,
        stop_token_ids: vec![2],
        full_blocks: 4,
    }
}

/// What a driver would have done: every action, sorted by kind.
#[derive(Debug, Default)]
struct Seen {
    started: Vec<LegStart>,
    closed: Vec<LegId>,
    collects: usize,
    released: BTreeMap<RequestId, usize>,
    prefill_done: Vec<RequestId>,
    records: Vec<Record>,
    ends: Vec<End>,
    replans: Vec<Replan>,
}

struct Run {
    serve: Serve,
    seen: Seen,
}

impl Run {
    fn start(plan: Plan, prompt: Prompt) -> Self {
        let mut serve = Serve::new(plan, prompt, Timeouts::default());
        serve.start(T0);
        let mut run = Self {
            serve,
            seen: Seen::default(),
        };
        run.drain();
        run
    }

    fn drain(&mut self) {
        while let Some(action) = self.serve.poll_action() {
            let seen = &mut self.seen;
            match action {
                Action::Start(leg) => seen.started.push(leg),
                Action::Close(leg) => seen.closed.push(leg),
                Action::CollectTransfer => seen.collects += 1,
                Action::Release(id) => *seen.released.entry(id).or_default() += 1,
                Action::PrefillDone(id) => seen.prefill_done.push(id),
                Action::Record(record) => seen.records.push(record),
                Action::End(end) => seen.ends.push(end),
                Action::Replan(replan) => seen.replans.push(replan),
            }
        }
    }

    /// The leg started last.
    fn leg(&self) -> &LegStart {
        self.seen.started.last().unwrap_or_else(|| unreachable!())
    }

    fn id(&self) -> LegId {
        self.leg().id
    }

    fn tokens(&mut self, tokens: &[u32]) -> bool {
        let passed = self.serve.tokens(self.id(), tokens);
        self.drain();
        passed
    }

    fn finished(&mut self, reason: FinishReason, acknowledged: u32) {
        self.serve.finished(self.id(), reason, acknowledged);
        self.drain();
    }

    fn failed(&mut self, error: &str) {
        self.serve.failed(self.id(), error.into());
        self.drain();
    }

    fn refused(&mut self, error: &str) {
        self.serve.refused(self.id(), error.into());
        self.drain();
    }

    fn unavailable(&mut self, error: &str, at: Duration) {
        self.serve.unavailable(self.id(), error.into(), at);
        self.drain();
    }

    fn replanned(&mut self, pick: Option<Pick>, at: Duration) {
        self.serve.replanned(pick, at);
        self.drain();
    }

    /// Tokens the client received, in order (what the driver passed on).
    fn client_text(&self) -> Vec<u32> {
        self.serve.delivered().to_vec()
    }

    fn timeout(&mut self, at: Duration) {
        self.serve.handle_timeout(at);
        self.drain();
    }

    fn collected(&mut self, received: usize) {
        self.serve.collected(received);
        self.drain();
    }

    /// Every router decision the plan held was released, exactly once.
    fn assert_released(&self, holds: &[RequestId]) {
        let expected: BTreeMap<RequestId, usize> = holds.iter().map(|h| (*h, 1)).collect();
        assert_eq!(self.seen.released, expected);
    }

    fn assert_ended(&self, end: End) {
        assert_eq!(self.seen.ends, vec![end]);
        assert!(self.serve.is_done());
        assert_eq!(self.serve.poll_timeout(), None);
    }
}

fn prefill_record(outcome: PrefillOutcome, blocks: usize) -> impl Fn(&Record) -> bool {
    move |r| matches!(r, Record::Prefill { outcome: o, blocks: b, .. } if *o == outcome && *b == blocks)
}

#[test]
fn a_local_pick_runs_here_and_is_released_at_the_end() {
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert_eq!(run.seen.records, vec![Record::RoutedLocal]);
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: Some(DECODE_WORKER),
            generated: vec![]
        }
    );
    assert!(run.tokens(&[5, 6]));
    assert_eq!(run.serve.first_role(), Some(WorkerRole::Decode));
    assert_eq!(run.seen.released, BTreeMap::new(), "held until the end");
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[DECODE_HOLD]);
    run.assert_ended(End::Finished(FinishReason::Length));
}

#[test]
fn without_a_plan_the_pool_chooses_and_nothing_is_held_or_counted() {
    let mut run = Run::start(Plan::local(), prompt(8));
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: None,
            generated: vec![]
        }
    );
    assert!(run.seen.records.is_empty());
    assert_eq!(run.serve.first_role(), None, "the pool's worker says");
    run.finished(FinishReason::Stop, 0);
    run.assert_released(&[]);
    run.assert_ended(End::Finished(FinishReason::Stop));
}

#[test]
fn unused_picks_are_released_at_the_start() {
    let mut plan = plan(Target::Local, false);
    plan.unused = vec![RequestId(40)];
    let mut run = Run::start(plan, prompt(8));
    assert_eq!(run.seen.released.get(&RequestId(40)), Some(&1));
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[RequestId(40), DECODE_HOLD]);
}

#[test]
fn a_forwarded_request_streams_and_releases_the_prefill_pick_at_its_first_token() {
    let mut run = Run::start(plan(remote(), true), prompt(8));
    assert_eq!(run.seen.records, vec![Record::RoutedRemote]);
    let Leg::Forward {
        worker, prefill, ..
    } = &run.leg().leg
    else {
        panic!("a forward leg: {:?}", run.leg());
    };
    assert_eq!(
        (*worker, prefill.clone()),
        (DECODE_WORKER, Some(crate::tests::prefill()))
    );
    assert_eq!(run.serve.poll_timeout(), Some(T0 + Duration::from_secs(2)));
    run.serve.opened(run.id());
    assert_eq!(
        run.serve.poll_timeout(),
        None,
        "no timer once the peer answered"
    );
    assert!(run.tokens(&[5]));
    assert_eq!(run.serve.first_role(), Some(WorkerRole::Prefill));
    run.assert_released(&[PREFILL_HOLD]);
    assert_eq!(run.seen.prefill_done, vec![DECODE_HOLD]);
    assert!(run.tokens(&[6]));
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    run.assert_ended(End::Finished(FinishReason::Length));
}

#[test]
fn a_peer_that_refuses_before_the_first_token_means_a_local_run() {
    let mut run = Run::start(plan(remote(), true), prompt(8));
    let forward = run.id();
    run.serve.opened(forward);
    run.failed("unavailable: no ready worker");
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    assert_eq!(run.seen.closed, vec![forward]);
    assert!(run.seen.records.contains(&Record::ForwardFallback {
        addr: peer_addr(),
        reason: "unavailable: no ready worker".into()
    }));
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: None,
            generated: vec![]
        }
    );
    // The dead leg's late events change nothing.
    assert!(!run.serve.tokens(forward, &[1]));
    run.serve.finished(forward, FinishReason::Length, 0);
    run.drain();
    assert!(run.seen.ends.is_empty());
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    run.assert_ended(End::Finished(FinishReason::Length));
}

#[test]
fn a_peer_that_does_not_answer_in_time_means_a_local_run() {
    let mut run = Run::start(plan(remote(), false), prompt(8));
    run.timeout(T0 + Duration::from_millis(1999));
    assert_eq!(run.seen.started.len(), 1, "not yet");
    run.timeout(T0 + Duration::from_secs(2));
    assert!(matches!(
        &run.seen.records[1],
        Record::ForwardFallback { reason, .. } if reason.contains("no answer within 2s")
    ));
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: None,
            generated: vec![]
        }
    );
    run.assert_released(&[DECODE_HOLD]);
    run.refused("prompt longer than the context");
    run.assert_ended(End::Failed("prompt longer than the context".into()));
    run.assert_released(&[DECODE_HOLD]);
}

#[test]
fn a_forwarded_request_whose_node_dies_after_the_first_token_migrates() {
    let mut run = Run::start(plan(remote(), false), prompt(8));
    let forward = run.id();
    run.serve.opened(forward);
    assert!(run.tokens(&[5]));
    run.failed("the serving node closed the stream before the finish");
    assert_eq!(run.seen.closed, vec![forward]);
    run.assert_released(&[DECODE_HOLD]);
    assert_eq!(
        run.seen.replans,
        vec![Replan {
            tokens: vec![5],
            avoid: vec![DECODE_WORKER]
        }]
    );
    assert!(run.seen.records.contains(&Record::Migrated {
        attempt: 1,
        tokens: 1,
        reason: "peer 127.0.0.1:7500: the serving node closed the stream before the finish".into()
    }));
    // The router now picks a worker here, holding a new decision.
    let again = Pick {
        worker: WorkerId(11),
        role: WorkerRole::Aggregated,
        target: Target::Local,
        hold: Some(RequestId(30)),
    };
    run.replanned(Some(again), T0);
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: Some(WorkerId(11)),
            generated: vec![5]
        }
    );
    // The dead leg's late tokens are not the client's.
    assert!(!run.serve.tokens(forward, &[9]));
    assert!(run.tokens(&[6, 7]));
    run.finished(FinishReason::Length, 0);
    assert_eq!(run.client_text(), vec![5, 6, 7]);
    run.assert_released(&[DECODE_HOLD, RequestId(30)]);
    run.assert_ended(End::Finished(FinishReason::Length));
    assert_eq!(run.serve.migrations(), 1);
}

#[test]
fn a_local_worker_lost_before_or_after_the_first_token_is_resumed_with_what_the_client_has() {
    for first in [vec![], vec![5], vec![5, 6, 7]] {
        let mut run = Run::start(plan(Target::Local, false), prompt(8));
        if !first.is_empty() {
            assert!(run.tokens(&first));
        }
        run.failed("worker 7 failed: the worker process exited");
        run.assert_released(&[DECODE_HOLD]);
        assert!(run.seen.ends.is_empty(), "not the end: {:?}", run.seen.ends);
        assert_eq!(
            run.seen.replans,
            vec![Replan {
                tokens: first.clone(),
                avoid: vec![DECODE_WORKER]
            }]
        );
        // No router pick: the pool chooses; the leg resumes after what the client has.
        run.replanned(None, T0);
        assert_eq!(
            run.leg().leg,
            Leg::Local {
                worker: None,
                generated: first.clone()
            }
        );
        let rest: Vec<u32> = (100..100 + 8 - first.len() as u32).collect();
        assert!(run.tokens(&rest));
        run.finished(FinishReason::Length, 0);
        let whole: Vec<u32> = first.iter().copied().chain(rest).collect();
        assert_eq!(
            run.client_text(),
            whole,
            "nothing repeated, nothing missing"
        );
        run.assert_ended(End::Finished(FinishReason::Length));
    }
}

#[test]
fn a_request_that_keeps_losing_its_worker_fails_once_its_migration_limit_is_spent() {
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5]));
    for attempt in 1..=DEFAULT_MIGRATION_LIMIT {
        run.failed("worker exited");
        assert_eq!(run.seen.replans.len(), attempt as usize);
        run.replanned(None, T0);
        assert!(run.tokens(&[5 + attempt]));
    }
    run.failed("worker exited");
    run.assert_ended(End::Failed(
        "the request lost its worker 4 times, more than this deployment's migration_limit (3) \
         allows: worker exited"
            .into(),
    ));
    run.assert_released(&[DECODE_HOLD]);
    assert_eq!(run.client_text(), vec![5, 6, 7, 8]);
}

#[test]
fn without_migration_a_lost_leg_ends_lost_for_whoever_asked() {
    let mut plan = plan(Target::Local, false);
    plan.migration_limit = 0;
    let mut run = Run::start(plan, prompt(8));
    assert!(run.tokens(&[5]));
    run.failed("worker exited");
    run.assert_ended(End::Lost("worker exited".into()));
    assert!(run.seen.replans.is_empty());
}

#[test]
fn a_refusal_by_the_worker_is_not_migrated() {
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5]));
    run.refused("model error: NaN in the logits");
    run.assert_ended(End::Failed("model error: NaN in the logits".into()));
    assert!(run.seen.replans.is_empty());
    run.assert_released(&[DECODE_HOLD]);
}

#[test]
fn a_leg_lost_after_the_client_has_everything_just_ends() {
    // max_tokens reached before the finish arrived.
    let mut run = Run::start(plan(Target::Local, false), prompt(2));
    assert!(run.tokens(&[5, 6]));
    run.failed("worker exited");
    run.assert_ended(End::Finished(FinishReason::Length));
    // A stop token was the last thing delivered.
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5, 2]));
    run.failed("worker exited");
    run.assert_ended(End::Finished(FinishReason::Stop));
    assert!(run.seen.replans.is_empty());
}

#[test]
fn a_migration_that_finds_no_ready_worker_waits_for_one_without_spending_its_limit() {
    let timeouts = Timeouts::default();
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5]));
    run.failed("worker exited");
    run.replanned(None, T0);
    let leg = run.id();
    run.unavailable("no ready worker serves model \"m\"", T0);
    assert_eq!(run.seen.closed.last(), Some(&leg));
    assert_eq!(
        run.serve.poll_timeout(),
        Some(T0 + timeouts.migration_retry)
    );
    run.timeout(T0 + timeouts.migration_retry);
    assert_eq!(run.seen.replans.len(), 2, "asks again");
    // The only worker restarted: the pool takes it.
    run.replanned(None, T0 + timeouts.migration_retry);
    assert!(run.tokens(&[6]));
    assert_eq!(run.serve.migrations(), 1, "waiting spent nothing");
    run.finished(FinishReason::Length, 0);
    assert_eq!(run.client_text(), vec![5, 6]);
    // Nobody comes back within the wait: a clear error.
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5]));
    run.failed("worker exited");
    let mut now = T0;
    while run.seen.ends.is_empty() {
        run.replanned(None, now);
        run.unavailable("no ready worker", now);
        now = run.serve.poll_timeout().unwrap_or(now);
        run.timeout(now);
    }
    assert!(now <= T0 + timeouts.migration_wait);
    assert!(matches!(&run.seen.ends[0],
        End::Failed(m) if m.contains(&format!("no worker took the request within {:?}", timeouts.migration_wait))));
}

#[test]
fn a_planned_local_worker_that_is_not_ready_is_planned_around() {
    // The router named a worker here that died since it last heard: plan again without it.
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    run.unavailable("worker 7 is not ready", T0);
    assert!(run.seen.ends.is_empty());
    assert_eq!(
        run.seen.replans,
        vec![Replan {
            tokens: vec![],
            avoid: vec![DECODE_WORKER]
        }]
    );
    run.replanned(None, T0);
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 0);
    run.assert_ended(End::Finished(FinishReason::Length));
}

#[test]
fn a_forward_whose_node_lost_the_worker_and_finds_none_here_is_planned_around_it() {
    // The router named a decode worker on another node that has just died: that node answers
    // unavailable, the request falls back here, and this node has no worker for it either (its
    // only worker is a prefill worker). It is planned again without the dead worker (without spending its
    // migration limit), not failed.
    let mut run = Run::start(plan(remote(), false), prompt(8));
    run.unavailable("worker 7 is not ready", T0);
    assert!(run.seen.ends.is_empty());
    assert!(
        matches!(run.leg().leg, Leg::Local { .. }),
        "{:?}",
        run.leg()
    );
    run.unavailable("no ready worker serves model \"m\"", T0);
    assert!(run.seen.ends.is_empty(), "{:?}", run.seen.ends);
    assert_eq!(
        run.seen.replans,
        vec![Replan {
            tokens: vec![],
            avoid: vec![DECODE_WORKER]
        }]
    );
    let other = Pick {
        worker: WorkerId(12),
        role: WorkerRole::Decode,
        target: remote(),
        hold: Some(RequestId(31)),
    };
    run.replanned(Some(other), T0);
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 0);
    run.assert_ended(End::Finished(FinishReason::Length));
    run.assert_released(&[DECODE_HOLD, RequestId(31)]);
    assert_eq!(run.serve.migrations(), 0, "nothing was lost");
}

#[test]
fn a_forward_its_busy_node_refused_with_no_worker_here_waits_and_forwards_again() {
    // The disaggregation fault test's 502: the request enters the prefill node, whose only
    // worker is a prefill worker (the pool here never runs a whole request on it). Its forward
    // to the decode node is refused before it starts (that node has its limit of streams from
    // this one open: the KV pushes of a burst hold them), so it falls back here, where no worker
    // takes it either. Nothing was delivered and nothing was lost: planned around the decode
    // worker once it finds nobody, so it waits and asks again without spending its migration
    // limit, and the decode worker may be picked again. (It used to count as a lost leg: a
    // migration that avoided the decode worker, the fleet's only one, in every replan, which
    // found nobody until `migration_wait` ran out.)
    let timeouts = Timeouts::default();
    let mut run = Run::start(plan(remote(), true), prompt(8));
    let refusal =
        "peer refused: Overloaded: this node serves at most 64 concurrent streams per peer";
    let nobody = "no ready worker serves model \"m\"";
    let around = Replan {
        tokens: vec![],
        avoid: vec![DECODE_WORKER],
    };
    let again = Replan {
        tokens: vec![],
        avoid: vec![],
    };
    run.failed(refusal);
    assert!(matches!(run.leg().leg, Leg::Local { worker: None, .. }));
    run.unavailable(nobody, T0);
    assert_eq!(run.seen.replans, vec![around.clone()]);
    run.replanned(None, T0);
    run.unavailable(nobody, T0);
    assert!(run.seen.ends.is_empty(), "{:?}", run.seen.ends);
    assert!(
        !run.seen
            .records
            .iter()
            .any(|r| matches!(r, Record::Migrated { .. })),
        "{:?}",
        run.seen.records
    );
    assert_eq!(run.serve.migrations(), 0);
    assert_eq!(
        run.seen.replans.len(),
        1,
        "not at once: after a retry interval"
    );
    assert_eq!(
        run.serve.poll_timeout(),
        Some(T0 + timeouts.migration_retry)
    );
    let mut now = T0 + timeouts.migration_retry;
    run.timeout(now);
    assert_eq!(run.seen.replans, vec![around.clone(), again.clone()]);
    run.replanned(
        Some(Pick {
            hold: Some(RequestId(31)),
            ..decode(remote())
        }),
        now,
    );
    assert!(
        matches!(
            run.leg().leg,
            Leg::Forward {
                worker: DECODE_WORKER,
                prefill: None,
                ..
            }
        ),
        "{:?}",
        run.leg()
    );
    // Refused once more: the same fallback, once around, and wait.
    run.failed(refusal);
    run.unavailable(nobody, now);
    run.replanned(None, now);
    run.unavailable(nobody, now);
    now += timeouts.migration_retry;
    run.timeout(now);
    assert_eq!(
        run.seen.replans,
        vec![around.clone(), again.clone(), around, again]
    );
    run.replanned(
        Some(Pick {
            hold: Some(RequestId(32)),
            ..decode(remote())
        }),
        now,
    );
    run.serve.opened(run.id());
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 0);
    run.assert_ended(End::Finished(FinishReason::Length));
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD, RequestId(31), RequestId(32)]);
    assert_eq!(run.serve.migrations(), 0);

    // Nobody takes it within the wait: a clear error, after the wait, not at once.
    let mut run = Run::start(plan(remote(), false), prompt(8));
    run.failed(refusal);
    let mut now = T0;
    loop {
        run.unavailable("no ready worker", now);
        if !run.seen.ends.is_empty() {
            break;
        }
        now = run.serve.poll_timeout().unwrap_or(now);
        run.timeout(now);
        run.replanned(None, now);
    }
    assert_eq!(now, T0 + timeouts.migration_wait);
    assert!(matches!(&run.seen.ends[0],
        End::Failed(m) if m.contains(&format!("no worker took the request within {:?}", timeouts.migration_wait))));
    assert_eq!(run.serve.migrations(), 0);
}

#[test]
fn a_first_leg_with_no_ready_worker_fails_at_once() {
    let mut run = Run::start(Plan::local(), prompt(8));
    run.unavailable("no ready worker", T0);
    run.assert_ended(End::Failed("no ready worker".into()));
}

#[test]
fn a_migration_to_another_node_forwards_the_delivered_tokens_and_a_dead_peer_migrates_again() {
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5, 6]));
    run.failed("worker exited");
    let there = Pick {
        worker: WorkerId(12),
        role: WorkerRole::Aggregated,
        target: remote(),
        hold: Some(RequestId(31)),
    };
    run.replanned(Some(there), T0);
    let Leg::Forward {
        worker,
        generated,
        prefill,
        ..
    } = &run.leg().leg
    else {
        panic!("a forward: {:?}", run.leg());
    };
    assert_eq!(
        (*worker, generated.clone(), prefill.clone()),
        (WorkerId(12), vec![5, 6], None)
    );
    // It does not answer: no local fallback (tokens were streamed) but another migration.
    run.timeout(T0 + Duration::from_secs(2));
    assert_eq!(
        run.seen.replans.last(),
        Some(&Replan {
            tokens: vec![5, 6],
            avoid: vec![DECODE_WORKER, WorkerId(12)]
        })
    );
    assert_eq!(run.serve.migrations(), 2);
    run.replanned(None, T0 + Duration::from_secs(2));
    assert!(run.tokens(&[7]));
    run.finished(FinishReason::Stop, 0);
    run.assert_released(&[DECODE_HOLD, RequestId(31)]);
    assert_eq!(run.client_text(), vec![5, 6, 7]);
}

#[test]
fn a_leg_that_sends_more_than_was_asked_is_refused_counted_and_migrated() {
    let mut run = Run::start(plan(Target::Local, false), prompt(3));
    assert!(run.tokens(&[5]));
    assert!(!run.tokens(&[6, 7, 8]), "never reaches the client");
    assert!(
        run.seen
            .records
            .iter()
            .any(|r| matches!(r, Record::Refused { .. }))
    );
    assert_eq!(run.seen.replans.len(), 1);
    run.replanned(None, T0);
    assert!(run.tokens(&[6, 7]));
    run.finished(FinishReason::Length, 0);
    assert_eq!(run.client_text(), vec![5, 6, 7]);
}

#[test]
fn a_decode_leg_lost_after_a_prefill_leg_resumes_with_every_delivered_token() {
    let mut run = disaggregated(8);
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 4);
    run.collected(4);
    assert!(run.tokens(&[6]));
    run.failed("worker 7 failed");
    assert_eq!(
        run.seen.replans,
        vec![Replan {
            tokens: vec![5, 6],
            avoid: vec![DECODE_WORKER]
        }]
    );
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    run.replanned(None, T0);
    assert!(run.tokens(&[7]));
    run.finished(FinishReason::Length, 0);
    assert_eq!(run.client_text(), vec![5, 6, 7]);
}

#[test]
fn a_client_that_goes_away_during_a_migration_leaves_nothing_held() {
    let mut run = Run::start(plan(Target::Local, false), prompt(8));
    assert!(run.tokens(&[5]));
    run.failed("worker exited");
    run.serve.abort();
    run.drain();
    // A late answer to the replan is released, not started.
    let late = Pick {
        worker: WorkerId(11),
        role: WorkerRole::Aggregated,
        target: Target::Local,
        hold: Some(RequestId(33)),
    };
    run.replanned(Some(late), T0);
    run.assert_released(&[DECODE_HOLD, RequestId(33)]);
    assert_eq!(run.seen.started.len(), 1);
    assert_eq!(run.serve.poll_timeout(), None);
}

/// A disaggregated request on its decode node, up to its prefill leg's first token.
fn disaggregated(max_tokens: u32) -> Run {
    let mut run = Run::start(plan(Target::Local, true), prompt(max_tokens));
    assert_eq!(run.seen.records, vec![Record::RoutedLocal]);
    assert_eq!(run.leg().leg, Leg::Prefill { pick: prefill() });
    assert_eq!(run.serve.first_role(), Some(WorkerRole::Prefill));
    assert_eq!(run.serve.poll_timeout(), Some(T0 + Duration::from_secs(2)));
    run.serve.opened(run.id());
    assert_eq!(run.serve.poll_timeout(), Some(T0 + DEADLINE));
    run
}

#[test]
fn a_disaggregated_request_decodes_with_the_acknowledged_blocks() {
    let mut run = disaggregated(8);
    let prefill_leg = run.id();
    assert!(run.tokens(&[5]));
    run.assert_released(&[PREFILL_HOLD]);
    assert_eq!(run.seen.prefill_done, vec![DECODE_HOLD]);
    run.finished(FinishReason::Length, 3);
    assert_eq!(
        (run.seen.closed.clone(), run.seen.collects),
        (vec![prefill_leg], 1)
    );
    // Four blocks arrived, the prefill node saw three acknowledged: three are known complete.
    run.collected(4);
    assert!(
        run.seen
            .records
            .iter()
            .any(prefill_record(PrefillOutcome::Remote, 3))
    );
    assert_eq!(
        run.leg().leg,
        Leg::Decode {
            worker: Some(DECODE_WORKER),
            tokens: vec![5],
            blocks: 3,
            max_tokens: 7
        }
    );
    assert!(run.tokens(&[6, 7]));
    assert_eq!(run.serve.first_role(), Some(WorkerRole::Prefill));
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    run.assert_ended(End::Finished(FinishReason::Length));
}

#[test]
fn a_refused_or_dead_prefill_leg_before_its_first_token_means_a_local_prefill() {
    for error in [
        "unavailable: worker 9 is not ready here",
        "the prefill worker went away",
    ] {
        let mut run = disaggregated(8);
        run.failed(error);
        run.assert_released(&[PREFILL_HOLD]);
        assert_eq!(run.seen.collects, 1);
        run.collected(0);
        assert!(run.seen.records.iter().any(|r| r
            == &Record::Prefill {
                outcome: PrefillOutcome::FallbackBeforeFirstToken,
                reason: Some(error.into()),
                blocks: 0
            }));
        assert_eq!(
            run.leg().leg,
            Leg::Local {
                worker: Some(DECODE_WORKER),
                generated: vec![]
            }
        );
        assert_eq!(run.serve.first_role(), Some(WorkerRole::Decode));
        run.finished(FinishReason::Length, 0);
        run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    }
}

#[test]
fn a_prefill_node_that_does_not_answer_in_time_means_a_local_prefill() {
    let mut run = Run::start(plan(Target::Local, true), prompt(8));
    run.timeout(T0 + Duration::from_secs(2));
    run.collected(0);
    assert!(run.seen.records.iter().any(|r| matches!(r,
        Record::Prefill { outcome: PrefillOutcome::FallbackBeforeFirstToken, reason: Some(why), .. }
            if why.contains("no answer within 2s"))));
    assert_eq!(
        run.leg().leg,
        Leg::Local {
            worker: Some(DECODE_WORKER),
            generated: vec![]
        }
    );
}

#[test]
fn a_transfer_past_the_deadline_continues_with_the_blocks_that_arrived() {
    let mut run = disaggregated(8);
    assert!(run.tokens(&[5]));
    run.timeout(T0 + DEADLINE - Duration::from_millis(1));
    assert_eq!(run.seen.collects, 0, "not yet");
    run.timeout(T0 + DEADLINE);
    assert_eq!(run.seen.collects, 1);
    run.collected(2);
    assert!(run.seen.records.iter().any(|r| matches!(r,
        Record::Prefill { outcome: PrefillOutcome::FallbackAfterFirstToken, reason: Some(why), blocks: 2 }
            if why.contains("took longer than 30s"))));
    assert_eq!(
        run.leg().leg,
        Leg::Decode {
            worker: Some(DECODE_WORKER),
            tokens: vec![5],
            blocks: 2,
            max_tokens: 7
        }
    );
    run.finished(FinishReason::Length, 0);
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
}

#[test]
fn a_prefill_worker_that_dies_after_its_first_token_leaves_the_blocks_it_sent() {
    let mut run = disaggregated(8);
    assert!(run.tokens(&[5]));
    run.failed("the prefill node ended the stream early");
    run.collected(1);
    assert!(
        run.seen
            .records
            .iter()
            .any(prefill_record(PrefillOutcome::FallbackAfterFirstToken, 1))
    );
    assert!(matches!(run.leg().leg, Leg::Decode { blocks: 1, .. }));
    // Then the decode worker refuses it: the request fails, with everything released.
    assert!(run.tokens(&[6]));
    run.refused("worker 7 failed");
    run.assert_ended(End::Failed("worker 7 failed".into()));
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
}

#[test]
fn a_first_token_that_ends_the_request_needs_no_decode_leg() {
    // The prefill node said Stop.
    let mut run = disaggregated(8);
    assert!(run.tokens(&[2]));
    run.finished(FinishReason::Stop, 0);
    run.collected(4);
    assert!(
        run.seen
            .records
            .iter()
            .any(prefill_record(PrefillOutcome::Remote, 0))
    );
    run.assert_ended(End::Finished(FinishReason::Stop));
    // It broke after streaming a stop token: no decoding past it.
    let mut run = disaggregated(8);
    assert!(run.tokens(&[2]));
    run.failed("the prefill node went away");
    run.collected(4);
    assert!(
        run.seen
            .records
            .iter()
            .any(prefill_record(PrefillOutcome::FallbackAfterFirstToken, 0))
    );
    run.assert_ended(End::Finished(FinishReason::Stop));
    // max_tokens = 1: the first token was all.
    let mut run = disaggregated(1);
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 4);
    run.collected(4);
    run.assert_ended(End::Finished(FinishReason::Length));
    run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
    assert_eq!(run.seen.started.len(), 1);
}

#[test]
fn nothing_acknowledged_of_a_prompt_with_blocks_is_a_fallback() {
    let mut run = disaggregated(8);
    assert!(run.tokens(&[5]));
    run.finished(FinishReason::Length, 0);
    run.collected(4);
    assert!(
        run.seen
            .records
            .iter()
            .any(prefill_record(PrefillOutcome::FallbackAfterFirstToken, 0))
    );
    assert!(matches!(run.leg().leg, Leg::Decode { blocks: 0, .. }));
}

#[test]
fn a_prefill_leg_that_sends_more_than_it_was_asked_for_is_cut_off() {
    let mut run = disaggregated(8);
    let leg = run.id();
    assert!(run.tokens(&[5]));
    assert!(
        !run.tokens(&[6]),
        "the extra token never reaches the client"
    );
    assert_eq!(run.seen.closed, vec![leg]);
    run.collected(4);
    assert!(matches!(
        run.leg().leg,
        Leg::Decode { ref tokens, blocks: 4, .. } if tokens == &[5]
    ));
}

#[test]
fn a_client_that_goes_away_releases_whatever_is_held_exactly_once() {
    // In every state: before anything, mid-forward, mid-prefill, collecting, decoding, ended.
    let forward = Run::start(plan(remote(), true), prompt(8));
    let mut prefilling = disaggregated(8);
    assert!(prefilling.tokens(&[5]));
    let mut collecting = disaggregated(8);
    collecting.failed("gone");
    let mut decoding = disaggregated(8);
    assert!(decoding.tokens(&[5]));
    decoding.finished(FinishReason::Length, 4);
    decoding.collected(4);
    let mut ended = Run::start(plan(Target::Local, true), prompt(8));
    ended.failed("refused");
    ended.collected(0);
    ended.finished(FinishReason::Length, 0);
    for mut run in [forward, prefilling, collecting, decoding, ended] {
        run.serve.abort();
        run.drain();
        run.serve.abort();
        run.drain();
        run.assert_released(&[PREFILL_HOLD, DECODE_HOLD]);
        assert!(run.serve.is_done());
        assert!(!run.serve.tokens(run.id(), &[1]));
    }
}
