#!/usr/bin/env bash
# Issue 23's acceptance corpora on SmolLM2-135M, in full: 50 strict json_schema schemas and 20
# tool sets with tool_choice "required" (agent/tests/sdk/corpus.py), every answer checked with
# jsonschema through the official openai SDK. CI runs the first 4 of each (the same test with
# KVFLEET_CORPUS unset); this runs all of them (~5-8 minutes on 2 busy cores).
#   --fleet  the same corpora through a disaggregated two-agent fleet instead (tests/tests/disagg.rs
#            `schemas_and_tool_calls_validate_when_forwarded_and_disaggregated`): every case
#            entering the prefill node (forwarded to the decode node) and the decode node
#            (prefilled on the peer), streamed and not; CI runs the first 2 of each. Needs the
#            test Postgres (started here).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh
ensure_default_model
ensure_pip openai jsonschema
if [ "${1:-}" = --fleet ]; then
    ensure_test_postgres
    KVFLEET_CORPUS=all cargo nextest run -p kvfleet-tests --test disagg --no-capture \
        -E 'test(schemas_and_tool_calls_validate_when_forwarded_and_disaggregated)' 2>&1 |
        grep -E '^(schema|tool set|regex|fleet corpora:)|panicked|PASS|FAIL' -A3
    exit "${PIPESTATUS[0]}"
fi
KVFLEET_CORPUS=all cargo nextest run -p kvfleet-agent --test native --no-capture \
    -E 'test(smollm2_outputs_validate_over_the_schema_and_tool_corpora)' 2>&1 |
    grep -E '^(schema|tool set|corpus:|openai SDK)|PASS|FAIL'
