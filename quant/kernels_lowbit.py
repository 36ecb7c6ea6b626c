"""Kernels for the 2- and 3-bit K-quants (Q2_K, Q3_K): a row . the int16 activation copy, and row dequantization,
written as portable LLVM vector IR with quant/simd.py's building blocks (the Q6_K kernel's shape: 16 sub-blocks
of 16, their dot products summed by simd._lane_sums, one FMA with a vector of scales per 8). quant/kernels.py
dispatches to them (dot_row, dequant_row, row_bytes); matvec_multi reaches them through dot_row, and the prompt
path through dequant_rows (BLAS on dequantized tiles: quant/gemm.py packs only the other formats).

Both formats hold 256 weights in 16 sub-blocks of 16, each with its own scale (ggml's block_q2_K, block_q3_K):

  Q2_K  84 B: scales[16] (low nibble: scale, high nibble: minimum) | qs[64] | d f16 | dmin f16
        w = d (scales[k] & 15) q - dmin (scales[k] >> 4),  q in 0..3
  Q3_K 110 B: hmask[32] | qs[64] | scales[12] (16 six-bit values, stored minus 32) | d f16
        w = d (scale[k] - 32) (q - 4 h),  q in 0..3 and h = 1 when weight's bit of hmask is clear

Weight 128 h + 32 j + 16 p + l (h < 2, j < 4, p < 2, l < 16) is sub-block k = 8 h + 2 j + p; its 2 bits are bits
2 j, 2 j + 1 of qs[32 h + 16 p + l], and in Q3_K its high bit is bit 4 h + j of hmask[16 p + l]. Sub-block k lies
in the activation's block of 32 number k // 2, whose int16 copy xq and scale xd come from quant.kernels.prepare:
sum_j w_j x_j ~= xd (d sc sum_j q_j xq_j - dmin m sum_j xq_j), the same rounding as every other integer kernel
(Q2_K's minimums per 16 weights use the int16 copy's sums over 16, made beside the codes' products).
"""

from __future__ import annotations

from llvmlite import ir

from quant.simd import (
    FAST,
    I8,
    I16,
    I32,
    LANE_SUMS_ORDER,
    V8F,
    V16F,
    _const,
    _dequant_intrinsic,
    _fma,
    _half,
    _i64,
    _lane_sums,
    _load,
    _loop,
    _make_dot_k,
    _pairs,
    _splat,
    _vec,
)

Q2_K, Q3_K = 10, 11  # GGML type codes
LOWBIT_TYPES = (Q2_K, Q3_K)
Q2_K_BYTES, Q3_K_BYTES = 84, 110


def _codes(b, w, o, q_at, hmask_at):
    """The 2-bit codes of a super-block (qs at o + q_at), minus 4 where Q3_K's high bit (hmask at o + hmask_at)
    is clear: [<16 x i16>] in the order of the sub-blocks k = 8 h + 2 j + p. 32 bytes of qs make the codes of 4
    pairs of sub-blocks as bytes, one shift and mask each."""
    v32 = _vec(I8, 32)

    def c(v):
        return _const(I8, [v] * 32)

    hm = None if hmask_at is None else _load(b, w, b.add(o, _i64(hmask_at)), v32)
    out = []
    for h in range(2):
        qs = _load(b, w, b.add(o, _i64(q_at + 32 * h)), v32)
        for j in range(4):
            q = b.and_(b.lshr(qs, c(2 * j)) if j else qs, c(3))
            if hm is not None:  # q - 4 (1 - bit) = (q | bit << 2) - 4
                bit = b.and_(b.lshr(hm, c(4 * h + j)) if 4 * h + j else hm, c(1))
                q = b.sub(b.or_(q, b.shl(bit, c(2))), c(4))
            for p in range(2):
                out.append(b.sext(b.shuffle_vector(q, q, _const(I32, range(16 * p, 16 * p + 16))), _vec(I16, 16)))
    return out


def _q2_scales(b, w, o):
    """Q2_K's 16 scales and minimums (low and high nibbles of the bytes at o) as two <16 x float>."""
    s = _load(b, w, o, _vec(I8, 16))
    return (b.uitofp(b.and_(s, _const(I8, [15] * 16)), V16F), b.uitofp(b.lshr(s, _const(I8, [4] * 16)), V16F))


def _q3_scales(b, w, o):
    """Q3_K's 16 six-bit scales minus 32 (12 bytes s at o) as <16 x float>: scale k has its low 4 bits in s[k % 8]
    (low nibble for k < 8), its top 2 in s[8 + k % 4] >> 2 (k // 4); unpacked four at a time in 32-bit words."""
    def word(at):
        return _load(b, w, b.add(o, _i64(at)), I32)

    def c(v):
        return ir.Constant(I32, v)

    s0, s1, s2 = word(0), word(4), word(8)
    low4, top2 = c(0x0F0F0F0F), c(0x03030303)

    def tops(shift):
        return b.shl(b.and_(b.lshr(s2, c(shift)) if shift else s2, top2), c(4))

    words = (b.or_(b.and_(s0, low4), tops(0)), b.or_(b.and_(s1, low4), tops(2)),
             b.or_(b.and_(b.lshr(s0, c(4)), low4), tops(4)), b.or_(b.and_(b.lshr(s1, c(4)), low4), tops(6)))
    v = ir.Constant(_vec(I32, 4), ir.Undefined)
    for k, word_k in enumerate(words):
        v = b.insert_element(v, word_k, c(k))
    return b.fsub(b.uitofp(b.bitcast(v, _vec(I8, 16)), V16F), _splat(b, ir.Constant(ir.FloatType(), 32.0)),
                  flags=FAST)


