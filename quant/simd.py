"""Block dot products written as portable LLVM vector IR (Numba intrinsics).

Numba's loop vectorizer turns the per-block loops of quant/kernels.py into code that reduces every 32-weight
block to a scalar (a horizontal sum per block) and converts scales through table lookups: about 4 GB/s per
thread on Q4_0. Here each block is decoded straight into <16 x float> registers and multiplied into vector
accumulators that stay in registers for the whole row; one horizontal sum per row. The IR uses only generic
LLVM vector operations and generic intrinsics (llvm.fma), never target intrinsics, so the same code becomes
AVX-512 or AVX2 on x86 and NEON on ARM.

Each `dot_*` is called from jitted code as `dot_q4_0(u8, off, x, xoff, nb)`: the row whose bytes start at
u8[off], times x[xoff : xoff + 32 nb] (float32, C-contiguous), over nb blocks of 32 weights; float32.
Layouts as in quant/formats.py: Q4_0 d|qs[16], Q4_1 d|m|qs[16], Q5_0 d|qh[4]|qs[16], Q5_1 d|m|qh[4]|qs[16],
Q8_0 d|qs[32]; nibble j of qs holds weight j (low) and weight j + 16 (high).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32, HALF = ir.FloatType(), ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V16F = ir.VectorType(F32, 16)
FAST = ("fast",)
_FORMATS: dict = {}  # block decoder -> bytes per block, for standalone_module
UNROLL = 4  # blocks per loop iteration, each into its own accumulator (hides the FMA latency)
PREFETCH = 1024  # bytes ahead to prefetch in the row (a hint: never faults; +8-10 % streaming the 1B model)


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), list(values))


def _i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _splat(b: ir.IRBuilder, val: ir.Value, n: int = 16) -> ir.Value:
    v = b.insert_element(ir.Constant(_vec(val.type, n), ir.Undefined), val, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, _const(I32, [0] * n))


def _call(b: ir.IRBuilder, name: str, ret: ir.Type, args: list) -> ir.Value:
    """Call the generic LLVM intrinsic `name` (declared in the module on first use)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args)


def _fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, acc: ir.Value) -> ir.Value:
    return _call(b, f"llvm.fma.v{x.type.count}f32", x.type, [x, y, acc])


def _hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of the lanes of v, as a tree of halves."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, _const(I32, range(n)))
        hi = b.shuffle_vector(v, v, _const(I32, range(n, 2 * n)))
        v = b.fadd(lo, hi, flags=FAST)
    return b.extract_element(v, ir.Constant(I32, 0))


def _load(b: ir.IRBuilder, base: ir.Value, byte_off: ir.Value, ty: ir.Type) -> ir.Value:
    ld = b.load(b.bitcast(b.gep(base, [byte_off]), ty.as_pointer()))
    ld.align = 1
    return ld


