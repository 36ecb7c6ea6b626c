"""What every backend shares: the model blueprint (`HParams`, from the family modules in quant/families), and the
interface of a loaded model and its KV cache."""

from __future__ import annotations

import mmap
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
from quant.kvtypes import KV_CODES, KV_TYPES, check_kv_type, row_bytes, row_elems

__all__ = ["KV_TYPES", "HParams", "KVCache", "Model", "OffsetCache", "SimpleKVCache",
           "count_params", "global_weights", "layer_weights", "lazy_zeros", "output_tensor", "read_hparams",
           "rope_groups", "rope_inv_freq", "weight_bytes_per_token"]


def count_params(gguf: GGUFFile) -> int:
    return sum(t.n_elements for t in gguf.tensors.values())


def weight_bytes_per_token(gguf: GGUFFile, hp: HParams) -> int:
    """Bytes of weights a decoded token reads: every tensor, except that the embedding table is read one
    row per token unless it is also the output matrix."""
    total = sum(t.n_bytes for t in gguf.tensors.values())
    return total if hp.tied_embeddings else total - global_weights(gguf, hp)["embd"].n_bytes


def output_tensor(gguf: GGUFFile, hp: HParams) -> Tensor:
    return global_weights(gguf, hp)["output"]


def lazy_zeros(shape, dtype) -> np.ndarray:
    """Zeros in memory that is committed a 4 KB page at a time, where it is first written (a KV cache). numpy asks
    the kernel for 2 MB pages on big arrays; a cache's first rows land in every layer's and head's block, so its
    first prompt committed and zeroed all of it, which a fresh server slot paid for in its first reply
    (benchmarks/RESULTS.md)."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, n)  # anonymous and private: zero pages, each committed on its first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: keep 4 KB pages even where huge pages are on for everything
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


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

    def new_cache(self, max_seq: int, kv_type: str = "f32", slack: int = 0) -> KVCache:
        """A KV cache for up to `max_seq` positions, stored as kv_type (quant/kvtypes.py), which trim() can take
        back at least `slack` positions (speculative decoding rejects up to that many; a rotating cache keeps
        that many past its window). The library's default kv_type is the exact f32; the engine's, per backend,
        is backends.default_kv_type."""

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        """Run `tokens` (int32, (T,)) at positions cache.offset.. and advance the cache.
        Returns float32 logits: (T, n_vocab) if all_logits else (n_vocab,) for the last token; with `hidden`,
        the output norm's states in their place, (T, n_embd) or (n_embd,): what embeddings are pooled from."""

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one token (for bandwidth figures)."""


def rotate_keys(x: np.ndarray, delta: int, inv_freq: np.ndarray, neox: bool) -> np.ndarray:
    """Keys x: (..., head_dim) float32 rotated by `delta` positions (RoPE's rotations compose: a key at p rotated
    by -n is the key at p - n). The first 2 len(inv_freq) dims rotate, paired as the family's RoPE pairs them:
    neox (i, i + half), else (2i, 2i + 1). Any attention factor the keys carry is left as it is."""
    half = len(inv_freq)
    angle = np.float64(delta) * inv_freq.astype(np.float64)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    out = np.array(x, dtype=np.float32)
    a_idx = np.arange(half) if neox else np.arange(0, 2 * half, 2)
    b_idx = a_idx + half if neox else a_idx + 1
    a, b = x[..., a_idx], x[..., b_idx]
    out[..., a_idx] = a * cos - b * sin
    out[..., b_idx] = a * sin + b * cos
    return out


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


def kv_cache_bytes(hp: HParams, max_seq: int, slack: int | None = 8, kv_type: str = "f32") -> int:
    """Bytes of keys and values for `max_seq` positions stored as kv_type: rotating windowed layers with `slack`,
    or with slack None a cache that keeps every position of every layer."""
    per_position = 2 * hp.n_kv_heads * row_bytes(kv_type, hp.head_dim)
    if slack is None:
        return hp.n_layers * max_seq * per_position
    return sum(kv_capacity(hp, i, max_seq, slack) for i in range(hp.n_layers)) * per_position


class RingKVCache(OffsetCache):
    """Keys and values with a ring per sliding-window layer: a layer keeps its last kv_capacity positions,
    position p in slot p % capacity (full-attention layers: every position, p in slot p).

    k, v: flat arrays of kv_type's storage dtype (quant/kvtypes.py: float32, float16, or q8_0's bytes); layer i's
    block starts at element layout[i, 0] and is (n_kv_heads, layout[i, 1], row_elems): a row per position of
    each KV head.
    """

    def __init__(self, hp: HParams, max_seq: int, slack: int, k: np.ndarray | None = None,
                 v: np.ndarray | None = None, kv_type: str = "f32"):
        """A cache of its own, or with k, v given (views of the layout's size) one that lives in them."""
        check_kv_type(kv_type, hp.head_dim)
        self.hp, self.max_seq, self.offset, self.kv_type = hp, max_seq, 0, kv_type
        self.row = row_elems(kv_type, hp.head_dim)
        self.layout = self.plan(hp, max_seq, slack, kv_type)
        size = self.elems(self.layout, hp, kv_type)
        dtype = KV_TYPES[kv_type][2]
        self.k = lazy_zeros(size, dtype) if k is None else k
        self.v = lazy_zeros(size, dtype) if v is None else v
        # the layout in bytes (first byte, positions kept), for kernels that read the cache as bytes
        self.byte_layout = self.layout * np.array([np.dtype(dtype).itemsize, 1], dtype=np.int64)

    @property
    def kv_code(self) -> int:
        """The kernels' code of the storage type (quant.kvtypes.KV_CODES)."""
        return KV_CODES[self.kv_type]

    @staticmethod
    def plan(hp: HParams, max_seq: int, slack: int, kv_type: str = "f32") -> np.ndarray:
        """layout: (n_layers, 2) int64, each layer's (first element, positions kept)."""
        caps = [kv_capacity(hp, i, max_seq, slack) for i in range(hp.n_layers)]
        offsets = np.concatenate([[0], np.cumsum(caps)[:-1]]) * hp.n_kv_heads * row_elems(kv_type, hp.head_dim)
        return np.array(list(zip(offsets, caps, strict=True)), dtype=np.int64).reshape(-1, 2)

    @staticmethod
    def elems(layout: np.ndarray, hp: HParams, kv_type: str = "f32") -> int:
        """Elements of keys (or of values) a cache of this layout holds."""
        return int(layout[:, 1].sum()) * hp.n_kv_heads * row_elems(kv_type, hp.head_dim)

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (n_kv_heads, capacity, row_elems) of layer i's keys and values as stored."""
        off, cap = self.layout[i]
        shape = (self.hp.n_kv_heads, int(cap), self.row)
        n = cap * shape[0] * shape[2]
        return self.k[off:off + n].reshape(shape), self.v[off:off + n].reshape(shape)

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
    """KV cache as two numpy arrays; used by the numpy backend.

    k, v: (n_layers, max_seq, n_kv_heads, row_elems) in kv_type's storage dtype (quant/kvtypes.py), or with
    heads_first (n_layers, n_kv_heads, max_seq, row_elems).
    """

    def __init__(self, hp: HParams, max_seq: int, heads_first: bool = False, kv_type: str = "f32"):
        check_kv_type(kv_type, hp.head_dim)
        self.max_seq, self.kv_type = max_seq, kv_type
        self.offset = 0
        row = row_elems(kv_type, hp.head_dim)
        shape = ((hp.n_layers, hp.n_kv_heads, max_seq, row) if heads_first
                 else (hp.n_layers, max_seq, hp.n_kv_heads, row))
        self.k = lazy_zeros(shape, KV_TYPES[kv_type][2])
        self.v = lazy_zeros(shape, KV_TYPES[kv_type][2])
