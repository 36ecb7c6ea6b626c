"""The MLX backend against gguf.quants (repacking) and the numpy reference (logits, greedy tokens).

Runs on MLX's CPU build in CI; activations are float32 there, so logits are held to
max |diff| <= 1e-3 * max |logit| per position (measured on SmolLM2: about 3e-6 * max |logit|).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

from backends import load_model
from quant.errors import BackendError
from quant.formats import type_size
from quant.gguf_file import Tensor, read_gguf

Q = GGMLQuantizationType
LOGIT_TOL = 1e-3  # times max |logit| of the reference, per position
N_GREEDY = 64
PLAIN_PROMPT = "The history of the printing press begins in 1440, when"
CHAT_PROMPT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def mx():
    return pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'llmcli[mlx]')")


@pytest.fixture(scope="module")
def mlx_model(mx, smollm2_gguf):
    return load_model(smollm2_gguf, "mlx")


@pytest.fixture(scope="module")
def numpy_model(smollm2_gguf):
    return load_model(smollm2_gguf, "numpy")


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from llmcli.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf)


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    n_vocab = ref.shape[-1]
    for t, (a, b) in enumerate(zip(ours.reshape(-1, n_vocab), ref.reshape(-1, n_vocab), strict=True)):
        diff, top = np.abs(a - b).max(), np.abs(b).max()
        assert diff <= LOGIT_TOL * top, f"position {t}: max |diff| {diff}, max |logit| {top}"


# ---- repacking: bit-exact against gguf.quants ------------------------------------------------------

def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every code and high bit, with finite float16 d (and m) in each block."""
    n_blocks = cols // 32
    raw = rng.integers(0, 256, size=(rows, n_blocks, type_size(qtype)), dtype=np.uint8)
    n_halves = 2 if qtype in (Q.Q4_1, Q.Q5_1) else 1
    halves = (rng.standard_normal((rows, n_blocks, n_halves)) * 0.05).astype(np.float16)
    raw[:, :, : 2 * n_halves] = halves.view(np.uint8)
    return raw.reshape(rows, n_blocks * type_size(qtype))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_repack_is_lossless(mx, qtype):
    from backends.mlx.repack import repack

    rows, cols = 48, 256
    data = random_blocks(qtype, rows, cols, np.random.default_rng(int(qtype)))
    ref = gguf_quants.dequantize(data, qtype)  # (rows, cols) float32
    a = repack(data, qtype, (rows, cols), chunk_rows=5)  # chunks that do not divide the rows
    assert a.q.shape == (rows, cols * a.bits // 32) and a.scales.dtype == np.float16
    ours = mx.dequantize(mx.array(a.q), mx.array(a.scales).astype(mx.float32),
                         mx.array(a.biases).astype(mx.float32), group_size=32, bits=a.bits)
    np.testing.assert_array_equal(np.array(ours), ref)

    x = np.random.default_rng(1).standard_normal((3, cols)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), mx.array(a.q), mx.array(a.scales), mx.array(a.biases),
                            transpose=True, group_size=32, bits=a.bits)
    np.testing.assert_allclose(np.array(y), x @ ref.T, rtol=1e-4, atol=1e-4 * np.abs(x @ ref.T).max())


def test_bias_overflowing_float16_keeps_float32(mx):
    from backends.mlx.repack import repack

    data = random_blocks(Q.Q8_0, 4, 64, np.random.default_rng(0))
    data.reshape(4, 2, 34)[0, 0, :2] = np.array([1000.0], dtype=np.float16).view(np.uint8)  # -128 d overflows
    a = repack(data, Q.Q8_0, (4, 64))
    assert a.biases.dtype == np.float32 and a.scales.dtype == np.float32
    ours = mx.dequantize(mx.array(a.q), mx.array(a.scales), mx.array(a.biases), group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(ours), gguf_quants.dequantize(data, Q.Q8_0))


