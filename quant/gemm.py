"""Prompt products as an integer GEMM: the int16 codes of 32 weight rows at a time against the int16 copy of many
tokens' activations that the matvec kernels use (quant.kernels.prepare), in a register-blocked micro-kernel
written as portable LLVM vector IR (like quant/simd.py).

Why not BLAS on dequantized float32 tiles: float32 multiply-adds top out at 16 per cycle per core here (two
256-bit FMA pipes; OpenBLAS reaches ~48 G/s per core), while sums of int16 pair products (`vpdpwssd` on x86,
`smlal` on ARM) do 32: the micro-kernel runs at ~90 G multiply-adds/s per core, ~1.9x BLAS (RESULTS.md). The
numbers are the matvec kernels' own: the same int16 copy rounded per block of 32, the same integer products, so
a prompt and the tokens decoded after it see the same weights the same way.

A product goes in groups of GROUP = 32 weight rows. Each group is first packed from the blocks in the memory map
(`pack_rows`: 16 rows of one matrix at once, their code pairs transposed in registers; row by row where a group
straddles two matrices) into a small buffer that stays in cache while every token passes by:

  wp: int16 (n / 2 pairs, 2 halves, 16 lanes, 2)   codes of weights 2p, 2p + 1 of row 16 half + lane
  sw: float32 (scale blocks, 32)                    the scale of each scale block of each row
  mn: float32 (scale blocks, 32)                    its minimum (weights d q + m), 0 for formats without one

A scale block is a block of 32 weights, or of 16 in a product with Q6_K rows (Q6_K scales each 16; the other rows
then give both halves of a block its scale, and its minimum to the first). Codes are signed where the format
stores an offset (Q4_0: q - 8, Q5_0: q - 16, Q6_K: q - 32); the K-quants' sub-blocks are scale blocks here
(scale d sc, minimum -dmin m). Then `tile` computes NR tokens x 32 rows at a time: 2 x NR vectors of 16 int32
sums, one pass over a scale block's code pairs (each pair of a token's int16 copy broadcast as one 32-bit word),
then per scale block one conversion and two multiplies into float32 accumulators:

  out[t, r] = sum over scale blocks k of sw[k, r] xd[t, b(k)] (codes[r, k] . xq[t, k]) + mn[k, r] xs[t, b(k)]

with b(k) the activation's block of 32 that holds k. |code| <= 128 and |xq| <= 32767, so a block's 32 products
sum to at most 2^27 in int32. The float formats (F32, F16, BF16) keep the BLAS path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from quant.errors import UnsupportedError
from quant.jit import njit
from quant.kernels import (
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QUANTIZED_TYPES,
    activation_blocks,
    prepare,
    row_bytes,
    row_offset,
    weight_views,
)
from quant.simd import (
    F32,
    FAST,
    I8,
    I16,
    I32,
    INT_FORMATS,
    V16F,
    _const,
    _fma,
    _half,
    _i64,
    _k4_scales_mins,
    _load,
    _loop,
    _q6_codes,
    _q45_codes,
    _splat,
    _vec,
)

GROUP = 32  # weight rows per packed group: two vectors of 16 lanes
NR = 6  # tokens per micro-kernel call: 2 x 6 int32 and 2 x 6 float32 accumulators, 26 of 32 vector registers
# (measured on 1536x576x504, one thread, G multiply-adds/s: 2x6 89, 3x4 91, 2x7 89, 4x3 86, 2x4 84, 1x12 77)
INT_GEMM_TYPES = QUANTIZED_TYPES  # every quantized format

V32H = _vec(I16, 32)


def packed_buffers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wp, sw, mn) for one group of rows of n weights (see the module docstring)."""
    nb = n // 32
    return (np.zeros(nb * 16 * GROUP * 2, dtype=np.int16), np.zeros(2 * nb * GROUP, dtype=np.float32),
            np.zeros(2 * nb * GROUP, dtype=np.float32))


# ---- the micro-kernel --------------------------------------------------------------------------------------

