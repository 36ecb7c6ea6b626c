"""`llm serve`'s OpenAI Responses API (/v1/responses) through the official `openai` client over real HTTP on
127.0.0.1, with the real SmolLM2 model: a reply whole and streamed (raw events and the client's own stream helper)
is the chat completions reply to the same conversation; function calls and their outputs; a structured output;
and what the server does not do, refused in words."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
from serving import KEY, Served  # noqa: E402

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather now in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                         "required": ["city"], "additionalProperties": False}}]
AS_CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
QUESTION = "What is the capital of France?"
THINK_CHATML = Path(__file__).parent / "data" / "think_chatml.jinja"


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Served(smollm2_path, "--parallel", "1", "--api-key", KEY)
    yield s
    s.stop()


def test_a_reply_whole_and_streamed_is_the_chat_reply(server):
    """Instructions and input give the chat's system and user messages: the same greedy text and prompt tokens as
    /v1/chat/completions; the raw stream's text deltas add up to it, its events numbered in order and its items
    opened and ended; the client's stream helper builds the same response; a reply cut by max_output_tokens is
    incomplete, and says why."""
    c = server.client()
    chat = c.chat.completions.create(model=server.model, temperature=0, max_tokens=120, messages=[
        {"role": "system", "content": "You are a geography teacher."}, {"role": "user", "content": QUESTION}])
    ask = dict(model=server.model, instructions="You are a geography teacher.", input=QUESTION, temperature=0,
               max_output_tokens=120)
    r = c.responses.create(**ask)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == server.model
    assert r.status == "completed" and r.incomplete_details is None and r.store is True
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    events = list(c.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == r.output_text
    final = events[-1].response
    assert final.output_text == r.output_text and final.status == "completed"
    assert final.output[0].id == events[2].item.id == events[-2].item.id

    with c.responses.stream(**ask) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        helped = stream.get_final_response()
    assert "".join(texts) == helped.output_text == r.output_text

    cut = c.responses.create(**(ask | {"max_output_tokens": 3}))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and r.output_text.startswith(cut.output_text)
    streamed_cut = list(c.responses.create(**(ask | {"max_output_tokens": 3}), stream=True))
    assert streamed_cut[-1].type == "response.incomplete"
    assert streamed_cut[-1].response.output_text == cut.output_text


def test_input_items_are_a_conversation(server):
    """A list of message items, with text parts, is the same conversation as chat messages."""
    c = server.client()
    turns = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
             {"role": "user", "content": "And a vegetable?"}]
    chat = c.chat.completions.create(model=server.model, messages=turns, temperature=0, max_tokens=12)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "An apple.", "annotations": []}]},
             {"role": "user", "content": "And a vegetable?"}]
    r = c.responses.create(model=server.model, input=items, temperature=0, max_output_tokens=12)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_function_calls_and_their_outputs(server, smollm2_path):
    """A reply that must call a tool gives a function_call item (whole and streamed: its arguments in one delta);
    the conversation goes on with the item and a function_call_output, which is the chat completions
    conversation of the same call and result; while the tool runs the slot prefills the call and the result's
    lead, so that request prefills only the result and the reply's header."""
    from oracle import hf_tokenizer

    c = server.client()
    ask = dict(model=server.model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
               max_output_tokens=64)
    question = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = c.responses.create(input=question, **ask)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.output_text == ""

    with c.responses.stream(input=question, **ask) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response().output[0]
    assert kinds.count("response.function_call_arguments.delta") == 1 and kinds[-1] == "response.completed"
    assert (streamed.type, streamed.name, streamed.arguments) == ("function_call", call.name, call.arguments)

    items = question + [streamed.model_dump(exclude_none=True),
                        {"type": "function_call_output", "call_id": streamed.call_id, "output": "Sunny, 18 degrees"}]
    time.sleep(1.0)  # the tool runs
    follow = c.responses.create(input=items, **(ask | {"max_output_tokens": 1}))
    own = hf_tokenizer(smollm2_path).encode(" Sunny, 18 degrees<|im_end|>\n<|im_start|>assistant\n",
                                           add_special_tokens=False)
    assert follow.usage.input_tokens - follow.usage.input_tokens_details.cached_tokens == len(own)
    as_chat = {"id": streamed.call_id, "type": "function",
               "function": {"name": streamed.name, "arguments": streamed.arguments}}
    chat = c.chat.completions.create(
        model=server.model, tools=AS_CHAT_TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
        max_tokens=1,
        messages=question + [{"role": "assistant", "content": None, "tool_calls": [as_chat]},
                             {"role": "tool", "tool_call_id": streamed.call_id, "content": "Sunny, 18 degrees"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens


def test_reasoning_comes_as_its_own_item(smollm2_path):
    """SmolLM2 through a template that opens a <think> block (tests/data/think_chatml.jinja), which it never
    closes: the reply is a reasoning item with the chat API's reasoning_content, then an empty message, whole and
    streamed; reasoning effort "none" closes the block first, and the reply is the message."""
    s = Served(smollm2_path, "--parallel", "1", "--template", str(THINK_CHATML))
    try:
        c = s.client()
        ask = {"model": s.model, "temperature": 0, "max_output_tokens": 12, "input": "Write a haiku about the sea"}
        chat = c.chat.completions.create(model=s.model, temperature=0, max_tokens=12,
                                         messages=[{"role": "user", "content": ask["input"]}])
        reasoning = chat.choices[0].message.model_extra["reasoning_content"]
        r = c.responses.create(**ask)
        assert [o.type for o in r.output] == ["reasoning", "message"] and r.status == "incomplete"
        assert r.output[0].content[0].text == reasoning and r.output_text == ""
        events = list(c.responses.create(**ask, stream=True))
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
        assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]
        plain = c.chat.completions.create(model=s.model, temperature=0, max_tokens=12,
                                          messages=[{"role": "user", "content": ask["input"]}],
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        off = c.responses.create(**ask, reasoning={"effort": "none"})
        assert [o.type for o in off.output] == ["message"] and off.output_text == plain.choices[0].message.content
    finally:
        s.stop()


def test_a_structured_output(server):
    """text.format json_schema: the reply follows the schema."""
    c = server.client()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = c.responses.create(model=server.model, input="Name the capital of France as JSON.", temperature=0,
                           max_output_tokens=40,
                           text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert set(json.loads(r.output_text)) == {"city"}


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "with id 'resp_1' not found"),
    ({"input": "hi", "previous_response_id": 5}, "previous_response_id", "must be a string"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", "not supported"),
    ({"input": "hi", "background": True}, "background", "not supported"),
    ({}, "input", "'input' must be"),
    ({"input": []}, "input", "'input' must be"),
    ({"input": 5}, "input", "'input' must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content",
     "only text"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type", "not supported"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be user"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "must be a string"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output", "text parts"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
    ({"input": "hi", "instructions": 3}, "instructions", "must be a string"),
    ({"input": "hi", "reasoning": "high"}, "reasoning", "must be an object"),
    ({"input": "hi", "store": "no"}, "store", "must be a boolean"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", ""),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "n",
                                         "schema": {"type": "string", "pattern": "(?!a)"}}}},
     "text.format", "'text.format': 'pattern' '(?!a)': a group (?!...) is not supported"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format", "a 'name'"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "'text.format"),
])
def test_what_it_does_not_do_is_refused_in_words(server, body, param, words):
    r = httpx.post(server.base + "/v1/responses", json={"model": server.model} | body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_stored_responses_go_on_and_can_be_read_and_deleted(server):
    """A response is kept (store defaults to true): the next request goes on from it by previous_response_id, as
    the chat completions conversation of both turns; it is read back whole, its input items listed (newest first),
    and deleted; one stored false, or deleted, is not found; a streamed one is kept too. The API key is asked for
    as elsewhere."""
    c = server.client()
    first = c.responses.create(model=server.model, input="My name is Ada. Say hello to me.", temperature=0,
                               max_output_tokens=30)
    assert first.store is True and first.previous_response_id is None
    second = c.responses.create(model=server.model, previous_response_id=first.id, input="What is my name?",
                                temperature=0, max_output_tokens=30)
    assert second.previous_response_id == first.id
    turns = [{"role": "user", "content": "My name is Ada. Say hello to me."},
             {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}]
    chat = c.chat.completions.create(model=server.model, messages=turns, temperature=0, max_tokens=30)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    # the slot held the first turn: the second prefilled only what follows it
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens

    again = c.responses.retrieve(first.id)
    assert (again.id, again.output_text, again.status) == (first.id, first.output_text, first.status)
    listed = c.responses.input_items.list(second.id)
    assert [(i.role, i.content[0].text) for i in listed.data] == [
        ("user", "What is my name?"), ("assistant", first.output_text), ("user", "My name is Ada. Say hello to me.")]

    deleted = c.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError, match="is stored"):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        c.responses.create(model=server.model, previous_response_id=first.id, input="Hi", max_output_tokens=2)
    unkept = c.responses.create(model=server.model, input="Hi", store=False, max_output_tokens=2)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unkept.id)
    streamed = list(c.responses.create(model=server.model, input="Hi", max_output_tokens=4, stream=True))[-1]
    assert c.responses.retrieve(streamed.response.id).output_text == streamed.response.output_text

    r = httpx.post(server.base + "/v1/responses", json={"model": server.model, "input": "hi"}, timeout=60)
    assert r.status_code == 401
    assert httpx.get(server.base + f"/v1/responses/{second.id}", timeout=60).status_code == 401


