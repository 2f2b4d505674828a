#!/usr/bin/env bash
# kvfleet on a real GPU with vLLM workers, end to end (issue #24). Not run by CI (CI has no GPU):
# run it on a machine with an NVIDIA GPU, its driver, and vLLM (>= 0.10.2) installed.
#
#   KVFLEET_VLLM_MODEL=/models/Qwen2.5-0.5B-Instruct scripts/gpu-e2e.sh
#
# It starts a test PostgreSQL if DATABASE_URL is unset, then runs the `vllm` end-to-end test
# (tests/tests/fleet_routing.rs, a_vllm_worker_on_a_gpu_serves_routes_from_its_events_and_constrains):
# a control plane and an agent whose deployment runs one `vllm` worker on a GPU that NVML
# reports, with vLLM's KV event stream on. It checks that requests are served, that the prompt's
# blocks reach the fleet router from vLLM's own events, that a JSON schema and a regex constrain
# the output, and prints TTFT / ITL / output tokens per second at 1 and 16 streams: paste that
# table into docs/engines.md ("vLLM and SGLang") with the GPU, the model and the vLLM version.
#
# Environment:
#   KVFLEET_VLLM_MODEL    a Hugging Face model directory (its tokenizer and chat template are
#                         read by the agent too); required
#   KVFLEET_VLLM_COMMAND  the vllm executable (default: `vllm` on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
die() { printf 'gpu-e2e: %s\n' "$*" >&2; exit 1; }

: "${KVFLEET_VLLM_MODEL:?set KVFLEET_VLLM_MODEL to a Hugging Face model directory}"
[ -d "$KVFLEET_VLLM_MODEL" ] || die "KVFLEET_VLLM_MODEL=$KVFLEET_VLLM_MODEL is not a directory"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
VLLM=${KVFLEET_VLLM_COMMAND:-vllm}
command -v "$VLLM" >/dev/null || die "$VLLM not found (pip install 'vllm>=0.10.2', or set KVFLEET_VLLM_COMMAND)"
log "vLLM $("$VLLM" --version 2>/dev/null | tail -1)"
export KVFLEET_VLLM_MODEL KVFLEET_VLLM_COMMAND="$VLLM"
if [ -z "${DATABASE_URL:-}" ]; then
    ensure_test_postgres
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
cargo nextest run -p kvfleet-tests --test fleet_routing --no-capture --run-ignored all \
    -E 'test(a_vllm_worker_on_a_gpu_serves_routes_from_its_events_and_constrains)'
