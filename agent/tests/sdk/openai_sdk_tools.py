"""Tool calls and structured output through the official `openai` Python SDK, against a kvfleet
agent serving a native model.

Usage: python3 openai_sdk_tools.py BASE_URL MODEL [--corpus N]
  Checks tools (required, a named function, parallel_tool_calls=false, auto, none, a
  conversation with tool results), streamed tool-call deltas (equal to the whole answer), and
  json_schema structured output (streamed = not streamed; `client.chat.completions.parse`).
  With --corpus N it also runs the first N of the 50 strict schemas and N of the 20 tool sets of
  corpus.py (N = all: every one) and prints the tally; every output must parse and validate.
Exits 0 when every check passes. Sampling is greedy, so the answers are reproducible.
"""

import json
import sys
import time

import jsonschema
import openai

import corpus

base_url, model = sys.argv[1], sys.argv[2]
limit = None
if "--corpus" in sys.argv:
    arg = sys.argv[sys.argv.index("--corpus") + 1]
    limit = 10**6 if arg == "all" else int(arg)
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)

weather, time_tool = corpus.TOOL_SETS[1][0]
tools = [weather, time_tool]
params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
ask = [{"role": "user", "content": "What's the weather in Paris?"}]


def check_calls(calls, allowed):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function", call
        assert call.id and call.id.startswith("call_"), call
        assert call.function.name in allowed, call
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError as e:
            raise AssertionError(f"{call.function.arguments!r} is not JSON: {e}") from e
        jsonschema.validate(arguments, allowed[call.function.name])


def streamed_calls(**request):
    """The SDK's chunks gathered the way applications do: by tool-call index."""
    calls, content, finish, names_first = {}, "", None, True
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            if choice.delta.content:
                content += choice.delta.content
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    entry["id"] = delta.id
                if delta.function and delta.function.name:
                    entry["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    names_first = names_first and entry["name"] is not None
                    entry["arguments"] += delta.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    assert names_first, "an arguments delta came before its call's name"
    return [calls[i] for i in sorted(calls)], content, finish


# tool_choice "required" (one call: parallel_tool_calls=False): a valid call, finish_reason
# tool_calls, no content; streamed the same.
request = dict(model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=200, temperature=0,
               parallel_tool_calls=False)
whole = client.chat.completions.create(**request)
message = whole.choices[0].message
check_calls(message.tool_calls, params)
assert whole.choices[0].finish_reason == "tool_calls", whole
assert message.content is None, message
calls, content, finish = streamed_calls(**request)
assert finish == "tool_calls", finish
assert content == "", content
assert [(c["name"], c["arguments"]) for c in calls] == [
    (c.function.name, c.function.arguments) for c in message.tool_calls
], (calls, message.tool_calls)
assert all(c["id"] and c["id"].startswith("call_") for c in calls), calls

assert len(message.tool_calls) == 1, message

# A named function: exactly that one.
named = client.chat.completions.create(
    model=model, messages=ask, tools=tools, max_tokens=200, temperature=0,
    tool_choice={"type": "function", "function": {"name": "get_time"}})
check_calls(named.choices[0].message.tool_calls, {"get_time": params["get_time"]})
assert len(named.choices[0].message.tool_calls) == 1

# Parallel calls allowed (the default): one or more calls; every one valid unless max_tokens
# cut the last (a model that knows nothing may go on calling).
request["parallel_tool_calls"] = True
several = client.chat.completions.create(**request).choices[0]
if several.finish_reason == "tool_calls":
    check_calls(several.message.tool_calls, params)
else:
    assert several.finish_reason == "length" and several.message.tool_calls, several
    if len(several.message.tool_calls) > 1:
        check_calls(several.message.tool_calls[:-1], params)

# The conversation goes on with the tool's result (rendered through the default tool prompt).
call = message.tool_calls[0]
follow = client.chat.completions.create(
    model=model, max_tokens=16, temperature=0, tools=tools,
    messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 degrees"},
    ])
assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls"), follow

# auto: text or calls, whichever the model chose, well formed either way.
auto = client.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=60, temperature=0)
choice = auto.choices[0]
if choice.message.tool_calls:
    assert choice.finish_reason in ("tool_calls", "length"), choice
    for c in choice.message.tool_calls:
        assert c.function.name in params or choice.finish_reason == "length", c
else:
    assert isinstance(choice.message.content, str), choice
auto_calls, auto_content, _ = streamed_calls(model=model, messages=ask, tools=tools, max_tokens=60, temperature=0)
assert auto_content == (choice.message.content or ""), (auto_content, choice.message.content)
assert [(c["name"], c["arguments"]) for c in auto_calls] == [
    (c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]

# none: text only.
none = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="none", max_tokens=8, temperature=0)
assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls", none

# A bad tool is a 400 naming it.
try:
    client.chat.completions.create(model=model, messages=ask, max_tokens=4,
                                   tools=[{"type": "function", "function": {"name": "bad name"}}])
    raise AssertionError("a bad tool name was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tools[0].function.name", e.body

# Structured output: json_schema strict, streamed = not streamed, and the SDK's parse helper.
schema = corpus.SCHEMAS[0]
fmt = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}
out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Answer in JSON."}],
                                     response_format=fmt, max_tokens=80, temperature=0)
text = out.choices[0].message.content
jsonschema.validate(json.loads(text), schema)
pieces = "".join(
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Answer in JSON."}], response_format=fmt,
        max_tokens=80, temperature=0, stream=True)
    if c.choices)
assert pieces == text, (pieces, text)
try:
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=10**8)

    parsed = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "A city as JSON."}], response_format=City,
        max_tokens=200, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, City), parsed
except ImportError:
    print("pydantic missing: the parse helper is not checked")

print("openai SDK: tools and structured output checks passed")

if limit is not None:
    started = time.monotonic()
    schemas = corpus.SCHEMAS[:limit]
    valid = 0
    for i, schema in enumerate(schemas):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "strict": True, "schema": schema}}
        out = client.chat.completions.create(
            model=model, response_format=fmt, max_tokens=120, temperature=0,
            messages=[{"role": "user", "content": f"Give an example value as JSON with the fields "
                                                   f"{', '.join(schema['properties'])}."}])
        text = out.choices[0].message.content
        try:
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            print(f"schema {i}: {text!r} does not validate ({out.choices[0].finish_reason}): {e}")
    sets = corpus.TOOL_SETS[:limit]
    called = 0
    for i, (tool_set, question) in enumerate(sets):
        allowed = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tool_set}
        # One call each: with parallel calls allowed a small model may go on calling until
        # max_tokens cuts the last call (the grammar allows another call after each).
        out = client.chat.completions.create(
            model=model, tools=tool_set, tool_choice="required", max_tokens=120, temperature=0,
            parallel_tool_calls=False, messages=[{"role": "user", "content": question}])
        try:
            check_calls(out.choices[0].message.tool_calls, allowed)
            called += 1
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            print(f"tool set {i}: {out.choices[0].message} does not validate: {e}")
    took = time.monotonic() - started
    print(f"corpus: {valid}/{len(schemas)} schemas valid, {called}/{len(sets)} tool sets called validly "
          f"({took:.1f} s)")
    assert valid == len(schemas) and called == len(sets)
