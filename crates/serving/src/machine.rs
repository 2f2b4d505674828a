//! The request state machine: legs in, actions out. See the crate docs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use kvfleet_kv_router::RequestId;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::peer::FinishReason;
use kvfleet_proto::{NodeId, WorkerId};

use crate::{Plan, PrefillPick, Prompt, Target, Timeouts};

/// Names one leg of a request; events of a leg the machine no longer runs are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegId(pub u32);

/// What a leg runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leg {
    /// On this node's workers: `worker`, or the pool's choice.
    Local {
        /// The worker the router picked; `None`: the pool chooses.
        worker: Option<WorkerId>,
        /// Tokens the client already has (a migrated request): the leg runs the prompt
        /// followed by them and generates only what is still missing. Empty for a first leg.
        generated: Vec<u32>,
    },
    /// On the decode worker's node: the whole request, its prefill leg included when
    /// `prefill` is set (that node runs the legs).
    Forward {
        /// The decode worker.
        worker: WorkerId,
        /// Its node.
        node: NodeId,
        /// Its node's peer endpoint.
        addr: SocketAddr,
        /// The prefill worker the remote node asks first.
        prefill: Option<PrefillPick>,
        /// The prefill leg's deadline there.
        prefill_deadline: Duration,
        /// Tokens the client already has, as for [`Leg::Local`].
        generated: Vec<u32>,
    },
    /// The prefill leg: the prompt on the prefill worker for one token, its KV blocks pushed
    /// to this node as they are computed.
    Prefill {
        /// The prefill worker and where it runs.
        pick: PrefillPick,
    },
    /// The decode leg after a prefill leg: the prompt plus `tokens` on `worker`, the first
    /// `blocks` received KV blocks imported, at most `max_tokens` more tokens.
    Decode {
        /// The decode worker (`None`: the pool chooses).
        worker: Option<WorkerId>,
        /// The tokens the prefill leg produced (already sent to the client).
        tokens: Vec<u32>,
        /// How many of the received blocks (contiguous from block 0) to import.
        blocks: usize,
        /// Tokens still to generate.
        max_tokens: u32,
    },
}

/// A leg to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegStart {
    /// Its name in later events.
    pub id: LegId,
    /// What it runs.
    pub leg: Leg,
}

/// How a disaggregated request's prefill ended, as the decode side counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrefillOutcome {
    /// The prefill worker produced the first token and its blocks were imported.
    Remote,
    /// The prefill leg failed or timed out before its first token: the decode worker prefilled
    /// the whole prompt.
    FallbackBeforeFirstToken,
    /// The prefill leg failed after its first token: the decode worker continued with the
    /// blocks that had arrived and recomputed the rest.
    FallbackAfterFirstToken,
}

impl PrefillOutcome {
    /// Every outcome, in metric order.
    pub const ALL: [PrefillOutcome; 3] = [
        PrefillOutcome::Remote,
        PrefillOutcome::FallbackBeforeFirstToken,
        PrefillOutcome::FallbackAfterFirstToken,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefillOutcome::Remote => "remote",
            PrefillOutcome::FallbackBeforeFirstToken => "fallback_before_first_token",
            PrefillOutcome::FallbackAfterFirstToken => "fallback_after_first_token",
        }
    }
}

/// Something to count (and log) about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The router's decode pick runs here.
    RoutedLocal,
    /// The router's decode pick is forwarded to its node.
    RoutedRemote,
    /// The forwarded request failed before its first token; it runs here instead.
    ForwardFallback {
        /// The peer that failed.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A leg was lost after `tokens` reached the client: the request is planned again and
    /// resumes after them (the `attempt`th migration).
    Migrated {
        /// Which migration this is, from 1.
        attempt: u32,
        /// Tokens the client already had.
        tokens: usize,
        /// What went wrong.
        reason: String,
    },
    /// A leg sent what the request never asked for (more tokens than `max_tokens`): cut off
    /// and treated as lost.
    Refused {
        /// What it sent.
        reason: String,
    },
    /// How the prefill of a disaggregated request ended (with why, for a fallback).
    Prefill {
        /// The outcome.
        outcome: PrefillOutcome,
        /// What went wrong on the prefill leg, if anything did.
        reason: Option<String>,
        /// Blocks the decode leg imports.
        blocks: usize,
    },
}

