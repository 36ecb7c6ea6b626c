"""JSON output formats as grammars (llmcli/grammar.py): any JSON object, a value that follows a JSON Schema, or a
tool call (llmcli/tools.py).

A schema's objects are written with their declared properties in the declared order (as OpenAI's structured
outputs do), the optional ones skippable; every required property appears. A string's `pattern` and an integer's
bounds become machines of their characters and digits (llmcli/automaton.py). The keywords that constrain a
value and are not enforced here are refused by name rather than ignored, so an output that comes back always
follows its schema; annotations (title, description, format, examples, ...) are ignored, as JSON Schema allows.

Bounds that keep a generation finite: integers and fractions of at most MAX_DIGITS digits, exponents of 3, and
(llmcli/grammar_kernels.py) at most MAX_BLANKS whitespace bytes in a row and MAX_DEPTH levels of nesting.
"""

from __future__ import annotations

import json
import math

from llmcli.automaton import PLAIN, Nfa, integer_range, pattern, utf8_sequences
from llmcli.grammar import Builder, Grammar, GrammarError

MAX_DIGITS = 20
MAX_COUNT = 256  # minItems / maxItems / minLength / maxLength are unrolled into states up to this
DIGITS = b"0123456789"
HEX = b"0123456789abcdefABCDEF"

# Keywords that only describe (JSON Schema lets a validator ignore them), and the ones built into the grammar.
# OpenAPI's `nullable` is among them: JSON Schema ignores it, so leaving null out is valid under both.
ANNOTATIONS = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment",
               "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "strict", "nullable"}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
            "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
            "pattern", *BOUNDS}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
IMPLIED = {"object": {"properties", "required", "additionalProperties"},
           "array": {"items", "prefixItems", "minItems", "maxItems"}, "string": {"minLength", "maxLength", "pattern"},
           "number": set(BOUNDS)}


def json_grammar(schema: dict | bool | None = None, think=None) -> Grammar:
    """None: any JSON object (OpenAI's json_object); else a value that follows `schema` (GrammarError names the
    part of it that cannot be followed). `think`: the reply may reason first (see `_answers`)."""
    j = _JsonMachines(schema)
    b = j.b
    top, end = b.state(), b.state(final=True)  # no blank before or after the value: it is the whole reply
    try:
        value = j.free_object(j.any()) if schema is None else j.value(schema, "schema")
    except RecursionError:
        raise GrammarError("the schema is nested too deeply") from None
    for s in _answers(b, top, think):
        b.call(s, value, end)
    return b.build(top)


def _answers(b: Builder, top: int, think) -> list[int]:
    """The states where the answer may begin, for a model that reasons first (`think`, llmcli/thinking.Thinking:
    its tags, and whether the prompt opened the block): at once or after a reasoning block; where the prompt
    opened the block, only after the reasoning it is in. Without `think`, at once. Blank lines may come between
    the reasoning and the answer."""
    if think is None:
        return [top]
    start = top if think.opened else _spell(b, top, [think.open.encode()])[0]
    after = b.state(structural=False)
    _watch(b, start, think.close.encode(), after, final=False)
    b.edge(after, b"\n", after)
    return [after] if think.opened else [top, after]


