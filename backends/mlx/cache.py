"""The MLX KV cache: one keys and one values buffer per layer, grown `step` positions at a time."""

from __future__ import annotations

import mlx.core as mx

from backends.base import HParams, OffsetCache


class MlxKVCache(OffsetCache):
    """keys[i], values[i]: (1, n_kv_heads, capacity, head_dim) in the compute dtype.

    capacity grows in multiples of `step` (never past max_seq) as tokens arrive, so a short chat does not
    hold a 32k-token cache; positions at and beyond `offset` are stale and get overwritten."""

    def __init__(self, hp: HParams, max_seq: int, dtype: mx.Dtype, step: int = 256):
        self.hp, self.max_seq, self.dtype, self.step = hp, max_seq, dtype, step
        self.offset = 0
        self.capacity = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    def reserve(self, n_new: int) -> None:
        """Make room for `n_new` more positions (raises ValueError past max_seq)."""
        need = self.offset + n_new
        if need > self.max_seq:
            raise ValueError(f"KV cache holds {self.max_seq} positions; {need} needed")
        if need <= self.capacity:
            return
        capacity = min(self.max_seq, -(-need // self.step) * self.step)
        hp = self.hp
        shape = (1, hp.n_kv_heads, capacity, hp.head_dim)
        grown_k, grown_v = [], []
        for i in range(hp.n_layers):
            k, v = mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=self.dtype)
            if self.offset:
                k[:, :, : self.offset] = self.keys[i][:, :, : self.offset]
                v[:, :, : self.offset] = self.values[i][:, :, : self.offset]
            grown_k.append(k)
            grown_v.append(v)
        self.keys, self.values, self.capacity = grown_k, grown_v, capacity

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v: (1, n_kv_heads, T, head_dim) at positions offset..offset+T of `layer`; returns the
        keys and values of positions 0..offset+T. The caller advances `offset` once all layers are done."""
        end = self.offset + k.shape[2]
        self.keys[layer][:, :, self.offset:end] = k
        self.values[layer][:, :, self.offset:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def state(self) -> list[mx.array]:
        return self.keys + self.values

