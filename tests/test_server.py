"""`llm serve` over real HTTP on 127.0.0.1, driven by the official `openai` client: the same text as `llm run`,
streams that add up, concurrent requests without cross-talk, OpenAI's error bodies, cancellation, API keys."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import pytest

openai = pytest.importorskip("openai")
from serving import ENV, KEY, Served, junk_maker, read_as_chat, refused_in_words  # noqa: E402

CHAT = [{"role": "user", "content": "Write a haiku about the sea"}]
TOOLS = [{"type": "function", "function": {
    "name": name, "description": description,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                   "additionalProperties": False}}}
    for name, description in (("get_weather", "The weather now in a city"), ("get_time", "The time now in a city"))]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "The best way to learn Python is",
           "def fibonacci(n):", "Water boils at", "My favourite colour is", "The sun rises in the"]


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Served(smollm2_path, "--parallel", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server1(smollm2_path):
    """One slot, and an API key."""
    s = Served(smollm2_path, "--parallel", "1", "--api-key", KEY)
    yield s
    s.stop()


def _llm_run(model, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "llmcli", "run", str(model), *args, "--temperature", "0"],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_greedy_chat_and_completion_equal_llm_run(server, smollm2_path):
    c = server.client()
    chat = c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=16)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert _llm_run(smollm2_path, CHAT[0]["content"], "-n", "16") == chat.choices[0].message.content + "\n"
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 16

    done = c.completions.create(model=server.model, prompt=PROMPTS[0], temperature=0, max_tokens=12)
    assert done.object == "text_completion"
    assert _llm_run(smollm2_path, PROMPTS[0], "--raw", "-n", "12") == done.choices[0].text
    u = done.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens == 12
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    assert u.prompt_tokens == len(Tokenizer.from_gguf(read_gguf(smollm2_path)).encode(PROMPTS[0]))


def test_a_follow_up_turn_prefills_only_what_is_new(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Name three rivers of Europe, with one fact about each. " + "[1]" * 5}]
    first = c.chat.completions.create(model=server.model, messages=msgs, temperature=0, max_tokens=12)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And one more?"}]
    follow = c.chat.completions.create(model=server.model, messages=msgs, temperature=0, max_tokens=4)
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < follow.usage.prompt_tokens


@pytest.mark.slow
def test_while_its_user_types_a_chat_runs_ahead_to_the_next_turn(server1, smollm2_path):
    """After a reply, the idle slot prefills the turn's end and the next user header (ChatML's
    `<|im_end|>\n<|im_start|>user\n`): the follow-up then prefills only what its user wrote and the reply's header,
    and says the same as when no slot holds any of it. A reply cut by max_tokens and one ended by the model both."""
    from oracle import hf_tokenizer

    hf = hf_tokenizer(smollm2_path)
    c = server1.client()
    for n in (12, 200):
        msgs = [{"role": "user", "content": f"[{n}] In one short sentence: what is a river?"}]
        first = c.chat.completions.create(model=server1.model, messages=msgs, temperature=0, max_tokens=n)
        assert first.choices[0].finish_reason == ("length" if n == 12 else "stop")
        msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a lake?"}]
        time.sleep(1.0)  # the user reads and types
        follow = c.chat.completions.create(model=server1.model, messages=msgs, temperature=0, max_tokens=8)
        own = hf.encode("And a lake?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        u = follow.usage
        assert u.prompt_tokens - u.prompt_tokens_details.cached_tokens == len(own)
        # a raw prompt takes the one slot, so the same follow-up runs from nothing
        c.completions.create(model=server1.model, prompt="Lakes", temperature=0, max_tokens=1)
        again = c.chat.completions.create(model=server1.model, messages=msgs, temperature=0, max_tokens=8)
        assert again.usage.prompt_tokens_details.cached_tokens == 0
        assert again.choices[0].message.content == follow.choices[0].message.content


def test_after_a_tool_call_the_slot_runs_ahead_to_the_tools_result(server1, smollm2_path):
    """After a reply that calls a tool, the idle slot prefills the call as the client sends it back and what the
    template writes before a tool's result (SmolLM2, tools in the system message: a user turn that begins "The
    function get_weather returned:"): the request with the result prefills only the result and the reply's header,
    and says the same as when no slot holds any of it."""
    from oracle import hf_tokenizer

    c = server1.client()
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    ask = dict(model=server1.model, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64)
    first = c.chat.completions.create(messages=msgs, **ask)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    msgs += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 18 degrees"}]
    time.sleep(1.0)  # the tool runs
    follow = c.chat.completions.create(messages=msgs, **ask)
    own = hf_tokenizer(smollm2_path).encode(" Sunny, 18 degrees<|im_end|>\n<|im_start|>assistant\n",
                                            add_special_tokens=False)
    u = follow.usage
    assert u.prompt_tokens - u.prompt_tokens_details.cached_tokens == len(own)
    c.completions.create(model=server1.model, prompt="Lakes", temperature=0, max_tokens=1)
    again = c.chat.completions.create(messages=msgs, **ask)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    calls = [[(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls]
             for r in (follow, again)]
    assert calls[0] == calls[1]


def test_metrics_count_what_the_server_did(smollm2_path):
    """/metrics (Prometheus' text format, llama.cpp's server's names): the prompt tokens run, tokens generated,
    decode steps and requests of the generations made, and the texts embedded, as their usage says; behind the
    API key. With --verbose, each generation's line on stderr."""
    s = Served(smollm2_path, "--parallel", "2", "--api-key", KEY, "--verbose")
    try:
        c = s.client()
        replies = [c.chat.completions.create(model=s.model, messages=CHAT, temperature=0, max_tokens=n)
                   for n in (5, 9)]
        replies.append(c.completions.create(model=s.model, prompt=PROMPTS[0], temperature=0, max_tokens=7))
        c.embeddings.create(model=s.model, input=PROMPTS[:2])
        r = httpx.get(s.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        lines = r.text.splitlines()
        values = {line.split()[0]: float(line.split()[1]) for line in lines if not line.startswith("#")}
        assert all(f"# TYPE {name} " in r.text and f"# HELP {name} " in r.text for name in values)
        usage = [x.usage for x in replies]
        assert values["llm:prompt_tokens_total"] == sum(
            u.prompt_tokens - (u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0)
            for u in usage)
        assert values["llm:tokens_predicted_total"] == sum(u.completion_tokens for u in usage) == 21
        # one request at a time: a step per token after each one's first, one slot busy in each
        assert values["llm:n_decode_total"] == 21 - 3 and values["llm:n_busy_slots_per_decode"] == 1
        assert values["llm:requests_total"] == 3 and values["llm:embedding_texts_total"] == 2
        assert values["llm:requests_processing"] == values["llm:requests_deferred"] == 0
        assert values["llm:prompt_tokens_seconds"] > 0 and values["llm:predicted_tokens_seconds"] > 0
        assert 0 < values["llm:kv_cache_tokens"] == values["llm:kv_cache_usage_ratio"] * 2 * 512
        assert httpx.get(s.base + "/metrics", timeout=60).status_code == 401
    finally:
        _, err = s.stop()
    # --verbose: a line for each generation
    logged = [line for line in err.splitlines() if line.startswith("llm serve: slot ")]
    assert len(logged) == 3 and "; 5 generated at " in logged[0] and logged[2].endswith("; length")


def test_streamed_deltas_concatenate_to_the_whole_text_and_usage_adds_up(server):
    c = server.client()
    whole = c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=12)
    chunks = list(c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishing = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # the same prompt again: a slot holds all of it but the last token, which must run to give logits
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    done = c.completions.create(model=server.model, prompt=PROMPTS[1], temperature=0, max_tokens=10)
    parts = list(c.completions.create(model=server.model, prompt=PROMPTS[1], temperature=0, max_tokens=10,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


def test_chat_logprobs_and_stop(server):
    c = server.client()
    r = c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
    full = r.choices[0].message.content
    cut = c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=6,
                                    stop=[full[4:8]])
    assert cut.choices[0].message.content == full[:4] and cut.choices[0].finish_reason == "stop"


def test_same_seed_same_text(server):
    c = server.client()

    def ask(seed):
        return c.completions.create(model=server.model, prompt=PROMPTS[2], temperature=1.0, max_tokens=10,
                                    seed=seed).choices[0].text

    assert ask(7) == ask(7)
    assert len({ask(s) for s in (1, 2, 3)}) > 1


def test_eight_concurrent_streams_each_return_what_they_return_alone(server):
    c = server.client()

    def stream(prompt: str) -> str:
        parts = c.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=12, stream=True)
        return "".join(p.choices[0].text for p in parts)

    alone = [stream(p) for p in PROMPTS]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, stream(PROMPTS[i])))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert len(set(alone)) == len(alone)  # eight different texts: a mix-up would show