def tool_call_grammar(tools: list[tuple[str, object]], text: bool, several: bool = False,
                      wrap: tuple[str, str | None, str] | None = None, keys: tuple[str, ...] = ("name", "arguments"),
                      lazy: bool = False, think=None, id_shape: tuple[bytes, int] = (b"", 0)) -> Grammar:
    """A reply that calls one of `tools` ((name, JSON Schema of its arguments)): {"name": ..., "arguments": ...}
    (`keys` names the two; a third, the call's id, after them: `id_shape` (its characters, how many)) with the
    arguments that tool takes. Without `wrap`, a bare call; with `several`, or a
    JSON list of calls. With `wrap` (before the calls, between two of them or None for one call only, after them),
    as a chat template writes calls, e.g. <tool_call>{...}</tool_call>. With `text`, or else plain text, which
    then does not begin as a call does ("{" or "[" unwrapped; the whole of what comes before a wrapped call); with
    `lazy` too, the text may go on into calls wherever it writes what comes before them. `think`: without text,
    the model may reason first (see `_answers`); text holds any reasoning already."""
    j = _JsonMachines(None)
    b = j.b
    top = b.state()
    start = b.state()  # a call object
    answers = [top] if text else _answers(b, top, think)
    if wrap is None:
        end = b.state(final=True)
        for s in answers:
            b.call(s, start, end)
            if several:
                b.call(s, j.array(start, lo=1), end)
        first = b"{[" if several else b"{"
    else:
        between, after = wrap[1], wrap[2]
        lazy = lazy and text and bool(wrap[0])
        if lazy:
            begin_at = b.state()
            _watch(b, top, wrap[0].encode(), begin_at)
        else:
            begin_at = _spell(b, answers[0], [wrap[0].encode()])[0]
            for s in answers[1:]:
                _spell(b, s, [wrap[0].encode()], into=begin_at)
        done = b.state()
        b.call(begin_at, start, done)
        ends = _spell(b, done, [after.encode()] + ([] if between is None or not several else [between.encode()]))
        b.final[ends[0]] = True
        if len(ends) > 1:
            b.call(ends[1], start, done)
        first = wrap[0].encode()[:1] or b"{"
    if text and not (wrap is not None and lazy):
        free = b.state(final=True, structural=False)
        b.edge(free, range(256), free)
        b.loop[free] = True
        prefix = wrap[0].encode() if wrap is not None else b""
        # text may begin with any part of what begins a call, as long as it then turns away from it
        s = top
        for c in prefix[:-1]:
            b.edge(s, [x for x in range(256) if x != c], free)
            s = b.moves[s][c][0]
        b.edge(s, [c for c in range(256) if c not in (prefix[-1:] if prefix else first)], free)

    def fixed(s: int, data: bytes) -> int:
        """`data` from s, then blanks may follow (JSON's whitespace between tokens)."""
        for i, c in enumerate(data):
            nxt = b.state(structural=i == len(data) - 1)
            b.edge(s, [c], nxt)
            s = nxt
        b.blanks(s)
        return s

    name_key, args_key = (json.dumps(k).encode() for k in keys[:2])
    call_done = b.state(final=True)

    def close(s: int) -> None:
        """From after the arguments: the id where the call has one, then the call's end."""
        if len(keys) > 2:
            s = fixed(fixed(fixed(s, b","), json.dumps(keys[2]).encode()), b":")
            for chars in [b'"'] + [id_shape[0]] * id_shape[1]:
                nxt = b.state(structural=False)
                b.edge(s, chars, nxt)
                s = nxt
            nxt = b.state()
            b.edge(s, b'"', nxt)
            s = nxt
            b.blanks(s)
        b.edge(s, b"}", call_done)

    name_quote = b.state(structural=False)
    b.edge(fixed(fixed(fixed(start, b"{"), name_key), b":"), b'"', name_quote)
    for i, (name, parameters) in enumerate(tools):
        s = j.name(name_quote, name)
        b.blanks(s)
        colon = fixed(fixed(fixed(s, b","), args_key), b":")
        after = b.state()
        b.blanks(after)
        close(after)
        j.root = parameters
        try:
            b.call(colon, j.value(parameters, f"tools[{i}].function.parameters"), after)
        except RecursionError:
            raise GrammarError(f"tools[{i}].function.parameters is nested too deeply") from None
    return b.build(top)


def _watch(b: Builder, top: int, word: bytes, target: int, final: bool = True) -> None:
    """Free text from `top` that goes on at `target` once it has written `word`: each of its states is how much of
    `word` the text ends with (Knuth-Morris-Pratt's automaton), so the machine stays deterministic. `final`: the
    output may end in the text."""
    m = len(word)
    states = [top] + [b.state(final=final, structural=False) for _ in range(m - 1)]
    b.final[top], b.structural[top] = final, False
    for s in states:  # free text, at home in `top` (the mask walks only the tokens that could leave it)
        b.loop[s], b.watch[s] = True, top
    dfa = [[0] * 256 for _ in range(m)]
    dfa[0][word[0]] = 1
    fallback = 0
    for j in range(1, m):
        dfa[j] = dfa[fallback][:]
        dfa[j][word[j]] = j + 1
        fallback = dfa[fallback][word[j]]
    for j in range(m):
        for c, k in enumerate(dfa[j]):
            b.edge(states[j], [c], target if k == m else states[k])


