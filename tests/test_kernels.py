"""The numba block kernels against gguf-py (bit-exact with ggml): dequantization must match exactly, and every
matrix-vector product must equal dequantize(W) @ x within a stated bound."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from quant.formats import block_size, type_size
from quant.jit import SIMD_WIDTH_VAR
from quant.kernels import dequantize_raw, matvec_raw

# gguf-py quantizes these; K-quants it only dequantizes, so their blocks are random bytes with sane scales
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
ROWS = 37  # not divisible by the thread count


def random_k_blocks(qtype: Q, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random super-blocks whose float16 scales are small normal numbers (random bytes there could be inf)."""
    nb, ts = n // 256, type_size(qtype)
    raw = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.01, size=(rows, nb, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[:, :, 208:210] = scale[:, :, 0:2]
    else:  # d and dmin
        raw[:, :, 0:4] = scale.reshape(rows, nb, 4)
    return raw.reshape(rows, nb * ts)


def weights(qtype: Q, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_QUANTS:
        return random_k_blocks(qtype, rows, n, rng)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    return w if qtype == Q.F32 else gguf_quants.quantize(w, qtype)


def reference(raw: np.ndarray, qtype: Q, n: int) -> np.ndarray:
    if qtype == Q.F32:
        return raw.astype(np.float32)
    return gguf_quants.dequantize(raw, qtype).reshape(raw.shape[0], n).astype(np.float32)


def widths(qtype: Q) -> list[int]:
    # multiples of 32 that are not multiples of 256, where the format allows it
    if block_size(qtype) == 256:
        return [256, 512]
    return [96, 576, 70] if block_size(qtype) == 1 else [96, 576]  # float rows of any length (70: a tail)


CASES = [(t, n) for t in QUANTIZABLE + K_QUANTS for n in widths(t)]


@pytest.mark.parametrize("qtype,n", CASES, ids=[f"{t.name}-{n}" for t, n in CASES])
def test_dequantize_matches_gguf(qtype, n):
    rng = np.random.default_rng(1)
    raw = weights(qtype, ROWS, n, rng)
    np.testing.assert_array_equal(dequantize_raw(raw, qtype, n), reference(raw, qtype, n))


INT16_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *K_QUANTS]  # multiplied by an int16 copy of x


def int16_rounding(x: np.ndarray) -> np.ndarray:
    """Largest change `prepare` makes to each element of x (T, n): half a step of its block's int16 grid."""
    top = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32).max(-1)
    return np.repeat(top / 32767 / 2, 32, axis=1)


@pytest.mark.parametrize("qtype,n", CASES, ids=[f"{t.name}-{n}" for t, n in CASES])
def test_matvec_equals_dequantized_product(qtype, n):
    """|W x - dequantize(W) @ x| <= 2e-5 * (|W| @ |x|) + 1e-6: float32 rounding of a length-n sum, plus for the
    quantized formats the int16 copy of x: |W| @ (half its step per block), a relative 1.5e-5 of each block's
    largest activation. Nothing coarser (no 8-bit copy of x)."""
    rng = np.random.default_rng(2)
    raw = weights(qtype, ROWS, n, rng)
    w = reference(raw, qtype, n).astype(np.float64)
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[:, 5] *= 50  # an outlier, as LLM activations have
    y = matvec_raw(raw, qtype, x)  # (3, ROWS)
    exact = x.astype(np.float64) @ w.T
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T
    bound = 2e-5 * mag + 1e-6
    if qtype in INT16_FORMATS:
        bound += int16_rounding(x) @ np.abs(w).T
    assert np.all(np.abs(y - exact) <= bound)
    if qtype in INT16_FORMATS:  # and the int16 copy is what makes the difference: exact for x on its grid
        xg = x.astype(np.float64).reshape(3, -1, 32)
        step = np.abs(xg).max(-1, keepdims=True) / 32767
        on_grid = (np.rint(xg / step) * step).reshape(3, n).astype(np.float32)
        y = matvec_raw(raw, qtype, on_grid)
        exact = on_grid.astype(np.float64) @ w.T
        assert np.all(np.abs(y - exact) <= 2e-5 * mag + 1e-6)


# and rows of whole segments of 16 blocks with a rest (simd_multi.SEG: 2 segments + 1 super-block, + 3 blocks)
MULTI_CASES = [(t, n) for t in INT16_FORMATS for n in [*widths(t), 1280 if block_size(t) == 256 else 1120]]