def test_k_quant_and_float_matrices_become_float16(mx):
    from backends.mlx.weights import DenseLinear, linear, to_float16

    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(6, 2, type_size(Q.Q6_K)), dtype=np.uint8)
    blocks[:, :, -2:] = (rng.random((6, 2, 1)) * 0.01).astype(np.float16).view(np.uint8)  # d, last in Q6_K
    k_quant = Tensor("w", Q.Q6_K, (6, 512), blocks.reshape(6, -1))
    w = linear(k_quant)
    assert isinstance(w, DenseLinear) and w.w.dtype == mx.float16
    np.testing.assert_array_equal(np.array(w.w), gguf_quants.dequantize(blocks.reshape(6, -1), Q.Q6_K)
                                  .astype(np.float16))
    big = np.array([[1.0, 70000.0] * 16], dtype=np.float32)  # a float32 matrix float16 cannot hold
    assert to_float16(Tensor("b", Q.F32, big.shape, big)).dtype == np.float32


# ---- the model against the numpy reference -----------------------------------------------------

def test_logits_match_numpy_at_every_position(mlx_model, numpy_model, tokenizer):
    ids = np.array(tokenizer.encode(PLAIN_PROMPT + " Johannes Gutenberg combined movable metal type"))
    ours = mlx_model.forward(ids, mlx_model.new_cache(64), all_logits=True)
    ref = numpy_model.forward(ids, numpy_model.new_cache(64), all_logits=True)
    assert_logits_close(ours, ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_pieces_with_cache_equal_one_pass(mx, mlx_model):
    from backends.mlx.cache import MlxKVCache

    ids = np.array([1, 504, 3158, 8, 6233, 314, 253, 1345, 281, 34, 29, 41, 730, 5])
    whole = mlx_model.forward(ids, mlx_model.new_cache(32), all_logits=True)
    # for the last logits alone the last layer runs past its keys and values for the last token only
    last = mlx_model.forward(ids, mlx_model.new_cache(32))
    np.testing.assert_allclose(last, whole[-1], rtol=0, atol=1e-4 * np.abs(whole).max())
    cache = MlxKVCache(mlx_model.hparams, 32, mlx_model.dtype, step=4)  # grows at 4, 8, 12, 16
    pieces = ((0, 5), (5, 6), (6, 11), (11, 14))
    parts = [mlx_model.forward(ids[a:b], cache, all_logits=True) for a, b in pieces]
    assert cache.offset == len(ids) and cache.capacity == 16
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-4 * np.abs(whole).max())
    with pytest.raises(ValueError, match="32 positions"):
        mlx_model.forward(np.zeros(19, dtype=np.int32), cache)


def test_trim_then_rerun_equals_fresh(mlx_model):
    ids = np.array([1, 504, 3158, 8, 6233, 314, 253, 1345])
    cache = mlx_model.new_cache(16)
    mlx_model.forward(ids, cache)
    mlx_model.forward(np.array([77, 88]), cache)
    assert cache.trim(2) == 2 and cache.offset == len(ids)
    again = mlx_model.forward(np.array([99]), cache)
    fresh = mlx_model.forward(np.append(ids, 99), mlx_model.new_cache(16))
    np.testing.assert_allclose(again, fresh, atol=1e-4 * np.abs(fresh).max())
    cache.reset()
    assert cache.offset == 0
    again = mlx_model.forward(np.append(ids, 99), cache)
    np.testing.assert_allclose(again, fresh, atol=1e-4 * np.abs(fresh).max())


