//! The fleet simulator: replays request traces on mock-engine workers, the router and the
//! planner in virtual time. Filled by the KV-routing issue; nothing is implemented yet.
