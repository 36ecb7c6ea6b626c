"""Block dot products written as portable LLVM vector IR (Numba intrinsics).

Numba's loop vectorizer turns the per-block loops of quant/kernels.py into code that reduces every 32-weight
block to a scalar (a horizontal sum per block) and converts scales through table lookups: about 4 GB/s per
thread on Q4_0. Here each block is decoded straight into vector registers and multiplied into accumulators that
stay in registers for the whole row; one horizontal sum per row. The IR uses only generic LLVM vector
operations and generic intrinsics (llvm.fma), never target intrinsics, so the same code becomes AVX-512 or AVX2
on x86 and NEON on ARM.

Two kinds of kernels:

- The quantized formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) multiply integer codes by an int16 copy
  of the activation: x rounded per block of 32 to xq = rint(x / xd) with xd = max|x| / 32767
  (`quant.kernels.prepare`), so a block is products of 16-bit integers summed in pairs (LLVM emits vpmaddwd /
  vpdpwssd on x86, smull / smlal on ARM), one conversion to float and one FMA with the scales. The rounding
  moves each product by at most xd / 2 per unit of weight: a relative 1.5e-5 of the block's largest activation,
  1000x finer than the 8-bit copies llama.cpp makes (those move SmolLM2's next-token distribution by a KL of up
  to 0.02; these by ~1e-7). Called as `dot_q4_0(u8, off, xq, xd, xs, xc, nb)`: the row whose bytes start at
  u8[off] times the activation, over nb blocks of 32 (nb super-blocks of 256 for the K-quants); xq int16, and
  per block its scales xd, the float sums xs (which carry the minimums) and the sums xc of xq (the offsets).
- F32, F16, BF16 multiply the float32 activation itself: `dot_f16(u8, off, x, xoff, nb)` (x from float index
  xoff, nb blocks of 32).

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
V16F, V8F = ir.VectorType(F32, 16), ir.VectorType(F32, 8)
FAST = ("fast",)
_FORMATS: dict = {}  # block decoder -> bytes per block, for standalone_module
UNROLL = 4  # blocks per loop iteration, each into its own accumulator (hides the FMA latency)
PREFETCH = 4096  # bytes ahead to prefetch in the row (a hint: never faults); streaming the 1B model at 2 threads:
# 1024 -> 4096 bytes took a pass over its matrices from ~23.9 to ~22.6 ms


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), list(values))


def _i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _splat(b: ir.IRBuilder, val: ir.Value, n: int = 16) -> ir.Value:
    v = b.insert_element(ir.Constant(_vec(val.type, n), ir.Undefined), val, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, _const(I32, [0] * n))


def _call(b: ir.IRBuilder, name: str, ret: ir.Type, args: list, flags=()) -> ir.Value:
    """Call the generic LLVM intrinsic `name` (declared in the module on first use)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args, fastmath=flags)


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


def _prefetch_span(b: ir.IRBuilder, base: ir.Value, byte_off: ir.Value, nbytes: int) -> None:
    """Prefetch PREFETCH bytes ahead of the `nbytes` at base + byte_off, one hint per cache line: a loop step of
    more than 64 bytes with a single hint leaves lines to the hardware prefetcher (streamed from memory, Q4_K ran
    at 0.73x and Q6_K at 0.58x of this, Q8_0 at 0.xx)."""
    for line in range(0, nbytes, 64):
        _prefetch(b, base, b.add(byte_off, _i64(PREFETCH + line)))


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


# ---- block decoding shared by the kernels ------------------------------------------------------------------

def _half(b, w, at):
    return b.fpext(_load(b, w, at, HALF), F32)


# ---- the int16 kernels: one block of 32 weights -> the codes of weights 0..15 and of 16..31 as <16 x i16>. Every
# format has its scale d at byte 0; Q4_1 and Q5_1 their minimum m at byte 2 (the weight is d q + m); Q4_0 and Q5_0
# store q + 8 and q + 16 (`offset`).

def _words(b, w, at):
    """16 bytes at `at` -> <16 x i16>, zero-extended: as the bytes interleaved with zeros, which LLVM keeps as one
    widening load (vpmovzxbw from memory) followed by the nibble masks and shifts on the words. A plain zext let
    it move the mask before the widening (narrower), so each 16 bytes took a load, a byte mask, a shift, a second
    mask and two widenings: Q4_0 and Q4_K 1.4x faster without those (bench_kernels.py --against)."""
    v = _load(b, w, at, _vec(I8, 16))
    z = ir.Constant(_vec(I8, 16), [0] * 16)
    inter = b.shuffle_vector(v, z, _const(I32, [k for j in range(16) for k in (j, 16 + j)]))
    return b.bitcast(inter, _vec(I16, 16))


def _nibble_words(b, w, at):
    """The 16 bytes of nibbles at `at` -> (low nibbles, high nibbles) as <16 x i16>: weights 0..15 and 16..31."""
    qs = _words(b, w, at)
    return b.and_(qs, _const(I16, [15] * 16)), b.lshr(qs, _const(I16, [4] * 16))


def _fifth_bits(b, w, at):
    """Q5 fifth bits: the 32-bit qh at byte `at` -> (16 where weights 0..15 have it, else 0; same for 16..31)."""
    qh = _load(b, w, at, I32)
    bits, sixteen, zero = _const(I16, [1 << j for j in range(16)]), _const(I16, [16] * 16), _const(I16, [0] * 16)

    def spread(half):
        has = b.icmp_unsigned("!=", b.and_(_splat(b, b.trunc(half, I16)), bits), zero)
        return b.select(has, sixteen, zero)

    return spread(qh), spread(b.lshr(qh, ir.Constant(I32, 16)))


