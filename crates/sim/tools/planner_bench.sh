#!/usr/bin/env bash
# The SLA planner's figures in docs/benchmarks.md: the planner, Dynamo's algorithm with every
# predictor, and the static fleet sized for the peak, on a 24 h diurnal curve and on a flat
# load with a 4x spike, each with workers 30% slower and 30% faster than their profile.
#
#   crates/sim/tools/planner_bench.sh [OUT_DIR]     (default /tmp/planner-bench)
#
# Needs the release simulator: cargo build --release -p kvfleet-sim --example sim
set -euo pipefail
out=${1:-/tmp/planner-bench}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../../.." && pwd)
sim=${SIM:-$root/target/release/examples/sim}
trace=${TRACE:-$root/../shared/traces/synthetic_trace.jsonl}
run() {
    local name=$1 curve=$2 duration=$3 error=$4
    echo "== $name: $curve over $duration, speed error $error" >&2
    "$sim" --trace "$trace" --curve "$curve" --duration "$duration" --warmup 10m \
        --planner kvfleet,dynamo/all,static-peak --speed-error "$error" \
        --jobs "${JOBS:-1}" --timeline "$out/$name.svg" --json > "$out/$name.json"
    "$sim" --trace "$trace" --curve "$curve" --duration "$duration" --predictor-errors \
        > "$out/$name.predictors.md"
}
run diurnal-slow 'diurnal:mean=6,peak-ratio=2.5,period=24h,peak-at=12h' 24h +30%
run diurnal-fast 'diurnal:mean=6,peak-ratio=2.5,period=24h,peak-at=12h' 24h -30%
run spike-slow 'spike:rate=4,factor=4,at=40m,for=2m' 90m +30%
run spike-fast 'spike:rate=4,factor=4,at=40m,for=2m' 90m -30%
echo "results in $out" >&2
