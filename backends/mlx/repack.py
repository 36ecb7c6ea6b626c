"""GGML 32-weight blocks -> MLX's affine quantized layout, losslessly, in numpy.

MLX stores a row of `cols` weights quantized to `bits` as a bit stream of uint32 words, the first
weight in the lowest bits, and one (scale, bias) pair per group of 32 weights: w = scale * q + bias.
Every GGML format below is that formula with a different bias, so repacking only moves bits:

  Q4_0  q = 4-bit code,  scale = d, bias = -8 d
  Q4_1  q = 4-bit code,  scale = d, bias = m
  Q5_0  q = 5-bit code,  scale = d, bias = -16 d
  Q5_1  q = 5-bit code,  scale = d, bias = m
  Q8_0  q = int8 + 128,  scale = d, bias = -128 d

GGML puts weight j and weight j + 16 of a block in the low and high nibble of byte j; MLX wants
weights in order, so the nibbles are split and re-interleaved. d, m are float16, and a power-of-two
multiple of a float16 is a float16 unless it overflows, so scales and biases stay float16 (float32 for
a tensor where -128 d would overflow): mx.dequantize of the result equals gguf.quants.dequantize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quant.formats import GGMLQuantizationType, type_size

Q = GGMLQuantizationType
GROUP = 32  # every format here has 32-weight blocks, which become MLX groups of 32

# One decoder per format: blocks (n_blocks, type_size) uint8 ->
#   codes (n_blocks, 32) uint8, scale (n_blocks,) float16, bias (n_blocks,) float32
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte `at` of every block -> (n_blocks,) float16."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes in weight order: low nibbles are w[0:16], high are w[16:32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes holding a little-endian uint32 whose bit j is bit 4 of weight j -> (n, 32) as 0/16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")  # (n, 32), bit j of the uint32 at column j
    return bits << 4


def _q4_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, -8 * d.astype(np.float32)


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2).astype(np.float32)


def _q5_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    return _nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6]), d, -16 * d.astype(np.float32)


def _q5_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2).astype(np.float32)


def _q8_0(b: np.ndarray) -> Decoded:
    d = _f16(b, 0)
    codes = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d.astype(np.float32)


# qtype -> (bits per weight in MLX, decoder)
REPACKABLE: dict[GGMLQuantizationType, tuple[int, Callable[[np.ndarray], Decoded]]] = {
    Q.Q4_0: (4, _q4_0),
    Q.Q4_1: (4, _q4_1),
    Q.Q5_0: (5, _q5_0),
    Q.Q5_1: (5, _q5_1),
    Q.Q8_0: (8, _q8_0),
}


@dataclass(frozen=True)
class AffineWeight:
    """A matrix in MLX's affine layout (group size 32), as numpy arrays ready for mx.array.

    q: (rows, cols * bits / 32) uint32; scales, biases: (rows, cols / 32) float16 or float32
    """

    q: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) uint8 codes < 2**bits -> (rows, cols * bits / 32) uint32, weight 0 in the lowest bits."""
    rows, cols = codes.shape
    if 8 % bits == 0:  # whole codes per byte: byte = c[0] | c[1] << bits | ...
        per = 8 // bits
        raw = codes[:, 0::per].copy()
        for k in range(1, per):
            raw |= codes[:, k::per] << (k * bits)
    else:  # eight codes fill exactly `bits` bytes: build them in a little-endian uint64, keep the low bytes
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
        words = np.bitwise_or.reduce(codes.reshape(rows, cols // 8, 8).astype(np.uint64) << shifts, axis=-1)
        raw = words.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
        raw = np.ascontiguousarray(raw).reshape(rows, cols * bits // 8)
    return raw.view("<u4").astype(np.uint32, copy=False)


def repack(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int],
           chunk_rows: int = 4096) -> AffineWeight:
    """Raw GGUF bytes of a (rows, cols) matrix of a REPACKABLE type -> AffineWeight.

    Works `chunk_rows` rows at a time so the uint64 scratch stays small on large matrices."""
    bits, decode = REPACKABLE[qtype]
    rows, cols = shape
    n_groups = cols // GROUP
    blocks = np.asarray(data).reshape(rows, n_groups, type_size(qtype))
    q = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, n_groups), dtype=np.float16)
    biases = np.empty((rows, n_groups), dtype=np.float32)
    for r in range(0, rows, chunk_rows):
        part = blocks[r:r + chunk_rows]
        n = part.shape[0]
        codes, d, m = decode(part.reshape(n * n_groups, -1))
        q[r:r + n] = pack_codes(codes.reshape(n, cols), bits)
        scales[r:r + n], biases[r:r + n] = d.reshape(n, n_groups), m.reshape(n, n_groups)
    with np.errstate(over="ignore"):
        biases16 = biases.astype(np.float16)
    if np.array_equal(biases16.astype(np.float32), biases):
        return AffineWeight(q, scales, biases16, bits)
    return AffineWeight(q, scales.astype(np.float32), biases, bits)  # -k*d overflowed float16
