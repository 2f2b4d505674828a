//! The JSON bodies of `/api/v1`. They live in [`kvfleet_proto::api`] (shared with the agent and
//! the `kvfleet` CLI); this module re-exports them so the control plane names them in one place.
//! The store converts their text enums at its edge (`.bind(x.as_str())`, rows decoded in
//! [`crate::rows`]).

pub use kvfleet_proto::api::*;
