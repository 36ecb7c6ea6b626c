"""KV caches that can be decoded together: slots of one pooled array.

layers.forward_stack reads every weight row once for all its tokens (matvec_multi) while each token keeps its
own position and cache slot, so one decode step of B conversations costs little more than one. For that their
caches are slots of one array the jitted stack can index:

  k_pool, v_pool: (n_slots, n_layers, n_kv_heads, max_seq, head_dim) float32

A slot's cache (PooledKVCache) is a view of its row of the pool: the single-conversation path (forward, the
prompt path) runs on it as on any cache.
"""

from __future__ import annotations

import numpy as np

from backends.base import HParams, OffsetCache


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
        self.scratch = scratch  # buffers of forward_stack for up to n tokens (NumbaModel._make_scratch)
        self.caches = [PooledKVCache(self, i) for i in range(n)]
