"""Numba kernels that compute on GGML blocks where they lie (the memory map): dot products, matrix-vector
products and row dequantization for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (and Q2_K,
Q3_K in quant/kernels_lowbit.py).

Conventions shared by every kernel:

- A weight buffer is a tuple `wv = (u8, u16, f32)`: three views of the same bytes (see `weight_views`),
  so a kernel can read block bytes, float16/bfloat16 halves or float32 words without copying.
- A tensor is addressed by its byte offset in that buffer, its qtype code (GGML's enum value), its row
  count and its row length `n` (a multiple of the block size). Row `r` starts at `off + r * row_bytes`.
- Block formats (layouts in quant/formats.py) are decoded in vector registers by quant/simd.py (portable LLVM
  vector IR), scales applied once per block or sub-block, minimums through the activation's sums per block
  of 32. Each activation is prepared once per product (`prepare`): those sums, and an int16 copy rounded per
  block of 32 that the quantized formats (Q4_0 ... Q8_0, the K-quants) multiply as integers (1.3-1.9x faster
  than float products; it moves SmolLM2's next-token distribution by a KL of ~1e-7, where llama.cpp's 8-bit
  copies move it by up to 0.02). F32/F16/BF16 multiply the float32 activation.
"""

from __future__ import annotations

import numpy as np

from quant import kernels_lowbit as lowbit
from quant import simd, simd_multi
from quant.errors import UnsupportedError
from quant.jit import njit, prange

# GGML type codes (gguf.GGMLQuantizationType values), as plain ints for the kernels.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
QUANTIZED_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)  # integer codes x the int16 activation copy
Q2_K, Q3_K = lowbit.Q2_K, lowbit.Q3_K  # integer codes x the int16 copy too, but not in quant/gemm.py's packing
KERNEL_TYPES = (F32, F16, BF16, *QUANTIZED_TYPES, *lowbit.LOWBIT_TYPES)
QK8 = 32  # block of the activation sums

# float16 and bfloat16 bit patterns -> float32, indexed by the 16-bit pattern (256 KiB each): the tails of
# float rows whose length is not a multiple of 32
_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_BF16_TABLE = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)


