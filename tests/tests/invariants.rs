//! Workspace invariants from ARCHITECTURE.md that the compiler cannot check.

use std::path::Path;

use kvfleet_tests::deps::Graph;
use kvfleet_tests::modules::ModuleGraph;

/// The pure crates: decision logic that the simulator runs on virtual time, and the metrics
/// plumbing (it only formats what callers hand it).
const PURE: &[&str] = &[
    "kvfleet-proto",
    "kvfleet-kv-router",
    "kvfleet-planner",
    "kvfleet-metrics",
    "kvfleet-serving",
];

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
        "kvfleet-serving",
        "kvfleet-peer",
        "kvfleet-metrics",
        "kvfleet-model",
        "kvfleet-engine-events",
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

/// The crates whose top-level modules must not import each other around a loop (see
/// `kvfleet_tests::modules` for what counts as an import).
const ACYCLIC_MODULES: &[&str] = &["controlplane", "agent"];

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut failures = Vec::new();
    for &krate in ACYCLIC_MODULES {
        let graph = ModuleGraph::from_crate(&workspace.join(krate).join("src"))
            .unwrap_or_else(|e| panic!("reading {krate}/src: {e}"));
        assert!(
            graph.modules().count() > 3,
            "{krate}: found too few top-level modules to check"
        );
        failures.extend(
            graph
                .cycles()
                .iter()
                .map(|cycle| format!("{krate}: {cycle}")),
        );
    }
    assert!(
        failures.is_empty(),
        "import cycles between top-level modules (ARCHITECTURE.md, Invariants: make the \
         dependency point one way, e.g. by moving the shared piece into the lower module):\n  {}",
        failures.join("\n  ")
    );
}
