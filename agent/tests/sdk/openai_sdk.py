"""Drives a running kvfleet agent with the official `openai` Python SDK.

Usage: python3 openai_sdk.py BASE_URL MODEL
Exits 0 when every check passes; prints what failed otherwise.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert model in models, models

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    max_tokens=12,
    temperature=0,
    seed=7,
)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].finish_reason == "length", chat.choices[0].finish_reason
assert chat.usage.completion_tokens == 12, chat.usage
whole = chat.choices[0].message.content

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    max_completion_tokens=12,
    temperature=0,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(pieces) == whole, ("".join(pieces), whole)
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == 12, usage

several = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=3, n=3, seed=5
)
assert [c.index for c in several.choices] == [0, 1, 2], several
assert several.usage.completion_tokens == 9, several.usage

completion = client.completions.create(model=model, prompt="once upon a time", max_tokens=5)
assert completion.object == "text_completion"
assert completion.usage.prompt_tokens == len("once upon a time".encode())
assert completion.usage.completion_tokens == 5

streamed = list(client.completions.create(model=model, prompt="abc", max_tokens=4, stream=True))
assert streamed[-1].choices[0].finish_reason == "length", streamed[-1]

for kwargs, error, param in [
    (dict(model="no-such-model", messages=[{"role": "user", "content": "x"}]), openai.NotFoundError, "model"),
    (dict(model=model, messages=[{"role": "user", "content": "x"}], n=17), openai.BadRequestError, "n"),
    (dict(model=model, messages=[]), openai.BadRequestError, "messages"),
    (dict(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=0), openai.BadRequestError, "max_tokens"),
    # Fields the server does not serve are refused by name, never ignored (docs/openai-api.md).
    (dict(model=model, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}), openai.BadRequestError, "response_format"),
    (dict(model=model, messages=[{"role": "user", "content": "x"}], logit_bias={"abc": 10}), openai.BadRequestError, "logit_bias"),
    (dict(model=model, messages=[{"role": "user", "content": "x"}], extra_body={"max_token": 3}), openai.BadRequestError, "max_token"),
]:
    try:
        client.chat.completions.create(**kwargs)
    except error as e:
        assert e.body["param"] == param, e.body
        assert e.body["type"] == "invalid_request_error", e.body
    else:
        raise AssertionError(f"{kwargs} should have failed with {error.__name__}")

print("openai SDK: all checks passed")
