#!/usr/bin/env bash
# Issue 23's acceptance corpora on SmolLM2-135M, in full: 50 strict json_schema schemas and 20
# tool sets with tool_choice "required" (agent/tests/sdk/corpus.py), every answer checked with
# jsonschema through the official openai SDK. CI runs the first 4 of each (the same test with
# KVFLEET_CORPUS unset); this runs all of them (~5-8 minutes on 2 busy cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_default_model
ensure_pip openai jsonschema
KVFLEET_CORPUS=all cargo nextest run -p kvfleet-agent --test native --no-capture \
    -E 'test(smollm2_outputs_validate_over_the_schema_and_tool_corpora)' 2>&1 |
    grep -E '^(schema|tool set|corpus:|openai SDK)|PASS|FAIL'
