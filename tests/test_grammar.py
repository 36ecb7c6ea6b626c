"""Constrained decoding (llmcli/grammar.py, llmcli/json_schema.py): the JSON machines against Python's json module
and the `jsonschema` validator, the compiled token mask against a walk of each token, and greedy generation on
the real models that is the argmax of the allowed tokens and parses."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from llmcli.grammar import Constraint, GrammarError, VocabularyBytes, vocabulary_bytes
from llmcli.json_schema import BOUNDS, MAX_DIGITS, TYPES, json_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "ab", "b", 1, None]}, "minItems": 1, "maxItems": 3},
        "pet": {"$ref": "#/$defs/pet"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "friends": {
        "type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 2}}, "required": ["kind"]}},
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "boolean"}},
    {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "object", "additionalProperties": {"type": "null"}}]},
    {"type": "object", "additionalProperties": False},
    {"type": "string", "minLength": 3},
    True,
]
BYTES = VocabularyBytes([bytes([b]) for b in range(256)])  # a vocabulary of single bytes


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randrange(-10**12, 10**12)
    if kind == 2:
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-30, 30)
    if kind in (3, 4):
        return "".join(rng.choice('ab "\\\n\t/é€😀\u0001') for _ in range(rng.randrange(8)))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_json(rng, 9) if rng.random() < 0.2 else f"k{i}": _random_json(rng, depth + 1)
            for i in range(rng.randrange(4))}


def _dumps(rng: random.Random, value) -> bytes:
    """`value` as JSON, written one of several ways (compact, indented, ASCII-escaped or not)."""
    if isinstance(value, dict):
        value = {str(k): v for k, v in value.items()}
    indent = rng.choice([None, 1, 2, "\t"])
    # a run of blanks is [\n][ \t]* (no blank before a newline): "," before a line break, ", " within a line
    comma = "," if indent is not None else rng.choice([",", ", "])
    text = json.dumps(value, indent=indent, ensure_ascii=rng.random() < 0.5,
                      separators=(comma, rng.choice([":", ": ", " : "])))
    return text.encode()


def test_any_value_machine_accepts_exactly_what_json_loads_accepts():
    """Every value json.dumps writes (within the bounds: digits, blanks) is accepted; a mutated text is accepted
    only if json.loads reads it (the machine never lets an invalid output through)."""
    rng = random.Random(7)
    anything, an_object = json_grammar(True), json_grammar()
    accepted_mutants = 0
    for _ in range(600):
        value = _random_json(rng)
        text = _dumps(rng, value)
        assert anything.accepts(text), text
        assert an_object.accepts(text) == isinstance(value, dict), text
        for _ in range(5):
            b = bytearray(text)
            i = rng.randrange(len(b) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(b):
                del b[i]
            elif op == 1:
                b.insert(i, rng.choice(b'{}[]",:0-.eE \\tfnu1x'))
            elif i < len(b):
                b[i] = rng.choice(b'{}[]",:0-.eE \\tfnu1x')
            if anything.accepts(bytes(b)):
                accepted_mutants += 1
                json.loads(bytes(b))  # raises if the machine let an invalid text through (UTF-8 included)
    assert accepted_mutants > 100  # the mutations were not all rejected for some trivial reason


def test_bounds_keep_a_generation_finite():
    g = json_grammar(True)
    assert g.accepts(b"1" * MAX_DIGITS) and not g.accepts(b"1" * (MAX_DIGITS + 1))
    assert g.accepts(b"[\n" + b" " * 20 + b"1]") and not g.accepts(b"[\n" + b" " * 21 + b"1]")
    assert g.accepts(b"[\t 1,\n 2]") and not g.accepts(b"[\n\n1]") and not g.accepts(b"[ \n1]")
    assert not g.accepts(b"[\r\n1]") and not g.accepts(b" 1") and not g.accepts(b"1\n")
    assert g.accepts(b"[" * 60 + b"]" * 60) and not g.accepts(b"[" * 70 + b"]" * 70)
    assert not g.accepts(b"1 ") and not g.accepts(b"01") and not g.accepts(b"1.") and not g.accepts(b"")
    assert g.accepts(b'"\\ud83d\\ude00\\n"') and not g.accepts(b'"\\x"') and not g.accepts(b'"\n"')


def _walk_randomly(g, rng: random.Random, limit: int = 400) -> bytes | None:
    """A random output of grammar `g`, byte by byte (None when it runs past `limit` bytes)."""
    c = Constraint(g, BYTES)
    out = bytearray()
    while len(out) < limit:
        if c.complete and (c.finished or rng.random() < 0.3):
            return bytes(out)
        choices = np.flatnonzero(c.mask()).tolist()
        choices = [b for b in choices if b < 0x80 or rng.random() < 0.2] or choices
        b = rng.choice(choices)
        assert c.feed(bytes([b]))
        out.append(b)
    return None


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "bools", "anyof", "empty-object", "string3", "true"])
def test_what_a_schema_grammar_writes_follows_the_schema(schema):
    """Random walks through the grammar end in texts that parse and that jsonschema validates; valid instances
    written in the schema's property order are accepted."""
    g = json_grammar(schema)
    validator = Draft202012Validator(schema)
    rng = random.Random(3)
    done = 0
    for _ in range(300):
        text = _walk_randomly(g, rng)
        if text is None:
            continue
        value = json.loads(text)  # well-formed UTF-8 too, though bytes >= 0x80 were among the random choices
        assert validator.is_valid(value), (text, list(validator.iter_errors(value)))
        done += 1
    assert done > 100


