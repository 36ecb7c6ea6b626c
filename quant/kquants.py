"""K-quant quantizers (Q2_K..Q6_K), Numba-parallel over rows, byte-identical to ggml's.

A K-quant super-block holds 256 weights: sub-blocks of 16 or 32 weights, each with its own scale
(and min), and those scales quantized again to 4, 6 or 8 bits against one or two float16 super-scales.
Without importance weights the rounding is ggml's reference one (quantize_row_qN_K_ref: what
llama-quantize writes without an imatrix); with them it is ggml's imatrix one (quantize_qN_K with
quant_weights), which `--optimize` feeds with the per-column importance from llmcli/calibrate.py.

Everything is float32 arithmetic in ggml's order (ggml-base is built without FMA contraction), ints are
converted to float32 before they meet a float, and every C narrowing (uint8_t, int8_t) is written out.

Block layouts (bytes):
  Q2_K  84: scales[16] (low nibble scale, high nibble min) | qs[64] 2-bit | d | dmin
  Q3_K 110: hmask[32] high bits | qs[64] 2-bit | scales[12] 6-bit signed+32 | d
  Q4_K 144: d | dmin | scales[12] 6-bit scale/min pairs | qs[128] 4-bit
  Q5_K 176: d | dmin | scales[12] | qh[32] high bits | qs[128] 4-bit
  Q6_K 210: ql[128] 4-bit | qh[64] 2-bit | scales[16] int8 | d
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from quant.formats import GGMLQuantizationType
from quant.jit import njit, prange
from quant.quantize import _F16_TO_F32, _f16_bits, _put_u16, bits_lut, read_block

Q = GGMLQuantizationType
QK_K = 256
_KIND = {Q.Q2_K: 0, Q.Q3_K: 1, Q.Q4_K: 2, Q.Q5_K: 3, Q.Q6_K: 4}
K_TYPES = frozenset(_KIND)

f32 = np.float32
# per-thread work arrays: codes (int32), error weights, sub-block scales/mins and their codes, and the
# transposed groups of _make_*_lanes
_Scratch = namedtuple("_Scratch", "L w scales mins sw Ls Lm X W LT LA V")
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero


# ---- scalar helpers ------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _nearest(v):
    """ggml's nearest_int: round half to even."""
    return int(np.rint(v))


@njit(cache=True, inline="always")
def _u8(v):
    return v & 0xFF


@njit(cache=True, inline="always")
def _i8(v):
    return ((v + 128) & 0xFF) - 128


@njit(cache=True, inline="always")
def _fclamp(v, lo, hi):
    """An integral float clamped to [lo, hi]: the codes of the lane searches stay float32 (no int64
    conversion, which AVX2 cannot vectorize); exact, as every value is a small integer."""
    return lo if v < lo else (hi if v > hi else v)


@njit(cache=True, inline="always")
def _half(v, lut):
    """float32 -> its float16 bits and the float32 value they hold."""
    bits = _f16_bits(v)
    return bits, lut[bits]


# ---- per-group scale searches (ggml's make_*_quants) -----------------------------------------------------

@njit(cache=True, inline="always")
def _signed_absmax(n, x):
    """(max |x[i]|, the x[i] it comes from): ggml's searches scale by the signed extreme."""
    mx = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return amax, mx


