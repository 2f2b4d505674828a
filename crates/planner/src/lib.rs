//! The SLA planner: from fleet metrics and per-model performance profiles, how many prefill and
//! decode workers each deployment needs to meet its TTFT and ITL targets at the fewest GPUs.
//!
//! Pure logic: `plan(state, policy, now) -> decisions`; no IO. Nothing is implemented yet.
