"""A structure-aware fuzzer for the model loader: hostile GGUF files through load, one token, the template and an
embedding.

The seed is a tiny valid model written with gguf.GGUFWriter (a 2-layer llama, a byte-level vocabulary of 262
tokens with merges, a ChatML template). It is read back into a structure (metadata fields with their types,
tensor infos, tensor bytes) that a mutator changes — counts, lengths, type ids, offsets, dims, alignment,
metadata values, tokenizer arrays, templates, weights — before it is written out again; byte-level mutations
(truncation at every field boundary, byte flips, counts overwritten) work on the written file and its
boundaries.

Each case runs in a worker process under a memory cap (RLIMIT_AS) that handles many cases; the parent gives
every case a time limit and restarts a worker that died or hung. Outcomes:
  ok          loaded, generated a token, rendered the template, ran ahead to a next turn, probed its tool
              calls, embedded a text
  error       an LlmError with one printable line
  bad-error   an LlmError whose message has a raw control character or several lines
  traceback   any other exception (a bug: a file must only ever give an LlmError)
  memory      MemoryError under the cap
  crash       the worker died (a signal: heap corruption, a segfault)
  hang        the case ran past its time limit

Run: python -m tests.fuzz_gguf --cases 10000 --backend numba --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTCOMES = ("ok", "error", "bad-error", "traceback", "memory", "crash", "hang")
FAILURES = ("bad-error", "traceback", "memory", "crash", "hang")
MEMORY_CAP = 3 << 30
CASE_TIMEOUT_S = 30.0

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# ---- GGUF structure: read back, mutate, write ----

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}


@dataclass
class Field:
    key: str
    vtype: int
    value: object  # for arrays: (item type, [values]); nested arrays recursively
    raw: bytes | None = None  # a literal encoding of the value (type id + payload) that replaces it


@dataclass
class TensorInfo:
    name: str
    dims: list[int]  # ggml order, fastest first
    type_id: int
    data: bytes
    offset: int | None = None  # None: computed from the layout
    n_dims: int | None = None  # None: len(dims)


@dataclass
class Model:
    version: int = 3
    fields: list[Field] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    n_kv: int | None = None
    n_tensors: int | None = None

    def get(self, key: str) -> Field | None:
        return next((f for f in self.fields if f.key == key), None)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value, marks: list[int], base: int) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        item, items = value
        out = bytearray(struct.pack("<I", item))
        marks.append(base + len(out))
        out += struct.pack("<Q", len(items))
        for v in items:
            marks.append(base + len(out))
            out += _value(item, v, marks, base + len(out))
        return bytes(out)
    return struct.pack(_FMT[vtype], value)


def serialize(m: Model) -> tuple[bytes, list[int]]:
    """The file's bytes and the offsets of its field boundaries (where truncation and overwrites aim)."""
    marks: list[int] = []
    out = bytearray(b"GGUF" + struct.pack("<I", m.version))
    marks.append(len(out))
    out += struct.pack("<QQ", len(m.tensors) if m.n_tensors is None else m.n_tensors,
                       len(m.fields) if m.n_kv is None else m.n_kv)
    for f in m.fields:
        marks.append(len(out))
        out += _string(f.key)
        marks.append(len(out))
        if f.raw is not None:
            out += f.raw
        else:
            out += struct.pack("<I", f.vtype)
            marks.append(len(out))
            out += _value(f.vtype, f.value, marks, len(out))
    offsets, pos = [], 0
    for t in m.tensors:
        pos = -(-pos // m.alignment) * m.alignment
        offsets.append(pos if t.offset is None else t.offset)
        pos += len(t.data)
    for t, off in zip(m.tensors, offsets, strict=True):
        marks.append(len(out))
        out += _string(t.name)
        marks.append(len(out))
        out += struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
        for d in t.dims:
            marks.append(len(out))
            out += struct.pack("<Q", d % (1 << 64))
        marks.append(len(out))
        out += struct.pack("<I", t.type_id)
        marks.append(len(out))
        out += struct.pack("<Q", off % (1 << 64))
    align = m.alignment if m.alignment > 0 else 32
    out += b"\0" * (-len(out) % align)
    data_start = len(out)
    for t, off in zip(m.tensors, offsets, strict=True):
        if t.offset is None:
            out += b"\0" * (data_start + off - len(out))
            marks.append(len(out))
            out += t.data
    marks.append(len(out))
    return bytes(out), sorted(set(marks))


def _field_from_reader(key, rf) -> Field:
    from gguf import GGUFValueType

    types = [int(t) for t in rf.types]
    if types[0] == ARRAY:
        item = types[1]
        if item == STRING:
            values = [bytes(rf.parts[i]).decode("utf-8") for i in rf.data]
        else:
            values = [rf.parts[i].tolist()[0] for i in rf.data]
        return Field(key, ARRAY, (item, values))
    if types[0] == STRING:
        return Field(key, STRING, bytes(rf.parts[-1]).decode("utf-8"))
    return Field(key, types[0], rf.parts[-1].tolist()[0] if types[0] != GGUFValueType.BOOL else bool(rf.parts[-1][0]))


def write_seed(path: Path) -> Path:
    """The tiny valid model every case starts from."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    byte_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = byte_chars + ["Ġ", "Ċ", "he", "ll", "llo", "Ġh", "Ġhe", "<|im_start|>", "<|im_end|>"]
    tokens += [f"t{i}" for i in range(256 - len(tokens))]
    types = [1] * len(tokens)
    types[tokens.index("<|im_start|>")] = types[tokens.index("<|im_end|>")] = 3
    E, H, KV, D, F, V = 32, 4, 2, 8, 64, len(tokens)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l", "ll o", "Ġ h", "Ġh e"])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)

    def f32(*shape):
        return (rng.normal(size=shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", f32(V, E))
    w.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(E, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(E, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", f32(H * D, E))
        w.add_tensor(f"blk.{i}.attn_k.weight", f32(KV * D, E))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(KV * D, E))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(E, H * D))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(F, E))
        q8 = quantize(f32(F, E), GGMLQuantizationType.Q8_0)  # one block format through its kernels
        w.add_tensor(f"blk.{i}.ffn_up.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(E, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_model(path: Path) -> Model:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    m = Model()
    for key, rf in r.fields.items():
        if key.startswith("GGUF."):
            continue
        m.fields.append(_field_from_reader(key, rf))
    for t in r.tensors:
        dims = [int(d) for d in t.shape.tolist()]
        m.tensors.append(TensorInfo(t.name, dims, int(t.tensor_type), np.asarray(t.data).tobytes()))
    return m


# ---- mutations ----

HOSTILE_INTS = [0, 1, -1, 2, 3, 7, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]
HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e38, 3.4e38]
HPARAM_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
               "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
               "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length",
               "llama.vocab_size", "general.alignment", "llama.rope.scaling.type", "llama.rope.scaling.factor",
               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
               "tokenizer.ggml.model", "tokenizer.ggml.pre", "general.architecture", "tokenizer.chat_template",
               "llama.pooling_type", "tokenizer.chat_template.tool_use"]
HOSTILE_TEMPLATES = [
    "{{ 10 ** 100000000 }}", "{{ 'x' * 10**10 }}", "{% for i in range(99999) %}{% for j in range(99999) %}"
    "{% endfor %}{% endfor %}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{{ 1/0 }}",
    "{{ range(10**12)|list }}", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "{% if x %}" * 2000,
    "{{ messages.__class__.__mro__ }}", "{{ raise_exception('no\nway\x07') }}", "{{ 'a'.center(2**40) }}",
    "{% for m in messages %}", "{{ ('x' * 60000) | replace('', 'y' * 60000) }}", "{{ '%*d' % (10**9, 1) }}",
    "{{ '{:>999999999}'.format(1) }}", "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "{{ cycler }}{{ joiner }}{{ lipsum(10**9) }}", "{{ messages[0].content * 10**7 }}", "",
    "{% set ns = namespace(x=9) %}{% for i in range(60) %}{% set ns.x = ns.x ** 2 %}{% endfor %}{{ ns.x }}",
]


def _random_value(rnd: random.Random, depth: int = 0) -> tuple[int, object]:
    kind = rnd.randrange(8)
    if kind == 0:
        return STRING, rnd.choice(["", "x", "\x00\x1b[31m\n", "é" * 50, "llama", "gpt2", "linear"])
    if kind == 1:
        return BOOL, rnd.random() < 0.5
    if kind == 2:
        return F32, rnd.choice(HOSTILE_FLOATS)
    if kind == 3:
        return F64, rnd.choice(HOSTILE_FLOATS)
    if kind == 4 and depth < 3:
        vt, v = _random_value(rnd, depth + 1)
        return ARRAY, (vt, [v] * rnd.randrange(4))
    v = rnd.choice(HOSTILE_INTS)
    for t, lo, hi in ((U8, 0, 255), (I8, -128, 127), (U32, 0, 2**32 - 1), (I32, -2**31, 2**31 - 1),
                      (U64, 0, 2**64 - 1), (I64, -2**63, 2**63 - 1)):
        if lo <= v <= hi and rnd.random() < 0.4:
            return t, v
    return I64 if v < 2**63 else U64, v


def _set(m: Model, key: str, vtype: int, value) -> None:
    f = m.get(key)
    if f is None:
        m.fields.append(Field(key, vtype, value))
    else:
        f.vtype, f.value, f.raw = vtype, value, None


def mutate_hparam(m: Model, rnd: random.Random) -> str:
    key = rnd.choice(HPARAM_KEYS)
    if key.startswith("tokenizer.chat_template"):
        _set(m, key, STRING, rnd.choice(HOSTILE_TEMPLATES))
        return "template"
    if rnd.random() < 0.6:
        vt, v = (U32, rnd.choice(HOSTILE_INTS)) if rnd.random() < 0.7 else _random_value(rnd)
        if vt == U32 and not 0 <= v < 2**32:
            vt = U64 if v >= 0 else I64
    else:
        vt, v = _random_value(rnd)
    _set(m, key, vt, v)
    return f"hparam {key}"


def mutate_tokenizer(m: Model, rnd: random.Random) -> str:
    tokens, types = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.token_type")
    choice = rnd.randrange(9)
    intact = all(f is not None and f.raw is None and f.vtype == ARRAY and f.value[0] == item
                 for f, item in ((tokens, STRING), (types, I32), (m.get("tokenizer.ggml.merges"), STRING)))
    # an earlier mutation may have replaced what these ones edit
    if (not intact or not tokens.value[1]) and choice in (0, 1, 4, 5, 6, 7):
        choice = 2
    if choice == 0:  # a smaller vocabulary than the embedding table
        tokens.value = (STRING, tokens.value[1][:rnd.choice([1, 10, 200, 255])])
        types.value = (types.value[0], types.value[1][:len(tokens.value[1])])
        return "tokenizer smaller vocab"
    if choice == 1:  # larger: prompt ids past the table
        extra = [f"x{i}" for i in range(rnd.choice([1, 100]))]
        tokens.value = (STRING, extra + tokens.value[1])
        types.value = (types.value[0], [1] * len(extra) + types.value[1])
        return "tokenizer larger vocab"
    key = rnd.choice(["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                      "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id"])
    if choice == 2:
        vt, v = _random_value(rnd)
        _set(m, key, vt, v)
        return f"tokenizer {key} wrong type"
    if choice == 3:  # array of the wrong element type
        _set(m, key, ARRAY, rnd.choice([(I32, [1, 2, 3]), (F32, [float("nan")] * 256), (STRING, ["a b"] * 256),
                                        (BOOL, [True]), (ARRAY, [(I32, [1])] * 3), (STRING, [])]))
        return f"tokenizer {key} wrong element type"
    if choice == 4:
        _set(m, "tokenizer.ggml.model", STRING, "llama")
        if rnd.random() < 0.7:
            _set(m, "tokenizer.ggml.scores", ARRAY, (F32, [rnd.choice(HOSTILE_FLOATS) for _ in tokens.value[1]]))
        return "tokenizer llama kind"
    if choice == 5:
        merges = m.get("tokenizer.ggml.merges")
        merges.value = (STRING, merges.value[1] + rnd.choice([["nospace"], ["a  b"], [" "], ["zz qq"], [""]]))
        return "tokenizer bad merge"
    if choice == 6:
        types.value = (types.value[0], [rnd.choice([0, 2, 3, 4, 5, 6, 99, -1]) for _ in types.value[1]])
        return "tokenizer token types"
    if choice == 7:
        t = list(tokens.value[1])
        i = rnd.randrange(len(t))
        t[i] = rnd.choice(["", t[0], "\x00", "<0xZZ>", "a" * 5000, "\udcff"])
        tokens.value = (STRING, t)
        return "tokenizer odd token"
    _set(m, rnd.choice(["tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eot_token_id",
                        "tokenizer.ggml.unknown_token_id"]), I32, rnd.choice([-1, 256, 2**31 - 1, 5]))
    return "tokenizer special id"


def mutate_tensor(m: Model, rnd: random.Random) -> str:
    if not m.tensors:
        return "tensor none left"
    t = rnd.choice(m.tensors)
    choice = rnd.randrange(8)
    if choice == 0:
        i = rnd.randrange(len(t.dims))
        t.dims[i] = rnd.choice([0, 1, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1, t.dims[i] * 2, t.dims[i] + 1])
        return "tensor dim"
    if choice == 1:
        t.n_dims = rnd.choice([0, 5, 2**31, 2**32 - 1])
        return "tensor n_dims"
    if choice == 2:
        t.dims = t.dims[::-1] if rnd.random() < 0.5 else t.dims + [1]
        return "tensor shape"
    if choice == 3:
        t.type_id = rnd.choice([2, 3, 6, 7, 10, 12, 14, 16, 30, 39, 40, 1000, 2**32 - 1])
        return "tensor type"
    if choice == 4:
        t.offset = rnd.choice([1, 4, 2**63, 2**64 - 32, 10**9])
        return "tensor offset"
    if choice == 5:  # non-finite weights
        if t.type_id == 0:
            a = np.frombuffer(t.data, dtype=np.float32).copy()
            a[rnd.randrange(a.size) if rnd.random() < 0.5 else slice(None)] = rnd.choice(HOSTILE_FLOATS[:3])
            t.data = a.tobytes()
        return "tensor non-finite"
    if choice == 6:
        t.name = rnd.choice(["", "\x00", t.name + "\n", m.tensors[0].name, "blk.99.attn_q.weight"])
        return "tensor name"
    m.tensors.remove(t)
    return "tensor removed"


def mutate_header(m: Model, rnd: random.Random) -> str:
    choice = rnd.randrange(5)
    if choice == 0:
        m.n_kv = rnd.choice([0, len(m.fields) + 1, 2**20, 2**40, 2**64 - 1])
        return "header n_kv"
    if choice == 1:
        m.n_tensors = rnd.choice([0, len(m.tensors) + 1, 2**20, 2**40, 2**64 - 1])
        return "header n_tensors"
    if choice == 2:
        m.version = rnd.choice([0, 1, 2, 4, 2**32 - 1])
        return "header version"
    if choice == 3:  # an array nested deep, or a type id that does not exist
        f = rnd.choice(m.fields)
        depth = rnd.choice([2, 5, 300])
        f.raw = struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * depth + struct.pack("<IQ", U8, 0)
        return "header nested arrays"
    f = rnd.choice(m.fields)
    f.raw = struct.pack("<I", rnd.choice([13, 99, 2**32 - 1])) + b"\0" * 8
    return "header unknown type"


def mutate_alignment(m: Model, rnd: random.Random) -> str:
    vt, v = rnd.choice([(U32, 0), (U32, 3), (U32, 1), (U32, 2**31), (U32, 2**32 - 1), (U64, 2**40), (F32, 32.0),
                        (STRING, "32"), (BOOL, True), (I32, -32), (U32, 64)])
    _set(m, "general.alignment", vt, v)
    if vt == U32 and v in (1, 64):
        m.alignment = v
    return "alignment"


STRUCTURAL = [mutate_hparam, mutate_hparam, mutate_tokenizer, mutate_tensor, mutate_header, mutate_alignment]


def make_case(seed_model: Model, rnd: random.Random) -> tuple[bytes, str]:
    """One hostile file: one to three structural mutations, then sometimes a byte-level one."""
    import copy

    m = copy.deepcopy(seed_model)
    kinds = [rnd.choice(STRUCTURAL)(m, rnd) for _ in range(rnd.choice([1, 1, 1, 2, 3]))]
    data, marks = serialize(m)
    r = rnd.random()
    if r < 0.15:  # truncated at a field boundary (or a byte off it)
        cut = min(max(rnd.choice(marks) + rnd.choice([-1, 0, 0, 1, 4]), 0), len(data))
        data, kinds = data[:cut], ["truncate"]
    elif r < 0.25:
        b = bytearray(data)
        for _ in range(rnd.choice([1, 2, 8])):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        data, kinds = bytes(b), kinds + ["byteflip"]
    elif r < 0.35:  # a count or length field overwritten
        b = bytearray(data)
        at = rnd.choice(marks[:-1])
        v = rnd.choice([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])
        b[at:at + 8] = struct.pack("<Q", v)[:len(b[at:at + 8])]
        data, kinds = bytes(b), kinds + ["overwrite"]
    return data, "+".join(kinds)


# ---- running cases ----

def run_case(path: str, backend: str) -> dict:
    """Load, one token, the template: the outcome of one file."""
    import traceback

    from llmcli.engine import GenerationConfig, Session, embedding_pooling, encode_chat, load, next_turn_start
    from llmcli.sampling import SamplingConfig
    from llmcli.tools import call_syntax
    from quant.errors import LlmError

    try:
        lm = load(Path(path), backend, threads=1)
        session = Session(lm, ctx=64)
        config = GenerationConfig(max_tokens=1, sampling=SamplingConfig(temperature=0.8, seed=0))
        try:
            ids = encode_chat(session, [{"role": "user", "content": "hello"}])
        except LlmError:
            ids = lm.tokenizer.encode("hello")  # a broken template still leaves --raw
        for _ in session.generate(ids, config):
            pass
        # and a prompt long enough for the batched prompt path (its own kernels)
        for _ in session.generate(lm.tokenizer.encode("hello " * 24)[:40], config):
            pass
        # what `llm chat` and `llm serve` run ahead after a reply: the next turn's start, through the template
        try:
            guess = next_turn_start(lambda m: encode_chat(session, m), [{"role": "user", "content": "hello"},
                                                                       {"role": "assistant", "content": "hi"}])
        except LlmError:  # both leave the guess out, and the next message says why
            guess = []
        session.run_ahead(guess)
        # what `llm serve` reads at start (how the templates write tool calls) and an embedding by the file's pooling
        call_syntax(lm.template, lm.tokenizer)
        try:
            pooling = embedding_pooling(lm.hparams)
        except LlmError:  # a reranker's file: embeddings are refused, its states still pool
            pooling = "last"
        session.embed(lm.tokenizer.encode("hello"), pooling)
        return {"outcome": "ok"}
    except LlmError as e:
        msg = str(e)
        bad = "\n" in msg or any(not c.isprintable() for c in msg)
        return {"outcome": "bad-error" if bad else "error", "error": type(e).__name__, "message": msg[:300]}
    except MemoryError:
        return {"outcome": "memory"}
    except Exception as e:  # noqa: BLE001 - the fuzzer records what escaped
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {"outcome": "traceback", "error": type(e).__name__, "message": str(e)[:300],
                "where": f"{Path(tb.filename).name}:{tb.lineno}"}


def worker_main(backend: str) -> None:
    """Read case paths on stdin, answer one JSON line each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_case(line.strip(), backend)), flush=True)


