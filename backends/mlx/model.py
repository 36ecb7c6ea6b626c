"""The forward pass on MLX: the same transformer as backends/numpy, built as a lazy MLX graph.

Weights stay quantized (see weights.py); activations are float32 on the CPU build (for accuracy:
logits track the numpy reference) and float16 on a GPU. The token loop lives in the engine; besides
forward(), `decode_stream` lets it overlap its own per-token work with the next MLX step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from backends.base import HParams, global_weights, layer_weights, rope_inv_freq
from backends.mlx.cache import SLACK, MlxKVCache
from backends.mlx.weights import Linear, fuse, linear, vector
from quant.gguf_file import GGUFFile
from quant.kvtypes import check_kv_type


@dataclass(frozen=True)
class Layer:
    """One transformer block. `qkv` is one matmul with the q, k, v rows stacked when the three share a
    layout, else the three matmuls; `gate_up` likewise."""

    attn_norm: mx.array  # (n_embd,)
    ffn_norm: mx.array  # (n_embd,)
    qkv: tuple[Linear, ...]  # (n_heads * head_dim + 2 * n_kv_heads * head_dim, n_embd) stacked
    wo: Linear  # (n_embd, n_heads * head_dim)
    gate_up: tuple[Linear, ...]  # (2 * n_ff, n_embd) stacked
    down: Linear  # (n_embd, n_ff)
    q_bias: mx.array | None = None  # (n_heads * head_dim,)
    k_bias: mx.array | None = None  # (n_kv_heads * head_dim,)
    v_bias: mx.array | None = None
    q_norm: mx.array | None = None  # (head_dim,)
    k_norm: mx.array | None = None
    post_attn_norm: mx.array | None = None  # (n_embd,): Gemma's sandwich norms
    post_ffn_norm: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        """Every array the block holds (for mx.eval and byte counts)."""
        out = [self.attn_norm, self.ffn_norm, self.q_bias, self.k_bias, self.v_bias, self.q_norm, self.k_norm,
               self.post_attn_norm, self.post_ffn_norm]
        for m in (*self.qkv, self.wo, *self.gate_up, self.down):
            out += m.arrays()
        return [a for a in out if a is not None]


def default_dtype() -> mx.Dtype:
    """float32 on the CPU build (accuracy), float16 on a GPU (bandwidth)."""
    return mx.float32 if mx.default_device().type == mx.cpu else mx.float16


def load_layer(gguf: GGUFFile, hp: HParams, i: int, dtype: mx.Dtype) -> Layer:
    w = layer_weights(gguf, hp, i)
    vectors = {name: vector(w[slot], dtype) for name, slot in (
        ("q_bias", "bq"), ("k_bias", "bk"), ("v_bias", "bv"), ("q_norm", "q_norm"), ("k_norm", "k_norm"),
        ("post_attn_norm", "post_attn_norm"), ("post_ffn_norm", "post_ffn_norm")) if slot in w}
    return Layer(
        attn_norm=vector(w["attn_norm"], dtype),
        ffn_norm=vector(w["ffn_norm"], dtype),
        qkv=(linear(w["wqkv"]),) if "wqkv" in w else fuse([linear(w[s]) for s in ("wq", "wk", "wv")]),
        wo=linear(w["wo"]),
        gate_up=(linear(w["gate_up"]),) if "gate_up" in w else fuse([linear(w["gate"]), linear(w["up"])]),
        down=linear(w["down"]),
        **vectors,
    )


class MlxModel:
    name = "mlx"

    def __init__(self, gguf: GGUFFile, hp: HParams, dtype: mx.Dtype | None = None):
        self.hparams = hp
        self.dtype = dtype or default_dtype()
        g = global_weights(gguf, hp)
        self.embed = linear(g["embd"])  # (n_vocab, n_embd); rows() is the lookup
        self.output = self.embed if hp.tied_embeddings else linear(g["output"])
        self.output_norm = vector(g["out_norm"], self.dtype)
        self.layers: list[Layer] = []
        for i in range(hp.n_layers):  # evaluated one by one, so the unfused matrices are freed as we go
            self.layers.append(load_layer(gguf, hp, i, self.dtype))
            mx.eval(self.layers[-1].arrays())
        # mx.fast.rope wants the period of each pair: 1 / inv_freq (llama3 factors, scaling folded in), per layer;
        # with LongRoPE a second list for contexts past the original one
        self.rope_periods = [mx.array(1.0 / rope_inv_freq(hp, gguf, i)) for i in range(hp.n_layers)]
        self.rope_periods_long = [mx.array(1.0 / rope_inv_freq(hp, gguf, i, hp.rope_orig_ctx + 1))
                                  for i in range(hp.n_layers)] if hp.rope_long else self.rope_periods
        # LongRoPE's attention factor multiplies the rotated dims (cos and sin) of q and k
        self.rope_mscale = None if hp.rope_attn_factor == 1.0 else mx.array(
            np.where(np.arange(hp.head_dim) < hp.rope_dim, hp.rope_attn_factor, 1.0).astype(np.float32))
        self.attn_scale = hp.scale
        mx.eval(self.arrays())

    def new_cache(self, max_seq: int, kv_type: str = "f32", slack: int = 0) -> MlxKVCache:
        """kv_type: f32 keeps the compute dtype (backends/mlx/cache.py)."""
        check_kv_type(kv_type, self.hparams.head_dim)
        return MlxKVCache(self.hparams, max_seq, self.dtype, kv_type=kv_type, slack=max(SLACK, slack))

    def arrays(self) -> list[mx.array]:
        out = [*self.embed.arrays(), *self.output.arrays(), self.output_norm, *self.rope_periods]
        out += [] if self.rope_periods_long is self.rope_periods else self.rope_periods_long
        for layer in self.layers:
            out += layer.arrays()
        return out

    def weight_bytes_per_token(self) -> int:
        """Every block, the output matrix and norm, and one embedding row."""
        blocks = sum(a.nbytes for layer in self.layers for a in layer.arrays())
        output = sum(a.nbytes for a in self.output.arrays()) + self.output_norm.nbytes
        embed_row = sum(a.nbytes for a in self.embed.arrays()) // self.hparams.n_vocab
        return blocks + output + embed_row

    # -- the graph --------------------------------------------------------------------------------

    def rope(self, x: mx.array, offset: int, i: int, max_seq: int) -> mx.array:
        """x: (1, heads, T, head_dim) at positions offset.. in layer i; neox rotates halves, llama GGUF adjacent
        ones."""
        hp = self.hparams
        periods = self.rope_periods_long if max_seq > hp.rope_orig_ctx else self.rope_periods
        out = mx.fast.rope(x, hp.rope_dim, traditional=not hp.rope_neox, base=None, scale=1.0, offset=offset,
                           freqs=periods[i])
        return out if self.rope_mscale is None else out * self.rope_mscale.astype(out.dtype)

    def attention(self, layer: Layer, i: int, h: mx.array, cache: MlxKVCache, queries: int) -> mx.array:
        """h: (T, n_embd) -> (queries, n_embd): the attention of the last `queries` tokens; writes every token's
        keys and values into the cache."""
        hp = self.hparams
        T = h.shape[0]
        q_dim, kv_dim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        if len(layer.qkv) == 1:
            q, k, v = mx.split(layer.qkv[0](h), [q_dim, q_dim + kv_dim], axis=-1)
        else:
            q, k, v = (w(h) for w in layer.qkv)
        if layer.q_bias is not None:
            q, k, v = q + layer.q_bias, k + layer.k_bias, v + layer.v_bias
        q = q.reshape(1, T, hp.n_heads, hp.head_dim).transpose(0, 2, 1, 3)  # (1, n_heads, T, head_dim)
        k = k.reshape(1, T, hp.n_kv_heads, hp.head_dim).transpose(0, 2, 1, 3)  # (1, n_kv_heads, T, head_dim)
        v = v.reshape(1, T, hp.n_kv_heads, hp.head_dim).transpose(0, 2, 1, 3)
        if layer.q_norm is not None:
            q = mx.fast.rms_norm(q, layer.q_norm, hp.norm_eps)
            k = mx.fast.rms_norm(k, layer.k_norm, hp.norm_eps)
        q, k = self.rope(q, cache.offset, i, cache.max_seq), self.rope(k, cache.offset, i, cache.max_seq)
        keys, values, first = cache.update(i, k, v)  # (1, n_kv_heads, positions first .. offset + T, head_dim)
        q = q[:, :, T - queries:]
        window = hp.window(i)
        if window and queries == 1:  # one query: its window is the last `window` keys
            keys, values = keys[:, :, -window:], values[:, :, -window:]
            mask = None
        elif window:  # query at position p sees keys p - window < s <= p
            pos = mx.arange(cache.offset + T - queries, cache.offset + T)[:, None]
            s = mx.arange(first, cache.offset + T)[None, :]
            mask = (s <= pos) & (s > pos - window)
        else:  # "causal" aligns the last query with the last key: right for a prefill after a cached prefix
            mask = "causal" if queries > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.attn_scale, mask=mask)
        return layer.wo(out.transpose(0, 2, 1, 3).reshape(queries, q_dim))

    def mlp(self, layer: Layer, h: mx.array) -> mx.array:
        if len(layer.gate_up) == 1:
            g, u = mx.split(layer.gate_up[0](h), 2, axis=-1)
        else:
            g, u = (w(h) for w in layer.gate_up)
        if self.hparams.act == "gelu_tanh":
            # gelu_tanh(g) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)), the tanh form rewritten
            return layer.down(g * mx.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) * u)
        return layer.down(g * mx.sigmoid(g) * u)

    def logits(self, tokens: mx.array, cache: MlxKVCache, all_logits: bool = False,
               hidden: bool = False) -> mx.array:
        """The lazy graph of forward(): tokens (T,) int32 -> (T, n_vocab) or (n_vocab,) (the output norm's
        states, n_embd wide, with `hidden`); advances cache."""
        hp = self.hparams
        T = tokens.shape[0]
        cache.reserve(T)
        x = self.embed.rows(tokens, self.dtype)  # (T, n_embd): the residual stream
        if hp.embed_scale != 1.0:
            x = x * hp.embed_scale
        for i, layer in enumerate(self.layers):
            # the last layer runs past its keys and values for the last token alone when only its logits are wanted
            queries = 1 if i == len(self.layers) - 1 and not all_logits else T
            a = self.attention(layer, i, mx.fast.rms_norm(x, layer.attn_norm, hp.norm_eps), cache, queries)
            if queries < T:
                x = x[T - queries:]
            if layer.post_attn_norm is not None:
                a = mx.fast.rms_norm(a, layer.post_attn_norm, hp.norm_eps)
            x = x + a
            f = self.mlp(layer, mx.fast.rms_norm(x, layer.ffn_norm, hp.norm_eps))
            if layer.post_ffn_norm is not None:
                f = mx.fast.rms_norm(f, layer.post_ffn_norm, hp.norm_eps)
            x = x + f
        cache.offset += T
        if not all_logits:
            x = x[-1]
        x = mx.fast.rms_norm(x, self.output_norm, hp.norm_eps)
        if hidden:
            return x.astype(mx.float32)
        logits = self.output(x).astype(mx.float32)
        if hp.logit_softcap:
            logits = hp.logit_softcap * mx.tanh(logits / hp.logit_softcap)
        return logits

    # -- the interface the engine uses -------------------------------------------------------------

    def forward(self, tokens: np.ndarray, cache: MlxKVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.hparams.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.hparams.n_vocab}), got {tokens.min()}..."
                             f"{tokens.max()}")
        logits = self.logits(mx.array(tokens), cache, all_logits, hidden)
        mx.eval(logits, cache.state())
        return np.array(logits, copy=True)

    def decode_stream(self, first_token: int, cache: MlxKVCache, sample: Callable[[np.ndarray], int],
                      n: int) -> Iterator[int]:
        """Decode up to `n` tokens after `first_token` (already sampled, not yet in the cache), pipelined:
        the step that feeds a token is queued with mx.async_eval before that token is yielded, so the
        caller's work on it (detokenize, print, stop checks) overlaps the MLX computation.

        `sample(logits)` gets float32 (n_vocab,) logits and returns the next token id. Whenever the
        generator stops (exhausted, closed, or garbage-collected), the cache holds what the plain
        forward() loop would hold: every token before the last one yielded."""
        if n <= 0:
            return
        keep = cache.offset  # what the cache should hold if we stop now: first_token is not fed yet
        step = self._queue(first_token, cache)
        try:
            for i in range(n):
                token = sample(np.array(step, copy=True))  # waits for the queued step
                keep = cache.offset  # every token before `token`
                if i + 1 < n:
                    step = self._queue(token, cache)
                yield token
        finally:  # drop a step queued for a token the caller did not come back for
            cache.trim(cache.offset - keep)

    def _queue(self, token: int, cache: MlxKVCache) -> mx.array:
        logits = self.logits(mx.array([token], dtype=mx.int32), cache)
        mx.async_eval(logits, cache.state())
        return logits
