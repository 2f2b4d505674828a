"""Issue 23's corpora through a disaggregated fleet, driven by the official `openai` Python SDK.

Usage: python3 fleet_corpora.py FORWARDED_URL LOCAL_URL MODEL [--corpus N]
  FORWARDED_URL is the prefill node's frontend: its requests are forwarded to the decode node (a
  peer agent), which has the prompt prefilled back on the prefill node. LOCAL_URL is the decode
  node's frontend: its requests are prefilled on the peer and decoded here after the hand-off.
  Either way the constraint must be applied by whichever node samples each token: the prefill
  node samples the first, the decode node the rest.

Sends the first N (default 2; "all": every one) strict json_schema schemas and N tool sets with
tool_choice "required" of agent/tests/sdk/corpus.py, plus a guided_regex that no model writes
unconstrained, through both entries, streamed and not, greedy. Every output must parse and
validate; streamed = not streamed; both entries give the same answer. Exits 0 when every check
passes and prints "fleet corpora: ..." with the tally.
"""

import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "agent", "tests", "sdk"))
import corpus  # noqa: E402

forwarded_url, local_url, model = sys.argv[1], sys.argv[2], sys.argv[3]
limit = 2
if "--corpus" in sys.argv:
    arg = sys.argv[sys.argv.index("--corpus") + 1]
    limit = 10**6 if arg == "all" else int(arg)
entries = {
    "forwarded": openai.OpenAI(base_url=forwarded_url + "/v1", api_key="unused", max_retries=0,
                               timeout=300),
    "disaggregated": openai.OpenAI(base_url=local_url + "/v1", api_key="unused", max_retries=0,
                                   timeout=300),
}

# A regular expression no model follows by chance: an unconstrained decode node would not
# match it, so this case fails if the constraint is lost on the way to the node that decodes.
REGEX = r"zq(zq){3}-[0-9]{6}"


def cases():
    """(label, request, check) for every case: check(text, calls) raises when invalid."""
    out = []
    for i, schema in enumerate(corpus.SCHEMAS[:limit]):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "strict": True, "schema": schema}}
        request = dict(response_format=fmt, max_tokens=120, messages=[{
            "role": "user",
            "content": f"Give an example value as JSON with the fields {', '.join(schema['properties'])}."}])

        def check(text, calls, schema=schema):
            jsonschema.validate(json.loads(text), schema)
        out.append((f"schema {i}", request, check))
    for i, (tool_set, question) in enumerate(corpus.TOOL_SETS[:limit]):
        allowed = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tool_set}
        request = dict(tools=tool_set, tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                       messages=[{"role": "user", "content": question}])

        def check(text, calls, allowed=allowed):
            assert calls, f"no tool calls (text {text!r})"
            for name, arguments in calls:
                assert name in allowed, name
                jsonschema.validate(json.loads(arguments), allowed[name])
        out.append((f"tool set {i}", request, check))
    request = dict(max_tokens=30, extra_body={"guided_regex": REGEX},
                   messages=[{"role": "user", "content": "Say hello."}])

    def check_regex(text, calls):
        assert re.fullmatch(REGEX, text), f"{text!r} does not match {REGEX}"
    out.append(("regex", request, check_regex))
    return out


def whole(client, request):
    out = client.chat.completions.create(model=model, temperature=0, **request)
    message = out.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return message.content or "", calls


def streamed(client, request):
    text, calls = "", {}
    for chunk in client.chat.completions.create(model=model, temperature=0, stream=True, **request):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, ["", ""])
                if delta.function and delta.function.name:
                    entry[0] = delta.function.name
                if delta.function and delta.function.arguments:
                    entry[1] += delta.function.arguments
    return text, [tuple(calls[i]) for i in sorted(calls)]


def run(job):
    entry, stream, (label, request, check) = job
    got = (streamed if stream else whole)(entries[entry], request)
    return entry, stream, label, check, got


started = time.monotonic()
all_cases = cases()
jobs = [(entry, stream, case) for case in all_cases for entry in entries for stream in (False, True)]
# Four at a time: the decode worker batches them, as it would a fleet's traffic.
with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(run, jobs))
answers, invalid, differ = {}, [], []
for entry, stream, label, check, (text, calls) in results:
    answers[(label, entry, stream)] = (text, calls)
    try:
        check(text, calls)
    except (AssertionError, ValueError, jsonschema.ValidationError) as e:
        invalid.append(f"{label} via {entry} (stream={stream}): {text!r} {calls!r} does not validate: {e}")
for label, _, _ in all_cases:
    want = answers[(label, "forwarded", False)]
    for entry in entries:
        for stream in (False, True):
            if answers[(label, entry, stream)] != want:
                differ.append(f"{label}: {entry} (stream={stream}) gave {answers[(label, entry, stream)]!r}, "
                              f"forwarded (not streamed) {want!r}")
for failure in invalid + differ:
    print(failure)
print(f"fleet corpora: {len(results) - len(invalid)}/{len(results)} answers valid, {len(differ)} differ from "
      f"the forwarded non-streamed one ({len(all_cases)} cases x 2 entries x streamed and not, "
      f"{time.monotonic() - started:.1f} s)")
sys.exit(1 if invalid or differ else 0)
