"""Quantizers for the legacy 32-weight block formats, Numba-parallel over rows.

Default rounding is bit-identical to ggml's reference quantizers (`gguf.quants` is the test oracle):
the same float32 arithmetic in the same order, scales rounded to float16 to nearest-even.

`optimize=True` keeps each format but searches each block's scale (and min) for the smallest
weighted squared error of the dequantized block. With `col_weights` (the importance of each input
column: the mean squared activation it sees, from llmcli/calibrate.py) the weight of x_j is
importance_j * sqrt(mean x² + x_j²), as llama.cpp does with an imatrix; without, x_j² + mean x². The
reference rounding is kept when no candidate beats it, so a block's weighted error never gets worse
than the default's. (With the importance, KL divergence to the F16 model falls by a third on SmolLM2;
from the weights alone it rose: see benchmarks/RESULTS.md, "Quantization".)

Sources are float32 rows, or float16/bfloat16 rows given as their uint16 bit patterns with a
65536-entry lookup table that turns bits into float32 (exact, and cheaper than converting first).

Block layouts (see quant/formats.py): q4_0 d|qs[16]; q4_1 d|m|qs[16]; q5_0 d|qh[4]|qs[16];
q5_1 d|m|qh[4]|qs[16]; q8_0 d|qs[32] int8. Nibble j of qs holds weight j (low) and j+16 (high).
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

from quant.formats import GGMLQuantizationType, row_bytes
from quant.jit import njit, prange

Q = GGMLQuantizationType
QK = 32  # weights per block in every format here

# kernel ids (an int keeps one compiled driver for every format)
_KIND = {Q.Q4_0: 0, Q.Q4_1: 1, Q.Q5_0: 2, Q.Q5_1: 3, Q.Q8_0: 4}
BLOCK_TYPES = frozenset(_KIND)
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
QUANTIZE_TYPES = BLOCK_TYPES | FLOAT_TYPES

_F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_BF16_TO_F32 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)


def bits_lut(dtype: str) -> np.ndarray:
    """The uint16 -> float32 table for 'f16' or 'bf16' sources: (65536,) float32."""
    return _F16_TO_F32 if dtype == "f16" else _BF16_TO_F32


# ---- scalar helpers ------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _f16_bits(x: float) -> int:
    """float -> IEEE half bit pattern, rounded to nearest-even (subnormals, inf, nan, signed zero)."""
    if x != x:
        return 0x7E00
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    a = abs(float(x))
    if a < 6.103515625e-05:  # below the smallest normal half: a multiple of 2**-24
        return sign | int(np.rint(a * 16777216.0))
    if a >= 65520.0:  # halfway between the largest half (65504) and 65536 rounds to even: inf
        return sign | 0x7C00
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    exp = e - 1 + 15
    # a mantissa that rounds up to 1024 carries into the exponent, which is exactly right (also into inf)
    return sign | ((exp << 10) + int(np.rint((2.0 * m - 1.0) * 1024.0)))


@njit(cache=True, inline="always")
def _roundf(v):
    """C roundf (half away from zero) in float32, the way gguf.quants writes it."""
    a = abs(v)
    fl = np.floor(a)
    b = fl + np.floor(np.float32(2.0) * (a - fl))
    return -b if v < 0 else b


@njit(cache=True, inline="always")
def _put_u16(out, off, bits):
    out[off] = bits & 0xFF
    out[off + 1] = (bits >> 8) & 0xFF


@njit(cache=True, inline="always")
def _pack_nibbles(q, out, off, with_qh, qh_off):
    """q: 32 codes (0..31). Low 4 bits -> qs at `off`; bit 4 -> the 32-bit qh at `qh_off` if with_qh."""
    qh = 0
    for j in range(16):
        out[off + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)
        if with_qh:
            qh |= ((q[j] >> 4) & 1) << j
            qh |= ((q[j + 16] >> 4) & 1) << (j + 16)
    if with_qh:
        for k in range(4):
            out[qh_off + k] = (qh >> (8 * k)) & 0xFF


# ---- reference rounding (bit-exact with ggml) ------------------------------------------------------------

@njit(cache=True, inline="always")
def _ref_symmetric(x, out, off, nmax, q):
    """q4_0 (nmax 8) / q5_0 (nmax 16), the whole block: d = max / -nmax, where max is the weight of largest
    magnitude, codes round(x / d) + nmax (q5_0's via q)."""
    amax = np.float32(0.0)
    hi = x[0]
    lo = x[0]
    for j in range(QK):  # branch-free: this vectorizes
        amax = max(amax, abs(x[j]))
        hi = max(hi, x[j])
        lo = min(lo, x[j])
    # the first weight that reaches amax: only one sign reaches it (the usual case), or search
    if hi == amax and -lo != amax:
        mx = hi
    elif -lo == amax and hi != amax:
        mx = lo
    else:
        mx = np.float32(0.0)
        for j in range(QK):
            if abs(x[j]) == amax:
                mx = x[j]
                break
    d = mx * np.float32(-1.0 / nmax)  # exact: nmax is a power of two
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    top = np.float32(2 * nmax - 1)
    half = np.float32(nmax + 0.5)
    _put_u16(out, off, _f16_bits(d))
    # clamping before truncation is the same for these non-negative values, and faster
    if nmax == 8:  # q4_0: codes straight into nibbles
        for j in range(16):
            out[off + 2 + j] = np.int32(min(top, x[j] * inv + half)) | (np.int32(min(top, x[j + 16] * inv + half)) << 4)
    else:
        for j in range(QK):
            q[j] = np.int32(min(top, x[j] * inv + half))
        _pack_nibbles(q, out, off + 6, True, off + 2)


@njit(cache=True, inline="always")
def _ref_affine(x, q, nmax):
    """q4_1 (nmax 15) / q5_1 (nmax 31): d = (max - min) / nmax, m = min. Returns (d, min) float32."""
    lo = x[0]
    hi = x[0]
    for j in range(1, QK):
        lo = min(lo, x[j])
        hi = max(hi, x[j])
    d = (hi - lo) / np.float32(nmax)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(QK):
        q[j] = min(nmax, np.int32((x[j] - lo) * inv + np.float32(0.5)))
    return d, lo


@njit(cache=True, inline="always")
def _ref_q8_0(x, out, off):
    amax = np.float32(0.0)
    for j in range(QK):
        amax = max(amax, abs(x[j]))
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    _put_u16(out, off, _f16_bits(d))
    for j in range(QK):
        out[off + 2 + j] = np.int8(_roundf(x[j] * inv)) & 0xFF


# ---- optimized rounding ------------------------------------------------------------------------------------

# error weightings (_weights): 1 = x² + mean x², 2 = uniform, 3 = x², 4 = sqrt(mean x² + x²) (llama.cpp's)
OPTIMIZE_WEIGHTING = 1  # --optimize without an importance per column
IMPORTANCE_WEIGHTING = 4  # --optimize with one (activation statistics), multiplied by it
_N_STEPS = 10  # candidate scales on each side of the reference, 0.1 code apart
_STEP = 0.1


@njit(cache=True)
def _weights(x, w, mode):
    """Error weights of one block, multiplied into w (which holds the per-column importance)."""
    s = 0.0
    for j in range(QK):
        s += float(x[j]) * float(x[j])
    s /= QK
    for j in range(QK):
        if mode == 1:
            w[j] *= float(x[j]) * float(x[j]) + s
        elif mode == 2:
            w[j] *= 1.0
        elif mode == 4:
            w[j] *= math.sqrt(float(x[j]) * float(x[j]) + s)
        else:
            w[j] *= float(x[j]) * float(x[j])


@njit(cache=True)
def _err_symmetric(x, w, d, qlo, qhi, q):
    """Best codes for scale d (round, clamp) into q; returns the weighted squared error."""
    inv = 1.0 / d
    err = 0.0
    for j in range(QK):
        c = min(qhi, max(qlo, int(np.rint(x[j] * inv))))
        q[j] = c
        e = x[j] - d * c
        err += w[j] * e * e
    return err


@njit(cache=True)
def _opt_symmetric(x, lut, qlo, qhi, q, tmp, w, mode):
    """Search d for codes in [qlo, qhi] (w = d * q): scales around the one that maps the largest weight to
    either end. Returns the half bits of the best d and leaves its signed codes in q; -1 keeps the
    reference (nothing better found, or an all-zero block)."""
    _weights(x, w, mode)
    amax = 0.0
    mx = 0.0
    for j in range(QK):
        if amax < abs(x[j]):
            amax = abs(x[j])
            mx = float(x[j])
    if amax == 0.0:  # an all-zero block: the reference is exact
        return -1
    best_bits = -1
    best_err = np.inf
    for side in range(2):
        # map the largest weight to the negative end (qlo) or to the positive end (qhi)
        base = -qlo if side == 0 else qhi
        sgn = -1.0 if side == 0 else 1.0
        for k in range(-_N_STEPS, _N_STEPS + 1):
            iscale = sgn * (base + _STEP * k) / mx
            # least-squares d for the codes this scale gives, then rounded to half, then the best codes
            sxq = 0.0
            sqq = 0.0
            for j in range(QK):
                c = min(qhi, max(qlo, int(np.rint(x[j] * iscale))))
                sxq += w[j] * x[j] * c
                sqq += w[j] * c * c
            if sqq == 0.0:
                continue
            bits = _f16_bits(sxq / sqq)
            d = float(lut[bits])
            if d == 0.0 or not np.isfinite(d):
                continue
            err = _err_symmetric(x, w, d, qlo, qhi, tmp)
            if err < best_err:
                best_err, best_bits = err, bits
                for j in range(QK):
                    q[j] = tmp[j]
    return best_bits


@njit(cache=True)
def _err_affine(x, w, d, m, nmax, q):
    inv = 1.0 / d
    err = 0.0
    for j in range(QK):
        c = min(nmax, max(0, int(np.rint((x[j] - m) * inv))))
        q[j] = c
        e = x[j] - (d * c + m)
        err += w[j] * e * e
    return err


@njit(cache=True)
def _opt_affine(x, lut, nmax, q, tmp, w, mode):
    """Search (d, m) for codes in [0, nmax] (w = d * q + m): for each candidate scale, codes from the block
    minimum, then the weighted least-squares (d, m) for those codes. Returns (d bits, m bits), codes in q;
    d bits -1 keeps the reference."""
    _weights(x, w, mode)
    lo = float(x[0])
    hi = float(x[0])
    for j in range(1, QK):
        lo = min(lo, float(x[j]))
        hi = max(hi, float(x[j]))
    if hi == lo:  # a constant block: the reference (d = 0, m = the value) is as good as it gets
        return -1, 0
    sw = 0.0
    sx = 0.0
    for j in range(QK):
        sw += w[j]
        sx += w[j] * x[j]
    best_err = np.inf
    best_d = -1  # nothing found (e.g. every weight 0): keep the reference
    best_m = 0
    for k in range(-_N_STEPS, _N_STEPS + 1):
        iscale = (nmax + _STEP * k) / (hi - lo)
        sq = 0.0
        sqq = 0.0
        sxq = 0.0
        for j in range(QK):
            c = min(nmax, max(0, int(np.rint((x[j] - lo) * iscale))))
            sq += w[j] * c
            sqq += w[j] * c * c
            sxq += w[j] * x[j] * c
        det = sw * sqq - sq * sq
        if det <= 0.0:
            continue
        dbits = _f16_bits((sw * sxq - sq * sx) / det)
        mbits = _f16_bits((sqq * sx - sq * sxq) / det)
        d = float(lut[dbits])
        m = float(lut[mbits])
        if d == 0.0 or not np.isfinite(d) or not np.isfinite(m):
            continue
        err = _err_affine(x, w, d, m, nmax, tmp)
        if err < best_err:
            best_err, best_d, best_m = err, dbits, mbits
            for j in range(QK):
                q[j] = tmp[j]
    return best_d, best_m


@njit(cache=True)
def _block_error(x, w, out, off, kind, lut):
    """Weighted squared error of the block already written at out[off:] (for comparing with the reference)."""
    d = float(lut[out[off] | (out[off + 1] << 8)])
    m = 0.0
    if kind == 1 or kind == 3:
        m = float(lut[out[off + 2] | (out[off + 3] << 8)])
    err = 0.0
    for j in range(QK):
        if kind == 4:
            c = float(np.int8(out[off + 2 + j]))
        else:
            qs_off = off + (2 if kind == 0 else 4 if kind == 1 else 6 if kind == 2 else 8)
            byte = out[qs_off + (j % 16)]
            c = float((byte & 0x0F) if j < 16 else (byte >> 4))
            if kind == 2 or kind == 3:
                qh_off = off + (2 if kind == 2 else 4)
                qh = out[qh_off] | (out[qh_off + 1] << 8) | (out[qh_off + 2] << 16) | (out[qh_off + 3] << 24)
                c += 16.0 * ((qh >> j) & 1)
            if kind == 0:
                c -= 8.0
            elif kind == 2:
                c -= 16.0
        e = x[j] - (d * c + m)
        err += w[j] * e * e
    return err


# ---- one block, every format -------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _write_ref(x, out, off, kind, q):
    if kind == 0 or kind == 2:
        nmax = 8 if kind == 0 else 16
        _ref_symmetric(x, out, off, nmax, q)
    elif kind == 1 or kind == 3:
        nmax = 15 if kind == 1 else 31
        d, lo = _ref_affine(x, q, nmax)
        _put_u16(out, off, _f16_bits(d))
        _put_u16(out, off + 2, _f16_bits(lo))
        _pack_nibbles(q, out, off + (4 if kind == 1 else 8), kind == 3, off + 4)
    else:
        _ref_q8_0(x, out, off)


@njit(cache=True, inline="always")
def _quantize_block(x, out, off, kind, optimize, lut, q, tmp, w, ref):
    """Quantize the 32 float32 weights in x into out[off:off + type_size]."""
    _write_ref(x, out, off, kind, q)
    if not optimize:
        return
    if kind == 1 or kind == 3:
        nmax = 15 if kind == 1 else 31
        dbits, mbits = _opt_affine(x, lut, nmax, q, tmp, w, optimize)
    else:
        qlo, qhi = (-8, 7) if kind == 0 else (-16, 15) if kind == 2 else (-128, 127)
        dbits = _opt_symmetric(x, lut, qlo, qhi, q, tmp, w, optimize)
        mbits = 0
    if dbits < 0:
        return
    size = (18, 20, 22, 24, 34)[kind]
    for j in range(size):
        ref[j] = out[off + j]
    ref_err = _block_error(x, w, out, off, kind, lut)
    _put_u16(out, off, dbits)
    if kind == 4:
        for j in range(QK):
            out[off + 2 + j] = np.int8(q[j]) & 0xFF
    elif kind == 1 or kind == 3:
        _put_u16(out, off + 2, mbits)
        _pack_nibbles(q, out, off + (4 if kind == 1 else 8), kind == 3, off + 4)
    else:
        bias = 8 if kind == 0 else 16
        for j in range(QK):
            q[j] += bias
        _pack_nibbles(q, out, off + (2 if kind == 0 else 6), kind == 2, off + 2)
    if _block_error(x, w, out, off, kind, lut) > ref_err:  # half rounding made it worse: keep the reference
        for j in range(size):
            out[off + j] = ref[j]


# ---- drivers: rows in parallel -----------------------------------------------------------------------------

def read_block(src, lut, r, b, x):
    """x[:] = the len(x) source values of block b of row r, as float32 (16-bit sources decoded through lut)."""


@overload(read_block, inline="always")
def _read_block_impl(src, lut, r, b, x):
    if src.dtype == types.float32:
        def read(src, lut, r, b, x):
            n = x.shape[0]
            for j in range(n):
                x[j] = src[r, b * n + j]
    else:
        def read(src, lut, r, b, x):
            n = x.shape[0]
            for j in range(n):
                x[j] = lut[src[r, b * n + j]]
    return read


@njit(parallel=True, cache=True, nogil=True)
def _quantize_rows(src, src_lut, out, kind, optimize, lut, colw):
    # src: (rows, cols) float32, or uint16 bit patterns (float16 or bfloat16) decoded by src_lut;
    # out: (rows, cols // 32 * type_size) uint8
    rows, cols = src.shape
    size = (18, 20, 22, 24, 34)[kind]
    for r in prange(rows):
        x = np.empty(QK, dtype=np.float32)
        q = np.empty(QK, dtype=np.int32)
        tmp = np.empty(QK, dtype=np.int32)
        w = np.empty(QK, dtype=np.float64)
        ref = np.empty(34, dtype=np.uint8)
        orow = out[r]
        for b in range(cols // QK):
            read_block(src, src_lut, r, b, x)
            if optimize:
                for j in range(QK):
                    w[j] = colw[b * QK + j]
            _quantize_block(x, orow, b * size, kind, optimize, lut, q, tmp, w, ref)


@njit(parallel=True, cache=True)
def _f16_bits_rows(src, out):
    # src: (rows, cols) float32 -> out: (rows, cols) uint16 half bits (for the f16 scale helper tests too)
    rows, cols = src.shape
    for r in prange(rows):
        for c in range(cols):
            out[r, c] = _f16_bits(src[r, c])


# ---- public API --------------------------------------------------------------------------------------------

def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), nearest-even, NaN kept quiet (as ggml does)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
    rounded = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return rounded.astype(np.uint16)


def quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType, optimize: bool | int = False,
                  source: str = "f32", col_weights: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D block of rows into GGUF bytes: (n_rows, row_bytes) uint8.

    `rows` is float32 when source == "f32", else the uint16 bit patterns of "f16" or "bf16" values.
    `optimize`: True for the --optimize search; an int selects another error weighting (see _weights).
    `col_weights` (n_cols,): per-column importance multiplied into the search's error weights.
    `out` (block types only): a C-contiguous (n_rows, row_bytes) uint8 array to write into.
    """
    if rows.ndim != 2:
        raise ValueError(f"quantize_rows needs a 2-D array, got shape {rows.shape}")
    n_rows, n_cols = rows.shape
    if optimize is True:
        optimize = OPTIMIZE_WEIGHTING if col_weights is None else IMPORTANCE_WEIGHTING
    optimize = int(optimize)  # an int picks another weighting
    colw = np.ones(n_cols, dtype=np.float64) if col_weights is None else np.asarray(col_weights, np.float64)
    if colw.shape != (n_cols,):
        raise ValueError(f"col_weights has shape {colw.shape}, expected ({n_cols},)")
    if qtype in BLOCK_TYPES:
        if n_cols % QK:
            raise ValueError(f"row length {n_cols} is not a multiple of {QK}")
        if out is None:
            out = np.empty((n_rows, row_bytes(qtype, n_cols)), dtype=np.uint8)
        f32 = source == "f32"
        src = np.ascontiguousarray(rows, dtype=np.float32) if f32 else np.ascontiguousarray(rows)
        _quantize_rows(src, _F16_TO_F32 if f32 else bits_lut(source), out, _KIND[qtype], optimize, _F16_TO_F32,
                       colw)
        return out
    values = rows if source == "f32" else bits_lut(source)[rows]
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        if source == "f16":
            return np.ascontiguousarray(rows).view(np.uint8)
        return np.ascontiguousarray(values, dtype=np.float32).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        if source == "bf16":
            return np.ascontiguousarray(rows).view(np.uint8)
        return _to_bf16(values).view(np.uint8)
    raise ValueError(f"cannot quantize to {qtype.name}")


def f16_bits(values: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) -> float16 bit patterns via the kernels' own converter (for tests)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty(values.shape, dtype=np.uint16)
    _f16_bits_rows(values, out)
    return out
