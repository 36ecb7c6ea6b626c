"""K-quants: the Numba quantizers against a numpy transcription of ggml's (tests/kquants_ref.py), that
transcription and llm's per-tensor policy against bytes and plans real llama.cpp wrote
(tests/data/kquants_llamacpp.npz, made by tests/data/make_kquants_fixture.py), and `llm quantize` to every
K-quant file type on a cut-down 1B-shape model and on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import kquants_ref
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as Q

from llmcli.quantize import run_quantize
from quant import policy
from quant.kquants import quantize_k_rows
from quant.quantize import quantize_rows

K = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
FIXTURE = Path(__file__).parent / "data" / "kquants_llamacpp.npz"


def _weights(rows: int = 12, cols: int = 768, seed: int = 0) -> np.ndarray:
    """Rows of very different scales, with the awkward super-blocks: all zero, one sign only, an outlier,
    a constant run, tiny values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * (10.0 ** rng.uniform(-4, 1, (rows, 1)))
    x[0, :256] = 0.0
    x[1, :256] = np.abs(x[1, :256])
    x[2, :256] = -np.abs(x[2, :256])
    x[3, 7] *= 300.0
    x[4, 16:48] = 0.25
    x[5, 256:512] *= 1e-6
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", K, ids=lambda t: t.name)
@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
def test_numba_equals_numpy_reference(qtype, imatrix):
    x = _weights()
    qw = (np.random.default_rng(1).uniform(0, 2, x.shape[1]) ** 3).astype(np.float32) if imatrix else None
    ours = quantize_k_rows(x, qtype, col_weights=qw)
    assert ours.shape == (x.shape[0], x.shape[1] // 256 * GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(ours, kquants_ref.quantize(x, qtype, qw))
    # and it decodes to the weights (gguf-py's dequantizer is independent of both)
    err = np.abs(quants.dequantize(ours, qtype).reshape(x.shape) - x).max(axis=1)
    assert np.all(err <= 0.6 * np.abs(x).max(axis=1) + 1e-30)


@pytest.mark.parametrize("source", ["f16", "bf16"])
def test_16_bit_sources(source):
    x = _weights(rows=6, cols=512, seed=3)
    bits = quantize_rows(x, Q.F16 if source == "f16" else Q.BF16).view(np.uint16).reshape(x.shape)
    values = (bits.view(np.float16).astype(np.float32) if source == "f16"
              else (bits.astype(np.uint32) << 16).view(np.float32))
    for qtype in K:
        assert np.array_equal(quantize_k_rows(bits, qtype, source=source), quantize_k_rows(values, qtype))


def test_row_length_must_split_into_superblocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k_rows(np.ones((2, 576), dtype=np.float32), Q.Q4_K)


# ---- pinned by llama.cpp ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture():
    data = np.load(FIXTURE)
    meta = json.loads(bytes(data["meta"]).decode())
    return data, meta


def _reference(values: np.ndarray, qtype) -> np.ndarray:
    if qtype in K:
        return kquants_ref.quantize(values, qtype)
    return quants.quantize(values, qtype).view(np.uint8).reshape(values.shape[0], -1)


def test_reference_and_ours_equal_llamacpp_bytes(fixture):
    data, _ = fixture
    keys = [k for k in data.files if k != "meta" and not k.endswith("/src")]
    seen = set()
    for key in keys:
        model, name, tname = key.split("/")
        qtype = Q[tname]
        seen.add(qtype)
        bits = data[f"{model}/{name}/src"]
        values = bits.view(np.float16).astype(np.float32)
        expected = data[key]
        assert np.array_equal(_reference(values, qtype), expected), key
        ours = (quantize_k_rows(bits, qtype, source="f16") if qtype in K
                else quantize_rows(bits, qtype, source="f16"))
        assert np.array_equal(ours, expected), key
    assert seen >= set(K) | {Q.Q4_0, Q.Q5_1, Q.Q8_0}  # (Q5_0 is pinned by gguf.quants: test_quantize.py)


@pytest.mark.parametrize("model", ["1b", "smollm2"])
def test_plan_equals_llamacpp(fixture, model):
    _, meta = fixture
    tensors = [(name, tuple(shape), Q[t]) for name, shape, t in meta["tensors"][model]]
    for mix in MIXES:
        ours = policy.plan_mix(tensors, policy.MIXES[mix], policy.MixOptions())
        got = {name: qtype.name for (name, _, _), (qtype, _) in zip(tensors, ours, strict=True)}
        assert got == meta["plans"][model][mix], mix


# ---- `llm quantize` end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_b_f16(tmp_path_factory) -> Path:
    """A random model of the Llama-3.2-1B shape (rows of 2048 and 8192, GQA 4), cut to one layer."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from make_bench_models import write_random_model

    return write_random_model(tmp_path_factory.mktemp("kq") / "1b.gguf", n_embd=2048, n_layers=1, n_heads=32,
                              n_kv_heads=8, n_ff=8192, n_vocab=256, qtype=Q.F16, tied=False, seed=5)


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kq") / "smollm2-f16.gguf"
    run_quantize(str(smollm2_path), "f16", out, allow_requantize=True)
    return out


def _check_file(src: Path, out: Path, n_rows: int = 2) -> set:
    """Every tensor of `out`: its first rows equal the reference quantization of the source's."""
    source = {t.name: t for t in GGUFReader(src).tensors}
    types = set()
    for t in GGUFReader(out).tensors:
        s = source[t.name]
        types.add(t.tensor_type)
        if t.tensor_type == s.tensor_type:
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                                  np.asarray(s.data).view(np.uint8).reshape(-1)), t.name
            continue
        rows = np.asarray(s.data).reshape(-1, int(s.shape[0]))[:n_rows].astype(np.float32)
        got = np.asarray(t.data).view(np.uint8).reshape(int(np.prod(t.shape[1:])), -1)[:n_rows]
        assert np.array_equal(got, _reference(rows, t.tensor_type)), (t.name, t.tensor_type.name)
    return types