/// How the request ends for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Done: every token was delivered.
    Finished(FinishReason),
    /// Failed; the message says why.
    Failed(String),
    /// Its leg was lost and this machine may not migrate it (`migration_limit` 0, as for a leg
    /// another node planned): whoever asked may resume it elsewhere.
    Lost(String),
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a leg, then report what it does with the events of [`Serve`].
    Start(LegStart),
    /// Stop that leg: drop its stream (the remote side cancels), ignore the rest of it.
    Close(LegId),
    /// The prefill leg is over: take the KV blocks received so far (contiguous from block 0)
    /// and answer with [`Serve::collected`].
    CollectTransfer,
    /// The request no longer needs this router decision.
    Release(RequestId),
    /// This router decision's prefill is over (its prompt's blocks are computed elsewhere).
    PrefillDone(RequestId),
    /// Count and log this.
    Record(Record),
    /// Plan the request again (a lost leg): answer with [`Serve::replanned`] before polling
    /// the next action.
    Replan(Replan),
    /// The request's last event for the client.
    End(End),
}

/// What a migration plans for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replan {
    /// Tokens the client already has: the new leg runs the prompt followed by them.
    pub tokens: Vec<u32>,
    /// Workers that lost this request already (the router should not pick them again).
    pub avoid: Vec<WorkerId>,
}

/// The router decisions the request still holds.
#[derive(Debug, Default)]
struct Held {
    decode: Option<RequestId>,
    prefill: Option<RequestId>,
}

#[derive(Debug)]
enum State {
    Idle,
    /// A leg on this node's workers (plain, a fallback, the decode leg or a migration);
    /// `worker` when it runs on the worker the router named.
    Local {
        leg: LegId,
        worker: Option<WorkerId>,
    },
    Forwarding {
        leg: LegId,
        addr: SocketAddr,
        /// Until when it may take to open; `None` once open.
        open_by: Option<Duration>,
        /// Whether tokens reached the client (no fallback is possible after that).
        streamed: bool,
        /// The worker it runs on there.
        worker: WorkerId,
    },
    Prefilling {
        leg: LegId,
        /// Until when it may take to open; `None` once open.
        open_by: Option<Duration>,
        /// Until when the whole leg may take.
        until: Duration,
        /// The tokens it produced (already sent to the client).
        tokens: Vec<u32>,
    },
    /// The prefill leg is over; waiting for the driver to collect the transfer.
    Collecting {
        tokens: Vec<u32>,
        /// The prefill leg's finish: its reason and the blocks the decode side acknowledged.
        finish: Option<(FinishReason, u32)>,
        error: Option<String>,
    },
    /// A lost leg: waiting for the driver's [`Serve::replanned`].
    Replanning,
    /// No worker could take the migrated request: asks again at `retry_at`.
    Waiting {
        retry_at: Duration,
    },
    Done,
}

/// One request being served; see the crate docs.
#[derive(Debug)]
pub struct Serve {
    plan: Plan,
    prompt: Prompt,
    timeouts: Timeouts,
    state: State,
    held: Held,
    next_leg: u32,
    actions: VecDeque<Action>,
    /// The role of the worker whose tokens reached the client first, once known.
    first_role: Option<WorkerRole>,
    /// Every token the client was given, from every leg.
    delivered: Vec<u32>,
    /// Migrations so far.
    migrations: u32,
    /// Workers that lost this request.
    avoid: Vec<WorkerId>,
    /// Whether a forward fell back to a run here (its node could not serve it).
    fell_back: bool,
    /// The worker of the forward that fell back last, until the request is planned around it
    /// once (its node may have lost it, and the router may not know yet).
    fell_back_from: Option<WorkerId>,
    /// Until when a migration that finds no ready worker may keep asking; set at the first
    /// such answer, cleared when a leg delivers.
    wait_until: Option<Duration>,
}

