"""Tool calls in a chat template's own way: the syntax read off a template, the grammar that writes calls that way,
the calls read back from a reply, whole or streamed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmcli.grammar import Constraint, vocabulary_bytes
from llmcli.template import ChatTemplate
from llmcli.tools import CallStream, CallSyntax, Tool, ToolChoice, call_syntax

TOOLS_CHATML = Path(__file__).parent / "data" / "tools_chatml.jinja"
HERMES = CallSyntax("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>")
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = (Tool("get", "", CITY), Tool("get_time", "", {"type": "object", "properties": {},
                                                        "additionalProperties": False}))

# A template in the way of Llama 3.1's (written for the tests): tools as JSON in the user's turn, a call as a bare
# JSON object with "parameters", one a line, results in an "ipython" turn; an empty <think> block before
# every reply of the assistant's.
BARE_JSON = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role']) + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'user' and tools and loop.first %}"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ {'name': c['function']['name'], 'parameters': c['function']['arguments']} | tojson }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gguf = read_gguf(smollm2_path)
    return gguf, Tokenizer.from_gguf(gguf)


def _template(gguf, tok, source: str | None = None, path: Path | None = None) -> ChatTemplate:
    if source is not None:
        return ChatTemplate(source, "test", bos_token=tok.bos_token, eos_token=tok.eos_token)
    return ChatTemplate.from_gguf(gguf, override=path, bos_token=tok.bos_token, eos_token=tok.eos_token)


def test_the_call_syntax_is_read_off_the_template(smollm2, gemma3_path):
    gguf, tok = smollm2
    assert call_syntax(_template(gguf, tok, path=TOOLS_CHATML), tok) == HERMES
    assert call_syntax(_template(gguf, tok, BARE_JSON), tok) == CallSyntax("", "\n", "", "name", "parameters")
    # templates that show no tools: SmolLM2's and Gemma 3's own, and ChatML
    assert call_syntax(_template(gguf, tok), tok) is None
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gemma = read_gguf(gemma3_path)
    assert call_syntax(ChatTemplate.from_gguf(gemma), Tokenizer.from_gguf(gemma)) is None
    # calls the grammar cannot write that way: an id inside each call; a call begun with the token that ends the
    # reply; arguments given as a string; a template that fails on tool calls
    with_id = TOOLS_CHATML.read_text().replace(
        "{'name': call['function']['name'],", "{'id': call['id'], 'name': call['function']['name'],")
    stopping = TOOLS_CHATML.read_text().replace("'<tool_call>\\n' +", "'<|im_end|>\\n' +")
    as_string = TOOLS_CHATML.read_text().replace("'arguments': call['function']['arguments']",
                                                 "'arguments': call['function']['arguments'] | tojson")
    failing = TOOLS_CHATML.read_text().replace("{%- for call in message['tool_calls'] or [] %}",
                                               "{{ raise_exception('no calls') }}{%- for call in [] %}")
    for source in (with_id, stopping, as_string, failing):
        assert source != TOOLS_CHATML.read_text()
        assert call_syntax(_template(gguf, tok, source), tok) is None
    # one call a reply where the template writes a second call in another shape
    one = TOOLS_CHATML.read_text().replace("{%- if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}",
                                           "{%- if message['content'] or not loop.first %}{{ '\\n--\\n' }}{% endif %}")
    assert call_syntax(_template(gguf, tok, one), tok).between == "\n</tool_call>\n--\n<tool_call>\n"
    # one call a turn, where the template refuses two (as Llama 3.2's does)
    refuse = "{% if m['tool_calls'] | length > 1 %}{{ raise_exception('one call at a time') }}{% endif %}"
    single = BARE_JSON.replace("{% if m['tool_calls'] %}", "{% if m['tool_calls'] %}" + refuse)
    assert call_syntax(_template(gguf, tok, single), tok) == CallSyntax("", None, "", "name", "parameters")


# A template in the way of Mistral's (written for the tests): a text reply begins with a space, calls with a
# control token (SmolLM2's <repo_name> stands in for [TOOL_CALLS]) and a JSON list of them.
MARKED = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {% if tools and loop.first %}[TOOLS]{{ tools | tojson }}[/TOOLS] {% endif %}"
    "{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %}{% if m['tool_calls'] %}<repo_name> ["
    "{% for c in m['tool_calls'] %}{% if not loop.first %}, {% endif %}"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}{% endfor %}]"
    "{% else %} {{ m['content'] }}{% endif %}<|endoftext|>"
    "{% elif m['role'] == 'tool' %}[RESULTS] {{ m['content'] }}[/RESULTS]{% endif %}{% endfor %}")


# MARKED with an id inside each call and each result, of 9 letters and digits or the template fails (as Mistral's)
MARKED_IDS = MARKED.replace(
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}",
    "{% if c['id'] | length != 9 %}{{ raise_exception('ids of 9') }}{% endif %}"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments'], 'id': c['id']} | tojson }}").replace(
    "[RESULTS] {{ m['content'] }}[/RESULTS]",
    "{% if m['tool_call_id'] | length != 9 %}{{ raise_exception('ids of 9') }}{% endif %}"
    "[RESULTS] {{ {'content': m['content'], 'call_id': m['tool_call_id']} | tojson }}[/RESULTS]")


def test_calls_with_ids_inside(smollm2):
    """A template that writes each call's id inside it, after the arguments, and insists on 9 letters and digits
    (Mistral's): the grammar writes such ids, the reply reads back, and a conversation's ids of any shape (OpenAI's,
    or none, as ollama's) reach the template in its shape, each result with its call's."""
    from llmcli.server import _chat_messages

    gguf, tok = smollm2
    assert MARKED_IDS != MARKED
    template = _template(gguf, tok, MARKED_IDS)
    syntax = call_syntax(template, tok)
    assert syntax == CallSyntax("<repo_name> [", ", ", "]", specials=(3,), id_key="id")
    choice = ToolChoice(TOOLS, required=True, syntax=syntax)
    grammar = choice.grammar()
    call = '{"name": "get", "arguments": {"city": "Paris"}, "id": "%s"}'
    assert grammar.accepts(("<repo_name> [" + call % "a1B2c3D4e" + "]").encode())
    for bad in ("a1B2c3D4", "a1B2c3D4e5", "a1B2c3-4e", ""):
        assert not grammar.accepts(("<repo_name> [" + call % bad + "]").encode()), bad
    assert not grammar.accepts(b'<repo_name> [{"name": "get", "arguments": {"city": "Paris"}}]')
    assert choice.read("<repo_name> [" + call % "a1B2c3D4e" + "]") == [("get", '{"city": "Paris"}')]

    for first, second, results in ((f"call_{'0' * 24}", f"call_{'1' * 24}", ("call_" + "1" * 24, "call_" + "0" * 24)),
                                   (None, None, (None, None))):
        calls = [{"type": "function", "function": {"name": "get", "arguments": json.dumps({"city": city})}}
                 | ({"id": i} if i else {}) for i, city in ((first, "Paris"), (second, "Rome"))]
        body = {"messages": [{"role": "user", "content": "Weather in Paris and Rome?"},
                             {"role": "assistant", "content": None, "tool_calls": calls},
                             *({"role": "tool", "content": f"result {k}"} | ({"tool_call_id": r} if r else {})
                               for k, r in enumerate(results))]}
        messages = _chat_messages(body, syntax)
        ids = [c["id"] for c in messages[1]["tool_calls"]]
        assert all(len(i) == 9 and i.isalnum() for i in ids) and ids[0] != ids[1]
        answered = [m["tool_call_id"] for m in messages[2:]]
        assert answered == (ids[::-1] if first else ids)  # by id where given, else in order
        template.render(messages, tools=[t.as_dict() for t in TOOLS])  # the template takes them


def test_calls_begun_by_a_control_token(smollm2):
    """A template whose calls begin with a control token (Mistral's [TOOL_CALLS]; Hermes' GGUFs mark <tool_call>
    so): the syntax names the token, the grammar's vocabulary gives it its text, so the reply may begin with it,
    and the reply reads back as calls; the token that ends a reply cannot begin calls."""
    gguf, tok = smollm2
    marker = tok.encode("<repo_name>", add_special=False)
    assert len(marker) == 1 and tok.is_special(marker[0]) and marker[0] not in tok.stop_ids
    syntax = call_syntax(_template(gguf, tok, MARKED), tok)
    assert syntax == CallSyntax("<repo_name> [", ", ", "]", specials=tuple(marker))
    choice = ToolChoice(TOOLS, required=True, syntax=syntax)
    grammar = choice.grammar()
    assert grammar.specials == tuple(marker)
    c = Constraint(grammar, vocabulary_bytes(tok, tok.vocab_size, grammar.specials), tok.stop_ids)
    assert c.mask()[marker[0]] and not c.mask()[tok.encode("<|im_start|>", add_special=False)[0]]
    reply = [*marker, *tok.encode(' [{"name": "get", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                                  '"arguments": {}}]', add_special=False)]
    for t in reply:
        assert c.allows(t), tok.piece(t)
        c.take(t)
    assert c.complete
    assert choice.read(tok.decode(reply)) == [("get", '{"city": "Paris"}'), ("get_time", "{}")]
    # without the grammar's own vocabulary the token has no text, and the reply cannot begin with it
    assert not Constraint(grammar, vocabulary_bytes(tok, tok.vocab_size), tok.stop_ids).allows(marker[0])
    assert call_syntax(_template(gguf, tok, MARKED.replace("<repo_name>", "<|endoftext|>")), tok) is None


def test_a_models_tool_use_template_renders_requests_with_tools(smollm2, tmp_path):
    """A GGUF may carry a second template for requests that offer tools (`tokenizer.chat_template.tool_use`, as
    Hermes' do): requests with tools render through it, and the call syntax is read off it; without tools, the
    default one."""
    from conftest import rewritten_gguf
    from gguf import GGUFValueType

    from quant.gguf_file import read_gguf

    gguf, tok = smollm2
    path = rewritten_gguf(gguf, tmp_path / "tool_use.gguf",
                          add={"tokenizer.chat_template.tool_use": (TOOLS_CHATML.read_text(), GGUFValueType.STRING)})
    both = _template(read_gguf(path), tok)
    plain, hermes = _template(gguf, tok), _template(gguf, tok, path=TOOLS_CHATML)
    assert both.tool_use is not None and both.source == plain.source
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [t.as_dict() for t in TOOLS]
    assert both.render(messages) == plain.render(messages)
    assert both.render(messages, tools=tools) == hermes.render(messages, tools=tools) != plain.render(messages)
    assert call_syntax(both, tok) == HERMES
    from test_cli import llm

    shown = llm("show", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["chat_template"]["tool_use"] == TOOLS_CHATML.read_text()
    assert info["tool_calls"]["begin"] == "<tool_call>\n"
    assert "its tool_use template" in llm("show", str(path)).stdout
    # a --template given by the user replaces both
    assert _template(read_gguf(path), tok, path=TOOLS_CHATML).tool_use is None


def test_tool_results_told_in_words_are_one_user_turn(gemma3_path):
    """Where results are told as user turns (the template shows no tools), the results of parallel calls make one
    user turn: Gemma 3's template, which insists that user and assistant take turns, renders them."""
    from llmcli.server import _chat_messages
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gemma = read_gguf(gemma3_path)
    tok = Tokenizer.from_gguf(gemma)
    calls = [{"id": f"call{i}", "type": "function", "function": {"name": "get", "arguments": json.dumps(
        {"city": city})}} for i, city in enumerate(("Paris", "Rome"))]
    body = {"messages": [{"role": "user", "content": "Weather in Paris and Rome?"},
                         {"role": "assistant", "content": None, "tool_calls": calls},
                         {"role": "tool", "tool_call_id": "call0", "content": "sunny"},
                         {"role": "tool", "tool_call_id": "call1", "content": "rain"},
                         {"role": "assistant", "content": "Sunny in Paris, rain in Rome."},
                         {"role": "user", "content": "Thanks"}]}
    messages = _chat_messages(body)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert "sunny" in messages[2]["content"] and "rain" in messages[2]["content"]
    text = ChatTemplate.from_gguf(gemma, bos_token=tok.bos_token, eos_token=tok.eos_token).render(messages)
    assert text.count("<start_of_turn>user") == 3


def _calls_text(syntax: CallSyntax, calls: list[tuple[str, dict]], rng: random.Random) -> str:
    """Calls written as the template writes them, with JSON's whitespace varied."""
    def obj(name, args):
        sep = rng.choice([(", ", ": "), (",", ":"), (",\n  ", ": ")])
        return json.dumps({syntax.name_key: name, syntax.args_key: args}, separators=sep)
    return syntax.begin + (syntax.between or "").join(obj(*c) for c in calls) + syntax.end


@pytest.mark.parametrize("syntax", [HERMES, CallSyntax("", "\n", "", "name", "parameters"),
                                    CallSyntax("[CALLS]", ", ", "[/CALLS]"), CallSyntax("<call>", None, "</call>")])
def test_the_grammar_writes_calls_the_templates_way_and_they_read_back(syntax, smollm2):
    rng = random.Random(3)
    several, one = ToolChoice(TOOLS, False, True, syntax), ToolChoice(TOOLS, True, False, syntax)
    loose, strict = several.grammar(), one.grammar()
    for _ in range(50):
        n = rng.choice([1, 1, 2, 3]) if syntax.between is not None else 1
        calls = [rng.choice([("get", {"city": rng.choice(["Paris", "Rio", "Zürich"])}), ("get_time", {})])
                 for _ in range(n)]
        text = _calls_text(syntax, calls, rng)
        assert loose.accepts(text.encode())
        assert strict.accepts(text.encode()) == (n == 1)
        assert several.read(text) == [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]
        assert several.read(text[:-1]) is None  # cut short: text, not calls
    call = _calls_text(syntax, [("get", {"city": "Paris"})], rng)
    wrong = [call.replace('"get"', '"gets"'), call.replace('"Paris"', "5"),
             call.replace(syntax.begin, syntax.begin[:-1] + "x") if syntax.begin else "x" + call]
    assert not any(loose.accepts(w.encode()) and several.read(w) for w in wrong)
    # text: anything that does not begin as a call does, including text that begins with part of its opening
    for text in ("It is sunny.", "<tool", "<tool_cal!", "[CALL", "<cal", "Sunny {so}"):
        if several.decide(text) is not False:  # may yet be a call
            continue
        assert loose.accepts(text.encode()) and not strict.accepts(text.encode())
        assert several.read(text) is None
    # the compiled mask is a walk of every token, in text, in the opening and inside a call
    gguf, tok = smollm2
    vocab = vocabulary_bytes(tok, tok.vocab_size)
    for prefix in ("", "It", syntax.begin[:3], syntax.begin, call[:len(syntax.begin) + 9], call):
        c = Constraint(loose, vocab, tok.stop_ids)
        assert c.feed(prefix.encode())
        mask = c.mask().copy()
        assert all(mask[t] == c.allows(t) for t in range(tok.vocab_size))


def test_a_streamed_reply_is_split_into_text_and_whole_calls():
    choice = ToolChoice(TOOLS, False, True, HERMES)
    call = '<tool_call>\n{"name": "get", "arguments": {"city": "Rio"}}\n</tool_call>'

    def run(pieces):
        split = CallStream(choice)
        sent = [split.feed(p) for p in pieces]
        return sent, split.finish()

    # a call: nothing sent until it is whole, then the call
    sent, (rest, calls) = run(["<tool", "_call>\n", call[12:30], call[30:]])
    assert not any(sent) and rest == "" and calls == [("get", '{"city": "Rio"}')]
    # text that began like a call: held while it might be one, then sent whole
    sent, (rest, calls) = run(["<to", "day", " it rains"])
    assert sent == ["", "<today", " it rains"] and (rest, calls) == ("", None)
    # a reply that ends while it might still be a call is text; so is a call cut short
    assert run(["<tool_"])[1] == ("<tool_", None)
    assert run([call[:25]])[1] == (call[:25], None)
    # without tools, everything is text as it comes
    split = CallStream(None)
    assert [split.feed(p) for p in ("<tool", "_call>")] == ["<tool", "_call>"] and split.finish() == ("", None)


def test_with_auto_a_call_may_come_after_text(gemma3_path):
    """Where the model may answer in text (auto) and the template marks where calls begin, text may go on into
    calls wherever the marker comes (a model that says or thinks something first); after the marker only calls
    can follow. The machine agrees with reading the reply, on random replies that write the marker, parts of it
    and calls in any order."""
    rng = random.Random(11)
    choice = ToolChoice(TOOLS, False, True, HERMES)
    loose, strict = choice.grammar(), ToolChoice(TOOLS, True, True, HERMES).grammar()
    call = '<tool_call>\n{"name": "get", "arguments": {"city": "Rio"}}\n</tool_call>'
    said = "Let me look. <tool in text is fine\n" + call
    assert loose.accepts(said.encode()) and not strict.accepts(said.encode())
    assert choice.split(said) == ("Let me look. <tool in text is fine\n", [("get", '{"city": "Rio"}')])
    assert choice.split("<" + call) == ("<", [("get", '{"city": "Rio"}')])
    assert not loose.accepts(b"Sure. <tool_call>\nNo call here")
    assert choice.split(said[:-3]) == (said[:-3], None)  # cut short: all text
    pieces = ["<", "tool", "_call>", "\n", "x", " ", "<tool_call>\n", call[12:], "\n</tool_call>", call, "}"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
        whole = HERMES.begin not in text or choice.split(text)[1] is not None
        assert loose.accepts(text.encode()) == whole, text
    # the compiled mask is a walk of every 7th token of Gemma 3's 262k, in text (watching for "<"), in part of the
    # marker, and after it
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(gemma3_path))
    vocab = vocabulary_bytes(tok, tok.vocab_size)
    for prefix in ("Hello", "Hello <", "Hello <tool_call>\n",
                   'a <tool_call>\n{"name": "get_time", "arguments": {}}'):
        c = Constraint(loose, vocab, tok.stop_ids)
        assert c.feed(prefix.encode())
        mask = c.mask().copy()
        assert all(mask[t] == c.allows(t) for t in range(0, tok.vocab_size, 7))


def test_a_streamed_reply_sends_text_before_its_calls():
    choice = ToolChoice(TOOLS, False, True, HERMES)
    call = '<tool_call>\n{"name": "get", "arguments": {"city": "Rio"}}\n</tool_call>'
    split = CallStream(choice)
    sent = [split.feed(p) for p in ("Sure. <to", "ol_call>\n", call[12:40], call[40:])]
    assert sent == ["Sure. ", "", "", ""] and split.finish() == ("", [("get", '{"city": "Rio"}')])
    split = CallStream(choice)
    assert [split.feed(p) for p in ("a <", " b <tool", "s>")] == ["a ", "< b ", "<tools>"]
    assert split.finish() == ("", None)
    split = CallStream(choice)
    assert split.feed("a <tool_c") == "a " and split.finish() == ("<tool_c", None)
