"""`llm serve`'s ollama API over real HTTP on 127.0.0.1, driven by the official `ollama` client: the same text as
the OpenAI routes (which test_server.py ties to `llm run`), streams that add up, formats and tool calls, the
model's listing, ollama's error bodies, API keys and cancellation."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

ollama = pytest.importorskip("ollama")
from serving import KEY, Served, junk_maker, refused_in_words  # noqa: E402

CHAT = [{"role": "user", "content": "Write a haiku about the sea"}]
GREEDY = {"temperature": 0, "num_predict": 16}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Served(smollm2_path, "--parallel", "4")
    s.ollama = ollama.Client(host=s.base, timeout=120)
    s.name = s.ollama.list().models[0].model
    yield s
    s.stop()


def test_chat_and_generate_give_the_openai_routes_text(server, smollm2_path):
    """Greedy /api/chat and /api/generate write what /v1 writes for the same prompt; the stream adds up to the
    whole reply; the counts are the prompt's and the reply's tokens."""
    c, v1 = server.ollama, server.client()
    whole = c.chat(model=server.name, messages=CHAT, options=GREEDY, stream=False)
    same = v1.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=16)
    assert whole.message.role == "assistant" and whole.message.content == same.choices[0].message.content
    assert whole.done and whole.done_reason == "length"
    assert (whole.prompt_eval_count, whole.eval_count) == (same.usage.prompt_tokens, 16)
    assert whole.total_duration >= whole.eval_duration > 0 and whole.prompt_eval_duration > 0

    parts = list(c.chat(model=server.name, messages=CHAT, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "length"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].message.content == "" and parts[-1].eval_count == 16

    # raw: the prompt as it is, as /v1/completions takes it
    g = c.generate(model=server.name, prompt="The capital of France is", raw=True, stream=False,
                   options={"temperature": 0, "num_predict": 10})
    done = v1.completions.create(model=server.model, prompt="The capital of France is", temperature=0,
                                 max_tokens=10)
    assert g.response == done.choices[0].text and g.done_reason == "length"
    # the context is the prompt's tokens and the reply's: given back, the conversation goes on from there
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(smollm2_path))
    prompt = tok.encode("The capital of France is")
    assert len(g.context) == g.prompt_eval_count + g.eval_count == len(prompt) + 10
    assert g.context[:len(prompt)] == prompt and tok.decode(g.context[len(prompt):]) == g.response
    on = c.generate(model=server.name, prompt=" It is", raw=True, context=g.context, stream=False,
                    options={"temperature": 0, "num_predict": 4})
    direct = v1.completions.create(model=server.model, prompt=list(g.context) + tok.encode(" It is", add_special=False),
                                   temperature=0, max_tokens=4)
    assert on.response == direct.choices[0].text

    # not raw: the prompt is the user's turn in the chat template, after `system`
    g = c.generate(model=server.name, prompt=CHAT[0]["content"], system="You are a poet.", stream=False,
                   options=GREEDY)
    same = v1.chat.completions.create(model=server.model, temperature=0, max_tokens=16,
                                      messages=[{"role": "system", "content": "You are a poet."}, *CHAT])
    assert g.response == same.choices[0].message.content
    streamed = list(c.generate(model=server.name, prompt=CHAT[0]["content"], system="You are a poet.", stream=True,
                               options=GREEDY))
    assert "".join(p.response for p in streamed) == g.response and streamed[-1].context == g.context


def test_options_stop_seed_logprobs_and_loading(server):
    c = server.ollama
    full = c.chat(model=server.name, messages=CHAT, options=GREEDY, stream=False).message.content
    cut = c.chat(model=server.name, messages=CHAT, options=GREEDY | {"stop": [full[4:8]]}, stream=False)
    assert cut.message.content == full[:4] and cut.done_reason == "stop"

    def ask(seed):
        return c.generate(model=server.name, prompt="Once upon a time", raw=True, stream=False,
                          options={"temperature": 1.0, "seed": seed, "num_predict": 10}).response

    assert ask(7) == ask(7) and len({ask(s) for s in (1, 2, 3)}) > 1

    r = c.chat(model=server.name, messages=CHAT, options=GREEDY | {"num_predict": 5}, logprobs=True, top_logprobs=3,
               stream=False)
    assert len(r.logprobs) == 5 and "".join(t.token for t in r.logprobs) == r.message.content
    for t in r.logprobs:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0

    # options about how a model is run, and samplers at their off values, are taken (clients send them)
    r = c.chat(model=server.name, messages=CHAT, stream=False, options=GREEDY | {
        "num_ctx": 4096, "num_thread": 8, "num_gpu": 0, "typical_p": 1.0, "mirostat": 0, "repeat_last_n": -1})
    assert r.message.content == full

    # nothing to generate: ollama's way to load a model, answered at once
    assert c.chat(model=server.name, messages=[]).done_reason == "load"
    assert c.generate(model=server.name, prompt="").done_reason == "load"


def test_formats_and_tool_calls(server):
    """`format` "json" and a schema (from pydantic, as ollama's docs do it); tools: a call of the tool with
    arguments its schema takes, the same streamed, and the conversation given back with the call and its result."""
    import pydantic
    from jsonschema import Draft202012Validator

    c = server.ollama
    ask = {"model": server.name, "options": {"temperature": 0, "num_predict": 200}}
    r = c.chat(**ask, messages=[{"role": "user", "content": "Describe a cat called Tom as JSON."}], format="json")
    assert r.done_reason == "stop" and isinstance(json.loads(r.message.content), dict)

    class City(pydantic.BaseModel):
        name: str
        country: str
        population: int

    r = c.chat(**ask, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
               format=City.model_json_schema())
    assert City.model_validate_json(r.message.content).name
    g = c.generate(**ask, prompt="Describe Rome as JSON.", format=City.model_json_schema())
    assert City.model_validate_json(g.response).country

    # a conversation in which the assistant called the tool before: the model calls it again
    messages = [{"role": "user", "content": "What is the weather in London?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "London"}}}]},
                {"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat(**ask, messages=messages, tools=[WEATHER], stream=False)
    (call,) = r.message.tool_calls
    assert r.message.content == "" and r.done_reason == "stop" and call.function.name == "get_weather"
    assert Draft202012Validator(WEATHER["function"]["parameters"]).is_valid(call.function.arguments)
    parts = list(c.chat(**ask, messages=messages, tools=[WEATHER], stream=True))
    streamed = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [("get_weather", call.function.arguments)]
    assert not "".join(p.message.content for p in parts) and parts[-1].done

    # the call and the tool's result go back: the reply is text or a call, well formed either way
    messages += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_name": "get_weather", "content": "sunny, 24 C"}]
    r = c.chat(**ask, messages=messages, tools=[WEATHER], stream=False)
    assert r.message.tool_calls or r.message.content
    # a Python function as the tool, as ollama's client describes it
    def get_time(city: str) -> str:
        """The time now in a city

        Args:
          city: The city
        """

    r = c.chat(**ask, messages=messages[:3], tools=[get_time], stream=False)
    assert not r.message.tool_calls or r.message.tool_calls[0].function.name == "get_time"


def test_list_show_ps_version(server, smollm2_path):
    c = server.ollama
    (m,) = c.list().models
    assert m.model == server.name == f"{server.model}:latest" and m.size == smollm2_path.stat().st_size
    assert m.digest == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    d = m.details
    assert (d.format, d.family, d.parameter_size, d.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    # the name without its tag is the same model
    assert c.chat(model=server.model, messages=CHAT, options=GREEDY, stream=False).message.content
    s = c.show(server.name)
    assert s.details == d and "tools" in s.capabilities and "{{" in s.template
    assert s.modelinfo["general.architecture"] == "llama" and s.modelinfo["llama.block_count"] == 30
    assert 130e6 < s.modelinfo["general.parameter_count"] < 140e6  # a count, as ollama gives it
    assert "temperature" in s.parameters and "num_ctx" in s.parameters
    (p,) = c.ps().models
    assert p.model == server.name and p.context_length == 512
    assert httpx.get(server.base + "/api/version").json()["version"]
    assert httpx.get(server.base + "/").status_code == 200


BAD = [
    ("/api/chat", {"model": "llama3", "messages": CHAT}, 404, "model 'llama3' not found"),
    ("/api/chat", {"model": None, "messages": CHAT}, 400, "'model' is required"),
    ("/api/chat", {"messages": "hi"}, 400, "'messages' must be a list"),
    ("/api/chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400, "text only"),
    ("/api/chat", {"messages": CHAT, "options": "hot"}, 400, "'options' must be an object"),
    ("/api/chat", {"messages": CHAT, "options": {"temperature": "hot"}}, 400, "'temperature' must be a number"),
    ("/api/chat", {"messages": CHAT, "options": {"top_p": 0}}, 400, "'top_p' must be in (0, 1]"),
    ("/api/chat", {"messages": CHAT, "options": {"mirostat": 2}}, 400, "'options.mirostat' is not supported"),
    ("/api/chat", {"messages": CHAT, "options": {"warp": 9}}, 400, "'options.warp' is not an option"),
    ("/api/chat", {"messages": CHAT, "options": {"num_predict": 0}}, 400, "'num_predict' must be at least 1"),
    ("/api/chat", {"messages": CHAT, "options": {"num_predict": -3}}, 400, "'num_predict' must be >= -2"),
    ("/api/chat", {"messages": CHAT, "options": {"stop": ["x"] * 17}}, 400, "at most 16"),
    ("/api/chat", {"messages": CHAT, "format": "xml"}, 400, "'format' must be \"json\" or a JSON Schema"),
    ("/api/chat", {"messages": CHAT, "format": {"type": "string", "pattern": "(?=a)"}}, 400, "(?=...) is not"),
    ("/api/chat", {"messages": CHAT, "format": "json", "tools": [WEATHER]}, 400, "'format' together with 'tools'"),
    ("/api/chat", {"messages": CHAT, "tools": [{"function": {"name": "a b"}}]}, 400, "tools[0].function.name"),
    ("/api/chat", {"messages": CHAT, "think": True}, 400, "does not think"),
    ("/api/chat", {"messages": CHAT, "think": "high"}, 400, "'think' must be true or false"),
    ("/api/chat", {"messages": CHAT, "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/api/chat", {"messages": CHAT, "top_logprobs": 3}, 400, "needs 'logprobs'"),
    ("/api/chat", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "context"),
    ("/api/chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}]},
     400, "messages[0].tool_calls[0]"),
    ("/api/generate", {"prompt": "Hi", "template": "{{ .Prompt }}"}, 400, "'template' is not supported"),
    ("/api/generate", {"prompt": "Hi", "suffix": "end"}, 400, "'suffix' is not supported"),
    ("/api/generate", {"prompt": "Hi", "raw": True, "system": "Be brief."}, 400, "'system' needs the chat template"),
    ("/api/generate", {"prompt": "Hi", "context": [1, 10**9]}, 400, "'context' must be a list of token ids"),
    ("/api/generate", {"prompt": 5}, 400, "'prompt' must be a string"),
    ("/api/generate", {"prompt": "Hi", "images": ["aGk="]}, 400, "text only"),
    ("/api/show", {"model": None}, 400, "'model' is required"),
    ("/api/show", {"model": "mistral"}, 404, "not found"),
]


@pytest.mark.parametrize("path, body, status, says", BAD)
def test_bad_requests_get_their_status_and_ollama_error_body(server, path, body, status, says):
    body = {k: v for k, v in ({"model": server.name} | body).items() if v is not None}
    r = httpx.post(server.base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and says in r.json()["error"], r.text


def test_what_is_not_served_says_so_and_the_server_answers_normally(server):
    for path, content in (("/api/chat", b"{not json"), ("/api/generate", b'"a string"')):
        r = httpx.post(server.base + path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), r.text
    r = httpx.get(server.base + "/api/nothing")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    r = httpx.post(server.base + "/api/generate", content=b'{"prompt": "' + b"a" * (33 << 20) + b'"}', timeout=60)
    assert r.status_code == 413 and r.json() == {"error": "The request body is over 32 MiB."}
    c = server.ollama
    for call in (lambda: c.pull("llama3"), lambda: c.delete(server.name), lambda: c.create("x", from_=server.name),
                 lambda: c.copy(server.name, "x")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 501 and "llm serve does not" in e.value.error or "llm pull" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # an error the client raises, word for word
        c.chat(model="llama3", messages=CHAT)
    assert e.value.status_code == 404 and e.value.error.startswith("model 'llama3' not found")
    assert c.chat(model=server.name, messages=CHAT, options=GREEDY, stream=False).eval_count == 16


def test_api_key_and_a_client_that_leaves(smollm2_path):
    """--api-key guards /api as it guards /v1; a stream the client leaves frees its slot (--parallel 1) at once."""
    s = Served(smollm2_path, "--parallel", "1", "--api-key", KEY)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(ollama.ResponseError) as e:
                ollama.Client(host=s.base, headers=headers).list()
            assert e.value.status_code == 401
        c = ollama.Client(host=s.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        name = c.list().models[0].model
        counting = {"model": name, "prompt": "1, 2, 3, 4,", "raw": True, "options": {"temperature": 0}}
        t0 = time.perf_counter()
        alone = c.generate(**counting | {"options": {"temperature": 0, "num_predict": 8}}, stream=False)
        t_alone = time.perf_counter() - t0
        # until the context is full: the only slot would be busy for ~500 tokens
        with httpx.stream("POST", s.base + "/api/generate", json=counting | {"options": {"num_predict": -1}},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            lines = r.iter_lines()
            first = [json.loads(next(lines)) for _ in range(3)]
            assert not any(p["done"] for p in first)
        t0 = time.perf_counter()
        after = c.generate(**counting | {"options": {"temperature": 0, "num_predict": 8}}, stream=False)
        waited = time.perf_counter() - t0
        assert after.response == alone.response and "".join(p["response"] for p in first) in after.response
        assert waited < 5 * t_alone + 2, (waited, t_alone)
        assert httpx.get(s.base + "/health").json()["busy"] == 0
    finally:
        s.stop()


def test_random_bodies_are_refused_in_words():
    """Wrongly typed messages, tool calls, tools, options and formats: each parsing step answers with a 4xx error
    or a request the engine takes, never another exception."""
    import random

    from llmcli.engine import GenerationConfig
    from llmcli.server import _chat_messages, _tool_choice, generation_config
    from llmcli.server_ollama import SAMPLING, _openai_messages, _options, _schema

    rng = random.Random(5)
    values = [None, True, 0, -1, -2, 1, 2.5, float("inf"), "", "x", "json", [], {}, ["a"], {"a": 1}, 10**30]
    keys = ["function", "name", "arguments", "type", "role", "content", "tool_calls", "tool_name", "images",
            "properties", "stop", "seed", *SAMPLING, "num_predict", "mirostat", "num_ctx"]
    junk = junk_maker(rng, values, keys)

    refused = 0
    for _ in range(3000):
        message = {"role": rng.choice(["user", "tool", "assistant", "system", junk()]),
                   "content": rng.choice(["hi", None, junk()])}
        for key in ("tool_calls", "tool_name", "images", "thinking"):
            if rng.random() < 0.3:
                message[key] = rng.choice([junk(), [{"function": {"name": "f", "arguments": junk()}}]])
        body = {"messages": [rng.choice([message, junk()])],
                "options": rng.choice([junk(), {rng.choice(keys): junk() for _ in range(3)}]),
                "format": rng.choice([None, "json", junk(), {"type": "object", "properties": junk()}])}
        if rng.random() < 0.3:
            body["tools"] = rng.choice([junk(), [WEATHER], [WEATHER, junk()]])

        def parse(body=body):
            _chat_messages({"messages": _openai_messages(body["messages"])})
            choice = _tool_choice({"tools": body.get("tools")})
            generation_config(_options(body, 512), GenerationConfig(), 1000, None)
            return choice, _schema(body)

        refused += refused_in_words(parse)
    assert refused > 1000