def test_a_schema_grammar_accepts_valid_instances_and_refuses_invalid_ones():
    g = json_grammar(PERSON)
    good = [{"name": "Tom", "age": 3, "tags": ["ab"]},
            {"name": "Ann Lee", "age": -1, "email": None, "tags": [1, None, "b"], "pet": {"kind": "cat", "friends": [
                {"kind": "cat"}, {"kind": "cat", "friends": []}]}, "score": 2.5e-3}]
    bad = [{"name": "Tom", "age": 3},  # a required property missing
           {"name": "", "age": 3, "tags": ["a"]},  # minLength
           {"name": "Tom", "age": 3.5, "tags": ["a"]},  # not an integer
           {"name": "Tom", "age": 3, "tags": []},  # minItems
           {"name": "Tom", "age": 3, "tags": ["a", "a", "a", "a"]},  # maxItems
           {"name": "Tom", "age": 3, "tags": ["c"]},  # not in the enum
           {"name": "Tom", "age": 3, "tags": ["a"], "extra": 1},  # additionalProperties false
           {"age": 3, "name": "Tom", "tags": ["a"]}]  # out of the schema's order: never written
    validator = Draft202012Validator(PERSON)
    for value in good:
        assert validator.is_valid(value)
        for indent in (None, 2):
            assert g.accepts(json.dumps(value, indent=indent).encode()), value
    for value in bad:
        assert not g.accepts(json.dumps(value).encode()), value
    assert g.accepts('{"name": "Zoë 😀", "age": 0, "tags": ["a"]}'.encode())  # characters, not bytes, counted


@pytest.mark.parametrize("schema,says", [
    ({"type": "string", "pattern": "(?=a)"}, "'pattern' '(?=a)': a group (?=...) is not supported"),
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "'pattern' together with 'maxLength' is not supported"),
    ({"type": "string", "pattern": '^"+$'}, "matches no string that can be written without escapes"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}},
     "schema.properties.n: the keyword 'multipleOf' is not supported"),
    ({"type": "number", "maximum": 5}, "only for 'minimum': 0"),
    ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, "no integer is within its bounds"),
    ({"anyOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}, "both start with b'{'"),
    (False, "no value can follow it"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "must point inside the schema"),
    ({"type": "array", "maxItems": 10**9}, "maxItems must be an integer in 0..256"),
    ({"type": "thing"}, "type must be one of"),
    ({"allOf": [{"type": "string"}, {"minLength": 2}]}, "allOf of more than one"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"$ref": "#"}, "never says how its value starts"),
    ({"oneOf": [{"type": "string"}, {"properties": {"a": {}}}]}, "oneOf[1] needs a 'type'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "could not tell them apart"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "title": "s"}]}, "two alternatives can begin with the same"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "does not declare and does not allow"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 is over maxLength 2"),
    ({"type": "string", "enum": [1, 2]}, "no value of its 'enum'/'const' is allowed"),
    ({"enum": ["a"], "minLength": 2}, "'enum' together with 'minLength' is not supported"),
    ({"properties": {"a": {}}, "items": {}}, "keywords of object and array values and no 'type'"),
    ({"enum": list(range(100000))}, "more than 20000 states"),
    ([1, 2], "must be a JSON Schema object"),
])
def test_a_schema_that_cannot_be_followed_is_refused_by_name(schema, says):
    with pytest.raises(GrammarError) as e:
        json_grammar(schema)
    assert says in str(e.value)


