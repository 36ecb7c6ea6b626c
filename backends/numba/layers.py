"""The transformer's non-matmul pieces in Numba (RMSNorm, RoPE, SwiGLU, attention over the KV cache with GQA),
and `forward_stack`: the whole layer stack for a few tokens in one jitted call, so decoding a token costs one
dispatch from Python.

Weights are addressed through the views of the memory map (quant.kernels.weight_views) and a table of byte
offsets and type codes built at load:

  layer_tab: (n_layers, N_KINDS, 2) int64  (byte offset, qtype) of each per-layer tensor, -1 when absent
  glob_tab:  (3, 2) int64                  token_embd, output_norm, output
  dims:      (N_DIMS,) int64               the integer hyper-parameters and block options (indices below)
  fparams:   (N_FPARAMS,) float32          the real ones: norm epsilon, embedding scale, score scale, logit cap,
                                           RoPE cos/sin scale
  layer_opt: (n_layers, N_LAYER_OPTS) int64  per layer: sliding window (0 = full), RoPE table row

Block options are data (dims and which layer_tab entries exist): a post-norm after each sub-block when its
weight exists (Gemma's sandwich), the FFN activation, a sliding window per layer, RoPE frequencies per layer.
"""

from __future__ import annotations

import math

import numpy as np

from quant import kv_kernels as kvk
from quant import simd
from quant.jit import njit, prange
from quant.kernels import dequant_row, matvec, matvec_multi, prepare, row_bytes

# kinds of per-layer tensors (columns of layer_tab)
(ATTN_NORM, WQ, WK, WV, WO, FFN_NORM, GATE, UP, DOWN, BQ, BK, BV, Q_NORM, K_NORM, POST_ATTN_NORM,
 POST_FFN_NORM) = range(16)
N_KINDS = 16
# global tensors (rows of glob_tab)
EMBD, OUT_NORM, OUTPUT = range(3)
# dims entries
D_EMBD, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_FF, D_VOCAB, D_ROPE_HALF, D_NEOX, D_LAYERS, D_ACT = range(10)
N_DIMS = 10
ACT_SILU, ACT_GELU_TANH = 0, 1  # dims[D_ACT]
# fparams entries
F_EPS, F_EMBED_SCALE, F_ATTN_SCALE, F_SOFTCAP, F_ROPE_MSCALE = range(5)
N_FPARAMS = 5
# layer_opt columns
L_WINDOW, L_ROPE = range(2)
N_LAYER_OPTS = 2
# Decode attention below this many multiply-adds (query x cached position x head_dim, over all heads) runs on
# one thread: SmolLM2 (9 heads of 64) up to ~230 cached positions. One parallel region less per layer. Above it,
# a chunk of one conversation's prompt runs a head (or part of its tokens) per work item (attention_chunk).
SERIAL_ATTENTION = 1 << 17