@pytest.mark.parametrize("body, status, param, says", [
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature", ""),
    ({"messages": CHAT, "temperature": 2.5}, 400, "temperature", "'temperature' must be in [0, 2], got 2.5"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p", "'top_p' must be in (0, 1], got 0"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "'max_tokens' must be >= 1, got 0"),
    ({"messages": CHAT, "max_tokens": 1.5}, 400, "max_tokens", ""),
    ({"messages": CHAT, "n": 2}, 400, "n", ""),
    ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ""),
    ({"messages": CHAT, "logit_bias": {"99999999": 1}}, 400, "logit_bias", ""),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", ""),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    ({"messages": []}, 400, "messages", ""),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", ""),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", ""),
    ({"messages": CHAT, "model": "gpt-4o"}, 404, "model", ""),
    ({"messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions", "give the functions as 'tools'"),
    ({"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice", "needs 'tools'"),
    ({"messages": CHAT, "tools": {"name": "f"}}, 400, "tools", "must be a list"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools[0].function.name", "letters, digits"),
    ({"messages": CHAT, "tools": [TOOLS[0], TOOLS[0]]}, 400, "tools[1].function.name", "given twice"),
    ({"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice", "not among 'tools'"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}}}]}, 400, "tools",
     "'multipleOf' is not supported"),
    ({"messages": CHAT, "tools": TOOLS, "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls", "true or false"),
    ({"messages": CHAT, "tools": TOOLS, "response_format": {"type": "json_object"}}, 400, "response_format",
     "together with 'tools'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]},
     400, "messages[0].tool_calls[0]", "must be a call"),
    ({"messages": [{"role": "tool", "content": "sunny", "tool_call_id": ["1"]}]}, 400, "messages[0].tool_call_id",
     "must be a string"),
    ({"messages": CHAT, "response_format": "json"}, 400, "response_format", ""),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "string", "pattern": "(?!a)"}}}}, 400, "response_format", "a group (?!...) is not supported"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema", "with a 'name'"),
])
def test_bad_chat_requests_get_their_status_and_openai_error_body(server, body, status, param, says):
    body = {"model": server.model, **body}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert says in error["message"]  # the range in words a person reads



