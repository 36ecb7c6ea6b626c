"""Tool calls: the functions a request offers the model, what the model is told about them, the grammar its reply
follows, and the call read back from the reply.

Where the model's chat template shows tools and writes calls (Qwen's and Hermes' <tool_call> tags, Llama 3's
bare JSON, ...), the model gets the tools and its past calls and results that way, as it was trained, and a call
is written the way the template writes one: `call_syntax` reads that off the template by rendering a probe
conversation. Many templates (SmolLM2's, Gemma 3's) have no way at all; then the model is told in its system
message, in words and JSON Schema, and a call is a bare JSON object {"name": ..., "arguments": {...}}. Either way
the grammar (llmcli/json_schema.tool_call_grammar) makes the call well formed: the name one of the tools', the
arguments what that tool takes. Where the model may also answer in text ("auto"), a reply that begins as a call
does is a call and any other is text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from functools import lru_cache

from llmcli.grammar import Grammar
from llmcli.json_schema import tool_call_grammar
from quant.errors import FieldError, LlmError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict | bool  # JSON Schema of the arguments

    def as_dict(self) -> dict:
        """OpenAI's (and chat templates') form of a tool."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class CallSyntax:
    """How a chat template writes tool calls: `begin`, then call objects {name_key: ..., args_key: {...}}
    separated by `between` (None: one call a reply), then `end`. `results`: the template renders `tool` messages
    (else a result goes back as a user turn). `specials`: the control tokens those pieces hold (Hermes' GGUFs mark
    <tool_call> so), which the grammar writes as their text."""

    begin: str
    between: str | None
    end: str
    name_key: str = "name"
    args_key: str = "arguments"
    results: bool = True
    specials: tuple[int, ...] = ()
    id_key: str | None = None  # the key of the call's id, after the arguments (Mistral's): ID_LENGTH of ID_CHARS


@dataclass(frozen=True)
class ToolChoice:
    """The tools a reply may call, and whether it must call one (else it may be text)."""

    tools: tuple[Tool, ...]
    required: bool
    several: bool = True  # several calls in one reply: OpenAI's parallel_tool_calls
    syntax: CallSyntax | None = None  # the template's way of writing calls; None: a bare JSON object (or list)
    ids: CallIds | None = field(default=None, compare=False)  # the reply's call ids (llm serve)

    @property
    def lazy(self) -> bool:
        """Calls may come after text: where the template marks where calls begin and the reply may be text (a
        model may think or say something first; calls then begin wherever the marker comes)."""
        return not self.required and self.syntax is not None and bool(self.syntax.begin)

    def grammar(self, think=None) -> Grammar:
        """`think` (llmcli/thinking.Thinking): the model may reason before it calls."""
        wrap, keys = None, ("name", "arguments")
        if self.syntax is not None:
            x = self.syntax
            wrap, keys = (x.begin, x.between, x.end), (x.name_key, x.args_key, *([x.id_key] if x.id_key else []))
        grammar = tool_call_grammar([(t.name, t.parameters) for t in self.tools], text=not self.required,
                                    several=self.several, wrap=wrap, keys=keys, lazy=self.lazy, think=think,
                                    id_shape=(ID_CHARS.encode(), ID_LENGTH))
        grammar.specials = tuple(self.syntax.specials) if self.syntax is not None else ()
        return grammar

    def decide(self, text: str) -> bool | None:
        """Whether a reply that begins with `text` is a call; None while `text` could still turn out either way.
        (With `lazy` calls, where they begin is found by `split`.)"""
        if self.syntax is None or not self.syntax.begin:
            return text.startswith(("{", "[") if self.several and self.syntax is None else "{") if text else None
        begin = self.syntax.begin
        if text.startswith(begin):
            return True
        return None if begin.startswith(text) else False

    def split(self, text: str) -> tuple[str, list[tuple[str, str]] | None]:
        """A reply -> (its text, its calls): the text before the calls (all of it where no whole calls end the
        reply, such as calls cut short), and [(name, arguments as JSON text)] or None."""
        at = text.find(self.syntax.begin) if self.lazy else 0
        calls = self.read(text[at:]) if at >= 0 else None
        return (text[:at], calls) if calls is not None else (text, None)

    def read(self, text: str) -> list[tuple[str, str]] | None:
        """[(name, arguments as JSON text)] when the reply is a whole call or list of calls of these tools; None
        for text (or calls cut short). Where the grammar wrote the reply, a call that parses has the call's shape;
        an answer after a model's reasoning is looked at as any text is."""
        if not self.decide(text):
            return None
        keys = ("name", "arguments") if self.syntax is None else (self.syntax.name_key, self.syntax.args_key)
        if self.syntax is None:
            try:
                calls = json.loads(text)
            except (ValueError, RecursionError):
                return None
            calls = calls if isinstance(calls, list) else [calls]
        else:
            x, decoder, calls = self.syntax, json.JSONDecoder(), []
            at = len(x.begin)
            while True:
                try:
                    call, at = decoder.raw_decode(text, at)
                except (ValueError, RecursionError):
                    return None
                calls.append(call)
                if text[at:] == x.end:
                    break
                if x.between is None or not text.startswith(x.between, at):
                    return None
                at += len(x.between)
        names = {t.name for t in self.tools}
        if not calls or not all(isinstance(c, dict) and c.get(keys[0]) in names and keys[1] in c for c in calls):
            return None
        return [(c[keys[0]], json.dumps(c[keys[1]], ensure_ascii=False)) for c in calls]

    def instructions(self) -> str:
        """What the system message tells a model whose template does not show tools."""
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                      ensure_ascii=False) for t in self.tools)
        how = '{"name": "<function name>", "arguments": {<its arguments>}}'
        several = " To call several at once, reply with a JSON list of such objects." if self.several else ""
        if self.required:
            return (f"You have these functions (their arguments as JSON Schema):\n{listed}\n"
                    f"Reply with only a JSON object that calls one of them: {how}.{several}")
        return (f"You can call these functions (their arguments as JSON Schema):\n{listed}\n"
                f"To call one, reply with only a JSON object: {how}.{several} Otherwise reply in plain text.")


