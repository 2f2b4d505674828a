"""Stored responses across two nodes of the e2e fleet, through the official `openai` SDK.

Usage: python3 fleet_responses.py URL_A URL_B MODEL KEY KEY2
  A response created on node A (key KEY) is retrieved on node B and continued there with
  previous_response_id; deleted on B, it is 404 on A; the other key (KEY2) gets 404 on both
  nodes for what KEY stored. Exits 0 when every check passes.
"""

import sys
import time

import openai

url_a, url_b, model, key, key2 = sys.argv[1:6]


def client(url, api_key):
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


a, b, b_other, a_other = client(url_a, key), client(url_b, key), client(url_b, key2), client(url_a, key2)
params = {"model": model, "max_output_tokens": 4, "temperature": 0}

first = a.responses.create(input="hello fleet", **params)
assert first.id.startswith("resp_") and first.store, first

# Node B finds it (written behind to the control plane: allow it a moment).
deadline = time.time() + 10
while True:
    try:
        got = b.responses.retrieve(first.id)
        break
    except openai.NotFoundError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
assert got.id == first.id and got.output_text == first.output_text, (got, first)

# ...and continues it: the earlier turn is in the prompt.
second = b.responses.create(previous_response_id=first.id, input="and again", **params)
assert second.previous_response_id == first.id
assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens, (
    second.usage,
    first.usage,
)

# Node A finds the turn stored on B, and continues from it.
deadline = time.time() + 10
while True:
    try:
        a.responses.retrieve(second.id)
        break
    except openai.NotFoundError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)

# Another key sees nothing of this key's, on either node.
for other, rid in [(b_other, first.id), (a_other, first.id), (a_other, second.id)]:
    try:
        other.responses.retrieve(rid)
        raise AssertionError("another key read a stored response")
    except openai.NotFoundError:
        pass
try:
    b_other.responses.create(previous_response_id=first.id, input="x", **params)
    raise AssertionError("another key continued a stored response")
except openai.NotFoundError:
    pass
try:
    a_other.responses.delete(first.id)
    raise AssertionError("another key deleted a stored response")
except openai.NotFoundError:
    pass

# Deleted on B, gone on A (A's own copy included).
b.responses.delete(first.id)
for call in [lambda: a.responses.retrieve(first.id), lambda: b.responses.retrieve(first.id)]:
    try:
        call()
        raise AssertionError("a deleted response was found")
    except openai.NotFoundError:
        pass
print("ok")