def _random_schema(rng: random.Random, depth: int = 0):
    """A schema of the keywords the grammar knows, some it refuses, and wrong values for them."""
    if depth > 3 or rng.random() < 0.15:
        return rng.choice([True, False, {}, {"type": rng.choice(TYPES)}, 5, []])
    kinds = [*TYPES, [rng.choice(TYPES), rng.choice(TYPES)], [], "weird"]
    values = [1, -2.5, "x", None, True, [], {}, [1, "a"], {"a": 1}, 10**30, "", "é"]
    makers = {
        "type": lambda: rng.choice(kinds),
        "properties": lambda: {rng.choice(["a", "b", "ab", "abc"]): _random_schema(rng, depth + 1)
                               for _ in range(rng.randrange(4))},
        "required": lambda: [rng.choice(["a", "b", "ab"]) for _ in range(rng.randrange(3))],
        "additionalProperties": lambda: rng.choice([True, False, _random_schema(rng, depth + 1)]),
        "items": lambda: _random_schema(rng, depth + 1),
        "minItems": lambda: rng.choice([0, 1, 2, 300, -1, "2"]), "maxItems": lambda: rng.choice([0, 1, 3, 1.5]),
        "minLength": lambda: rng.choice([0, 1, 2, 300]), "maxLength": lambda: rng.choice([0, 2, 5, None]),
        "enum": lambda: [rng.choice(values) for _ in range(rng.randrange(4))],
        "const": lambda: rng.choice(values),
        "anyOf": lambda: [_random_schema(rng, depth + 1) for _ in range(rng.randrange(3))],
        "oneOf": lambda: [_random_schema(rng, depth + 1) for _ in range(rng.randrange(3))],
        "allOf": lambda: [_random_schema(rng, depth + 1) for _ in range(rng.randrange(3))],
        "$ref": lambda: rng.choice(["#", "#/$defs/a", "#/properties/a", "x"]),
        "nullable": lambda: True, "title": lambda: "t",
        "pattern": lambda: rng.choice(["^a", "b+", "^[a-c]{1,3}$", "(?=x)", "^\\d+(\\.\\d+)?$", 5, "[é]|z"]),
        "minimum": lambda: rng.choice([0, 1, -3, 2.5, 0.0]), "maximum": lambda: rng.choice([5, 1000, 3.5, -2]),
        "exclusiveMinimum": lambda: rng.choice([0, -1, 0.5]), "exclusiveMaximum": lambda: rng.choice([3, 10**6]),
        "prefixItems": lambda: [_random_schema(rng, depth + 1) for _ in range(rng.randrange(3))],
    }
    schema = {k: makers[k]() for k in rng.sample(sorted(makers), rng.randrange(1, 5))}
    if rng.random() < 0.3:
        schema["$defs"] = {"a": _random_schema(rng, depth + 1)}
    return schema


def test_random_schemas_are_refused_by_name_or_followed():
    """Random schemas, valid and not: json_grammar either raises GrammarError or builds a grammar whose random
    outputs jsonschema finds valid (the implied types, enum filters, oneOf's exclusivity and the refusals of
    what is not enforced are what this checks)."""
    from jsonschema.exceptions import SchemaError

    rng = random.Random(11)
    built = walked = 0
    for _ in range(500):
        schema = _random_schema(rng)
        try:
            g = json_grammar(schema)
        except GrammarError:
            continue
        built += 1
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError:
            continue
        validator = Draft202012Validator(schema)
        for _ in range(3):
            text = _walk_randomly(g, rng, limit=300)
            if text is not None:
                walked += 1
                assert validator.is_valid(json.loads(text)), (schema, text)
    assert built > 80 and walked > 150


