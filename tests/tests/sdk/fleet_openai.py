"""One node of the e2e fleet, driven by the official `openai` Python SDK.

Usage: python3 fleet_openai.py BASE_URL MODEL — exits 0 when every check passes.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

assert model in [m.id for m in client.models.list()]

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, seed=1
)
assert chat.object == "chat.completion", chat
assert chat.usage.completion_tokens == 6, chat.usage

pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert pieces, "the stream carried no text"

text = client.completions.create(model=model, prompt="once upon", max_tokens=4)
assert text.usage.completion_tokens == 4, text.usage
print("ok")
