"""The MLX KV cache: one keys and one values buffer per full-attention layer, grown `step` positions at a time;
a sliding-window layer keeps only its last window - 1 + SLACK positions."""

from __future__ import annotations

import mlx.core as mx

from backends.base import HParams, OffsetCache

SLACK = 8  # positions a windowed layer keeps beyond what the next token sees: how far back trim() can go


class MlxKVCache(OffsetCache):
    """keys[i], values[i]: (1, n_kv_heads, capacity, head_dim) in the compute dtype, for a full-attention layer.

    capacity grows in multiples of `step` (never past max_seq) as tokens arrive, so a short chat does not
    hold a 32k-token cache; positions at and beyond `offset` are stale and get overwritten. A windowed layer
    holds positions first[i] .. offset in keys[i] (no more than its window - 1 + slack of them)."""

    def __init__(self, hp: HParams, max_seq: int, dtype: mx.Dtype, step: int = 256, slack: int = SLACK):
        self.hp, self.max_seq, self.dtype, self.step, self.slack = hp, max_seq, dtype, step, slack
        self.offset = 0
        self.capacity = 0
        self.windows = [hp.window(i) for i in range(hp.n_layers)]
        self.keys: list[mx.array | None] = [None] * hp.n_layers
        self.values: list[mx.array | None] = [None] * hp.n_layers
        self.first = [0] * hp.n_layers  # position of keys[i][:, :, 0] (windowed layers)

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
        for i in range(hp.n_layers):
            if self.windows[i]:
                continue
            k, v = mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=self.dtype)
            if self.offset:
                k[:, :, : self.offset] = self.keys[i][:, :, : self.offset]
                v[:, :, : self.offset] = self.values[i][:, :, : self.offset]
            self.keys[i], self.values[i] = k, v
        self.capacity = capacity

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, int]:
        """Store k, v: (1, n_kv_heads, T, head_dim) at positions offset..offset+T of `layer`; returns the keys
        and values the new queries may see and the position of the first of them (0 for a full layer). The
        caller advances `offset` once all layers are done."""
        end = self.offset + k.shape[2]
        window = self.windows[layer]
        if not window:
            self.keys[layer][:, :, self.offset:end] = k
            self.values[layer][:, :, self.offset:end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], 0
        first = self.first[layer]
        if self.keys[layer] is None or self.offset == first:
            keys, values = k, v
        else:
            keys = mx.concatenate([self.keys[layer][:, :, : self.offset - first], k], axis=2)
            values = mx.concatenate([self.values[layer][:, :, : self.offset - first], v], axis=2)
        keep = min(end - first, window - 1 + self.slack)
        self.keys[layer], self.values[layer] = keys[:, :, -keep:], values[:, :, -keep:]
        self.first[layer] = end - keep
        return keys, values, first

    def trim(self, n: int) -> int:
        """Forget the last n positions; a windowed layer that no longer holds what the next token sees makes
        the whole cache start again (offset 0)."""
        n = min(n, self.offset)
        new = self.offset - n
        for i, window in enumerate(self.windows):
            if window and self.first[i] > max(0, new - window + 1):
                dropped = self.offset
                self.reset()
                return dropped
        self.offset = new
        return n

    def reset(self) -> None:
        self.offset = 0
        self.first = [0] * self.hp.n_layers
        for i, window in enumerate(self.windows):
            if window:
                self.keys[i] = self.values[i] = None

    def state(self) -> list[mx.array]:
        return [a for a in self.keys + self.values if a is not None]