def _spell(b: Builder, s: int, words: list[bytes], into: int | None = None) -> list[int]:
    """States spelling each word from s (words that begin alike share their states, and a word may begin
    another): the state where each word ends (`into`: the last byte of a word goes there)."""
    ends = []
    for word in words:
        at = s
        for i, c in enumerate(word):
            if into is not None and i == len(word) - 1:
                b.edge(at, [c], into)
                at = into
                break
            move = b.moves[at].get(c)
            if move is None:
                nxt = b.state(structural=False)  # the word's own bytes, blanks included, as they are
                b.edge(at, [c], nxt)
                at = nxt
            else:
                at = move[0]
        ends.append(at)
    return ends


class _JsonMachines:
    """Start states of JSON value machines in one Builder, each built once."""

    def __init__(self, root):
        self.b = Builder()
        self.root = root
        self._memo: dict[object, int] = {}

    def _once(self, key, make) -> int:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # --- the machines of JSON's own grammar ---------------------------------------------------------------

    def any(self) -> int:
        """Any JSON value."""
        if "any" in self._memo:
            return self._memo["any"]
        start = self._memo["any"] = self.b.state()
        for part in (self.free_object(start), self.array(start), self.string(), self.number(integer=False),
                     self.literal([b"true", b"false", b"null"])):
            self.b.merge(start, part)
        return start

    def literal(self, values: list[bytes]) -> int:
        """Exactly one of `values` (a trie of them: a value that is a prefix of another may end early)."""
        b = self.b
        start = b.state()
        nodes = {b"": start}
        for value in sorted(set(values)):
            for i in range(1, len(value) + 1):
                if value[:i] not in nodes:
                    nodes[value[:i]] = b.state(structural=False)
                    b.edge(nodes[value[:i - 1]], value[i - 1:i], nodes[value[:i]])
            b.final[nodes[value]] = True
        return start

    def string(self, lo: int = 0, hi: int | None = None) -> int:
        """A JSON string of lo..hi characters (hi None: no limit)."""
        return self._once(("string", lo, hi), lambda: self._string(lo, hi))

    def _string(self, lo: int, hi: int | None) -> int:
        b = self.b
        start, end = b.state(), b.state(final=True)
        top = hi if hi is not None else lo  # counts above `top` are not told apart
        body = [b.state(structural=False) for _ in range(top + 1)]
        b.edge(start, b'"', body[0])
        for k, s in enumerate(body):
            if k >= lo:
                b.edge(s, b'"', end)
            if hi is None or k < hi:
                self._character(s, body[min(k + 1, top)])
        return start

    def _character(self, s: int, nxt: int) -> None:
        """One character of a string from s to nxt: a plain ASCII byte, an escape, or a whole UTF-8 sequence (a
        token may hold part of one; the walk goes on with the next token)."""
        b = self.b
        b.edge(s, PLAIN, nxt)
        b.loop[s] = nxt == s
        esc, *hexes = [b.state(structural=False) for _ in range(5)]
        b.edge(s, b"\\", esc)
        b.edge(esc, b'"\\/bfnrt', nxt)
        b.edge(esc, b"u", hexes[0])
        for h, h_next in zip(hexes, [*hexes[1:], nxt], strict=True):
            b.edge(h, HEX, h_next)
        # a well-formed UTF-8 sequence (as Python decodes)
        utf8_sequences(lambda: b.state(structural=False), b.edge, s, nxt)

    def number(self, integer: bool, negative: bool = True, zero: bool = True) -> int:
        """A JSON number (an integer when `integer`); not negative / not zero when those are False."""
        return self._once(("number", integer, negative, zero), lambda: self._number(integer, negative, zero))

    def _number(self, integer: bool, negative: bool, zero: bool) -> int:
        """-? (0 | [1-9] digits) (. digits)? ([eE] [+-]? digits)?, the optional parts only when not `integer`."""
        b = self.b
        start, minus = b.state(), b.state()
        zero_state = b.state(final=True)
        ints = [b.state(final=True) for _ in range(MAX_DIGITS)]
        for s in (start, minus):
            if zero:
                b.edge(s, b"0", zero_state)
            b.edge(s, b"123456789", ints[0])
        if negative:
            b.edge(start, b"-", minus)
        for s, nxt in zip(ints, ints[1:], strict=False):
            b.edge(s, DIGITS, nxt)
        if integer:
            return start
        dot, e, sign = b.state(), b.state(), b.state()
        fracs = [b.state(final=True) for _ in range(MAX_DIGITS)]
        exps = [b.state(final=True) for _ in range(3)]
        for s in (zero_state, *ints):
            b.edge(s, b".", dot)
        for s in (zero_state, *ints, *fracs):
            b.edge(s, b"eE", e)
        b.edge(dot, DIGITS, fracs[0])
        for run in (fracs, exps):
            for s, nxt in zip(run, run[1:], strict=False):
                b.edge(s, DIGITS, nxt)
        b.edge(e, b"+-", sign)
        for s in (e, sign):
            b.edge(s, DIGITS, exps[0])
        return start

    def free_object(self, value: int, keys: bool = True) -> int:
        """An object whose values start at `value`, any keys (none when not `keys`)."""
        return self._once(("object", value, keys), lambda: self._free_object(value, keys))

    def _free_object(self, value: int, keys: bool) -> int:
        b = self.b
        start, opened, end = b.state(), b.state(), b.state(final=True)
        b.edge(start, b"{", opened)
        b.blanks(opened)
        b.edge(opened, b"}", end)
        if not keys:
            return start
        key, colon, after, comma = b.state(), b.state(), b.state(), b.state()
        body = self.b.state(structural=False)
        b.edge(opened, b'"', body)
        b.edge(comma, b'"', body)
        self._string_body(body, key)
        for s in (key, colon, after, comma):
            b.blanks(s)
        b.edge(key, b":", colon)
        b.call(colon, value, after)
        b.edge(after, b",", comma)
        b.edge(after, b"}", end)
        return start

    def name(self, opened: int, name: str) -> int:
        """The state after `name` (a key, a tool's name) and its closing quote, from `opened` (after the opening
        quote). The names spelled from one state share it as a trie: the bytes where they differ choose."""
        end = _spell(self.b, opened, [json.dumps(name, ensure_ascii=False)[1:].encode()])[0]
        self.b.structural[end] = True  # after the closing quote: between tokens again
        return end

    def _string_body(self, body: int, close: int) -> None:
        """Any string's characters at `body`, its closing quote going to `close`."""
        self.b.edge(body, b'"', close)
        self._character(body, body)

    def array(self, item: int, lo: int = 0, hi: int | None = None, prefix: tuple[int, ...] = ()) -> int:
        """An array of lo..hi items: the first ones start at `prefix`'s states, the others at `item` (-1: there
        are no others)."""
        if item < 0:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        return self._once(("array", item, lo, hi, prefix), lambda: self._array(item, lo, hi, prefix))

    def _array(self, item: int, lo: int, hi: int | None, prefix: tuple[int, ...]) -> int:
        b = self.b
        start, opened, end = b.state(), b.state(), b.state(final=True)
        top = max(hi if hi is not None else max(lo, len(prefix)), 1)
        after = [b.state() for _ in range(top + 1)]  # after[k]: k items written (after[0] unused)

        def nth(k: int) -> int:  # the machine of item k (0-based)
            return prefix[k] if k < len(prefix) else item

        b.edge(start, b"[", opened)
        b.blanks(opened)
        if lo == 0:
            b.edge(opened, b"]", end)
        if hi != 0:
            b.call(opened, nth(0), after[1])
        for k in range(1, top + 1):
            b.blanks(after[k])
            if k >= lo:
                b.edge(after[k], b"]", end)
            if hi is None or k < hi:
                comma = b.state()
                b.blanks(comma)
                b.edge(after[k], b",", comma)
                b.call(comma, nth(k), after[min(k + 1, top)])
        return start

    # --- schemas ------------------------------------------------------------------------------------------

    def value(self, schema, where: str) -> int:
        if schema is True or schema == {}:
            return self.any()
        if schema is False:
            raise GrammarError(f"{where} is false: no value can follow it")
        if not isinstance(schema, dict):
            raise GrammarError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
        for key in schema:
            if key not in ENFORCED and key not in ANNOTATIONS:
                raise GrammarError(f"{where}: the keyword {key!r} is not supported")
        if "$ref" in schema:
            _alone("$ref", [k for k in schema if k in ENFORCED and k not in ("$defs", "definitions")], where)
            ref = schema["$ref"]
            key = ("$ref", id(self.root), ref)  # each tool's parameters are a schema of their own
            if key in self._memo:
                return self._memo[key]
            start = self._memo[key] = self.b.state()
            self.b.merge(start, self.value(self._resolve(ref, where), ref))
            return start
        return self._once(id(schema), lambda: self._value(schema, where))

    def _value(self, schema: dict, where: str) -> int:
        present = sorted(k for k in schema if k in ENFORCED and k not in ("$defs", "definitions"))
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise GrammarError(f"{where}.{key} must be a non-empty list")
                if key == "allOf" and len(alts) > 1:
                    raise GrammarError(f"{where}.allOf of more than one schema is not supported")
                _alone(key, present, where)
                starts = [self.value(a, f"{where}.{key}[{i}]") for i, a in enumerate(alts)]
                if key == "oneOf":  # exactly one: alternatives that begin alike, or untyped ones, could both match
                    for i, a in enumerate(alts):
                        if not self._typed_enough(a):
                            raise GrammarError(f"{where}.oneOf[{i}] needs a 'type' (or an 'enum'), so that a value "
                                               f"matches one alternative only")
                    self.b.disjoint(starts, f"{where}.oneOf")
                return self._union(starts)
        kinds = self._kinds(schema, present, where)
        if "enum" in schema or "const" in schema:
            return self._enum(schema, kinds, present, where)
        if kinds is None:
            return self.any()
        return self._union([self._typed(schema, k, where) for k in kinds])

    def _typed_enough(self, schema, depth: int = 0) -> bool:
        """Whether every value `schema` accepts has a type it names (then the first byte of a value tells its
        type, and alternatives of different first bytes cannot both match)."""
        if not isinstance(schema, dict) or depth > 32:
            return False
        if "type" in schema or "enum" in schema or "const" in schema:
            return True
        if "$ref" in schema:
            try:
                return self._typed_enough(self._resolve(schema["$ref"], ""), depth + 1)
            except GrammarError:
                return False
        alts = next((schema[k] for k in ("anyOf", "oneOf", "allOf") if k in schema), None)
        return isinstance(alts, list) and bool(alts) and all(self._typed_enough(a, depth + 1) for a in alts)

    def _kinds(self, schema: dict, present: list[str], where: str) -> list[str] | None:
        """The types a value may have: `type`, else the one its keywords imply (JSON Schema applies `properties`
        only to objects, but a value written to follow them must be one); None: any."""
        kind = schema.get("type")
        if kind is None:
            implied = [t for t, keys in IMPLIED.items() if keys & set(present)]
            if len(implied) > 1:
                raise GrammarError(f"{where} has keywords of {' and '.join(implied)} values and no 'type'")
            kinds = implied or None
        else:
            kinds = list(kind) if isinstance(kind, list) else [kind]
            if not kinds:
                raise GrammarError(f"{where}.type must not be empty")
            for k in kinds:
                if k not in TYPES:
                    raise GrammarError(f"{where}.type must be one of {', '.join(TYPES)}, got {k!r}")
        if kinds is not None and "number" in kinds and "integer" in kinds:
            kinds.remove("integer")  # an integer is a number: the number machine writes both
        return kinds

    def _enum(self, schema: dict, kinds: list[str] | None, present: list[str], where: str) -> int:
        """`enum` and/or `const`: the values both allow, of the types `kinds` allow, written compactly."""
        _alone("enum" if "enum" in schema else "const", [k for k in present if k != "type"],
               where, also=("enum", "const"))
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise GrammarError(f"{where}.enum must be a non-empty list")
        try:
            texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False) for v in values]
            if "const" in schema:
                const = json.dumps(schema["const"], ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                texts = [t for t in texts if t == const]
        except ValueError as e:  # NaN or infinity: not JSON
            raise GrammarError(f"{where}: {e}") from None
        if kinds is not None:
            texts = [t for t in texts if _json_kind(json.loads(t)) in kinds
                     or (_json_kind(json.loads(t)) == "integer" and "number" in kinds)]
        if not texts:
            raise GrammarError(f"{where}: no value of its 'enum'/'const' is allowed by its other keywords")
        return self.literal([t.encode() for t in texts])

    def _union(self, starts: list[int]) -> int:
        if len(starts) == 1:
            return starts[0]
        start = self.b.state()
        for s in starts:
            self.b.merge(start, s)
        return start

    def _typed(self, schema: dict, kind: str, where: str) -> int:
        if kind == "object":
            return self._object(schema, where)
        if kind == "array":
            lo, hi = self._range(schema, "minItems", "maxItems", where)
            first = schema.get("prefixItems", [])
            if not isinstance(first, list):
                raise GrammarError(f"{where}.prefixItems must be a list")
            prefix = tuple(self.value(p, f"{where}.prefixItems[{i}]") for i, p in enumerate(first))
            items = schema.get("items", True)
            return self.array(-1 if items is False else self.value(items, f"{where}.items"), lo, hi, prefix)
        if kind == "string":
            if "pattern" in schema:
                return self._pattern(schema, where)
            return self.string(*self._range(schema, "minLength", "maxLength", where))
        if kind in ("number", "integer"):
            return self._numeric(schema, kind, where)
        return self.literal({"boolean": [b"true", b"false"], "null": [b"null"]}[kind])

    def _pattern(self, schema: dict, where: str) -> int:
        """A string that `pattern` matches (llmcli/automaton.py)."""
        regex = schema["pattern"]
        if not isinstance(regex, str):
            raise GrammarError(f"{where}.pattern must be a string")
        for key in ("minLength", "maxLength"):
            if key in schema:
                raise GrammarError(f"{where}: 'pattern' together with {key!r} is not supported (put the length in "
                                   f"the pattern)")

        def make() -> int:
            b = self.b
            nfa = Nfa()
            first, last = nfa.state(), nfa.state()
            pattern(nfa, first, last, regex)
            start, body, end = b.state(), b.state(structural=False), b.state(final=True)
            b.edge(start, b'"', body)
            for s in nfa.write(b, first, last, body, f"{where}.pattern"):
                b.edge(s, b'"', end)
            return start

        return self._once(("pattern", regex), make)

    def _numeric(self, schema: dict, kind: str, where: str) -> int:
        """A number or an integer within its bounds: an integer's bounds, any of them, through a machine of its
        digits (llmcli/automaton.py); a number's only for `minimum` 0 (it drops the sign); others are refused."""
        bounds = {k: schema[k] for k in BOUNDS if k in schema}
        for key, v in bounds.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise GrammarError(f"{where}.{key} must be a number, got {v!r}")
        if not bounds:
            return self.number(integer=kind == "integer")
        if kind == "number":
            if bounds == {"minimum": 0}:
                return self.number(integer=False, negative=False)
            raise GrammarError(f"{where}: a number's bounds are followed only for 'minimum': 0")
        lows = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
        lows += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
        highs = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
        highs += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
        lo, hi = max(lows, default=None), min(highs, default=None)
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"{where}: no integer is within its bounds")

        def make() -> int:
            nfa = Nfa()
            first, last = nfa.state(), nfa.state()
            try:
                integer_range(nfa, first, last, lo, hi, MAX_DIGITS)
            except GrammarError as e:
                raise GrammarError(f"{where}: {e}") from None
            start = self.b.state()
            for s in nfa.write(self.b, first, last, start, f"{where}'s bounds"):
                self.b.final[s] = True
            return start

        return self._once(("integer", lo, hi), make)

    def _range(self, schema: dict, lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
        """(minimum, maximum or None) of a count."""
        lo, hi = (schema.get(k) for k in (lo_key, hi_key))
        for key, n in ((lo_key, lo), (hi_key, hi)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_COUNT):
                raise GrammarError(f"{where}.{key} must be an integer in 0..{MAX_COUNT}, got {n!r}")
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"{where}.{lo_key} {lo} is over {hi_key} {hi}")
        return lo or 0, hi

    def _object(self, schema: dict, where: str) -> int:
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict) or not isinstance(required, list):
            raise GrammarError(f"{where}: 'properties' must be an object and 'required' a list")
        banned = [n for n, v in props.items() if v is False]  # `"a": false`: a must not appear
        if any(n in required for n in banned):
            raise GrammarError(f"{where} requires {banned[0]!r} and forbids it")
        names = [n for n in props if n not in banned]
        undeclared = [r for r in required if isinstance(r, str) and r not in props]
        if undeclared and extra is False:
            raise GrammarError(f"{where} requires {undeclared[0]!r}, which it does not declare and does not allow")
        names += undeclared  # required, and valued as additionalProperties says
        if not names:
            if extra is False:
                return self.free_object(self.any(), keys=False)
            return self.free_object(self.value(extra, f"{where}.additionalProperties"))
        values = [self.value(props[n], f"{where}.properties.{n}") if n in props
                  else self.value(extra, f"{where}.additionalProperties") for n in names]
        return self._declared(names, [n in required for n in names], values)

    def _declared(self, names: list[str], required: list[bool], values: list[int]) -> int:
        """An object of these properties in this order; the ones not required may be left out."""
        b = self.b
        start, opened, end = b.state(), b.state(), b.state(final=True)
        b.edge(start, b"{", opened)
        b.blanks(opened)
        n = len(names)
        after = [b.state() for _ in range(n)]

        def candidates(i: int) -> list[int]:
            """The properties that may come after property i (-1: first): up to and with the next required."""
            out = []
            for j in range(i + 1, n):
                out.append(j)
                if required[j]:
                    break
            return out

        def done_after(i: int) -> bool:
            return not any(required[i + 1:])

        tries: dict[tuple[int, ...], int] = {}

        def key_trie(cands: list[int]) -> int:
            """The state after a key's opening quote: the bytes of the candidates' names, then `"`, `:`."""
            if tuple(cands) in tries:
                return tries[tuple(cands)]
            root = tries[tuple(cands)] = b.state(structural=False)
            for j in cands:
                s = self.name(root, names[j])
                colon = b.state()
                b.blanks(s)
                b.edge(s, b":", colon)
                b.blanks(colon)
                b.call(colon, values[j], after[j])
            return root

        if done_after(-1):
            b.edge(opened, b"}", end)
        b.edge(opened, b'"', key_trie(candidates(-1)))
        for i in range(n):
            b.blanks(after[i])
            if done_after(i):
                b.edge(after[i], b"}", end)
            if candidates(i):
                comma = b.state()
                b.blanks(comma)
                b.edge(after[i], b",", comma)
                b.edge(comma, b'"', key_trie(candidates(i)))
        return start

    def _resolve(self, ref, where: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"{where}.$ref must point inside the schema ('#/...'), got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise GrammarError(f"{where}.$ref {ref!r} points at nothing")
            node = node[part]
        return node


def _alone(key: str, present: list[str], where: str, also: tuple[str, ...] = ()) -> None:
    """`key` is enforced on its own: a schema that adds other constraints to it is refused, not half-followed."""
    others = [k for k in present if k != key and k not in also]
    if others:
        raise GrammarError(f"{where}: {key!r} together with {', '.join(map(repr, others))} is not supported")


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]
