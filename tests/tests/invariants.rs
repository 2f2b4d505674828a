//! Workspace invariants from ARCHITECTURE.md that the compiler cannot check.

use std::path::Path;

use kvfleet_tests::deps::Graph;

/// The pure crates: decision logic that the simulator runs on virtual time.
const PURE: &[&str] = &["kvfleet-proto", "kvfleet-kv-router", "kvfleet-planner"];

/// Crates that mean IO (a runtime, sockets, a database, a web server, a driver).
const IO: &[&str] = &[
    "tokio",
    "mio",
    "quinn",
    "sqlx",
    "axum",
    "hyper",
    "nvml-wrapper",
    "cudarc",
    "zbus",
];

#[test]
fn pure_crates_do_not_depend_on_io_crates() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let graph = Graph::load(&workspace).expect("reading the dependency graph");
    let mut violations = Vec::new();
    for krate in PURE {
        violations.extend(graph.forbidden_paths(krate, IO));
    }
    assert!(
        violations.is_empty(),
        "pure crates must not reach IO crates (see ARCHITECTURE.md, Invariants):\n  {}",
        violations.join("\n  ")
    );
}

/// Only the `kvfleet` CLI (for `kvfleet sim`) may use the simulator; nothing uses the tests crate.
#[test]
fn nothing_depends_on_sim_or_tests() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let graph = Graph::load(&workspace).expect("reading the dependency graph");
    for krate in [
        "kvfleet-proto",
        "kvfleet-engine",
        "kvfleet-kv-router",
        "kvfleet-planner",
        "kvfleet-peer",
        "kvfleet-model",
        "kvfleet-agent",
        "kvfleet-controlplane",
    ] {
        let paths = graph.forbidden_paths(krate, &["kvfleet-sim", "kvfleet-tests"]);
        assert!(
            paths.is_empty(),
            "{krate} depends on a test-only crate: {paths:?}"
        );
    }
}
