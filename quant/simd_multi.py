"""One weight row times several tokens' activations at once (the small-T path: a batched decode step, a short
prompt chunk, a speculative verification pass), as portable LLVM vector IR like quant/simd.py.

quant/simd.py's dot products decode a row's blocks for one token: for T tokens the decoding (nibble masks and
shifts, fifth and sixth bits, the K-quants' 6-bit scales) runs T times while the bytes sit in L1. Here each block
is decoded once into registers and multiplied into the accumulators of up to MAX_WIDTH tokens, so a step of T
tokens costs one decode plus T integer products per block (what is left per token and block: two pair-product
instructions, an add, a conversion, a scale broadcast and an FMA). The numbers are those of the one-token
kernels: the same int16 activation copies (quant.kernels.prepare), the same int32 block sums; only the order of
the float additions differs (results agree to float32 rounding).

Where the host has 512-bit vectors (WIDE), rows go in segments of 16 blocks instead: a segment is decoded once and
transposed so that one vector holds a pair of every block, the activation is laid out to match
(quant.kernels.segment_layout), and a token's 16 block sums then take 16 pair products, one conversion and one FMA
(section "WIDE" below).

Called as `dot_q4_0(w, off, xq, xd, xs, xc, nb, out, r)`: the row whose bytes start at w[off] (nb blocks of 32,
or super-blocks of 256 for the K-quants) times every token of the prepared activation (xq: (T, n) int16;
xd, xs, xc: (T, n // 32) float32), the results into out[t, r] (out: (T, rows) float32).
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from quant.jit import SIMD_WIDTH_VAR
from quant.simd import (
    F32,
    FAST,
    HALF,
    I8,
    I16,
    I32,
    I64,
    INT_FORMATS,
    K_FORMATS,
    V8F,
    V16F,
    _const,
    _emit_int_dot,
    _emit_k_dot,
    _fma,
    _half,
    _hsum,
    _i64,
    _iter_q45_codes,
    _k4_scales_mins,
    _load,
    _loop,
    _pairs,
    _prefetch_span,
    _q4_0,
    _q4_1,
    _q6_bytes,
    _q6_codes,
    _q8_0,
    _splat,
    _vec,
)

BLOCKS = 2  # legacy blocks per loop iteration (their scales gathered as one vector)


def _use_512_bit_vectors() -> bool:
    """The host has 512-bit integer vectors, unless LLMCLI_SIMD_WIDTH=256 (tests of the 256-bit kernels on such a
    host; quant/jit.py keeps their compiled code apart)."""
    import llvmlite.binding as llvm

    return os.environ.get(SIMD_WIDTH_VAR) != "256" and bool(llvm.get_host_cpu_features().get("avx512bw"))


# With 512-bit registers (WIDE), a block's 32 products are one pair-product instruction, and rows are taken in
# segments of 16 blocks whose codes are transposed (below); with 256-bit registers (AVX2, NEON) a block's two
# 8-lane halves are added as integers before its one conversion.
WIDE = _use_512_bit_vectors()
MAX_WIDTH = 8 if WIDE else 4  # tokens per pass over a row; T = 6 on AVX2 is a pass of 4 and one of 2


def _lane(b, v, j, n=8):
    """Lane j of v broadcast to <n x float>."""
    return b.shuffle_vector(v, v, _const(I32, [j] * n))


V_ACC = V16F if WIDE else V8F
_ACC_ZERO = ir.Constant(V_ACC, [0.0] * V_ACC.count)


def _concat(b, lo, hi):
    """Two vectors of n lanes -> one of 2n: lo's lanes, then hi's."""
    n = lo.type.count
    return b.shuffle_vector(lo, hi, _const(I32, range(2 * n)))


def _block_dot(b, lo, hi, xq, xo):
    """The codes of a block of 32 (weights 0-15 in lo, 16-31 in hi, <16 x i16> each) . the 32 int16 at byte xo of
    xq -> its pair sums as floats (<16 x float> when WIDE, else <8 x float>)."""
    if WIDE:
        return b.sitofp(_pairs(b, _concat(b, lo, hi), xq, xo), V16F)
    return b.sitofp(b.add(_pairs(b, lo, xq, xo), _pairs(b, hi, xq, b.add(xo, _i64(32)))), V8F)


def _fma_lane(b, dots, scales, j, acc):
    """acc + dots * lane j of scales."""
    return _fma(b, dots, _lane(b, scales, j, dots.type.count), acc)


def _halves(b, w, o, block_bytes, at, k):
    """The float16 at byte `at` of each of k consecutive blocks from byte o, as <k x float> (gathered in integer
    registers, as quant/simd.py's one-token kernel does)."""
    wide = ir.IntType(16 * k)
    packed = ir.Constant(wide, 0)
    for j in range(k):
        h = b.zext(_load(b, w, b.add(o, _i64(block_bytes * j + at)), I16), wide)
        packed = b.or_(packed, b.shl(h, ir.Constant(wide, 16 * j)))
    return b.fpext(b.bitcast(packed, _vec(HALF, k)), _vec(F32, k))


def _emit_legacy(b, fmt, TT, w, xq, xd, xs, xc, nb, start=None):
    """Blocks of 32 (Q4_0 ... Q8_0) for TT tokens (xq, xd, xs, xc: lists of each token's row pointers) -> TT floats.
    Per BLOCKS blocks: their scales d (and minimums m) once; per token the scales d xd and the minimum terms m xs
    as <BLOCKS x float>; per block its codes once (offsets taken out: signed), then per token two pair-product
    vectors, one conversion and one FMA into that token's accumulator."""
    block, block_bytes, offset, has_min = fmt

    def group(i, k, vals):
        accs, corrs = list(vals[:TT]), list(vals[TT:])
        o = b.mul(i, _i64(block_bytes))
        vf = _vec(F32, k)
        d = _halves(b, w, o, block_bytes, 0, k)
        m = _halves(b, w, o, block_bytes, 2, k) if has_min else None
        at = b.mul(i, _i64(4))
        scales = []
        for t in range(TT):
            scales.append(b.fmul(d, _load(b, xd[t], at, vf), flags=FAST))
            if has_min:
                corrs[t] = _fma(b, m, _load(b, xs[t], at, vf), corrs[t])
        for j in range(k):
            lo, hi = block(b, w, b.add(o, _i64(block_bytes * j)))
            if offset:  # signed codes, once for all tokens (not an offset term per token: a tenth of Q4_0's work)
                lo, hi = (b.sub(c, _const(I16, [offset] * 16)) for c in (lo, hi))
            xo = b.mul(b.add(i, _i64(j)), _i64(64))
            for t in range(TT):
                accs[t] = _fma_lane(b, _block_dot(b, lo, hi, xq[t], xo), scales[t], j, accs[t])
        return accs + corrs

    def unrolled(i, vals):
        _prefetch_span(b, w, b.mul(i, _i64(block_bytes)), BLOCKS * block_bytes)
        return group(i, BLOCKS, vals)

    zk = ir.Constant(_vec(F32, BLOCKS), [0.0] * BLOCKS)
    vals, i = _loop(b, start or _i64(0), nb, BLOCKS, [_ACC_ZERO] * TT + [zk] * TT, unrolled)
    one = [b.insert_element(ir.Constant(_vec(F32, 1), [0.0]), _hsum(b, c), ir.Constant(I32, 0)) for c in vals[TT:]]
    vals, _ = _loop(b, i, nb, 1, vals[:TT] + one, lambda j, v: group(j, 1, v))
    out = []
    for t in range(TT):
        corr = b.extract_element(vals[TT + t], ir.Constant(I32, 0))
        out.append(b.fadd(_hsum(b, vals[t]), corr, flags=FAST))
    return out


def _emit_q45_k(b, five, TT, w, xq, xd, xs, nsb, start=None):
    """Q4_K / Q5_K super-blocks for TT tokens. Per super-block: the 6-bit scales and minimums once (d sc, -dmin m
    as <8 x float>); per token its scales d sc xd and the minimum term -dmin m xs into its accumulator; per
    sub-block of 32 its codes once, then per token two pair-product vectors, a conversion and an FMA."""
    block_bytes = 176 if five else 144

    def body(i, vals):
        accs, mins = list(vals[:TT]), list(vals[TT:])
        o = b.mul(i, _i64(block_bytes))
        _prefetch_span(b, w, o, block_bytes)
        sc, m = _k4_scales_mins(b, w, o)
        dsc = b.fmul(sc, _splat(b, _half(b, w, o), 8), flags=FAST)
        ndm = b.fneg(b.fmul(m, _splat(b, _half(b, w, b.add(o, _i64(2))), 8), flags=FAST))
        xb = b.mul(i, _i64(8))
        at = b.mul(xb, _i64(4))
        scales = []
        for t in range(TT):
            scales.append(b.fmul(dsc, _load(b, xd[t], at, V8F), flags=FAST))
            if WIDE:  # 8 lanes beside the 16 of accs
                mins[t] = _fma(b, ndm, _load(b, xs[t], at, V8F), mins[t])
            else:  # into accs, as few registers as AVX2 has
                accs[t] = _fma(b, ndm, _load(b, xs[t], at, V8F), accs[t])
        for j, (c0, c1) in _iter_q45_codes(b, w, o, five):
            xo = b.mul(b.add(xb, _i64(j)), _i64(64))
            for t in range(TT):
                accs[t] = _fma_lane(b, _block_dot(b, c0, c1, xq[t], xo), scales[t], j, accs[t])
        return accs + mins

    zero8 = ir.Constant(V8F, [0.0] * 8)
    vals, _ = _loop(b, start or _i64(0), nsb, 1, [_ACC_ZERO] * TT + ([zero8] * TT if WIDE else []), body)
    if not WIDE:
        return [_hsum(b, a) for a in vals]
    return [b.fadd(_hsum(b, vals[t]), _hsum(b, vals[TT + t]), flags=FAST) for t in range(TT)]


# lanes of a sub-block's two pair-product vectors (16 weights each, scales m = 2j and 2j + 1) added in pairs
# within 128-bit halves (one vphaddd on AVX2): [a01 a23 b01 b23 a45 a67 b45 b67]
_HADD_EVEN, _HADD_ODD = _const(I32, [0, 2, 8, 10, 4, 6, 12, 14]), _const(I32, [1, 3, 9, 11, 5, 7, 13, 15])


def _emit_q6_k(b, TT, w, xq, xd, nsb, start=None):
    """Q6_K super-blocks for TT tokens (a scale per 16 weights). Per sub-block of 32: its codes once, and the
    scales of its two halves as one vector laid out as the pairwise sums below; per token two pair-product
    vectors added pairwise into one (4 lanes per half), a conversion, a multiply by its xd, an FMA."""
    def body(i, accs):
        accs = list(accs)
        o = b.mul(i, _i64(210))
        _prefetch_span(b, w, o, 210)
        dsc = b.fmul(b.sitofp(_load(b, w, b.add(o, _i64(192)), _vec(I8, 16)), V16F),
                     _splat(b, _half(b, w, b.add(o, _i64(208))), 16), flags=FAST)
        xb = b.mul(i, _i64(8))
        codes = {}
        for j, half, q, _ in _q6_codes(b, w, o):
            codes[j, half] = q
            if half == 0:
                continue
            m0, m1 = 2 * j, 2 * j + 1
            pattern = b.shuffle_vector(dsc, dsc, _const(I32, [m0, m0, m1, m1, m0, m0, m1, m1]))
            xo = b.mul(b.add(xb, _i64(j)), _i64(64))
            for t in range(TT):
                d0 = _pairs(b, codes[j, 0], xq[t], xo)
                d1 = _pairs(b, q, xq[t], b.add(xo, _i64(32)))
                dot = b.add(b.shuffle_vector(d0, d1, _HADD_EVEN), b.shuffle_vector(d0, d1, _HADD_ODD))
                xdt = _splat(b, _load(b, xd[t], b.mul(b.add(xb, _i64(j)), _i64(4)), F32), 8)
                accs[t] = _fma(b, b.sitofp(dot, V8F), b.fmul(pattern, xdt, flags=FAST), accs[t])
        return accs

    accs, _ = _loop(b, start or _i64(0), nsb, 1, [ir.Constant(V8F, [0.0] * 8)] * TT, body)
    return [_hsum(b, a) for a in accs]


# --- WIDE: segments of SEG blocks, the activation transposed --------------------------------------------------------
# Above, every block costs each token a pair product, a conversion, a scale broadcast and an FMA. Here a segment of
# 16 blocks (512 weights) is decoded once and its codes transposed as 32-bit pairs, so that vector p holds pair p
# of all 16 blocks, one per lane; the activation is laid out the same way (quant.kernels.segment_layout). A token
# then sums each block in its own lane with 16 pair products, and takes one conversion and one FMA with the 16
# blocks' scales for the segment, for a transpose of 64 shuffles that all the tokens share. Q4_0 for 4 tokens on
# Zen 5: 285 instructions per segment, against 616 for its 16 blocks above; Q4_0 and Q4_1 skip the transpose (their
# pairs are gathered from the packed bytes: 213). Blocks past the last whole segment go through the kernels above.

SEG = 16  # blocks of 32 per segment: one 32-bit lane each in a 512-bit vector
CHAINS = {1: 4, 2: 4, 3: 4, 4: 4}  # integer sums per token and segment, by tokens per pass (else 2)


def _transpose16(b, rows):
    """16 vectors <16 x i32> -> their transpose (out[p] lane i = rows[i] lane p): four rounds of two-source
    shuffles, each exchanging one bit of the row index with that bit of the lane index."""
    rows = list(rows)
    for j in range(4):
        k = 1 << j
        low = _const(I32, [lane if not lane & k else 16 + lane - k for lane in range(16)])
        high = _const(I32, [lane + k if not lane & k else 16 + lane for lane in range(16)])
        for r in range(16):
            if not r & k:
                a, c = rows[r], rows[r | k]
                rows[r], rows[r | k] = b.shuffle_vector(a, c, low), b.shuffle_vector(a, c, high)
    return rows


def _transposed(b, codes):
    """16 blocks' codes (<32 x i16> each) -> 16 vectors, vector p holding pair p of every block."""
    v16i = _vec(I32, 16)
    return [b.bitcast(c, _vec(I16, 32)) for c in _transpose16(b, [b.bitcast(c, v16i) for c in codes])]


def _gather_bytes(b, srcs, picks):
    """<64 x i8> whose byte k is byte picks[k] of the concatenated srcs (<64 x i8> each), or 0 where picks[k] is
    None: a two-source permute per pair of sources, each merged in under a mask (one vpermt2b each, masked, on
    x86 with VBMI: Zen 4 and 5, Sapphire Rapids)."""
    out = ir.Constant(_vec(I8, 64), [0] * 64)
    for g in range(0, len(srcs), 2):
        pair = srcs[g:g + 2]
        mine = [p is not None and 64 * g <= p < 64 * (g + len(pair)) for p in picks]
        if not any(mine):
            continue
        idx = [p - 64 * g if m else 0 for p, m in zip(picks, mine, strict=True)]
        perm = b.shuffle_vector(pair[0], pair[-1], _const(I32, idx))
        out = b.select(_const(ir.IntType(1), mine), perm, out)
    return out


def _load64(b, w, o, nbytes=64):
    """nbytes (32 or 64) at w + o as <64 x i8> (32: twice over; nothing is read past them)."""
    v = _load(b, w, o, _vec(I8, nbytes))
    return v if nbytes == 64 else _concat(b, v, v)


def _segment_bytes(b, w, o, nbytes):
    """The nbytes (a multiple of 32) at w + o as <64 x i8> sources for _gather_bytes."""
    return [_load64(b, w, b.add(o, _i64(k)), min(64, nbytes - k)) for k in range(0, nbytes, 64)]


def _words_of(b, srcs, picks):
    """<32 x i16> zero-extended from the bytes picks (32 of them) of srcs: the bytes land in the low halves."""
    return b.bitcast(_gather_bytes(b, srcs, [q for p in picks for q in (p, None)]), _vec(I16, 32))


def _emit_segments(b, TT, decode, xq, xd, xs, nseg):
    """Segments 0 .. nseg - 1 for TT tokens (xq in segment layout) -> TT <16 x float> accumulators. decode(s) ->
    (16 vectors <32 x i16>, vector p holding pair p of every block (a block per 32-bit lane), the blocks' scales
    as <16 x float> or, where each half of a block has its own (Q6_K), a pair of them (first 16 weights, last 16),
    their minimums <16 x float> to multiply the activation's block sums xs, or None)."""
    v16i = _vec(I32, 16)
    zero = ir.Constant(v16i, [0] * 16)

    def body(s, accs):
        accs = list(accs)
        cols, scales, mins = decode(s)
        xo, at = b.mul(s, _i64(SEG * 64)), b.mul(s, _i64(SEG * 4))
        split = isinstance(scales, tuple)
        # each token's 16 products in `chains` integer sums, each converted and scaled on its own: LLVM would
        # otherwise add them all in one chain, one product's latency after the other (2 chains took 8 tokens
        # from 80 to 130 G multiply-adds/s). Q6_K scales pairs 0-7 and 8-15 apart.
        chains = CHAINS.get(TT, 2)
        sums = [[zero] * chains for _ in range(TT)]
        for p in range(16):
            for t in range(TT):
                c = p * chains // 16
                sums[t][c] = b.add(sums[t][c], _pairs(b, cols[p], xq[t], b.add(xo, _i64(64 * p))))
        for t in range(TT):
            x = _load(b, xd[t], at, V16F)
            for c in range(chains):
                sc = scales[c * 2 // chains] if split else scales
                accs[t] = _fma(b, b.sitofp(sums[t][c], V16F), b.fmul(sc, x, flags=FAST), accs[t])
            if mins is not None:
                accs[t] = _fma(b, mins, _load(b, xs[t], at, V16F), accs[t])
        return accs

    accs, _ = _loop(b, _i64(0), nseg, 1, [_ACC_ZERO] * TT, body)
    return accs


# block decoder -> the block's 32 codes as one <32 x i16>, where that saves joining two halves (Q4_0's nibbles
# made in one vector took as many instructions as the join)
_BLOCK32 = {_q8_0: lambda b, w, o: b.sext(_load(b, w, b.add(o, _i64(2)), _vec(I8, 32)), _vec(I16, 32))}


def _nibble_segment(b, fmt, w):
    """Q4_0 / Q4_1 segments straight into pair vectors: the segment's bytes in whole vectors, and per pair of
    packed bytes (weights 2u, 2u + 1 in the low nibbles, 2u + 16, 2u + 17 in the high) one gather of that pair
    from every block, zero-extended to words; a mask and a shift then give pairs u and u + 8. About 60
    instructions per segment where decoding each block and transposing took ~220."""
    _, block_bytes, offset, has_min = fmt
    qs = 4 if has_min else 2

    def halves(srcs, at):
        words = _gather_bytes(b, srcs, [block_bytes * (k // 2) + at + k % 2 if k < 32 else None for k in range(64)])
        h = b.shuffle_vector(b.bitcast(words, _vec(I16, 32)), b.bitcast(words, _vec(I16, 32)), _const(I32, range(16)))
        return b.fpext(b.bitcast(h, _vec(HALF, 16)), V16F)

    def decode(s):
        o = b.mul(s, _i64(SEG * block_bytes))
        _prefetch_span(b, w, o, SEG * block_bytes)
        srcs = _segment_bytes(b, w, o, SEG * block_bytes)
        low, high = [], []
        for u in range(8):
            words = _words_of(b, srcs, [block_bytes * (k // 2) + qs + 2 * u + k % 2 for k in range(32)])
            low.append(b.and_(words, _const(I16, [15] * 32)))
            high.append(b.lshr(words, _const(I16, [4] * 32)))
        cols = low + high
        if offset:
            cols = [b.sub(c, _const(I16, [offset] * 32)) for c in cols]
        return cols, halves(srcs, 0), halves(srcs, 2) if has_min else None

    return decode


def _legacy_segment(b, fmt, w):
    block, block_bytes, offset, has_min = fmt
    if block in (_q4_0, _q4_1):
        return _nibble_segment(b, fmt, w)

    def codes_of(o):
        if block in _BLOCK32:
            return _BLOCK32[block](b, w, o)
        return _concat(b, *block(b, w, o))

    def decode(s):
        o = b.mul(s, _i64(SEG * block_bytes))
        _prefetch_span(b, w, o, SEG * block_bytes)
        codes = []
        for i in range(SEG):
            c = codes_of(b.add(o, _i64(block_bytes * i)))
            codes.append(b.sub(c, _const(I16, [offset] * 32)) if offset else c)
        d = _halves(b, w, o, block_bytes, 0, SEG)
        return _transposed(b, codes), d, _halves(b, w, o, block_bytes, 2, SEG) if has_min else None

    return decode


def _q45_k_segment(b, five, w):
    block_bytes = 176 if five else 144

    def decode(s):
        codes, dsc, ndm = [], [], []
        for k in range(2):
            o = b.mul(b.add(b.mul(s, _i64(2)), _i64(k)), _i64(block_bytes))
            _prefetch_span(b, w, o, block_bytes)
            sc, m = _k4_scales_mins(b, w, o)
            dsc.append(b.fmul(sc, _splat(b, _half(b, w, o), 8), flags=FAST))
            ndm.append(b.fneg(b.fmul(m, _splat(b, _half(b, w, b.add(o, _i64(2))), 8), flags=FAST)))
            if five:
                codes += [_concat(b, c0, c1) for _, (c0, c1) in _iter_q45_codes(b, w, o, five)]
                continue
            for g in range(4):  # sub-blocks 2g and 2g + 1: the low and high nibbles of 32 bytes
                words = b.zext(_load(b, w, b.add(o, _i64(16 + 32 * g)), _vec(I8, 32)), _vec(I16, 32))
                codes += [b.and_(words, _const(I16, [15] * 32)), b.lshr(words, _const(I16, [4] * 32))]
        return _transposed(b, codes), _concat(b, *dsc), _concat(b, *ndm)

    return decode


def _q6_k_segment(b, w):
    def decode(s):
        codes, firsts, seconds = [], [], []
        for k in range(2):
            o = b.mul(b.add(b.mul(s, _i64(2)), _i64(k)), _i64(210))
            _prefetch_span(b, w, o, 210)
            dsc = b.fmul(b.sitofp(_load(b, w, b.add(o, _i64(192)), _vec(I8, 16)), V16F),
                         _splat(b, _half(b, w, b.add(o, _i64(208))), 16), flags=FAST)
            firsts.append(b.shuffle_vector(dsc, dsc, _const(I32, range(0, 16, 2))))
            seconds.append(b.shuffle_vector(dsc, dsc, _const(I32, range(1, 16, 2))))
            codes += [b.sext(q, _vec(I16, 32)) for q in _q6_bytes(b, w, o)]
        return _transposed(b, codes), (_concat(b, *firsts), _concat(b, *seconds)), None

    return decode


def _with_segments(b, TT, decode, tail, xq, xd, xs, count, per_segment):
    """TT floats: the segments of `count` blocks (or super-blocks, per_segment of them to a segment) by
    _emit_segments, the rest by tail(start) -> TT floats."""
    nseg = b.sdiv(count, _i64(per_segment))
    accs = _emit_segments(b, TT, decode, xq, xd, xs, nseg)
    rest = tail(b.mul(nseg, _i64(per_segment)))
    return [b.fadd(_hsum(b, a), r, flags=FAST) for a, r in zip(accs, rest, strict=True)]


def _multi_intrinsic(emit, emit_one):
    """An intrinsic kernel(w, off, xq, xd, xs, xc, count, out, r) -> None for every token of xq (T = xq.shape[0]):
    out[t, r] = row . token t. emit(builder, TT, weight pointer, xq, xd, xs, xc as lists of TT row pointers, count)
    -> TT float32 values; emit_one(builder, weight pointer, xq, xd, xs, xc pointers, count) -> one (the one-token
    kernel of quant/simd.py: a lone token keeps its unrolled accumulators). Tokens go MAX_WIDTH at a time, the
    rest in one call of its width."""

    @intrinsic
    def kernel(typingctx, w, off, xq, xd, xs, xc, count, out, r):
        arrays = (w, xq, xd, xs, xc, out)
        if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays) and xq.dtype == types.int16
                and xq.ndim == 2 and all(a.ndim == 2 and a.dtype == types.float32 for a in (xd, xs, xc, out))):
            return None
        sig = types.void(w, types.int64, xq, xd, xs, xc, types.int64, out, types.int64)

        def codegen(context, b, signature, args):
            arr = {k: context.make_array(signature.args[k])(context, b, args[k]) for k in (0, 2, 3, 4, 5, 7)}
            ptr = {k: b.bitcast(a.data, I8.as_pointer()) for k, a in arr.items()}
            T = b.extract_value(arr[2].shape, 0)
            n = b.extract_value(arr[2].shape, 1)
            xstride = b.mul(b.extract_value(arr[3].shape, 1), _i64(4))
            rows = b.extract_value(arr[7].shape, 1)
            w = b.gep(ptr[0], [args[1]])

            def tokens(t0, tt):
                """Tokens t0 .. t0 + tt of xq into out."""
                def at(k, t, stride):
                    return b.gep(ptr[k], [b.mul(b.add(t0, _i64(t)), stride)])

                def of(t):
                    return at(2, t, b.mul(n, _i64(2))), at(3, t, xstride), at(4, t, xstride), at(5, t, xstride)

                if tt == 1 and not WIDE:
                    vals = [emit_one(b, w, *of(0), args[6])]
                else:
                    xq, xd, xs, xc = zip(*(of(t) for t in range(tt)), strict=True)
                    vals = emit(b, tt, w, list(xq), list(xd), list(xs), list(xc), args[6])
                for t, v in enumerate(vals):
                    o = b.mul(b.add(b.mul(b.add(t0, _i64(t)), rows), args[8]), _i64(4))
                    b.store(v, b.bitcast(b.gep(ptr[7], [o]), F32.as_pointer()))

            _, t0 = _loop(b, _i64(0), T, MAX_WIDTH, [], lambda i, _: (tokens(i, MAX_WIDTH), [])[1])
            rest = b.sub(T, t0)
            for tt in range(1, MAX_WIDTH):
                with b.if_then(b.icmp_signed("==", rest, _i64(tt))):
                    tokens(t0, tt)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _emit_legacy_any(b, fmt, TT, w, xq, xd, xs, xc, nb):
    if not WIDE:
        return _emit_legacy(b, fmt, TT, w, xq, xd, xs, xc, nb)
    return _with_segments(b, TT, _legacy_segment(b, fmt, w),
                          lambda start: _emit_legacy(b, fmt, TT, w, xq, xd, xs, xc, nb, start), xq, xd, xs, nb, SEG)


def _emit_q45_k_any(b, five, TT, w, xq, xd, xs, nsb):
    if not WIDE:
        return _emit_q45_k(b, five, TT, w, xq, xd, xs, nsb)
    return _with_segments(b, TT, _q45_k_segment(b, five, w),
                          lambda start: _emit_q45_k(b, five, TT, w, xq, xd, xs, nsb, start), xq, xd, xs, nsb, 2)


def _emit_q6_k_any(b, TT, w, xq, xd, nsb):
    if not WIDE:
        return _emit_q6_k(b, TT, w, xq, xd, nsb)
    return _with_segments(b, TT, _q6_k_segment(b, w), lambda start: _emit_q6_k(b, TT, w, xq, xd, nsb, start),
                          xq, xd, None, nsb, 2)


def _legacy(name):
    fmt = INT_FORMATS[name]
    return _multi_intrinsic(lambda b, tt, w, xq, xd, xs, xc, nb: _emit_legacy_any(b, fmt, tt, w, xq, xd, xs, xc, nb),
                            lambda b, w, xq, xd, xs, xc, nb: _emit_int_dot(b, fmt, w, xq, xd, xs, xc, nb))


def _k_quant(name, emit):
    return _multi_intrinsic(emit, lambda b, w, xq, xd, xs, xc, nsb: _emit_k_dot(b, *K_FORMATS[name], w, xq, xd, xs,
                                                                                  nsb))


# Every token of a prepared activation times one row: kernel(u8, off, xq, xd, xs, xc, nb, out, r); with WIDE, xq
# in segment layout (quant.kernels.segment_layout)
dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0 = (_legacy(k) for k in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"))
dot_q4_k = _k_quant("q4_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q45_k_any(b, False, tt, w, xq, xd, xs, nsb))
dot_q5_k = _k_quant("q5_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q45_k_any(b, True, tt, w, xq, xd, xs, nsb))
dot_q6_k = _k_quant("q6_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q6_k_any(b, tt, w, xq, xd, nsb))


def standalone_module(name: str, width: int = MAX_WIDTH) -> str:
    """LLVM IR text of a module with one function `void dots(i8* w, i8* xq, i8* xd, i8* xs, i8* xc, i64 count,
    i64 n, float* out)`: the `width`-token kernel of format `name` ("q4_0", "q4_k", "q6_k", ...) outside numba,
    token t's activation at xq + 2 n t (and its per-block arrays at + 4 (n / 32) t), its result in out[t]: to
    check what a target compiles it to."""
    module = ir.Module(name=f"{name}x{width}")
    p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [p, p, p, p, p, I64, I64, F32.as_pointer()]),
                     name="dots")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, xq, xd, xs, xc, count, n, out = fn.args
    per_block = b.mul(b.sdiv(n, _i64(32)), _i64(4))
    rows = [[b.gep(base, [b.mul(_i64(t), stride)]) for t in range(width)]
            for base, stride in ((xq, b.mul(n, _i64(2))), (xd, per_block), (xs, per_block), (xc, per_block))]
    if name in INT_FORMATS:
        vals = _emit_legacy_any(b, INT_FORMATS[name], width, w, *rows, count)
    elif name == "q6_k":
        vals = _emit_q6_k_any(b, width, w, rows[0], rows[1], count)
    else:
        vals = _emit_q45_k_any(b, name == "q5_k", width, w, rows[0], rows[1], rows[2], count)
    for t, v in enumerate(vals):
        b.store(v, b.gep(out, [_i64(t)]))
    b.ret_void()
    return str(module)