def test_bounds_and_tuples():
    """Integer ranges, non-negative and positive numbers, and prefixItems (pydantic's tuples), against jsonschema
    on every value of a range and its neighbours."""
    for schema in ({"type": "integer", "minimum": -3, "maximum": 12}, {"type": "integer", "exclusiveMinimum": 0.5,
                                                                       "exclusiveMaximum": 7}):
        g, v = json_grammar(schema), Draft202012Validator(schema)
        for i in range(-20, 30):
            assert g.accepts(str(i).encode()) == v.is_valid(i), (schema, i)
    positive, natural = json_grammar({"type": "integer", "minimum": 1}), json_grammar({"type": "integer", "minimum": 0})
    assert positive.accepts(b"7") and not positive.accepts(b"0") and not positive.accepts(b"-7")
    assert natural.accepts(b"0") and natural.accepts(b"70") and not natural.accepts(b"-1")
    nonneg = json_grammar({"type": "number", "minimum": 0})
    assert nonneg.accepts(b"0.25") and nonneg.accepts(b"2e-3") and not nonneg.accepts(b"-0.25")
    pair = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2}
    g = json_grammar(pair)
    assert g.accepts(b'[1, "a"]') and not g.accepts(b'["a", 1]') and not g.accepts(b"[1]")
    assert not g.accepts(b'[1, "a", 2]')
    rest = json_grammar({"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"}})
    assert rest.accepts(b"[true, null, null]") and rest.accepts(b"[]") and not rest.accepts(b"[null]")


def test_integer_bounds_of_any_size():
    """Any integer bounds, one side or both, negative or not, exclusive or not, against jsonschema on the values
    around each bound; random walks of them validate."""
    rng = random.Random(7)
    for schema in ({"type": "integer", "minimum": 5}, {"type": "integer", "maximum": -3},
                   {"type": "integer", "minimum": -1234, "maximum": 98765},
                   {"type": "integer", "exclusiveMinimum": 99, "exclusiveMaximum": 1001},
                   {"type": "integer", "minimum": -50.5, "maximum": -7.2}, {"type": "integer", "minimum": 10**15}):
        g, v = json_grammar(schema), Draft202012Validator(schema)
        edges = [x for k in BOUNDS if k in schema for x in (math.floor(schema[k]), math.ceil(schema[k]))]
        for x in {y + d for y in [0, 1, -1, *edges] for d in range(-12, 13)}:
            assert g.accepts(str(x).encode()) == v.is_valid(x), (schema, x)
        assert not g.accepts(b"-0") and not g.accepts(b"007") and not g.accepts(b"5.0")
        for _ in range(50):
            text = _walk_randomly(g, rng)
            if text is not None:
                assert v.is_valid(json.loads(text)), (schema, text)


PATTERNS = ["^\\d{3}-\\d{4}$", "abc", "^[A-Z][a-z]+(?: [A-Z][a-z]+)*$", "^(red|green|blue)$",
            "^[^@\\s]+@[^@\\s]+\\.[a-z]{2,}$", "^\\d{4}-\\d{2}-\\d{2}$", "^.{2,5}$", "^[\\w.-]+$",
            "^(?P<year>\\d{4})$", "^a{,3}$", "x*y+z?", "^[-+]?\\d*\\.?\\d+$", "^café|thé$", "^[^a-z]$",
            "^\\u00e9t\\x65$", "^[]a]$", "^a{2}b{1,}$", "^(ab|a)(c|bcd)$", "^\\S+\\s\\S+$", "^[\\d\\-]{3}$", "^{}$"]


@pytest.mark.parametrize("regex", PATTERNS)
def test_a_pattern_against_pythons_re(regex):
    """`pattern`: what the grammar writes matches the pattern as jsonschema (Python's re.search) reads it; strings
    near it are accepted exactly when they match (the ones a JSON string holds without escapes)."""
    import re

    schema = {"type": "string", "pattern": regex}
    g, v = json_grammar(schema), Draft202012Validator(schema)
    rng = random.Random(hash(regex) % 1000)
    written = set()
    for _ in range(120):
        text = _walk_randomly(g, rng, limit=80)
        if text is not None:
            value = json.loads(text)
            assert v.is_valid(value), (regex, value)
            written.add(value)
    alphabet = ["a", "b", "c", "z", "A", "Z", "0", "5", "9", "-", ".", "@", " ", "_", "é", "+", "x", "y",
                "{", "}", "]", "(", "ab", "bcd", "red", "café", "thé", "2024", "-12-"]
    matching = ["555-1234", "xabcx", "New York", "blue", "é@x.org", "2024-01-31", "éé", "a-b.c", "2024", "aa", "y",
                "-.5", "thé", "Z", "éte", "]", "aab", "abcd", "ab c", "1-2", "{}"]
    samples = [*written, *matching] + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 7)))
                                       for _ in range(400)]
    # \w, \d, \s and their complements are written as their ASCII members: beyond ASCII, what is written matches
    classes = re.search(r"\\[wdsWDS]", regex) is not None
    accepted = 0
    for value in samples:
        want = re.search(regex, value) is not None
        got = g.accepts(json.dumps(value, ensure_ascii=False).encode())
        assert got == want if value.isascii() or not classes else not got or want, (regex, value)
        accepted += got
    assert accepted


