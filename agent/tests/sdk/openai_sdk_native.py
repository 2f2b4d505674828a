"""Drives a kvfleet agent serving a native model (the real tokenizer and chat template) with the
official `openai` Python SDK: chat and completions, streaming and not, usage, stop strings,
logprobs.

Usage: python3 openai_sdk_native.py BASE_URL MODEL
Exits 0 when every check passes; prints what failed otherwise. Sampling is greedy
(temperature 0), so a request's text is the same every time it is asked.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

assert model in [m.id for m in client.models.list()]

messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]

# Chat, not streamed.
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.role == "assistant"
whole = chat.choices[0].message.content
finish = chat.choices[0].finish_reason
assert finish in ("length", "stop"), finish
assert chat.usage.prompt_tokens > 5, chat.usage
assert 1 <= chat.usage.completion_tokens <= 12, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Chat, streamed: the same text, piece by piece, and the same usage.
stream = client.chat.completions.create(
    model=model, messages=messages, max_completion_tokens=12, temperature=0,
    stream=True, stream_options={"include_usage": True},
)
pieces, usage, streamed_finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            streamed_finish = choice.finish_reason
assert "".join(pieces) == whole, ("".join(pieces), whole)
assert streamed_finish == finish, (streamed_finish, finish)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Completions, not streamed and streamed.
prompt = "the cat sat on the"
completion = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
assert completion.object == "text_completion"
text = completion.choices[0].text
assert completion.usage.prompt_tokens > 0
assert 1 <= completion.usage.completion_tokens <= 8
streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
assert "".join(c.choices[0].text for c in streamed if c.choices) == text
assert streamed[-1].choices[0].finish_reason == completion.choices[0].finish_reason

# Stop strings: ask again with a stop string taken from the middle of the greedy text; the
# answer is the text before its first occurrence, and finish_reason is "stop".
longer = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
full = longer.choices[0].text
candidates = [i for i in range(2, len(full) - 1) if full[i] != "\ufffd" and full[i - 1] != "\ufffd"]
assert candidates, f"no usable stop string in {full!r}"
stop = full[candidates[len(candidates) // 2]]
cut = full[: full.index(stop)]
for streaming in (False, True):
    if streaming:
        chunks = list(client.completions.create(
            model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00never"], stream=True))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        got_finish = chunks[-1].choices[0].finish_reason
    else:
        stopped = client.completions.create(
            model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00never"])
        got, got_finish = stopped.choices[0].text, stopped.choices[0].finish_reason
    assert got == cut, (streaming, stop, got, cut, full)
    assert got_finish == "stop", (streaming, got_finish)

# Logprobs on chat: one entry per generated token, the greedy token is the most likely one.
scored = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
content = scored.choices[0].logprobs.content
assert len(content) == scored.usage.completion_tokens, (len(content), scored.usage)
for entry in content:
    assert entry.logprob <= 0.0, entry
    assert len(entry.top_logprobs) == 3, entry
    assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4, entry
    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob

# Logprobs on completions (the legacy format).
scored = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
lp = scored.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens, lp
assert all(len(t) <= 2 for t in lp.top_logprobs), lp

print("openai SDK (native model): all checks passed")
