"""What every backend shares: the model blueprint (`HParams`, from the family modules in quant/families), and the
interface of a loaded model and its KV cache."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from quant.families import (
    HParams,
    global_weights,
    layer_weights,
    read_hparams,
    rope_groups,
    rope_inv_freq,
)
from quant.gguf_file import GGUFFile, Tensor

__all__ = ["HParams", "KVCache", "Model", "OffsetCache", "SimpleKVCache", "count_params", "global_weights",
           "layer_weights", "output_tensor", "read_hparams", "rope_groups", "rope_inv_freq",
           "weight_bytes_per_token"]


def count_params(gguf: GGUFFile) -> int:
    return sum(t.n_elements for t in gguf.tensors.values())


def weight_bytes_per_token(gguf: GGUFFile, hp: HParams) -> int:
    """Bytes of weights a decoded token reads: every tensor, except that the embedding table is read one
    row per token unless it is also the output matrix."""
    total = sum(t.n_bytes for t in gguf.tensors.values())
    return total if hp.tied_embeddings else total - global_weights(gguf, hp)["embd"].n_bytes


def output_tensor(gguf: GGUFFile, hp: HParams) -> Tensor:
    return global_weights(gguf, hp)["output"]


class KVCache(Protocol):
    """Keys and values of the tokens seen so far, allocated once for `max_seq` positions."""

    offset: int  # number of positions filled
    max_seq: int

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were dropped."""

    def reset(self) -> None:
        """Forget everything (keeps the memory)."""


class Model(Protocol):
    """A loaded model on one backend."""

    hparams: HParams
    name: str  # backend name

    def new_cache(self, max_seq: int, slack: int = 0) -> KVCache:
        """A KV cache for up to `max_seq` positions, which trim() can take back at least `slack` positions
        (speculative decoding rejects up to that many; a rotating cache keeps that many past its window)."""

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` (int32, (T,)) at positions cache.offset.. and advance the cache.
        Returns float32 logits: (T, n_vocab) if all_logits else (n_vocab,) for the last token."""

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one token (for bandwidth figures)."""


class OffsetCache:
    """The bookkeeping every KV cache shares: positions past `offset` are free and get overwritten."""

    offset: int
    max_seq: int

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0


def kv_capacity(hp: HParams, layer: int, max_seq: int, slack: int) -> int:
    """Positions a layer's cache keeps: all max_seq, or for a sliding-window layer its window plus `slack` (the
    most tokens one forward step writes before its first query has read what they overwrite, less one)."""
    window = hp.window(layer)
    return max_seq if not window else min(max_seq, window + slack)


def kv_cache_bytes(hp: HParams, max_seq: int, slack: int | None = 8, value_bytes: int = 4) -> int:
    """Bytes of keys and values for `max_seq` positions: rotating windowed layers with `slack`, or with
    slack None a cache that keeps every position of every layer."""
    per_position = 2 * hp.n_kv_heads * hp.head_dim * value_bytes
    if slack is None:
        return hp.n_layers * max_seq * per_position
    return sum(kv_capacity(hp, i, max_seq, slack) for i in range(hp.n_layers)) * per_position


class RingKVCache(OffsetCache):
    """Keys and values with a ring per sliding-window layer: a layer keeps its last kv_capacity positions,
    position p in slot p % capacity (full-attention layers: every position, p in slot p).

    k, v: flat float32; layer i's block starts at float layout[i, 0] and is (n_kv_heads, layout[i, 1], head_dim).
    """

    def __init__(self, hp: HParams, max_seq: int, slack: int, k: np.ndarray | None = None,
                 v: np.ndarray | None = None):
        """A cache of its own, or with k, v given (views of the layout's size) one that lives in them."""
        self.hp, self.max_seq, self.offset = hp, max_seq, 0
        self.layout = self.plan(hp, max_seq, slack)
        size = self.floats(self.layout, hp)
        self.k = np.zeros(size, dtype=np.float32) if k is None else k
        self.v = np.zeros(size, dtype=np.float32) if v is None else v

    @staticmethod
    def plan(hp: HParams, max_seq: int, slack: int) -> np.ndarray:
        """layout: (n_layers, 2) int64, each layer's (first float, positions kept)."""
        caps = [kv_capacity(hp, i, max_seq, slack) for i in range(hp.n_layers)]
        offsets = np.concatenate([[0], np.cumsum(caps)[:-1]]) * hp.n_kv_heads * hp.head_dim
        return np.array(list(zip(offsets, caps, strict=True)), dtype=np.int64).reshape(-1, 2)

    @staticmethod
    def floats(layout: np.ndarray, hp: HParams) -> int:
        """Floats of keys (or of values) a cache of this layout holds."""
        return int(layout[:, 1].sum()) * hp.n_kv_heads * hp.head_dim

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (n_kv_heads, capacity, head_dim) of layer i's keys and values."""
        off, cap = self.layout[i]
        shape = (self.hp.n_kv_heads, int(cap), self.hp.head_dim)
        return self.k[off:off + cap * shape[0] * shape[2]].reshape(shape), \
            self.v[off:off + cap * shape[0] * shape[2]].reshape(shape)

    def trim(self, n: int) -> int:
        """Forget the last n positions. A ring that has overwritten a position the next token would see
        (n beyond its slack) cannot go back that far: then everything is dropped (offset 0)."""
        n = min(n, self.offset)
        new = self.offset - n
        for i, (_, cap) in enumerate(self.layout):
            window = self.hp.window(i)
            if window and max(0, new - window + 1) < max(0, self.offset - int(cap)):
                dropped = self.offset
                self.reset()
                return dropped
        self.offset = new
        return n


class SimpleKVCache(OffsetCache):
    """KV cache as two numpy arrays; used by the numpy and numba backends.

    k, v: (n_layers, max_seq, n_kv_heads, head_dim) float32, or with heads_first (n_layers, n_kv_heads, max_seq,
    head_dim): each KV head's positions one contiguous run, which attention then streams in order.
    """

    def __init__(self, hp: HParams, max_seq: int, heads_first: bool = False):
        self.max_seq = max_seq
        self.offset = 0
        shape = ((hp.n_layers, hp.n_kv_heads, max_seq, hp.head_dim) if heads_first
                 else (hp.n_layers, max_seq, hp.n_kv_heads, hp.head_dim))
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