def test_random_inputs_tools_and_formats_are_refused_in_words():
    """Bodies with values of every wrong type in input items, tools, tool_choice, text.format and reasoning go
    through this API's reading and then the chat request's (as each request does): a 4xx ApiError or a grammar's
    refusal, never another exception (the server would answer 500)."""
    import random

    from serving import junk_maker, read_as_chat, refused_in_words

    from llmcli.server_responses import _reasoning_options, _store, chat_body

    rng = random.Random(35)
    values = [None, True, 0, -1, 1.5, "", "x", "auto", "none", "required", [], {}, [1], {"a": 1}, [None], [{}],
              "function", "message", "function_call", "function_call_output", "input_text", "json_schema"]
    keys = ["type", "role", "content", "text", "call_id", "name", "arguments", "output", "parameters", "format",
            "schema", "effort"]
    junk = junk_maker(rng, values, keys)
    refused = 0
    for _ in range(3000):
        body = {"input": rng.choice([junk(), "hi", [{"role": "user", "content": "hi"}, junk()],
                                     [{"type": rng.choice(values), "role": junk(), "content": junk(),
                                       "call_id": junk(), "name": junk(), "arguments": junk(), "output": junk()}]])}
        for key in ("instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning",
                    "max_output_tokens", "previous_response_id", "store"):
            if rng.random() < 0.3:
                body[key] = rng.choice([junk(), TOOLS, [TOOLS[0], junk()], {"format": junk()},
                                        {"format": {"type": "json_schema", "name": "n", "schema": junk()}}])

        def parse(body=body):
            _reasoning_options(body.get("reasoning"))
            _store(body)
            return read_as_chat(chat_body(body))

        refused += refused_in_words(parse)
    assert refused > 1000


def test_the_store_keeps_the_newest():
    """The server keeps MAX_STORED responses, and MAX_STORED_BYTES of them at most: the oldest go first, and a
    conversation that went on from one that is gone is refused in words."""
    from llmcli.server import ApiError
    from llmcli.server_responses import MAX_STORED, MAX_STORED_BYTES, Stored

    store = Stored()
    previous = None
    for i in range(MAX_STORED + 2):
        response = {"id": f"resp_{i}", "output": [{"type": "message", "role": "assistant", "content": "ok"}]}
        store.put(response, previous, [{"role": "user", "content": f"turn {i}"}])
        previous = response["id"]
    assert len(store.kept) == MAX_STORED and "resp_0" not in store.kept and "resp_2" in store.kept
    with pytest.raises(ApiError, match="'resp_1' not found"):
        store.history(previous)  # its chain reaches back to an evicted response
    big = "x" * (MAX_STORED_BYTES // 3)
    for i in range(4):
        store.put({"id": f"big_{i}", "output": []}, None, [{"role": "user", "content": big}])
    assert store.size <= MAX_STORED_BYTES and "big_3" in store.kept and "big_0" not in store.kept
    assert [item["content"] for item in store.history("big_3")] == [big]
