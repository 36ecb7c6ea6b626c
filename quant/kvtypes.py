"""Storage types of the KV cache, as data, and their reference codec in numpy.

A cached key or value row (one position of one KV head: head_dim values) is stored as

  f32   head_dim float32
  f16   head_dim float16 (IEEE half; keys and values of these models are far inside its range)
  q8_0  head_dim / 32 blocks of 34 bytes: d (float16) | 32 int8 codes; value = d * code, as ggml's Q8_0
        (d = max |x| / 127 of the block, codes rounded half away from zero against the unrounded d)

The numba kernels (quant/kv_kernels.py) write and read the same bytes; this module is their reference.
"""

from __future__ import annotations

import numpy as np

from quant.errors import UnsupportedError

# kv type -> (values per block, bytes per block, storage dtype of a cache array)
KV_TYPES: dict[str, tuple[int, int, type]] = {
    "f32": (1, 4, np.float32),
    "f16": (1, 2, np.float16),
    "q8_0": (32, 34, np.uint8),
}
KV_CODES = {"f32": 0, "f16": 1, "q8_0": 2}  # the kernels' integer code of each type
QK = 32  # values per q8_0 block


def check_kv_type(kv_type: str, head_dim: int) -> None:
    """Raise a one-line error for a type we do not have, or a head size its blocks do not divide."""
    if kv_type not in KV_TYPES:
        raise UnsupportedError(f"unknown KV cache type '{kv_type}' (choose from {', '.join(KV_TYPES)})")
    block = KV_TYPES[kv_type][0]
    if head_dim % block:
        raise UnsupportedError(f"KV cache type {kv_type} needs a head size that is a multiple of {block}; "
                               f"this model's is {head_dim}")


def row_elems(kv_type: str, head_dim: int) -> int:
    """Elements of the storage dtype in one cached row of head_dim values."""
    block, size, dtype = KV_TYPES[kv_type]
    return head_dim // block * size // np.dtype(dtype).itemsize


def row_bytes(kv_type: str, head_dim: int) -> int:
    block, size, _ = KV_TYPES[kv_type]
    return head_dim // block * size


def encode(x: np.ndarray, kv_type: str) -> np.ndarray:
    """x: (..., head_dim) float32 -> (..., row_elems) in the storage dtype."""
    x = np.asarray(x, dtype=np.float32)
    if kv_type == "f32":
        return x.copy()
    if kv_type == "f16":
        return x.astype(np.float16)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    v = (blocks * inv).astype(np.float64)  # the float32 product, then rounded half away from zero exactly
    q = np.trunc(v + np.copysign(0.5, v)).astype(np.int8)
    out = np.empty((*blocks.shape[:-1], 34), dtype=np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(*x.shape[:-1], -1)


def decode(data: np.ndarray, kv_type: str) -> np.ndarray:
    """(..., row_elems) in the storage dtype -> (..., head_dim) float32."""
    if kv_type != "q8_0":
        return np.asarray(data).astype(np.float32)
    blocks = np.ascontiguousarray(data).reshape(*data.shape[:-1], -1, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(*data.shape[:-1], -1)
