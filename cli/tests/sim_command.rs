//! `kvfleet sim` end to end: the real binary replays the shared Mooncake trace.

use std::path::PathBuf;
use std::process::Command;

fn trace() -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/synthetic_trace.jsonl");
    path.exists().then_some(path)
}

#[test]
fn sim_compares_routing_modes_on_the_shared_trace() {
    let Some(trace) = trace() else {
        eprintln!("skipped: ../shared/traces/synthetic_trace.jsonl is absent");
        return;
    };
    let output = Command::new(env!("CARGO_BIN_EXE_kvfleet"))
        .args([
            "sim",
            "--workers",
            "4",
            "--limit",
            "600",
            "--mode",
            "all",
            "--json",
        ])
        .arg("--trace")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kvfleet sim failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let hit_rate = |mode: &str| {
        runs.iter()
            .find(|run| run["mode"] == mode)
            .unwrap_or_else(|| panic!("no {mode} run in {report}"))["prefix_hit_rate"]
            .as_f64()
            .unwrap()
    };
    for mode in ["round-robin", "random", "least-loaded"] {
        assert!(
            hit_rate("kv") > hit_rate(mode),
            "kv routing should reuse more prefix than {mode}: {} vs {}",
            hit_rate("kv"),
            hit_rate(mode)
        );
    }
    for run in runs {
        assert_eq!(run["requests"], 600);
        let done = run["completed"].as_u64().unwrap() + run["rejected"].as_u64().unwrap();
        assert_eq!(
            done, 600,
            "every request is accounted for in {}",
            run["mode"]
        );
    }
}

#[test]
fn sim_rejects_a_missing_trace_with_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_kvfleet"))
        .args(["sim", "--trace", "/nonexistent/trace.jsonl"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/trace.jsonl"), "{stderr}");
}
