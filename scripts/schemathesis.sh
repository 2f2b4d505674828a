#!/usr/bin/env bash
# Runs schemathesis (PyPI) against the control plane's own OpenAPI document: a throwaway control
# plane on its own database in the test Postgres, an admin token, all four phases (examples,
# coverage, fuzzing, stateful) and every default check. Fails on any server error or any
# conformance failure (undocumented status code or content type, a body that does not match its
# schema, a deleted resource that comes back, ...).
#
#   scripts/schemathesis.sh          # CI's bounded form (scripts/test.sh): 10 examples per
#                                    # operation, stateful capped; ~2 minutes on 2 cores
#   scripts/schemathesis.sh --full   # 100 examples per operation, stateful until it is done
#
# Extra arguments after the mode go to `st run` (e.g. --include-path-regex /nodes).
# Reports (JUnit, NDJSON) land in target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

mode=fast
if [ "${1:-}" = "--full" ]; then
    mode=full
    shift
fi

ensure_test_postgres
ensure_schemathesis

log "building kvfleet-controlplane (debug)"
cargo build -p kvfleet-controlplane --bin kvfleet-controlplane --quiet
cp_bin=target/debug/kvfleet-controlplane

# A database of its own, dropped afterwards: the fuzzer creates and deletes freely.
db="kvfleet_schemathesis_$$"
admin_url="${DATABASE_URL%/*}/postgres"
db_url="${DATABASE_URL%/*}/$db"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
work="$(mktemp -d /var/tmp/kvfleet-schemathesis.XXXXXX)"
cp_pid=""
cleanup() {
    if [ -n "$cp_pid" ]; then
        kill "$cp_pid" 2>/dev/null || true
        wait "$cp_pid" 2>/dev/null || true
    fi
    "$(pg_bindir)/psql" -q "$admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
"$(pg_bindir)/psql" -q "$admin_url" -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db" >/dev/null

"$cp_bin" migrate --database-url "$db_url" >"$work/migrate.log" 2>&1 \
    || { cat "$work/migrate.log" >&2; exit 1; }
token="$("$cp_bin" token create --database-url "$db_url" --role admin --name schemathesis 2>/dev/null)"
"$cp_bin" serve --database-url "$db_url" --listen "127.0.0.1:$port" \
    --set auth.bootstrap_token_file="$work/bootstrap-token" \
    --set ca.key_file="$work/ca.key" >"$work/controlplane.log" 2>&1 &
cp_pid=$!
base="http://127.0.0.1:$port/api/v1"
for _ in $(seq 1 100); do
    curl -fsS "$base/status" >/dev/null 2>&1 && break
    kill -0 "$cp_pid" 2>/dev/null || { cat "$work/controlplane.log" >&2; exit 1; }
    sleep 0.2
done

# An agent credential for the agent protocol's routes: a node registered with a join token
# (the admin token is refused there with 403, which would leave those routes untested).
register() {
    local join
    join="$("$cp_bin" token create --database-url "$db_url" --role join --name "schemathesis-$1" 2>/dev/null)"
    curl -fsS -X POST "$base/agent/register" -H "Authorization: Bearer $join" \
        -H 'Content-Type: application/json' \
        -d "{\"hostname\": \"$1\", \"addresses\": [\"127.0.0.1\"], \"gpus\": []}"
}
json_field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
agent="$(register schemathesis-node | json_field '["credential"]')"
# What the two destructive routes act on: a spare node and a spare token. Left to the fuzzer they
# would sooner or later remove the agent's own node or revoke the admin token this run uses
# (after creating a second admin), and every later request would be a 401.
spare_node="$(register schemathesis-spare | json_field '["node_id"]')"
spare_token="$(curl -fsS -X POST "$base/tokens" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d '{"name": "schemathesis-spare", "role": "viewer"}' \
    | json_field '["token"]["id"]')"
export KVFLEET_ST_ADMIN="$token" KVFLEET_ST_AGENT="$agent"
export KVFLEET_ST_SPARE_NODE="$spare_node" KVFLEET_ST_SPARE_TOKEN="$spare_token"
# positive_data_acceptance (a request the schema allows must not get a 4xx other than 401, 403,
# 404, 409) is off where the server checks more than a JSON schema can say: the JSON bodies
# (an integer sent as 880.0, a hostname that is not a DNS name, a profile that is not monotone,
# a deployment naming no model, a budget below the deployments' minimums) and the metrics
# windows (since before until, at most 10,000 buckets). Each such refusal is a documented 422.
cat >"$work/schemathesis.toml" <<'TOML'
headers = { Authorization = "Bearer ${KVFLEET_ST_ADMIN}" }

[[operations]]
include-path-regex = "^/api/v1/agent/"
headers = { Authorization = "Bearer ${KVFLEET_ST_AGENT}" }
# The long polls answer at once: a fuzzed wait (up to the documented 3600 s, capped at 30 s by
# the server) would outlast the request timeout. The waits are tested in controlplane/tests.
parameters = { "query.wait_s" = 0 }
checks = { positive_data_acceptance = { enabled = false } }

[[operations]]
include-name = "DELETE /api/v1/nodes/{id}"
parameters = { "path.id" = "${KVFLEET_ST_SPARE_NODE}" }

[[operations]]
include-name = "DELETE /api/v1/tokens/{id}"
parameters = { "path.id" = "${KVFLEET_ST_SPARE_TOKEN}" }

# A removed node stays readable as a tombstone (`state: removed`; the web UI's node page shows
# it), which use_after_free reports as a deleted resource still available. Whether removed
# nodes should 404 instead is open (issue 22's closing note); until decided, not checked here.
[[operations]]
include-name = "GET /api/v1/nodes/{id}"
checks = { use_after_free = { enabled = false } }

[[operations]]
include-method-regex = "^(POST|PATCH)$"
checks = { positive_data_acceptance = { enabled = false } }

[[operations]]
include-path-regex = '/(metrics/(workers|deployments)/\{id\}|deployments/\{id\}/planner)$'
checks = { positive_data_acceptance = { enabled = false } }
TOML

case "$mode" in
    fast) limits=(--max-examples 10 --max-time 150) ;;
    full) limits=(--max-examples 100) ;;
esac

mkdir -p target/schemathesis
log "schemathesis ($mode) against $base/openapi.json"
status=0
# One worker: with two threads, CPython 3.11's ast.parse (inside hypothesis) once crashed with
# "AST constructor recursion depth mismatch", an internal error that failed a CI run.
"$SCHEMATHESIS" --config-file "$work/schemathesis.toml" run "$base/openapi.json" \
    --phases examples,coverage,fuzzing,stateful \
    --workers 1 \
    --seed 22 \
    --suppress-health-check all \
    --report junit,ndjson --report-dir target/schemathesis \
    "${limits[@]}" "$@" || status=$?
if [ "$status" -ne 0 ]; then
    log "control plane log (last 40 lines):"
    tail -n 40 "$work/controlplane.log" >&2
fi
exit "$status"