def test_malformed_and_unknown_requests_then_the_server_answers_normally(server):
    c = server.client()
    for path, content in (("/v1/chat/completions", b"{not json"), ("/v1/completions", b"[1, 2"),
                          ("/v1/chat/completions", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
                          ("/v1/completions", b'"a string"'), ("/v1/completions", b'{"prompt": 5}')):
        r = httpx.post(server.base + path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert httpx.get(server.base + "/v1/nothing").status_code == 404
    # a body over 32 MiB is refused as it arrives, declared or streamed in chunks
    big = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    for content in (big, (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))):
        r = httpx.post(server.base + "/v1/completions", content=content, headers={"Content-Type": "application/json"},
                       timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server.model, prompt="Hi", max_tokens=2, presence_penalty=3)
    assert e.value.body["param"] == "presence_penalty"
    models = c.models.list()
    assert [m.id for m in models.data] == [server.model]
    r = c.completions.create(model=server.model, prompt=PROMPTS[0], temperature=0, max_tokens=4)
    assert r.choices[0].text and r.usage.completion_tokens == 4
    # what asks for nothing the server lacks is served: plain text, no tools
    r = c.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=4,
                                  response_format={"type": "text"}, tools=[], tool_choice="none")
    assert r.choices[0].message.content and r.usage.completion_tokens == 4


