#!/usr/bin/env bash
# The cost of grammar-constrained decoding (structured output, tool calls) on SmolLM2-135M:
# `kvfleet bench engine` decode tok/s without a constraint and with a JSON Schema whose shortest
# value is longer than the decoded tokens (so every measured step is masked), alternately, for
# --rounds rounds; prints each run's table. Figures: docs/benchmarks.md.
#   ./scripts/bench-constrained.sh [--rounds N] [--release] [--compare BIN]
# --compare BIN also runs another build of kvfleet (say, one from before a change) in each round,
# right after this one, so both see the same machine load.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_default_model
rounds=3
profile=dev
compare=
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --release) profile=release; shift ;;
        --compare) compare="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ "$profile" = release ]; then
    cargo build --release --quiet -p kvfleet
    bin=target/release/kvfleet
else
    cargo build --quiet -p kvfleet
    bin=target/debug/kvfleet
fi
schema="$(mktemp --suffix=.json)"
trap 'rm -f "$schema"' EXIT
cat >"$schema" <<'JSON'
{"type": "array", "minItems": 200, "items": {"type": "object",
 "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
  "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
 "required": ["name", "age", "tags"], "additionalProperties": false}}
JSON
args=(bench engine -m "$KVFLEET_SMOLLM2_GGUF" --prompt-tokens 128 --decode-tokens 128 --batches 1,8)
for round in $(seq 1 "$rounds"); do
    for b in "$bin" ${compare:+"$compare"}; do
        log "round $round ($b): unconstrained"
        "$b" "${args[@]}"
        log "round $round ($b): constrained by a JSON Schema"
        "$b" "${args[@]}" --json-schema "$schema"
    done
done
