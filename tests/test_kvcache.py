"""KV cache storage types (f32, f16, q8_0): the numba codec and attention kernels against the numpy reference
(quant/kvtypes.py), "generate in pieces with the cache" equals "generate in one go" for each type and backend,
the logits' KL against an f32 cache, and `llm serve --kv-type` against `llm run --kv-type`."""

from __future__ import annotations

import numpy as np
import pytest

from quant import kvtypes
from tests.conftest import WIKITEXT
from tests.oracle import kl_per_position

TYPES = ("f32", "f16", "q8_0")
PROMPT = "The history of the Roman Empire begins with"


@pytest.mark.parametrize("kv_type,d", [(t, d) for t in TYPES for d in (32, 96, 160)] + [("f16", 40), ("f32", 40)])
def test_numba_codec_matches_reference(kv_type, d):
    from quant.kv_kernels import decode_rows, encode_rows

    rng = np.random.default_rng(d)
    x = (rng.standard_normal((9, d)) * rng.choice([1e-3, 1.0, 40.0], size=(9, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0
    want = kvtypes.encode(x, kv_type)
    got = np.empty((9, kvtypes.row_bytes(kv_type, d)), dtype=np.uint8)
    encode_rows(x, got, kvtypes.KV_CODES[kv_type])
    assert (got == want.view(np.uint8).reshape(9, -1)).all()
    back = np.empty_like(x)
    decode_rows(got, back, kvtypes.KV_CODES[kv_type])
    assert (back == kvtypes.decode(want, kv_type)).all()
    if kv_type == "q8_0":  # within half a step of its block's scale, plus 127 times the scale's f16 rounding
        step = np.abs(x).reshape(9, -1, 32).max(axis=-1, keepdims=True) / np.float32(127)
        d16 = step.astype(np.float16).astype(np.float32)
        bound = 0.5 * step + 127 * np.abs(d16 - step)
        assert (np.abs(back - x).reshape(9, -1, 32) <= bound * 1.001 + 1e-12).all()


def _reference_attention(q, keys, values, positions, window, scale):
    """q: (T, H, D); keys, values: (KVH, P, D) float32 by position -> (T, H, D)."""
    T, H, D = q.shape
    group = H // keys.shape[0]
    out = np.empty_like(q)
    for t in range(T):
        p = positions[t]
        lo = max(0, p + 1 - window) if window else 0
        for h in range(H):
            s = keys[h // group, lo:p + 1] @ q[t, h] * scale
            e = np.exp(s - s.max())
            out[t, h] = (e / e.sum()) @ values[h // group, lo:p + 1]
    return out


@pytest.mark.parametrize("kv_type,d,window", [(t, d, w) for t in TYPES for d, w in ((96, 0), (160, 13))]
                         + [("f32", 40, 0), ("f16", 40, 0), ("f16", 80, 13)])
def test_attention_kernel_reads_encoded_cache(kv_type, d, window):
    """The decode attention over an f32 / f16 / q8_0 cache (a ring when windowed) equals float attention over the
    decoded values: odd head sizes (f32 and f16 also not multiples of 32: the scalar tails), 3 queries of one
    conversation, 6 or 16 heads on 2 KV heads (GQA groups of 3 and 8), 37 positions."""
    from backends.numba import layers as L
    from quant.kv_kernels import encode_rows

    rng = np.random.default_rng(7)
    KVH, H, P, T = 2, 6 if d != 96 else 16, 37, 3
    S = P if not window else window + 8  # a ring shorter than the context
    keys = rng.standard_normal((KVH, P, d)).astype(np.float32)
    values = rng.standard_normal((KVH, P, d)).astype(np.float32)
    code, rb = kvtypes.KV_CODES[kv_type], kvtypes.row_bytes(kv_type, d)
    k_pool = np.zeros((1, KVH * S * rb), dtype=np.uint8)
    v_pool = np.zeros_like(k_pool)
    for p in range(P):  # written in order, as decoding does: a ring keeps the last S
        for kv in range(KVH):
            at = (kv * S + p % S) * rb
            encode_rows(keys[kv, p:p + 1], k_pool[0, at:at + rb].reshape(1, rb), code)
            encode_rows(values[kv, p:p + 1], v_pool[0, at:at + rb].reshape(1, rb), code)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    positions = np.array([P - 1, P - 2, P - 3], dtype=np.int64)  # all still in the ring
    out = np.zeros_like(q)
    L.attention_rows_serial(q, k_pool, v_pool, 0, S, KVH, code, np.zeros(T, dtype=np.int64), positions, window,
                            np.float32(0.1), out)
    dk = kvtypes.decode(kvtypes.encode(keys, kv_type), kv_type)
    dv = kvtypes.decode(kvtypes.encode(values, kv_type), kv_type)
    np.testing.assert_allclose(out, _reference_attention(q, dk, dv, positions, window, 0.1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_type,d,heads,T,threads", [(t, 64, 6, 8, 2) for t in TYPES]
                         + [("f32", 40, 16, 5, 2), ("f16", 40, 16, 5, 2), ("f16", 96, 2, 1, 2), ("q8_0", 64, 24, 3, 2),
                            ("f16", 64, 6, 20, 4), ("q8_0", 64, 18, 17, 4)])
def test_chunk_attention_equals_float_attention(kv_type, d, heads, T, threads):
    """A chunk of one conversation's consecutive tokens over a full layer (a head per work item, all its tokens
    at once, or parts of them where the heads do not share evenly among the threads): each token sees the
    positions up to its own. GQA groups of 3, 8, 1, 9 and 12 on 2 KV heads, 1 to 20 tokens (20 on 4 threads: 3
    parts of 8, 8, 4 tokens), head sizes with a scalar tail (40) and without."""
    from backends.numba import layers as L
    from quant.kv_kernels import encode_rows

    rng = np.random.default_rng(11)
    KVH, P, S = 2, 301, 320  # the chunk's keys are written already, as forward_stack does before attending
    keys = rng.standard_normal((KVH, P, d)).astype(np.float32)
    values = rng.standard_normal((KVH, P, d)).astype(np.float32)
    code, rb = kvtypes.KV_CODES[kv_type], kvtypes.row_bytes(kv_type, d)
    k_pool = np.zeros((2, KVH * S * rb), dtype=np.uint8)  # row 1 of the pools is this conversation's cache
    v_pool = np.zeros_like(k_pool)
    for kv in range(KVH):
        encode_rows(keys[kv], k_pool[1, kv * S * rb:(kv * S + P) * rb].reshape(P, rb), code)
        encode_rows(values[kv], v_pool[1, kv * S * rb:(kv * S + P) * rb].reshape(P, rb), code)
    q = rng.standard_normal((T, heads, d)).astype(np.float32)
    start = P - T
    out = np.full_like(q, np.nan)
    L.attention_chunk(q, k_pool, v_pool, 0, S, KVH, code, 1, start, np.float32(0.1), out, threads)
    dk = kvtypes.decode(kvtypes.encode(keys, kv_type), kv_type)
    dv = kvtypes.decode(kvtypes.encode(values, kv_type), kv_type)
    positions = np.arange(start, P)
    np.testing.assert_allclose(out, _reference_attention(q, dk, dv, positions, 0, 0.1), atol=2e-5, rtol=1e-4)


def _greedy(model, ids, kv_type, pieces, n=10):
    """Greedy tokens after feeding `ids` in the given pieces (lengths), then decoding n tokens; and each step's
    margin (top logit minus the runner-up)."""
    cache = model.new_cache(len(ids) + n + 1, kv_type)
    at = 0
    for k in pieces:
        logits = model.forward(np.asarray(ids[at:at + k]), cache)
        at += k
    out, margins = [], []
    for _ in range(n):
        row = np.asarray(logits, dtype=np.float64).reshape(-1)
        top2 = np.partition(row, -2)[-2:]
        out.append(int(np.argmax(row)))
        margins.append(float(top2[1] - top2[0]))
        logits = model.forward(np.asarray(out[-1:]), cache)
    return out, margins


def _assert_same_greedy(a, b, near_tie=0.1):
    """The same greedy tokens, except that they may part at a near-tie (the batched kernels sum in another
    order, so logits agree only to rounding) - and only there."""
    (ta, ma), (tb, mb) = a, b
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        if x != y:
            assert min(ma[i], mb[i]) < near_tie, f"step {i}: {x} != {y} with margins {ma[i]:.3f}, {mb[i]:.3f}"
            return


@pytest.fixture(scope="module")
def smollm2_models(smollm2_gguf):
    from backends import load_model, mlx_available

    names = ("numba", "numpy", "mlx") if mlx_available() else ("numba", "numpy")
    return {name: load_model(smollm2_gguf, name, 2) for name in names}


@pytest.mark.parametrize("backend", ["numba", "numpy", pytest.param("mlx", marks=pytest.mark.skipif(
    not __import__("backends").mlx_available(), reason="needs MLX"))])
@pytest.mark.parametrize("kv_type", TYPES)
def test_pieces_equal_one_go(smollm2_models, smollm2_path, backend, kv_type):
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    ids = Tokenizer.from_gguf(read_gguf(smollm2_path)).encode(PROMPT)
    model = smollm2_models[backend]
    whole = _greedy(model, ids, kv_type, [len(ids)])
    _assert_same_greedy(_greedy(model, ids, kv_type, [3, 1, len(ids) - 4]), whole)
    if backend == "numba":  # the prompt path (a GEMM-sized prompt) then decode, against decode all along
        long_ids = ids * 4
        _assert_same_greedy(_greedy(model, long_ids, kv_type, [len(long_ids)]),
                            _greedy(model, long_ids, kv_type, [1] * len(long_ids)))


@pytest.mark.slow
@pytest.mark.parametrize("kv_type", ["q8_0"])
def test_pieces_equal_one_go_windowed(gemma3_path, kv_type):
    """Gemma 3's sliding-window layers keep rings: a prompt past the window, in pieces and at once."""
    from backends import load_model
    from quant.gguf_file import read_gguf

    model = load_model(read_gguf(gemma3_path), "numba", 2)
    ids = list(np.random.default_rng(3).integers(1000, 20000, 600))
    whole = _greedy(model, ids, kv_type, [len(ids)], n=6)
    _assert_same_greedy(_greedy(model, ids, kv_type, [300, 5, 1, len(ids) - 306], n=6), whole)


@pytest.mark.slow
def test_kl_against_f32(smollm2_models, smollm2_path):
    """Mean KL of the next-token distribution, f16 and q8_0 caches against f32, over 384 tokens of wikitext-2
    (benchmarks/bench_kvcache.py measures 2,048)."""
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    ids = Tokenizer.from_gguf(read_gguf(smollm2_path)).encode(WIKITEXT.read_text()[:4000])[:384]
    model = smollm2_models["numba"]
    ref = model.forward(np.asarray(ids), model.new_cache(len(ids), "f32"), all_logits=True)
    for kv_type, bound in (("f16", 1e-4), ("q8_0", 1e-3)):
        logits = model.forward(np.asarray(ids), model.new_cache(len(ids), kv_type), all_logits=True)
        assert kl_per_position(logits, ref).mean() < bound, kv_type


def test_cache_bytes_per_type(smollm2_gguf):
    from backends.base import kv_cache_bytes, read_hparams

    hp = read_hparams(smollm2_gguf)
    f32 = kv_cache_bytes(hp, 4096, kv_type="f32")
    assert f32 == 2 * hp.n_layers * 4096 * hp.n_kv_heads * hp.head_dim * 4
    assert kv_cache_bytes(hp, 4096, kv_type="f16") * 2 == f32
    assert kv_cache_bytes(hp, 4096, kv_type="q8_0") == f32 * 34 // 128


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads RSS from /proc")
@pytest.mark.parametrize("pooled", [False, True])
def test_cache_memory_is_committed_where_written(smollm2_models, pooled):
    """A fresh cache's first prompt writes a few rows in every layer's and head's block: only their pages may
    become resident, not the whole cache (with 2 MB pages nearly every page of the caches was: 373 of 377 MB
    for one, 564 of 755 MB for the pool of two), and the cache reads back what the prompt wrote after zeros."""
    import os

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    model = smollm2_models["numba"]
    ctx = 16384  # f16: 30 layers x 3 heads x 16384 x 128 bytes x 2 = 377 MB per conversation
    model.forward(np.arange(100, 120), model.new_cache(64, kv_type="f16"))  # machine code loaded, buffers made
    before = rss()
    caches = model.new_caches(2, ctx, kv_type="f16") if pooled else [model.new_cache(ctx, kv_type="f16")]
    model.forward(np.arange(100, 120), caches[0])
    grown = rss() - before
    size = sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert size > 300 << 20 and grown < 40 << 20, (size, grown)
    k0, _ = caches[0].layer(0)
    assert k0[:, :20].any() and not k0[:, 20:].any()


def test_unknown_kv_type_is_one_line(smollm2_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmcli", "run", str(smollm2_path), "hi", "--kv-type", "q4",
                        "-n", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "KV cache type 'q4'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("neox", [False, True])
def test_rotate_keys_composes_with_rope(neox):
    """A key rotated to position p, then back by n, is the key rotated to p - n: both RoPE pairings, with the
    rotation covering only part of the head (rope_dim < head_dim)."""
    from backends.base import rotate_keys
    from backends.numpy import rope

    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 96)).astype(np.float32)  # (T, heads, head_dim)
    inv_freq = (10000.0 ** (-np.arange(32) / 32)).astype(np.float32)  # rope_dim 64 of 96
    pos = np.array([700, 701, 702, 950])
    got = rotate_keys(rope(x, pos, inv_freq, neox), -613, inv_freq, neox)
    np.testing.assert_allclose(got, rope(x, pos - 613, inv_freq, neox), atol=2e-4)
    np.testing.assert_array_equal(got[..., 64:], x[..., 64:])


SYSTEM = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
TURNS = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."},
         {"role": "user", "content": "And of Italy?"},
         {"role": "assistant", "content": "Rome is the capital of Italy."},
         {"role": "user", "content": "Name a large river in Germany."}]


@pytest.fixture(scope="module")
def smollm2_sessions(smollm2_path):
    from llmcli import engine

    return {name: engine.load(smollm2_path, name, 2) for name in ("numba", "numpy")}


def _shifted(lm, kv_type):
    """Logits after a chat of two exchanges whose first is dropped by shifting the cache, the shift, and the
    logits of a fresh prefill of the shortened conversation."""
    from llmcli.engine import Session, encode_chat

    s = Session(lm, 256, kv_type=kv_type)
    s.prefill(encode_chat(s, SYSTEM + TURNS[:4]))
    short = encode_chat(s, SYSTEM + TURNS[2:])
    n = s.shift_for(short)
    got = s.prefill(short)
    return got, n, s.reused, Session(lm, 256, kv_type=kv_type).prefill(short)


@pytest.mark.parametrize("kv_type", ["f32", "q8_0"])
def test_context_shift(smollm2_sessions, kv_type):
    """Dropping the first exchange shifts the cache (nothing after the system prompt is recomputed but the new
    message); the next logits: the same on numba and numpy (each re-rotates its own cache), and close to a fresh
    prefill of the shortened chat. Not equal to it: the turns kept were computed while the dropped ones were in
    context, as with llama.cpp's context shift."""
    from llmcli.engine import Session, encode_chat

    got, n, reused, fresh = _shifted(smollm2_sessions["numba"], kv_type)
    ref, n_ref, _, _ = _shifted(smollm2_sessions["numpy"], kv_type)
    s = Session(smollm2_sessions["numba"], 256)
    dropped = len(encode_chat(s, SYSTEM + TURNS[:2])) - len(encode_chat(s, SYSTEM))  # the first exchange
    assert n == n_ref == dropped
    assert reused > len(encode_chat(s, SYSTEM)) + 10  # the second exchange came from the shifted cache
    # q8_0: each backend rounds its keys to 8 bits and rounds them again after re-rotating them, so the two carry
    # independent rounding noise (each ~1e-3 from its own f32 run, measured)
    assert kl_per_position(got, ref)[0] < (1e-3 if kv_type == "f32" else 5e-3)
    assert int(np.argmax(got)) == int(np.argmax(fresh))
    assert kl_per_position(got, fresh)[0] < 0.5


@pytest.mark.slow
def test_serve_kv_type_equals_run(smollm2_path):
    """`llm serve --kv-type q8_0` (its slots: one pool of q8_0 caches, decoded in batches) gives the greedy text
    `llm run --kv-type q8_0` gives, for a chat and for two concurrent completions."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_server import CHAT, PROMPTS, Served, _llm_run

    served = Served(smollm2_path, "--parallel", "2", "--kv-type", "q8_0")
    try:
        c = served.client()
        chat = c.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=16)
        assert _llm_run(smollm2_path, CHAT[0]["content"], "-n", "16", "--kv-type", "q8_0", "--ctx", "512") == \
            chat.choices[0].message.content + "\n"

        def complete(prompt):
            return c.completions.create(model=served.model, prompt=prompt, temperature=0, max_tokens=12
                                        ).choices[0].text

        with ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(complete, PROMPTS[:2]))
        for prompt, text in zip(PROMPTS[:2], texts, strict=True):
            assert _llm_run(smollm2_path, prompt, "--raw", "-n", "12", "--kv-type", "q8_0", "--ctx", "512") == text
    finally:
        served.stop()


def test_chat_context_shift_says_so(smollm2_path):
    """`llm chat --context-shift` with a small context: the oldest turns go, the notice says the cache was shifted
    (without the flag the same chat says it dropped them: tests/test_cli.py)."""
    import os
    import subprocess
    import sys

    msgs = [f"Tell me one fact about the number {i}." for i in range(6)]
    r = subprocess.run([sys.executable, "-m", "llmcli", "chat", str(smollm2_path), "--temperature", "0", "-n", "24",
                        "--ctx", "160", "--system", "Be brief.", "--context-shift"], input="\n".join(msgs) + "\n",
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if "context shift:" in line]
    assert notices and all("system prompt is kept" in line for line in notices)
    assert any("shifted the cache by" in line for line in notices)


@pytest.mark.slow
def test_windowed_numba_cache_is_not_shifted(gemma3_path):
    """Gemma 3's sliding-window layers keep rings: numba declines to shift (the chat then recomputes) and leaves
    the cache as it was."""
    from backends import load_model
    from quant.gguf_file import read_gguf

    model = load_model(read_gguf(gemma3_path), "numba", 2)
    cache = model.new_cache(64, "f16")
    model.forward(np.arange(2, 22), cache)
    before = cache.k.copy()
    assert not model.shift_cache(cache, 4, 6)
    assert cache.offset == 20 and (cache.k == before).all()
