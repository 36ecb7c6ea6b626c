"""`llm serve`'s Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) through the official `anthropic`
client over real HTTP on 127.0.0.1, with the real SmolLM2 model: a reply whole and streamed (the client's stream
helper) is the chat completions reply to the same conversation; stop sequences; tool_use and tool_result blocks;
thinking blocks; structured output; token counts; Anthropic's error body and API key header."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")
from serving import KEY, Served  # noqa: E402

TOOLS = [{"name": "get_weather", "description": "The weather now in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": False}}]
AS_CHAT_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                   "parameters": t["input_schema"]}} for t in TOOLS]
THINK_CHATML = Path(__file__).parent / "data" / "think_chatml.jinja"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    # newer Anthropic clients leave sampling to the server: greedy here
    s = Served(smollm2_path, "--parallel", "1", "--api-key", KEY, "--temperature", "0")
    s.anthropic = anthropic.Anthropic(base_url=s.base, api_key=KEY, max_retries=0)
    yield s
    s.stop()


def test_a_reply_whole_and_streamed_is_the_chat_reply(server):
    """system and messages make the chat's messages: the same greedy text and prompt tokens as
    /v1/chat/completions, whole and through the client's stream helper; usage splits the prompt into tokens run
    and tokens a slot's cache held; max_tokens ends a reply with its stop reason; a stop sequence is named."""
    c, a = server.client(), server.anthropic
    chat = c.chat.completions.create(model=server.model, max_tokens=120, messages=[
        {"role": "system", "content": "You are a geography teacher."}, *QUESTION])
    m = a.messages.create(model=server.model, max_tokens=120, system="You are a geography teacher.",
                          messages=QUESTION)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == server.model
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == chat.choices[0].message.content
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert m.usage.output_tokens == chat.usage.completion_tokens

    with a.messages.stream(model=server.model, max_tokens=120, system="You are a geography teacher.",
                           messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text == final.content[0].text and final.stop_reason == "end_turn"
    # the same prompt again: the slot holds all of it but the last token
    assert final.usage.input_tokens == 1 and final.usage.cache_read_input_tokens == chat.usage.prompt_tokens - 1

    cut = a.messages.create(model=server.model, max_tokens=3, system="You are a geography teacher.",
                            messages=QUESTION)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    assert m.content[0].text.startswith(cut.content[0].text)
    word = m.content[0].text.split()[2]
    stopped = a.messages.create(model=server.model, max_tokens=120, system="You are a geography teacher.",
                                messages=QUESTION, stop_sequences=[word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == m.content[0].text[:m.content[0].text.index(word)]


def test_the_model_is_listed(server):
    """Anthropic's client lists and reads the model through /v1/models (OpenAI's list, with Anthropic's fields)."""
    listed = server.anthropic.models.list()
    assert [m.id for m in listed.data] == [server.model] and listed.data[0].type == "model"
    assert server.anthropic.models.retrieve(server.model).display_name == server.model
    assert [m.id for m in server.client().models.list().data] == [server.model]


def test_count_tokens_is_the_prompt(server):
    a = server.anthropic
    counted = a.messages.count_tokens(model=server.model, system="Be brief.", messages=QUESTION)
    m = a.messages.create(model=server.model, max_tokens=1, system="Be brief.", messages=QUESTION)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_tool_use_and_tool_results(server, smollm2_path):
    """tool_choice any gives a tool_use block (whole, and streamed as one input_json_delta); the conversation goes
    on with it and a tool_result, which is the chat completions conversation of the same call and result; while
    the tool runs the slot prefills the call and the result's lead."""
    from oracle import hf_tokenizer

    c, a = server.client(), server.anthropic
    ask = dict(model=server.model, max_tokens=64, tools=TOOLS,
               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    question = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    m = a.messages.create(messages=question, **ask)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    use = m.content[0]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id

    with a.messages.stream(messages=question, **ask) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and "message_stop" in kinds
    use = streamed.content[0]
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})

    history = question + [{"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "Sunny, 18 degrees"}]}]
    time.sleep(1.0)  # the tool runs
    follow = a.messages.create(messages=history, **(ask | {"max_tokens": 1}))
    own = hf_tokenizer(smollm2_path).encode(" Sunny, 18 degrees<|im_end|>\n<|im_start|>assistant\n",
                                            add_special_tokens=False)
    assert follow.usage.input_tokens == len(own)
    as_chat = {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}
    chat = c.chat.completions.create(
        model=server.model, tools=AS_CHAT_TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=1,
        messages=question + [{"role": "assistant", "content": None, "tool_calls": [as_chat]},
                             {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 18 degrees"}])
    assert follow.usage.input_tokens + follow.usage.cache_read_input_tokens == chat.usage.prompt_tokens


def test_thinking_blocks(smollm2_path):
    """SmolLM2 through a template that opens a <think> block it never closes: the reply is a thinking block with
    the chat API's reasoning_content, whole and streamed; thinking disabled closes the block first."""
    s = Served(smollm2_path, "--parallel", "1", "--template", str(THINK_CHATML), "--temperature", "0")
    try:
        a = anthropic.Anthropic(base_url=s.base, api_key="unused", max_retries=0)
        ask = dict(model=s.model, max_tokens=12, messages=[{"role": "user", "content": "Write a haiku about the sea"}])
        chat = s.client().chat.completions.create(model=s.model, max_tokens=12, messages=ask["messages"])
        reasoning = chat.choices[0].message.model_extra["reasoning_content"]
        m = a.messages.create(**ask)
        assert m.content[0].type == "thinking" and m.content[0].thinking == reasoning
        assert m.stop_reason == "max_tokens"
        with a.messages.stream(**ask) as stream:
            final = stream.get_final_message()
        assert final.content[0].type == "thinking" and final.content[0].thinking == reasoning
        off = a.messages.create(**ask, thinking={"type": "disabled"})
        assert [b.type for b in off.content] == ["text"] and off.content[0].text
    finally:
        s.stop()


def test_structured_output(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    m = server.anthropic.messages.create(model=server.model, max_tokens=40,
                                         messages=[{"role": "user", "content": "The capital of France, as JSON."}],
                                         output_config={"format": {"type": "json_schema", "schema": schema}})
    assert set(json.loads(m.content[0].text)) == {"city"}


@pytest.mark.parametrize("body, status, kind, words", [
    ({"messages": QUESTION}, 400, "invalid_request_error", "max_tokens: Field required"),
    ({"max_tokens": 5}, 400, "invalid_request_error", "messages: must be"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error",
     "must be user or assistant"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "image blocks are not supported"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f"}]}]},
     400, "invalid_request_error", "not a content block a user turn can hold"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "only custom tools"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "some"}}, 400,
     "invalid_request_error", "tool_choice"),
    ({"max_tokens": 5, "messages": QUESTION, "thinking": {"type": "sometimes"}}, 400, "invalid_request_error",
     "thinking"),
    ({"max_tokens": 0, "messages": QUESTION}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": QUESTION, "model": "claude-opus"}, 404, "not_found_error", "claude-opus"),
])
def test_bad_requests_get_anthropics_error_body(server, body, status, kind, words):
    r = httpx.post(server.base + "/v1/messages", json={"model": server.model} | body, headers={"x-api-key": KEY},
                   timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and words in r.json()["error"]["message"]


def test_the_api_key_as_anthropics_clients_send_it(server):
    r = httpx.post(server.base + "/v1/messages", json={"model": server.model, "max_tokens": 1, "messages": QUESTION},
                   headers={"x-api-key": "wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base, api_key="wrong", max_retries=0).messages.create(
            model=server.model, max_tokens=1, messages=QUESTION)


def test_random_messages_and_tools_are_refused_in_words():
    """Bodies with values of every wrong type in messages, blocks, tools, tool_choice, thinking and output_config
    go through this API's reading and then the chat request's: a 4xx ApiError or a grammar's refusal, never
    another exception (the server would answer 500)."""
    import random

    from serving import junk_maker, read_as_chat, refused_in_words

    from llmcli.server_anthropic import _options, chat_body

    rng = random.Random(35)
    values = [None, True, 0, -1, 1.5, "", "x", "auto", "any", "tool", "none", [], {}, [1], {"a": 1}, [None], [{}],
              "user", "assistant", "text", "tool_use", "tool_result", "thinking", "json_schema", "enabled"]
    keys = ["type", "role", "content", "text", "id", "name", "input", "tool_use_id", "is_error", "input_schema",
            "format", "schema"]
    junk = junk_maker(rng, values, keys)
    refused = 0
    for _ in range(3000):
        body = {"max_tokens": rng.choice([5, junk()]),
                "messages": rng.choice([junk(), QUESTION, [{"role": rng.choice(values), "content": junk()}],
                                        [{"role": "assistant", "content": [{"type": rng.choice(values), "id": junk(),
                                                                            "name": junk(), "input": junk()}]}]])}
        for key in ("system", "tools", "tool_choice", "thinking", "output_config", "stop_sequences"):
            if rng.random() < 0.3:
                body[key] = rng.choice([junk(), TOOLS, [TOOLS[0], junk()], {"type": "tool", "name": junk()},
                                        {"format": {"type": "json_schema", "schema": junk()}}])

        def parse(body=body):
            _options(body)
            return read_as_chat(chat_body(body))

        refused += refused_in_words(parse)
    assert refused > 1000
