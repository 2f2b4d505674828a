//! The kvfleet node agent as a library; `main.rs` stays thin.
//!
//! Filled by the agent issue: GPU inventory, supervised worker processes, the OpenAI frontend,
//! systemd and D-Bus integration; later the peer transport and the control-plane client.
//! Nothing is implemented yet.