def test_tokenize_and_detokenize_as_llama_cpp_serves_them(server, smollm2_path):
    """/tokenize gives what `llm tokenize` gives (with `add_special`; control-token text is its id), with pieces
    as text or, where a token is part of a character, its bytes; /detokenize gives the text back."""
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(smollm2_path))
    text = "<|im_start|>user\nThe café costs 5€ 🤗"
    r = httpx.post(server.base + "/tokenize", json={"content": text})
    assert r.status_code == 200 and r.json() == {"tokens": tok.encode(text, add_special=False)}
    ids = r.json()["tokens"]
    assert ids[0] == tok.encode("<|im_start|>", add_special=False)[0]
    assert httpx.post(server.base + "/tokenize", json={"content": text, "add_special": True}
                      ).json()["tokens"] == tok.encode(text)
    pieces = httpx.post(server.base + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces
                    ) == text.encode()
    assert any(isinstance(p["piece"], list) for p in pieces)  # the emoji's bytes come in more than one token
    assert httpx.post(server.base + "/detokenize", json={"tokens": ids}).json() == {"content": text}
    assert httpx.post(server.base + "/tokenize", json={}).json() == {"tokens": []}
    for path, body in (("/tokenize", {"content": 5}), ("/tokenize", {"content": "a", "with_pieces": "yes"}),
                       ("/detokenize", {"tokens": [1, -1]}), ("/detokenize", {"tokens": "1 2"}),
                       ("/detokenize", {"tokens": [49152]})):
        r = httpx.post(server.base + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("content", "with_pieces", "tokens"), r.text


def test_json_mode_and_structured_outputs_through_the_openai_client(server):
    """response_format json_object gives a JSON object, streamed or not (the same text); json_schema, as the
    client's own `parse` sends it from a pydantic model, gives an instance of that model."""
    import pydantic

    c = server.client()
    ask = {"model": server.model, "temperature": 0, "max_tokens": 200,
           "messages": [{"role": "user", "content": "Describe a cat called Tom as JSON."}]}
    whole = c.chat.completions.create(**ask, response_format={"type": "json_object"})
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)
    streamed = c.chat.completions.create(**ask, response_format={"type": "json_object"}, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text

    class City(pydantic.BaseModel):  # bounded lengths: a 135M model may repeat itself inside a list or string
        name: str
        country: str
        population: int
        rivers: Annotated[list[Annotated[str, pydantic.StringConstraints(max_length=20)]],
                          pydantic.Field(max_length=3)]

    parsed = c.chat.completions.parse(model=server.model, temperature=0, max_tokens=200, response_format=City,
                                      messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name and isinstance(city.population, int)
    assert list(json.loads(parsed.choices[0].message.content)) == ["name", "country", "population", "rivers"]

    done = c.completions.create(model=server.model, prompt="A JSON list of three fruits:", temperature=0,
                                max_tokens=60, extra_body={"response_format": {
                                    "type": "json_schema", "json_schema": {"name": "fruits", "schema": {
                                        "type": "array", "items": {"type": "string"}, "minItems": 3,
                                        "maxItems": 3}}}})
    assert done.choices[0].finish_reason == "stop"
    fruits = json.loads(done.choices[0].text)
    assert len(fruits) == 3 and all(isinstance(f, str) for f in fruits)


def test_tool_calls_through_the_openai_client(server):
    """tool_choice required / a named function: a call of one of the tools with arguments its schema takes,
    streamed as one tool_calls delta; auto: a call or text, well formed either way; the call and the tool's result
    go back in the next turn."""
    from jsonschema import Draft202012Validator

    c = server.client()
    ask = {"model": server.model, "temperature": 0, "max_tokens": 80, "tools": TOOLS,
           "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    schema = TOOLS[0]["function"]["parameters"]
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        r = c.chat.completions.create(**ask, tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        (call,) = r.choices[0].message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        assert Draft202012Validator(schema).is_valid(json.loads(call.function.arguments))
        chunks = [ch for ch in c.chat.completions.create(**ask, tool_choice=choice, stream=True) if ch.choices]
        streamed = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
            (0, call.function.name, call.function.arguments)]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    r = c.chat.completions.create(**ask)  # tool_choice auto
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name in names
    else:
        assert message.content and not message.content.startswith("{")
        assert r.choices[0].finish_reason in ("stop", "length")

    # a call cut short by max_tokens is no call: what was written comes back as text, finish "length"
    cut = c.chat.completions.create(**(ask | {"max_tokens": 5}), tool_choice="required")
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content.startswith("{")
    chunks = [ch for ch in c.chat.completions.create(**(ask | {"max_tokens": 5}), tool_choice="required",
                                                     stream=True) if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"

    # several calls in one reply: a list the grammar allows unless parallel_tool_calls is false; given back as such
    both = {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": '{"city": "Paris"}'}}
        for i, n in enumerate(("get_weather", "get_time"))]}
    results = [{"role": "tool", "tool_call_id": f"call_{i}", "content": r} for i, r in enumerate(("sunny", "noon"))]
    r = c.chat.completions.create(**(ask | {"messages": [*ask["messages"], both, *results]}), tool_choice="none",
                                  parallel_tool_calls=False)
    assert r.choices[0].message.content and r.usage.prompt_tokens > first_turn_tokens(c, ask) + 20

    first = c.chat.completions.create(**ask, tool_choice="required")
    history = [*ask["messages"], first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.choices[0].message.tool_calls[0].id,
                "content": "18 degrees and sunny"}]
    follow = c.chat.completions.create(**(ask | {"messages": history}), tool_choice="none")
    assert follow.choices[0].message.content and follow.choices[0].message.tool_calls is None
    # the call and the result are in the prompt, as turns of their own
    bare = c.chat.completions.create(**(ask | {"messages": history[:1]}), tool_choice="none")
    assert follow.usage.prompt_tokens - bare.usage.prompt_tokens > first.usage.completion_tokens + 8


def _ask_for_a_call(s: Served, max_tokens: int):
    """A greedy request that must call one of TOOLS, once: (the client, the request, the reply)."""
    c = s.client()
    ask = {"model": s.model, "temperature": 0, "max_tokens": max_tokens, "tools": TOOLS, "tool_choice": "required",
           "parallel_tool_calls": False, "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    return c, ask, c.chat.completions.create(**ask)


def test_tool_calls_in_the_templates_own_way(smollm2_path):
    """A template that shows tools and writes calls (<tool_call> tags here): the model gets the tools, its past
    calls and their results as the template writes them, and writes its calls that way; they come back as
    tool_calls, whole or streamed, through the OpenAI and the ollama APIs. While the tool runs, the slot prefills
    the call as the client sends it back and the result's lead (`<tool_response>\n`)."""
    import ollama

    from llmcli.template import ChatTemplate
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    template_path = Path(__file__).parent / "data" / "tools_chatml.jinja"
    s = Served(smollm2_path, "--parallel", "2", "--template", str(template_path))
    try:
        c, ask, r = _ask_for_a_call(s, 60)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time")
        assert json.loads(call.function.arguments)["city"]
        chunks = [ch for ch in c.chat.completions.create(**ask, stream=True) if ch.choices]
        streamed = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, d.function.arguments) for d in streamed] == [
            (call.function.name, call.function.arguments)]
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)

        # the prompt is the template's rendering of the tools, the call and its result
        history = ask["messages"] + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
        time.sleep(1.0)  # the tool runs
        r = c.chat.completions.create(**(ask | {"messages": history, "tool_choice": "auto", "max_tokens": 4}))
        gguf = read_gguf(smollm2_path)
        tok = Tokenizer.from_gguf(gguf)
        own = tok.encode("sunny, 24 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special=False)
        assert r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens == len(own)
        template = ChatTemplate.from_gguf(gguf, override=template_path, bos_token=tok.bos_token,
                                          eos_token=tok.eos_token)
        arguments = json.loads(call.function.arguments)
        text = template.render([ask["messages"][0], {
            "role": "assistant", "content": "", "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}]},
            {"role": "tool", "content": "sunny, 24 C", "name": call.function.name, "tool_call_id": call.id}],
            tools=TOOLS)
        assert "<tool_response>\nsunny, 24 C\n</tool_response>" in text and '"description": "The weather' in text
        assert r.usage.prompt_tokens == len(tok.encode(text, add_special=False))

        # ollama's API: the same call
        o = ollama.Client(host=s.base, timeout=120)
        r = o.chat(model=s.model, messages=ask["messages"], stream=False,
                   tools=[TOOLS[0]], options={"temperature": 0, "num_predict": 60})
        if r.message.tool_calls:  # auto: a 135M model may answer in text
            assert r.message.tool_calls[0].function.name == "get_weather" and r.message.content == ""
        else:
            assert r.message.content and not r.message.content.startswith("<tool_call>")
    finally:
        s.stop()


def test_tool_calls_begun_by_a_control_token(smollm2_path, tmp_path):
    """A template whose calls begin with a control token and hold their ids (Mistral's way; test_tools.MARKED_IDS):
    the reply's calls come back as tool_calls, whole and streamed, the token's text nowhere in the content, their
    ids in the template's shape, and the conversation goes on with them. While the tools run, the slot prefills the
    calls with the ids the response gave them and the first result's lead."""
    from test_tools import MARKED_IDS

    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    template_path = tmp_path / "marked.jinja"
    template_path.write_text(MARKED_IDS)
    s = Served(smollm2_path, "--parallel", "1", "--template", str(template_path))
    try:
        c, ask, r = _ask_for_a_call(s, 120)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls and not r.choices[0].message.content
        assert all(call.function.name in ("get_weather", "get_time") for call in calls)
        chunks = [ch for ch in c.chat.completions.create(**ask, stream=True) if ch.choices]
        streamed = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, d.function.arguments) for d in streamed] == [
            (call.function.name, call.function.arguments) for call in calls]
        assert "<repo_name>" not in "".join(ch.choices[0].delta.content or "" for ch in chunks)
        # ids in the template's shape (it refuses others), so the conversation goes on with the calls and results
        assert all(len(call.id) == 9 and call.id.isalnum() for call in calls + streamed)
        made = [{"id": d.id, "type": "function",
                 "function": {"name": d.function.name, "arguments": d.function.arguments}} for d in streamed]
        history = ask["messages"] + [{"role": "assistant", "content": None, "tool_calls": made},
                                     *({"role": "tool", "tool_call_id": d.id, "content": "sunny"} for d in streamed)]
        time.sleep(1.0)  # the tools run
        r = c.chat.completions.create(**(ask | {"messages": history, "max_tokens": 1}))
        # what is left after the lead `[RESULTS] {"content": "`, the same whatever the result says
        results = "".join(f'[RESULTS] {{"content": "sunny", "call_id": "{d.id}"}}[/RESULTS]' for d in streamed)
        own = Tokenizer.from_gguf(read_gguf(smollm2_path)).encode(results[len('[RESULTS] {"content": "'):],
                                                                  add_special=False)
        assert r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens == len(own)
        r = c.chat.completions.create(**(ask | {"messages": history, "tool_choice": "none", "max_tokens": 4}))
        assert r.choices[0].message.content and r.usage.completion_tokens <= 4
    finally:
        s.stop()


