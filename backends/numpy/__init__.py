"""The reference backend: the plain forward pass in float32 numpy. Slow and obvious on purpose;
every faster backend is tested against it.

It trades memory for simplicity: each weight is dequantized to float32 on first use and kept (unless
`keep_weights=False`, for a one-off pass over a big model). Every matrix product goes through
`matmul`, which hands its input to `on_input` when one is set (the quantizer's activation statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backends.base import HParams, SimpleKVCache, output_tensor, rope_inv_freq, weight_bytes_per_token
from quant.formats import dequantize
from quant.gguf_file import GGUFFile


def load(gguf: GGUFFile, hp: HParams, threads: int) -> NumpyModel:
    return NumpyModel(gguf, hp)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x: (T, n_heads, head_dim) by angle position * inv_freq on the first rope_dim dims."""
    n_rot = 2 * len(inv_freq)
    angle = positions[:, None].astype(np.float32) * inv_freq[None, :]  # (T, n_rot/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot]
        out[..., : n_rot // 2] = a * cos - b * sin
        out[..., n_rot // 2 : n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class NumpyModel:
    name = "numpy"

    def __init__(self, gguf: GGUFFile, hp: HParams, keep_weights: bool = True,
                 on_input: Callable[[str, np.ndarray], None] | None = None):
        self.gguf, self.hparams = gguf, hp
        self.inv_freq = rope_inv_freq(hp, gguf)
        self.keep_weights = keep_weights
        self.on_input = on_input  # on_input(weight name, its input rows (T, n_cols) float32)
        self._w: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        """Weight `name` as float32, dequantized once (or on every use without keep_weights)."""
        if name in self._w:
            return self._w[name]
        t = self.gguf.tensors[name]
        w = dequantize(t.data, t.qtype).reshape(t.shape)
        if self.keep_weights:
            self._w[name] = w
        return w

    def matmul(self, h: np.ndarray, name: str) -> np.ndarray:
        """h (T, n_cols) @ weight `name` (n_rows, n_cols).T -> (T, n_rows)."""
        if self.on_input is not None:
            self.on_input(name, h)
        return h @ self.w(name).T

    def new_cache(self, max_seq: int) -> SimpleKVCache:
        return SimpleKVCache(self.hparams, max_seq)

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.gguf, self.hparams)

    def forward_batch(self, tokens: np.ndarray, caches: list[SimpleKVCache]) -> np.ndarray:
        """One token for each cache, at its offset: (B, n_vocab). The reference: one forward per cache."""
        return np.stack([self.forward(np.asarray(tokens[i:i + 1]), c) for i, c in enumerate(caches)])

    def forward(self, tokens: np.ndarray, cache: SimpleKVCache, all_logits: bool = False) -> np.ndarray:
        hp = self.hparams
        tokens = np.asarray(tokens, dtype=np.int64)
        T, start = len(tokens), cache.offset
        if start + T > cache.max_seq:
            raise ValueError(f"KV cache holds {cache.max_seq} positions; {start + T} needed")
        pos = np.arange(start, start + T)
        group = hp.n_heads // hp.n_kv_heads
        scale = 1.0 / np.sqrt(hp.head_dim)
        mask = np.triu(np.full((T, start + T), -np.inf, dtype=np.float32), k=start + 1)  # (T, start+T)

        x = self.w("token_embd.weight")[tokens]  # (T, n_embd)
        for i in range(hp.n_layers):
            p = f"blk.{i}."
            h = rms_norm(x, self.w(p + "attn_norm.weight"), hp.norm_eps)
            q, k, v = (self.matmul(h, p + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"))
            if hp.qkv_bias:
                q, k, v = q + self.w(p + "attn_q.bias"), k + self.w(p + "attn_k.bias"), v + self.w(p + "attn_v.bias")
            q = q.reshape(T, hp.n_heads, hp.head_dim)
            k = k.reshape(T, hp.n_kv_heads, hp.head_dim)
            v = v.reshape(T, hp.n_kv_heads, hp.head_dim)
            if hp.qk_norm:
                q = rms_norm(q, self.w(p + "attn_q_norm.weight"), hp.norm_eps)
                k = rms_norm(k, self.w(p + "attn_k_norm.weight"), hp.norm_eps)
            q, k = rope(q, pos, self.inv_freq, hp.rope_neox), rope(k, pos, self.inv_freq, hp.rope_neox)
            cache.k[i, start:start + T], cache.v[i, start:start + T] = k, v
            keys, values = cache.k[i, : start + T], cache.v[i, : start + T]  # (S, n_kv_heads, head_dim)

            att = np.empty((T, hp.n_heads, hp.head_dim), dtype=np.float32)
            for hd in range(hp.n_heads):
                kv = hd // group
                scores = q[:, hd, :] @ keys[:, kv, :].T * scale + mask  # (T, S)
                att[:, hd, :] = softmax(scores) @ values[:, kv, :]
            x = x + self.matmul(att.reshape(T, -1), p + "attn_output.weight")

            h = rms_norm(x, self.w(p + "ffn_norm.weight"), hp.norm_eps)
            ff = silu(self.matmul(h, p + "ffn_gate.weight")) * self.matmul(h, p + "ffn_up.weight")
            x = x + self.matmul(ff, p + "ffn_down.weight")

        cache.offset = start + T
        x = rms_norm(x if all_logits else x[-1:], self.w("output_norm.weight"), hp.norm_eps)
        logits = self.matmul(x, output_tensor(self.gguf, hp).name).astype(np.float32)
        return logits if all_logits else logits[0]