class CallStream:
    """A streamed reply split into text, sent as it comes, and calls, held until they are whole."""

    def __init__(self, choice: ToolChoice | None):
        self.choice = choice
        self.pending = ""  # text that may yet begin a call
        self.decided = choice is None
        self.call: str | None = None  # the text of the calls being written

    def feed(self, text: str) -> str:
        """The next piece of the reply -> the text to send now."""
        if self.call is not None:
            self.call += text
            return ""
        if self.decided:
            return text
        if self.choice.lazy:  # text until the marker of calls, held back while the text ends with part of it
            begin, held = self.choice.syntax.begin, self.pending + text
            at = held.find(begin)
            if at >= 0:
                self.call, self.pending = held[at:], ""
                return held[:at]
            keep = tail_overlap(held, begin)
            self.pending = held[len(held) - keep:]
            return held[:len(held) - keep]
        self.pending += text
        verdict = self.choice.decide(self.pending)
        if verdict is None:
            return ""
        self.decided = True
        out, self.pending = self.pending, ""
        if verdict:
            self.call = out
            return ""
        return out

    def finish(self) -> tuple[str, list[tuple[str, str]] | None]:
        """At the end of the reply: (text still to send, the calls or None). Calls cut short come back as text."""
        if self.call is not None:
            return self.choice.split(self.call)
        return self.pending, None


def tail_overlap(text: str, word: str) -> int:
    """The length of the longest end of `text` that `word` begins with (shorter than `word`)."""
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if word.startswith(text[-n:]):
            return n
    return 0


_PROBE_TOOL = Tool("probe_weather", "probe tool description", {
    "type": "object", "properties": {"probe_city": {"type": "string"}}, "required": ["probe_city"]})


