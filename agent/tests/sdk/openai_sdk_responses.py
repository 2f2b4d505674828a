"""The Responses API (`/v1/responses`) through the official `openai` Python SDK, against one
kvfleet agent.

Usage: python3 openai_sdk_responses.py BASE_URL MODEL
  Checks create (text, instructions, a function tool with tool_choice required and named,
  json_schema through text.format), streaming (`client.responses.stream` and `stream=True`: the
  typed events in order with sequence numbers, the same text as not streamed under greedy
  sampling), previous_response_id chaining (a text turn and a function_call_output turn),
  retrieve, delete (then 404), store=false (404), and a refused field (400 naming it).
Exits 0 when every check passes.
"""

import json
import sys

import jsonschema
import openai

import corpus

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
greedy = {"model": model, "temperature": 0, "max_output_tokens": 12}

# Text.
first = client.responses.create(input="Say hello.", **greedy)
assert first.object == "response", first
assert first.id.startswith("resp_"), first.id
assert first.status in ("completed", "incomplete"), first.status
assert first.output and first.output[0].type == "message", first.output
assert first.output[0].content[0].type == "output_text", first.output
assert isinstance(first.output_text, str)
assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0, first.usage
assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
assert first.store is True

# Instructions: echoed, and in the prompt (more input tokens).
told = client.responses.create(input="Say hello.", instructions="Answer in French.", **greedy)
assert told.instructions == "Answer in French.", told.instructions
assert told.usage.input_tokens > first.usage.input_tokens, (told.usage, first.usage)

# A function tool, required and named: the call's arguments validate.
# The corpus's weather tool (short strings: a model that knows nothing still ends its call
# within max_output_tokens), in the Responses shape: name and parameters at the top level.
chat_weather = corpus.TOOL_SETS[1][0][0]
weather = {"type": "function", **chat_weather["function"]}
for choice in ["required", {"type": "function", "name": weather["name"]}]:
    called = client.responses.create(
        input="What is the weather in Paris?",
        tools=[weather],
        tool_choice=choice,
        parallel_tool_calls=False,
        model=model,
        temperature=0,
        max_output_tokens=200,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls, called.output
    assert calls[0].name == weather["name"], calls[0]
    assert calls[0].call_id, calls[0]
    jsonschema.validate(json.loads(calls[0].arguments), weather["parameters"])

# The tool's result continues the conversation.
answered = client.responses.create(
    previous_response_id=called.id,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
    tools=[weather],
    **greedy,
)
assert answered.previous_response_id == called.id
assert answered.usage.input_tokens > called.usage.input_tokens, (answered.usage, called.usage)

# Structured output through text.format.
schema = corpus.SCHEMAS[0]
shaped = client.responses.create(
    input="Describe a person.",
    text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    model=model,
    temperature=0,
    max_output_tokens=80,
)
jsonschema.validate(json.loads(shaped.output_text), schema)

# stream=True: the typed events in order, numbered; the deltas make the text not streamed
# (greedy). 12 tokens end the text early: the last event is response.incomplete.
events = list(client.responses.create(input="Say hello.", stream=True, **greedy))
assert [e.sequence_number for e in events] == list(range(len(events))), events
kinds = [e.type for e in events]
assert kinds[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], kinds
assert kinds[-4:] == [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.incomplete",
], kinds
assert set(kinds[4:-4]) == {"response.output_text.delta"}, kinds
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text == first.output_text, (text, first.output_text)
assert events[-1].response.output_text == first.output_text

# The SDK's stream helper on a function call (it completes: the call ends the answer); the
# same call as not streamed.
with client.responses.stream(
    input="What is the weather in Paris?",
    tools=[weather],
    tool_choice="required",
    parallel_tool_calls=False,
    model=model,
    temperature=0,
    max_output_tokens=200,
) as stream:
    kinds = [event.type for event in stream]
    final = stream.get_final_response()
assert kinds[-1] == "response.completed", kinds
for kind in [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]:
    assert kind in kinds, (kind, kinds)
streamed = [item for item in final.output if item.type == "function_call"]
assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls], (
    streamed,
    calls,
)

# previous_response_id: the earlier turn (input and output) goes in front.
second = client.responses.create(previous_response_id=first.id, input="Again.", **greedy)
assert second.usage.input_tokens > first.usage.input_tokens + 2, (second.usage, first.usage)

# Retrieve, delete, then 404.
got = client.responses.retrieve(first.id)
assert got.id == first.id and got.output_text == first.output_text, got
client.responses.delete(first.id)
for call in [
    lambda: client.responses.retrieve(first.id),
    lambda: client.responses.create(previous_response_id=first.id, input="x", **greedy),
]:
    try:
        call()
        raise AssertionError("a deleted response was found")
    except openai.NotFoundError:
        pass

# store=false keeps nothing.
unstored = client.responses.create(input="hi", store=False, **greedy)
try:
    client.responses.retrieve(unstored.id)
    raise AssertionError("an unstored response was found")
except openai.NotFoundError:
    pass

# A field this server does not serve is refused by name.
try:
    client.responses.create(input="hi", reasoning={"effort": "high"}, **greedy)
    raise AssertionError("reasoning was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "reasoning", e.body
print("ok")