@njit(cache=True)
def _make_qx_quants(n, nmax, x, L, qw, use_qw):
    """Symmetric codes in [-nmax, nmax): L = code + nmax. Error weights qw, or x² (rmse_type 1)."""
    amax, mx = _signed_absmax(n, x)
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / mx
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i] if use_qw else x[i] * x[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / mx
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            w = qw[i] if use_qw else x[i] * x[i]
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def _make_q3_quants(n, nmax, x, L):
    """Q3_K's reference search: codes in [-nmax, nmax) refined one at a time (5 passes); L = code + nmax."""
    amax, mx = _signed_absmax(n, x)
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / mx
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = f32(L[i])
            slx = sumlx - w * x[i] * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, _nearest(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = f32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@njit(cache=True)
def _make_qp_quants(n, nmax, x, L, qw):
    """Non-negative codes in [0, nmax] for the sub-block scales themselves (imatrix path); L as uint8."""
    mx = f32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = _u8(_nearest(iscale * x[i]))
    scale = f32(1.0) / iscale
    best_mse = f32(0.0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / mx
        scale_is = f32(1.0) / iscale_is
        mse = f32(0.0)
        for i in range(n):
            l = min(nmax, _nearest(iscale_is * x[i]))
            diff = x[i] - scale_is * f32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = min(nmax, _nearest(iscale * x[i]))
        L[i] = _u8(l)
        w = qw[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = f32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = f32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = _u8(new_l)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


# ---- the same searches, for all the groups of a super-block at once --------------------------------------
# X, W: (n, G) = weight i of group g, transposed so that the inner loop runs over groups: each group keeps
# its own sums in ggml's order (exact), while one vector instruction serves 8 groups. V: (16, 16) float32
# rows of per-group temporaries. Divisions are guarded, so error_model="numpy" only drops the checks.

@njit(cache=True, error_model="numpy")
def _make_qkx_lanes(n, G, nmax, X, W, L, La, V, rmin, rdelta, nstep, use_mad, scales, mins):
    """ggml's make_qkx2_quants (= make_qkx3 with weights) for G groups of n: affine codes in [0, nmax]
    (w = scale * L - the_min) into L[:n, :G], scale and the_min into scales/mins[:G]."""
    fmax = f32(nmax)
    mn, mx, sw, sx, isc, sc, best, sl = V[0], V[1], V[2], V[3], V[4], V[5], V[6], V[7]
    sl2, sxl, cur, ts, tm, ok, flat = V[8], V[9], V[10], V[11], V[12], V[13], V[14]
    for g in range(G):
        mn[g] = X[0, g]
        mx[g] = X[0, g]
        sw[g] = W[0, g]
        sx[g] = W[0, g] * X[0, g]
    for i in range(1, n):
        for g in range(G):
            xi = X[i, g]
            mn[g] = xi if xi < mn[g] else mn[g]
            mx[g] = xi if xi > mx[g] else mx[g]
            sw[g] += W[i, g]
            sx[g] += W[i, g] * xi
    for g in range(G):
        if mn[g] > 0:
            mn[g] = f32(0.0)
        flat[g] = f32(1.0) if mx[g] == mn[g] else f32(0.0)
        rg = mx[g] - mn[g]
        isc[g] = f32(nmax) / rg if rg != 0 else f32(0.0)
        sc[g] = f32(1.0) / isc[g] if isc[g] != 0 else f32(0.0)
        best[g] = f32(0.0)
    for i in range(n):
        for g in range(G):
            l = _fclamp(np.rint(isc[g] * (X[i, g] - mn[g])), f32(0.0), fmax)
            L[i, g] = l
            diff = sc[g] * l + mn[g] - X[i, g]
            diff = abs(diff) if use_mad else diff * diff
            best[g] += W[i, g] * diff
    if nstep >= 1:
        for step in range(nstep + 1):
            num = rmin + rdelta * f32(step) + f32(nmax)
            for g in range(G):
                rg = mx[g] - mn[g]  # the min moves when a candidate wins
                isc[g] = num / rg if rg != 0 else f32(0.0)
                sl[g] = f32(0.0)
                sl2[g] = f32(0.0)
                sxl[g] = f32(0.0)
            for i in range(n):
                for g in range(G):
                    fl = _fclamp(np.rint(isc[g] * (X[i, g] - mn[g])), f32(0.0), fmax)
                    La[i, g] = fl
                    w = W[i, g]
                    sl[g] += w * fl
                    sl2[g] += w * fl * fl
                    sxl[g] += w * fl * X[i, g]
            for g in range(G):
                D = sw[g] * sl2[g] - sl[g] * sl[g]
                ok[g] = f32(1.0) if D > 0 else f32(0.0)
                Ds = D if D > 0 else f32(1.0)
                this_scale = (sw[g] * sxl[g] - sx[g] * sl[g]) / Ds
                this_min = (sl2[g] * sx[g] - sl[g] * sxl[g]) / Ds
                if this_min > 0:
                    this_min = f32(0.0)
                    this_scale = sxl[g] / sl2[g] if sl2[g] != 0 else f32(0.0)
                ts[g] = this_scale
                tm[g] = this_min
                cur[g] = f32(0.0)
            for i in range(n):
                for g in range(G):
                    diff = ts[g] * La[i, g] + tm[g] - X[i, g]
                    diff = abs(diff) if use_mad else diff * diff
                    cur[g] += W[i, g] * diff
            for g in range(G):
                if ok[g] != 0 and cur[g] < best[g]:
                    for i in range(n):
                        L[i, g] = La[i, g]
                    best[g] = cur[g]
                    sc[g] = ts[g]
                    mn[g] = tm[g]
    for g in range(G):
        if flat[g] != 0:
            for i in range(n):
                L[i, g] = 0
            sc[g] = f32(0.0)
        scales[g] = sc[g]
        mins[g] = -mn[g]


@njit(cache=True, error_model="numpy")
def _make_qx_lanes(n, G, nmax, X, W, use_w, L, La, V, scales):
    """_make_qx_quants (rmse_type 1) for G groups of n: codes + nmax into L[:n, :G], scales[:G]."""
    amax, mx, isc, slx, sl2, sc, best = V[0], V[1], V[2], V[3], V[4], V[5], V[6]
    for g in range(G):
        amax[g] = f32(0.0)
        mx[g] = f32(0.0)
    for i in range(n):
        for g in range(G):
            ax = abs(X[i, g])
            bigger = ax > amax[g]
            mx[g] = X[i, g] if bigger else mx[g]
            amax[g] = ax if bigger else amax[g]
    for g in range(G):
        isc[g] = f32(-nmax) / mx[g] if amax[g] >= _EPS else f32(0.0)
        slx[g] = f32(0.0)
        sl2[g] = f32(0.0)
    lo, hi, off = f32(-nmax), f32(nmax - 1), f32(nmax)
    for i in range(n):
        for g in range(G):
            fl = _fclamp(np.rint(isc[g] * X[i, g]), lo, hi)
            L[i, g] = fl + off
            w = W[i, g] if use_w else X[i, g] * X[i, g]
            slx[g] += w * X[i, g] * fl
            sl2[g] += w * fl * fl
    for g in range(G):
        sc[g] = slx[g] / sl2[g] if sl2[g] != 0 else f32(0.0)
        best[g] = sc[g] * slx[g]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(f32(nmax) + f32(0.1) * f32(step))
        for g in range(G):
            isc[g] = num / mx[g] if amax[g] >= _EPS else f32(0.0)
            slx[g] = f32(0.0)
            sl2[g] = f32(0.0)
        for i in range(n):
            for g in range(G):
                fl = _fclamp(np.rint(isc[g] * X[i, g]), lo, hi)
                La[i, g] = fl + off
                w = W[i, g] if use_w else X[i, g] * X[i, g]
                slx[g] += w * X[i, g] * fl
                sl2[g] += w * fl * fl
        for g in range(G):
            if sl2[g] > 0 and slx[g] * slx[g] > best[g] * sl2[g]:
                for i in range(n):
                    L[i, g] = La[i, g]
                sc[g] = slx[g] / sl2[g]
                best[g] = sc[g] * slx[g]
    for g in range(G):
        if amax[g] < _EPS:
            for i in range(n):
                L[i, g] = 0
            sc[g] = f32(0.0)
        scales[g] = sc[g]


# ---- packing ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _pack_2bit(L, out, off):
    """256 2-bit codes: byte l of each 32-byte run holds codes l, l+32, l+64, l+96 of its 128."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[off + j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@njit(cache=True, inline="always")
def _pack_scale_min_k4(ls, lm, out, off):
    """Q4_K/Q5_K's 12 bytes of eight 6-bit (scale, min) pairs."""
    for j in range(12):
        out[off + j] = 0
    for j in range(8):
        if j < 4:
            out[off + j] = ls[j]
            out[off + j + 4] = lm[j]
        else:
            out[off + j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            out[off + j - 4] = np.int64(out[off + j - 4]) | ((ls[j] >> 4) << 6)
            out[off + j] = np.int64(out[off + j]) | ((lm[j] >> 4) << 6)


@njit(cache=True, inline="always")
def _scale_min_k4(j, out, off):
    if j < 4:
        return np.int64(out[off + j]) & 63, np.int64(out[off + j + 4]) & 63
    sc = (np.int64(out[off + j + 4]) & 0xF) | ((np.int64(out[off + j - 4]) >> 6) << 4)
    m = (np.int64(out[off + j + 4]) >> 4) | ((np.int64(out[off + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _pack_q3_scales(ls, out, off):
    """Q3_K's 12 bytes of sixteen 6-bit scales (already offset by 32)."""
    for j in range(12):
        out[off + j] = 0
    for j in range(16):
        l = ls[j]
        if j < 8:
            out[off + j] = l & 0xF
        else:
            out[off + j - 8] = np.int64(out[off + j - 8]) | ((l & 0xF) << 4)
        out[off + 8 + j % 4] = np.int64(out[off + 8 + j % 4]) | ((l >> 4) << (2 * (j // 4)))


@njit(cache=True, inline="always")
def _q3_scale(j, out, off):
    sc = (np.int64(out[off + j]) & 0xF) if j < 8 else (np.int64(out[off + j - 8]) >> 4)
    return (sc | (((np.int64(out[off + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


# ---- one super-block per type ---------------------------------------------------------------------------

@njit(cache=True)
def _q2_k(x, qw, use_qw, out, off, lut, s):
    L, scales, mins, sw, Ls, Lm = s.L, s.scales, s.mins, s.sw, s.Ls, s.Lm
    X, W, LT = s.X, s.W, s.LT
    for j in range(16):
        for l in range(16):
            X[l, j] = x[16 * j + l]
    if not use_qw:
        for j in range(16):
            for l in range(16):
                W[l, j] = abs(x[16 * j + l])
        _make_qkx_lanes(16, 16, 3, X, W, LT, s.LA, s.V, f32(-0.5), f32(0.1), 15, True, scales, mins)
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(16):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            iscale = f32(15.0) / max_scale
            for j in range(16):
                out[off + j] = _u8(_nearest(iscale * scales[j]))
            _put_u16(out, off + 80, _f16_bits(max_scale / f32(15.0)))
        else:
            for j in range(16):
                out[off + j] = 0
            _put_u16(out, off + 80, 0)
        if max_min > 0:
            iscale = f32(15.0) / max_min
            for j in range(16):
                out[off + j] = _u8(np.int64(out[off + j]) | (_nearest(iscale * mins[j]) << 4))
            _put_u16(out, off + 82, _f16_bits(max_min / f32(15.0)))
        else:
            _put_u16(out, off + 82, 0)
        dm = lut[np.int64(out[off + 80]) | (np.int64(out[off + 81]) << 8)]
        mm = lut[np.int64(out[off + 82]) | (np.int64(out[off + 83]) << 8)]
    else:
        sumx2 = f32(0.0)
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = sumx2 / f32(QK_K)
        for j in range(16):
            sw[j] = f32(0.0)
            for l in range(16):
                W[l, j] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
            for l in range(16):
                sw[j] += W[l, j]
        _make_qkx_lanes(16, 16, 3, X, W, LT, s.LA, s.V, f32(-0.9), f32(0.05), 36, False, scales, mins)
        dbits, dm = _half(_make_qp_quants(16, 15, scales, Ls, sw), lut)
        mbits, mm = _half(_make_qp_quants(16, 15, mins, Lm, sw), lut)
        _put_u16(out, off + 80, dbits)
        _put_u16(out, off + 82, mbits)
        for j in range(16):
            out[off + j] = _u8(Ls[j] | (Lm[j] << 4))
    for j in range(16):
        for l in range(16):
            L[16 * j + l] = np.int32(LT[l, j])
    for j in range(16):
        d = dm * f32(np.int64(out[off + j]) & 0xF)
        if d == 0:
            continue
        m = mm * f32(np.int64(out[off + j]) >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, _nearest((x[16 * j + ii] + m) / d)))
    _pack_2bit(L, out, off + 16)


@njit(cache=True)
def _q3_k(x, qw, use_qw, out, off, lut, s):
    L, w, scales, sw, Ls = s.L, s.w, s.scales, s.sw, s.Ls
    if not use_qw:
        max_scale = f32(0.0)
        amax = f32(0.0)
        for j in range(16):
            sc = _make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
            scales[j] = sc
            if abs(sc) > amax:
                amax = abs(sc)
                max_scale = sc
        if max_scale != 0:
            iscale = f32(-32.0) / max_scale
            for j in range(16):
                Ls[j] = max(-32, min(31, _i8(_nearest(iscale * scales[j])))) + 32
            _pack_q3_scales(Ls, out, off + 96)
            _put_u16(out, off + 108, _f16_bits(f32(1.0) / iscale))
        else:
            for j in range(12):
                out[off + 96 + j] = 0
            _put_u16(out, off + 108, 0)
    else:
        sumx2 = f32(0.0)
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for j in range(16):
            for l in range(16):
                w[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
            sumw = f32(0.0)
            for l in range(16):
                sumw += w[l]
            sw[j] = sumw
            scales[j] = _make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], w, True)
        d_block = _make_qx_quants(16, 32, scales, Ls, sw, True)
        _pack_q3_scales(Ls, out, off + 96)
        _put_u16(out, off + 108, _f16_bits(d_block))
    dall = lut[np.int64(out[off + 108]) | (np.int64(out[off + 109]) << 8)]
    for j in range(16):
        d = dall * f32(_q3_scale(j, out, off + 96))
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, _nearest(x[16 * j + ii] / d))) + 4
    # high bit of code j into bit j // 32 of hmask[j % 32]
    for m in range(32):
        out[off + m] = 0
    for j in range(QK_K):
        if L[j] > 3:
            out[off + j % 32] = np.int64(out[off + j % 32]) | (1 << (j // 32))
            L[j] -= 4
    _pack_2bit(L, out, off + 32)


@njit(cache=True)
def _q45_k(x, qw, use_qw, out, off, lut, s, nmax):
    """Q4_K (nmax 15) and Q5_K (nmax 31): eight 32-weight sub-blocks with 6-bit scales and mins."""
    L, scales, mins, sw, Ls, Lm = s.L, s.scales, s.mins, s.sw, s.Ls, s.Lm
    X, W, LT = s.X, s.W, s.LT
    for j in range(8):
        for l in range(32):
            X[l, j] = x[32 * j + l]
    if not use_qw:
        rmin, nstep = (f32(-1.0), 20) if nmax == 15 else (f32(-0.5), 15)
        for j in range(8):
            sum_x2 = f32(0.0)
            for l in range(32):
                sum_x2 += x[32 * j + l] * x[32 * j + l]
            av_x = np.sqrt(sum_x2 / f32(32.0))
            for l in range(32):
                W[l, j] = av_x + abs(x[32 * j + l])
        _make_qkx_lanes(32, 8, nmax, X, W, LT, s.LA, s.V, rmin, f32(0.1), nstep, False, scales, mins)
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(8):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
        inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
        for j in range(8):
            Ls[j] = min(63, _u8(_nearest(inv_scale * scales[j])))
            Lm[j] = min(63, _u8(_nearest(inv_min * mins[j])))
        dbits = _f16_bits(max_scale / f32(63.0))
        mbits = _f16_bits(max_min / f32(63.0))
    else:
        sum_x2 = f32(0.0)
        for l in range(QK_K):
            sum_x2 += x[l] * x[l]
        sigma2 = f32(2.0) * sum_x2 / f32(QK_K)
        for j in range(8):
            for l in range(32):
                W[l, j] = qw[32 * j + l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l])
            sumw = f32(0.0)
            for l in range(32):
                sumw += W[l, j]
            sw[j] = sumw
        _make_qkx_lanes(32, 8, nmax, X, W, LT, s.LA, s.V, f32(-0.9), f32(0.05), 36, False, scales, mins)
        dbits = _f16_bits(_make_qp_quants(8, 63, scales[:8], Ls, sw))
        mbits = _f16_bits(_make_qp_quants(8, 63, mins[:8], Lm, sw))
        for j in range(8):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    for j in range(8):
        for l in range(32):
            L[32 * j + l] = np.int32(LT[l, j])
    _pack_scale_min_k4(Ls, Lm, out, off + 4)
    _put_u16(out, off, dbits)
    _put_u16(out, off + 2, mbits)
    dall = lut[dbits]
    mall = lut[mbits]
    for j in range(8):
        sc, m = _scale_min_k4(j, out, off + 4)
        d = dall * f32(sc)
        if d == 0:
            continue
        dm = mall * f32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, _nearest((x[32 * j + ii] + dm) / d)))
    if nmax == 15:
        for j in range(0, QK_K, 64):
            for l in range(32):
                out[off + 16 + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)
    else:
        for j in range(32):
            out[off + 16 + j] = 0
        m1 = 1
        m2 = 2
        for n in range(0, QK_K, 64):
            for j in range(32):
                l1 = L[n + j]
                if l1 > 15:
                    l1 -= 16
                    out[off + 16 + j] = np.int64(out[off + 16 + j]) | (m1)
                l2 = L[n + j + 32]
                if l2 > 15:
                    l2 -= 16
                    out[off + 16 + j] = np.int64(out[off + 16 + j]) | (m2)
                out[off + 48 + n // 2 + j] = l1 | (l2 << 4)
            m1 <<= 2
            m2 <<= 2


@njit(cache=True)
def _q6_k(x, qw, use_qw, out, off, lut, s):
    L, scales, X, W, LT = s.L, s.scales, s.X, s.W, s.LT
    for j in range(16):
        for l in range(16):
            X[l, j] = x[16 * j + l]
            W[l, j] = qw[16 * j + l]
    _make_qx_lanes(16, 16, 32, X, W, use_qw, LT, s.LA, s.V, scales)
    for j in range(16):
        for l in range(16):
            L[16 * j + l] = np.int32(LT[l, j])
    max_scale = f32(0.0)
    max_abs = f32(0.0)
    for ib in range(16):
        sc = scales[ib]
        if abs(sc) > max_abs:
            max_abs = abs(sc)
            max_scale = sc
    if max_abs < _EPS:
        for j in range(210):
            out[off + j] = 0
        return
    iscale = f32(-128.0) / max_scale
    dbits, dall = _half(f32(1.0) / iscale, lut)
    _put_u16(out, off + 208, dbits)
    for ib in range(16):
        out[off + 192 + ib] = _u8(_i8(min(127, _nearest(iscale * scales[ib]))))
    for j in range(16):
        d = dall * f32(_i8(np.int64(out[off + 192 + j])))
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, _nearest(x[16 * j + ii] / d))) + 32
    for j in range(0, QK_K, 128):
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            out[off + j // 2 + l] = q1 | (q3 << 4)
            out[off + j // 2 + l + 32] = q2 | (q4 << 4)
            out[off + 128 + j // 4 + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                           | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))


# ---- drivers: rows in parallel ---------------------------------------------------------------------------

_SIZES = (84, 110, 144, 176, 210)


@njit(cache=True)
def _quantize_superblock(x, qw, use_qw, out, off, kind, lut, s):
    if kind == 0:
        _q2_k(x, qw, use_qw, out, off, lut, s)
    elif kind == 1:
        _q3_k(x, qw, use_qw, out, off, lut, s)
    elif kind == 2:
        _q45_k(x, qw, use_qw, out, off, lut, s, 15)
    elif kind == 3:
        _q45_k(x, qw, use_qw, out, off, lut, s, 31)
    else:
        _q6_k(x, qw, use_qw, out, off, lut, s)


@njit(cache=True, inline="always")
def _scratch():
    return _Scratch(np.zeros(QK_K, np.int32), np.zeros(32, np.float32),
                    np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
                    np.zeros(16, np.int32), np.zeros(16, np.int32), np.zeros((32, 16), np.float32),
                    np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32),
                    np.zeros((16, 16), np.float32))


@njit(parallel=True, cache=True, nogil=True)
def _quantize_k_rows(src, src_lut, out, kind, qw, use_qw, lut):
    # src: (rows, cols) float32, or uint16 bit patterns decoded by src_lut; qw: (cols,) float32 importance
    # (ignored unless use_qw); out: (rows, cols // 256 * type_size) uint8
    rows, cols = src.shape
    size = _SIZES[kind]
    for r in prange(rows):
        x = np.empty(QK_K, dtype=np.float32)
        s = _scratch()
        orow = out[r]
        for b in range(cols // QK_K):
            read_block(src, src_lut, r, b, x)  # x: (QK_K,)
            _quantize_superblock(x, qw[b * QK_K:(b + 1) * QK_K], use_qw, orow, b * size, kind, lut, s)


def quantize_k_rows(rows: np.ndarray, qtype: GGMLQuantizationType, source: str = "f32",
                    col_weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize (n_rows, n_cols) rows into K-quant bytes: (n_rows, n_cols // 256 * type_size) uint8.

    `rows` is float32 when source == "f32", else the uint16 bits of "f16" / "bf16" values. With
    `col_weights` (n_cols,), the importance of each column, the search is ggml's imatrix one.
    """
    if rows.ndim != 2:
        raise ValueError(f"quantize_k_rows needs a 2-D array, got shape {rows.shape}")
    n_rows, n_cols = rows.shape
    if n_cols % QK_K:
        raise ValueError(f"row length {n_cols} is not a multiple of {QK_K}")
    kind = _KIND[qtype]
    if out is None:
        out = np.empty((n_rows, n_cols // QK_K * _SIZES[kind]), dtype=np.uint8)
    use_qw = col_weights is not None
    qw = np.zeros(n_cols, np.float32) if col_weights is None else np.ascontiguousarray(col_weights, np.float32)
    if qw.shape != (n_cols,):
        raise ValueError(f"col_weights has shape {qw.shape}, expected ({n_cols},)")
    f32_src = source == "f32"
    src = np.ascontiguousarray(rows, dtype=np.float32) if f32_src else np.ascontiguousarray(rows)
    _quantize_k_rows(src, _F16_TO_F32 if f32_src else bits_lut(source), out, kind, qw, use_qw, _F16_TO_F32)
    return out