def _q4_0(b, w, o):
    return _nibble_words(b, w, b.add(o, _i64(2)))


def _q4_1(b, w, o):
    return _nibble_words(b, w, b.add(o, _i64(4)))


def _q5(b, w, o, at):
    lo, hi = _nibble_words(b, w, b.add(o, _i64(at + 4)))
    hlo, hhi = _fifth_bits(b, w, b.add(o, _i64(at)))
    return b.or_(lo, hlo), b.or_(hi, hhi)


def _q5_0(b, w, o):
    return _q5(b, w, o, 2)


def _q5_1(b, w, o):
    return _q5(b, w, o, 4)


def _q8_0(b, w, o):
    def signed(at):
        return b.sext(_load(b, w, b.add(o, _i64(at)), _vec(I8, 16)), _vec(I16, 16))

    return signed(2), signed(18)


def _pairs(b, q, xq, xo):
    """<n x i16> codes . the n int16 at byte xo of xq -> <n/2 x i32>, products summed in adjacent pairs."""
    n = q.type.count
    prod = b.mul(b.sext(q, _vec(I32, n)), b.sext(_load(b, xq, xo, _vec(I16, n)), _vec(I32, n)))
    even = b.shuffle_vector(prod, prod, _const(I32, range(0, n, 2)))
    odd = b.shuffle_vector(prod, prod, _const(I32, range(1, n, 2)))
    return b.add(even, odd)


def _emit_int_dot(b, fmt, w, xq, xd, xs, xc, nb):
    """The int16 dot product over nb blocks of `block_bytes` at w, given the activation's int16 copy xq, its scales
    xd, its float sums xs and the sums of its int16 copy xc (per block of 32; see quant.kernels.prepare).

    Per block: codes . xq in pairs of int16 products (<8 x i32>), converted once and accumulated with the scale
    d * xd. The offset (Q4_0's 8, Q5_0's 16) is taken out at the end as offset * sum of d xd xc, the minimums
    as sum of m xs. Blocks go in groups of UNROLL, each into its own accumulator, their scales read as one
    vector; the last nb % UNROLL blocks one at a time."""
    block, block_bytes, offset, has_min = fmt

    def group(i, k, accs, corr):
        """Blocks i .. i + k - 1 into accs; corr: <k x float> of the offset or minimum terms."""
        o = b.mul(i, _i64(block_bytes))
        vf = _vec(F32, k)

        def halves(at):
            """The float16 at byte `at` of each of the k blocks, as <k x float>: gathered by integer shifts and ors
            (general-purpose registers, beside the busy vector units: +7-11 % on Q4_0 against vector inserts)."""
            wide = ir.IntType(16 * k)
            packed = ir.Constant(wide, 0)
            for j in range(k):
                h = b.zext(_load(b, w, b.add(o, _i64(block_bytes * j + at)), I16), wide)
                packed = b.or_(packed, b.shl(h, ir.Constant(wide, 16 * j)))
            return b.fpext(b.bitcast(packed, _vec(HALF, k)), vf)

        scale = b.fmul(halves(0), _load(b, xd, b.mul(i, _i64(4)), vf), flags=FAST)
        if offset:
            corr = _fma(b, scale, _load(b, xc, b.mul(i, _i64(4)), vf), corr)
        if has_min:
            corr = _fma(b, halves(2), _load(b, xs, b.mul(i, _i64(4)), vf), corr)
        out = []
        for j, acc in enumerate(accs):
            lo, hi = block(b, w, b.add(o, _i64(block_bytes * j)))
            xo = b.mul(b.add(i, _i64(j)), _i64(64))
            dot = b.add(_pairs(b, lo, xq, xo), _pairs(b, hi, xq, b.add(xo, _i64(32))))
            out.append(_fma(b, b.sitofp(dot, V8F), b.shuffle_vector(scale, scale, _const(I32, [j] * 8)), acc))
        return out, corr

    def unrolled(i, vals):
        _prefetch_span(b, w, b.mul(i, _i64(block_bytes)), UNROLL * block_bytes)
        accs, corr = group(i, UNROLL, vals[:-1], vals[-1])
        return accs + [corr]

    zero8 = ir.Constant(V8F, [0.0] * 8)
    vals, i = _loop(b, _i64(0), nb, UNROLL, [zero8] * UNROLL + [ir.Constant(_vec(F32, UNROLL), [0.0] * UNROLL)],
                    unrolled)

    def single(j, v):
        (acc,), corr = group(j, 1, [v[0]], ir.Constant(_vec(F32, 1), [0.0]))
        return [acc, b.fadd(v[1], b.extract_element(corr, ir.Constant(I32, 0)), flags=FAST)]

    (acc, corr), _ = _loop(b, i, nb, 1, [vals[0], _hsum(b, vals[-1])], single)
    for a in vals[1:-1]:
        acc = b.fadd(acc, a, flags=FAST)
    if offset:
        corr = b.fmul(corr, ir.Constant(F32, -float(offset)), flags=FAST)
    return b.fadd(_hsum(b, acc), corr, flags=FAST)


def _int_dot_intrinsic(emit):
    """An intrinsic dot(w, off, xq, xd, xs, xc, count) -> float32 over the weights from byte `off` of the
    C-contiguous array w, the activation given by what quant.kernels.prepare makes of it; emit(builder, weight
    pointer, xq, xd, xs, xc pointers, count) builds the loop."""

    @intrinsic
    def dot(typingctx, w, off, xq, xd, xs, xc, count):
        arrays = (w, xq, xd, xs, xc)
        if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays) and xq.dtype == types.int16
                and all(a.dtype == types.float32 for a in (xd, xs, xc))):
            return None
        sig = types.float32(w, types.int64, xq, xd, xs, xc, types.int64)

        def codegen(context, b, signature, args):
            def ptr(k):
                return b.bitcast(context.make_array(signature.args[k])(context, b, args[k]).data, I8.as_pointer())

            return emit(b, b.gep(ptr(0), [args[1]]), ptr(2), ptr(3), ptr(4), ptr(5), args[6])

        return sig, codegen

    return dot


