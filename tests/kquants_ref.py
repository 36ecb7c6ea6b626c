"""A pure-numpy transcription of ggml's K-quant quantizers (ggml-quants.c), the oracle for quant/kquants.py.

Written independently of the Numba code: every block of a tensor is processed at once (arrays of shape
(blocks, n)), each C loop over the weights of a group becomes a Python loop over columns that keeps the
C summation order, and every C branch becomes a mask. All arithmetic is float32 (numpy 2's weak Python
scalars keep it so). A C `break` out of a refinement loop is dropped: a pass that changes nothing leaves
the state as it was, so further passes change nothing either.

`quantize(x, qtype, qw=None)`: x (rows, cols) float32 -> (rows, cols // 256 * type_size) uint8; with qw
(cols,) the imatrix variant (quantize_qN_K with quant_weights), else the reference one.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

F = np.float32
EPS = F(1e-15)
SIZES = {Q.Q2_K: 84, Q.Q3_K: 110, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def _nearest(v):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.rint(v).astype(np.int64)


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (a / b).astype(F)


def _f16(v):
    """float32 -> (float16 bits, the float32 they decode to)."""
    h = np.asarray(v, F).astype(np.float16)
    return h.view(np.uint16), h.astype(F)


def _wsum(w, a, b=None):
    """Sequential sum over columns of w*a (or w*a*b), as a C loop adds them."""
    s = np.zeros(w.shape[0], F)
    for i in range(w.shape[1]):
        t = w[:, i] * a[:, i]
        if b is not None:
            t = t * b[:, i]
        s = s + t
    return s


def make_qx_quants(nmax, x, qw=None):
    """-> (scale (B,), codes + nmax (B, n))"""
    B, n = x.shape
    idx = np.argmax(np.abs(x), axis=1)  # the first of the largest magnitudes, as the strict '>' scan finds
    mx = x[np.arange(B), idx]
    zero = np.abs(mx) < EPS
    mx = np.where(zero, F(1), mx)
    w = qw if qw is not None else x * x

    def trial(iscale):
        l = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F)
        return l, _wsum(w, x, lf), _wsum(w, lf, lf)

    l, sumlx, suml2 = trial(_div(F(-nmax), mx))
    L = l + nmax
    scale = np.where(suml2 != 0, _div(sumlx, suml2), F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = trial(_div(-(F(nmax) + F(0.1) * F(step)), mx))
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(upd[:, None], l + nmax, L)
        scale = np.where(upd, _div(slx, sl2), scale)
        best = np.where(upd, scale * slx, best)
    return np.where(zero, F(0), scale), np.where(zero[:, None], 0, L)


def make_q3_quants(nmax, x):
    B, n = x.shape
    idx = np.argmax(np.abs(x), axis=1)
    mx = x[np.arange(B), idx]
    zero = np.abs(mx) < EPS
    mx = np.where(zero, F(1), mx)
    L = np.clip(_nearest(_div(F(-nmax), mx)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    lf = L.astype(F)
    sumlx, suml2 = _wsum(w, x, lf), _wsum(w, lf, lf)
    for _ in range(5):
        for i in range(n):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F)
            slx = sumlx - wi * xi * li
            c = slx > 0
            sl2 = suml2 - wi * li * li
            new_l = np.clip(_nearest(_div(xi * sl2, np.where(c, slx, F(1)))), -nmax, nmax - 1)
            c &= new_l != L[:, i]
            fn = new_l.astype(F)
            slx = slx + wi * xi * fn
            sl2 = sl2 + wi * fn * fn
            c &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = np.where(c, new_l, L[:, i])
            sumlx = np.where(c, slx, sumlx)
            suml2 = np.where(c, sl2, suml2)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F(0))
    return np.where(zero, F(0), scale), np.where(zero[:, None], 0, L + nmax)


def make_qkx_quants(nmax, x, w, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants (make_qkx3_quants with weights is the same) -> (scale, the_min, codes)."""
    mn = np.minimum(x.min(axis=1), F(0))
    mx = x.max(axis=1)
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, x.shape[1]):
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    flat = mx == mn
    rng = np.where(flat, F(1), mx - mn)
    xm = x - mn[:, None]

    def error(scale, mn_, L):
        e = np.zeros(x.shape[0], F)
        for i in range(x.shape[1]):
            diff = scale * L[:, i].astype(F) + mn_ - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            e = e + w[:, i] * diff
        return e

    iscale = _div(F(nmax), rng)
    scale = _div(F(1), iscale)
    L = np.clip(_nearest(iscale[:, None] * xm), 0, nmax)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        # the C loop reads `min` as it goes: a better candidate moves the range of the next ones
        rng = np.where(flat, F(1), mx - mn)
        iscale = _div(F(rmin) + F(rdelta) * F(step) + F(nmax), rng)
        La = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = La.astype(F)
        sum_l, sum_l2, sum_xl = _wsum(w, lf), _wsum(w, lf, lf), _wsum(w, lf, x)
        D = sum_w * sum_l2 - sum_l * sum_l
        pos = D > 0
        Ds = np.where(pos, D, F(1))
        ts = _div(sum_w * sum_xl - sum_x * sum_l, Ds)
        tm = _div(sum_l2 * sum_x - sum_l * sum_xl, Ds)
        neg = tm > 0
        tm = np.where(neg, F(0), tm)
        ts = np.where(neg, _div(sum_xl, sum_l2), ts)
        cur = error(ts, tm, La)
        upd = pos & (cur < best)
        L = np.where(upd[:, None], La, L)
        best = np.where(upd, cur, best)
        scale = np.where(upd, ts, scale)
        mn = np.where(upd, tm, mn)
    return np.where(flat, F(0), scale), -mn, np.where(flat[:, None], 0, L)