def _pair_products(b, w, x):
    """<32 x i16> . <32 x i16> -> <16 x i32>, the products summed in adjacent pairs (vpmaddwd / vpdpwssd)."""
    prod = b.mul(b.sext(w, _vec(I32, 32)), b.sext(x, _vec(I32, 32)))
    even = b.shuffle_vector(prod, prod, _const(I32, range(0, 32, 2)))
    odd = b.shuffle_vector(prod, prod, _const(I32, range(1, 32, 2)))
    return b.add(even, odd)


def _emit_tile(b, has_min, sub, wp, sw, mn, xq, xd, xs, out, nb, n, rows, t0, r0):
    """out[t0 : t0 + NR, r0 : r0 + GROUP] (row stride `rows` floats) from a packed group and the tokens' int16
    copies xq (row stride n int16) with their scales xd and float sums xs (row stride nb). The weights' scales
    (and minimums) are per `sub` code pairs: 16 (blocks of 32) or 8 (Q6_K's 16)."""
    halves, per_block = GROUP // 16, 16 // sub
    zero = ir.Constant(V16F, [0.0] * 16)

    def per_token(t, i):  # byte offset of entry i of token t0 + t in a (T, nb) float32 array
        return b.mul(b.add(b.mul(b.add(t0, _i64(t)), nb), i), _i64(4))

    def block(i, faccs):  # scale block i: code pairs sub i .. sub (i + 1)
        wb = b.mul(i, _i64(sub * halves * 64))
        xb = b.mul(i, _i64(4 * sub))  # its first int16 in a token's row, in bytes
        xi = b.sdiv(i, _i64(per_block))  # the block of 32 of the activation it lies in
        sums = [[None] * NR for _ in range(halves)]
        for p in range(sub):
            codes = [_load(b, wp, b.add(wb, _i64((p * halves + h) * 64)), V32H) for h in range(halves)]
            for t in range(NR):
                at = b.add(b.mul(b.add(t0, _i64(t)), b.mul(n, _i64(2))), b.add(xb, _i64(4 * p)))
                x = b.bitcast(_splat(b, _load(b, xq, at, I32), 16), V32H)
                for h in range(halves):
                    prod = _pair_products(b, codes[h], x)
                    sums[h][t] = prod if p == 0 else b.add(sums[h][t], prod)
        new = list(faccs)
        for h in range(halves):
            at = b.mul(b.add(b.mul(i, _i64(GROUP)), _i64(16 * h)), _i64(4))
            scale = _load(b, sw, at, V16F)
            minimum = _load(b, mn, at, V16F) if has_min else None
            for t in range(NR):
                k = h * NR + t
                v = b.fmul(b.sitofp(sums[h][t], V16F), scale, flags=FAST)
                new[k] = _fma(b, v, _splat(b, _load(b, xd, per_token(t, xi), F32), 16), new[k])
                if has_min:
                    new[k] = _fma(b, minimum, _splat(b, _load(b, xs, per_token(t, xi), F32), 16), new[k])
        return new

    faccs, _ = _loop(b, _i64(0), b.mul(nb, _i64(per_block)), 1, [zero] * (halves * NR), block)
    for h in range(halves):
        for t in range(NR):
            at = b.mul(b.add(b.mul(b.add(t0, _i64(t)), rows), b.add(r0, _i64(16 * h))), _i64(4))
            st = b.store(faccs[h * NR + t], b.bitcast(b.gep(out, [at]), V16F.as_pointer()))
            st.align = 4


def _make_tile(has_min: bool, sub: int):
    @intrinsic
    def tile(typingctx, wp, sw, mn, xq, xd, xs, out, t0, r0):
        """out[t0 : t0 + NR, r0 : r0 + GROUP] of the product of a packed group (wp, sw, mn) with the tokens'
        prepared activations (xq: (T, n) int16; xd, xs: (T, n // 32) float32); out: (T, rows) float32."""
        arrays = (wp, sw, mn, xq, xd, xs, out)
        if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)
                and wp.dtype == types.int16 and xq.dtype == types.int16 and xq.ndim == 2 and out.ndim == 2
                and all(a.dtype == types.float32 for a in (sw, mn, xd, xs, out))):
            return None
        sig = types.void(wp, sw, mn, xq, xd, xs, out, types.int64, types.int64)

        def codegen(context, b, signature, args):
            arr = [context.make_array(signature.args[k])(context, b, args[k]) for k in range(7)]
            ptr = [b.bitcast(a.data, I8.as_pointer()) for a in arr]
            n = b.extract_value(arr[3].shape, 1)
            rows = b.extract_value(arr[6].shape, 1)
            _emit_tile(b, has_min, sub, *ptr, b.sdiv(n, _i64(32)), n, rows, args[7], args[8])
            return context.get_dummy_value()

        return sig, codegen

    return tile


