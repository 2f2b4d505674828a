#!/usr/bin/env bash
# kvfleet's native engine and llama.cpp side by side on this machine: the same model files, the
# same thread count, the same prompt lengths, run alternately (kvfleet, llama.cpp, kvfleet, ...)
# in one go, then a table of medians and ratios. Machines shared with other work disturb both
# sides alike when they alternate; absolute figures from different runs do not compare.
#
#   ./scripts/bench-vs-llamacpp.sh                              # SmolLM2 and Gemma 3, 2 threads
#   ./scripts/bench-vs-llamacpp.sh --models smollm2 --rounds 5
#   ./scripts/bench-vs-llamacpp.sh --model /path/to/model.gguf --threads 8
#   KVFLEET_KERNELS=exact ./scripts/bench-vs-llamacpp.sh        # our exact (llama.cpp) arithmetic
#
# Per model and round:
#   kvfleet    `kvfleet bench engine` (the engine's scheduler, executor and sampling): prefill of
#              one 512-token prompt, then decode of 64 tokens after it (batch 1), the same at
#              batch 16, and prefill of one 2,048-token prompt; tokens/s from the executor's
#              measured steps.
#   llama.cpp  its own llama-bench (-p 512,2048; -n 64 -d 512: decode after a 512-token
#              prompt), built once from the llama.cpp that llama-cpp-python 0.3.36 vendors
#              (ensure_llama_server in scripts/lib/common.sh; ~5 minutes the first time).
# Prints each measurement as it comes, then a Markdown table (docs/benchmarks.md keeps them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

threads=2
rounds=3
models=(smollm2 gemma3)
custom=""
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --models) IFS=, read -r -a models <<<"$2"; shift 2 ;;
        --model) custom="$2"; models=(custom); shift 2 ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

model_path() {
    case "$1" in
        smollm2) ensure_default_model; echo "$KVFLEET_SMOLLM2_GGUF" ;;
        gemma3) ensure_gemma3_model; echo "$KVFLEET_GEMMA3_GGUF" ;;
        custom) echo "$custom" ;;
        *) echo "unknown model $1 (smollm2, gemma3, or --model PATH)" >&2; return 2 ;;
    esac
}

ensure_llama_server
log "building kvfleet (release; a few minutes the first time)"
cargo build --release --quiet -p kvfleet
kvfleet=target/release/kvfleet

results="$(mktemp /tmp/kvfleet-bench-vs-llamacpp.XXXXXX)"
trap 'rm -f "$results"' EXIT
export KVFLEET_THREADS="$threads" RAYON_NUM_THREADS="$threads"

# record MODEL SYSTEM METRIC VALUE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; log "$1 $2 $3: $4 tok/s"; }

for name in "${models[@]}"; do
    path="$(model_path "$name")"
    [ -f "$path" ] || { echo "model file $path not found" >&2; exit 1; }
    for round in $(seq 1 "$rounds"); do
        log "$name: round $round of $rounds (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        # kvfleet: prefill 512 + decode at batch 1 and 16, then prefill 2,048.
        "$kvfleet" bench engine --model "$path" --prompt-tokens 512 --decode-tokens 64 \
            --batches 1,16 --json |
            python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    b = r["batch"]
    if b == 1:
        print("prefill512", r["prefill_tok_s"])
    print("decode_b%d" % b, r["decode_tok_s"])
' | while read -r metric value; do record "$name" kvfleet "$metric" "$value"; done
        "$kvfleet" bench engine --model "$path" --prompt-tokens 2048 --decode-tokens 1 \
            --batches 1 --json |
            python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["prefill_tok_s"])' |
            while read -r value; do record "$name" kvfleet prefill2048 "$value"; done
        # llama.cpp: the same measurements with its own benchmark tool.
        "$KVFLEET_LLAMA_BENCH" -m "$path" -t "$threads" -p 512,2048 -n 0 -r 1 -o json 2>/dev/null |
            python3 -c '
import json, sys
for r in json.load(sys.stdin):
    print("prefill%d" % r["n_prompt"], r["avg_ts"])
' | while read -r metric value; do record "$name" llama.cpp "$metric" "$value"; done
        "$KVFLEET_LLAMA_BENCH" -m "$path" -t "$threads" -p 0 -n 64 -d 512 -r 1 -o json 2>/dev/null |
            python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["avg_ts"])' |
            while read -r value; do record "$name" llama.cpp decode_b1 "$value"; done
    done
done

python3 - "$results" "$threads" "$rounds" <<'PY'
import statistics, subprocess, sys
from collections import defaultdict

path, threads, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(list)
for line in open(path):
    model, system, metric, value = line.rstrip("\n").split("\t")
    try:
        runs[(model, system, metric)].append(float(value))
    except ValueError:
        pass

def med(model, system, metric):
    v = runs.get((model, system, metric))
    return statistics.median(v) if v else None

def fmt(x):
    return "n/a" if x is None else f"{x:,.1f}"

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"\n{cpu}, {threads} threads each, median of {rounds} alternating rounds, kvfleet at {commit}\n")
print("| model | measurement | kvfleet tok/s | llama.cpp tok/s | kvfleet / llama.cpp |")
print("| --- | --- | ---: | ---: | ---: |")
labels = [("prefill512", "prefill, 512-token prompt"), ("prefill2048", "prefill, 2,048-token prompt"),
          ("decode_b1", "decode, batch 1 (after 512 tokens)")]
for model in dict.fromkeys(k[0] for k in runs):
    for metric, label in labels:
        ours, theirs = med(model, "kvfleet", metric), med(model, "llama.cpp", metric)
        ratio = f"{ours / theirs:.2f}×" if ours and theirs else "n/a"
        print(f"| {model} | {label} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
    b1, b16 = med(model, "kvfleet", "decode_b1"), med(model, "kvfleet", "decode_b16")
    ratio = f"{b16 / b1:.2f}× our batch 1" if b1 and b16 else "n/a"
    print(f"| {model} | decode, batch 16 (kvfleet only) | {fmt(b16)} | | {ratio} |")
PY