def make_qp_quants(nmax, x, qw):
    """-> (scale, codes as uint8 values)"""
    mx = np.maximum(x.max(axis=1), F(0))
    zero = mx < EPS
    mx = np.where(zero, F(1), mx)
    iscale = _div(F(nmax), mx)
    L = _nearest(iscale[:, None] * x) & 0xFF
    scale = _div(F(1), iscale)
    best = np.zeros(x.shape[0], F)
    for i in range(x.shape[1]):
        diff = x[:, i] - scale * L[:, i].astype(F)
        best = best + qw[:, i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = _div(F(0.1) * F(step) + F(nmax), mx)
        sc = _div(F(1), isc)
        mse = np.zeros(x.shape[0], F)
        for i in range(x.shape[1]):
            l = np.minimum(nmax, _nearest(isc * x[:, i]))
            diff = x[:, i] - sc * l.astype(F)
            mse = mse + qw[:, i] * diff * diff
        upd = mse < best
        best = np.where(upd, mse, best)
        iscale = np.where(upd, isc, iscale)
    l = np.minimum(nmax, _nearest(iscale[:, None] * x))
    L = l & 0xFF
    lf = l.astype(F)
    sumlx, suml2 = _wsum(qw, x, lf), _wsum(qw, lf, lf)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = qw[:, i], x[:, i], L[:, i].astype(F)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            c = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, _nearest(_div(xi * sl2, np.where(c, slx, F(1)))))
            c &= new_l != L[:, i]
            fn = new_l.astype(F)
            slx = slx + wi * xi * fn
            sl2 = sl2 + wi * fn * fn
            c &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[:, i] = np.where(c, new_l & 0xFF, L[:, i])
            sumlx = np.where(c, slx, sumlx)
            suml2 = np.where(c, sl2, suml2)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F(0))
    return np.where(zero, F(0), scale), np.where(zero[:, None], 0, L)


# ---- packing helpers -------------------------------------------------------------------------------------