def test_random_patterns_are_refused_by_name_or_followed():
    """Random regular expressions of the syntax's pieces: either refused (GrammarError) or built into a machine
    whose random strings Python's re finds, and that agrees with re on random ASCII strings (and on the others,
    where the pattern has no \\w-like class, which is written as its ASCII members)."""
    import re
    import warnings

    pieces = ["a", "b", "x", "0", "9", ".", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", "\\.", "\\-", "\\\\",
              "[abc]", "[^abc]", "[a-z]", "[0-9_]", "[-a]", "[a-]", "[\\d.]", "[\\w-]", "[]a]", "[^]a]", "(", ")",
              "(?:", "|", "*", "+", "?", "{2}", "{1,3}", "{,2}", "{2,}", "{", "}", "^", "$", "é", "\\u00e9",
              "\\x41", " ", "-", "[", "]", "*?", "(?P<n>", "(?=", "\\b", "\\1", '"', "\\n"]
    rng = random.Random(17)
    built = 0
    for _ in range(600):
        regex = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        try:
            g = json_grammar({"type": "string", "pattern": regex})
        except GrammarError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            compiled = re.compile(regex)  # what is built, Python reads
        built += 1
        for _ in range(10):
            text = _walk_randomly(g, rng, limit=60)
            if text is not None:
                assert compiled.search(json.loads(text)), (regex, text)
        classes = re.search(r"\\[wdsWDS]", regex) is not None
        for _ in range(30):
            value = "".join(rng.choice("abx09. -_é{}]A") for _ in range(rng.randrange(0, 6)))
            got = g.accepts(json.dumps(value, ensure_ascii=False).encode())
            want = compiled.search(value) is not None
            assert got == want if value.isascii() or not classes else not got or want, (regex, value)
    assert built > 150


def test_a_recursive_schema_and_a_deep_one():
    tree = {"$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {
        "$ref": "#/$defs/node"}}}, "required": ["children"]}}, "$ref": "#/$defs/node"}
    g = json_grammar(tree)
    assert g.accepts(b'{"children": [{"children": []}, {"children": [{"children": []}]}]}')
    assert not g.accepts(b'{"children": [{}]}')
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GrammarError, match="nested too deeply"):
        json_grammar(deep)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_the_compiled_mask_equals_a_walk_of_every_token(model, smollm2_path, gemma3_path):
    """The mask kernel's shortcuts (plain string runs, leading whitespace, first bytes) decide every token as the
    plain byte walk of that token does, in states met while writing JSON."""
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(smollm2_path if model == "smollm2" else gemma3_path))
    vocab = vocabulary_bytes(tok, tok.vocab_size)
    g = json_grammar(PERSON)
    step = 1 if model == "smollm2" else 7  # every 7th token of 262k: the walk of each one in Python is slow
    text = '{"name": "Zoë", "age": 12, "email": null, "tags": ["ab", 1]   , "pet": {"kind": "cat"}}'.encode()
    for cut in (0, 1, 9, 12, 16, 22, 24, 45, 50, 57, 58, 60, len(text)):
        c = Constraint(g, vocab, tok.stop_ids)
        assert c.feed(text[:cut])
        mask = c.mask().copy()
        for t in range(0, tok.vocab_size, step):
            assert mask[t] == c.allows(t), (cut, t, tok.token_bytes(t))
        assert mask.any()
        assert mask[sorted(tok.stop_ids)].all() == (cut == len(text))
    # a pattern's states, the ".*" of an unanchored one among them (taken a plain token at a time)
    g = json_grammar({"type": "object", "properties": {"a": {"type": "string", "pattern": "[0-9]{2}x"},
                                                       "b": {"type": "string", "pattern": "^[a-z]+ ?"}}})
    text = '{"a": "é 12x yz", "b": "ab c"}'.encode()
    for cut in (7, 9, 11, 13, 17, 27, 29):
        c = Constraint(g, vocab, tok.stop_ids)
        assert c.feed(text[:cut])
        mask = c.mask().copy()
        assert mask.any() and all(mask[t] == c.allows(t) for t in range(0, tok.vocab_size, step))