@njit(cache=True, fastmath=True)
def rms_norm(x, f32, w_off, eps, out):
    """out[t] = x[t] / rms(x[t]) * w for x: (T, n); w: float32 (n,) at byte w_off of the f32 view."""
    n = x.shape[1]
    w = f32[w_off // 4: w_off // 4 + n]
    for t in range(x.shape[0]):
        ss = 0.0
        for j in range(n):
            ss += np.float64(x[t, j]) * x[t, j]
        inv = np.float32(1.0 / math.sqrt(ss / n + eps))
        for j in range(n):
            out[t, j] = x[t, j] * inv * w[j]


@njit(cache=True, fastmath=True)
def rope_tables(start, inv_freq, mscale, cos, sin):
    """cos, sin: (G, T, rope_dim/2) float32 for positions start .. start + T, for each of the G frequency sets
    inv_freq: (G, rope_dim/2), times mscale (LongRoPE's attention factor, else 1)."""
    for g in range(inv_freq.shape[0]):
        for t in range(cos.shape[1]):
            pos = np.float32(start + t)
            for i in range(inv_freq.shape[1]):
                angle = pos * inv_freq[g, i]
                cos[g, t, i] = mscale * math.cos(angle)
                sin[g, t, i] = mscale * math.sin(angle)


@njit(cache=True, fastmath=True)
def rope(x, cos, sin, neox):
    """Rotate x: (T, n_heads, head_dim) in place by position. neox rotates the pairs (i, i + rope_dim/2)
    (Qwen), otherwise the adjacent pairs (2i, 2i + 1) (llama GGUF, whose Q/K rows are permuted for it)."""
    half = cos.shape[1]
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            v = x[t, h]
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                c, s = cos[t, i], sin[t, i]
                va, vb = v[a], v[b]
                v[a] = va * c - vb * s
                v[b] = va * s + vb * c


@njit(cache=True, fastmath=True)
def head_norm(x, f32, w_off, eps):
    """RMSNorm of every head vector of x: (T, n_heads, head_dim), in place (Qwen3 q/k norm)."""
    T, H, D = x.shape
    w = f32[w_off // 4: w_off // 4 + D]
    for t in range(T):
        for h in range(H):
            ss = 0.0
            for j in range(D):
                ss += np.float64(x[t, h, j]) * x[t, h, j]
            inv = np.float32(1.0 / math.sqrt(ss / D + eps))
            for j in range(D):
                x[t, h, j] = x[t, h, j] * inv * w[j]


@njit(cache=True, inline="always")
def _group_dots(kc, kvt, off, stride, n, q, qoff, qstride, heads, width, scores, soff, sstride):
    """Key dot products of up to GROUP_DOTS query heads over rows stored as kv type kvt (simd.make_group_dots)."""
    if kvt == kvk.KV_F32:
        simd.group_dots_f32(kc, off, stride, n, q, qoff, qstride, heads, width, scores, soff, sstride)
    elif kvt == kvk.KV_F16:
        kvk.group_dots_f16(kc, off, stride, n, q, qoff, qstride, heads, width, scores, soff, sstride)
    else:
        kvk.group_dots_q8_0(kc, off, stride, n, q, qoff, qstride, heads, width, scores, soff, sstride)


@njit(cache=True, inline="always")
def _group_rows(vc, kvt, off, stride, n, p, poff, pstride, heads, width, out, ooff, ostride):
    """Weighted sums of value rows for up to GROUP_ROWS heads, stored as kv type kvt
    (simd.make_group_weighted_rows)."""
    if kvt == kvk.KV_F32:
        simd.group_weighted_rows_f32(vc, off, stride, n, p, poff, pstride, heads, width, out, ooff, ostride)
    elif kvt == kvk.KV_F16:
        kvk.group_weighted_rows_f16(vc, off, stride, n, p, poff, pstride, heads, width, out, ooff, ostride)
    else:
        kvk.group_weighted_rows_q8_0(vc, off, stride, n, p, poff, pstride, heads, width, out, ooff, ostride)


@njit(cache=True, inline="always")
def _cached_value(c, kvt, at, j):
    """Value j of the f32 or f16 row at byte `at` of the flat cache c (the scalar tails past a multiple of 16)."""
    if kvt == kvk.KV_F32:
        return c[at:at + 4 * (j + 1)].view(np.float32)[j]
    return kvk.F16_TABLE[c[at:at + 2 * (j + 1)].view(np.uint16)[j]]


@njit(cache=True, fastmath=True, inline="always")
def _attend(q, k_cache, v_cache, kvt, start, window, scale, out, t, h0, h1):
    """Attention of query heads h0 .. h1 (one GQA group's, or part of one) of token t of q: (T, n_heads,
    head_dim), at position start, over the cache of one layer, k_cache, v_cache: (n_kv_heads, S, row bytes)
    uint8, rows stored as kv type kvt (quant/kv_kernels.py), position p in slot p % S; it sees positions start -
    window < s <= start (window 0: every s <= start); scores are q.k * scale; out: like q. The heads share their
    KV head, so the vector kernels decode each cached row once for all of them."""
    T, H, D = q.shape
    KVH, S = k_cache.shape[0], k_cache.shape[1]
    end = start + 1
    first = max(0, end - window) if window > 0 else 0
    _attend_set(q, k_cache, v_cache, kvt, h0 // (H // KVH), first % S, end - first, (t * H + h0) * D, D, h1 - h0,
                np.int64(0), scale, out)  # int64, not the literal 0: one compiled _attend_set serves both callers


@njit(cache=True, fastmath=True, inline="always")
def _attend_chunk(q, k_cache, v_cache, kvt, start, scale, out, h, t0, t1):
    """Attention of query head h for tokens t0 .. t1 - 1 of q, one conversation's consecutive positions start ..
    start + T - 1, over a full (windowless) layer's cache (see _attend): each token sees the positions up to its
    own. The tokens share their history, so each cached row is decoded once for up to GROUP_DOTS of them (a chunk
    of a follow-up turn over a long conversation)."""
    T, H, D = q.shape
    _attend_set(q, k_cache, v_cache, kvt, h // (H // k_cache.shape[0]), np.int64(0), start + t1, (t0 * H + h) * D,
                H * D, t1 - t0, np.int64(1), scale, out)


@njit(cache=True, fastmath=True)
def _attend_set(q, k_cache, v_cache, kvt, kv, f0, n, qoff, qstride, m, lag, scale, out):
    """Attention of m query vectors of q that share KV head kv: vector i at flat offset qoff + i qstride of q (and
    of out), over the n cache rows of positions from the one in slot f0 on (a ring of S slots), of which vector i
    sees the first n - lag (m - 1 - i): lag 0 for the heads of one token, 1 for one head's consecutive tokens.
    Not inlined, and one call site per kernel: the vector kernels are specialized for every KV type and group
    size, and each copy of them would add to the machine code that every start loads."""
    T, H, D = q.shape
    KVH, S, RB = k_cache.shape
    d16 = D if kvt == kvk.KV_Q8_0 else D // 16 * 16  # what the vector kernels take; scalar loops the rest
    n1 = min(n, S - f0)  # the rows from slot f0 on; then, when the run wraps around the ring, from slot 0
    kc, vc = k_cache.reshape(-1), v_cache.reshape(-1)
    scores = np.empty((m, n), dtype=np.float32)
    for g0 in range(0, m, simd.GROUP_DOTS):
        k = min(simd.GROUP_DOTS, m - g0)
        for part in range(2 if n1 < n else 1):  # rows n1.. wrap around the ring to slot 0
            slot, rows, s0 = (f0, n1, 0) if part == 0 else (0, n - n1, n1)
            _group_dots(kc, kvt, (kv * S + slot) * RB, RB, rows, q, qoff + g0 * qstride, qstride, k, d16, scores,
                        g0 * n + s0, n)
    for g in range(m):
        at = (qoff + g * qstride) // D
        qv = q[at // H, at % H]
        row = scores[g]
        seen = n - lag * (m - 1 - g)
        for j in range(d16, D):  # the tail of an f32 or f16 row
            for s in range(seen):
                slot = f0 + s if f0 + s < S else f0 + s - S
                row[s] += qv[j] * _cached_value(kc, kvt, (kv * S + slot) * RB, j)
        top = np.float32(-np.inf)
        for s in range(seen):
            row[s] *= scale
            top = max(top, row[s])
        total = np.float32(0.0)
        for s in range(seen):
            row[s] = simd.exp_f32(row[s] - top)
            total += row[s]
        inv = np.float32(1.0) / total
        for s in range(seen):
            row[s] *= inv
        row[seen:] = 0.0  # positions after the query's own
        out[at // H, at % H] = 0.0
    for g0 in range(0, m, simd.GROUP_ROWS):
        k = min(simd.GROUP_ROWS, m - g0)
        for part in range(2 if n1 < n else 1):
            slot, rows, s0 = (f0, n1, 0) if part == 0 else (0, n - n1, n1)
            _group_rows(vc, kvt, (kv * S + slot) * RB, RB, rows, scores, g0 * n + s0, n, k, d16, out,
                        qoff + g0 * qstride, qstride)
    for g in range(m):
        at = (qoff + g * qstride) // D
        row = scores[g]
        for j in range(d16, D):
            acc = np.float32(0.0)
            for s in range(n):
                slot = f0 + s if f0 + s < S else f0 + s - S
                acc += row[s] * _cached_value(vc, kvt, (kv * S + slot) * RB, j)
            out[at // H, at % H, j] = acc


@njit(cache=True, inline="always")
def _head_split(T, H, KVH, threads):
    """Query heads per work item of the decode attention: a whole GQA group, unless that leaves fewer items
    than threads (Gemma 3 270M has one KV head), then halves of it, and so on."""
    G = H // KVH
    per = G
    while T * KVH * ((G + per - 1) // per) < threads and per > 1:
        per = (per + 1) // 2
    return per


@njit(cache=True, fastmath=True, inline="always")
def _attend_item(q, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, out, per, i):
    """Work item i of attention_rows: token t, KV head kv, heads part j (per heads each) of its group."""
    T, H, D = q.shape
    G = H // KVH
    parts = (G + per - 1) // per
    t, rest = i // (KVH * parts), i % (KVH * parts)
    kv, j = rest // parts, rest % parts
    h0 = kv * G + j * per
    h1 = min(h0 + per, (kv + 1) * G)
    RB = kvk.kv_row_bytes(kvt, D)
    kc = k_pool[slots[t], off:off + KVH * S * RB].reshape((KVH, S, RB))
    vc = v_pool[slots[t], off:off + KVH * S * RB].reshape((KVH, S, RB))
    _attend(q, kc, vc, kvt, positions[t], window, scale, out, t, h0, h1)


@njit(cache=True, parallel=True, fastmath=True)
def attention_rows(q, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, out, threads):
    """Causal grouped-query attention of T queries, each with its own cache and position: query t (q: (T,
    n_heads, head_dim)) is at position positions[t] of the cache in row slots[t] of k_pool, v_pool (uint8: this
    layer's keys are (KVH, S, row bytes) from byte `off` of the row, stored as kv type kvt, position p in slot
    p % S) and sees that cache's positions up to its own (the last `window` of them when window > 0); out: (T,
    n_heads, head_dim). The (query, GQA group) pairs are shared across threads: `threads`, numba's count for
    this call (numba.get_num_threads, which cached code cannot call)."""
    T, H = q.shape[0], q.shape[1]
    per = _head_split(T, H, KVH, threads)
    for i in prange(T * KVH * ((H // KVH + per - 1) // per)):
        _attend_item(q, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, out, per, i)


@njit(cache=True, parallel=True, fastmath=True)
def attention_chunk(q, k_pool, v_pool, off, S, KVH, kvt, slot, start, scale, out, threads):
    """`attention_rows` for T tokens of one conversation (row `slot` of the pools) at consecutive positions start
    .. start + T - 1 of a full layer (no window, so S > every position): a work item is one query head for all
    the tokens (_attend_chunk), or for a part of them where the heads do not share evenly among `threads`
    (SmolLM2's 9 on 2 threads went 5 + 4). Parts are whole groups of GROUP_DOTS tokens, so a cached row is
    decoded as often as before."""
    T, H, D = q.shape
    groups = (T + simd.GROUP_DOTS - 1) // simd.GROUP_DOTS
    parts = min(threads, groups) if H % threads else 1
    RB = kvk.kv_row_bytes(kvt, D)
    kc = k_pool[slot, off:off + KVH * S * RB].reshape((KVH, S, RB))
    vc = v_pool[slot, off:off + KVH * S * RB].reshape((KVH, S, RB))
    for i in prange(H * parts):
        h, p = i // parts, i % parts
        t0 = min(T, groups * p // parts * simd.GROUP_DOTS)
        t1 = min(T, groups * (p + 1) // parts * simd.GROUP_DOTS)
        _attend_chunk(q, kc, vc, kvt, start, scale, out, h, t0, t1)


@njit(cache=True, fastmath=True)
def attention_rows_serial(q, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, out):
    """`attention_rows` on the calling thread: for short contexts, cheaper than a parallel region's
    synchronization."""
    per = q.shape[1] // KVH
    for i in range(q.shape[0] * KVH):
        _attend_item(q, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, out, per, i)


@njit(cache=True, nogil=True, fastmath=True)
def causal_softmax(scores, T, start, first_key, window):
    """Softmax in place over each row of scores: (rows, S) of one query block, row r holding query r % T
    (the heads of a group stacked, T queries each) at position start + r % T, against keys first_key ..
    first_key + S. A query sees the keys up to itself, and with a window > 0 only the last `window` of them;
    other keys get probability 0. Serial and without the GIL: the prompt path's pool runs one per thread."""
    for r in range(scores.shape[0]):
        row = scores[r]
        pos = start + r % T
        n = pos + 1 - first_key  # keys up to the query itself
        lo = max(0, n - window) if window > 0 else 0
        top = simd.max_f32(row[lo:], n - lo)
        total = np.float32(0.0)
        for s in range(lo, n):
            e = simd.exp_f32(row[s] - top)
            row[s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(lo, n):
            row[s] *= inv
        row[:lo] = 0.0
        row[n:] = 0.0


@njit(cache=True, fastmath=True, error_model="numpy")  # no zero-division check: the loop vectorizes
def swiglu(gu, out):
    """out = silu(gate) * up, with gu: (T, 2 * n_ff) = [gate | up] side by side."""
    n = out.shape[1]
    for t in range(out.shape[0]):
        gate, up, o = gu[t, :n], gu[t, n:], out[t]  # slices: no index wraparound checks, so the loop vectorizes
        for j in range(n):
            o[j] = gate[j] / (np.float32(1.0) + simd.exp_f32(-gate[j])) * up[j]


@njit(cache=True, fastmath=True, error_model="numpy")
def gelu_tanh_glu(gu, out):
    """out = gelu_tanh(gate) * up, with gu: (T, 2 * n_ff) = [gate | up] side by side (Gemma).
    gelu_tanh(g) = g / 2 * (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) * (g + 0.044715 g^3)."""
    n = out.shape[1]
    c = np.float32(2.0 * math.sqrt(2.0 / math.pi))
    for t in range(out.shape[0]):
        gate, up, o = gu[t, :n], gu[t, n:], out[t]
        for j in range(n):
            g = gate[j]
            o[j] = g / (np.float32(1.0) + simd.exp_f32(-c * (g + np.float32(0.044715) * g * g * g))) * up[j]


@njit(cache=True, inline="always")
def glu(gu, out, act):
    if act == ACT_GELU_TANH:
        gelu_tanh_glu(gu, out)
    else:
        swiglu(gu, out)


@njit(cache=True, fastmath=True)
def softcap(logits, cap):
    """logits = cap * tanh(logits / cap) in place (a final logit soft-cap; cap > 0)."""
    for t in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            logits[t, j] = cap * math.tanh(logits[t, j] / cap)


@njit(cache=True)
def embed(wv, qtype, off, n, tokens, scale, out):
    """out[t] = row tokens[t] of the embedding table (n columns), dequantized, times scale."""
    rb = row_bytes(qtype, n)
    for t in range(tokens.size):
        dequant_row(wv, qtype, off + tokens[t] * rb, n, out[t])
        if scale != 1.0:
            out[t] *= scale


@njit(cache=True, fastmath=True)
def add_bias(x, f32, off):
    n = x.shape[1]
    b = f32[off // 4: off // 4 + n]
    for t in range(x.shape[0]):
        for j in range(n):
            x[t, j] += b[j]


@njit(cache=True, inline="always")
def _rows(xb, a, b):
    """Rows a..b of the prepared-activation buffers xb (see quant.kernels.prepare)."""
    return xb[0][a:b], xb[1][a:b], xb[2][a:b], xb[3][a:b]


@njit(cache=True, fastmath=True)
def forward_stack(wv, layer_tab, glob_tab, dims, fparams, layer_opt, inv_freq, tokens, positions, slots, k_pool,
                  v_pool, kv_layout, kvt, outputs, scratch, logits, hidden, threads):
    """All layers for T tokens with the quantized matvec kernels: token t is at position positions[t] of the
    cache in row slots[t] of k_pool, v_pool (one conversation's run of tokens: one row, consecutive positions; a
    batched decode step: a token from each of several conversations, every weight row read once for all of them).
    Writes K/V into the caches and the logits of the last `outputs` tokens: (outputs, n_vocab); T for all of them,
    0 for none (a prompt's chunk before its last); with `hidden`, their output-norm states (outputs, n_embd)
    instead, for embeddings. scratch: tuple of buffers sized for T (see
    NumbaModel._make_scratch); inv_freq: (G, rope_dim/2), the RoPE frequency sets that layer_opt[:, L_ROPE] picks
    from. k_pool, v_pool: (n_slots, cache bytes) uint8; in each row layer i's keys are (n_kv_heads, S, row bytes)
    from byte kv_layout[i, 0], with S = kv_layout[i, 1] slots, position p in slot p % S (a ring of the last S
    positions for a windowed layer), each row a head vector stored as kv type kvt (quant/kv_kernels.py)."""
    x, h, qkv, q3, k3, att, gu, ff, tmp, cos, sin, xs_e, xs_q, xs_f, qkv_desc, gu_desc = scratch
    T = tokens.size
    E, H, KVH, D = dims[D_EMBD], dims[D_HEADS], dims[D_KV_HEADS], dims[D_HEAD_DIM]
    nq, nkv = H * D, KVH * D
    RB = kvk.kv_row_bytes(kvt, D)
    eps, scale = fparams[F_EPS], fparams[F_ATTN_SCALE]
    x, h, qkv, q3, k3, att = x[:T], h[:T], qkv[:T], q3[:T], k3[:T], att[:T]
    gu, ff, tmp, cos, sin = gu[:T], ff[:T], tmp[:T], cos[:, :T], sin[:, :T]
    xs_e, xs_q, xs_f = _rows(xs_e, 0, T), _rows(xs_q, 0, T), _rows(xs_f, 0, T)
    f32 = wv[2]
    chunk = T > 1  # one conversation's consecutive tokens (a prompt's chunk), not a batch of conversations
    for t in range(1, T):
        chunk = chunk and slots[t] == slots[0] and positions[t] == positions[0] + t

    embed(wv, glob_tab[EMBD, 1], glob_tab[EMBD, 0], E, tokens, fparams[F_EMBED_SCALE], x)
    for t in range(T):
        rope_tables(positions[t], inv_freq, fparams[F_ROPE_MSCALE], cos[:, t:t + 1], sin[:, t:t + 1])
    for layer in range(dims[D_LAYERS]):
        lt = layer_tab[layer]
        window, g = layer_opt[layer, L_WINDOW], layer_opt[layer, L_ROPE]
        # attention block: x += [norm](Wo . attn(rope(Wq h), rope(Wk h), Wv h)), h = norm(x)
        rms_norm(x, f32, lt[ATTN_NORM, 0], eps, h)
        prepare(h, xs_e)
        for i in range(3):
            qkv_desc[i, 0], qkv_desc[i, 1] = lt[WQ + i, 0], lt[WQ + i, 1]
        matvec_multi(wv, qkv_desc, h, xs_e, qkv)
        q = qkv[:, :nq]
        k = qkv[:, nq:nq + nkv]
        v = qkv[:, nq + nkv:]
        if lt[BQ, 0] >= 0:
            add_bias(q, f32, lt[BQ, 0])
            add_bias(k, f32, lt[BK, 0])
            add_bias(v, f32, lt[BV, 0])
        q3.reshape(T, nq)[:] = q
        k3.reshape(T, nkv)[:] = k
        if lt[Q_NORM, 0] >= 0:
            head_norm(q3, f32, lt[Q_NORM, 0], eps)
            head_norm(k3, f32, lt[K_NORM, 0], eps)
        rope(q3, cos[g], sin[g], dims[D_NEOX] != 0)
        rope(k3, cos[g], sin[g], dims[D_NEOX] != 0)
        off, S = kv_layout[layer, 0], kv_layout[layer, 1]
        att[:, :nkv] = v  # the values, contiguous for the encoder (att is free until the attention below)
        for t in range(T):
            kc = k_pool[slots[t], off:off + KVH * S * RB].reshape((KVH, S, RB))
            vc = v_pool[slots[t], off:off + KVH * S * RB].reshape((KVH, S, RB))
            slot = positions[t] % S
            for kh in range(KVH):  # encoded as they are written
                kvk.encode_row(k3[t, kh], kc[kh, slot], kvt)
                kvk.encode_row(att[t][kh * D:(kh + 1) * D], vc[kh, slot], kvt)
        if layer == dims[D_LAYERS] - 1 and outputs < T:
            # past its keys and values, the last layer only feeds the logits: it runs for their tokens alone
            if outputs == 0:
                return
            f = T - outputs
            x, h, q3, att, gu, ff, tmp = x[f:], h[f:], q3[f:], att[f:], gu[f:], ff[f:], tmp[f:]
            xs_e, xs_q, xs_f = _rows(xs_e, f, T), _rows(xs_q, f, T), _rows(xs_f, f, T)
            positions, slots, T = positions[f:], slots[f:], outputs
        seen = 0  # cached positions the queries see, over all of them
        for t in range(T):
            seen += positions[t] + 1 if window <= 0 else min(positions[t] + 1, window)
        att3 = att.reshape(T, H, D)
        if chunk and window <= 0 and H * seen * D >= SERIAL_ATTENTION:
            attention_chunk(q3, k_pool, v_pool, off, S, KVH, kvt, slots[0], positions[0], scale, att3, threads)
        elif H * seen * D < SERIAL_ATTENTION:
            attention_rows_serial(q3, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, att3)
        else:
            attention_rows(q3, k_pool, v_pool, off, S, KVH, kvt, slots, positions, window, scale, att3, threads)
        prepare(att, xs_q)
        matvec(wv, lt[WO, 1], lt[WO, 0], E, att, xs_q, tmp)
        if lt[POST_ATTN_NORM, 0] >= 0:
            rms_norm(tmp, f32, lt[POST_ATTN_NORM, 0], eps, tmp)
        x += tmp
        # feed-forward block: x += [norm](Wdown . (act(Wgate h) * Wup h)), h = norm(x)
        rms_norm(x, f32, lt[FFN_NORM, 0], eps, h)
        prepare(h, xs_e)
        for i in range(2):
            gu_desc[i, 0], gu_desc[i, 1] = lt[GATE + i, 0], lt[GATE + i, 1]
        matvec_multi(wv, gu_desc, h, xs_e, gu)
        glu(gu, ff, dims[D_ACT])
        prepare(ff, xs_f)
        matvec(wv, lt[DOWN, 1], lt[DOWN, 0], E, ff, xs_f, tmp)
        if lt[POST_FFN_NORM, 0] >= 0:
            rms_norm(tmp, f32, lt[POST_FFN_NORM, 0], eps, tmp)
        x += tmp

    rms_norm(x, f32, glob_tab[OUT_NORM, 0], eps, h)
    if hidden:
        logits[:] = h
        return
    prepare(h, xs_e)
    matvec(wv, glob_tab[OUTPUT, 1], glob_tab[OUTPUT, 0], dims[D_VOCAB], h, xs_e, logits)
    if fparams[F_SOFTCAP] > 0:
        softcap(logits, fparams[F_SOFTCAP])
