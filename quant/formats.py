"""GGML block formats as data: one table, and the plumbing written once.

A quantized row of `n` weights is `n // block_size` blocks of `type_size` bytes each,
stored contiguously. Layouts (little-endian, `d`/`m` are float16 unless noted):

  Q4_0  32 w, 18 B: d, 16 B nibbles (low nibbles = w[0:16], high = w[16:32]); w = d * (q - 8)
  Q4_1  32 w, 20 B: d, m, 16 B nibbles;                      w = d * q + m
  Q5_0  32 w, 22 B: d, 4 B high bits qh, 16 B nibbles;       w = d * (q - 16)
  Q5_1  32 w, 24 B: d, m, 4 B qh, 16 B nibbles;              w = d * q + m
  Q8_0  32 w, 34 B: d, 32 int8;                              w = d * q
  Q2_K/Q3_K/Q4_K/Q5_K/Q6_K: 256-weight super-blocks with 4-, 6- or 8-bit sub-block scales (gguf-py quants.py)
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

Q = GGMLQuantizationType

# Types the engine can read. Everything else is refused at load with a clear message.
READABLE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][1]


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes taken by one row of `n_cols` weights."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n_cols // bs * ts


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return 8.0 * ts / bs


def qtype_from_name(name: str) -> GGMLQuantizationType:
    """'q4_0' -> Q4_0; raises KeyError for an unknown name."""
    return GGMLQuantizationType[name.upper()]


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw tensor data (as stored in the GGUF) -> float32 array of logical shape."""
    if qtype == Q.F32:
        return np.asarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)
    return gguf_quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)
