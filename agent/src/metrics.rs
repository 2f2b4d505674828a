//! The agent's metrics: one registry that every module registers into while the agent is built
//! (the frontend serves it on `/metrics` without knowing who registered what). The plumbing —
//! registry, scrape-time collectors, latency histograms, encoding — is `kvfleet-metrics`,
//! shared with the control plane; it is re-exported here so modules name it `crate::metrics`.

pub use kvfleet_metrics::*;
