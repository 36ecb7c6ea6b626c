"""The numba Q2_K and Q3_K kernels (quant/kernels_lowbit.py) against gguf-py's dequantizer (bit-exact with ggml):
dequantization equal, each matrix-vector product equal to dequantize(W) @ x within the int16 kernels' bound, on
rows of 1-3 super-blocks and 37 rows (not a multiple of the threads); random bytes (every code and scale pattern)
and blocks that `llm quantize` writes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from test_kernels import int16_rounding

from quant.formats import type_size
from quant.kernels import dequantize_raw, matvec_raw
from quant.kquants import quantize_k_rows

ROWS = 37
SCALE_AT = {Q.Q2_K: 80, Q.Q3_K: 108}  # byte of d (Q2_K: then dmin)


def random_blocks(qtype: Q, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random super-blocks whose float16 scales are small normal numbers (random bytes there could be inf)."""
    nb, ts, at = n // 256, type_size(qtype), SCALE_AT[qtype]
    raw = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    halves = 2 if qtype == Q.Q2_K else 1
    raw[:, :, at:at + 2 * halves] = rng.uniform(0.001, 0.01, size=(rows, nb, halves)).astype(np.float16).view(
        np.uint8).reshape(rows, nb, 2 * halves)
    return raw.reshape(rows, nb * ts)


def blocks(qtype: Q, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return random_blocks(qtype, ROWS, n, rng)
    return quantize_k_rows(rng.standard_normal((ROWS, n)).astype(np.float32), qtype)


def reference(raw: np.ndarray, qtype: Q, n: int) -> np.ndarray:
    return gguf_quants.dequantize(raw, qtype).reshape(raw.shape[0], n).astype(np.float32)


CASES = [(t, kind, n) for t in (Q.Q2_K, Q.Q3_K) for kind in ("random", "quantized") for n in (256, 768)]
IDS = [f"{t.name}-{kind}-{n}" for t, kind, n in CASES]


@pytest.mark.parametrize("qtype,kind,n", CASES, ids=IDS)
def test_dequantize_matches_gguf(qtype, kind, n):
    raw = blocks(qtype, kind, n, np.random.default_rng(1))
    np.testing.assert_array_equal(dequantize_raw(raw, qtype, n), reference(raw, qtype, n))


@pytest.mark.parametrize("qtype,kind,n", CASES, ids=IDS)
def test_matvec_equals_dequantized_product(qtype, kind, n):
    """|W x - dequantize(W) @ x| <= 2e-5 (|W| @ |x|) + 1e-6 + |W| @ (half the int16 step of x's block): float32
    rounding of the sums, and the int16 copy of x every integer kernel multiplies; exact up to float32 rounding for
    an x on that grid. Tokens 1 and 3 at once (matvec_multi reads each row once for all)."""
    rng = np.random.default_rng(2)
    raw = blocks(qtype, kind, n, rng)
    w = reference(raw, qtype, n).astype(np.float64)
    for T in (1, 3):
        x = rng.standard_normal((T, n)).astype(np.float32)
        x[:, 5] *= 50  # an outlier, as LLM activations have
        mag = np.abs(x).astype(np.float64) @ np.abs(w).T
        y = matvec_raw(raw, qtype, x)
        assert y.shape == (T, ROWS)
        assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= 2e-5 * mag + 1e-6 + int16_rounding(x) @ np.abs(w).T)
        xg = x.astype(np.float64).reshape(T, -1, 32)
        step = np.abs(xg).max(-1, keepdims=True) / 32767
        on_grid = (np.rint(xg / step) * step).reshape(T, n).astype(np.float32)
        y = matvec_raw(raw, qtype, on_grid)
        assert np.all(np.abs(y - on_grid.astype(np.float64) @ w.T) <= 2e-5 * mag + 1e-6)
