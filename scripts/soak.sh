#!/usr/bin/env bash
# The soak: N minutes of streaming chat completions at saturation on three agents (a control
# plane, Postgres, one mock worker per agent, requests forwarded over QUIC), a worker killed -9
# at random every ~20 s. Prints requests, errors by kind (429s apart), E2E latency percentiles
# (all requests, and those in flight at a kill: what a migration costs), migrations, and the
# RSS of every process each minute (docs/benchmarks.md, "Soak").
#
#   scripts/soak.sh [--minutes 5] [--clients-per-agent 4] [--fault-every-s 20]
#                   [--max-tokens 60] [--seed 21]
#
# Built with the dev profile (the agents are the same code as in the e2e tests). Not a CI test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_test_postgres
exec cargo bench --profile dev -p kvfleet-tests --bench soak -- "$@"