@pytest.mark.parametrize("qtype,n", MULTI_CASES, ids=[f"{t.name}-{n}" for t, n in MULTI_CASES])
def test_several_tokens_equal_one_at_a_time(qtype, n):
    """T = 2..9 tokens at once (quant/simd_multi.py: each block decoded once for up to 8 of them with 512-bit
    vectors, 4 with 256; 9 = 8 + 1 or 4 + 4 + 1) equal the one-token kernel for each token to float32 rounding
    (the same integer block sums, added in another order): |difference| <= 2e-6 * (|W| @ |x|) + 1e-7, and
    dequantize(W) @ x within the bound of test_matvec_equals_dequantized_product. Odd shapes: 37 rows, rows of 3
    blocks (a block past the pairs)."""
    check_several_tokens(qtype, n, range(2, 10), seed=3)


def check_several_tokens(qtype, n, counts, seed):
    """matvec of T tokens at once against the one-token kernel per token and against dequantize(W) @ x, for each
    T in counts (test_several_tokens_equal_one_at_a_time's bounds)."""
    rng = np.random.default_rng(seed)
    raw = weights(qtype, ROWS, n, rng)
    w = reference(raw, qtype, n).astype(np.float64)
    for T in counts:
        x = rng.standard_normal((T, n)).astype(np.float32)
        x[:, 7] *= 40
        y = matvec_raw(raw, qtype, x)
        one = np.stack([matvec_raw(raw, qtype, x[t]) for t in range(T)])
        mag = np.abs(x).astype(np.float64) @ np.abs(w).T
        assert np.all(np.abs(y - one) <= 2e-6 * mag + 1e-7), T
        bound = 2e-5 * mag + 1e-6 + int16_rounding(x) @ np.abs(w).T
        assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= bound), T


# rows longer than one column chunk of a several-token product (kernels.chunk_width: 2048 columns for 8 tokens,
# 1024 for 16), the last chunk ending in blocks past its whole segments
CHUNK_CASES = [(t, 2816 if block_size(t) == 256 else 2656) for t in INT16_FORMATS]


@pytest.mark.parametrize("qtype,n", CHUNK_CASES, ids=[f"{t.name}-{n}" for t, n in CHUNK_CASES])
def test_several_tokens_in_column_chunks(qtype, n):
    """8 and 16 tokens over rows taken in column chunks (kernels.matvec_chunked), within the bounds of
    test_several_tokens_equal_one_at_a_time."""
    from quant.kernels import chunk_width

    for T in (8, 16):
        assert chunk_width(T, n, np.array([[0, int(qtype), ROWS]], dtype=np.int64)) < n
    check_several_tokens(qtype, n, (8, 16), seed=4)


GEMM_CASES = [(t, n) for t in INT16_FORMATS for n in widths(t)]


@pytest.mark.parametrize("qtype,n", GEMM_CASES, ids=[f"{t.name}-{n}" for t, n in GEMM_CASES])
def test_gemm_equals_dequantized_product(qtype, n):
    """The prompt path's integer GEMM (quant/gemm.py) within the int16 kernels' bound above, for 13 tokens (not a
    multiple of the micro-kernel's 6) and 37 rows (not a multiple of its groups of 32); and it is the matvec
    kernels' arithmetic (the same int16 copy, the same integer products): equal to float32 summation noise."""
    from quant.gemm import gemm_raw

    rng = np.random.default_rng(4)
    raw = weights(qtype, ROWS, n, rng)
    w = reference(raw, qtype, n).astype(np.float64)
    x = rng.standard_normal((13, n)).astype(np.float32)
    x[:, 5] *= 50
    y = gemm_raw(raw, qtype, x)
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T
    bound = 2e-5 * mag + 1e-6 + int16_rounding(x) @ np.abs(w).T
    assert y.shape == (13, ROWS)
    assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= bound)
    assert np.all(np.abs(y - matvec_raw(raw, qtype, x)) <= 2e-6 * mag + 1e-7)