ID_LENGTH = 9  # letters and digits of a call id where the template writes ids inside calls (Mistral's insist on 9)
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def call_id(syntax: CallSyntax | None) -> str:
    """A new call's id: OpenAI's shape, or the template's where it writes ids inside calls."""
    if syntax is not None and syntax.id_key:
        return "".join(secrets.choice(ID_CHARS) for _ in range(ID_LENGTH))
    return "call_" + secrets.token_hex(12)


class CallIds:
    """One reply's call ids, each made when first asked for: `llm serve` gives them in its response and writes them
    into its guess at the conversation's next request, which must agree where the template writes ids inside calls.
    The two ask from different threads."""

    def __init__(self, syntax: CallSyntax | None):
        self.syntax, self._ids, self._lock = syntax, [], threading.Lock()

    def __getitem__(self, j: int) -> str:
        with self._lock:
            while len(self._ids) <= j:
                self._ids.append(call_id(self.syntax))
            return self._ids[j]


def template_id(call_id: str | None, n: int) -> str:
    """A call's id as a template that writes ids inside calls takes it: the id itself where it has that shape, else
    one made from it (the same for the call and its result; the n-th call's where there is none)."""
    if call_id is not None and len(call_id) == ID_LENGTH and call_id.isascii() and call_id.isalnum():
        return call_id
    digest = hashlib.sha256((call_id if call_id is not None else f"call {n}").encode()).digest()
    return "".join(ID_CHARS[b % len(ID_CHARS)] for b in digest[:ID_LENGTH])


def _probe_call(i: int) -> dict:
    # ids of 9 letters and digits: some templates (Mistral's) insist on that shape
    return {"id": f"probe{i:04d}", "type": "function",
            "function": {"name": _PROBE_TOOL.name, "arguments": {"probe_city": f"probe_city_{i}"}}}


@lru_cache(maxsize=8)
def call_syntax(template, tokenizer) -> CallSyntax | None:
    """How `template` (a ChatTemplate) writes tool calls, read off a probe conversation; None where it does not show
    tools, writes calls in a shape this cannot follow (ids or other keys inside a call, arguments as a string), or
    ends them with a token that stops the reply."""
    tools = [_PROBE_TOOL.as_dict()]
    user = {"role": "user", "content": "probe question"}

    def render(messages, prompt=False):
        return template.render(messages, add_generation_prompt=prompt, tools=tools)

    def assistant(n):
        return {"role": "assistant", "content": "", "tool_calls": [_probe_call(i) for i in range(n)]}

    try:
        base = render([user], prompt=True)
        if _PROBE_TOOL.description not in base:
            return None
        texts = [render([user, m]) for m in ({"role": "assistant", "content": "probe answer"}, assistant(1))]
        result = render([user, assistant(1), {"role": "tool", "content": "probe result", "name": _PROBE_TOOL.name,
                                              "tool_call_id": "probe0000"}], prompt=True)
    except LlmError:
        return None
    try:
        texts.append(render([user, assistant(2)]))
    except LlmError:  # a template that takes one call a turn (Llama 3.2's)
        pass
    if not all(t.startswith(base) for t in texts) or "probe answer" not in texts[0][len(base):]:
        return None
    # what the template writes around any reply, text or calls: e.g. an empty <think> block before it, <|im_end|>
    # after it (a text reply's own lead, such as Mistral's space after [/INST], is the reply's)
    bodies = [t[len(base):] for t in texts]
    lead, turn_end = bodies[0].split("probe answer", 1)
    lead = os.path.commonprefix([lead, *bodies[1:]])
    turn_end = os.path.commonprefix([turn_end[::-1], *(b[::-1] for b in bodies[1:])])[::-1]
    parts = [_find_calls(body[len(lead):len(body) - len(turn_end)], n) for n, body in enumerate(bodies[1:], 1)]
    if parts[0] is None:
        return None
    (begin, end, keys, _), two = parts[0], parts[1] if len(parts) > 1 else None
    between = None  # one call a turn, unless two calls are written as one is, with something between them
    if two is not None and two[0] == begin and two[1] == end and two[2] == keys:
        between = two[3]
    keys, id_key = keys[:2], keys[2] if len(keys) > 2 else None
    specials = sorted({t for piece in (begin, between or "", end) for t in tokenizer.encode(piece, add_special=False)
                       if tokenizer.is_special(t)})
    if set(specials) & set(tokenizer.stop_ids):
        return None
    return CallSyntax(begin, between, end, *keys, results="probe result" in result, specials=tuple(specials),
                      id_key=id_key)