def test_greedy_json_is_the_most_likely_allowed_token_each_step(smollm2_path):
    """Greedy generation under a schema takes, at every step, the model's most likely token among those the
    grammar allows (checked against the logprobs of the 20 most likely, replayed through a fresh constraint), and
    its text parses and follows the schema."""
    from llmcli.engine import GenerationConfig, Session, encode_chat, load
    from llmcli.sampling import SamplingConfig

    lm = load(smollm2_path)
    session = Session(lm, 1024)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "country", "population"]}
    g = json_grammar(schema)
    prompt = encode_chat(session, [{"role": "user", "content": "Describe Paris as JSON."}])
    records = list(session.generate(prompt, GenerationConfig(
        max_tokens=80, grammar=g, logprobs=20, sampling=SamplingConfig(temperature=0.0))))
    assert records[-1].finish_reason == "stop"
    value = json.loads("".join(r.text for r in records))
    assert Draft202012Validator(schema).is_valid(value) and set(value) == {"city", "country", "population"}
    replay = Constraint(g, vocabulary_bytes(lm.tokenizer, lm.hparams.n_vocab), lm.tokenizer.stop_ids)
    steps = [lp for r in records for lp in r.logprobs]
    assert len(steps) == records[-1].generation_tokens
    for lp in steps:
        assert replay.allows(lp.token)
        for alt, alt_lp in lp.top:
            if alt_lp > lp.logprob:
                assert not replay.allows(alt), (alt, lm.tokenizer.piece(alt))
        replay.take(lp.token)
    assert replay.complete


def test_sampled_json_parses_and_same_seed_same_text(gemma3_path):
    from llmcli.engine import GenerationConfig, Session, encode_chat, load
    from llmcli.sampling import SamplingConfig

    lm = load(gemma3_path)
    session = Session(lm, 1024)
    prompt = encode_chat(session, [{"role": "user", "content": "Give me a JSON object about a dog."}])
    texts = []
    for seed in (1, 1, 2):
        config = GenerationConfig(max_tokens=120, grammar=json_grammar(),
                                  sampling=SamplingConfig(temperature=1.0, seed=seed))
        records = list(session.generate(prompt, config))
        texts.append("".join(r.text for r in records))
        if records[-1].finish_reason == "stop":
            assert isinstance(json.loads(texts[-1]), dict)
        else:
            assert texts[-1].lstrip().startswith("{")
    assert texts[0] == texts[1]


def test_a_value_that_ends_on_part_of_a_stop_string_is_whole(smollm2_path):
    """A stop string's first characters at the end of a complete value are held back while they might start it;
    the value's end is the generation's end, so they are output (only a stop string that matched is cut)."""
    from llmcli.engine import GenerationConfig, Session, encode_chat, load
    from llmcli.sampling import SamplingConfig

    lm = load(smollm2_path)
    session = Session(lm, 512)
    prompt = encode_chat(session, [{"role": "user", "content": "Describe Paris as JSON."}])

    def reply(stop: tuple[str, ...]) -> tuple[str, str]:
        records = list(session.generate(prompt, GenerationConfig(
            max_tokens=60, stop=stop, grammar=json_grammar(), sampling=SamplingConfig(temperature=0.0))))
        return "".join(r.text for r in records), records[-1].finish_reason

    whole, finish = reply(())
    assert finish == "stop" and isinstance(json.loads(whole), dict)
    assert reply((whole[-2:] + "never",)) == (whole, "stop")
    assert reply((whole[-3:],)) == (whole[:-3], "stop")


