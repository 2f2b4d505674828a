#!/usr/bin/env bash
# kvfleet's KV index against Dynamo's (`dynamo-kv-router` from crates.io), side by side on one
# event stream generated from a Mooncake-format trace. See scripts/dynamo-index-bench/src/main.rs
# for what is measured. Each index runs in its own process (so its memory figure is its own),
# alternating, ROUNDS times per scenario; compare rows of one run only.
#
#   scripts/bench-dynamo-index.sh [ROUNDS] [TRACE]
#
# Needs the crates.io registry once (to fetch dynamo-kv-router); builds outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
TRACE=${2:-../shared/traces/synthetic_trace.jsonl}
export CARGO_TARGET_DIR=${KVFLEET_BENCH_TARGET:-/var/cache/kvfleet-bench/dynamo-index}
cargo build --release --quiet --manifest-path scripts/dynamo-index-bench/Cargo.toml
BIN="$CARGO_TARGET_DIR/release/dynamo-index-bench"
scenario() {
    echo "### $*"
    "$BIN" "$TRACE" "$@" --only kvfleet | grep '^trace'
    echo "| round | index | events/s (drained) | blocks/s | errors | find-matches p50 | p99 | mean | RSS growth |"
    echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for round in $(seq 1 "$ROUNDS"); do
        for index in kvfleet dynamo-radix dynamo-flash; do
            "$BIN" "$TRACE" "$@" --only "$index" | grep '^| [kD]' | sed "s/^|/| $round |/"
        done
    done
    # One process with all three, for the answers cross-check (0 means identical matches).
    "$BIN" "$TRACE" "$@" | grep '^lookups'
    echo
}
scenario --workers 32 --copies 4 --route affinity
scenario --workers 32 --copies 1 --route round-robin
scenario --workers 256 --copies 1 --route round-robin --capacity 8192