def _prefetch(b: ir.IRBuilder, base: ir.Value, byte_off: ir.Value) -> None:
    """Ask for the cache line at base + byte_off (llvm.prefetch: read, keep in all cache levels)."""
    _call(b, "llvm.prefetch.p0", ir.VoidType(),
          [b.gep(base, [byte_off]), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _loop(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int, init: list, body) -> tuple[list, ir.Value]:
    """for i in range(start, stop - step + 1, step), carrying the values `init`; body(i, values) -> new values.
    Returns the values and the index after the loop."""
    pre, fn = b.block, b.function
    loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    b.cbranch(b.icmp_signed("<=", b.add(start, _i64(step)), stop), loop, done)
    b.position_at_end(loop)
    i = b.phi(I64)
    vals = [b.phi(v.type) for v in init]
    new = body(i, vals)
    nxt = b.add(i, _i64(step))
    end = b.block
    i.add_incoming(start, pre)
    i.add_incoming(nxt, end)
    for phi, v0, v1 in zip(vals, init, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    b.cbranch(b.icmp_signed("<=", b.add(nxt, _i64(step)), stop), loop, done)
    b.position_at_end(done)
    outs = [b.phi(v.type) for v in init]
    for phi, v0, v1 in zip(outs, init, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    i_out = b.phi(I64)
    i_out.add_incoming(start, pre)
    i_out.add_incoming(nxt, end)
    return outs, i_out


# ---- one block of 32 weights: (w, byte offset of the block, x0, x1 = x[0:16], x[16:32], acc) -> acc -----------

def _nibbles(b, qs):
    """16 bytes -> (low nibbles, high nibbles) as <16 x i8>: weights 0..15 and 16..31."""
    return b.and_(qs, _const(I8, [15] * 16)), b.lshr(qs, _const(I8, [4] * 16))


def _high_bits(b, w, at):
    """Q5 fifth bits: the 32-bit qh at byte `at` -> (bits of weights 0..15, of 16..31) as <16 x i8> of 0 or 16."""
    qh = _splat(b, _load(b, w, at, I32))
    one = _const(I32, [1] * 16)
    lo = b.and_(b.lshr(qh, _const(I32, range(16))), one)
    hi = b.and_(b.lshr(qh, _const(I32, range(16, 32))), one)
    shift = _const(I8, [4] * 16)
    return b.shl(b.trunc(lo, _vec(I8, 16)), shift), b.shl(b.trunc(hi, _vec(I8, 16)), shift)


def _scaled(b, lo, hi, x0, x1, d, acc, signed):
    """acc + d * (lo . x0 + hi . x1) for integer codes lo, hi: <16 x i8>."""
    conv = b.sitofp if signed else b.uitofp
    p = b.fmul(conv(lo, V16F), x0, flags=FAST)
    p = _fma(b, conv(hi, V16F), x1, p)
    return _fma(b, p, _splat(b, d), acc)


def _half(b, w, at):
    return b.fpext(_load(b, w, at, HALF), F32)


def _q4_0(b, w, o, x0, x1, acc):
    lo, hi = _nibbles(b, _load(b, w, b.add(o, _i64(2)), _vec(I8, 16)))
    eight = _const(I8, [8] * 16)
    return _scaled(b, b.sub(lo, eight), b.sub(hi, eight), x0, x1, _half(b, w, o), acc, True)


def _q4_1(b, w, o, x0, x1, acc):
    lo, hi = _nibbles(b, _load(b, w, b.add(o, _i64(4)), _vec(I8, 16)))
    acc = _fma(b, b.fadd(x0, x1, flags=FAST), _splat(b, _half(b, w, b.add(o, _i64(2)))), acc)
    return _scaled(b, lo, hi, x0, x1, _half(b, w, o), acc, False)


def _q5_0(b, w, o, x0, x1, acc):
    lo, hi = _nibbles(b, _load(b, w, b.add(o, _i64(6)), _vec(I8, 16)))
    hlo, hhi = _high_bits(b, w, b.add(o, _i64(2)))
    sixteen = _const(I8, [16] * 16)
    lo, hi = b.sub(b.or_(lo, hlo), sixteen), b.sub(b.or_(hi, hhi), sixteen)
    return _scaled(b, lo, hi, x0, x1, _half(b, w, o), acc, True)


def _q5_1(b, w, o, x0, x1, acc):
    lo, hi = _nibbles(b, _load(b, w, b.add(o, _i64(8)), _vec(I8, 16)))
    hlo, hhi = _high_bits(b, w, b.add(o, _i64(4)))
    acc = _fma(b, b.fadd(x0, x1, flags=FAST), _splat(b, _half(b, w, b.add(o, _i64(2)))), acc)
    return _scaled(b, b.or_(lo, hlo), b.or_(hi, hhi), x0, x1, _half(b, w, o), acc, False)


def _q8_0(b, w, o, x0, x1, acc):
    lo = _load(b, w, b.add(o, _i64(2)), _vec(I8, 16))
    hi = _load(b, w, b.add(o, _i64(18)), _vec(I8, 16))
    return _scaled(b, lo, hi, x0, x1, _half(b, w, o), acc, True)


def _f32(b, w, o, x0, x1, acc):
    acc = _fma(b, _load(b, w, o, V16F), x0, acc)
    return _fma(b, _load(b, w, b.add(o, _i64(64)), V16F), x1, acc)


def _f16(b, w, o, x0, x1, acc):
    acc = _fma(b, b.fpext(_load(b, w, o, _vec(HALF, 16)), V16F), x0, acc)
    return _fma(b, b.fpext(_load(b, w, b.add(o, _i64(32)), _vec(HALF, 16)), V16F), x1, acc)


def _bf16_to_f32(b, v):
    return b.bitcast(b.shl(b.zext(v, _vec(I32, 16)), _const(I32, [16] * 16)), V16F)


def _bf16(b, w, o, x0, x1, acc):
    acc = _fma(b, _bf16_to_f32(b, _load(b, w, o, _vec(I16, 16))), x0, acc)
    return _fma(b, _bf16_to_f32(b, _load(b, w, b.add(o, _i64(32)), _vec(I16, 16))), x1, acc)


def _emit_dot(b, block, block_bytes: int, w, xp, nb, xsp=None):
    """The dot product loop over nb blocks of `block_bytes` at w (i8*) with x at xp: 32-weight blocks, UNROLL at a
    time into separate accumulators; with xsp (x's block sums, for K-quants), 256-weight super-blocks."""
    zero = ir.Constant(V16F, [0.0] * 16)
    if xsp is not None:
        def superblock(i, vals):
            _prefetch(b, w, b.add(b.mul(i, _i64(block_bytes)), _i64(PREFETCH)))
            return list(block(b, w, b.mul(i, _i64(block_bytes)), xp, b.mul(i, _i64(1024)), xsp,
                              b.mul(i, _i64(32)), vals[0], vals[1]))

        (acc, corr), _ = _loop(b, _i64(0), nb, 1, [zero, ir.Constant(F32, 0.0)], superblock)
        return b.fsub(_hsum(b, acc), corr, flags=FAST)

    def one(i, acc):
        xo = b.mul(i, _i64(128))
        x0, x1 = _load(b, xp, xo, V16F), _load(b, xp, b.add(xo, _i64(64)), V16F)
        return block(b, w, b.mul(i, _i64(block_bytes)), x0, x1, acc)

    def unrolled(i, accs):
        _prefetch(b, w, b.add(b.mul(i, _i64(block_bytes)), _i64(PREFETCH)))
        return [one(b.add(i, _i64(k)), a) for k, a in enumerate(accs)]

    accs, i = _loop(b, _i64(0), nb, UNROLL, [zero] * UNROLL, unrolled)
    (acc,), _ = _loop(b, i, nb, 1, [accs[0]], lambda j, a: [one(j, a[0])])
    for a in accs[1:]:
        acc = b.fadd(acc, a, flags=FAST)
    return _hsum(b, acc)


def _make_dot(block, block_bytes: int):
    """An intrinsic dot(w, off, x, xoff, nb) -> float32 over nb blocks of 32 weights decoded by `block`, the
    weights starting at byte `off` of the C-contiguous array w (any dtype: the GGUF bytes, or a float32 cache)."""

    @intrinsic
    def dot(typingctx, u8, off, x, xoff, nb):
        if not (isinstance(u8, types.Array) and u8.layout == "C"
                and isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"):
            return None
        sig = types.float32(u8, types.int64, x, types.int64, types.int64)

        def codegen(context, b, signature, args):
            wa = context.make_array(signature.args[0])(context, b, args[0])
            xa = context.make_array(signature.args[2])(context, b, args[2])
            w = b.gep(b.bitcast(wa.data, I8.as_pointer()), [args[1]])
            xp = b.gep(b.bitcast(xa.data, I8.as_pointer()), [b.mul(args[3], _i64(4))])
            return _emit_dot(b, block, block_bytes, w, xp, args[4])

        return sig, codegen

    _FORMATS[block] = block_bytes
    return dot


# ---- K-quants: super-blocks of 256 weights with 6- or 8-bit sub-block scales ---------------------------------

def _byte(b, w, at):
    return b.zext(_load(b, w, at, I8), I32)


def _k4_scale_min(b, w, o, j):
    """6-bit scale and minimum of sub-block j (0..7) from the 12 scale bytes at o + 4 (Q4_K, Q5_K), as floats."""
    def sc(i):
        return _byte(b, w, b.add(o, _i64(4 + i)))

    def bits(v, shift, mask):
        return b.and_(b.lshr(v, ir.Constant(I32, shift)), ir.Constant(I32, mask))

    if j < 4:
        s, m = bits(sc(j), 0, 63), bits(sc(j + 4), 0, 63)
    else:
        s = b.or_(bits(sc(j + 4), 0, 15), b.shl(bits(sc(j - 4), 6, 3), ir.Constant(I32, 4)))
        m = b.or_(bits(sc(j + 4), 4, 15), b.shl(bits(sc(j), 6, 3), ir.Constant(I32, 4)))
    return b.uitofp(s, F32), b.uitofp(m, F32)


def _halves(b, v):
    """<32 x i8> -> its two <16 x i8> halves."""
    return (b.shuffle_vector(v, v, _const(I32, range(16))), b.shuffle_vector(v, v, _const(I32, range(16, 32))))


def _dot32(b, q, xp, xo, signed):
    """q: <32 x i8> codes . x[xo : xo + 32] (byte offset xo) -> <16 x float> partial sums."""
    conv = b.sitofp if signed else b.uitofp
    lo, hi = _halves(b, q)
    p = b.fmul(conv(lo, V16F), _load(b, xp, xo, V16F), flags=FAST)
    return _fma(b, conv(hi, V16F), _load(b, xp, b.add(xo, _i64(64)), V16F), p)


def _q45_k(five):
    def block(b, w, o, xp, xo, xsp, xso, acc, corr):
        """One super-block: acc += d sc_j (q . x)_j; corr += dmin m_j xs_j over its 8 sub-blocks of 32."""
        d, dmin = _half(b, w, o), _half(b, w, b.add(o, _i64(2)))
        q0 = 48 if five else 16
        if five:
            qh = _load(b, w, b.add(o, _i64(16)), _vec(I8, 32))
        for g in range(4):
            lo, hi = _nibbles32(b, _load(b, w, b.add(o, _i64(q0 + 32 * g)), _vec(I8, 32)))
            if five:
                one, four = _const(I8, [1] * 32), _const(I8, [4] * 32)
                lo = b.or_(lo, b.shl(b.and_(b.lshr(qh, _const(I8, [2 * g] * 32)), one), four))
                hi = b.or_(hi, b.shl(b.and_(b.lshr(qh, _const(I8, [2 * g + 1] * 32)), one), four))
            for j, q in ((2 * g, lo), (2 * g + 1, hi)):
                sc, m = _k4_scale_min(b, w, o, j)
                p = _dot32(b, q, xp, b.add(xo, _i64(128 * j)), False)
                acc = _fma(b, p, _splat(b, b.fmul(d, sc, flags=FAST)), acc)
                xs = _load(b, xsp, b.add(xso, _i64(4 * j)), F32)
                corr = b.fadd(corr, b.fmul(b.fmul(dmin, m, flags=FAST), xs, flags=FAST), flags=FAST)
        return acc, corr
    return block


def _nibbles32(b, qs):
    return b.and_(qs, _const(I8, [15] * 32)), b.lshr(qs, _const(I8, [4] * 32))


def _q6_k(b, w, o, xp, xo, xsp, xso, acc, corr):
    """One Q6_K super-block: ql[128] | qh[64] | int8 scales[16] | d; a scale per 16 weights."""
    d = _half(b, w, b.add(o, _i64(208)))
    m15, m3 = _const(I8, [15] * 16), _const(I8, [3] * 16)
    for h in range(2):
        for k in range(4):
            for half in range(2):
                ql = _load(b, w, b.add(o, _i64(64 * h + 32 * (k & 1) + 16 * half)), _vec(I8, 16))
                qh = _load(b, w, b.add(o, _i64(128 + 32 * h + 16 * half)), _vec(I8, 16))
                lo = b.and_(b.lshr(ql, _const(I8, [4 * (k >> 1)] * 16)), m15)
                hi = b.and_(b.lshr(qh, _const(I8, [2 * k] * 16)), m3)
                q = b.sub(b.or_(lo, b.shl(hi, _const(I8, [4] * 16))), _const(I8, [32] * 16))
                x = _load(b, xp, b.add(xo, _i64(4 * (128 * h + 32 * k + 16 * half))), V16F)
                sc = b.sitofp(_load(b, w, b.add(o, _i64(192 + 8 * h + 2 * k + half)), I8), F32)
                acc = _fma(b, b.fmul(b.sitofp(q, V16F), x, flags=FAST), _splat(b, b.fmul(d, sc, flags=FAST)), acc)
    return acc, corr


def _make_dot_k(block, block_bytes: int):
    """An intrinsic dot(w, off, x, xs, nsb) -> float32 over nsb super-blocks of 256 weights, given the block sums
    of x (per 32) in xs, which carry the sub-block minimums."""

    @intrinsic
    def dot(typingctx, w, off, x, xs, nsb):
        if not (all(isinstance(a, types.Array) and a.layout == "C" for a in (w, x, xs))
                and x.dtype == types.float32 and xs.dtype == types.float32):
            return None
        sig = types.float32(w, types.int64, x, xs, types.int64)

        def codegen(context, b, signature, args):
            def ptr(k):
                return b.bitcast(context.make_array(signature.args[k])(context, b, args[k]).data, I8.as_pointer())

            return _emit_dot(b, block, block_bytes, b.gep(ptr(0), [args[1]]), ptr(2), args[4], ptr(3))

        return sig, codegen

    _FORMATS[block] = block_bytes
    return dot


dot_q4_k_block, dot_q5_k_block = _q45_k(False), _q45_k(True)
dot_q4_k = _make_dot_k(dot_q4_k_block, 144)
dot_q5_k = _make_dot_k(dot_q5_k_block, 176)
dot_q6_k = _make_dot_k(_q6_k, 210)


def standalone_module(name: str) -> str:
    """LLVM IR text of a module with one function `float dot(i8* w, i8* x, i8* xs, i64 n_blocks)` holding the dot
    product of format `name` ("q4_0", "q6_k", "f16", ...), outside numba: to check what a target compiles it to."""
    block = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0, "f32": _f32, "f16": _f16,
             "bf16": _bf16, "q4_k": dot_q4_k_block, "q5_k": dot_q5_k_block, "q6_k": _q6_k}[name]
    module = ir.Module(name=name)
    p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(F32, [p, p, p, I64]), name="dot")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, xp, xsp, nb = fn.args
    k_quant = name.endswith("_k")
    b.ret(_emit_dot(b, block, _FORMATS[block], w, xp, nb, xsp if k_quant else None))
    return str(module)


dot_q4_0 = _make_dot(_q4_0, 18)
dot_q4_1 = _make_dot(_q4_1, 20)
dot_q5_0 = _make_dot(_q5_0, 22)
dot_q5_1 = _make_dot(_q5_1, 24)
dot_q8_0 = _make_dot(_q8_0, 34)
dot_f32 = _make_dot(_f32, 128)
dot_f16 = _make_dot(_f16, 64)
dot_bf16 = _make_dot(_bf16, 64)


@intrinsic
def exp_f32(typingctx, x):
    """e^x in float32 from plain arithmetic (relative error ~2e-7), so that loops over it vectorize: libm's expf
    is a call per element. x is clamped to [-87, 88]: below, the result is ~1e-38 instead of a denormal or 0."""
    if not isinstance(x, types.Float):
        return None
    sig = types.float32(x)

    def codegen(context, b, signature, args):
        def c(v):
            return ir.Constant(F32, v)

        x = args[0] if signature.args[0] == types.float32 else b.fptrunc(args[0], F32)
        x = _call(b, "llvm.maxnum.f32", F32, [x, c(-87.0)])
        x = _call(b, "llvm.minnum.f32", F32, [x, c(88.0)])
        n = _call(b, "llvm.rint.f32", F32, [b.fmul(x, c(1.4426950408889634), flags=FAST)])
        f = b.fsub(x, b.fmul(n, c(0.693359375)))  # x - n ln 2 in two steps (Cody-Waite): exact first product
        f = b.fsub(f, b.fmul(n, c(-2.12194440e-4)))
        p = c(1.0 / 5040)  # e^f on |f| <= ln2/2: Taylor to degree 7
        for k in (720, 120, 24, 6, 2, 1, 1):
            p = b.fadd(b.fmul(p, f), c(1.0 / k))
        scale = b.bitcast(b.shl(b.add(b.fptosi(n, I32), ir.Constant(I32, 127)), ir.Constant(I32, 23)), F32)
        return b.fmul(p, scale)

    return sig, codegen


@intrinsic
def weighted_rows(typingctx, w, off, stride, p, n, width, out, ooff):
    """out[ooff : ooff + width] = sum over s < n of p[s] * row s, where row s is `width` float32 starting at byte
    off + s * stride of the C-contiguous array w (the values of one KV head in a cache). Accumulates 64 floats
    at a time in registers; `width` must be a multiple of 16."""
    ok = all(isinstance(a, types.Array) and a.layout == "C" for a in (w, p, out))
    if not ok or p.dtype != types.float32 or out.dtype != types.float32:
        return None
    sig = types.void(w, types.int64, types.int64, p, types.int64, types.int64, out, types.int64)

    def codegen(context, b, signature, args):
        base, off, stride, _, n, width, _, ooff = args
        wp = b.gep(b.bitcast(context.make_array(signature.args[0])(context, b, base).data, I8.as_pointer()), [off])
        pp = b.bitcast(context.make_array(signature.args[3])(context, b, args[3]).data, I8.as_pointer())
        op = b.gep(b.bitcast(context.make_array(signature.args[6])(context, b, args[6]).data, I8.as_pointer()),
                   [b.mul(ooff, _i64(4))])
        zero = ir.Constant(V16F, [0.0] * 16)

        def chunk(c0, m):
            """Columns c0 .. c0 + 16 m (c0 in floats): accumulate over the rows, then store."""
            def row(s, accs):
                ps = _splat(b, _load(b, pp, b.mul(s, _i64(4)), F32))
                at = b.add(b.mul(s, stride), b.mul(c0, _i64(4)))
                return [_fma(b, _load(b, wp, b.add(at, _i64(64 * k)), V16F), ps, a) for k, a in enumerate(accs)]

            accs, _ = _loop(b, _i64(0), n, 1, [zero] * m, row)
            for k, a in enumerate(accs):
                st = b.store(a, b.bitcast(b.gep(op, [b.add(b.mul(c0, _i64(4)), _i64(64 * k))]), V16F.as_pointer()))
                st.align = 1

        (c0,), _ = _loop(b, _i64(0), b.sdiv(width, _i64(64)), 1, [_i64(0)],
                         lambda i, c: (chunk(c[0], 4), [b.add(c[0], _i64(64))])[1])
        _loop(b, _i64(0), b.sdiv(b.srem(width, _i64(64)), _i64(16)), 1, [c0],
              lambda i, c: (chunk(c[0], 1), [b.add(c[0], _i64(16))])[1])
        return context.get_dummy_value()

    return sig, codegen
