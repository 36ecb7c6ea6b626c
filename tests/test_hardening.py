"""Hostile model files (issue #13, part A): every value read from a file is checked before use, and every
failure is one LlmError line. Each case starts from the fuzzer's tiny valid model and changes one thing."""

from __future__ import annotations

import copy
import struct
import time

import numpy as np
import pytest
from fuzz_gguf import ARRAY, BOOL, F32, F64, I32, STRING, U8, U32, U64, Field, Model, read_model, serialize, write_seed

from llmcli.engine import GenerationConfig, Session, encode_chat, load
from llmcli.sampling import SamplingConfig, SamplingError
from llmcli.template import ChatTemplate, TemplateError
from quant.errors import LlmError, ModelFileError, PromptError
from quant.gguf_file import read_gguf

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN weights


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Model:
    return read_model(write_seed(tmp_path_factory.mktemp("seed") / "seed.gguf"))


def write(tmp_path, model: Model, name: str = "case.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(serialize(model)[0])
    return str(path)


def with_meta(seed: Model, key: str, vtype: int, value) -> Model:
    m = copy.deepcopy(seed)
    f = m.get(key)
    if f is None:
        m.fields.append(Field(key, vtype, value))
    else:
        f.vtype, f.value = vtype, value
    return m


def one_token(path: str, backend: str = "numpy", prompt: str | None = None) -> list:
    lm = load(path, backend, threads=1)
    session = Session(lm, ctx=64)
    ids = lm.tokenizer.encode(prompt) if prompt else encode_chat(session, [{"role": "user", "content": "hello"}])
    config = GenerationConfig(max_tokens=2, sampling=SamplingConfig(temperature=0.8, seed=0))
    return list(session.generate(ids, config))


def assert_one_line(error: BaseException, *words: str) -> None:
    msg = str(error)
    assert "\n" not in msg and all(c.isprintable() for c in msg), repr(msg)
    for w in words:
        assert w in msg, (w, msg)


def test_the_seed_model_runs_on_both_cpu_backends(seed, tmp_path):
    path = write(tmp_path, seed)
    for backend in ("numpy", "numba"):
        assert one_token(path, backend)[-1].finish_reason in ("stop", "length")


# ---- A.1, A.2: values that made numba's kernels write out of bounds are refused at load ----

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("key,value,words", [
    ("llama.rope.dimension_count", 10, ("rope.dimension_count = 10", "head size 8")),
    ("llama.rope.dimension_count", 7, ("must be even",)),
    ("llama.rope.dimension_count", 2**32 - 1, ("rope.dimension_count",)),
    ("llama.attention.head_count_kv", 3, ("not a multiple of",)),
    ("llama.attention.head_count_kv", 8, ("not a multiple of",)),
    ("llama.attention.head_count", 0, ("head_count = 0",)),
])
def test_kernel_bounds_are_checked_at_load(seed, tmp_path, backend, key, value, words):
    path = write(tmp_path, with_meta(seed, key, U32 if value < 2**32 else U64, value))
    with pytest.raises(ModelFileError) as err:
        load(path, backend, threads=1)
    assert_one_line(err.value, *words)


# ---- A.3, A.6: counts of the wrong size or type ----

@pytest.mark.parametrize("key,vtype,value", [
    ("llama.block_count", U32, 2**31), ("llama.block_count", U32, 2**32 - 1), ("llama.block_count", F32, 2.0),
    ("llama.block_count", U32, 0), ("llama.block_count", U32, 3),  # 3: the file has 2 layers, blk.2 is missing
    ("llama.feed_forward_length", U32, 0), ("llama.context_length", I32, -5),
    ("llama.embedding_length", STRING, "32"), ("llama.attention.head_count", BOOL, True),
    ("llama.attention.head_count", F64, float("nan")), ("llama.attention.head_count", ARRAY, (I32, [4])),
    ("llama.rope.freq_base", F32, float("nan")), ("llama.attention.layer_norm_rms_epsilon", F32, float("inf")),
    ("llama.rope.freq_base", F32, -1.0), ("general.architecture", U32, 7),
])
def test_bad_hyper_parameters_are_one_line(seed, tmp_path, key, vtype, value):
    path = write(tmp_path, with_meta(seed, key, vtype, value))
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError) as err:
        load(path, "numpy", threads=1)
    assert time.perf_counter() - t0 < 10  # a count the file does not back never sizes a loop
    assert_one_line(err.value, "blk.2" if value == 3 else key.split(".")[-1])


