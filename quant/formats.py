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

from enum import IntEnum

import numpy as np


class GGMLQuantizationType(IntEnum):
    """ggml's tensor type ids. The same as gguf-py's (tests/test_gguf_file.py checks them): our own copy, because
    importing the gguf package costs ~60 ms of every start, and a run needs only these tables of it."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


Q = GGMLQuantizationType

# (weights per block, bytes per block) of every type
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    Q.F32: (1, 4), Q.F16: (1, 2), Q.Q4_0: (32, 18), Q.Q4_1: (32, 20), Q.Q5_0: (32, 22), Q.Q5_1: (32, 24),
    Q.Q8_0: (32, 34), Q.Q8_1: (32, 40), Q.Q2_K: (256, 84), Q.Q3_K: (256, 110), Q.Q4_K: (256, 144),
    Q.Q5_K: (256, 176), Q.Q6_K: (256, 210), Q.Q8_K: (256, 292), Q.IQ2_XXS: (256, 66), Q.IQ2_XS: (256, 74),
    Q.IQ3_XXS: (256, 98), Q.IQ1_S: (256, 50), Q.IQ4_NL: (32, 18), Q.IQ3_S: (256, 110), Q.IQ2_S: (256, 82),
    Q.IQ4_XS: (256, 136), Q.I8: (1, 1), Q.I16: (1, 2), Q.I32: (1, 4), Q.I64: (1, 8), Q.F64: (1, 8),
    Q.IQ1_M: (256, 56), Q.BF16: (1, 2), Q.TQ1_0: (256, 54), Q.TQ2_0: (256, 66), Q.MXFP4: (32, 17),
    Q.NVFP4: (64, 36), Q.Q1_0: (128, 18),
}

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
    from gguf import quants as gguf_quants

    return gguf_quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)
