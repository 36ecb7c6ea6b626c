"""GGUF tensors -> MLX arrays, decided once at load: which matmul runs is a property of the weight.

Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrices are repacked losslessly into MLX's affine layout and multiplied
with mx.quantized_matmul; every other matrix (K-quants, F16, BF16, F32) is dequantized once to
float16. Vectors (norms, biases) are kept in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from backends.mlx.repack import GROUP, REPACKABLE, repack
from quant.formats import dequantize
from quant.gguf_file import Tensor

CHUNK_WEIGHTS = 1 << 24  # dequantize at most this many weights at a time to bound the float32 scratch


@dataclass(frozen=True)
class QuantLinear:
    """y = x @ W.T with W in MLX's affine layout.

    q: (rows, cols * bits / 32) uint32; scales, biases: (rows, cols / 32) float16 (float32 on overflow)
    """

    q: mx.array
    scales: mx.array
    biases: mx.array
    bits: int

    def __call__(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(x, self.q, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=self.bits)

    def rows(self, ids: mx.array, dtype: mx.Dtype) -> mx.array:
        """Rows `ids` of W as `dtype` (the embedding lookup); the affine formula runs in `dtype`."""
        return mx.dequantize(self.q[ids], self.scales[ids].astype(dtype), self.biases[ids].astype(dtype),
                             group_size=GROUP, bits=self.bits)

    def arrays(self) -> list[mx.array]:
        return [self.q, self.scales, self.biases]


@dataclass(frozen=True)
class DenseLinear:
    """y = x @ W.T with W: (rows, cols) float16, upcast to the activations' dtype in the matmul."""

    w: mx.array

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.w.astype(x.dtype).T

    def rows(self, ids: mx.array, dtype: mx.Dtype) -> mx.array:
        return self.w[ids].astype(dtype)

    def arrays(self) -> list[mx.array]:
        return [self.w]


Linear = QuantLinear | DenseLinear


def to_float16(t: Tensor) -> np.ndarray:
    """Any readable tensor -> float16 of its shape, dequantized a slab of rows at a time.
    Falls back to float32 if a value does not fit float16 (a BF16 tensor may hold one)."""
    rows, cols = t.shape
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, CHUNK_WEIGHTS // cols)
    for r in range(0, rows, step):
        out[r:r + step] = dequantize(t.data[r:r + step], t.qtype).reshape(-1, cols)
    with np.errstate(over="ignore"):
        half = out.astype(np.float16)
    return half if np.isfinite(half).all() or not np.isfinite(out).all() else out


def linear(t: Tensor) -> Linear:
    """The matmul for a GGUF matrix, chosen from its type."""
    if t.qtype in REPACKABLE:
        a = repack(t.data, t.qtype, t.shape)
        return QuantLinear(mx.array(a.q), mx.array(a.scales), mx.array(a.biases), a.bits)
    return DenseLinear(mx.array(to_float16(t)))


def vector(t: Tensor, dtype: mx.Dtype) -> mx.array:
    return mx.array(dequantize(t.data, t.qtype).reshape(t.shape)).astype(dtype)


def fuse(parts: list[Linear]) -> tuple[Linear, ...]:
    """Matrices that share an input (q/k/v, gate/up) as one matmul whose output the caller splits, when
    their layouts match (rows stacked); otherwise the matrices unchanged."""
    first = parts[0]
    if all(isinstance(p, QuantLinear) and p.bits == first.bits and p.scales.dtype == first.scales.dtype
           and p.biases.dtype == first.biases.dtype for p in parts):
        return (QuantLinear(mx.concatenate([p.q for p in parts]), mx.concatenate([p.scales for p in parts]),
                            mx.concatenate([p.biases for p in parts]), first.bits),)
    if all(isinstance(p, DenseLinear) and p.w.dtype == first.w.dtype for p in parts):
        return (DenseLinear(mx.concatenate([p.w for p in parts])),)
    return tuple(parts)

