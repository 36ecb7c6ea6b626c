"""The MLX KV cache: one keys and one values buffer per full-attention layer, grown `step` positions at a time;
a sliding-window layer keeps only its last window - 1 + SLACK positions.

Rows are stored as the cache's kv type (quant/kvtypes.py): f32 keeps the compute dtype, f16 float16, and q8_0 a row
of int8: head_dim codes followed by the float16 scale of each block of 32 (2 bytes each, as int8 pairs), so that
slicing and concatenating along positions stay one operation on one array. The attention reads them back in the
compute dtype (MLX's attention takes floats)."""

from __future__ import annotations

import mlx.core as mx

from backends.base import HParams, OffsetCache
from quant.kvtypes import row_elems

SLACK = 8  # positions a windowed layer keeps beyond what the next token sees: how far back trim() can go


class MlxKVCache(OffsetCache):
    """keys[i], values[i]: (1, n_kv_heads, capacity, row) in the storage dtype, for a full-attention layer.

    capacity grows in multiples of `step` (never past max_seq) as tokens arrive, so a short chat does not
    hold a 32k-token cache; positions at and beyond `offset` are stale and get overwritten. A windowed layer
    holds positions first[i] .. offset in keys[i] (no more than its window - 1 + slack of them)."""

    def __init__(self, hp: HParams, max_seq: int, dtype: mx.Dtype, step: int = 256, kv_type: str = "f32",
                 slack: int = SLACK):
        """dtype: what update() returns (the compute dtype); kv_type: how the buffers hold the rows."""
        self.hp, self.max_seq, self.step, self.kv_type, self.slack = hp, max_seq, step, kv_type, slack
        self.compute = dtype
        self.dtype = {"f32": dtype, "f16": mx.float16, "q8_0": mx.int8}[kv_type]  # of the buffers
        self.row = row_elems(kv_type, hp.head_dim)  # q8_0: int8 elements are its bytes
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
        shape = (1, hp.n_kv_heads, capacity, self.row)
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
        k, v = self.encode(k), self.encode(v)  # as stored; the queries see them so too
        if not window:
            self.keys[layer][:, :, self.offset:end] = k
            self.values[layer][:, :, self.offset:end] = v
            return self.decode(self.keys[layer][:, :, :end]), self.decode(self.values[layer][:, :, :end]), 0
        first = self.first[layer]
        if self.keys[layer] is None or self.offset == first:
            keys, values = k, v
        else:
            keys = mx.concatenate([self.keys[layer][:, :, : self.offset - first], k], axis=2)
            values = mx.concatenate([self.values[layer][:, :, : self.offset - first], v], axis=2)
        keep = min(end - first, window - 1 + self.slack)
        self.keys[layer], self.values[layer] = keys[:, :, -keep:], values[:, :, -keep:]
        self.first[layer] = end - keep
        return self.decode(keys), self.decode(values), first

    def encode(self, x: mx.array) -> mx.array:
        """(..., head_dim) in the compute dtype -> (..., row) as stored. q8_0: per block of 32, d = max |x| / 127
        and codes round(x / d), as ggml's Q8_0."""
        if self.kv_type != "q8_0":
            return x.astype(self.dtype)
        blocks = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 32)
        d = mx.max(mx.abs(blocks), axis=-1, keepdims=True) / 127.0
        inv = mx.where(d > 0, 1.0 / mx.maximum(d, 1e-30), 0.0)
        codes = mx.round(blocks * inv).astype(mx.int8).reshape(x.shape)
        scales = d.astype(mx.float16).reshape(*x.shape[:-1], -1).view(mx.int8)
        return mx.concatenate([codes, scales], axis=-1)

    def decode(self, x: mx.array) -> mx.array:
        """(..., row) as stored -> (..., head_dim) in the compute dtype."""
        if self.kv_type != "q8_0":
            return x.astype(self.compute)
        d = self.hp.head_dim
        scales = x[..., d:].view(mx.float16).astype(mx.float32)
        blocks = x[..., :d].astype(mx.float32).reshape(*x.shape[:-1], -1, 32) * scales[..., None]
        return blocks.reshape(*x.shape[:-1], d).astype(self.compute)

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
