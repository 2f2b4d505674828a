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
# llama.cpp's llama-server (built once, cached outside the clone): the `llamacpp` engine's
# acceptance test (tests/tests/fleet_routing.rs) runs two of them as kvfleet workers.
ensure_llama_server
# jsonschema: the SDK tool and structured-output checks validate every answer against its schema.
ensure_pip openai jsonschema
# tests/tests/observability.rs scrapes a test fleet with a real Prometheus and runs promtool;
# here a missing Prometheus is a failure, not a skip.
apt_install prometheus
export KVFLEET_REQUIRE_PROMETHEUS=1
# promtool checks the agent's /metrics exposition (agent tests).
apt_install prometheus

# The web UI's browser tests: headless Chromium (Debian's package) driven by playwright-core
# from npm (no browser download), against the control-plane binary this run builds.
apt_install chromium
command -v node >/dev/null || apt_install nodejs
command -v npm >/dev/null || apt_install npm
if [ ! -f web-ui/node_modules/playwright-core/package.json ]; then
    log "installing the web UI test dependencies (npm ci)"
    (cd web-ui && npm ci --no-audit --no-fund --silent)
fi

log "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final
    # nextest does not run doctests; they hold the documented known-answer vectors.
    cargo test --workspace --doc --quiet
else
    cargo test --workspace --no-fail-fast
fi

# schemathesis against the control plane's own OpenAPI document (issue 22): all phases, stateful
# included, on a throwaway database; bounded to ~3 minutes here (`--full` for the long run).
log "schemathesis against the control plane's OpenAPI document"
bash scripts/schemathesis.sh

# The packages (issue 9): .deb/.rpm from the debug binaries above, installed, upgraded and purged
# in a clean Debian 12 root. Needs root; skips with the reason otherwise.
log "package install test"
bash packaging/test-install.sh

log "running the web UI browser tests (screenshots in target/webui-artifacts/)"
cargo build -p kvfleet-controlplane --bin kvfleet-controlplane --quiet
cargo build -p kvfleet-agent --bin kvfleet-agent --quiet
# Required here: a missing prerequisite fails the run instead of skipping the browser tests.
(cd web-ui && KVFLEET_WEBUI_REQUIRE=1 node --test tests/)