def _make_int_dot(fmt):
    """dot(w, off, xq, xd, xs, xc, nb) over nb blocks of 32 weights of format fmt = (block decoder, bytes per
    block, offset, has minimum) (see _emit_int_dot)."""
    return _int_dot_intrinsic(lambda b, w, xq, xd, xs, xc, nb: _emit_int_dot(b, fmt, w, xq, xd, xs, xc, nb))


# ---- dequantization: blocks -> float32 rows (the prompt path's weight tiles, embedding rows) -----------------

def _emit_dequant(b, fmt, w, out, nb):
    """nb blocks of 32 weights at w -> float32 at out: (code - offset) * d, or code * d + m; the same roundings as
    ggml's reference (no fused multiply-add: no fast-math flags here)."""
    block, block_bytes, offset, has_min = fmt

    def one(i, _):
        o = b.mul(i, _i64(block_bytes))
        d = _splat(b, _half(b, w, o))
        m = _splat(b, _half(b, w, b.add(o, _i64(2)))) if has_min else None
        for h, codes in enumerate(block(b, w, o)):
            v = b.sitofp(codes, V16F)
            if offset:
                v = b.fsub(v, _splat(b, ir.Constant(F32, float(offset))))
            v = b.fmul(v, d)
            if m is not None:
                v = b.fadd(v, m)
            st = b.store(v, b.bitcast(b.gep(out, [b.add(b.mul(i, _i64(128)), _i64(64 * h))]), V16F.as_pointer()))
            st.align = 4
        return []

    _loop(b, _i64(0), nb, 1, [], one)


def _dequant_intrinsic(emit):
    """An intrinsic dequant(w, off, count, out, ooff) writing from byte `off` of w into out[ooff:] (float32,
    C-contiguous) with emit(builder, weight pointer, output pointer, count)."""

    @intrinsic
    def dequant(typingctx, w, off, count, out, ooff):
        if not (isinstance(w, types.Array) and w.layout == "C" and isinstance(out, types.Array)
                and out.layout == "C" and out.dtype == types.float32):
            return None
        sig = types.void(w, types.int64, types.int64, out, types.int64)

        def codegen(context, b, signature, args):
            def ptr(k):
                return b.bitcast(context.make_array(signature.args[k])(context, b, args[k]).data, I8.as_pointer())

            emit(b, b.gep(ptr(0), [args[1]]), b.gep(ptr(3), [b.mul(args[4], _i64(4))]), args[2])
            return context.get_dummy_value()

        return sig, codegen

    return dequant


def _make_dequant(fmt):
    """dequant(w, off, nb, out, ooff): the nb blocks of format fmt at byte `off` of w -> out[ooff : ooff + 32 nb]."""
    return _dequant_intrinsic(lambda b, w, out, nb: _emit_dequant(b, fmt, w, out, nb))


def _make_dequant_16bit(to_f32):
    """dequant(w, off, n, out, ooff): n 16-bit floats at byte `off` of w -> out[ooff : ooff + n], 16 at a time;
    to_f32(builder, <k x i16>) converts."""

    def emit(b, w, out, n):
        def some(k):
            def body(i, _):
                v = to_f32(b, _load(b, w, b.mul(i, _i64(2)), _vec(I16, k)))
                st = b.store(v, b.bitcast(b.gep(out, [b.mul(i, _i64(4))]), v.type.as_pointer()))
                st.align = 4
                return []
            return body

        _, i = _loop(b, _i64(0), n, 16, [], some(16))
        _loop(b, i, n, 1, [], some(1))

    return _dequant_intrinsic(emit)


def _f16_to_f32(b, v):
    return b.fpext(b.bitcast(v, _vec(HALF, v.type.count)), _vec(F32, v.type.count))


def _bf16_to_f32(b, v):
    n = v.type.count
    return b.bitcast(b.shl(b.zext(v, _vec(I32, n)), _const(I32, [16] * n)), _vec(F32, n))


dequant_f16, dequant_bf16 = _make_dequant_16bit(_f16_to_f32), _make_dequant_16bit(_bf16_to_f32)


# ---- the float kernels: (w, byte offset of the block, x0, x1 = x[0:16], x[16:32], acc) -> acc -----------------

def _f32(b, w, o, x0, x1, acc):
    acc = _fma(b, _load(b, w, o, V16F), x0, acc)
    return _fma(b, _load(b, w, b.add(o, _i64(64)), V16F), x1, acc)


def _f16(b, w, o, x0, x1, acc):
    acc = _fma(b, _f16_to_f32(b, _load(b, w, o, _vec(I16, 16))), x0, acc)
    return _fma(b, _f16_to_f32(b, _load(b, w, b.add(o, _i64(32)), _vec(I16, 16))), x1, acc)


def _bf16(b, w, o, x0, x1, acc):
    acc = _fma(b, _bf16_to_f32(b, _load(b, w, o, _vec(I16, 16))), x0, acc)
    return _fma(b, _bf16_to_f32(b, _load(b, w, b.add(o, _i64(32)), _vec(I16, 16))), x1, acc)