@pytest.mark.parametrize("with_q6_k", [False, True], ids=["blocks-of-32", "with-q6_k"])
def test_gemm_of_stacked_matrices(with_q6_k):
    """Matrices of different formats stacked in one product (as Q/K/V are), the first one's rows ending inside
    a group of 32: each row is packed with its own format, the minimums of one beside the offsets of another;
    with a Q6_K matrix among them, every row in scale blocks of 16."""
    from quant.gemm import GROUP, NR, gemm_groups, packed_buffers, padded_activation
    from quant.kernels import weight_views

    rng = np.random.default_rng(5)
    n, T = 256, 8
    mats = [(Q.Q4_0, 21), (Q.Q4_K, 40), (Q.Q8_0, 7)] + ([(Q.Q6_K, 9)] if with_q6_k else [])
    raws = [weights(qtype, rows, n, rng) for qtype, rows in mats]
    buf = np.concatenate([r.reshape(-1) for r in raws])
    offs = np.cumsum([0] + [r.size for r in raws])[:-1]
    descs = np.array([[o, int(qtype), rows] for o, (qtype, rows) in zip(offs, mats, strict=True)], dtype=np.int64)
    x = rng.standard_normal((T, n)).astype(np.float32)
    xb, tp = padded_activation(x)
    rows = sum(r for _, r in mats)
    groups = -(-rows // GROUP)
    assert rows > GROUP
    out = np.full((tp, groups * GROUP), np.nan, dtype=np.float32)
    packed = packed_buffers(2 * n)  # a buffer sized for a wider product serves a narrower one
    gemm_groups(weight_views(buf)[0], descs, 0, groups, xb, packed, out)
    want = np.concatenate([matvec_raw(r, qtype, x) for r, (qtype, _) in zip(raws, mats, strict=True)], axis=1)
    assert tp % NR == 0 and np.all(out[T:] == 0) and np.all(out[:, rows:] == 0)
    np.testing.assert_allclose(out[:T, :rows], want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("T", [1, 3, 16])
def test_stacked_matrices_with_q6_k(T):
    """A product of stacked matrices with Q6_K among them (a Q4_K_M file's Q/K/V), for one token (where the Q6_K
    rows may take the several-token kernel), for three, and for sixteen (rows in column chunks of 1024), over
    rows of two whole segments and a super-block more: each matrix within the int16 bound of its dequantized
    product."""
    from quant.kernels import activation_blocks, matvec_multi, prepare, weight_views

    rng = np.random.default_rng(6)
    n = 1280
    mats = [(Q.Q4_K, 21), (Q.Q6_K, 19), (Q.Q8_0, 7), (Q.Q6_K, 5)]
    raws = [weights(qtype, rows, n, rng) for qtype, rows in mats]
    buf = np.concatenate([r.reshape(-1) for r in raws])
    offs = np.cumsum([0] + [r.size for r in raws])[:-1]
    descs = np.array([[o, int(qtype), rows] for o, (qtype, rows) in zip(offs, mats, strict=True)], dtype=np.int64)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[:, 9] *= 30
    xb = activation_blocks(T, n)
    prepare(x, xb)
    out = np.full((T, sum(r for _, r in mats)), np.nan, dtype=np.float32)
    matvec_multi(weight_views(buf), descs, x, xb, out)
    w = np.concatenate([reference(r, qtype, n) for r, (qtype, _) in zip(raws, mats, strict=True)]).astype(np.float64)
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T
    bound = 2e-5 * mag + 1e-6 + int16_rounding(x) @ np.abs(w).T
    assert np.all(np.abs(out - x.astype(np.float64) @ w.T) <= bound)


@pytest.mark.slow
def test_several_token_kernels_of_256_bit_vectors():
    """The several-token kernels as AVX2 and NEON compile them (simd_multi.WIDE off, forced on any host by
    LLMCLI_SIMD_WIDTH=256, in a kernel cache folder of their own) pass the tests above."""
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from quant import simd_multi\n"
        "assert not simd_multi.WIDE\n"
        "import test_kernels as k\n"
        "for qtype, n in k.MULTI_CASES:\n"
        "    k.test_several_tokens_equal_one_at_a_time(qtype, n)\n"
        "for qtype, n in k.CHUNK_CASES:\n"
        "    k.test_several_tokens_in_column_chunks(qtype, n)\n"
        "for T in (1, 3, 16):\n"
        "    k.test_stacked_matrices_with_q6_k(T)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**os.environ, SIMD_WIDTH_VAR: "256"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_single_vector_and_threads():
    """A 1-D x gives a 1-D result, and the product does not depend on the thread count."""
    import numba

    rng = np.random.default_rng(3)
    raw = weights(Q.Q4_0, 101, 64, rng)
    x = rng.standard_normal(64).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = matvec_raw(raw, Q.Q4_0, x)
        numba.set_num_threads(before)
        many = matvec_raw(raw, Q.Q4_0, x)
    finally:
        numba.set_num_threads(before)
    assert one.shape == (101,)
    np.testing.assert_array_equal(one, many)


def naive_attention(q, k, v, start):
    """Causal grouped-query attention in float64 numpy: query t sees cache positions 0 .. start + t."""
    T, H, D = q.shape
    group = H // k.shape[1]
    out = np.empty((T, H, D))
    for t in range(T):
        for h in range(H):
            keys, values = k[: start + t + 1, h // group], v[: start + t + 1, h // group]
            s = keys.astype(np.float64) @ q[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = p / p.sum() @ values
    return out


@pytest.mark.parametrize("T,start,D", [(1, 0, 64), (1, 300, 64), (3, 37, 80), (8, 5, 40), (20, 0, 128), (300, 7, 64)])
def test_attention_kernels_match_numpy(T, start, D):
    """The decode attention (vector score and value kernels; head_dim not a multiple of 16 or 32 takes the tail
    paths) and the prompt path's masked softmax, against float64 numpy, GQA groups of several sizes."""
    from concurrent.futures import ThreadPoolExecutor

    from backends.numba import prompt_attention
    from backends.numba.layers import attention_rows, attention_rows_serial

    def decode(kernel, *threads):  # the decode kernels over one cache (row 0 of a pool), no sliding window
        def run(q, k, v, start, out):
            KVH, S = k.shape[0], k.shape[1]
            slots, positions = np.zeros(len(q), dtype=np.int64), np.arange(start, start + len(q), dtype=np.int64)
            kernel(q, k.reshape(1, -1).view(np.uint8), v.reshape(1, -1).view(np.uint8), 0, S, KVH, 0, slots,
                   positions, 0, np.float32(1 / np.sqrt(D)), out, *threads)  # an f32 cache (kv type 0), as bytes
        return run

    def prompt(q, k, v, start, out):
        prompt_attention(q, k, v, start, out, 1 / np.sqrt(D))

    def pooled(q, k, v, start, out):
        with ThreadPoolExecutor(2) as pool:
            prompt_attention(q, k, v, start, out, 1 / np.sqrt(D), run=lambda work, n: list(pool.map(work, range(n))))

    rng = np.random.default_rng(4)
    for H, KVH in ((6, 2), (16, 2), (12, 1)):  # GQA groups of 3, 8 (one score pass) and 12 (two, three value passes)
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        k = rng.standard_normal((start + T + 5, KVH, D)).astype(np.float32)  # + unused positions past the end
        v = rng.standard_normal((start + T + 5, KVH, D)).astype(np.float32)
        want = naive_attention(q, k, v, start)
        kh, vh = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (k, v))  # the numba cache: (KV heads, S, D)
        # 16 threads split each GQA group over several work items
        for kernel in (decode(attention_rows, 2), decode(attention_rows, 16), decode(attention_rows_serial),
                       prompt, pooled):
            out = np.full((T, H, D), np.nan, dtype=np.float32)
            kernel(q, kh, vh, start, out)
            np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)


def test_vector_exp():
    """exp_f32 (plain arithmetic, so loops over it vectorize) within 5e-7 of e^x; clamped at the ends."""
    from numba import njit

    from quant.simd import exp_f32

    @njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = exp_f32(x[i])

    x = np.concatenate([np.linspace(-87, 88, 100_001), [-1000.0, 0.0, 1000.0]]).astype(np.float32)
    y = np.empty_like(x)
    apply(x, y)
    want = np.exp(x[:-3].astype(np.float64))
    assert np.max(np.abs(y[:-3] - want) / want) < 5e-7
    assert 0 < y[-3] < 1e-37 and y[-2] == 1.0 and np.isfinite(y[-1])


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f32", "f16", "bf16", "q4_k", "q5_k",
                                  "q6_k", "gemm", "gemm_min", "gemm16_min", "multi_q4_0", "multi_q4_1",
                                  "multi_q8_0", "multi_q4_k", "multi_q5_k", "multi_q6_k"])