def test_random_messages_tools_and_formats_are_refused_in_words():
    """Bodies with values of every wrong type in messages, tool calls, tools, tool_choice and response_format are
    read by the server's own parsing (as each request is): a 4xx ApiError or a grammar's refusal, never another
    exception (the server would answer 500)."""
    import random

    from llmcli.server import _template_options

    rng = random.Random(5)
    values = [None, True, 0, -1, 1.5, "", "x", "auto", "none", "required", [], {}, [1], {"a": 1}, [None], [{}],
              "function"]
    keys = ["type", "function", "name", "arguments", "id", "parameters", "description", "content", "role",
            "tool_calls", "tool_call_id", "json_schema", "schema"]
    junk = junk_maker(rng, values, keys)

    refused = 0
    for _ in range(3000):
        body = {"messages": [rng.choice([{"role": rng.choice(["user", "tool", "assistant", "system", junk()]),
                                          "content": rng.choice(["hi", None, junk()]), "tool_calls": junk(),
                                          "tool_call_id": junk()}, junk()])
                             for _ in range(rng.randrange(1, 3))]}
        for key in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "functions"):
            if rng.random() < 0.4:
                body[key] = rng.choice([junk(), TOOLS, [TOOLS[0], junk()],
                                        {"type": "json_schema", "json_schema": {"name": "n", "schema": junk()}}])
        if rng.random() < 0.3:
            body["chat_template_kwargs"] = rng.choice([junk(), {"enable_thinking": junk()}, {"messages": junk()},
                                                       {"not an identifier": 1}])

        def parse(body=body):
            _template_options(body)
            return read_as_chat(body)

        refused += refused_in_words(parse)
    assert refused > 1000