def _emit_dot(b, block, block_bytes: int, w, xp, nb):
    """The float dot product loop over nb blocks of `block_bytes` at w (i8*) with x (float32) at xp: 32 weights
    per block, UNROLL blocks at a time into separate accumulators."""
    zero = ir.Constant(V16F, [0.0] * 16)

    def one(i, acc):
        xo = b.mul(i, _i64(128))
        x0, x1 = _load(b, xp, xo, V16F), _load(b, xp, b.add(xo, _i64(64)), V16F)
        return block(b, w, b.mul(i, _i64(block_bytes)), x0, x1, acc)

    def unrolled(i, accs):
        _prefetch_span(b, w, b.mul(i, _i64(block_bytes)), UNROLL * block_bytes)
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

K_ACCS = 4  # accumulators per K-quant row: a super-block's sub-blocks go round them (one chain would wait on FMAs)

LANE_SUMS_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # lane l of a _lane_sums vector: the sum of source LANE_SUMS_ORDER[l]


def _lane_sums(b, vs, add=None):
    """Eight <8 x i32> (or <8 x float>, with add=b.fadd) -> one vector of their lane sums (lane l: the sum of
    vs[LANE_SUMS_ORDER[l]]), as a tree of shuffle pairs and adds (3 per pair of inputs, 21 in all): the 8 sums then
    take one conversion and one FMA with a vector of their scales, instead of a conversion, a scale broadcast and
    an FMA each. The first level moves 128-bit halves, the others stay within them (one instruction each on AVX2,
    and on NEON). vs may be a generator: pairs are added as soon as both are made, so that few stay live (all 8
    at once spilled registers in Q5_K: 0.88x)."""
    levels = [([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]),  # [x folded to 4 | y folded to 4]
              ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
              ([0, 2, 8, 10, 4, 6, 12, 14], [1, 3, 9, 11, 5, 7, 13, 15])]
    stack: list = []  # (level, partial sums), a binary counter
    for v in vs:
        level = 0
        while stack and stack[-1][0] == level:
            lo, hi = levels[level]
            u = stack.pop()[1]
            v = (add or b.add)(b.shuffle_vector(u, v, _const(I32, lo)), b.shuffle_vector(u, v, _const(I32, hi)))
            level += 1
        stack.append((level, v))
    (level, v), = stack
    if level != 3:
        raise ValueError("_lane_sums takes 8 vectors")
    return v


def _k4_scales_mins(b, w, o):
    """The 6-bit scales and minimums of the 8 sub-blocks of a Q4_K/Q5_K super-block (12 bytes s at o + 4), as two
    <8 x float>: sub-block j < 4 has scale s[j] & 63 and minimum s[j + 4] & 63; j >= 4 keeps its low 4 bits in
    s[j + 4] (scale: low nibble, minimum: high nibble) and its top 2 bits in s[j - 4] and s[j] (bits 6, 7).
    Unpacked four at a time in 32-bit general-purpose registers, then widened as two 8-byte vectors: the same in
    vector shuffles took ~30 vector instructions per super-block beside the codes' work."""
    def word(at):
        return _load(b, w, b.add(o, _i64(4 + at)), I32)

    def c(v):
        return ir.Constant(I32, v)

    s0, s1, s2 = word(0), word(4), word(8)  # s[0:4], s[4:8], s[8:12]
    low6, low4, top2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)

    def tops(v):  # bits 6, 7 of each byte -> bits 4, 5
        return b.shl(b.and_(b.lshr(v, c(6)), top2), c(4))

    sc = (b.and_(s0, low6), b.or_(b.and_(s2, low4), tops(s0)))
    m = (b.and_(s1, low6), b.or_(b.and_(b.lshr(s2, c(4)), low4), tops(s1)))

    def floats(lo, hi):
        packed = b.or_(b.zext(lo, I64), b.shl(b.zext(hi, I64), _i64(32)))
        return b.uitofp(b.bitcast(packed, _vec(I8, 8)), V8F)

    return floats(*sc), floats(*m)


def _q45_codes(b, w, o, five):
    """The codes of a Q4_K/Q5_K super-block (d | dmin | 12 bytes of scales and minimums | [qh 32] | qs 128):
    [(sub-block j, (codes of its weights 0..15, of 16..31) as <16 x i16>)] for j = 0..7."""
    return list(_iter_q45_codes(b, w, o, five))


def _iter_q45_codes(b, w, o, five):
    """_q45_codes one pair of sub-blocks at a time (emitted when asked for: fewer live registers)."""
    q0 = 48 if five else 16
    m15, one, four = _const(I16, [15] * 16), _const(I16, [1] * 16), _const(I16, [4] * 16)
    for g in range(4):
        halves = [_words(b, w, b.add(o, _i64(q0 + 32 * g + 16 * h))) for h in range(2)]
        lows = [b.and_(q, m15) for q in halves]  # sub-block 2g
        highs = [b.lshr(q, four) for q in halves]  # sub-block 2g + 1
        if five:
            qh = [_words(b, w, b.add(o, _i64(16 + 16 * h))) for h in range(2)]

            def fifth(v, bit):
                return b.shl(b.and_(b.lshr(v, _const(I16, [bit] * 16)), one), four)

            lows = [b.or_(q, fifth(h, 2 * g)) for q, h in zip(lows, qh, strict=True)]
            highs = [b.or_(q, fifth(h, 2 * g + 1)) for q, h in zip(highs, qh, strict=True)]
        yield 2 * g, lows
        yield 2 * g + 1, highs


