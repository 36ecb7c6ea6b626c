"""Batched decoding: one token for each of B conversations in one pass over the weights.

Each weight row is read once for all B tokens (matvec_multi), while each token keeps its own position and
its own KV cache. The caches of a batch are slots of one pooled array, so the jitted stack can index them:

  k_pool, v_pool: (n_slots, n_layers, n_kv_heads, max_seq, head_dim) float32

A slot's cache (PooledKVCache) is a view of its row of the pool: the single-sequence path (forward,
prefill) runs on it unchanged.
"""

from __future__ import annotations

import numpy as np

from backends.base import HParams, OffsetCache
from backends.numba import layers as L
from quant.jit import njit, prange
from quant.kernels import matvec, matvec_multi, prepare


class PooledKVCache(OffsetCache):
    """One slot of a CachePool: k, v are views (n_layers, n_kv_heads, max_seq, head_dim) of the pool's arrays."""

    def __init__(self, pool: CachePool, slot: int):
        self.pool, self.slot = pool, slot
        self.k, self.v = pool.k[slot], pool.v[slot]
        self.max_seq = pool.max_seq
        self.offset = 0


class CachePool:
    """KV caches for `n` conversations decoded together, and the batch stack's scratch buffers for n tokens."""

    def __init__(self, hp: HParams, n: int, max_seq: int, scratch: tuple):
        shape = (n, hp.n_layers, hp.n_kv_heads, max_seq, hp.head_dim)
        self.max_seq = max_seq
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.scratch = scratch  # buffers of forward_batch_stack for up to n tokens (NumbaModel._make_scratch)
        self.caches = [PooledKVCache(self, i) for i in range(n)]


@njit(cache=True, parallel=True, fastmath=True)
def _batch_attention(q, k_pool, v_pool, layer, slots, positions, out):
    """Each token's attention over its own slot's cache. q, out: (B, n_heads, head_dim); token b sees positions
    0 .. positions[b] of slot slots[b]. The (token, head) pairs are shared across threads."""
    B, H = q.shape[0], q.shape[1]
    for i in prange(B * H):
        b, h = i // H, i % H
        L._attend(q[b:b + 1], k_pool[slots[b], layer], v_pool[slots[b], layer], positions[b], out[b:b + 1], h)


@njit(cache=True, fastmath=True)
def _batch_attention_serial(q, k_pool, v_pool, layer, slots, positions, out):
    B, H = q.shape[0], q.shape[1]
    for i in range(B * H):
        b, h = i // H, i % H
        L._attend(q[b:b + 1], k_pool[slots[b], layer], v_pool[slots[b], layer], positions[b], out[b:b + 1], h)


@njit(cache=True, fastmath=True)
def forward_batch_stack(wv, layer_tab, glob_tab, dims, eps, inv_freq, tokens, positions, slots, k_pool, v_pool,
                        scratch, logits):
    """layers.forward_stack for B tokens of B different conversations: token b is at position positions[b] of
    slot slots[b]'s cache. Writes K/V into the pool and logits: (B, n_vocab)."""
    x, h, qkv, q3, k3, att, gu, ff, tmp, cos, sin, xs_e, xs_q, xs_f, qkv_desc, gu_desc = scratch
    B = tokens.size
    E, H, KVH, D = dims[L.D_EMBD], dims[L.D_HEADS], dims[L.D_KV_HEADS], dims[L.D_HEAD_DIM]
    nq, nkv = H * D, KVH * D
    x, h, qkv, q3, k3, att = x[:B], h[:B], qkv[:B], q3[:B], k3[:B], att[:B]
    gu, ff, tmp, cos, sin = gu[:B], ff[:B], tmp[:B], cos[:B], sin[:B]
    xs_e, xs_q, xs_f = L._rows(xs_e, 0, B), L._rows(xs_q, 0, B), L._rows(xs_f, 0, B)
    f32 = wv[2]

    L.embed(wv, glob_tab[L.EMBD, 1], glob_tab[L.EMBD, 0], E, tokens, x)
    work = 0  # attention multiply-adds of the step, to choose a parallel region or not
    for b in range(B):
        L.rope_tables(positions[b], inv_freq, cos[b:b + 1], sin[b:b + 1])
        work += H * (positions[b] + 1) * D
    for layer in range(dims[L.D_LAYERS]):
        lt = layer_tab[layer]
        L.rms_norm(x, f32, lt[L.ATTN_NORM, 0], eps, h)
        prepare(h, xs_e)
        for i in range(3):
            qkv_desc[i, 0], qkv_desc[i, 1] = lt[L.WQ + i, 0], lt[L.WQ + i, 1]
        matvec_multi(wv, qkv_desc, h, xs_e, qkv)
        q = qkv[:, :nq]
        k = qkv[:, nq:nq + nkv]
        v = qkv[:, nq + nkv:]
        if lt[L.BQ, 0] >= 0:
            L.add_bias(q, f32, lt[L.BQ, 0])
            L.add_bias(k, f32, lt[L.BK, 0])
            L.add_bias(v, f32, lt[L.BV, 0])
        q3.reshape(B, nq)[:] = q
        k3.reshape(B, nkv)[:] = k
        if lt[L.Q_NORM, 0] >= 0:
            L.head_norm(q3, f32, lt[L.Q_NORM, 0], eps)
            L.head_norm(k3, f32, lt[L.K_NORM, 0], eps)
        L.rope(q3, cos, sin, dims[L.D_NEOX] != 0)
        L.rope(k3, cos, sin, dims[L.D_NEOX] != 0)
        for b in range(B):
            for kh in range(KVH):
                k_pool[slots[b], layer, kh, positions[b]] = k3[b, kh]
                v_pool[slots[b], layer, kh, positions[b]] = v[b, kh * D:(kh + 1) * D]
        att3 = att.reshape(B, H, D)
        if work < L.SERIAL_ATTENTION:
            _batch_attention_serial(q3, k_pool, v_pool, layer, slots, positions, att3)
        else:
            _batch_attention(q3, k_pool, v_pool, layer, slots, positions, att3)
        prepare(att, xs_q)
        matvec(wv, lt[L.WO, 1], lt[L.WO, 0], E, att, xs_q, tmp)
        x += tmp
        L.rms_norm(x, f32, lt[L.FFN_NORM, 0], eps, h)
        prepare(h, xs_e)
        for i in range(2):
            gu_desc[i, 0], gu_desc[i, 1] = lt[L.GATE + i, 0], lt[L.GATE + i, 1]
        matvec_multi(wv, gu_desc, h, xs_e, gu)
        L.swiglu(gu, ff)
        prepare(ff, xs_f)
        matvec(wv, lt[L.DOWN, 1], lt[L.DOWN, 0], E, ff, xs_f, tmp)
        x += tmp

    L.rms_norm(x, f32, glob_tab[L.OUT_NORM, 0], eps, h)
    prepare(h, xs_e)
    matvec(wv, glob_tab[L.OUTPUT, 1], glob_tab[L.OUTPUT, 0], dims[L.D_VOCAB], h, xs_e, logits)