def weight_views(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u8, u16, f32) views of the bytes of `buf` (no copy). Offsets into u16/f32 are byte offsets / 2, / 4;
    GGUF aligns tensor data to 32 bytes, so every tensor starts on a whole word."""
    u8 = np.asarray(buf).reshape(-1).view(np.uint8)
    u16 = u8[: u8.size // 2 * 2].view(np.uint16)
    f32 = u8[: u8.size // 4 * 4].view(np.float32)
    return u8, u16, f32


@njit(cache=True, inline="always")
def row_bytes(qtype, n):
    """Bytes in one row of `n` weights of `qtype`."""
    if qtype == F32:
        return n * 4
    if qtype == F16 or qtype == BF16:
        return n * 2
    if qtype == Q4_0:
        return n // 32 * 18
    if qtype == Q4_1:
        return n // 32 * 20
    if qtype == Q5_0:
        return n // 32 * 22
    if qtype == Q5_1:
        return n // 32 * 24
    if qtype == Q8_0:
        return n // 32 * 34
    if qtype == Q4_K:
        return n // 256 * 144
    if qtype == Q5_K:
        return n // 256 * 176
    if qtype == Q2_K:
        return n // 256 * lowbit.Q2_K_BYTES
    if qtype == Q3_K:
        return n // 256 * lowbit.Q3_K_BYTES
    return n // 256 * 210  # Q6_K


# ---------------------------------------------------------------------------------------------------------
# One row . activation: the views, the row's byte offset, the row length n, the activation x (n,) float32 and
# what `prepare` makes of it per block of 32: its sums xs, which carry the minimums (sum_j (d q_j + m) x_j =
# d sum_j q_j x_j + m xs), and its int16 copy xq with its scales xd and sums xc. The per-format code is in
# quant/simd.py.


def _aligned_empty(rows, cols, dtype):
    """An uninitialized (rows, cols) array of `dtype` starting on a 64-byte boundary: the kernels' vector loads
    read 64 bytes at a time, and a misaligned copy splits each read over two cache lines (RESULTS.md)."""
    buf = np.empty(rows * cols + 64, dtype)
    skip = (-buf.ctypes.data) % 64 // buf.itemsize
    return buf[skip:skip + rows * cols].reshape(rows, cols)


# one definition, run as Python by activation_blocks and compiled into the jitted callers (segment_layout): as a
# jitted entry point of its own, activation_blocks cost a fresh process ~40 ms to load its machine code
aligned_empty = njit(cache=True, nogil=True)(_aligned_empty)


def activation_blocks(T: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Buffers for `prepare` of a (T, n) activation: (sums, int16 copy, its scales, its sums), each on a 64-byte
    boundary."""
    return (_aligned_empty(T, n // QK8, np.float32), _aligned_empty(T, n, np.int16),
            _aligned_empty(T, n // QK8, np.float32), _aligned_empty(T, n // QK8, np.float32))


@njit(cache=True, nogil=True)
def prepare(x, xb):
    """Per block of 32 of x: (T, n), into xb = (xs, xq, xd, xc) from activation_blocks: the sum xs[t, b], the
    scale xd[t, b] = max |x| / 32767, the int16 copy xq[t, j] = rint(x[t, j] 32767 / max |x|) (0 for an all-zero
    block) and its sum xc[t, b] (exact in float32: at most 32 * 32767). Without the GIL: the prompt path splits
    the rows of many tokens across its pool."""
    simd.prepare_rows(x, xb[0], xb[1], xb[2], xb[3])


@njit(cache=True, fastmath=True, inline="always")
def _dot_tail(wv, qtype, off, n, x, j0):
    """Float rows whose length is not a multiple of 32: the last n - j0 weights."""
    acc = np.float32(0.0)
    for j in range(j0, n):
        if qtype == F32:
            w = wv[2][off // 4 + j]
        elif qtype == F16:
            w = _F16_TABLE[wv[1][off // 2 + j]]
        else:
            w = _BF16_TABLE[wv[1][off // 2 + j]]
        acc += w * x[j]
    return acc


@njit(cache=True, fastmath=True, inline="always")
def dot_row(wv, qtype, off, n, x, xs, xq, xd, xc):
    """Row of `qtype` at byte `off` (n weights) . x, given (xs, xq, xd, xc) = prepare(x) (one token's rows)."""
    u8 = wv[0]
    nb = n // 32
    if qtype == Q4_0:
        return simd.dot_q4_0(u8, off, xq, xd, xs, xc, nb)
    if qtype == Q8_0:
        return simd.dot_q8_0(u8, off, xq, xd, xs, xc, nb)
    if qtype == Q4_1:
        return simd.dot_q4_1(u8, off, xq, xd, xs, xc, nb)
    if qtype == Q5_0:
        return simd.dot_q5_0(u8, off, xq, xd, xs, xc, nb)
    if qtype == Q5_1:
        return simd.dot_q5_1(u8, off, xq, xd, xs, xc, nb)
    if qtype == Q4_K:
        return simd.dot_q4_k(u8, off, xq, xd, xs, xc, n // 256)
    if qtype == Q5_K:
        return simd.dot_q5_k(u8, off, xq, xd, xs, xc, n // 256)
    if qtype == Q6_K:
        return simd.dot_q6_k(u8, off, xq, xd, xs, xc, n // 256)
    if qtype == Q2_K:
        return lowbit.dot_q2_k(u8, off, xq, xd, xs, xc, n // 256)
    if qtype == Q3_K:
        return lowbit.dot_q3_k(u8, off, xq, xd, xs, xc, n // 256)
    if qtype == F32:
        acc = simd.dot_f32(u8, off, x, 0, nb)
    elif qtype == F16:
        acc = simd.dot_f16(u8, off, x, 0, nb)
    else:
        acc = simd.dot_bf16(u8, off, x, 0, nb)
    if nb * 32 < n:
        acc += _dot_tail(wv, qtype, off, n, x, nb * 32)
    return acc


# ---------------------------------------------------------------------------------------------------------
# Dequantization of one row (embedding lookups, weight tiles for the prefill GEMM, tests)


@njit(cache=True, fastmath=True)
def dequant_row(wv, qtype, off, n, out):
    """Row of `qtype` at byte `off` -> out: (n,) float32."""
    u8 = wv[0]
    if qtype == F32:
        out[:] = wv[2][off // 4: off // 4 + n]
    elif qtype == F16:
        simd.dequant_f16(u8, off, n, out, 0)
    elif qtype == BF16:
        simd.dequant_bf16(u8, off, n, out, 0)
    elif qtype == Q4_0:
        simd.dequant_q4_0(u8, off, n // 32, out, 0)
    elif qtype == Q4_1:
        simd.dequant_q4_1(u8, off, n // 32, out, 0)
    elif qtype == Q5_0:
        simd.dequant_q5_0(u8, off, n // 32, out, 0)
    elif qtype == Q5_1:
        simd.dequant_q5_1(u8, off, n // 32, out, 0)
    elif qtype == Q8_0:
        simd.dequant_q8_0(u8, off, n // 32, out, 0)
    elif qtype == Q4_K:
        simd.dequant_q4_k(u8, off, n // 256, out, 0)
    elif qtype == Q5_K:
        simd.dequant_q5_k(u8, off, n // 256, out, 0)
    elif qtype == Q2_K:
        lowbit.dequant_q2_k(u8, off, n // 256, out, 0)
    elif qtype == Q3_K:
        lowbit.dequant_q3_k(u8, off, n // 256, out, 0)
    else:  # Q6_K
        simd.dequant_q6_k(u8, off, n // 256, out, 0)


@njit(cache=True, nogil=True)
def dequant_rows(wv, qtype, off, n, row0, out):
    """Rows row0 .. row0 + len(out) of a tensor -> out: (rows, n) float32 (a weight tile). Serial, and without
    the GIL: the prompt path runs one per thread of its own pool, each beside a single-threaded BLAS product."""
    rb = row_bytes(qtype, n)
    for r in range(out.shape[0]):
        dequant_row(wv, qtype, off + (row0 + r) * rb, n, out[r])


# ---------------------------------------------------------------------------------------------------------
# Matrix-vector products


@njit(cache=True, fastmath=True, inline="always")
def row_offset(descs, r, n):
    """Byte offset of stacked row r of the matrices in descs (see matvec_multi)."""
    i, r0 = 0, 0
    while r - r0 >= descs[i, 2]:
        r0 += descs[i, 2]
        i += 1
    return descs[i, 0] + (r - r0) * row_bytes(descs[i, 1], n), descs[i, 1]


@njit(cache=True, fastmath=True, inline="always")
def dot_tokens_int(wv, qtype, off, n, xk, xd, xs, xc, out, r):
    """out[t, r] = row of `qtype` at byte `off` (n weights) . token t, for every token of the prepared activation
    (xk: its int16 copy in the several-token kernels' layout, segment_layout): the formats of quant/simd_multi.py,
    which decode each block once for up to simd_multi.MAX_WIDTH tokens. False for any other format (nothing
    written). New quantized formats add their kernel here."""
    u8, nb = wv[0], n // 32
    if qtype == Q4_0:
        simd_multi.dot_q4_0(u8, off, xk, xd, xs, xc, nb, out, r)
    elif qtype == Q8_0:
        simd_multi.dot_q8_0(u8, off, xk, xd, xs, xc, nb, out, r)
    elif qtype == Q4_K:
        simd_multi.dot_q4_k(u8, off, xk, xd, xs, xc, n // 256, out, r)
    elif qtype == Q6_K:
        simd_multi.dot_q6_k(u8, off, xk, xd, xs, xc, n // 256, out, r)
    elif qtype == Q5_K:
        simd_multi.dot_q5_k(u8, off, xk, xd, xs, xc, n // 256, out, r)
    elif qtype == Q4_1:
        simd_multi.dot_q4_1(u8, off, xk, xd, xs, xc, nb, out, r)
    elif qtype == Q5_0:
        simd_multi.dot_q5_0(u8, off, xk, xd, xs, xc, nb, out, r)
    elif qtype == Q5_1:
        simd_multi.dot_q5_1(u8, off, xk, xd, xs, xc, nb, out, r)
    else:
        return False
    return True


@njit(cache=True, fastmath=True, inline="always")
def dot_tokens(wv, qtype, off, n, x, xs, xq, xk, xd, xc, out, r):
    """dot_tokens_int, and token by token for the other formats (x: (T, n) float32, xq: the int16 copy as
    prepared)."""
    if not dot_tokens_int(wv, qtype, off, n, xk, xd, xs, xc, out, r):
        for t in range(x.shape[0]):
            out[t, r] = dot_row(wv, qtype, off, n, x[t], xs[t], xq[t], xd[t], xc[t])


@njit(cache=True, nogil=True)
def segment_layout(xq):
    """xq: (T, n) int16 with each whole segment of simd_multi.SEG blocks of 32 transposed as 32-bit pairs (pair p
    of block i moves to pair 16 p + i of its segment), the blocks past the last whole segment as they are: the
    layout the several-token kernels read where simd_multi.WIDE (one vector holds a pair of every block)."""
    T, n = xq.shape
    seg = simd_multi.SEG
    whole = n // (32 * seg) * (32 * seg)
    out = aligned_empty(T, n, np.int16)
    for t in range(T):
        for s0 in range(0, whole, 32 * seg):
            for i in range(seg):
                for p in range(16):
                    out[t, s0 + 2 * (seg * p + i)] = xq[t, s0 + 32 * i + 2 * p]
                    out[t, s0 + 2 * (seg * p + i) + 1] = xq[t, s0 + 32 * i + 2 * p + 1]
        out[t, whole:] = xq[t, whole:]
    return out


CHUNK_ROWS = 32  # rows that take one column chunk after the other (a few pages of weights)
ACTIVATION_BYTES = 32768  # the int16 activation a several-token product keeps in L1 (48 KB on Zen 5, 32 on Zen 4)


@njit(cache=True, inline="always")
def chunk_width(T, n, descs):
    """Columns per pass of a several-token product (n: all of them in one). Each row reads every token's
    activation, so where T tokens of n int16 exceed ACTIVATION_BYTES the rows are taken in column chunks, all rows
    for one chunk before the next: 8 tokens on a 1B model's ffn_down (n = 8192) ran at 44 G multiply-adds/s whole,
    against ~115 for rows of 2048. Only for the formats of simd_multi (chunks of whole segments of 512)."""
    width = max(512, ACTIVATION_BYTES // (2 * T) // 512 * 512)
    if T == 1 or n <= width:
        return n
    for i in range(descs.shape[0]):
        q = descs[i, 1]
        if not (q == Q4_0 or q == Q4_1 or q == Q5_0 or q == Q5_1 or q == Q8_0 or q == Q4_K or q == Q5_K
                or q == Q6_K):  # dot_tokens_int's formats
            return n
    return width


@njit(cache=True, nogil=True)
def chunk_layout(xb, c0, c1):
    """Columns c0 .. c1 of a prepared activation xb (activation_blocks) as contiguous copies (xs, xq, xd, xc), xq
    in the several-token kernels' layout (segment_layout where simd_multi.WIDE)."""
    xs, xq, xd, xc = xb
    b0, b1 = c0 // 32, c1 // 32
    xk = segment_layout(xq[:, c0:c1]) if simd_multi.WIDE else np.ascontiguousarray(xq[:, c0:c1])
    return (np.ascontiguousarray(xs[:, b0:b1]), xk, np.ascontiguousarray(xd[:, b0:b1]),
            np.ascontiguousarray(xc[:, b0:b1]))


@njit(cache=True, parallel=True, fastmath=True)
def matvec_chunked(wv, descs, xb, width, out):
    """matvec_multi for several tokens, the columns in chunks of `width` (chunk_width): rows in groups of
    CHUNK_ROWS, each group chunk by chunk, the partial products summed at the end."""
    T, n = xb[1].shape
    total = 0
    for i in range(descs.shape[0]):
        total += descs[i, 2]
    nch = (n + width - 1) // width
    chunks = [chunk_layout(xb, c * width, min(n, (c + 1) * width)) for c in range(nch)]
    parts = np.empty((nch, T, total), dtype=np.float32)
    for blk in prange((total + CHUNK_ROWS - 1) // CHUNK_ROWS):
        r0, r1 = blk * CHUNK_ROWS, min(total, (blk + 1) * CHUNK_ROWS)
        for c in range(nch):
            c0, c1 = c * width, min(n, (c + 1) * width)
            cs, ck, cd, cc = chunks[c]
            for r in range(r0, r1):
                off, qtype = row_offset(descs, r, n)
                off += row_bytes(qtype, c0)
                dot_tokens_int(wv, qtype, off, c1 - c0, ck, cd, cs, cc, parts[c], r)
        for r in range(r0, r1):
            for t in range(T):
                acc = parts[0, t, r]
                for c in range(1, nch):
                    acc += parts[c, t, r]
                out[t, r] = acc


@njit(cache=True, parallel=True, fastmath=True)
def matvec_multi(wv, descs, x, xb, out):
    """out[t, r] = W[r] . x[t] for the rows of several matrices sharing the input x: (T, n), stacked, in one
    parallel region (merged Q/K/V, gate/up; or one matrix). descs: (k, 3) int64 rows of (byte offset, qtype,
    row count); out: (T, sum of row counts), the outputs side by side; xb filled by prepare(x, xb). Rows are split
    across threads; each row's bytes are read once for all T tokens, and for T > 1 each block is decoded once for
    several tokens (dot_tokens). For one token, when every matrix is Q4_0 (or every one Q8_0, Q4_K, Q5_K, Q6_K)
    the loop calls that format's kernel directly: 8-16 % faster than dispatching per row for Q4_0, 16-27 % for
    Q4_K and Q6_K (benchmarks/RESULTS.md)."""
    n, u8, nb = x.shape[1], wv[0], x.shape[1] // 32
    xs, xq, xd, xc = xb
    total, q0, same, q6 = 0, descs[0, 1], True, False
    for i in range(descs.shape[0]):
        total += descs[i, 2]
        same = same and descs[i, 1] == q0
        q6 = q6 or descs[i, 1] == Q6_K
    # the several-token kernels' copy of xq; with WIDE, one token's Q6_K rows take that kernel too (1.26x the
    # one-token kernel's speed: benchmarks/RESULTS.md)
    wide_q6 = simd_multi.WIDE and q6
    width = chunk_width(x.shape[0], n, descs)
    chunked = x.shape[0] > 1 and width < n
    xk = segment_layout(xq) if simd_multi.WIDE and not chunked and (x.shape[0] > 1 or q6) else xq
    if chunked:
        matvec_chunked(wv, descs, xb, width, out)
    elif x.shape[0] > 1:
        for r in prange(total):
            off, qtype = row_offset(descs, r, n)
            dot_tokens(wv, qtype, off, n, x, xs, xq, xk, xd, xc, out, r)
    elif same and q0 == Q4_0:
        for r in prange(total):
            out[0, r] = simd.dot_q4_0(u8, row_offset(descs, r, n)[0], xq[0], xd[0], xs[0], xc[0], nb)
    elif same and q0 == Q8_0:
        for r in prange(total):
            out[0, r] = simd.dot_q8_0(u8, row_offset(descs, r, n)[0], xq[0], xd[0], xs[0], xc[0], nb)
    elif same and q0 == Q4_K:
        for r in prange(total):
            out[0, r] = simd.dot_q4_k(u8, row_offset(descs, r, n)[0], xq[0], xd[0], xs[0], xc[0], n // 256)
    elif same and q0 == Q5_K:
        for r in prange(total):
            out[0, r] = simd.dot_q5_k(u8, row_offset(descs, r, n)[0], xq[0], xd[0], xs[0], xc[0], n // 256)
    elif same and q0 == Q6_K and wide_q6:
        for r in prange(total):
            simd_multi.dot_q6_k(u8, row_offset(descs, r, n)[0], xk, xd, xs, xc, n // 256, out, r)
    elif same and q0 == Q6_K:
        for r in prange(total):
            out[0, r] = simd.dot_q6_k(u8, row_offset(descs, r, n)[0], xq[0], xd[0], xs[0], xc[0], n // 256)
    else:  # mixed types (a Q4_K_M file's Q/K/V: Q4_K and Q6_K): the K-quants called directly, the rest by dot_row
        for r in prange(total):
            off, qtype = row_offset(descs, r, n)
            if qtype == Q4_K:
                out[0, r] = simd.dot_q4_k(u8, off, xq[0], xd[0], xs[0], xc[0], n // 256)
            elif qtype == Q6_K and wide_q6:
                simd_multi.dot_q6_k(u8, off, xk, xd, xs, xc, n // 256, out, r)
            elif qtype == Q6_K:
                out[0, r] = simd.dot_q6_k(u8, off, xq[0], xd[0], xs[0], xc[0], n // 256)
            else:
                out[0, r] = dot_row(wv, qtype, off, n, x[0], xs[0], xq[0], xd[0], xc[0])


@njit(cache=True, fastmath=True)
def matvec(wv, qtype, off, rows, x, xb, out):
    """out[t, r] = W[r] . x[t] for W: (rows, n) of `qtype` at byte `off`; x: (T, n) with xb filled by prepare(x, xb)."""
    descs = np.empty((1, 3), dtype=np.int64)
    descs[0, 0], descs[0, 1], descs[0, 2] = off, qtype, rows
    matvec_multi(wv, descs, x, xb, out)


def check_kernel_type(qtype: int, name: str = "tensor") -> None:
    if int(qtype) not in KERNEL_TYPES:
        raise UnsupportedError(f"{name}: no numba kernel for tensor type {qtype}")


def matvec_raw(data: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """W @ x for one tensor's raw data (rows, row_bytes) as stored in GGUF; x: (n,) or (T, n) float32.
    Returns (rows,) or (T, rows). For tests and one-off products; the backend calls the kernels directly."""
    check_kernel_type(qtype)
    x2 = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    T, n = x2.shape
    rows = data.shape[0]
    xb = activation_blocks(T, n)
    prepare(x2, xb)
    out = np.empty((T, rows), dtype=np.float32)
    matvec(weight_views(np.ascontiguousarray(data)), int(qtype), 0, rows, x2, xb, out)
    return out[0] if x.ndim == 1 else out


def dequantize_raw(data: np.ndarray, qtype: int, n: int) -> np.ndarray:
    """Raw tensor data (rows, row_bytes) -> (rows, n) float32 with the numba kernels."""
    check_kernel_type(qtype)
    out = np.empty((data.shape[0], n), dtype=np.float32)
    dequant_rows(weight_views(np.ascontiguousarray(data)), int(qtype), 0, n, 0, out)
    return out