def _find_calls(body: str, n: int):
    """The probe's n calls in an assistant turn -> (text before them, after them, (name key, arguments key[, id
    key]), text between the first two); None where they are not n plain JSON objects of those keys, in that order
    (the id last)."""
    decoder, found = json.JSONDecoder(), []
    at = 0
    for i in range(n):
        while True:
            at = body.find("{", at)
            if at < 0:
                return None
            try:
                obj, stop = decoder.raw_decode(body, at)
            except ValueError:
                at += 1
                continue
            if isinstance(obj, dict) and _PROBE_TOOL.name in obj.values():
                break
            at += 1
        keys = [k for k, v in obj.items() if v == _PROBE_TOOL.name] + [
            k for k, v in obj.items() if v == {"probe_city": f"probe_city_{i}"}] + [
            k for k, v in obj.items() if v == _probe_call(i)["id"]]
        if len(keys) != len(obj) or list(obj) != keys or len(obj) not in (2, 3):
            return None
        found.append((at, stop, tuple(keys)))
        at = stop
    if any(f[2] != found[0][2] for f in found):
        return None
    between = body[found[0][1]:found[1][0]] if n > 1 else None
    return body[:found[0][0]], body[found[-1][1]:], found[0][2], between


def with_instructions(messages: list[dict], choice: ToolChoice) -> list[dict]:
    """`messages` with the tools' instructions at the end of the system message (one is added first if none)."""
    text = choice.instructions()
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_text(calls: list[tuple[str, str]]) -> str:
    """Calls ((name, arguments as JSON text)) as the model writes them without its template's way: an earlier
    assistant turn that called tools, given back in the prompt. Arguments that are not JSON are given back as the
    string they are."""
    written = [json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
               for name, arguments in calls]
    return written[0] if len(written) == 1 else "[" + ", ".join(written) + "]"


def template_calls(calls: list[tuple[str, str, str | None]]) -> list[dict]:
    """Calls ((name, arguments as JSON text, id)) as chat templates take them on an assistant message."""
    return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": _arguments(arguments)}}
            for name, arguments, call_id in calls]


def _arguments(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def result_text(name: str | None, content: str) -> str:
    """A tool's result as the user turn that gives it back (`name`: the function, where its call is known)."""
    return f"{f'The function {name}' if name else 'A function'} returned: {content}"


def parse_tools(tools, choice, parallel=None) -> ToolChoice | None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` -> what the reply may call; None: no tool (text).
    FieldError names the request field that is wrong."""
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls", "must be true or false")
    several = parallel is not False
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise FieldError("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise FieldError("tools", "must be a list of tools")
    parsed: dict[str, Tool] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise FieldError(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ...}}')
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise FieldError(f"tools[{i}].function.name", "must be 1 to 64 letters, digits, '_' or '-'")
        if name in parsed:
            raise FieldError(f"tools[{i}].function.name", f"{name!r} is given twice")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise FieldError(f"tools[{i}].function.description", "must be a string")
        parameters = fn.get("parameters", NO_ARGUMENTS)
        if not isinstance(parameters, dict | bool):
            raise FieldError(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        parsed[name] = Tool(name, description, parameters)
    if choice in (None, "auto"):
        return ToolChoice(tuple(parsed.values()), required=False, several=several)
    if choice == "none":
        return None
    if choice == "required":
        return ToolChoice(tuple(parsed.values()), required=True, several=several)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise FieldError("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                        '{"name": ...}}')
    if name not in parsed:
        raise FieldError("tool_choice", f"names {name!r}, which is not among 'tools'")
    return ToolChoice((parsed[name],), required=True, several=several)