def _q45_k(five):
    def superblock(b, w, o, xq, xd, xs, xb, accs, corr):
        """One Q4_K/Q5_K super-block, x from block xb: accs += d sc_j xd_j (q . xq)_j over its 8 sub-blocks of 32;
        corr += dmin m_j xs_j. (Summing the 8 dot products by _lane_sums, as Q6_K does, was 0.92-0.99x here.)"""
        accs = list(accs)
        sc, m = _k4_scales_mins(b, w, o)
        xo8 = b.mul(xb, _i64(4))
        scale = b.fmul(b.fmul(sc, _splat(b, _half(b, w, o), 8), flags=FAST), _load(b, xd, xo8, V8F), flags=FAST)
        corr = _fma(b, b.fmul(m, _splat(b, _half(b, w, b.add(o, _i64(2))), 8), flags=FAST), _load(b, xs, xo8, V8F),
                    corr)
        for j, (c0, c1) in _iter_q45_codes(b, w, o, five):
            xo = b.mul(b.add(xb, _i64(j)), _i64(64))
            dot = b.add(_pairs(b, c0, xq, xo), _pairs(b, c1, xq, b.add(xo, _i64(32))))
            k = j % K_ACCS
            accs[k] = _fma(b, b.sitofp(dot, V8F), b.shuffle_vector(scale, scale, _const(I32, [j] * 8)), accs[k])
        return accs, corr
    return superblock


def _q6_bytes(b, w, o):
    """The codes of a Q6_K super-block (ql[128] | qh[64] | int8 scales[16] | d), minus 32, as bytes: one <32 x i8>
    per sub-block j = 0..7 (in order). Weight 128 h + 32 k + i has low bits ql[64 h + 32 (k & 1) + i] >> 4 (k >> 1)
    and top bits qh[32 h + i] >> 2 k, so a sub-block's 32 codes are made in one vector from 32 bytes of ql and 32
    of qh (half the vector instructions of decoding each 16 as int16)."""
    v32 = _vec(I8, 32)

    def c(v):
        return _const(I8, [v] * 32)

    for h in range(2):
        ql = [_load(b, w, b.add(o, _i64(64 * h + 32 * p)), v32) for p in range(2)]
        qh = _load(b, w, b.add(o, _i64(128 + 32 * h)), v32)
        for k in range(4):
            low = b.and_(ql[k & 1], c(15)) if k < 2 else b.lshr(ql[k & 1], c(4))
            top = b.shl(qh, c(4 - 2 * k)) if k < 2 else b.lshr(qh, c(2 * k - 4)) if k > 2 else qh
            yield b.sub(b.or_(low, b.and_(top, c(0x30))), c(32))


def _q6_codes(b, w, o):
    """_q6_bytes sign-extended by halves: [(sub-block j of 32, half, <16 x i16> codes, their int8 scale as i16)]
    for j = 0..7, half = 0, 1."""
    out = []
    for j, q in enumerate(_q6_bytes(b, w, o)):
        for half in range(2):
            codes = b.sext(b.shuffle_vector(q, q, _const(I32, range(16 * half, 16 * half + 16))), _vec(I16, 16))
            sc = b.sext(_load(b, w, b.add(o, _i64(192 + 2 * j + half)), I8), I16)
            out.append((j, half, codes, sc))
    return out