@pytest.mark.slow
@pytest.mark.parametrize("mix", MIXES)
def test_quantize_1b_shape_equals_reference(one_b_f16, mix, tmp_path):
    out = tmp_path / f"{mix}.gguf"
    report = run_quantize(str(one_b_f16), mix, out)
    assert report.qtype == mix and not report.warnings
    types = _check_file(one_b_f16, out)
    assert types & set(K)


@pytest.mark.slow
@pytest.mark.parametrize("mix", MIXES)
def test_quantize_smollm2_equals_reference_with_fallbacks(smollm2_f16, mix, tmp_path):
    out = tmp_path / f"{mix}.gguf"
    report = run_quantize(str(smollm2_f16), mix, out)
    types = _check_file(smollm2_f16, out)
    # 576-wide rows do not split into super-blocks: llama.cpp's fallbacks, told once per kind
    assert types & {Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0}
    assert any("as llama.cpp" in w for w in report.warnings)


def test_dry_run_plan_and_sizes(smollm2_path):
    from quant.errors import LlmError

    with pytest.raises(LlmError, match="already quantized"):
        run_quantize(str(smollm2_path), "q4_k_m", dry_run=True)
    report = run_quantize(str(smollm2_path), "q4_k_m", dry_run=True, allow_requantize=True)
    assert any("requantizing them loses" in w for w in report.warnings)
    assert any("Q4_K -> Q5_0, as llama.cpp" in w for w in report.warnings)
    types = {p.name: p.qtype for p in report.plan}
    assert types["token_embd.weight"] == Q.Q8_0  # tied output: Q6_K wanted, 576 does not split into 256
    assert types["blk.0.ffn_down.weight"] == Q.Q6_K and types["blk.0.attn_q.weight"] == Q.Q5_0
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert report.n_bytes == sum(p.source.n_elements // GGML_QUANT_SIZES[p.qtype][0] * GGML_QUANT_SIZES[p.qtype][1]
                                 for p in report.plan)
    pure = run_quantize(str(smollm2_path), "q4_k_m", dry_run=True, allow_requantize=True, pure=True,
                        tensor_types=["ffn_down=q8_0"])
    types = {p.name: p.qtype for p in pure.plan}
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q5_0
    assert types["blk.3.ffn_up.weight"] == Q.Q5_0  # --pure: the mix rules are off, the fallback is not


# ---- llama.cpp reads what we write -------------------------------------------------------------------------

@pytest.mark.slow
def test_llamacpp_writes_the_same_file_and_loads_ours(smollm2_f16, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    ours = tmp_path / "ours.gguf"
    run_quantize(str(smollm2_f16), "q4_k_m", ours)
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(smollm2_f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=128, verbose=False, seed=0)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


@pytest.mark.slow
def test_optimize_lowers_kl_on_smollm2_q4_k_m(smollm2_f16, tmp_path):
    from conftest import WIKITEXT

    from llmcli.perplexity import perplexity

    # (importance from llm's built-in calibration text, KL measured on wikitext-2: different texts)
    plain, opt = tmp_path / "plain.gguf", tmp_path / "opt.gguf"
    run_quantize(str(smollm2_f16), "q4_k_m", plain)
    run_quantize(str(smollm2_f16), "q4_k_m", opt, optimize=True)
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is missing")
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    kl = {p.name: perplexity(p, text, ctx=128, chunks=6, base=smollm2_f16).kld_mean for p in (plain, opt)}
    assert kl["opt.gguf"] < 0.95 * kl["plain.gguf"], kl