def first_turn_tokens(c, ask: dict) -> int:
    return c.chat.completions.create(**ask, tool_choice="none").usage.prompt_tokens


def test_api_key_is_required_when_set(server1):
    for key in ("wrong",):
        with pytest.raises(openai.AuthenticationError):
            server1.client(key).models.list()
    assert httpx.get(server1.base + "/v1/models").status_code == 401
    r = httpx.post(server1.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in server1.client().models.list().data] == [server1.model]


def test_requests_beyond_parallel_wait_their_turn(server1):
    c = server1.client()

    def ask(i: int) -> str:
        return c.completions.create(model=server1.model, prompt=PROMPTS[i], temperature=0, max_tokens=6).choices[0].text

    alone = [ask(i) for i in range(3)]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(3)] == alone


def test_a_client_that_leaves_mid_stream_frees_its_slot(server1, smollm2_path):
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    stop_ids = Tokenizer.from_gguf(read_gguf(smollm2_path)).stop_ids
    never_stop = {str(t): -100 for t in stop_ids}  # the only slot would be busy for ~480 tokens
    c = server1.client()
    t0 = time.perf_counter()
    alone = c.completions.create(model=server1.model, prompt=PROMPTS[2], temperature=0, max_tokens=8)
    t_alone = time.perf_counter() - t0
    stream = c.completions.create(model=server1.model, prompt=PROMPTS[3], temperature=0, max_tokens=2000,
                                  logit_bias=never_stop, stream=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    t0 = time.perf_counter()
    after = c.completions.create(model=server1.model, prompt=PROMPTS[2], temperature=0, max_tokens=8)
    waited = time.perf_counter() - t0
    assert after.choices[0].text == alone.choices[0].text
    # the abandoned generation had ~480 tokens to go; the slot is free after at most one more of them
    assert waited < 5 * t_alone + 2, (waited, t_alone)
    assert httpx.get(server1.base + "/health").json()["busy"] == 0


def test_ctrl_c_ends_requests_in_flight_and_exits_cleanly(smollm2_path):
    s = Served(smollm2_path, "--parallel", "2")
    events: list[str] = []

    def listen():
        with httpx.stream("POST", s.base + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 400, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)

    t = threading.Thread(target=listen)
    t.start()
    deadline = time.monotonic() + 60
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    code, err = s.stop()
    t.join(30)
    assert not t.is_alive()
    assert "Traceback" not in err, err
    assert code in (0, 130, -signal.SIGINT), err
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "server_shutting_down"
