"""Replies of models that think: the reasoning told from the answer, whole or streamed, beside tool calls; through
`llm serve`'s OpenAI and ollama APIs (`reasoning_content`, `thinking`), and turned off by the template's
`enable_thinking`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

from llmcli.template import ChatTemplate
from llmcli.thinking import ReplyStream, Thinking, ThinkStream, thinking
from llmcli.tools import CallSyntax, Tool, ToolChoice

THINK_CHATML = Path(__file__).parent / "data" / "think_chatml.jinja"
OPENS, CLOSED = Thinking(opened=True), Thinking(opened=False)


def _stream(think: Thinking, pieces: list[str]) -> tuple[str, str]:
    s = ThinkStream(think)
    parts = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


def test_reasoning_is_told_from_the_answer_however_the_reply_is_cut():
    reply = "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How are you?"
    want = ("\nThe user greets me. I greet back.\n", "Hello! How are you?")
    rng = random.Random(2)
    for _ in range(300):  # the same split whatever pieces the reply streams in
        cuts = sorted(rng.sample(range(1, len(reply)), rng.randrange(0, 12)))
        pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
        assert _stream(CLOSED, pieces) == want, pieces
        assert _stream(OPENS, [p for p in "".join(pieces)[len("<think>"):]]) == want
    # no reasoning: all answer, the text that looked like a tag's start included; a reply cut inside its reasoning
    assert _stream(CLOSED, ["<th", "ree> apples"]) == ("", "<three> apples")
    assert _stream(CLOSED, ["  Hi"]) == ("", "  Hi")
    assert _stream(OPENS, ["Let me th", "ink </thi"]) == ("Let me think </thi", "")
    assert _stream(CLOSED, ["<think>a</think>"]) == ("a", "")


def test_reasoning_then_a_tool_call():
    """A model that thinks, then calls a tool in its template's way (auto): the reasoning, no text, the call."""
    choice = ToolChoice((Tool("get", "", {"type": "object"}),), required=False,
                        syntax=CallSyntax("<tool_call>\n", None, "\n</tool_call>"))
    reply = ('<think>\nI need the weather.\n</think>\n\n'
             '<tool_call>\n{"name": "get", "arguments": {"c": 1}}\n</tool_call>')
    assert ReplyStream(CLOSED, choice).whole(reply) == ("\nI need the weather.\n", "", [("get", '{"c": 1}')])
    stream = ReplyStream(CLOSED, choice)
    sent = [stream.feed(reply[i:i + 5]) for i in range(0, len(reply), 5)]
    assert "".join(r for r, _ in sent) == "\nI need the weather.\n" and not "".join(t for _, t in sent)
    assert stream.finish() == ("", "", [("get", '{"c": 1}')])


