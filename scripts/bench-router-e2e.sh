#!/usr/bin/env bash
# The fleet router end to end: the first 500 requests of the Mooncake synthetic trace replayed
# against three real agents (a control plane, Postgres, two mock workers per agent, requests
# forwarded between agents over QUIC), once with `kv` and once with `kv-blocks`, TTFT measured
# by the client. Prints a Markdown table (docs/benchmarks.md, "The router end to end").
#
#   scripts/bench-router-e2e.sh [FLAGS]
#
# Flags go to the replay (tests/benches/router_replay.rs): --requests N (500), --modes A,B
# (kv,kv-blocks), --load X (2: each worker at twice the per-worker rate of the simulator's
# 8-worker fleet at 1x), --block-tokens N (32 tokens per 512-token trace block),
# --workers-per-agent N (2), --max-tokens N (cap the trace's output lengths),
# --trace FILE (default ../shared/traces/synthetic_trace.jsonl next to the repository).
# Built with the dev profile (the agents are the same code as in the e2e tests); about
# 2 minutes of replay per mode on the default flags, plus the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_test_postgres
trace=../shared/traces/synthetic_trace.jsonl
for arg in "$@"; do [ "$arg" = --trace ] && trace=; done
extra=()
[ -n "$trace" ] && extra=(--trace "$(realpath "$trace")")
exec cargo bench --profile dev -p kvfleet-tests --bench router_replay -- "${extra[@]}" "$@"