WARM_TYPES = (1, 30, 2, 3, 6, 7, 8, 20)  # F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL: 32-weight blocks


def warm_up_files(seed_model: Model, workdir: Path) -> list[str]:
    """The seed with one matrix retyped to each block format a 32-wide row can hold: running them first
    compiles (or loads) every kernel a case can reach, so a first compile is never taken for a hang."""
    import copy

    paths = []
    for type_id in WARM_TYPES:
        for every in (False, True):  # the embedding table alone (as the tied output), then every matrix
            m = copy.deepcopy(seed_model)
            for t in m.tensors:
                if len(t.dims) == 2 and (every or t.name == "token_embd.weight"):
                    t.type_id = type_id
            path = workdir / f"warm-{type_id}-{int(every)}.gguf"
            path.write_bytes(serialize(m)[0])
            paths.append(str(path))
    return paths


class Worker:
    def __init__(self, backend: str, warm: list[str] = ()):
        self.backend = backend
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(root), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz_gguf", "--worker", backend], cwd=root,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self._read(600.0)  # imports
        for path in warm:
            self.run(path, 900.0)

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"outcome": "crash", "signal": self.proc.wait()}

    def run(self, path: str, timeout: float) -> dict:
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        result = self._read(timeout)
        if result is None:
            self.kill()
            return {"outcome": "hang"}
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None


