#!/usr/bin/env bash
# Runs the whole kvfleet test suite. For a fresh Debian 12 machine with Rust, run as root:
# installs what is missing (PostgreSQL), starts a throwaway test cluster, runs every test.
# Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

ensure_test_postgres
ensure_default_model
ensure_gemma3_model
ensure_pip openai

log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final
    # nextest does not run doctests; they hold the documented known-answer vectors.
    cargo test --workspace --doc --quiet
else
    cargo test --workspace --no-fail-fast
fi

# The packages (issue 9): .deb/.rpm from the debug binaries above, installed, upgraded and purged
# in a clean Debian 12 root. Needs root; skips with the reason otherwise.
log "package install test"
bash packaging/test-install.sh
