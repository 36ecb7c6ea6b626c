"""Numba kernels for the 2- and 3-bit K-quants (Q2_K, Q3_K): a row . the int16 activation copy, and row
dequantization. quant/kernels.py dispatches to them (dot_row, dequant_row, row_bytes); matvec_multi reaches them
through dot_row, and the prompt path through dequant_rows (BLAS on dequantized tiles: quant/gemm.py packs only
the other formats).

Both formats hold 256 weights in 16 sub-blocks of 16, each with its own scale (ggml's block_q2_K, block_q3_K):

  Q2_K  84 B: scales[16] (low nibble: scale, high nibble: minimum) | qs[64] | d f16 | dmin f16
        w = d (scales[k] & 15) q - dmin (scales[k] >> 4),  q in 0..3
  Q3_K 110 B: hmask[32] | qs[64] | scales[12] (16 six-bit values, stored minus 32) | d f16
        w = d (scale[k] - 32) (q - 4 h),  q in 0..3 and h = 1 when weight's bit of hmask is clear

Weight 128 h + 32 j + 16 p + l (h < 2, j < 4, p < 2, l < 16) is sub-block k = 8 h + 2 j + p; its 2 bits are bits
2 j, 2 j + 1 of qs[32 h + 16 p + l], and in Q3_K its high bit is bit 4 h + j of hmask[16 p + l]. Sub-block k lies
in the activation's block of 32 number k // 2, whose int16 copy xq and scale xd come from quant.kernels.prepare:
sum_j w_j x_j ~= xd (d sc sum_j q_j xq_j - dmin m sum_j xq_j), the same rounding as every other integer kernel.
"""

from __future__ import annotations

import numpy as np

from quant.jit import njit

Q2_K, Q3_K = 10, 11  # GGML type codes
LOWBIT_TYPES = (Q2_K, Q3_K)
Q2_K_BYTES, Q3_K_BYTES = 84, 110

# float16 bit pattern -> float32 (the super-block scales d, dmin)
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def _half(u8, at):
    return _F16[np.int64(u8[at]) | (np.int64(u8[at + 1]) << 8)]


@njit(cache=True, inline="always")
def _q3_scale(u8, s, k):
    """Sub-block k's 6-bit scale (minus 32) from the 12 scale bytes at s: the low 4 bits in s[k % 8] (low nibble
    for k < 8, high for k >= 8), the top 2 in s[8 + k % 4] (bits 2 (k // 4), 2 (k // 4) + 1)."""
    low = (np.int32(u8[s + (k & 7)]) >> (4 * (k >> 3))) & 15
    top = (np.int32(u8[s + 8 + (k & 3)]) >> (2 * (k >> 2))) & 3
    return (low | (top << 4)) - 32


@njit(cache=True, fastmath=True, inline="always")
def dot_q2_k(u8, off, xq, xd, nsb):
    """Q2_K row of nsb super-blocks at byte off . the int16 activation copy xq (scales xd per block of 32)."""
    acc = np.float32(0.0)
    for i in range(nsb):
        o = off + i * Q2_K_BYTES
        d, dmin = _half(u8, o + 80), _half(u8, o + 82)
        for h in range(2):
            for j in range(4):
                shift = 2 * j
                for p in range(2):
                    sc = np.int32(u8[o + 8 * h + 2 * j + p])
                    q0, x0 = o + 16 + 32 * h + 16 * p, i * 256 + 128 * h + 32 * j + 16 * p
                    isum, msum = np.int32(0), np.int32(0)
                    for t in range(16):
                        xv = np.int32(xq[x0 + t])
                        isum += ((np.int32(u8[q0 + t]) >> shift) & 3) * xv
                        msum += xv
                    acc += xd[i * 8 + 4 * h + j] * (d * np.float32(sc & 15) * np.float32(isum)
                                                    - dmin * np.float32(sc >> 4) * np.float32(msum))
    return acc


@njit(cache=True, fastmath=True, inline="always")
def dot_q3_k(u8, off, xq, xd, nsb):
    """Q3_K row of nsb super-blocks at byte off . the int16 activation copy xq (scales xd per block of 32)."""
    acc = np.float32(0.0)
    for i in range(nsb):
        o = off + i * Q3_K_BYTES
        d = _half(u8, o + 108)
        for h in range(2):
            for j in range(4):
                shift, bit = 2 * j, 4 * h + j
                for p in range(2):
                    sc = _q3_scale(u8, o + 96, 8 * h + 2 * j + p)
                    q0, m0, x0 = o + 32 + 32 * h + 16 * p, o + 16 * p, i * 256 + 128 * h + 32 * j + 16 * p
                    isum = np.int32(0)
                    for t in range(16):
                        q = (np.int32(u8[q0 + t]) >> shift) & 3
                        q -= ((np.int32(u8[m0 + t]) >> bit) & 1 ^ 1) << 2
                        isum += q * np.int32(xq[x0 + t])
                    acc += xd[i * 8 + 4 * h + j] * d * np.float32(sc) * np.float32(isum)
    return acc


@njit(cache=True, fastmath=True, inline="always")
def dequant_q2_k(u8, off, nsb, out):
    """Q2_K row of nsb super-blocks at byte off -> out: (256 nsb,) float32."""
    for i in range(nsb):
        o = off + i * Q2_K_BYTES
        d, dmin = _half(u8, o + 80), _half(u8, o + 82)
        for h in range(2):
            for j in range(4):
                for p in range(2):
                    sc = np.int32(u8[o + 8 * h + 2 * j + p])
                    dl, ml = d * np.float32(sc & 15), dmin * np.float32(sc >> 4)
                    q0, y0 = o + 16 + 32 * h + 16 * p, i * 256 + 128 * h + 32 * j + 16 * p
                    for t in range(16):
                        out[y0 + t] = dl * np.float32((np.int32(u8[q0 + t]) >> (2 * j)) & 3) - ml


@njit(cache=True, fastmath=True, inline="always")
def dequant_q3_k(u8, off, nsb, out):
    """Q3_K row of nsb super-blocks at byte off -> out: (256 nsb,) float32."""
    for i in range(nsb):
        o = off + i * Q3_K_BYTES
        d = _half(u8, o + 108)
        for h in range(2):
            for j in range(4):
                bit = 4 * h + j
                for p in range(2):
                    dl = d * np.float32(_q3_scale(u8, o + 96, 8 * h + 2 * j + p))
                    q0, m0, y0 = o + 32 + 32 * h + 16 * p, o + 16 * p, i * 256 + 128 * h + 32 * j + 16 * p
                    for t in range(16):
                        q = (np.int32(u8[q0 + t]) >> (2 * j)) & 3
                        q -= ((np.int32(u8[m0 + t]) >> bit) & 1 ^ 1) << 2
                        out[y0 + t] = dl * np.float32(q)