def test_a_model_thinks_where_its_template_writes_reasoning(smollm2_path, gemma3_path):
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gguf = read_gguf(smollm2_path)
    tok = Tokenizer.from_gguf(gguf)
    opened = ChatTemplate.from_gguf(gguf, override=THINK_CHATML, bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert thinking(opened) == OPENS
    prompt = opened.render([{"role": "user", "content": "Hi"}], options={"enable_thinking": False})
    assert prompt.endswith("<think>\n\n</think>\n\n")
    itself = ChatTemplate(THINK_CHATML.read_text().replace("assistant\\n<think>\\n", "assistant\\n"), "test")
    assert thinking(itself) == CLOSED
    assert thinking(ChatTemplate.from_gguf(gguf)) is None
    gemma = read_gguf(gemma3_path)
    assert thinking(ChatTemplate.from_gguf(gemma)) is None


def test_reasoning_through_the_openai_and_ollama_apis(smollm2_path):
    """SmolLM2 through a template that opens a <think> block: it never closes it, so its whole reply is reasoning,
    given apart from the (empty) answer, whole and streamed; with enable_thinking false, the template closes the
    block first and the reply is the answer."""
    import ollama
    from serving import Served

    s = Served(smollm2_path, "--parallel", "2", "--template", str(THINK_CHATML))
    try:
        c = s.client()
        ask = {"model": s.model, "temperature": 0, "max_tokens": 12,
               "messages": [{"role": "user", "content": "Write a haiku about the sea"}]}
        r = c.chat.completions.create(**ask)
        message = r.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and message.content == "" and r.usage.completion_tokens == 12
        chunks = [ch for ch in c.chat.completions.create(**ask, stream=True) if ch.choices]
        assert "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks) \
            == reasoning
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
        plain = c.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert plain.choices[0].message.content and "reasoning_content" not in (plain.choices[0].message.model_extra
                                                                                or {})
        r = httpx.post(s.base + "/v1/chat/completions", json=ask | {"chat_template_kwargs": {"messages": []}})
        assert r.status_code == 400 and "cannot set 'messages'" in r.json()["error"]["message"]

        o = ollama.Client(host=s.base, timeout=120)
        options = {"temperature": 0, "num_predict": 12}
        r = o.chat(model=s.model, messages=ask["messages"], options=options, stream=False)
        assert r.message.thinking == reasoning and r.message.content == ""
        parts = list(o.chat(model=s.model, messages=ask["messages"], options=options, stream=True, think=True))
        assert "".join(p.message.thinking or "" for p in parts) == reasoning
        off = o.chat(model=s.model, messages=ask["messages"], options=options, stream=False, think=False)
        assert off.message.content == plain.choices[0].message.content and not off.message.thinking
        g = o.generate(model=s.model, prompt=ask["messages"][0]["content"], options=options, stream=False)
        assert g.thinking == reasoning and g.response == ""
        assert "thinking" in o.show(s.model).capabilities
        # a format comes after the reasoning: SmolLM2 never closes it, so the answer never begins; thinking off,
        # the format is the answer at once
        r = c.chat.completions.create(**ask, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
        assert r.choices[0].message.model_extra["reasoning_content"]
        r = c.chat.completions.create(**(ask | {"max_tokens": 60}), response_format={"type": "json_object"},
                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    finally:
        s.stop()


@pytest.mark.parametrize("think", [OPENS, CLOSED])
def test_a_reply_without_reasoning_markers_is_all_answer_or_all_reasoning(think):
    reasoning, answer = _stream(think, ["Just", " an answer."])
    assert (reasoning, answer) == (("Just an answer.", "") if think.opened else ("", "Just an answer."))


@pytest.mark.parametrize("think", [CLOSED, OPENS])
def test_a_format_or_a_required_call_may_come_after_reasoning(think, smollm2_path):
    """A model that thinks reasons first, then writes the format or the call: the grammar takes a <think> block
    (or, where the prompt opened it, the rest of one) before the answer, and nothing but the answer after it."""
    from llmcli.grammar import Constraint, vocabulary_bytes
    from llmcli.json_schema import json_grammar
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    g = json_grammar(schema, think)
    lead = "" if think.opened else "<think>"
    for ok in (lead + "\nSo a is 1.\n</think>\n\n{\"a\": 1}", lead + "x < y, </thin> </think>{\"a\": 2}"):
        assert g.accepts(ok.encode()), ok
    for bad in (lead + "\nhmm\n</think>\n\nThe answer is 1.", lead + "\nstill thinking", lead + "</think> {\"a\": 1}"):
        assert not g.accepts(bad.encode()), bad
    assert g.accepts(b'{"a": 3}') == (not think.opened)  # an answer at once, where the prompt opened nothing
    call = '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>'
    choice = ToolChoice((Tool("get", "", {"type": "object", "properties": {}, "additionalProperties": False}),),
                        required=True, syntax=CallSyntax("<tool_call>\n", None, "\n</tool_call>"))
    tg = choice.grammar(think)
    assert tg.accepts((lead + "I will call get.</think>\n\n" + call).encode())
    assert tg.accepts(call.encode()) == (not think.opened)
    assert not tg.accepts((lead + "I will not call.</think>\n\nNo.").encode())
    reasoning, text, calls = ReplyStream(think, choice).whole(
        lead + "I will call get.</think>\n\n" + call)
    assert (reasoning, text, calls) == ("I will call get.", "", [("get", "{}")])
    tok = Tokenizer.from_gguf(read_gguf(smollm2_path))
    vocab = vocabulary_bytes(tok, tok.vocab_size)
    for prefix in ("", lead, lead + "Hmm <", lead + "Hmm </think", lead + "Hmm </think>\n"):
        c = Constraint(tg, vocab, tok.stop_ids)
        assert c.feed(prefix.encode())
        mask = c.mask().copy()
        assert mask.any() and all(mask[t] == c.allows(t) for t in range(tok.vocab_size))


def test_llm_run_and_chat_keep_the_reasoning_apart(smollm2_path):
    """`llm run`: the reasoning on stderr, only the answer on stdout (SmolLM2 never closes the block the template
    opens: all reasoning); --no-think: the template closes it first, and the reply is the answer; --think on a
    model that does not think: one error line. `llm chat` shows the reasoning and keeps the turn."""
    import subprocess
    import sys

    from serving import ENV

    def llm(*args, input_=""):
        return subprocess.run([sys.executable, "-m", "llmcli", *args], input=input_, capture_output=True, text=True,
                              timeout=600, env=ENV)

    base = ["run", str(smollm2_path), "Write a haiku about the sea", "--template", str(THINK_CHATML),
            "--temperature", "0", "-n", "12"]
    thought = llm(*base)
    assert thought.returncode == 0 and thought.stdout == "\n" and len(thought.stderr.split()) >= 3, thought
    plain = llm(*base, "--no-think")
    assert plain.returncode == 0 and plain.stdout.strip() and not plain.stderr.strip()
    assert thought.stderr.strip() != plain.stdout.strip()  # the prompts differ: one opens the reasoning
    r = llm("run", str(smollm2_path), "Hi", "--think")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: this model does not think: its chat template writes no reasoning"], r.stderr
    chat = llm("chat", str(smollm2_path), "--template", str(THINK_CHATML), "--temperature", "0", "-n", "12",
               input_="Write a haiku about the sea\n/stats\n")
    assert chat.returncode == 0 and thought.stderr.strip() in chat.stdout, chat


def test_an_answer_after_reasoning_is_a_call_only_when_it_is_one():
    """After the reasoning, an answer the grammar did not write (tools offered without the template's own way,
    auto) is read as calls only when it is calls of the tools offered; any other JSON is text."""
    choice = ToolChoice((Tool("get", "", {"type": "object"}),), required=False)
    for answer in ('{"foo": 1}', "[1, 2]", '{"name": "other", "arguments": {}}', '{"name": "get"}', "{bad", "[]"):
        assert ReplyStream(CLOSED, choice).whole("<think>hm</think>\n\n" + answer) == ("hm", answer, None), answer
    assert ReplyStream(CLOSED, choice).whole('<think>hm</think>{"name": "get", "arguments": {"a": 1}}') == (
        "hm", "", [("get", '{"a": 1}')])