def test_kernels_are_portable_vector_code(name):
    """The dot-product, several-token and GEMM micro-kernel IR uses no target intrinsics: LLVM compiles the same
    module to NEON vector FMAs for ARM64 and to AVX2 for an x86 without AVX-512, as numba does for the machine it
    runs on."""
    import re

    import llvmlite.binding as llvm

    from quant import gemm, simd, simd_multi

    def standalone_module(name):
        if name.startswith("multi_"):
            return simd_multi.standalone_module(name[6:])
        if name.startswith("gemm"):
            return gemm.standalone_module(name.endswith("min"), 8 if "16" in name else 16)
        return simd.standalone_module(name)

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    for triple, cpu, vector_fma in [("aarch64-unknown-linux-gnu", "generic", r"fmla\s+v\d+\.4s"),
                                    ("x86_64-unknown-linux-gnu", "haswell", r"vfmadd\w*ps\s+.*%ymm")]:
        try:
            target = llvm.Target.from_triple(triple)
        except RuntimeError:
            pytest.skip(f"this llvmlite has no {triple} backend")
        module = llvm.parse_assembly(standalone_module(name))
        module.triple = triple
        module.verify()
        asm = target.create_target_machine(cpu=cpu, opt=3).emit_assembly(module)
        assert re.search(vector_fma, asm), f"{name}: no vector FMA for {triple}"
        assert "llvm.x86" not in str(module)


