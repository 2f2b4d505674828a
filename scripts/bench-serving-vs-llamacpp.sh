#!/usr/bin/env bash
# kvfleet-agent (HTTP, SSE, scheduler and all, one native CPU worker) and llama.cpp's own
# llama-server side by side: the same model file, the same threads, llama-server with 8 slots;
# 1 and 8 concurrent streams of 128-token prompts and 32-token answers, TTFT, ITL and output
# tokens/s. The two servers run alternately (one at a time, never together), round after round.
#
#   ./scripts/bench-serving-vs-llamacpp.sh                         # SmolLM2, 2 threads, 2 rounds
#   ./scripts/bench-serving-vs-llamacpp.sh --model gemma3 --rounds 3
#   ./scripts/bench-serving-vs-llamacpp.sh --model /path/to/model.gguf --threads 8
#
# The client (scripts/lib/serving_bench.py) streams /v1/completions with token-id prompts,
# distinct per request (no prefix cache helps either side), `ignore_eos` so every answer is
# exactly 32 tokens. llama-server is built once from the llama.cpp that llama-cpp-python 0.3.36
# vendors (ensure_llama_server, ~5 minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

threads=2
rounds=2
slots=8
model=smollm2
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$model" in
    smollm2) ensure_default_model; path="$KVFLEET_SMOLLM2_GGUF" ;;
    gemma3) ensure_gemma3_model; path="$KVFLEET_GEMMA3_GGUF" ;;
    *) path="$model" ;;
esac
[ -f "$path" ] || { echo "model file $path not found" >&2; exit 1; }

ensure_llama_server
log "building kvfleet-agent (release; a few minutes the first time)"
cargo build --release --quiet -p kvfleet-agent

work="$(mktemp -d /tmp/kvfleet-serving-bench.XXXXXX)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready URL PATH: until GET URL/PATH answers 200 (at most 3 minutes).
wait_ready() {
    for _ in $(seq 1 1800); do
        if python3 -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('$1$2', timeout=2).status == 200 else 1)" 2>/dev/null; then
            return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || { echo "the server exited; its log:" >&2; tail -n 30 "$work/server.log" >&2; return 1; }
        sleep 0.1
    done
    echo "the server did not become ready" >&2
    return 1
}

start_kvfleet() {
    local port="$1"
    cat >"$work/agent.toml" <<EOF
[frontend]
listen = "127.0.0.1:$port"
[log]
level = "warn"
[supervisor]
socket_dir = "$work"
[[models]]
name = "bench"
engine = "native"
path = "$path"
kv_memory = "512MiB"
[[workers]]
model = "bench"
device = "cpu"
EOF
    KVFLEET_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
        target/release/kvfleet-agent --config "$work/agent.toml" >"$work/server.log" 2>&1 &
    server_pid=$!
    wait_ready "http://127.0.0.1:$port" /ready
}

start_llama() {
    local port="$1"
    "$KVFLEET_LLAMA_SERVER" -m "$path" -t "$threads" -tb "$threads" -np "$slots" \
        -c $((slots * 512)) --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
    server_pid=$!
    wait_ready "http://127.0.0.1:$port" /health
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

results="$work/results.jsonl"
for round in $(seq 1 "$rounds"); do
    for system in kvfleet llama.cpp; do
        port="$(free_port)"
        log "round $round/$rounds: $system on :$port (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        if [ "$system" = kvfleet ]; then start_kvfleet "$port"; else start_llama "$port"; fi
        # A warm-up request, then 1 stream (8 requests) and 8 streams (32 requests).
        python3 scripts/lib/serving_bench.py --url "http://127.0.0.1:$port" --model bench \
            --streams 1 --requests 1 --vocab-from "$path" --seed 99 >/dev/null
        for streams in 1 8; do
            python3 scripts/lib/serving_bench.py --url "http://127.0.0.1:$port" --model bench \
                --streams "$streams" --requests $((streams == 1 ? 8 : 32)) --prompt-tokens 128 \
                --max-tokens 32 --vocab-from "$path" --seed "$round$streams" |
                python3 -c "import json, sys; r = json.load(sys.stdin); r['system'] = '$system'; print(json.dumps(r))" |
                tee -a "$results" >&2
        done
        stop_server
    done
done

python3 - "$results" "$threads" "$rounds" "$path" <<'PY'
import json, statistics, sys
from collections import defaultdict

path, threads, rounds, model = sys.argv[1:5]
runs = defaultdict(list)
for line in open(path):
    r = json.loads(line)
    runs[(r["system"], r["streams"])].append(r)

def med(system, streams, key):
    v = [r[key] for r in runs[(system, streams)] if r.get(key) is not None]
    return statistics.median(v) if v else None

print(f"\n{model}: {threads} threads each, llama-server -np 8, median of {rounds} alternating rounds\n")
print("| streams | server | TTFT p50 (ms) | TTFT p90 (ms) | ITL p50 (ms) | ITL p90 (ms) | output tok/s |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for streams in (1, 8):
    for system in ("kvfleet", "llama.cpp"):
        cells = [med(system, streams, k) for k in ("ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "itl_ms_p90", "output_tok_s")]
        print(f"| {streams} | {system} | " + " | ".join("n/a" if c is None else f"{c:,.1f}" for c in cells) + " |")
    ours, theirs = med("kvfleet", streams, "output_tok_s"), med("llama.cpp", streams, "output_tok_s")
    if ours and theirs:
        print(f"| {streams} | kvfleet / llama.cpp | | | | | {ours / theirs:.2f}× |")
PY
