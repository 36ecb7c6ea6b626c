"""Numba kernels for a KV cache stored as f32, f16 or q8_0 (layouts and the numpy reference in quant/kvtypes.py).

The cache is addressed in bytes: a row (one position of one KV head) is `row bytes` at a byte offset of a uint8
view of the cache. Attention reads the rows where they lie: the key dot products decode 16 values at a time into
vector registers (f16: fpext of 16 halves; q8_0: 16 int8 codes times their block's f16 scale), once for all the
query heads of a GQA group (simd.make_group_dots), and the weighted sums of values do the same
(simd.make_group_weighted_rows), so no float copy of the cache is ever made on the decode path. Keys and values
are encoded as they are written (`encode_row`).

kv type codes (quant.kvtypes.KV_CODES): 0 f32, 1 f16, 2 q8_0. The vector kernels take whole runs of 16 values;
the attention reads the tail of an f32 or f16 row (head_dim not a multiple of 16) with scalar loads (F16_TABLE);
q8_0 needs head_dim a multiple of 32 (quant.kvtypes.check_kv_type says so before a cache is made).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from quant import simd
from quant.jit import njit
from quant.simd import F32, HALF, I8, I16, I32, V16F, _i64, _load, _loop, _vec

KV_F32, KV_F16, KV_Q8_0 = 0, 1, 2
# float16 bit pattern -> float32 (256 KiB): the scalar tails of f16 rows
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def kv_row_bytes(kvt, d):
    """Bytes of one cached row of d values."""
    if kvt == KV_F32:
        return d * 4
    if kvt == KV_F16:
        return d * 2
    return d // 32 * 34


def _f16_cols(b, wp, row, c):
    """Values c .. c + 16 of an f16 row starting at byte `row`, as float32, and no scale."""
    return simd._f16_to_f32(b, _load(b, wp, b.add(row, b.mul(c, _i64(2))), _vec(I16, 16))), None


def _q8_0_cols(b, wp, row, c):
    """Codes c .. c + 16 (c a multiple of 16) of a q8_0 row starting at byte `row`, as float32, and the scale d of
    their block."""
    blk = b.add(row, b.mul(b.sdiv(c, _i64(32)), _i64(34)))
    codes = _load(b, wp, b.add(blk, b.add(_i64(2), b.srem(c, _i64(32)))), _vec(I8, 16))
    return b.sitofp(codes, V16F), _scale(b, wp, blk)


def _scale(b, wp, at):
    """The float16 at byte `at` as float32, by integer arithmetic: exact for every finite half, subnormals
    included (the bits shifted into a float32's place, times 2^112 to move the exponent bias). simd._half's
    vpinsrw merges into a register LLVM often gives an accumulator, which chained each block's decode to the last
    FMA: the q8_0 value sums ran at a third of the f16 ones' speed."""
    h = b.zext(_load(b, wp, at, I16), I32)
    mag = b.bitcast(b.shl(b.and_(h, ir.Constant(I32, 0x7FFF)), ir.Constant(I32, 13)), F32)
    sign = b.shl(b.and_(h, ir.Constant(I32, 0x8000)), ir.Constant(I32, 16))
    val = b.bitcast(b.fmul(mag, ir.Constant(F32, 2.0 ** 112)), I32)
    return b.bitcast(b.or_(val, sign), F32)


group_dots_f16 = simd.make_group_dots(_f16_cols)
group_dots_q8_0 = simd.make_group_dots(_q8_0_cols)
group_weighted_rows_f16 = simd.make_group_weighted_rows(_f16_cols)
group_weighted_rows_q8_0 = simd.make_group_weighted_rows(_q8_0_cols)


@intrinsic
def store_f16(typingctx, dst, doff, src, soff, n):
    """dst bytes doff .. doff + 2 n = float16 of src[soff : soff + n] (round to nearest even, as numpy's astype)."""
    if not (isinstance(dst, types.Array) and dst.layout == "C" and isinstance(src, types.Array)
            and src.layout == "C" and src.dtype == types.float32):
        return None
    sig = types.void(dst, types.int64, src, types.int64, types.int64)

    def codegen(context, b, signature, args):
        dp = b.gep(b.bitcast(context.make_array(signature.args[0])(context, b, args[0]).data, I8.as_pointer()),
                   [args[1]])
        sp = b.gep(b.bitcast(context.make_array(signature.args[2])(context, b, args[2]).data, I8.as_pointer()),
                   [b.mul(args[3], _i64(4))])

        def some(k):
            def body(i, _):
                v = _load(b, sp, b.mul(i, _i64(4)), _vec(F32, k) if k > 1 else F32)
                h = b.fptrunc(v, _vec(HALF, k) if k > 1 else HALF)
                st = b.store(h, b.bitcast(b.gep(dp, [b.mul(i, _i64(2))]), h.type.as_pointer()))
                st.align = 1
                return []
            return body

        _, i = _loop(b, _i64(0), args[4], 16, [], some(16))
        _loop(b, i, args[4], 1, [], some(1))
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def encode_row(x, dst, kvt):
    """One row x: (d,) float32 -> its bytes dst: (kv_row_bytes(kvt, d),) uint8, C-contiguous (layouts in
    quant/kvtypes.py; the same bytes as its encode)."""
    d = x.size
    if kvt == KV_F32:
        dst.view(np.float32)[:] = x
    elif kvt == KV_F16:
        store_f16(dst, 0, x, 0, d)
    else:
        codes = dst.view(np.int8)
        scale = np.empty(1, dtype=np.float32)
        for blk in range(d // 32):
            xb = x[blk * 32:(blk + 1) * 32]
            top = np.float32(0.0)
            for j in range(32):
                top = max(top, abs(xb[j]))
            scale[0] = top / np.float32(127.0)
            inv = np.float32(1.0) / scale[0] if top > 0 else np.float32(0.0)
            store_f16(dst, blk * 34, scale, 0, 1)
            for j in range(32):
                v = np.float64(xb[j] * inv)  # rounded half away from zero, exactly
                codes[blk * 34 + 2 + j] = int(v + 0.5) if v >= 0 else -int(0.5 - v)


@njit(cache=True)
def encode_rows(x, out, kvt):
    """x: (R, d) float32 -> out: (R, kv_row_bytes) uint8, both C-contiguous."""
    for r in range(x.shape[0]):
        encode_row(x[r], out[r], kvt)


@njit(cache=True)
def decode_rows(data, out, kvt):
    """data: (R, kv_row_bytes) uint8 -> out: (R, d) float32, both C-contiguous."""
    d = out.shape[1]
    for r in range(data.shape[0]):
        if kvt == KV_F32:
            out[r] = data[r].view(np.float32)
        elif kvt == KV_F16:
            simd.dequant_f16(data[r], 0, d, out[r], 0)
        else:
            simd.dequant_q8_0(data[r], 0, d // 32, out[r], 0)
