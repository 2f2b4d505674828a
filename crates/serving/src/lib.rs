//! How one request is served: on this node's workers, forwarded to the node of the worker the
//! fleet router picked, or split into a prefill leg (on a prefill worker, usually elsewhere)
//! and a decode leg (here) with the prompt's KV blocks moving in between.
//!
//! The core is pure, in the style of `quinn-proto`: a [`Plan`] (what the router decided) becomes
//! a [`Serve`] state machine that is told what happened ([`Serve::opened`], [`Serve::tokens`],
//! [`Serve::finished`], [`Serve::failed`], [`Serve::collected`], [`Serve::handle_timeout`], with
//! the time passed in) and says what to do next ([`Serve::poll_action`]: start or close a leg,
//! collect the transferred blocks, release a router pick, record an outcome, end the request)
//! and when to wake it ([`Serve::poll_timeout`]). It opens no stream, reads no clock and spawns
//! nothing; the agent's `serving` module drives it with the worker pool and the peer transport,
//! and unit tests drive it with nothing at all.
//!
//! ```text
//!   Plan ──start──▶ Local leg ─────────────────────────────────────▶ End
//!               └─▶ Forward leg ──(fails before its first token)──▶ Local leg ▶ End
//!               └─▶ Prefill leg ──(first token, finish, failure or deadline)──▶ CollectTransfer
//!                                   ──collected(blocks)──▶ Decode leg (or Local leg) ▶ End
//!
//!   any Local, Forward or Decode leg ──(lost: worker exit, broken stream, drain deadline)──▶
//!       Replan(prompt + tokens delivered) ──replanned(pick)──▶ Local or Forward leg that
//!       resumes after the delivered tokens ▶ … (at most `migration_limit` times)
//! ```
//!
//! Migration: a leg that is *lost* ([`Serve::failed`]: its worker exited, its stream or peer
//! broke, it missed its drain deadline) does not end the request while the plan's
//! `migration_limit` allows another try: the machine closes it and asks the driver to plan the
//! request again ([`Action::Replan`], with the tokens the client already has); the next leg
//! re-submits the prompt followed by those tokens (`SamplingParams::generated_in_prompt` says how
//! many), asking only for the tokens still missing, so the client's stream goes on with nothing
//! repeated or missing and `usage` counts each token once. A leg that cannot start because no
//! worker is ready ([`Serve::unavailable`]) is tried again every `Timeouts::migration_retry`
//! for up to `Timeouts::migration_wait`, without spending the limit; so is a forward that failed
//! before its first token and fell back to this node when no worker here takes it either: it is
//! planned around the forward's worker once, and then that worker, which lost nothing, is asked
//! again (its node may have refused the stream only while busy). A request the worker
//! refused or failed on its own ([`Serve::refused`]: invalid for the engine, a model error) ends:
//! trying it elsewhere would fail the same way.
//!
//! The router decisions a request holds are released by the machine, never by hand: the
//! prefill pick at the request's first event (its prefill is over, wherever it ran), the decode
//! pick when the request ends — finished, failed, fallen back to a worker the router did not
//! choose, or [`Serve::abort`]ed because the client went away.
//!
//! Every timer value comes from [`Timeouts`] and the plan's deadline; see the agent's
//! ARCHITECTURE.md entry for the values it uses.

mod machine;
#[cfg(test)]
mod tests;

pub use machine::{Action, End, Leg, LegId, LegStart, PrefillOutcome, Record, Replan, Serve};

use std::net::SocketAddr;
use std::time::Duration;

use kvfleet_kv_router::RequestId;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::{NodeId, WorkerId};

/// Where a picked worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// On this node.
    Local,
    /// On another node, reached through its peer endpoint at `addr`.
    Remote {
        /// The node.
        node: NodeId,
        /// Its peer endpoint.
        addr: SocketAddr,
    },
}

/// One worker the router picked for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The worker.
    pub worker: WorkerId,
    /// Its role.
    pub role: WorkerRole,
    /// Where it runs.
    pub target: Target,
    /// The router decision this request holds on it, released by the machine; `None` when the
    /// request holds none here (a leg another node planned).
    pub hold: Option<RequestId>,
}

/// The prefill worker of a disaggregated request, as the decode side reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillPick {
    /// The prefill worker.
    pub worker: WorkerId,
    /// Its node (this one for a local prefill worker).
    pub node: NodeId,
    /// Its node's peer endpoint, `host:port` as the fleet directory names it.
    pub addr: String,
    /// The router decision this request holds on it, if it holds one here.
    pub hold: Option<RequestId>,
}

/// What the request is, as far as serving it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Tokens the client may receive, at most (`max_tokens`).
    pub max_tokens: u32,
    /// Tokens that end the generation.
    pub stop_token_ids: Vec<u32>,
    /// Full KV blocks of the prompt (what a prefill leg can move).
    pub full_blocks: usize,
}

/// Where a request runs: the router's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The worker that generates the tokens; `None`: no plan, this node's pool chooses.
    pub decode: Option<Pick>,
    /// Disaggregated: the worker that prefills the prompt first.
    pub prefill: Option<PrefillPick>,
    /// How long the prefill leg may take, transfer included.
    pub prefill_deadline: Duration,
    /// Router decisions made for the request that it will not use (released at the start).
    pub unused: Vec<RequestId>,
    /// How many times a lost leg may be resumed elsewhere (the deployment's
    /// `migration_limit`); 0 turns migration off and a lost leg ends with [`End::Lost`].
    pub migration_limit: u32,
}

pub use kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT;

impl Plan {
    /// No plan: this node's pool chooses the worker.
    pub fn local() -> Self {
        Self {
            decode: None,
            prefill: None,
            prefill_deadline: Duration::ZERO,
            unused: Vec::new(),
            migration_limit: DEFAULT_MIGRATION_LIMIT,
        }
    }
}

/// The timers of a request's legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a forwarded request may take to reach the peer (connect and open the stream)
    /// before it runs on this node instead: a peer that is gone would otherwise leave QUIC
    /// waiting for its idle timeout.
    pub forward_start: Duration,
    /// How long the prefill leg may take to reach the prefill node (capped by the deadline).
    pub prefill_start: Duration,
    /// How long a migrating request waits for a worker to take it (the only one may be
    /// restarting) before it fails. A minute: a GPU engine's restart (loading its weights
    /// again) can take that long.
    pub migration_wait: Duration,
    /// How often a migrating request that found no ready worker asks again.
    pub migration_retry: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            forward_start: Duration::from_secs(2),
            prefill_start: Duration::from_secs(2),
            migration_wait: Duration::from_secs(60),
            migration_retry: Duration::from_millis(200),
        }
    }
}
