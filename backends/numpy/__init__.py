"""The reference backend: the plain forward pass in float32 numpy. Slow and obvious on purpose;
every faster backend is tested against it.

It trades memory for simplicity: each weight is dequantized to float32 on first use and kept (unless
`keep_weights=False`, for a one-off pass over a big model). Every matrix product goes through
`matmul`, which hands its input to `on_input` when one is set (the quantizer's activation statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from backends.base import (
    HParams,
    SimpleKVCache,
    global_weights,
    layer_weights,
    rope_inv_freq,
    rotate_keys,
    weight_bytes_per_token,
)
from quant.formats import dequantize
from quant.gguf_file import GGUFFile, Tensor
from quant.kvtypes import decode, encode


def load(gguf: GGUFFile, hp: HParams, threads: int) -> NumpyModel:
    return NumpyModel(gguf, hp)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, neox: bool, mscale: float = 1.0) -> np.ndarray:
    """Rotate x: (T, n_heads, head_dim) by angle position * inv_freq on the first rope_dim dims (which are also
    multiplied by mscale: LongRoPE's attention factor)."""
    n_rot = 2 * len(inv_freq)
    angle = positions[:, None].astype(np.float32) * inv_freq[None, :]  # (T, n_rot/2)
    m = np.float32(mscale)
    cos, sin = m * np.cos(angle)[:, None, :], m * np.sin(angle)[:, None, :]
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


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class NumpyModel:
    name = "numpy"

    def __init__(self, gguf: GGUFFile, hp: HParams, keep_weights: bool = True,
                 on_input: Callable[[str, np.ndarray], None] | None = None):
        self.gguf, self.hparams = gguf, hp
        self._inv_freq: dict[bool, list[np.ndarray]] = {}  # long context? -> per layer: (rope_dim/2,)
        self.layers = [layer_weights(gguf, hp, i) for i in range(hp.n_layers)]  # slot -> Tensor
        self.globals = global_weights(gguf, hp)
        self.keep_weights = keep_weights
        self.on_input = on_input  # on_input(weight name, its input rows (T, n_cols) float32)
        self._w: dict[str, np.ndarray] = {}

    def w(self, t: Tensor) -> np.ndarray:
        """Weight `t` as float32, dequantized once (or on every use without keep_weights)."""
        if t.name in self._w:
            return self._w[t.name]
        w = dequantize(t.data, t.qtype).reshape(t.shape)
        if self.keep_weights:
            self._w[t.name] = w
        return w

    def matmul(self, h: np.ndarray, t: Tensor) -> np.ndarray:
        """h (T, n_cols) @ weight t (n_rows, n_cols).T -> (T, n_rows)."""
        if self.on_input is not None:
            self.on_input(t.name, h)
        return h @ self.w(t).T

    def new_cache(self, max_seq: int, kv_type: str = "f32", slack: int = 0) -> SimpleKVCache:
        """Every position of every layer: trim() can take back any number (`slack` is for rotating caches)."""
        return SimpleKVCache(self.hparams, max_seq, kv_type=kv_type)

    def inv_freq(self, max_seq: int) -> list[np.ndarray]:
        """Each layer's RoPE inverse frequencies for a context of max_seq (LongRoPE picks its factors by it)."""
        long = self.hparams.rope_long and max_seq > self.hparams.rope_orig_ctx
        if long not in self._inv_freq:
            self._inv_freq[long] = [rope_inv_freq(self.hparams, self.gguf, i, max_seq)
                                    for i in range(self.hparams.n_layers)]
        return self._inv_freq[long]

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.gguf, self.hparams)

    def forward_batch(self, tokens: np.ndarray, caches: list[SimpleKVCache]) -> np.ndarray:
        """One token for each cache, at its offset: (B, n_vocab). The reference: one forward per cache."""
        return np.stack([self.forward(np.asarray(tokens[i:i + 1]), c) for i, c in enumerate(caches)])

    def attention(self, i: int, lw: dict[str, Tensor], h: np.ndarray, cache: SimpleKVCache,
                  pos: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) at positions pos -> (T, n_heads * head_dim); writes layer i's keys and values."""
        hp = self.hparams
        T, start = len(pos), int(pos[0])
        q_dim, kv_dim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        if hp.fused_qkv:
            q, k, v = np.split(self.matmul(h, lw["wqkv"]), [q_dim, q_dim + kv_dim], axis=1)
        else:
            q, k, v = (self.matmul(h, lw[s]) for s in ("wq", "wk", "wv"))
        if hp.qkv_bias:
            q, k, v = q + self.w(lw["bq"]), k + self.w(lw["bk"]), v + self.w(lw["bv"])
        q = q.reshape(T, hp.n_heads, hp.head_dim)
        k = k.reshape(T, hp.n_kv_heads, hp.head_dim)
        v = v.reshape(T, hp.n_kv_heads, hp.head_dim)
        if hp.qk_norm:
            q = rms_norm(q, self.w(lw["q_norm"]), hp.norm_eps)
            k = rms_norm(k, self.w(lw["k_norm"]), hp.norm_eps)
        inv, m = self.inv_freq(cache.max_seq)[i], hp.rope_attn_factor
        q, k = rope(q, pos, inv, hp.rope_neox, m), rope(k, pos, inv, hp.rope_neox, m)
        # stored in the cache's type, and read back from it: the new tokens see their own keys as stored too
        cache.k[i, start:start + T], cache.v[i, start:start + T] = encode(k, cache.kv_type), encode(v, cache.kv_type)
        keys = decode(cache.k[i, : start + T], cache.kv_type)  # (S, n_kv_heads, head_dim) float32
        values = decode(cache.v[i, : start + T], cache.kv_type)

        # query at position p sees keys p - window < s <= p (window 0: every s <= p)
        s = np.arange(start + T)[None, :]
        visible = s <= pos[:, None]
        if hp.window(i):
            visible &= s > pos[:, None] - hp.window(i)
        mask = np.where(visible, np.float32(0), np.float32(-np.inf))  # (T, S)
        group = hp.n_heads // hp.n_kv_heads
        att = np.empty((T, hp.n_heads, hp.head_dim), dtype=np.float32)
        for hd in range(hp.n_heads):
            kv = hd // group
            scores = q[:, hd, :] @ keys[:, kv, :].T * np.float32(hp.scale) + mask  # (T, S)
            att[:, hd, :] = softmax(scores) @ values[:, kv, :]
        return att.reshape(T, q_dim)

    def shift_cache(self, cache: SimpleKVCache, start: int, n: int) -> bool:
        """Drop cached positions start .. start + n and move the later ones down by n, their keys rotated back by
        n positions. Exact for every layer here: this cache keeps every position (windows are masks)."""
        hp, end = self.hparams, cache.offset
        if n <= 0 or not 0 <= start <= end - n:
            return False
        for i in range(hp.n_layers):
            keys = rotate_keys(decode(cache.k[i, start + n:end], cache.kv_type), -n, self.inv_freq(cache.max_seq)[i],
                               hp.rope_neox)
            cache.k[i, start:end - n] = encode(keys, cache.kv_type)
            cache.v[i, start:end - n] = cache.v[i, start + n:end].copy()
        cache.offset = end - n
        return True

    def mlp(self, lw: dict[str, Tensor], h: np.ndarray) -> np.ndarray:
        hp = self.hparams
        if hp.fused_gate_up:
            g, u = np.split(self.matmul(h, lw["gate_up"]), 2, axis=1)
        else:
            g, u = self.matmul(h, lw["gate"]), self.matmul(h, lw["up"])
        return self.matmul(ACTIVATIONS[hp.act](g) * u, lw["down"])

    def forward(self, tokens: np.ndarray, cache: SimpleKVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        hp = self.hparams
        tokens = np.asarray(tokens, dtype=np.int64)
        T, start = len(tokens), cache.offset
        if start + T > cache.max_seq:
            raise ValueError(f"KV cache holds {cache.max_seq} positions; {start + T} needed")
        pos = np.arange(start, start + T)
        eps = hp.norm_eps

        x = self.w(self.globals["embd"])[tokens] * np.float32(hp.embed_scale)  # (T, n_embd): the residual stream
        for i, lw in enumerate(self.layers):
            a = self.matmul(self.attention(i, lw, rms_norm(x, self.w(lw["attn_norm"]), eps), cache, pos), lw["wo"])
            if hp.norm == "sandwich":
                a = rms_norm(a, self.w(lw["post_attn_norm"]), eps)
            x = x + a
            f = self.mlp(lw, rms_norm(x, self.w(lw["ffn_norm"]), eps))
            if hp.norm == "sandwich":
                f = rms_norm(f, self.w(lw["post_ffn_norm"]), eps)
            x = x + f

        cache.offset = start + T
        x = rms_norm(x if all_logits else x[-1:], self.w(self.globals["out_norm"]), eps)
        if hidden:
            return x.astype(np.float32) if all_logits else x[0].astype(np.float32)
        logits = self.matmul(x, self.globals["output"]).astype(np.float32)
        if hp.logit_softcap:
            logits = np.float32(hp.logit_softcap) * np.tanh(logits / np.float32(hp.logit_softcap))
        return logits if all_logits else logits[0]
