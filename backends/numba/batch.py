"""KV caches that can be decoded together: rows of one pooled array.

layers.forward_stack reads every weight row once for all its tokens (matvec_multi) while each token keeps its
own position and cache row, so one decode step of B conversations costs little more than one. For that their
caches are rows of one array the jitted stack can index:

  k_pool, v_pool: (n_slots, cache elements) of the kv type's storage dtype, each row laid out as a RingKVCache
                  (layout: (n_layers, 2))

A slot's cache (PooledKVCache) is a NumbaKVCache living in its row of the pool: the single-conversation path
(forward, the prompt path) runs on it as on any cache.

Every cache carries its conversation's scratch buffers (RunScratch): the loaded model holds only weights and
tables, so conversations on one model can run from several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backends.base import HParams, RingKVCache, lazy_zeros
from quant.kvtypes import KV_TYPES, check_kv_type


class RunScratch:
    """One conversation's work buffers for the forward pass.

    stack: forward_stack's buffers for up to small_t tokens (NumbaModel._make_scratch). The prompt path's, made
    on its first use: tiles, each thread's weight tile for the BLAS products (float formats); packed, each
    thread's packed rows for the integer GEMM.
    """

    def __init__(self, stack: tuple):
        self.stack = stack
        self.tiles: list[np.ndarray] | None = None
        self.packed: list | None = None


class NumbaKVCache(RingKVCache):
    """A RingKVCache with its conversation's scratch buffers: the whole run state of one conversation."""

    def __init__(self, hp: HParams, max_seq: int, slack: int, scratch: RunScratch, k: np.ndarray | None = None,
                 v: np.ndarray | None = None, kv_type: str = "f32"):
        super().__init__(hp, max_seq, slack, k, v, kv_type)
        self.scratch = scratch


class PooledKVCache(NumbaKVCache):
    """One slot of a CachePool: a NumbaKVCache whose k, v are views of the pool's row `slot`."""

    def __init__(self, pool: CachePool, slot: int, scratch: RunScratch):
        super().__init__(pool.hp, pool.max_seq, pool.slack, scratch, pool.k[slot], pool.v[slot], pool.kv_type)
        self.pool, self.slot = pool, slot


class CachePool:
    """KV caches for `n` conversations decoded together, and the batch stack's scratch buffers for n tokens."""

    def __init__(self, hp: HParams, n: int, max_seq: int, slack: int, scratch: tuple,
                 slot_scratch: Callable[[], RunScratch], kv_type: str):
        check_kv_type(kv_type, hp.head_dim)
        self.hp, self.max_seq, self.slack, self.kv_type = hp, max_seq, slack, kv_type
        self.layout = RingKVCache.plan(hp, max_seq, slack, kv_type)
        shape = (n, RingKVCache.elems(self.layout, hp, kv_type))
        self.k, self.v = lazy_zeros(shape, KV_TYPES[kv_type][2]), lazy_zeros(shape, KV_TYPES[kv_type][2])
        self.scratch = scratch  # buffers of forward_stack for up to n tokens (NumbaModel._make_scratch)
        self.caches = [PooledKVCache(self, i, slot_scratch()) for i in range(n)]