def _pack2(L):
    """(B, 256) codes 0..3 -> (B, 64)"""
    out = np.zeros((L.shape[0], 64), np.int64)
    for j in range(0, 256, 128):
        for k in range(4):
            out[:, j // 4:j // 4 + 32] |= L[:, j + 32 * k:j + 32 * k + 32] << (2 * k)
    return out


def _u16(bits):
    b = bits.astype(np.int64)
    return np.stack([b & 0xFF, b >> 8], axis=1)


def _sum_rows(x):
    s = np.zeros(x.shape[0], F)
    for i in range(x.shape[1]):
        s = s + x[:, i] * x[:, i]
    return s


def _k4_scales(ls, lm):
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes."""
    out = np.zeros((ls.shape[0], 12), np.int64)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _k4_unpack(sc12, j):
    if j < 4:
        return sc12[:, j] & 63, sc12[:, j + 4] & 63
    return ((sc12[:, j + 4] & 0xF) | ((sc12[:, j - 4] >> 6) << 4),
            (sc12[:, j + 4] >> 4) | ((sc12[:, j] >> 6) << 4))


# ---- the five types: x (B, 256) float32 -> (B, size) uint8 ---------------------------------------------

def q2_k(x, qw=None):
    B = x.shape[0]
    g = x.reshape(B * 16, 16)
    if qw is None:
        sc, mn, L = make_qkx_quants(3, g, np.abs(g), -0.5, 0.1, 15, True)
        sc, mn = sc.reshape(B, 16), mn.reshape(B, 16)
        max_scale = np.maximum(sc.max(axis=1), F(0))
        max_min = np.maximum(mn.max(axis=1), F(0))
        has_s, has_m = max_scale > 0, max_min > 0
        scales = np.where(has_s[:, None], _nearest(_div(F(15), max_scale)[:, None] * sc) & 0xFF, 0)
        dbits, d = _f16(np.where(has_s, max_scale / F(15), F(0)))
        scales = np.where(has_m[:, None], (scales | (_nearest(_div(F(15), max_min)[:, None] * mn) << 4)) & 0xFF,
                          scales)
        mbits, m = _f16(np.where(has_m, max_min / F(15), F(0)))
    else:
        sigma2 = _sum_rows(x) / F(256)
        w = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F)
        w16 = w.reshape(B * 16, 16)
        sw = np.zeros(B * 16, F)
        for i in range(16):
            sw = sw + w16[:, i]
        sc, mn, L = make_qkx_quants(3, g, w16, -0.9, 0.05, 36, False)
        dm, Ls = make_qp_quants(15, sc.reshape(B, 16), sw.reshape(B, 16))
        mm, Lm = make_qp_quants(15, mn.reshape(B, 16), sw.reshape(B, 16))
        dbits, d = _f16(dm)
        mbits, m = _f16(mm)
        scales = (Ls | (Lm << 4)) & 0xFF
    L = L.reshape(B, 256)
    for j in range(16):
        dj = d * (scales[:, j] & 0xF).astype(F)
        mj = m * (scales[:, j] >> 4).astype(F)
        ok = dj != 0
        l = np.clip(_nearest(_div(x[:, 16 * j:16 * j + 16] + mj[:, None], np.where(ok, dj, F(1))[:, None])), 0, 3)
        L[:, 16 * j:16 * j + 16] = np.where(ok[:, None], l, L[:, 16 * j:16 * j + 16])
    return np.concatenate([scales, _pack2(L), _u16(dbits), _u16(mbits)], axis=1).astype(np.uint8)


def _q3_pack_scales(ls):
    out = np.zeros((ls.shape[0], 12), np.int64)
    for j in range(16):
        if j < 8:
            out[:, j] = ls[:, j] & 0xF
        else:
            out[:, j - 8] |= (ls[:, j] & 0xF) << 4
        out[:, 8 + j % 4] |= (ls[:, j] >> 4) << (2 * (j // 4))
    return out


def q3_k(x, qw=None):
    B = x.shape[0]
    g = x.reshape(B * 16, 16)
    if qw is None:
        sc, L = make_q3_quants(4, g)
        sc = sc.reshape(B, 16)
        idx = np.argmax(np.abs(sc), axis=1)
        max_scale = sc[np.arange(B), idx]
        has = max_scale != 0
        iscale = _div(F(-32), np.where(has, max_scale, F(1)))
        l = ((_nearest(iscale[:, None] * sc) + 128) & 0xFF) - 128  # int8_t
        ls = np.clip(l, -32, 31) + 32
        scales = np.where(has[:, None], _q3_pack_scales(ls), 0)
        dbits, d = _f16(np.where(has, _div(F(1), iscale), F(0)))
    else:
        sigma2 = F(2) * _sum_rows(x) / F(256)
        w = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F)
        w16 = w.reshape(B * 16, 16)
        sw = np.zeros(B * 16, F)
        for i in range(16):
            sw = sw + w16[:, i]
        sc, L = make_qx_quants(4, g, w16)
        d_block, Ls = make_qx_quants(32, sc.reshape(B, 16), sw.reshape(B, 16))
        scales = _q3_pack_scales(Ls)
        dbits, d = _f16(d_block)
    L = L.reshape(B, 256)
    for j in range(16):
        s = (scales[:, j] & 0xF) if j < 8 else (scales[:, j - 8] >> 4)
        s = (s | (((scales[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dj = d * s.astype(F)
        ok = dj != 0
        l = np.clip(_nearest(_div(x[:, 16 * j:16 * j + 16], np.where(ok, dj, F(1))[:, None])), -4, 3) + 4
        L[:, 16 * j:16 * j + 16] = np.where(ok[:, None], l, L[:, 16 * j:16 * j + 16])
    hmask = np.zeros((B, 32), np.int64)
    for j in range(256):
        hi = L[:, j] > 3
        hmask[:, j % 32] |= np.where(hi, 1 << (j // 32), 0)
        L[:, j] = np.where(hi, L[:, j] - 4, L[:, j])
    return np.concatenate([hmask, _pack2(L), scales, _u16(dbits)], axis=1).astype(np.uint8)


def _q45_k(x, qw, nmax):
    B = x.shape[0]
    g = x.reshape(B * 8, 32)
    if qw is None:
        av = np.sqrt(_sum_rows(g) / F(32))
        w = (av[:, None] + np.abs(g)).astype(F)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        sc, mn, L = make_qkx_quants(nmax, g, w, rmin, 0.1, nstep, False)
        sc, mn = sc.reshape(B, 8), mn.reshape(B, 8)
        max_scale = np.maximum(sc.max(axis=1), F(0))
        max_min = np.maximum(mn.max(axis=1), F(0))
        inv_s = np.where(max_scale > 0, _div(F(63), max_scale), F(0))
        inv_m = np.where(max_min > 0, _div(F(63), max_min), F(0))
        ls = np.minimum(63, _nearest(inv_s[:, None] * sc) & 0xFF)
        lm = np.minimum(63, _nearest(inv_m[:, None] * mn) & 0xFF)
        dbits, d = _f16(max_scale / F(63))
        mbits, m = _f16(max_min / F(63))
    else:
        sigma2 = F(2) * _sum_rows(x) / F(256)
        w = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F)
        w32 = w.reshape(B * 8, 32)
        sw = np.zeros(B * 8, F)
        for i in range(32):
            sw = sw + w32[:, i]
        sc, mn, L = make_qkx_quants(nmax, g, w32, -0.9, 0.05, 36, False)
        dm, ls = make_qp_quants(63, sc.reshape(B, 8), sw.reshape(B, 8))
        mm, lm = make_qp_quants(63, mn.reshape(B, 8), sw.reshape(B, 8))
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        dbits, d = _f16(dm)
        mbits, m = _f16(mm)
    scales = _k4_scales(ls, lm)
    L = L.reshape(B, 256)
    for j in range(8):
        s, mj = _k4_unpack(scales, j)
        dj = d * s.astype(F)
        dmj = m * mj.astype(F)
        ok = dj != 0
        l = np.clip(_nearest(_div(x[:, 32 * j:32 * j + 32] + dmj[:, None], np.where(ok, dj, F(1))[:, None])), 0, nmax)
        L[:, 32 * j:32 * j + 32] = np.where(ok[:, None], l, L[:, 32 * j:32 * j + 32])
    head = [_u16(dbits), _u16(mbits), scales]
    if nmax == 15:
        qs = np.concatenate([L[:, j:j + 32] | (L[:, j + 32:j + 64] << 4) for j in range(0, 256, 64)], axis=1)
        return np.concatenate(head + [qs], axis=1).astype(np.uint8)
    qh = np.zeros((B, 32), np.int64)
    for k, n in enumerate(range(0, 256, 64)):
        qh |= (L[:, n:n + 32] >> 4) << (2 * k)
        qh |= (L[:, n + 32:n + 64] >> 4) << (2 * k + 1)
    qs = np.concatenate([(L[:, n:n + 32] & 0xF) | ((L[:, n + 32:n + 64] & 0xF) << 4) for n in range(0, 256, 64)],
                        axis=1)
    return np.concatenate(head + [qh, qs], axis=1).astype(np.uint8)


def q4_k(x, qw=None):
    return _q45_k(x, qw, 15)


def q5_k(x, qw=None):
    return _q45_k(x, qw, 31)


def q6_k(x, qw=None):
    B = x.shape[0]
    g = x.reshape(B * 16, 16)
    sc, L = make_qx_quants(32, g, None if qw is None else qw.reshape(B * 16, 16))
    sc = sc.reshape(B, 16)
    L = L.reshape(B, 256)
    idx = np.argmax(np.abs(sc), axis=1)
    max_scale = sc[np.arange(B), idx]
    zero = np.abs(max_scale) < EPS
    iscale = _div(F(-128), np.where(zero, F(1), max_scale))
    dbits, d = _f16(_div(F(1), iscale))
    s8 = ((np.minimum(127, _nearest(iscale[:, None] * sc)) + 128) & 0xFF) - 128
    for j in range(16):
        dj = d * s8[:, j].astype(F)
        ok = dj != 0
        l = np.clip(_nearest(_div(x[:, 16 * j:16 * j + 16], np.where(ok, dj, F(1))[:, None])), -32, 31) + 32
        L[:, 16 * j:16 * j + 16] = np.where(ok[:, None], l, L[:, 16 * j:16 * j + 16])
    ql = np.zeros((B, 128), np.int64)
    qh = np.zeros((B, 64), np.int64)
    for j in range(0, 256, 128):
        q = [L[:, j + 32 * k:j + 32 * k + 32] for k in range(4)]
        ql[:, j // 2:j // 2 + 32] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
        ql[:, j // 2 + 32:j // 2 + 64] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
        qh[:, j // 4:j // 4 + 32] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    out = np.concatenate([ql, qh, s8 & 0xFF, _u16(dbits)], axis=1)
    return np.where(zero[:, None], 0, out).astype(np.uint8)


_FUNCS = {Q.Q2_K: q2_k, Q.Q3_K: q3_k, Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k}


def quantize(x: np.ndarray, qtype, qw: np.ndarray | None = None) -> np.ndarray:
    rows, cols = x.shape
    nb = cols // 256
    blocks = np.ascontiguousarray(x, F).reshape(rows * nb, 256)
    w = None if qw is None else np.broadcast_to(np.asarray(qw, F).reshape(nb, 256), (rows, nb, 256)).reshape(-1, 256)
    return _FUNCS[qtype](blocks, w).reshape(rows, nb * SIZES[qtype])