/// Tokens a prefill leg asks its worker for.
const PREFILL_TOKENS: u32 = 1;

impl Serve {
    /// A request to serve under `plan`; nothing happens until [`Serve::start`].
    pub fn new(plan: Plan, prompt: Prompt, timeouts: Timeouts) -> Self {
        let held = Held {
            decode: plan.decode.as_ref().and_then(|p| p.hold),
            prefill: plan.prefill.as_ref().and_then(|p| p.hold),
        };
        Self {
            plan,
            prompt,
            timeouts,
            state: State::Idle,
            held,
            next_leg: 0,
            actions: VecDeque::new(),
            first_role: None,
            delivered: Vec::new(),
            migrations: 0,
            avoid: Vec::new(),
            fell_back: false,
            fell_back_from: None,
            wait_until: None,
        }
    }

    /// Tokens delivered to the client so far, from every leg.
    pub fn delivered(&self) -> &[u32] {
        &self.delivered
    }

    /// How many times the request was migrated.
    pub fn migrations(&self) -> u32 {
        self.migrations
    }

    /// Starts the first leg.
    pub fn start(&mut self, now: Duration) {
        if !matches!(self.state, State::Idle) {
            return;
        }
        for unused in std::mem::take(&mut self.plan.unused) {
            self.actions.push_back(Action::Release(unused));
        }
        let Some(decode) = self.plan.decode.clone() else {
            self.start_local(None);
            return;
        };
        if decode.hold.is_some() {
            self.actions.push_back(Action::Record(match decode.target {
                Target::Local => Record::RoutedLocal,
                Target::Remote { .. } => Record::RoutedRemote,
            }));
        }
        match (decode.target, self.plan.prefill.clone()) {
            (Target::Remote { node, addr }, prefill) => {
                self.start_forward(decode.worker, node, addr, prefill, now);
            }
            (Target::Local, None) => self.start_local(Some(decode.worker)),
            (Target::Local, Some(pick)) => {
                let deadline = self.plan.prefill_deadline;
                let leg = self.leg(Leg::Prefill { pick });
                self.state = State::Prefilling {
                    leg,
                    open_by: Some(now + self.timeouts.prefill_start.min(deadline)),
                    until: now + deadline,
                    tokens: Vec::new(),
                };
            }
        }
    }

