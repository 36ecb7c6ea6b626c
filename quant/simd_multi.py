"""One weight row times several tokens' activations at once (the small-T path: a batched decode step, a short
prompt chunk, a speculative verification pass), as portable LLVM vector IR like quant/simd.py.

quant/simd.py's dot products decode a row's blocks for one token: for T tokens the decoding (nibble masks and
shifts, fifth and sixth bits, the K-quants' 6-bit scales) runs T times while the bytes sit in L1. Here each block
is decoded once into registers and multiplied into the accumulators of up to MAX_WIDTH tokens, so a step of T
tokens costs one decode plus T integer products per block (what is left per token and block: two pair-product
instructions, an add, a conversion, a scale broadcast and an FMA). The numbers are those of the one-token
kernels: the same int16 activation copies (quant.kernels.prepare), the same int32 block sums; only the order of
the float additions differs (results agree to float32 rounding).

Called as `dot_q4_0(w, off, xq, xd, xs, xc, nb, out, r)`: the row whose bytes start at w[off] (nb blocks of 32,
or super-blocks of 256 for the K-quants) times every token of the prepared activation (xq: (T, n) int16;
xd, xs, xc: (T, n // 32) float32), the results into out[t, r] (out: (T, rows) float32).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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
    _q6_codes,
    _splat,
    _vec,
)

MAX_WIDTH = 4  # tokens per pass over a row; T = 8 is two passes, T = 6 a pass of 4 and one of 2
BLOCKS = 2  # legacy blocks per loop iteration (their scales gathered as one vector)


def _lane(b, v, j, n=8):
    """Lane j of v broadcast to <n x float>."""
    return b.shuffle_vector(v, v, _const(I32, [j] * n))


def _halves(b, w, o, block_bytes, at, k):
    """The float16 at byte `at` of each of k consecutive blocks from byte o, as <k x float> (gathered in integer
    registers, as quant/simd.py's one-token kernel does)."""
    wide = ir.IntType(16 * k)
    packed = ir.Constant(wide, 0)
    for j in range(k):
        h = b.zext(_load(b, w, b.add(o, _i64(block_bytes * j + at)), I16), wide)
        packed = b.or_(packed, b.shl(h, ir.Constant(wide, 16 * j)))
    return b.fpext(b.bitcast(packed, _vec(HALF, k)), _vec(F32, k))


def _emit_legacy(b, fmt, TT, w, xq, xd, xs, xc, nb):
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
                dot = b.add(_pairs(b, lo, xq[t], xo), _pairs(b, hi, xq[t], b.add(xo, _i64(32))))
                accs[t] = _fma(b, b.sitofp(dot, V8F), _lane(b, scales[t], j), accs[t])
        return accs + corrs

    def unrolled(i, vals):
        _prefetch_span(b, w, b.mul(i, _i64(block_bytes)), BLOCKS * block_bytes)
        return group(i, BLOCKS, vals)

    zero8, zk = ir.Constant(V8F, [0.0] * 8), ir.Constant(_vec(F32, BLOCKS), [0.0] * BLOCKS)
    vals, i = _loop(b, _i64(0), nb, BLOCKS, [zero8] * TT + [zk] * TT, unrolled)
    one = [b.insert_element(ir.Constant(_vec(F32, 1), [0.0]), _hsum(b, c), ir.Constant(I32, 0)) for c in vals[TT:]]
    vals, _ = _loop(b, i, nb, 1, vals[:TT] + one, lambda j, v: group(j, 1, v))
    out = []
    for t in range(TT):
        corr = b.extract_element(vals[TT + t], ir.Constant(I32, 0))
        out.append(b.fadd(_hsum(b, vals[t]), corr, flags=FAST))
    return out


def _emit_q45_k(b, five, TT, w, xq, xd, xs, nsb):
    """Q4_K / Q5_K super-blocks for TT tokens. Per super-block: the 6-bit scales and minimums once (d sc, -dmin m
    as <8 x float>); per token its scales d sc xd and the minimum term -dmin m xs into its accumulator; per
    sub-block of 32 its codes once, then per token two pair-product vectors, a conversion and an FMA."""
    block_bytes = 176 if five else 144

    def body(i, accs):
        accs = list(accs)
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
            accs[t] = _fma(b, ndm, _load(b, xs[t], at, V8F), accs[t])
        for j, (c0, c1) in _iter_q45_codes(b, w, o, five):
            xo = b.mul(b.add(xb, _i64(j)), _i64(64))
            for t in range(TT):
                dot = b.add(_pairs(b, c0, xq[t], xo), _pairs(b, c1, xq[t], b.add(xo, _i64(32))))
                accs[t] = _fma(b, b.sitofp(dot, V8F), _lane(b, scales[t], j), accs[t])
        return accs

    accs, _ = _loop(b, _i64(0), nsb, 1, [ir.Constant(V8F, [0.0] * 8)] * TT, body)
    return [_hsum(b, a) for a in accs]


# lanes of a sub-block's two pair-product vectors (16 weights each, scales m = 2j and 2j + 1) added in pairs
# within 128-bit halves (one vphaddd on AVX2): [a01 a23 b01 b23 a45 a67 b45 b67]
_HADD_EVEN, _HADD_ODD = _const(I32, [0, 2, 8, 10, 4, 6, 12, 14]), _const(I32, [1, 3, 9, 11, 5, 7, 13, 15])


def _emit_q6_k(b, TT, w, xq, xd, nsb):
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

    accs, _ = _loop(b, _i64(0), nsb, 1, [ir.Constant(V8F, [0.0] * 8)] * TT, body)
    return [_hsum(b, a) for a in accs]


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

                if tt == 1:
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


def _legacy(name):
    fmt = INT_FORMATS[name]
    return _multi_intrinsic(lambda b, tt, w, xq, xd, xs, xc, nb: _emit_legacy(b, fmt, tt, w, xq, xd, xs, xc, nb),
                            lambda b, w, xq, xd, xs, xc, nb: _emit_int_dot(b, fmt, w, xq, xd, xs, xc, nb))


def _k_quant(name, emit):
    return _multi_intrinsic(emit, lambda b, w, xq, xd, xs, xc, nsb: _emit_k_dot(b, *K_FORMATS[name], w, xq, xd, xs,
                                                                                  nsb))


# Every token of a prepared activation times one row: kernel(u8, off, xq, xd, xs, xc, nb, out, r)
dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0 = (_legacy(k) for k in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"))
dot_q4_k = _k_quant("q4_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q45_k(b, False, tt, w, xq, xd, xs, nsb))
dot_q5_k = _k_quant("q5_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q45_k(b, True, tt, w, xq, xd, xs, nsb))
dot_q6_k = _k_quant("q6_k", lambda b, tt, w, xq, xd, xs, xc, nsb: _emit_q6_k(b, tt, w, xq, xd, nsb))


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
        vals = _emit_legacy(b, INT_FORMATS[name], width, w, *rows, count)
    elif name == "q6_k":
        vals = _emit_q6_k(b, width, w, rows[0], rows[1], count)
    else:
        vals = _emit_q45_k(b, name == "q5_k", width, w, rows[0], rows[1], rows[2], count)
    for t, v in enumerate(vals):
        b.store(v, b.gep(out, [_i64(t)]))
    b.ret_void()
    return str(module)