def test_a_tool_call_grammar(smollm2_path):
    """One call of one of the tools, its arguments as that tool's schema says (names that are prefixes of others
    included); with text allowed, any reply that does not begin with "{" too. Its compiled mask equals a walk of
    every token, in free text as in a call."""
    from llmcli.json_schema import tool_call_grammar
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [("get", city), ("get_time", {"type": "object", "properties": {}, "additionalProperties": False})]
    strict, loose = tool_call_grammar(tools, text=False), tool_call_grammar(tools, text=True)
    for g in (strict, loose):
        assert g.accepts(b'{"name": "get", "arguments": {"city": "Paris"}}')
        assert g.accepts(b'{\n  "name":"get_time",\n  "arguments": {}\n}')
        assert not g.accepts(b'{"name": "get", "arguments": {}}')
        assert not g.accepts(b'{"name": "get_time", "arguments": {"city": "Paris"}}')
        assert not g.accepts(b'{"name": "gets", "arguments": {"city": "Paris"}}')
        assert not g.accepts(b'{"arguments": {}, "name": "get_time"}')
    assert loose.accepts("It is sunny {and} warm ☀".encode()) and not strict.accepts(b"It is sunny")
    assert not loose.accepts(b"{It is sunny") and not strict.accepts(b'[{"name": "get_time", "arguments": {}}]')
    several = tool_call_grammar(tools, text=True, several=True)
    assert several.accepts(b'[{"name": "get_time", "arguments": {}},\n {"name": "get", "arguments": {"city": "A"}}]')
    assert several.accepts(b'{"name": "get_time", "arguments": {}}') and not several.accepts(b"[]")
    assert not several.accepts(b"[It is") and several.accepts(b"It is [so]")

    tok = Tokenizer.from_gguf(read_gguf(smollm2_path))
    vocab = vocabulary_bytes(tok, tok.vocab_size)
    for prefix in (b"", b"It", b'{"name": "get', b'{"name": "get_time", "arguments": '):
        c = Constraint(loose, vocab, tok.stop_ids)
        assert c.feed(prefix)
        mask = c.mask().copy()
        assert all(mask[t] == c.allows(t) for t in range(tok.vocab_size))


def test_speculative_decoding_under_a_format(smollm2_path):
    """With a draft model, a format gives the same greedy text as without drafting; the draft proposes under the
    format too (its copy of the constraint moves through its own proposals), so the model as its own draft has
    every proposal kept. Prompt lookup gives the same text as well."""
    from llmcli.engine import GenerationConfig, Session, encode_chat, load
    from llmcli.sampling import SamplingConfig
    from llmcli.speculative import SpeculativeConfig

    lm = load(smollm2_path)
    config = GenerationConfig(max_tokens=60, grammar=json_grammar(PERSON), sampling=SamplingConfig(temperature=0.0))
    plain = Session(lm, 512)
    prompt = encode_chat(plain, [{"role": "user", "content": "Describe a person called Tom as JSON."}])
    want = "".join(r.text for r in plain.generate(prompt, config))
    for spec, draft in ((SpeculativeConfig(draft_max=4), lm), (SpeculativeConfig(lookup=8), None)):
        records = list(Session(lm, 512, spec=spec, draft=draft).generate(prompt, config))
        assert "".join(r.text for r in records) == want
        if draft is not None:
            assert records[-1].draft_tokens > 10 and records[-1].accepted_tokens == records[-1].draft_tokens


def test_a_reply_is_read_as_calls_only_where_calls_can_be_written():
    """Without parallel calls a reply that begins with "[" is text, even when it parses as JSON; a list of calls
    is read where lists of calls are allowed; a call cut short is text."""
    from llmcli.tools import Tool, ToolChoice

    tools = (Tool("get", "", {"type": "object"}),)
    one, several = ToolChoice(tools, required=False, several=False), ToolChoice(tools, required=False)
    assert one.read("[1, 2]") is None and one.read("[It is] sunny") is None
    assert one.read('{"name": "get", "arguments": {"a": 1}}') == [("get", '{"a": 1}')]
    assert several.read('[{"name": "get", "arguments": {}}, {"name": "get", "arguments": {"b": []}}]') == [
        ("get", "{}"), ("get", '{"b": []}')]
    assert several.read('{"name": "get", "argu') is None and several.read("Sunny.") is None