def fuzz(n_cases: int, backend: str, seed: int, workdir: Path, timeout: float = CASE_TIMEOUT_S,
         log=None) -> tuple[Counter, list[dict]]:
    """Run `n_cases` seeded cases; returns the outcome counts and the failing cases (with their files kept)."""
    rnd = random.Random(seed)
    seed_path = write_seed(workdir / "seed.gguf")
    seed_model = read_model(seed_path)
    counts: Counter = Counter()
    failures: list[dict] = []
    warm = warm_up_files(seed_model, workdir) if backend == "numba" else []
    worker = Worker(backend, warm)
    case_path = workdir / "case.gguf"
    for i in range(n_cases):
        data, kind = make_case(seed_model, rnd) if i else (seed_path.read_bytes(), "seed")
        case_path.write_bytes(data)
        if not worker.alive():
            worker = Worker(backend, warm)
        result = worker.run(str(case_path), timeout)
        counts[result["outcome"]] += 1
        if i == 0 and result["outcome"] != "ok":
            raise RuntimeError(f"the seed model does not run: {result}")
        if result["outcome"] in FAILURES:
            keep = workdir / f"fail-{i:05d}.gguf"
            keep.write_bytes(data)
            failures.append({"case": i, "kind": kind, "file": str(keep), **result})
            if log:
                print(json.dumps(failures[-1]), file=log, flush=True)
            if result["outcome"] in ("crash", "hang"):
                worker = Worker(backend, warm)
        if log and (i + 1) % 1000 == 0:
            print(f"{i + 1} cases: {dict(counts)}", file=log, flush=True)
    worker.kill()
    return counts, failures


def table(counts: Counter, backend: str, n: int, seconds: float) -> str:
    rows = [f"| backend | cases | {' | '.join(OUTCOMES)} | s |", "|" + "---|" * (len(OUTCOMES) + 3)]
    rows.append(f"| {backend} | {n} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + f" | {seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S)
    p.add_argument("--keep", type=Path, help="a folder for the failing cases (default: a temporary one)")
    p.add_argument("--worker", metavar="BACKEND", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        counts, failures = fuzz(args.cases, args.backend, args.seed, workdir, args.timeout, log=sys.stderr)
        print(table(counts, args.backend, args.cases, time.perf_counter() - t0))
        kinds = Counter((f["outcome"], f.get("error"), f.get("where"), f["kind"].split("+")[0]) for f in failures)
        for k, v in kinds.most_common(40):
            print(v, *k)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