def greedy_plain(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens with one forward() per token; also the logits each token was picked from."""
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(np.array(prompt), cache)
    tokens, seen = [], []
    for _ in range(n):
        seen.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = model.forward(np.array(tokens[-1:]), cache)
    return tokens, np.stack(seen)


def greedy_stream(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The same through decode_stream, the pipelined loop."""
    cache = model.new_cache(len(prompt) + n)
    seen = [model.forward(np.array(prompt), cache)]

    def sample(logits: np.ndarray) -> int:
        seen.append(logits)
        return int(np.argmax(logits))

    first = int(np.argmax(seen[0]))
    tokens = [first, *model.decode_stream(first, cache, sample, n - 1)]
    assert cache.offset == len(prompt) + n - 1  # every token but the last went through the model
    return tokens, np.stack(seen)


@pytest.mark.slow
@pytest.mark.parametrize("prompt,loop", [(PLAIN_PROMPT, greedy_plain), (CHAT_PROMPT, greedy_stream)],
                         ids=["plain-forward", "chat-decode_stream"])
def test_greedy_64_tokens_match_numpy(mlx_model, numpy_model, tokenizer, prompt, loop):
    """The numpy reference checks the MLX tokens in one pass: at every position its argmax must be the token
    MLX chose there, which is what greedy decoding on numpy would produce, token by token."""
    ids = tokenizer.encode(prompt)
    tokens, logits = loop(mlx_model, ids, N_GREEDY)
    ref = numpy_model.forward(np.array(ids + tokens[:-1]), numpy_model.new_cache(len(ids) + N_GREEDY),
                              all_logits=True)[len(ids) - 1:]
    assert ref.argmax(-1).tolist() == tokens
    assert_logits_close(logits, ref)


def test_decode_stream_stopped_early_leaves_the_cache_as_the_plain_loop(mlx_model):
    prompt = np.array([1, 504, 3158, 8, 6233])
    cache = mlx_model.new_cache(32)
    first = int(np.argmax(mlx_model.forward(prompt, cache)))
    stream = mlx_model.decode_stream(first, cache, lambda logits: int(np.argmax(logits)), 10)
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert cache.offset == len(prompt) + 3  # first and got[:2] are in; got[2], the last yielded, is not
    fresh = mlx_model.forward(np.array([*prompt, first, *got]), mlx_model.new_cache(32))
    resumed = mlx_model.forward(np.array(got[-1:]), cache)
    np.testing.assert_allclose(resumed, fresh, atol=1e-4 * np.abs(fresh).max())


def test_weight_bytes_follow_the_file(mlx_model, numpy_model):
    # Q4_1 repacks to the same 20 bytes per 32 weights; the Q8_0 output matrix takes 36 instead of 34
    ours, file_bytes = mlx_model.weight_bytes_per_token(), numpy_model.weight_bytes_per_token()
    assert file_bytes < ours < 1.06 * file_bytes


# ---- other formats and architectures: SmolLM2 rewritten ---------------------------------------------

LAYER_TYPES = {  # layer -> qtype of (q, k, v, output, gate, up, down); mixed layers take the unfused path
    0: [Q.Q4_0] * 7, 1: [Q.Q5_0] * 7, 2: [Q.Q5_1] * 7, 3: [Q.Q8_0] * 7, 4: [Q.F16] * 7,
    5: [Q.Q8_0, Q.Q5_0, Q.F16, Q.Q4_0, Q.Q4_0, Q.Q5_1, Q.BF16],
}
N_VOCAB = 4096
MATRICES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf_quants.quantize(w, qtype)


def rewrite_smollm2(src, path, arch: str) -> None:
    """SmolLM2 cut to its first len(LAYER_TYPES) layers and N_VOCAB tokens, those layers in other formats,
    with an untied F16 output matrix. For arch "llama": llama3 rope factors and linear rope scaling; for
    "qwen3": q/k/v biases, q/k norms and neox rope."""
    rng = np.random.default_rng(3)
    writer = GGUFWriter(str(path), arch)
    sizes = {"block_count": len(LAYER_TYPES), "vocab_size": N_VOCAB}
    for key, value in src.metadata.items():
        if key.startswith("llama."):
            name = key[len("llama."):]
            if isinstance(value, int):
                writer.add_uint32(f"{arch}.{name}", sizes.get(name, value))
            elif isinstance(value, float):
                writer.add_float32(f"{arch}.{name}", value)
    head_dim = src.get("llama.attention.key_length", 64)
    for name, t in src.tensors.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        base = name.split(".")[2] if layer >= 0 else ""
        if layer >= len(LAYER_TYPES):
            continue
        if base in MATRICES:
            qtype = LAYER_TYPES[layer][MATRICES.index(base)]
            writer.add_tensor(name, encode(gguf_quants.dequantize(np.asarray(t.data), t.qtype), qtype),
                              raw_dtype=qtype)
        elif name == "token_embd.weight":
            embd = np.asarray(t.data[:N_VOCAB])
            writer.add_tensor(name, embd, raw_dtype=t.qtype)
            writer.add_tensor("output.weight", gguf_quants.dequantize(embd, t.qtype).astype(np.float16))
        else:
            writer.add_tensor(name, np.asarray(t.data), raw_dtype=t.qtype)
    if arch == "llama":
        writer.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, head_dim // 2, dtype=np.float32))
        writer.add_string("llama.rope.scaling.type", "linear")
        writer.add_float32("llama.rope.scaling.factor", 2.0)
    else:
        for i in range(len(LAYER_TYPES)):
            for x, n in (("q", 576), ("k", 192), ("v", 192)):
                writer.add_tensor(f"blk.{i}.attn_{x}.bias", (rng.standard_normal(n) * 0.1).astype(np.float32))
            for x in "qk":
                writer.add_tensor(f"blk.{i}.attn_{x}_norm.weight",
                                  (1 + rng.standard_normal(head_dim) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_formats_and_architectures_match_numpy(mx, smollm2_gguf, tmp_path, arch):
    from backends.mlx.weights import DenseLinear, QuantLinear

    path = tmp_path / f"rewritten-{arch}.gguf"
    rewrite_smollm2(smollm2_gguf, path, arch)
    gguf = read_gguf(path)
    model, ref_model = load_model(gguf, "mlx"), load_model(gguf, "numpy")
    hp = model.hparams
    assert not hp.tied_embeddings and hp.has_rope_freqs == (arch == "llama")
    assert hp.qk_norm == hp.qkv_bias == hp.rope_neox == (arch == "qwen3")
    assert [w.bits for w in model.layers[1].qkv] == [5] and isinstance(model.layers[4].qkv[0], DenseLinear)
    assert len(model.layers[5].qkv) == 3 and isinstance(model.output, DenseLinear)
    assert isinstance(model.embed, QuantLinear)
    ids = np.array([1, 504, 3158, 8, 3233, 314, 253, 1345, 281, 34, 29, 41])  # all below N_VOCAB
    cache = model.new_cache(32)
    ours = np.concatenate([model.forward(ids[:8], cache, all_logits=True),
                           model.forward(ids[8:], cache, all_logits=True)])
    assert_logits_close(ours, ref_model.forward(ids, ref_model.new_cache(32), all_logits=True))


# ---- without MLX ----------------------------------------------------------------------------------

def test_missing_mlx_is_one_clear_error(smollm2_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)  # what Python does for a package that is not installed
    with pytest.raises(BackendError, match=r"backend 'mlx' needs MLX: pip install 'llmcli\[mlx\]'"):
        load_model(smollm2_gguf, "mlx")


# ---- through the CLI: the engine's pipelined decode path, and llm bench ---------------------------------

def _llm(*args: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_llm_run_on_mlx_prints_what_numpy_prints(mx, smollm2_path):
    args = ("run", str(smollm2_path), "Name three colours.", "--temperature", "0", "-n", "24", "--verbose")
    mlx_run, numpy_run = _llm(*args, "--backend", "mlx"), _llm(*args, "--backend", "numpy")
    assert mlx_run.returncode == 0, mlx_run.stderr
    assert mlx_run.stdout == numpy_run.stdout and mlx_run.stdout.strip()
    assert "(mlx backend" in mlx_run.stderr


@pytest.mark.slow
def test_llm_bench_on_mlx(mx, smollm2_path):
    import json

    r = _llm("bench", str(smollm2_path), "--backend", "mlx", "-p", "16", "-n", "4", "-r", "1", "-o", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["backend"] == "mlx" and row["n_prompt"] == 16 and row["n_gen"] == 4
    assert row["pp_tok_s"] > 0 and row["tg_tok_s"] > 0 and row["decode_gbps"] > 0