def _dots(b, codes, xq, xb):
    """Sub-block k's codes . xq, products summed in pairs: [<8 x i32>] for k = 0..15 (weights 16 k .. 16 k + 15
    of the super-block whose activation starts at block xb)."""
    base = b.mul(xb, _i64(64))
    return [_pairs(b, q, xq, b.add(base, _i64(32 * k))) for k, q in enumerate(codes)]


def _accumulate(b, dots, scale, acc0, acc1):
    """acc_g += the lane sums of dots[8 g : 8 g + 8] times their lanes of scale (<16 x float>, by sub-block)."""
    accs = [acc0, acc1]
    for g in range(2):
        lanes = b.shuffle_vector(scale, scale, _const(I32, [8 * g + m for m in LANE_SUMS_ORDER]))
        accs[g] = _fma(b, b.sitofp(_lane_sums(b, dots[8 * g:8 * g + 8]), V8F), lanes, accs[g])
    return accs


def _xd16(b, xd, xb):
    """The activation's scale of each sub-block of 16 (xd per block of 32) as <16 x float>."""
    xd8 = _load(b, xd, b.mul(xb, _i64(4)), V8F)
    return b.shuffle_vector(xd8, xd8, _const(I32, [k // 2 for k in range(16)]))


def _q2_k(b, w, o, xq, xd, xs, xb, accs, corr):
    """One Q2_K super-block: accs += d sc_k xd (q . xq)_k over the 16 sub-blocks k; the minimums of the two halves
    of a block of 32 from the sum of its first half S and its sum xs: corr += dmin ((m_2b - m_2b+1) xd S + m_2b+1 xs)
    (half the sums of xq that summing each sub-block would take)."""
    accs = list(accs)
    sc, m = _q2_scales(b, w, o)
    scale = b.fmul(b.fmul(sc, _splat(b, _half(b, w, b.add(o, _i64(80))), 16), flags=FAST), _xd16(b, xd, xb),
                   flags=FAST)
    accs[0], accs[1] = _accumulate(b, _dots(b, _codes(b, w, o, 16, None), xq, xb), scale, accs[0], accs[1])
    dm = b.fmul(m, _splat(b, _half(b, w, b.add(o, _i64(82))), 16), flags=FAST)
    even = b.shuffle_vector(dm, dm, _const(I32, range(0, 16, 2)))
    odd = b.shuffle_vector(dm, dm, _const(I32, range(1, 16, 2)))
    xd8, xs8 = _load(b, xd, b.mul(xb, _i64(4)), V8F), _load(b, xs, b.mul(xb, _i64(4)), V8F)
    corr = _fma(b, odd, xs8, corr)
    first = b.fmul(b.fsub(even, odd, flags=FAST), xd8, flags=FAST)  # by block b, then in the lane sums' order
    ones = _const(I16, [1] * 16)
    halves = _lane_sums(b, [_pairs(b, ones, xq, b.add(b.mul(xb, _i64(64)), _i64(64 * k))) for k in range(8)])
    return accs, _fma(b, b.sitofp(halves, V8F), b.shuffle_vector(first, first, _const(I32, LANE_SUMS_ORDER)), corr)


def _q3_k(b, w, o, xq, xd, xs, xb, accs, corr):
    """One Q3_K super-block: accs += d (sc_k - 32) xd (q . xq)_k, the codes q signed (-4..3)."""
    accs = list(accs)
    scale = b.fmul(b.fmul(_q3_scales(b, w, b.add(o, _i64(96))), _splat(b, _half(b, w, b.add(o, _i64(108))), 16),
                          flags=FAST), _xd16(b, xd, xb), flags=FAST)
    accs[0], accs[1] = _accumulate(b, _dots(b, _codes(b, w, o, 32, 0), xq, xb), scale, accs[0], accs[1])
    return accs, corr


def _emit_dequant(b, q3, w, out, nsb):
    """nsb super-blocks at w -> float32 at out, with ggml's roundings (no fused multiply-add): Q2_K
    (d sc) q - (dmin m), Q3_K (d (sc - 32)) q."""
    size = Q3_K_BYTES if q3 else Q2_K_BYTES

    def one(i, _):
        o = b.mul(i, _i64(size))
        if q3:
            dl, ml = b.fmul(_splat(b, _half(b, w, b.add(o, _i64(108))), 16), _q3_scales(b, w, b.add(o, _i64(96)))), None
            codes = _codes(b, w, o, 32, 0)
        else:
            sc, m = _q2_scales(b, w, o)
            dl = b.fmul(_splat(b, _half(b, w, b.add(o, _i64(80))), 16), sc)
            ml = b.fmul(_splat(b, _half(b, w, b.add(o, _i64(82))), 16), m)
            codes = _codes(b, w, o, 16, None)
        for k, q in enumerate(codes):
            v = b.fmul(b.shuffle_vector(dl, dl, _const(I32, [k] * 16)), b.sitofp(q, V16F))
            if ml is not None:
                v = b.fsub(v, b.shuffle_vector(ml, ml, _const(I32, [k] * 16)))
            st = b.store(v, b.bitcast(b.gep(out, [b.add(b.mul(i, _i64(1024)), _i64(64 * k))]), V16F.as_pointer()))
            st.align = 4
        return []

    _loop(b, _i64(0), nsb, 1, [], one)


# dot(u8, off, xq, xd, xs, xc, nsb) and dequant(u8, off, nsb, out, ooff), as quant/simd.py's K-quant kernels
dot_q2_k, dot_q3_k = _make_dot_k(_q2_k, Q2_K_BYTES), _make_dot_k(_q3_k, Q3_K_BYTES)
dequant_q2_k, dequant_q3_k = (_dequant_intrinsic(lambda b, w, out, nsb, q3=q3: _emit_dequant(b, q3, w, out, nsb))
                              for q3 in (False, True))