    /// The next thing to do, in order; `None` when there is nothing until the next event.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Serve::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Forwarding { open_by, .. } => *open_by,
            State::Prefilling { open_by, until, .. } => {
                Some(open_by.map_or(*until, |o| o.min(*until)))
            }
            State::Waiting { retry_at } => Some(*retry_at),
            _ => None,
        }
    }

    /// Whether the request has ended (its [`Action::End`] was issued).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The role of the worker whose tokens reached (or will reach) the client first; `None` for
    /// a leg on a worker the pool chose, which the driver knows.
    pub fn first_role(&self) -> Option<WorkerRole> {
        if let Some(role) = self.first_role {
            return Some(role);
        }
        match &self.state {
            State::Prefilling { .. } => Some(WorkerRole::Prefill),
            State::Forwarding { .. } if self.plan.prefill.is_some() => Some(WorkerRole::Prefill),
            State::Forwarding { .. }
            | State::Local {
                worker: Some(_), ..
            } => self.plan.decode.as_ref().map(|d| d.role),
            _ => None,
        }
    }

    /// `leg`'s stream is open (a peer leg reached its node).
    pub fn opened(&mut self, leg: LegId) {
        match &mut self.state {
            State::Forwarding {
                leg: l, open_by, ..
            }
            | State::Prefilling {
                leg: l, open_by, ..
            } if *l == leg => {
                *open_by = None;
            }
            _ => {}
        }
    }

    /// `leg` produced `tokens`. Returns whether they go to the client (`false` for a stale
    /// leg, or a prefill leg that produced more than it was asked for, which fails it).
    pub fn tokens(&mut self, leg: LegId, tokens: &[u32]) -> bool {
        if !self.is_current(leg) {
            return false;
        }
        let asked = self.prompt.max_tokens as usize;
        if self.delivered.len() + tokens.len() > asked {
            let reason = format!(
                "the leg sent {} tokens after {} of the {asked} asked for",
                tokens.len(),
                self.delivered.len()
            );
            self.actions.push_back(Action::Record(Record::Refused {
                reason: reason.clone(),
            }));
            self.failed(leg, reason);
            return false;
        }
        let role = self.first_role();
        match &mut self.state {
            State::Prefilling { tokens: got, .. } => {
                if got.len() + tokens.len() > PREFILL_TOKENS as usize {
                    let error = format!(
                        "the prefill node sent more than the {PREFILL_TOKENS} token(s) asked for"
                    );
                    self.prefill_over(None, Some(error));
                    return false;
                }
                got.extend_from_slice(tokens);
            }
            State::Forwarding {
                streamed, open_by, ..
            } => {
                *streamed = true;
                *open_by = None;
            }
            _ => {}
        }
        if let Some(role) = role {
            self.first_role.get_or_insert(role);
        }
        self.delivered.extend_from_slice(tokens);
        self.wait_until = None;
        self.first_event();
        true
    }

    /// `leg` ended: `reason`, and for a prefill leg the KV blocks the decode side acknowledged.
    pub fn finished(&mut self, leg: LegId, reason: FinishReason, acknowledged_blocks: u32) {
        if !self.is_current(leg) {
            return;
        }
        self.first_event();
        match &self.state {
            State::Prefilling { .. } => {
                self.prefill_over(Some((reason, acknowledged_blocks)), None)
            }
            _ => self.end(End::Finished(reason)),
        }
    }

    /// `leg` was lost before it finished: its worker exited, its stream or its peer broke, it
    /// missed a drain deadline. Before anything reached the client a forward runs here
    /// instead and a prefill leg's decode worker prefills; otherwise the request migrates
    /// while its `migration_limit` allows.
    pub fn failed(&mut self, leg: LegId, error: String) {
        if !self.is_current(leg) {
            return;
        }
        match &self.state {
            State::Forwarding {
                addr,
                streamed: false,
                ..
            } if self.can_fall_back() => {
                let addr = *addr;
                self.forward_fallback(leg, addr, error);
            }
            State::Prefilling { .. } => self.prefill_over(None, Some(error)),
            State::Forwarding { addr, .. } => {
                let error = format!("peer {addr}: {error}");
                self.lost(leg, error);
            }
            _ => self.lost(leg, error),
        }
    }

    /// `leg`'s worker refused the request or failed on it (invalid for the engine, a model
    /// error): the request ends, since it would fail the same way elsewhere. A peer's refusal
    /// before anything reached the client still means a run here, as [`Serve::failed`].
    pub fn refused(&mut self, leg: LegId, error: String) {
        if !self.is_current(leg) {
            return;
        }
        match &self.state {
            State::Forwarding {
                addr,
                streamed: false,
                ..
            } if self.can_fall_back() => {
                let addr = *addr;
                self.forward_fallback(leg, addr, error);
            }
            State::Prefilling { .. } => self.prefill_over(None, Some(error)),
            State::Forwarding { addr, .. } => {
                let message = format!("peer {addr}: {error}");
                self.first_event();
                self.end(End::Failed(message));
            }
            _ => {
                self.first_event();
                self.end(End::Failed(error));
            }
        }
    }

    /// `leg` could not start: no worker is ready for it. A first leg fails as
    /// [`Serve::refused`] does (the client is told at once); a migrating request, or a forward
    /// that fell back to this node where no worker takes it either, asks again every
    /// `Timeouts::migration_retry` until `Timeouts::migration_wait` after the first such
    /// answer, without spending its `migration_limit` (its only worker may be restarting, or
    /// the forward's node may have refused it only for the moment).
    pub fn unavailable(&mut self, leg: LegId, error: String, now: Duration) {
        if !self.is_current(leg) {
            return;
        }
        if self.migrations == 0 {
            // The worker the router named here is not ready (it died since the router last
            // heard): plan again without it. A forward that fell back here, where no worker
            // serves the request either (a node with only a prefill worker), lost nothing:
            // nothing was delivered. It is planned around the forward's worker once, at once
            // (that node may have lost it, and the router may not know yet); when that finds
            // nobody either, it waits below as a migration does, and asks again with the
            // forward's worker allowed (its node may have refused the stream only while busy,
            // and it may be the only worker that can take it). With no plan, the pool's answer
            // is the client's.
            match self.state {
                State::Local {
                    worker: Some(_), ..
                } => return self.failed(leg, error),
                State::Local { worker: None, .. } if self.fell_back => {
                    if let Some(worker) = self.fell_back_from.take() {
                        self.actions.push_back(Action::Close(leg));
                        let mut avoid = self.avoid.clone();
                        avoid.push(worker);
                        return self.replan_avoiding(avoid);
                    }
                }
                _ => return self.refused(leg, error),
            }
        }
        if let Some(worker) = self.leg_worker() {
            self.avoid_worker(worker);
        }
        self.release_all();
        self.actions.push_back(Action::Close(leg));
        let wait = self.timeouts.migration_wait;
        let until = *self.wait_until.get_or_insert(now + wait);
        if now >= until {
            let message = format!("no worker took the request within {wait:?}: {error}");
            return self.end(End::Failed(message));
        }
        self.state = State::Waiting {
            retry_at: (now + self.timeouts.migration_retry).min(until),
        };
    }

    /// The driver's answer to [`Action::Replan`]: the worker the router picked for the rest of
    /// the request (`None`: this node's pool chooses).
    pub fn replanned(&mut self, pick: Option<crate::Pick>, now: Duration) {
        if !matches!(self.state, State::Replanning) {
            if let Some(hold) = pick.and_then(|p| p.hold) {
                self.actions.push_back(Action::Release(hold));
            }
            return;
        }
        let Some(pick) = pick else {
            return self.start_local(None);
        };
        self.held.decode = pick.hold;
        if pick.hold.is_some() {
            self.actions.push_back(Action::Record(match pick.target {
                Target::Local => Record::RoutedLocal,
                Target::Remote { .. } => Record::RoutedRemote,
            }));
        }
        match pick.target {
            Target::Local => self.start_local(Some(pick.worker)),
            Target::Remote { node, addr } => {
                self.start_forward(pick.worker, node, addr, None, now);
            }
        }
    }

    /// Time passed: a leg that missed its deadline fails.
    pub fn handle_timeout(&mut self, now: Duration) {
        match &self.state {
            State::Forwarding {
                leg,
                addr,
                open_by: Some(by),
                ..
            } if now >= *by => {
                let (leg, addr) = (*leg, *addr);
                let error = format!("no answer within {:?}", self.timeouts.forward_start);
                match self.can_fall_back() {
                    true => self.forward_fallback(leg, addr, error),
                    false => self.lost(leg, format!("peer {addr}: {error}")),
                }
            }
            State::Waiting { retry_at } if now >= *retry_at => self.replan(),
            State::Prefilling {
                open_by: Some(by),
                until,
                ..
            } if now >= *by && by <= until => {
                let waited = self.timeouts.prefill_start.min(self.plan.prefill_deadline);
                self.prefill_over(None, Some(format!("no answer within {waited:?}")));
            }
            State::Prefilling { until, .. } if now >= *until => {
                let deadline = self.plan.prefill_deadline;
                let error = format!("the prefill leg took longer than {deadline:?}");
                self.prefill_over(None, Some(error));
            }
            _ => {}
        }
    }

    /// The driver collected the transfer of the prefill leg: `received` contiguous blocks from
    /// block 0. Decides how the request goes on.
    pub fn collected(&mut self, received: usize) {
        let State::Collecting {
            tokens,
            finish,
            error,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return;
        };
        let worker = self.plan.decode.as_ref().map(|d| d.worker);
        let record = |outcome, reason: &Option<String>, blocks| {
            Action::Record(Record::Prefill {
                outcome,
                reason: reason.clone(),
                blocks,
            })
        };
        if tokens.is_empty() {
            self.actions
                .push_back(record(PrefillOutcome::FallbackBeforeFirstToken, &error, 0));
            self.start_local(worker);
            return;
        }
        let stop = End::Finished(FinishReason::Stop);
        // A first token that ended the request: a Stop the prefill node reported (it sends that
        // before its transfer), or a stop token when the leg broke before saying so. (The
        // model's EOS is known to the workers only.)
        if finish.is_some_and(|(reason, _)| reason == FinishReason::Stop) {
            self.actions
                .push_back(record(PrefillOutcome::Remote, &None, 0));
            return self.end(stop);
        }
        let last_stops = tokens
            .last()
            .is_some_and(|t| self.prompt.stop_token_ids.contains(t));
        if finish.is_none() && last_stops {
            self.actions
                .push_back(record(PrefillOutcome::FallbackAfterFirstToken, &error, 0));
            return self.end(stop);
        }
        let generated = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if generated >= self.prompt.max_tokens {
            self.actions
                .push_back(record(PrefillOutcome::Remote, &None, 0));
            return self.end(End::Finished(FinishReason::Length));
        }
        let (outcome, blocks) = match finish {
            // Only what the prefill node saw acknowledged is known complete.
            Some((_, acknowledged)) => {
                let usable = received.min(acknowledged as usize);
                let complete = usable > 0 || self.prompt.full_blocks == 0;
                let outcome = match complete {
                    true => PrefillOutcome::Remote,
                    false => PrefillOutcome::FallbackAfterFirstToken,
                };
                (outcome, usable)
            }
            None => (PrefillOutcome::FallbackAfterFirstToken, received),
        };
        self.actions.push_back(record(outcome, &error, blocks));
        let leg = self.leg(Leg::Decode {
            worker,
            tokens,
            blocks,
            max_tokens: self.prompt.max_tokens - generated,
        });
        self.state = State::Local { leg, worker };
    }

    /// The client went away: every router decision still held is released, nothing more is
    /// started. The driver drops the current leg's stream.
    pub fn abort(&mut self) {
        if !matches!(self.state, State::Done) {
            self.release_all();
            self.state = State::Done;
        }
    }

    fn leg(&mut self, leg: Leg) -> LegId {
        let id = LegId(self.next_leg);
        self.next_leg += 1;
        self.actions.push_back(Action::Start(LegStart { id, leg }));
        id
    }

    /// A leg on this node: the prompt and whatever the client already has.
    fn start_local(&mut self, worker: Option<WorkerId>) {
        let generated = self.delivered.clone();
        let leg = self.leg(Leg::Local { worker, generated });
        self.state = State::Local { leg, worker };
    }

    /// A leg forwarded to `worker` on `node`: the prompt and whatever the client already has.
    fn start_forward(
        &mut self,
        worker: WorkerId,
        node: NodeId,
        addr: SocketAddr,
        prefill: Option<PrefillPick>,
        now: Duration,
    ) {
        let leg = self.leg(Leg::Forward {
            worker,
            node,
            addr,
            prefill,
            prefill_deadline: self.plan.prefill_deadline,
            generated: self.delivered.clone(),
        });
        self.state = State::Forwarding {
            leg,
            addr,
            open_by: Some(now + self.timeouts.forward_start),
            streamed: false,
            worker,
        };
    }

    /// Whether a leg failing now may simply run here instead: nothing reached the client and
    /// nothing was migrated.
    fn can_fall_back(&self) -> bool {
        self.delivered.is_empty() && self.migrations == 0
    }

    /// The worker the current leg runs on, where the machine knows it.
    fn leg_worker(&self) -> Option<WorkerId> {
        match &self.state {
            State::Forwarding { worker, .. } => Some(*worker),
            State::Local { worker, .. } => *worker,
            _ => None,
        }
    }

    fn avoid_worker(&mut self, worker: WorkerId) {
        if !self.avoid.contains(&worker) {
            self.avoid.push(worker);
        }
    }

    /// The current leg was lost: the request ends if the client already has all of it,
    /// migrates if its limit allows, and fails with a message saying so otherwise.
    fn lost(&mut self, leg: LegId, error: String) {
        if let Some(worker) = self.leg_worker() {
            self.avoid_worker(worker);
        }
        self.actions.push_back(Action::Close(leg));
        if self.delivered.len() >= self.prompt.max_tokens as usize {
            return self.end(End::Finished(FinishReason::Length));
        }
        let stopped = self
            .delivered
            .last()
            .is_some_and(|t| self.prompt.stop_token_ids.contains(t));
        if stopped {
            return self.end(End::Finished(FinishReason::Stop));
        }
        let limit = self.plan.migration_limit;
        if limit == 0 {
            self.first_event();
            return self.end(End::Lost(error));
        }
        if self.migrations >= limit {
            self.first_event();
            let message = format!(
                "the request lost its worker {} times, more than this deployment's \
                 migration_limit ({limit}) allows: {error}",
                self.migrations + 1
            );
            return self.end(End::Failed(message));
        }
        self.migrations += 1;
        self.release_all();
        self.actions.push_back(Action::Record(Record::Migrated {
            attempt: self.migrations,
            tokens: self.delivered.len(),
            reason: error,
        }));
        self.replan();
    }

    fn replan(&mut self) {
        self.replan_avoiding(self.avoid.clone());
    }

    fn replan_avoiding(&mut self, avoid: Vec<WorkerId>) {
        self.state = State::Replanning;
        self.actions.push_back(Action::Replan(Replan {
            tokens: self.delivered.clone(),
            avoid,
        }));
    }

    fn is_current(&self, leg: LegId) -> bool {
        match &self.state {
            State::Local { leg: l, .. }
            | State::Forwarding { leg: l, .. }
            | State::Prefilling { leg: l, .. } => *l == leg,
            _ => false,
        }
    }

    /// The request's first event: its prefill is over wherever it ran, so the prefill pick is
    /// released and the decode pick stops counting the prompt as prefill work.
    fn first_event(&mut self) {
        if let Some(prefill) = self.held.prefill.take() {
            self.actions.push_back(Action::Release(prefill));
            if let Some(decode) = self.held.decode {
                self.actions.push_back(Action::PrefillDone(decode));
            }
        }
    }

    fn release_all(&mut self) {
        self.first_event();
        if let Some(decode) = self.held.decode.take() {
            self.actions.push_back(Action::Release(decode));
        }
    }

    fn end(&mut self, end: End) {
        self.release_all();
        self.actions.push_back(Action::End(end));
        self.state = State::Done;
    }

    /// The forwarded request failed before its first token: it runs on a worker of this node
    /// the pool chooses, and the router's picks (for the other node) are released. The
    /// forward's worker is not put on the avoid list: it never had the request (its node may
    /// have refused the stream only while busy), and it may be the only worker that can take
    /// it; should no worker here take the request, it is planned around only once
    /// ([`Serve::unavailable`]).
    fn forward_fallback(&mut self, leg: LegId, addr: SocketAddr, reason: String) {
        if let State::Forwarding { worker, .. } = self.state {
            self.fell_back_from = Some(worker);
        }
        self.fell_back = true;
        self.release_all();
        self.actions.push_back(Action::Close(leg));
        self.actions
            .push_back(Action::Record(Record::ForwardFallback { addr, reason }));
        self.start_local(None);
    }

    fn prefill_over(&mut self, finish: Option<(FinishReason, u32)>, error: Option<String>) {
        let State::Prefilling { leg, tokens, .. } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return;
        };
        self.first_event();
        self.actions.push_back(Action::Close(leg));
        self.actions.push_back(Action::CollectTransfer);
        self.state = State::Collecting {
            tokens,
            finish,
            error,
        };
    }
}