def _q6_k(b, w, o, xq, xd, xs, xb, accs, corr):
    """One Q6_K super-block, a scale per 16 weights: the 16 int32 dot products of codes and xq (16 products
    each, exact in float32 up to 2^24) summed by _lane_sums, converted, and multiplied by d sc_m xd_(m/2) as two
    vectors (the int16 scale multiply and the per-32 broadcasts it replaced were half of the kernel's work)."""
    accs = list(accs)
    d = _half(b, w, b.add(o, _i64(208)))
    dots = [_pairs(b, q, xq, b.add(b.mul(b.add(xb, _i64(j)), _i64(64)), _i64(32 * half)))
            for j, half, q, _ in _q6_codes(b, w, o)]  # in order of the scales: m = 2 j + half
    sc = b.sitofp(_load(b, w, b.add(o, _i64(192)), _vec(I8, 16)), V16F)
    xd8 = _load(b, xd, b.mul(xb, _i64(4)), V8F)
    scale = b.fmul(b.fmul(sc, b.shuffle_vector(xd8, xd8, _const(I32, [m // 2 for m in range(16)])), flags=FAST),
                   _splat(b, d, 16), flags=FAST)
    for g in range(2):
        lanes = b.shuffle_vector(scale, scale, _const(I32, [8 * g + m for m in LANE_SUMS_ORDER]))
        accs[g] = _fma(b, b.sitofp(_lane_sums(b, dots[8 * g:8 * g + 8]), V8F), lanes, accs[g])
    return accs, corr


def _emit_k_dequant(b, five_or_six, w, out, nsb):
    """nsb K-quant super-blocks at w -> float32 at out, with ggml's roundings: Q4_K/Q5_K (d sc) q - (dmin m),
    Q6_K (d sc) (q - 32)."""
    block_bytes = {4: 144, 5: 176, 6: 210}[five_or_six]

    def store(v, i, at):
        st = b.store(v, b.bitcast(b.gep(out, [b.add(b.mul(i, _i64(1024)), _i64(4 * at))]), V16F.as_pointer()))
        st.align = 4

    def one(i, _):
        o = b.mul(i, _i64(block_bytes))
        if five_or_six == 6:
            d = _half(b, w, b.add(o, _i64(208)))
            for j, half, q, sc in _q6_codes(b, w, o):
                dsc = _splat(b, b.fmul(d, b.sitofp(sc, F32)))
                store(b.fmul(dsc, b.sitofp(q, V16F)), i, 32 * j + 16 * half)
            return []
        sc, m = _k4_scales_mins(b, w, o)
        dsc = b.fmul(_splat(b, _half(b, w, o), 8), sc)
        dm = b.fmul(_splat(b, _half(b, w, b.add(o, _i64(2))), 8), m)
        for j, codes in _q45_codes(b, w, o, five_or_six == 5):
            scale = b.shuffle_vector(dsc, dsc, _const(I32, [j] * 16))
            minimum = b.shuffle_vector(dm, dm, _const(I32, [j] * 16))
            for half, c in enumerate(codes):
                store(b.fsub(b.fmul(scale, b.uitofp(c, V16F)), minimum), i, 32 * j + 16 * half)
        return []

    _loop(b, _i64(0), nsb, 1, [], one)


def _emit_k_dot(b, superblock, block_bytes: int, w, xq, xd, xs, nsb):
    """The K-quant dot product over nsb super-blocks of 256 weights at w, x given as for _emit_int_dot."""
    def body(i, vals):
        o = b.mul(i, _i64(block_bytes))
        _prefetch_span(b, w, o, block_bytes)
        accs, corr = superblock(b, w, o, xq, xd, xs, b.mul(i, _i64(8)), vals[:-1], vals[-1])
        return accs + [corr]

    zero = ir.Constant(V8F, [0.0] * 8)
    vals, _ = _loop(b, _i64(0), nsb, 1, [zero] * (K_ACCS + 1), body)
    acc = vals[0]
    for a in vals[1:-1]:
        acc = b.fadd(acc, a, flags=FAST)
    return b.fsub(_hsum(b, acc), _hsum(b, vals[-1]), flags=FAST)


def _make_dot_k(superblock, block_bytes: int):
    """dot(w, off, xq, xd, xs, xc, nsb) over nsb super-blocks of 256 weights, the activation given as for the
    32-weight formats (xc unused: K-quant codes have no offset to take out)."""
    return _int_dot_intrinsic(
        lambda b, w, xq, xd, xs, xc, nsb: _emit_k_dot(b, superblock, block_bytes, w, xq, xd, xs, nsb))


K_FORMATS = {"q4_k": (_q45_k(False), 144), "q5_k": (_q45_k(True), 176), "q6_k": (_q6_k, 210)}
dot_q4_k, dot_q5_k, dot_q6_k = (_make_dot_k(*K_FORMATS[k]) for k in K_FORMATS)
dequant_q4_k, dequant_q5_k, dequant_q6_k = (
    _dequant_intrinsic(lambda b, w, out, nsb, kind=kind: _emit_k_dequant(b, kind, w, out, nsb)) for kind in (4, 5, 6))


def standalone_module(name: str) -> str:
    """LLVM IR text of a module with one function `float dot(i8* w, i8* x, i8* xd, i8* xs, i8* xc, i64 n_blocks)`
    holding the dot product of format `name` ("q4_0", "q6_k", "f16", ...), outside numba: to check what a target
    compiles it to. x is the int16 copy of the activation for the 32-weight formats, else float32 (xd, xc
    unused)."""
    module = ir.Module(name=name)
    p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(F32, [p, p, p, p, p, I64]), name="dot")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, xp, xdp, xsp, xcp, nb = fn.args
    if name in INT_FORMATS:
        b.ret(_emit_int_dot(b, INT_FORMATS[name], w, xp, xdp, xsp, xcp, nb))
    elif name in K_FORMATS:
        b.ret(_emit_k_dot(b, *K_FORMATS[name], w, xp, xdp, xsp, nb))
    else:
        block = {"f32": _f32, "f16": _f16, "bf16": _bf16}[name]
        b.ret(_emit_dot(b, block, _FORMATS[block], w, xp, nb))
    return str(module)


INT_FORMATS = {  # name: (block decoder, bytes per block, offset, has a minimum)
    "q4_0": (_q4_0, 18, 8, False), "q4_1": (_q4_1, 20, 0, True), "q5_0": (_q5_0, 22, 16, False),
    "q5_1": (_q5_1, 24, 0, True), "q8_0": (_q8_0, 34, 0, False)}
dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0 = (_make_int_dot(INT_FORMATS[k]) for k in INT_FORMATS)
dequant_q4_0, dequant_q4_1, dequant_q5_0, dequant_q5_1, dequant_q8_0 = (_make_dequant(INT_FORMATS[k])
                                                                        for k in INT_FORMATS)
dot_f32 = _make_dot(_f32, 128)
dot_f16 = _make_dot(_f16, 64)
dot_bf16 = _make_dot(_bf16, 64)


@intrinsic
def prepare_rows(typingctx, x, xs, xq, xd, xc):
    """For x: (T, n) float32, per block b of 32 (n // 32 blocks): xs = sum, xd = max |x| / 32767, xq = rint(x 32767 /
    max |x|) as int16 (0 in an all-zero block) and xc = sum of xq, into xs, xd, xc: (T, n // 32) float32 and xq:
    (T, n) int16, all C-contiguous. The activation side of the int16 kernels (~0.5 ns per element)."""
    arrays = (x, xs, xq, xd, xc)
    if not (all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 2 for a in arrays)
            and xq.dtype == types.int16 and all(a.dtype == types.float32 for a in (x, xs, xd, xc))):
        return None
    sig = types.void(x, xs, xq, xd, xc)

    def codegen(context, b, signature, args):
        arr = [context.make_array(t)(context, b, a) for t, a in zip(signature.args, args, strict=True)]
        ptr = [b.bitcast(a.data, I8.as_pointer()) for a in arr]
        shape = cgutils.unpack_tuple(b, arr[0].shape, 2)
        nb, n = b.sdiv(shape[1], _i64(32)), shape[1]
        v32f, v32i = _vec(F32, 32), _vec(I32, 32)
        zero = ir.Constant(F32, 0.0)

        def row(t, _):
            def block(i, _):
                k = b.add(b.mul(t, nb), i)  # per-block index in the (T, nb) arrays
                v = _load(b, ptr[0], b.mul(b.add(b.mul(t, n), b.mul(i, _i64(32))), _i64(4)), v32f)
                total = _call(b, "llvm.vector.reduce.fadd.v32f32", F32, [zero, v], FAST)  # a tree, not a chain
                # max |x| as the largest of the bit patterns without the sign (an integer tree; the float reduction
                # is a serial chain of 31 NaN-checking steps): a third of prepare's time
                bits = b.and_(b.bitcast(v, v32i), _const(I32, [0x7FFFFFFF] * 32))
                top = b.bitcast(_call(b, "llvm.vector.reduce.umax.v32i32", I32, [bits]), F32)
                d = b.fmul(top, ir.Constant(F32, 1 / 32767))
                inv = b.select(b.fcmp_ordered(">", top, zero), b.fdiv(ir.Constant(F32, 32767.0), top), zero)
                q = b.fptosi(_call(b, "llvm.rint.v32f32", v32f, [b.fmul(v, _splat(b, inv, 32))]), v32i)
                st = b.store(b.trunc(q, _vec(I16, 32)),
                             b.bitcast(b.gep(ptr[2], [b.mul(b.add(b.mul(t, n), b.mul(i, _i64(32))), _i64(2))]),
                                       _vec(I16, 32).as_pointer()))
                st.align = 1
                qsum = b.sitofp(_call(b, "llvm.vector.reduce.add.v32i32", I32, [q]), F32)
                for p, val in ((ptr[1], total), (ptr[3], d), (ptr[4], qsum)):
                    b.store(val, b.bitcast(b.gep(p, [b.mul(k, _i64(4))]), F32.as_pointer()))
                return []

            _loop(b, _i64(0), nb, 1, [], block)
            return []

        _loop(b, _i64(0), shape[0], 1, [], row)
        return context.get_dummy_value()

    return sig, codegen


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
def max_f32(typingctx, x, n):
    """The largest of x[0:n] (n >= 1) for a C-contiguous float32 array x, 16 lanes at a time (numba's loop over
    max() stays a serial chain of scalar compares: 3 cycles per element)."""
    if not (isinstance(x, types.Array) and x.layout == "C" and x.dtype == types.float32):
        return None
    sig = types.float32(x, types.int64)

    def codegen(context, b, signature, args):
        xp = b.bitcast(context.make_array(signature.args[0])(context, b, args[0]).data, I8.as_pointer())
        n = args[1]

        def larger(u, v):
            return b.select(b.fcmp_ordered(">", u, v), u, v)

        first = _load(b, xp, _i64(0), F32)
        (acc,), i = _loop(b, _i64(0), n, 16, [_splat(b, first)],
                          lambda i, a: [larger(_load(b, xp, b.mul(i, _i64(4)), V16F), a[0])])
        top = _call(b, "llvm.vector.reduce.fmax.v16f32", F32, [acc], FAST)
        (top,), _ = _loop(b, i, n, 1, [top], lambda j, t: [larger(_load(b, xp, b.mul(j, _i64(4)), F32), t[0])])
        return top

    return sig, codegen


def _f32_cols(b, wp, row, c):
    """Values c .. c + 16 of a float32 row starting at byte `row`, and no scale."""
    return _load(b, wp, b.add(row, b.mul(c, _i64(4))), V16F), None


def _array_ptr(context, b, ty, arr, float_off=None):
    """i8* to the data of array `arr` (numba type ty), advanced by float_off float32 elements when given."""
    p = b.bitcast(context.make_array(ty)(context, b, arr).data, I8.as_pointer())
    return p if float_off is None else b.gep(p, [b.mul(float_off, _i64(4))])


def _by_count(b, count, most: int, emit) -> None:
    """Run emit(k) for k = count (1 <= count <= most, a run-time value): one copy of the code per k, so that
    each copy keeps exactly k heads' accumulators in registers."""
    fn = b.function
    done = fn.append_basic_block("by_count_done")
    switch = b.switch(count, done)
    for k in range(1, most + 1):
        block = fn.append_basic_block(f"by_count_{k}")
        switch.add_case(ir.Constant(I64, k), block)
        b.position_at_end(block)
        emit(k)
        b.branch(done)
    b.position_at_end(done)


GROUP_DOTS = 8  # query heads whose scores one pass over the key rows takes (one lane each of a lane-sum vector)
GROUP_ROWS = 4  # query heads whose weighted value sums one pass takes: 4 x 16 columns of accumulators, which
# with the row and the weights fill AVX2's 16 registers


def _group_intrinsic(emit):
    """An intrinsic f(w, off, stride, n, a, aoff, astride, heads, width, out, ooff, ostride) over the n rows of a
    KV head at byte off + s stride of the C-contiguous array w, for `heads` query heads whose float32 vectors
    start at a[aoff + g astride] and whose results go to out[ooff + g ostride]; emit(builder, row pointer,
    stride, n, a pointer, astride, heads, width, out pointer, ostride) writes its body."""

    @intrinsic
    def kernel(typingctx, w, off, stride, n, a, aoff, astride, heads, width, out, ooff, ostride):
        ok = all(isinstance(x, types.Array) and x.layout == "C" for x in (w, a, out))
        if not ok or a.dtype != types.float32 or out.dtype != types.float32:
            return None
        i64 = types.int64
        sig = types.void(w, i64, i64, i64, a, i64, i64, i64, i64, out, i64, i64)

        def codegen(context, b, signature, args):
            wp = b.gep(_array_ptr(context, b, signature.args[0], args[0]), [args[1]])
            ap = _array_ptr(context, b, signature.args[4], args[4], args[5])
            op = _array_ptr(context, b, signature.args[9], args[9], args[10])
            emit(b, wp, args[2], args[3], ap, args[6], args[7], args[8], op, args[11])
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def make_group_dots(cols):
    """group_dots(w, off, stride, n, q, qoff, qstride, heads, width, scores, soff, sstride): for heads g <
    `heads` (1 .. GROUP_DOTS) and rows s < n, scores[soff + g sstride + s] = q[qoff + g qstride :][:width] . row s,
    row s starting at byte off + s stride of the C-contiguous array w (the keys of one KV head in a cache) and
    cols(builder, base, row byte, column) -> (16 floats, their scale or None) decoding it; width a multiple of
    16. The query heads of a GQA group share their keys: each row is decoded once for all of them, and their
    sums are reduced together (one lane-sum tree for 8 heads instead of a horizontal sum per head)."""
    zero = ir.Constant(V8F, [0.0] * 8)
    order = [LANE_SUMS_ORDER.index(g) for g in range(8)]  # the lane holding head g's sum

    def body(b, wp, stride, n, qp, qstride, heads, width, sp, sstride):
        def emit(k):
            def row(s, _):
                at = b.mul(s, stride)

                def chunk(c, accs):
                    v, d = cols(b, wp, at, c)
                    if d is not None:
                        v = b.fmul(v, _splat(b, d), flags=FAST)
                    halves = [b.shuffle_vector(v, v, _const(I32, range(h, h + 8))) for h in (0, 8)]
                    new = []
                    for g, a in enumerate(accs):
                        qo = b.mul(b.add(b.mul(_i64(g), qstride), c), _i64(4))
                        for h, half in enumerate(halves):
                            a = _fma(b, half, _load(b, qp, b.add(qo, _i64(32 * h)), V8F), a)
                        new.append(a)
                    return new

                accs, _ = _loop(b, _i64(0), width, 16, [zero] * k, chunk)
                sums = _lane_sums(b, accs + [zero] * (8 - k), b.fadd)
                for g in range(k):
                    at_s = b.mul(b.add(b.mul(_i64(g), sstride), s), _i64(4))
                    st = b.store(b.extract_element(sums, ir.Constant(I32, order[g])),
                                 b.bitcast(b.gep(sp, [at_s]), F32.as_pointer()))
                    st.align = 4
                return []

            _loop(b, _i64(0), n, 1, [], row)

        _by_count(b, heads, GROUP_DOTS, emit)

    return _group_intrinsic(body)


def make_group_weighted_rows(cols):
    """group_weighted_rows(w, off, stride, n, p, poff, pstride, heads, width, out, ooff, ostride): for heads g <
    `heads` (1 .. GROUP_ROWS), out[ooff + g ostride :][:width] += sum over s < n of p[poff + g pstride + s] * row
    s, where row s starts at byte off + s stride of the C-contiguous array w (the values of one KV head in a
    cache) and cols(builder, base, row byte, column) -> (16 floats, their scale or None) decodes it. Each pass
    over the rows decodes a run of columns once for all the heads; `width` must be a multiple of 16."""
    zero = ir.Constant(V16F, [0.0] * 16)

    def body(b, wp, stride, n, pp, pstride, heads, width, op, ostride):
        def emit(k):
            m = max(1, GROUP_ROWS // k)  # 16-column vectors per head in a pass: k * m accumulators

            def chunk(c0, m):
                """Columns c0 .. c0 + 16 m of every head: accumulate over the rows, then add into out."""
                def row(s, accs):
                    at = b.mul(s, stride)
                    weights = [_load(b, pp, b.mul(b.add(b.mul(_i64(g), pstride), s), _i64(4)), F32)
                               for g in range(k)]
                    new = list(accs)
                    for j in range(m):
                        v, d = cols(b, wp, at, b.add(c0, _i64(16 * j)))
                        if d is not None:  # once for all the heads (not into each head's weight)
                            v = b.fmul(v, _splat(b, d), flags=FAST)
                        for g in range(k):
                            new[g * m + j] = _fma(b, v, _splat(b, weights[g]), new[g * m + j])
                    return new

                accs, _ = _loop(b, _i64(0), n, 1, [zero] * (k * m), row)
                for g in range(k):
                    for j in range(m):
                        o = b.mul(b.add(b.mul(_i64(g), ostride), b.add(c0, _i64(16 * j))), _i64(4))
                        ptr = b.bitcast(b.gep(op, [o]), V16F.as_pointer())
                        old = b.load(ptr)
                        old.align = 4
                        st = b.store(b.fadd(old, accs[g * m + j], flags=FAST), ptr)
                        st.align = 4

            (c0,), _ = _loop(b, _i64(0), b.sdiv(width, _i64(16 * m)), 1, [_i64(0)],
                             lambda i, c: (chunk(c[0], m), [b.add(c[0], _i64(16 * m))])[1])
            if m > 1:
                _loop(b, _i64(0), b.sdiv(b.srem(width, _i64(16 * m)), _i64(16)), 1, [c0],
                      lambda i, c: (chunk(c[0], 1), [b.add(c[0], _i64(16))])[1])

        _by_count(b, heads, GROUP_ROWS, emit)

    return _group_intrinsic(body)


group_dots_f32 = make_group_dots(_f32_cols)  # rows of float32 (an f32 KV cache)
group_weighted_rows_f32 = make_group_weighted_rows(_f32_cols)