def test_jit_cache_folders_are_pruned(tmp_path):
    """A new version's cache folder removes the folders unused for PRUNE_AFTER_DAYS; a start marks its own
    folder used; a recently used sibling (another install) stays."""
    import os
    import time

    from quant.jit import PRUNE_AFTER_DAYS, use_cache_dir

    now = time.time()
    old, recent, ours = tmp_path / "old", tmp_path / "recent", tmp_path / "new"
    for folder, age_days in ((old, PRUNE_AFTER_DAYS + 1), (recent, PRUNE_AFTER_DAYS - 1)):
        (folder / "index").mkdir(parents=True)
        os.utime(folder, (now - age_days * 86400,) * 2)
    use_cache_dir(ours, now)
    assert ours.is_dir() and recent.is_dir() and not old.exists()
    os.utime(recent, (now - 2 * PRUNE_AFTER_DAYS * 86400,) * 2)
    use_cache_dir(recent, now)  # an existing folder: marked used, nothing removed
    assert recent.stat().st_mtime == pytest.approx(now) and ours.is_dir()


_CACHE_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import probe_kernels, quant.kernels, quant.gemm, backends.numba  # every jitted module of ours
import os
print("after import:", sorted(os.listdir(os.environ["XDG_CACHE_HOME"])))
from quant.jit import use_kernel_cache
use_kernel_cache()
assert probe_kernels.twice(21.0) == 42.0
assert probe_kernels.filled(5, 2.0).sum() == 10.0  # an array made in numba's runtime, freed by it
from numba.core.runtime import rtsys
print("runtime loaded from the cache:", hasattr(rtsys.library, "_linking_bitcode"))
stats = probe_kernels.twice.stats
print("hits", sum(stats.cache_hits.values()), "misses", sum(stats.cache_misses.values()))
(library,) = [overload.library for overload in probe_kernels.twice.overloads.values()]
print("linking module parsed:", library._shared_module is not None)
from numba import njit

@njit
def calls_twice(x):  # compiled here: links against the cached library
    return probe_kernels.twice(x) + 1.0

assert calls_twice(20.0) == 41.0
module = library._shared_module
defined = {f.name for group in (module.functions, module.global_variables) for f in group if not f.is_declaration}
print("after a link, parsed:", module is not None, "its symbols known:",
      bool(defined) and defined <= library._codegen._engine._defined_symbols)