tile, tile_min, tile16, tile16_min = (_make_tile(m, sub) for sub in (16, 8) for m in (False, True))


# ---- packing: one row of blocks -> its lane of a group ---------------------------------------------------------

def _store_pairs(b, wp, pair, slot, codes):
    """<16 x i16> codes of 16 consecutive weights, from code pair `pair` of the row, -> lane `slot` of wp."""
    half, lane = b.sdiv(slot, _i64(16)), b.srem(slot, _i64(16))
    base = b.add(b.mul(pair, _i64((GROUP // 16) * 64)), b.add(b.mul(half, _i64(64)), b.mul(lane, _i64(4))))
    pairs = b.bitcast(codes, _vec(I32, 8))
    for p in range(8):
        at = b.add(base, _i64(p * (GROUP // 16) * 64))
        b.store(b.extract_element(pairs, ir.Constant(I32, p)), b.bitcast(b.gep(wp, [at]), I32.as_pointer()))


def _store_scale(b, sw, mn, k, lane, scale, minimum):
    """Scale and minimum of scale block k from lane `lane` on: one row's (float), or 16 rows' (<16 x float>)."""
    at = b.mul(b.add(b.mul(k, _i64(GROUP)), lane), _i64(4))
    for v, arr in ((scale, sw), (minimum, mn)):
        st = b.store(v, b.bitcast(b.gep(arr, [at]), v.type.as_pointer()))
        st.align = 4


def _store_block_scale(b, sw, mn, per_block, blk, lane, scale, minimum):
    """Scale and minimum of block blk of 32 weights (one row's, or 16 rows' from lane `lane` on). per_block (1 or
    2, at run time): scale blocks per block of 32 in this product; with 2 (a product with Q6_K rows) the scale
    goes to both halves and the minimum to the first (it multiplies the sum of the activation's whole block)."""
    k = b.mul(blk, per_block)
    _store_scale(b, sw, mn, k, lane, scale, minimum)
    with b.if_then(b.icmp_signed(">", per_block, _i64(1))):
        _store_scale(b, sw, mn, b.add(k, _i64(1)), lane, scale, ir.Constant(minimum.type, None))


def _store_block(b, wp, sw, mn, per_block, blk, slot, lo, hi, scale, minimum):
    """Block blk of 32 weights of the row in `slot`: codes lo (weights 0..15) and hi (16..31) as <16 x i16>, its
    scale and minimum (see _store_block_scale)."""
    pair = b.mul(blk, _i64(16))
    _store_pairs(b, wp, pair, slot, lo)
    _store_pairs(b, wp, b.add(pair, _i64(8)), slot, hi)
    _store_block_scale(b, sw, mn, per_block, blk, slot, scale, minimum)


def _emit_pack_legacy(fmt):
    block, block_bytes, offset, has_min = fmt

    def emit(b, w, nb, wp, sw, mn, slot, per_block):
        def one(i, _):
            o = b.mul(i, _i64(block_bytes))
            lo, hi = block(b, w, o)
            if offset:
                lo, hi = (b.sub(c, _const(I16, [offset] * 16)) for c in (lo, hi))
            minimum = _half(b, w, b.add(o, _i64(2))) if has_min else ir.Constant(F32, 0.0)
            _store_block(b, wp, sw, mn, per_block, i, slot, lo, hi, _half(b, w, o), minimum)
            return []

        _loop(b, _i64(0), nb, 1, [], one)

    return emit


def _emit_pack_k(five: bool):
    block_bytes = 176 if five else 144

    def emit(b, w, nsb, wp, sw, mn, slot, per_block):
        def one(i, _):
            o = b.mul(i, _i64(block_bytes))
            sc, m = _k4_scales_mins(b, w, o)
            scales = b.fmul(sc, _splat(b, _half(b, w, o), 8))
            mins = b.fneg(b.fmul(m, _splat(b, _half(b, w, b.add(o, _i64(2))), 8)))
            for j, (lo, hi) in _q45_codes(b, w, o, five):
                at = ir.Constant(I32, j)
                _store_block(b, wp, sw, mn, per_block, b.add(b.mul(i, _i64(8)), _i64(j)), slot, lo, hi,
                             b.extract_element(scales, at), b.extract_element(mins, at))
            return []

        _loop(b, _i64(0), nsb, 1, [], one)

    return emit


def _emit_pack_q6_k(b, w, nsb, wp, sw, mn, slot, per_block):
    """Q6_K: 16 scale blocks of 16 weights per super-block, codes q - 32, scale d sc (per_block is 2)."""
    def one(i, _):
        o = b.mul(i, _i64(210))
        d = _half(b, w, b.add(o, _i64(208)))
        for j, half, q, sc in _q6_codes(b, w, o):
            k = b.add(b.mul(i, _i64(16)), _i64(2 * j + half))
            _store_pairs(b, wp, b.mul(k, _i64(8)), slot, q)
            _store_scale(b, sw, mn, k, slot, b.fmul(d, b.sitofp(sc, F32)), ir.Constant(F32, 0.0))
        return []

    _loop(b, _i64(0), nsb, 1, [], one)


# ---- packing 16 rows at once: codes transposed in registers ----------------------------

def _transpose16(b, rows):
    """16 values of <16 x i32> (row r, lane p) -> 16 values (lane r of value p): off-diagonal blocks of 8, 4, 2
    and 1 lanes swapped in turn, 64 two-source shuffles."""
    v = list(rows)
    for s in (8, 4, 2, 1):
        low = _const(I32, [lane if not lane & s else 16 + lane - s for lane in range(16)])
        high = _const(I32, [lane + s if not lane & s else 16 + lane for lane in range(16)])
        for i in (i for i in range(16) if not i & s):
            v[i], v[i + s] = b.shuffle_vector(v[i], v[i + s], low), b.shuffle_vector(v[i], v[i + s], high)
    return v


def _store16_pairs(b, wp, half, blk, pairs):
    """Block blk of 32 weights of 16 rows -> half `half` of a group: pairs, 16 values of <16 x i32> (row r's 16
    code pairs), transposed and stored one vector per code pair."""
    base = b.add(b.mul(blk, _i64(16 * (GROUP // 16) * 64)), b.mul(half, _i64(64)))
    for p, col in enumerate(_transpose16(b, pairs)):
        st = b.store(col, b.bitcast(b.gep(wp, [b.add(base, _i64(p * (GROUP // 16) * 64))]), col.type.as_pointer()))
        st.align = 4


def _pair_vector(b, lo, hi):
    """Codes of weights 0..15 and 16..31 (<16 x i16> each) -> the 16 code pairs as <16 x i32>."""
    return b.shuffle_vector(b.bitcast(lo, _vec(I32, 8)), b.bitcast(hi, _vec(I32, 8)), _const(I32, range(16)))


def _store16_block(b, wp, sw, mn, half, per_block, blk, pairs, scales, mins):
    """Block blk of 32 weights of 16 rows: their code pairs, scales and minimums (<16 x float>)."""
    _store16_pairs(b, wp, half, blk, pairs)
    _store_block_scale(b, sw, mn, per_block, blk, b.mul(half, _i64(16)), scales, mins)


def _gathered(b, values):
    """16 float values -> <16 x float>."""
    v = ir.Constant(V16F, ir.Undefined)
    for r, x in enumerate(values):
        v = b.insert_element(v, x, ir.Constant(I32, r))
    return v


def _emit_pack16_legacy(fmt):
    """16 consecutive rows of a 32-weight format -> half `half` of a group, a block of the 16 rows at a time."""
    block, block_bytes, offset, has_min = fmt

    def emit(b, w, row_bytes, nb, wp, sw, mn, half, per_block):
        def one(i, _):
            o = b.mul(i, _i64(block_bytes))
            pairs = []
            scales = mins = ir.Constant(V16F, [0.0] * 16)  # gathered as the rows go (16 scalars live would spill)
            for r in range(16):
                at = b.add(b.mul(_i64(r), row_bytes), o)
                lo, hi = block(b, w, at)
                if offset:
                    lo, hi = (b.sub(c, _const(I16, [offset] * 16)) for c in (lo, hi))
                pairs.append(_pair_vector(b, lo, hi))
                scales = b.insert_element(scales, _half(b, w, at), ir.Constant(I32, r))
                if has_min:
                    mins = b.insert_element(mins, _half(b, w, b.add(at, _i64(2))), ir.Constant(I32, r))
            _store16_block(b, wp, sw, mn, half, per_block, i, pairs, scales, mins)
            return []

        _loop(b, _i64(0), nb, 1, [], one)

    return emit


def _emit_pack16_k(five: bool):
    """16 consecutive rows of Q4_K/Q5_K -> half `half` of a group, a sub-block of the 16 rows at a time (LLVM keeps
    each row's scale unpacking once per super-block)."""
    block_bytes = 176 if five else 144

    def emit(b, w, row_bytes, nsb, wp, sw, mn, half, per_block):
        def one(i, _):
            o = b.mul(i, _i64(block_bytes))
            rows = []
            for r in range(16):
                at = b.add(b.mul(_i64(r), row_bytes), o)
                sc, m = _k4_scales_mins(b, w, at)
                rows.append((at, b.fmul(sc, _splat(b, _half(b, w, at), 8)),
                             b.fneg(b.fmul(m, _splat(b, _half(b, w, b.add(at, _i64(2))), 8)))))
            for j in range(8):
                pairs = [_pair_vector(b, *_q45_codes(b, w, at, five)[j][1]) for at, _, _ in rows]
                pick = ir.Constant(I32, j)
                _store16_block(b, wp, sw, mn, half, per_block, b.add(b.mul(i, _i64(8)), _i64(j)), pairs,
                               _gathered(b, [b.extract_element(sc, pick) for _, sc, _ in rows]),
                               _gathered(b, [b.extract_element(m, pick) for _, _, m in rows]))
            return []

        _loop(b, _i64(0), nsb, 1, [], one)

    return emit


def _emit_pack16_q6_k(b, w, row_bytes, nsb, wp, sw, mn, half, per_block):
    """16 consecutive rows of Q6_K -> half `half` of a group: per block of 32 its two scale blocks of 16."""
    def one(i, _):
        o = b.mul(i, _i64(210))
        rows = [b.add(b.mul(_i64(r), row_bytes), o) for r in range(16)]
        ds = [_half(b, w, b.add(at, _i64(208))) for at in rows]
        zeros = ir.Constant(V16F, [0.0] * 16)
        for j in range(8):
            pairs, scales = [], [zeros, zeros]
            for r, (at, d) in enumerate(zip(rows, ds, strict=True)):
                codes = [c for c in _q6_codes(b, w, at) if c[0] == j]  # (j, half, q, sc) for half 0, 1
                pairs.append(_pair_vector(b, codes[0][2], codes[1][2]))
                for h in range(2):
                    scales[h] = b.insert_element(scales[h], b.fmul(d, b.sitofp(codes[h][3], F32)), ir.Constant(I32, r))
            blk = b.add(b.mul(i, _i64(8)), _i64(j))
            _store16_pairs(b, wp, half, blk, pairs)
            for h in range(2):
                _store_scale(b, sw, mn, b.add(b.mul(blk, _i64(2)), _i64(h)), b.mul(half, _i64(16)), scales[h], zeros)
        return []

    _loop(b, _i64(0), nsb, 1, [], one)


def _pack_intrinsic(emit_row, emit16):
    @intrinsic
    def pack(typingctx, u8, off, row_bytes, count, wp, sw, mn, at, per_block, rows):
        """rows = 16: the 16 rows from byte `off` of u8 (row_bytes apart) -> half `at` (0, 1) of the group (wp, sw,
        mn); rows = 1: the row at `off` -> lane `at` (0 .. GROUP - 1). count blocks per row (super-blocks for
        the K-quants), per_block scale blocks per block of 32 (see _store_block)."""
        if not (all(isinstance(a, types.Array) and a.layout == "C" for a in (u8, wp, sw, mn))
                and wp.dtype == types.int16 and sw.dtype == types.float32 and mn.dtype == types.float32):
            return None
        sig = types.void(u8, types.int64, types.int64, types.int64, wp, sw, mn, types.int64, types.int64,
                         types.int64)

        def codegen(context, b, signature, args):
            def ptr(k):
                return b.bitcast(context.make_array(signature.args[k])(context, b, args[k]).data, I8.as_pointer())

            w, row_bytes, count, at, per_block = b.gep(ptr(0), [args[1]]), args[2], args[3], args[7], args[8]
            with b.if_else(b.icmp_signed("==", args[9], _i64(16))) as (sixteen, one):
                with sixteen:
                    emit16(b, w, row_bytes, count, ptr(4), ptr(5), ptr(6), at, per_block)
                with one:
                    emit_row(b, w, count, ptr(4), ptr(5), ptr(6), at, per_block)
            return context.get_dummy_value()

        return sig, codegen

    return pack


pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0 = (
    _pack_intrinsic(_emit_pack_legacy(INT_FORMATS[k]), _emit_pack16_legacy(INT_FORMATS[k])) for k in INT_FORMATS)
pack_q4_k, pack_q5_k = (_pack_intrinsic(_emit_pack_k(five), _emit_pack16_k(five)) for five in (False, True))
pack_q6_k = _pack_intrinsic(_emit_pack_q6_k, _emit_pack16_q6_k)


@njit(cache=True, inline="always")
def pack_rows(u8, qtype, off, n, packed, at, per_block, rows):
    """rows = 16: the 16 consecutive rows of `qtype` from byte `off` (n weights each) -> half `at` of the group
    `packed`; rows = 1: the row at `off` -> lane `at`."""
    wp, sw, mn = packed
    rb = row_bytes(qtype, n)
    if qtype == Q4_0:
        pack_q4_0(u8, off, rb, n // 32, wp, sw, mn, at, per_block, rows)
    elif qtype == Q8_0:
        pack_q8_0(u8, off, rb, n // 32, wp, sw, mn, at, per_block, rows)
    elif qtype == Q4_1:
        pack_q4_1(u8, off, rb, n // 32, wp, sw, mn, at, per_block, rows)
    elif qtype == Q5_0:
        pack_q5_0(u8, off, rb, n // 32, wp, sw, mn, at, per_block, rows)
    elif qtype == Q5_1:
        pack_q5_1(u8, off, rb, n // 32, wp, sw, mn, at, per_block, rows)
    elif qtype == Q4_K:
        pack_q4_k(u8, off, rb, n // 256, wp, sw, mn, at, per_block, rows)
    elif qtype == Q5_K:
        pack_q5_k(u8, off, rb, n // 256, wp, sw, mn, at, per_block, rows)
    else:  # Q6_K
        pack_q6_k(u8, off, rb, n // 256, wp, sw, mn, at, per_block, rows)


@njit(cache=True, nogil=True)
def gemm_groups(u8, descs, g0, g1, xb, packed, out):
    """out[:, 32 g0 : 32 g1] of x @ [W1; W2; ...].T, the matrices in descs ((k, 3) rows of byte offset, qtype,
    row count; stacked rows, as for quant.kernels.matvec_multi) all of INT_GEMM_TYPES; xb = prepare(x) with
    x: (T, n), T a multiple of NR; out: (T, rows rounded up to GROUP) float32. Serial and without the GIL: the
    prompt path's pool runs one range of groups per thread, each with its own `packed` buffers."""
    xs, xq, xd, _ = xb
    wp, sw, mn = packed
    n = xq.shape[1]
    total, has_min, per_block = 0, False, 1
    for i in range(descs.shape[0]):
        total += descs[i, 2]
        q = descs[i, 1]
        has_min = has_min or q == Q4_1 or q == Q5_1 or q == Q4_K or q == Q5_K
        if q == Q6_K:
            per_block = 2
    for g in range(g0, g1):
        r0 = g * GROUP
        if r0 + GROUP > total:  # the last group is short: its missing rows count as zeros
            wp[:] = 0
            sw[:] = 0.0
            mn[:] = 0.0
        for half in range(GROUP // 16):
            first = r0 + 16 * half
            if first + 16 <= total and row_offset(descs, first, n)[1] == row_offset(descs, first + 15, n)[1]:
                off, qtype = row_offset(descs, first, n)
                last_off = row_offset(descs, first + 15, n)[0]
                if last_off == off + 15 * row_bytes(qtype, n):  # 16 rows of one matrix: packed at once
                    pack_rows(u8, qtype, off, n, packed, half, per_block, 16)
                    continue
            for slot in range(16 * half, min(16 * half + 16, total - r0)):
                off, qtype = row_offset(descs, r0 + slot, n)
                pack_rows(u8, qtype, off, n, packed, slot, per_block, 1)
        for t0 in range(0, xq.shape[0], NR):
            if per_block == 2:
                if has_min:
                    tile16_min(wp, sw, mn, xq, xd, xs, out, t0, r0)
                else:
                    tile16(wp, sw, mn, xq, xd, xs, out, t0, r0)
            elif has_min:
                tile_min(wp, sw, mn, xq, xd, xs, out, t0, r0)
            else:
                tile(wp, sw, mn, xq, xd, xs, out, t0, r0)


def padded_activation(x: np.ndarray, run=None, parts: int = 1) -> tuple[tuple, int]:
    """prepare(x) for x: (T, n) float32 into buffers of T rounded up to NR rows (the extra rows zero). With
    run(work, parts) (a pool), the rows are prepared in `parts` ranges, by work(0) .. work(parts - 1)."""
    T, n = x.shape
    tp = -(-T // NR) * NR
    xb = activation_blocks(tp, n)
    for a in xb:
        a[T:] = 0
    if run is None or parts == 1:
        prepare(x, tuple(a[:T] for a in xb))
    else:
        bounds = [T * i // parts for i in range(parts + 1)]
        run(lambda i: prepare(x[bounds[i]:bounds[i + 1]], tuple(a[bounds[i]:bounds[i + 1]] for a in xb)), parts)
    return xb, tp


def gemm_raw(data: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """x @ W.T for one tensor's raw data (rows, row_bytes) of a type in INT_GEMM_TYPES and x: (T, n) float32,
    on this thread. For tests; the backend calls gemm_groups from its pool."""
    if int(qtype) not in INT_GEMM_TYPES:
        raise UnsupportedError(f"no integer GEMM for tensor type {qtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = data.shape[0], x.shape[1]
    xb, tp = padded_activation(x)
    groups = -(-rows // GROUP)
    out = np.empty((tp, groups * GROUP), dtype=np.float32)
    descs = np.array([[0, int(qtype), rows]], dtype=np.int64)
    gemm_groups(weight_views(np.ascontiguousarray(data))[0], descs, 0, groups, xb, packed_buffers(n), out)
    return out[: x.shape[0], :rows]


def standalone_module(has_min: bool, sub: int = 16) -> str:
    """LLVM IR text of a module with the micro-kernel as `void tile(i8* wp, i8* sw, i8* mn, i8* xq, i8* xd,
    i8* xs, i8* out, i64 n, i64 rows, i64 t0, i64 r0)`, outside numba: to check what a target compiles it to."""
    module = ir.Module(name="tile")
    p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [p] * 7 + [ir.IntType(64)] * 4), name="tile")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    *ptrs, n, rows, t0, r0 = fn.args
    _emit_tile(b, has_min, sub, *ptrs, b.sdiv(n, _i64(32)), n, rows, t0, r0)
    b.ret_void()
    return str(module)