# ---- A.4: non-finite weights: the sampler stops with one line instead of crashing ----

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("tensor", ["output_norm.weight", "blk.0.attn_q.weight", "token_embd.weight"])
def test_non_finite_weights_give_one_line(seed, tmp_path, backend, tensor):
    m = copy.deepcopy(seed)
    t = next(t for t in m.tensors if t.name == tensor)
    t.data = np.full(len(t.data) // 4, np.nan, dtype=np.float32).tobytes()
    try:
        records = one_token(write(tmp_path, m), backend)
    except LlmError as e:
        assert_one_line(e, "broken")
    else:
        # numba's fastmath kernels may turn NaN into finite garbage: no crash, and nothing to report
        assert backend == "numba" and records[-1].finish_reason in ("stop", "length")


def test_sampler_skips_non_finite_logits_and_stops_when_none_is_left():
    from llmcli.sampling import Sampler

    logits = np.array([np.nan, 1.0, np.inf, 0.5, -np.inf], dtype=np.float32)
    for temperature in (0.0, 0.8):
        picks = {Sampler(SamplingConfig(temperature=temperature, seed=s))(logits, [0, 2, 99]) for s in range(30)}
        assert picks <= {1, 3} and 1 in picks
    with pytest.raises(SamplingError, match="no finite logits"):
        Sampler(SamplingConfig())(np.full(5, np.nan, dtype=np.float32), [])


# ---- A.5: the container: alignment, dims, nesting, truncation ----

@pytest.mark.parametrize("vtype,value", [(U32, 0), (U32, 3), (U32, 2**31), (U64, 2**40), (STRING, "32"),
                                         (F32, 32.0), (BOOL, True)])
def test_bad_alignment(seed, tmp_path, vtype, value):
    with pytest.raises(ModelFileError) as err:
        read_gguf(write(tmp_path, with_meta(seed, "general.alignment", vtype, value)))
    assert_one_line(err.value, "general.alignment")


@pytest.mark.parametrize("dims", [[], [0, 32], [2**32, 2**32, 2**32, 2**32], [2**64 - 1, 32]])
def test_bad_tensor_dims(seed, tmp_path, dims):
    m = copy.deepcopy(seed)
    m.tensors[1].dims = dims
    with pytest.raises(LlmError) as err:
        read_gguf(write(tmp_path, m))
    assert_one_line(err.value, m.tensors[1].name)


def test_arrays_nested_hundreds_deep(seed, tmp_path):
    m = copy.deepcopy(seed)
    m.fields[0].raw = struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * 500 + struct.pack("<IQ", U8, 0)
    with pytest.raises(ModelFileError) as err:
        read_gguf(write(tmp_path, m))
    assert_one_line(err.value, "nests arrays")


def test_truncation_at_every_header_boundary(seed, tmp_path):
    data, marks = serialize(seed)
    header_end = marks[-len(seed.tensors) - 1]  # the header ends where the first tensor's data starts
    path = tmp_path / "cut.gguf"
    for cut in sorted({c + d for c in marks if c < header_end for d in (0, 1, 4)}):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as err:
            read_gguf(path)
        assert_one_line(err.value)


def test_counts_the_file_cannot_hold(seed, tmp_path):
    for field, count in (("n_kv", 2**40), ("n_tensors", 2**64 - 1)):
        m = copy.deepcopy(seed)
        setattr(m, field, count)
        with pytest.raises(ModelFileError, match="corrupt GGUF header"):
            read_gguf(write(tmp_path, m))
    m = with_meta(seed, "tokenizer.ggml.scores", ARRAY, (F32, [0.0] * 4))
    data = bytearray(serialize(m)[0])
    at = data.index(b"tokenizer.ggml.scores") + len(b"tokenizer.ggml.scores") + 8  # value type, item type
    data[at:at + 8] = struct.pack("<Q", 2**61)
    (tmp_path / "big.gguf").write_bytes(data)
    with pytest.raises(ModelFileError, match="claims 2305843009213693952 elements"):
        read_gguf(tmp_path / "big.gguf")


# ---- A.6: tokenizer metadata, and a vocabulary that disagrees with the embedding table ----

@pytest.mark.parametrize("key,vtype,value", [
    ("tokenizer.ggml.tokens", ARRAY, (I32, [1, 2, 3])), ("tokenizer.ggml.tokens", STRING, "abc"),
    ("tokenizer.ggml.merges", ARRAY, (I32, [1, 2])), ("tokenizer.ggml.token_type", ARRAY, (STRING, ["1"] * 256)),
    ("tokenizer.ggml.bos_token_id", STRING, "1"), ("tokenizer.ggml.eos_token_id", I32, -1),
    ("tokenizer.ggml.add_bos_token", STRING, "false"), ("tokenizer.ggml.model", ARRAY, (STRING, ["gpt2"])),
])
def test_tokenizer_metadata_of_the_wrong_type(seed, tmp_path, key, vtype, value):
    with pytest.raises(ModelFileError) as err:
        load(write(tmp_path, with_meta(seed, key, vtype, value)), "numpy", threads=1)
    assert_one_line(err.value, key)


def test_vocabulary_smaller_than_the_embedding_table(seed, tmp_path):
    m = copy.deepcopy(seed)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        f = m.get(key)
        f.value = (f.value[0], f.value[1][:110])  # ids 110..255 of the 256-row table have no text
    path = write(tmp_path, m)
    lm = load(path, "numpy", threads=1)
    session = Session(lm, ctx=64)
    # logits over 256 rows: a sampled id past the vocabulary decodes to nothing instead of crashing
    config = GenerationConfig(max_tokens=20, sampling=SamplingConfig(temperature=5.0, top_k=0, top_p=1.0,
                                                                     min_p=0.0, seed=0))
    records = list(session.generate(lm.tokenizer.encode("hello"), config))
    assert records[-1].finish_reason in ("stop", "length") and records[-1].generation_tokens >= 1
    assert any(t >= 110 for t in session.tokens)  # some ids without text were sampled


def test_vocabulary_larger_than_the_embedding_table(seed, tmp_path):
    m = copy.deepcopy(seed)
    tokens, types = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.token_type")
    tokens.value = (STRING, tokens.value[1] + ["zzzz"])
    types.value = (types.value[0], types.value[1] + [4])  # user-defined: matched whole in the text
    with pytest.raises(PromptError) as err:
        one_token(write(tmp_path, m), "numpy", prompt="hello zzzz")
    assert_one_line(err.value, "token id 256", "256-row embedding table")


# ---- A.7: chat templates run in a sandbox with limits ----

HOSTILE = {
    "constant folding": "{{ 10 ** 100000000 }}",
    "nested ranges": "{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10**10 }}",
    "deep recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "division by zero": "{{ 1/0 }}",
    "range too big": "{{ range(10**9)|list }}",
    "parser recursion": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "replace blow-up": "{{ ('x' * 60000)|replace('', 'y' * 60000) }}",
    "recursive loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "does not parse": "{% for m in messages %}",
    "control characters": "{{ raise_exception('bad\nline\x1b[31m') }}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_fail_in_one_bounded_line(name):
    template = ChatTemplate(HOSTILE[name], "model")  # compiling is lazy: never an error here
    t0 = time.perf_counter()
    with pytest.raises(TemplateError) as err:
        template.render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 15
    assert_one_line(err.value)
    assert str(err.value).startswith("chat template failed: ")


def test_a_template_that_does_not_parse_leaves_raw_runs(seed, tmp_path):
    path = write(tmp_path, with_meta(seed, "tokenizer.chat_template", STRING, "{% for m in messages %}"))
    lm = load(path, "numpy", threads=1)
    with pytest.raises(TemplateError, match="does not parse"):
        encode_chat(Session(lm, ctx=64), [{"role": "user", "content": "hi"}])
    assert one_token(path, "numpy", prompt="hello")[-1].generation_tokens >= 1


# ---- A.8: error lines quote file bytes safely ----

def test_file_bytes_in_errors_are_escaped(seed, tmp_path):
    m = with_meta(seed, "general.architecture", STRING, "llama\x00\x1b[31m\nrm -rf")
    with pytest.raises(LlmError) as err:
        load(write(tmp_path, m), "numpy", threads=1)
    assert_one_line(err.value, "\\x1b[31m\\nrm -rf")
    m = copy.deepcopy(seed)
    m.tensors[0].name = "evil\n\x07name"
    with pytest.raises(LlmError) as err:
        load(write(tmp_path, m), "numpy", threads=1)
    assert_one_line(err.value)