"""


def test_jit_cache_is_chosen_at_load_and_reused(tmp_path):
    """Importing the jitted modules writes nothing; `use_kernel_cache()` (the backend's load) picks the folder;
    the first process compiles and saves there, the second loads the machine code from it, and a function
    compiled there links against what it loaded."""
    import os
    import subprocess
    import sys

    (tmp_path / "probe_kernels.py").write_text(
        "import numpy as np\nfrom quant.jit import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2.0 * x\n\n"
        "@njit(cache=True)\ndef filled(n, v):\n    return np.full(n, v)\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    (tmp_path / "cache").mkdir()
    def probe():
        return subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=300)

    runs = [probe() for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert "after import: []" in runs[0].stdout  # nothing written at import
    assert "hits 0 misses 1" in runs[0].stdout  # compiled, and saved ...
    assert "hits 1 misses 0" in runs[1].stdout  # ... and loaded by the next process
    # numba's runtime too: compiled by the first process, its machine code loaded by the second
    assert "runtime loaded from the cache: False" in runs[0].stdout
    assert "runtime loaded from the cache: True" in runs[1].stdout
    (runtime,) = (tmp_path / "cache").rglob("runtime-*.bin")
    good = runtime.read_bytes()
    for bad in (good[:len(good) // 2], good[:8] + b"\xff" * 8 + good[16:], b""):  # cut, a huge length, empty
        runtime.write_bytes(bad)
        run = probe()
        assert run.returncode == 0 and "runtime loaded from the cache: False" in run.stdout, run.stderr
        assert runtime.read_bytes() == good  # compiled again, and the file written whole
    # which parses the module that compilations link against only when one does, having listed the symbols it
    # defines from its object code
    assert "linking module parsed: False" in runs[1].stdout
    assert "after a link, parsed: True its symbols known: True" in runs[1].stdout
    (folder,) = (tmp_path / "cache" / "llmcli" / "numba").iterdir()
    assert any(p.suffix == ".nbi" for p in folder.rglob("*")) and not (tmp_path / "__pycache__").exists()


def test_elf_symbols_are_what_the_module_defines():
    """The symbols a loaded kernel library registers come from its object code: an object's defined functions and
    data, not what it only declares; anything that is not a whole ELF64 object gives None (numba's own path)."""
    import llvmlite.binding as llvm

    from quant.jit import elf_defined_symbols

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly("""
        @table = global [4 x i32] [i32 1, i32 2, i32 3, i32 4]
        @secret = internal global i32 7
        declare double @sqrt(double)
        define double @root(double %x) { %r = call double @sqrt(double %x) ret double %r }
        define i32 @peek(i64 %i) {
          %p = getelementptr [4 x i32], [4 x i32]* @table, i64 0, i64 %i
          %v = load i32, i32* %p
          %s = load i32, i32* @secret
          %t = add i32 %v, %s
          ret i32 %t
        }
    """)
    obj = llvm.Target.from_default_triple().create_target_machine().emit_object(module)
    if obj[:4] == b"\x7fELF":
        assert elf_defined_symbols(obj) == {"table", "secret", "root", "peek"}
    for broken in (obj[:0x30], obj[:len(obj) // 2], b"\x7fELF\x02\x01" + bytes(58), b"not an object"):
        assert elf_defined_symbols(broken) is None


@pytest.mark.slow
def test_k_quant_mix_model_matches_numpy(tmp_path):
    """A random model typed as llama.cpp types a Q4_K_M file (Q4_K, Q6_K for the output and some attn_v and
    ffn_down, matrices of mixed types merged in one product): numba logits against the numpy reference, per
    position KL < 1e-3 on the prompt path and the decode stack, and the same greedy tokens."""
    import importlib.util
    from pathlib import Path

    from oracle import kl_per_position

    from backends import load_model
    from quant.gguf_file import read_gguf

    spec = importlib.util.spec_from_file_location(
        "make_bench_models", Path(__file__).resolve().parent.parent / "benchmarks" / "make_bench_models.py")
    bench_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_models)
    path = bench_models.write_random_model(tmp_path / "mix.gguf", n_embd=256, n_layers=3, n_heads=8, n_kv_heads=2,
                                           n_ff=768, n_vocab=256, mix="q4_k_m", tied=False)
    gguf = read_gguf(path)
    types = {name: t.qtype.name for name, t in gguf.tensors.items() if len(t.shape) == 2}
    assert types["output.weight"] == types["blk.2.ffn_down.weight"] == types["blk.2.attn_v.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == types["blk.2.attn_q.weight"] == "Q4_K"
    fast, ref = load_model(gguf, "numba", threads=2), load_model(gguf, "numpy")
    prompt = np.resize(np.array([3, 17, 99, 5, 140, 2, 77, 31, 8, 64, 12, 250]), 40)
    want = ref.forward(prompt, ref.new_cache(64), all_logits=True)
    whole = fast.forward(prompt, fast.new_cache(64), all_logits=True)  # the prompt path (integer GEMM)
    cache = fast.new_cache(64)
    pieces = np.concatenate([fast.forward(prompt[i:i + 4], cache, all_logits=True)  # the matvec kernels
                             for i in range(0, len(prompt), 4)])
    for got in (whole, pieces):
        assert kl_per_position(got, want).max() < 1e-3
        assert np.array_equal(got.argmax(-1), want.argmax(-1))

    def greedy(model, n=12):
        c, out = model.new_cache(64), []
        logits = model.forward(prompt[:8], c)
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = model.forward(np.array(out[-1:]), c)
        return out

    assert greedy(fast) == greedy(ref)
