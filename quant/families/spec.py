"""What a model family declares: the blueprint (`HParams`: sizes plus block options as data), its weights by
slot (GGUF name and shape), and the checked reading of both from a GGUF file.

A slot is the backends' name for a weight ("wq", "post_ffn_norm", ...). Backends ask for weights by slot and
never spell `blk.{i}.…`; the family module says which slots it has and under which GGUF names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quant.errors import ModelFileError, UnsupportedError
from quant.gguf_file import GGUFFile, Tensor, safe_text

MAX_LAYERS = 4096  # a bound on block_count before anything is sized by it
MAX_DIM = 1 << 20  # embedding, feed-forward and head sizes
MAX_HEADS = 1 << 14
MAX_CTX = 1 << 24
POOLING_TYPES = ("", "mean", "cls", "last", "rank")  # llama.cpp's enum llama_pooling_type, from 0 (none)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters and block options of a decoder-only transformer, read from GGUF metadata."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float  # of the global (full-attention) layers
    rope_dim: int
    rope_neox: bool  # rotate halves (x[i], x[i + d/2]); else adjacent pairs (x[2i], x[2i+1]) (llama GGUF)
    rope_scale: float  # linear position scaling of the global layers (1.0 = none)
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    has_rope_freqs: bool  # llama3-style per-frequency factors in the `rope_freqs` slot
    # block options (defaults: the llama block)
    norm: str = "pre"  # "pre": x += f(norm(x)); "sandwich": x += norm2(f(norm1(x))) (Gemma 2/3)
    act: str = "silu"  # gated FFN activation: "silu" or "gelu_tanh"
    fused_qkv: bool = False  # one `wqkv` matrix (Phi-3)
    fused_gate_up: bool = False  # one `gate_up` matrix, gate rows first (Phi-3)
    embed_scale: float = 1.0  # the embedding rows are multiplied by this (Gemma: sqrt(n_embd))
    attn_scale: float = 0.0  # scores are q.k * attn_scale; 0 means 1/sqrt(head_dim)
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when > 0
    # per-layer values, one entry per layer (the numba stack indexes them as arrays)
    windows: tuple[int, ...] = ()  # sliding-window length of each layer, 0 = full attention; () = all full
    rope_bases: tuple[float, ...] = ()  # RoPE base of each layer; () = rope_base everywhere
    rope_scales: tuple[float, ...] = ()  # linear RoPE scaling of each layer; () = rope_scale everywhere
    # LongRoPE (Phi-3): factors `rope_short` / `rope_long` (the latter for contexts above rope_orig_ctx), and cos
    # and sin multiplied by rope_attn_factor
    rope_long: bool = False
    rope_orig_ctx: int = 0
    rope_attn_factor: float = 1.0
    # how the file says its token states make one embedding (llama.cpp's pooling type): "mean", "cls", "last",
    # "rank" (a reranker's head, which this engine does not run); "" where it says none
    pooling: str = ""

    @property
    def scale(self) -> float:
        """The attention's score scale."""
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(base, linear scale) of the layer's RoPE."""
        base = self.rope_bases[layer] if self.rope_bases else self.rope_base
        return base, self.rope_scales[layer] if self.rope_scales else self.rope_scale


@dataclass(frozen=True)
class Slot:
    """A weight the forward pass reads: its GGUF name (per-layer names without the `blk.{i}.` prefix) and shape."""

    gguf: str
    shape: tuple[int, ...]


# The GGUF names llama.cpp gives each slot (gguf-py's TENSOR_NAMES); a family picks the slots it has.
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wqkv": "attn_qkv.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "wo": "attn_output.weight",
    "post_attn_norm": "post_attention_norm.weight", "ffn_norm": "ffn_norm.weight", "gate": "ffn_gate.weight",
    "up": "ffn_up.weight", "gate_up": "ffn_up.weight", "down": "ffn_down.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
}
GLOBAL_NAMES = {"embd": "token_embd.weight", "out_norm": "output_norm.weight", "output": "output.weight",
                "rope_freqs": "rope_freqs.weight", "rope_long": "rope_factors_long.weight",
                "rope_short": "rope_factors_short.weight"}


def layer_slot_ids(hp: HParams) -> list[str]:
    """The per-layer slots a block with these options reads."""
    ids = ["attn_norm"]
    ids += ["wqkv"] if hp.fused_qkv else ["wq", "wk", "wv"]
    ids += ["bq", "bk", "bv"] if hp.qkv_bias else []
    ids += ["q_norm", "k_norm"] if hp.qk_norm else []
    ids += ["wo", "ffn_norm"]
    ids += ["gate_up"] if hp.fused_gate_up else ["gate", "up"]
    ids += ["down"]
    ids += ["post_attn_norm", "post_ffn_norm"] if hp.norm == "sandwich" else []
    return ids


def layer_slots(hp: HParams) -> dict[str, Slot]:
    """slot -> (GGUF name without the block prefix, shape) for one layer."""
    E, F, D = hp.n_embd, hp.n_ff, hp.head_dim
    q, kv = hp.n_heads * D, hp.n_kv_heads * D
    shapes = {
        "attn_norm": (E,), "wq": (q, E), "wk": (kv, E), "wv": (kv, E), "wqkv": (q + 2 * kv, E),
        "bq": (q,), "bk": (kv,), "bv": (kv,), "q_norm": (D,), "k_norm": (D,), "wo": (E, q),
        "post_attn_norm": (E,), "ffn_norm": (E,), "gate": (F, E), "up": (F, E), "gate_up": (2 * F, E),
        "down": (E, F), "post_ffn_norm": (E,),
    }
    return {s: Slot(LAYER_NAMES[s], shapes[s]) for s in layer_slot_ids(hp)}


def global_slots(hp: HParams) -> dict[str, Slot]:
    out = {"embd": Slot(GLOBAL_NAMES["embd"], (hp.n_vocab, hp.n_embd)),
           "out_norm": Slot(GLOBAL_NAMES["out_norm"], (hp.n_embd,))}
    if not hp.tied_embeddings:
        out["output"] = Slot(GLOBAL_NAMES["output"], (hp.n_vocab, hp.n_embd))
    if hp.has_rope_freqs:
        out["rope_freqs"] = Slot(GLOBAL_NAMES["rope_freqs"], (hp.rope_dim // 2,))
    if hp.rope_long:
        out["rope_long"] = Slot(GLOBAL_NAMES["rope_long"], (hp.rope_dim // 2,))
        out["rope_short"] = Slot(GLOBAL_NAMES["rope_short"], (hp.rope_dim // 2,))
    return out


def layer_weights(gguf: GGUFFile, hp: HParams, layer: int) -> dict[str, Tensor]:
    """The tensors of one layer by slot (checked by check_tensors at load)."""
    return {s: gguf.tensors[f"blk.{layer}.{slot.gguf}"] for s, slot in layer_slots(hp).items()}


def global_weights(gguf: GGUFFile, hp: HParams) -> dict[str, Tensor]:
    """The tensors outside the blocks by slot; `output` is the embedding when the two are tied."""
    out = {s: gguf.tensors[slot.gguf] for s, slot in global_slots(hp).items()}
    out.setdefault("output", out["embd"])
    return out


def check_tensors(gguf: GGUFFile, hp: HParams) -> None:
    """Every tensor the forward pass reads is present with the shape the metadata implies."""
    expected = {slot.gguf: slot.shape for slot in global_slots(hp).values()}
    per_layer = layer_slots(hp)
    for i in range(hp.n_layers):  # n_layers was range-checked when read
        for slot in per_layer.values():
            expected[f"blk.{i}.{slot.gguf}"] = slot.shape
    for name, shape in expected.items():
        t = gguf.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{gguf.path}: tensor {name} is missing")
        if t.shape != shape:
            raise ModelFileError(f"{gguf.path}: tensor {name} has shape {t.shape}, expected {shape}")
    for s in ("rope_freqs", "rope_long", "rope_short"):  # read as plain floats by every backend
        t = gguf.tensors.get(GLOBAL_NAMES[s])
        if t is not None and t.data.dtype.kind != "f":
            raise ModelFileError(f"{gguf.path}: tensor {t.name} has type {t.qtype.name}, expected a float type")


# ---- reading the common hyper-parameters ---------------------------------------------------------------------

def positive_float(gguf: GGUFFile, key: str, default: float) -> float:
    value = gguf.get_float(key, default)
    if value <= 0:
        raise gguf._bad(key, value, "a finite number above 0")
    return value


def read_common(gguf: GGUFFile, arch: str, scaling_types: tuple[str, ...] = (), **options) -> HParams:
    """The hyper-parameters every family reads the same way, each checked before anything is sized by it;
    `options` set the family's block options (and may override a field); `scaling_types`, RoPE scaling types
    the family handles itself."""
    path = gguf.path

    def key(k: str) -> str:
        return f"{arch}.{k}"

    n_layers = gguf.get_int(key("block_count"), lo=1, hi=MAX_LAYERS)
    n_embd = gguf.get_int(key("embedding_length"), lo=1, hi=MAX_DIM)
    n_ff = gguf.get_int(key("feed_forward_length"), lo=1, hi=MAX_DIM)
    n_ctx = gguf.get_int(key("context_length"), 2048, lo=1, hi=MAX_CTX)
    n_heads = gguf.get_int(key("attention.head_count"), lo=1, hi=MAX_HEADS)
    n_kv = gguf.get_int(key("attention.head_count_kv"), n_heads, lo=1, hi=MAX_HEADS)
    if n_heads % n_kv:
        raise ModelFileError(f"{path}: metadata {key('attention.head_count')} = {n_heads} is not a multiple of "
                             f"{key('attention.head_count_kv')} = {n_kv}")
    default_hd = n_embd // n_heads if n_embd >= n_heads else None
    head_dim = gguf.get_int(key("attention.key_length"), default_hd, lo=2, hi=MAX_DIM)
    if head_dim % 2:
        raise ModelFileError(f"{path}: head size {head_dim} ({key('attention.key_length')}) is odd; RoPE rotates "
                             "pairs")
    value_dim = gguf.get_int(key("attention.value_length"), head_dim, lo=1, hi=MAX_DIM)
    if value_dim != head_dim:
        raise ModelFileError(f"{path}: metadata {key('attention.value_length')} = {value_dim} differs from the "
                             f"key length {head_dim}, which this engine does not run")
    rope_dim = gguf.get_int(key("rope.dimension_count"), head_dim, lo=2, hi=MAX_DIM)
    if rope_dim > head_dim or rope_dim % 2:
        # RoPE rotates pairs within each head: an odd count, or one past the head, would write past it
        raise ModelFileError(f"{path}: metadata {key('rope.dimension_count')} = {rope_dim} must be even and at "
                             f"most the head size {head_dim}")
    eps = positive_float(gguf, key("attention.layer_norm_rms_epsilon"), 1e-6)
    rope_base = positive_float(gguf, key("rope.freq_base"), 10000.0)
    scaling = gguf.get_str(key("rope.scaling.type"), "none")
    rope_scale = 1.0
    if scaling == "linear":  # GGUF stores the factor; positions are divided by it
        rope_scale = positive_float(gguf, key("rope.scaling.factor"), 1.0)
    elif scaling != "none" and scaling not in scaling_types:
        raise UnsupportedError(f"{path}: RoPE scaling '{safe_text(scaling)}' is not supported (none, linear)")

    embd = gguf.tensors.get(GLOBAL_NAMES["embd"])
    if embd is None:
        raise ModelFileError(f"{path}: tensor {GLOBAL_NAMES['embd']} is missing")
    if len(embd.shape) != 2:
        raise ModelFileError(f"{path}: tensor {GLOBAL_NAMES['embd']} has shape {embd.shape}, expected 2 dims")
    n_vocab = gguf.get_int(key("vocab_size"), embd.shape[0], lo=1, hi=embd.shape[0])
    if n_vocab != embd.shape[0]:
        raise ModelFileError(f"{path}: metadata {key('vocab_size')} = {n_vocab} differs from the "
                             f"{embd.shape[0]} rows of {GLOBAL_NAMES['embd']}")
    window = gguf.get_int(key("attention.sliding_window"), 0, lo=1, hi=MAX_CTX)  # 0: absent, full attention
    pooling = POOLING_TYPES[gguf.get_int(key("pooling_type"), 0, lo=0, hi=len(POOLING_TYPES) - 1)]
    fields = dict(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, n_ff=n_ff, n_ctx_train=n_ctx, norm_eps=eps, rope_base=rope_base, rope_dim=rope_dim,
        rope_neox=False, rope_scale=rope_scale, tied_embeddings=GLOBAL_NAMES["output"] not in gguf.tensors,
        qkv_bias=False, qk_norm=False, has_rope_freqs=GLOBAL_NAMES["rope_freqs"] in gguf.tensors,
        windows=(window,) * n_layers if window else (), pooling=pooling,
    )
    fields.update(options)
    return HParams(**fields)


def rope_inv_freq(hp: HParams, gguf: GGUFFile, layer: int = -1, n_ctx: int = 0) -> np.ndarray:
    """Inverse frequencies (rope_dim/2,) float32 of a layer (-1: the global layers) for a context of n_ctx
    positions, with llama3 or LongRoPE factors and linear scaling folded in."""
    base, scale = (hp.rope_base, hp.rope_scale) if layer < 0 else hp.layer_rope(layer)
    inv = 1.0 / base ** (np.arange(0, hp.rope_dim, 2, dtype=np.float64) / hp.rope_dim)
    if hp.has_rope_freqs:
        inv = inv / np.asarray(gguf.tensors[GLOBAL_NAMES["rope_freqs"]].data, dtype=np.float64)
    if hp.rope_long:
        which = "rope_long" if n_ctx > hp.rope_orig_ctx else "rope_short"
        inv = inv / np.asarray(gguf.tensors[GLOBAL_NAMES[which]].data, dtype=np.float64)
    return (inv / scale).astype(np.float32)


def rope_groups(hp: HParams, gguf: GGUFFile, n_ctx: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(inv_freq (G, rope_dim/2) float32, layer_group (n_layers,) int64): the distinct RoPE frequency sets and
    which one each layer uses (Gemma 3: local and global layers differ)."""
    keys = [hp.layer_rope(i) for i in range(hp.n_layers)]
    distinct = sorted(set(keys), key=keys.index)
    inv = np.stack([rope_inv_freq(hp, gguf, keys.index(k), n_ctx) for k in distinct])
    return inv, np.array([distinct.index(k) for k in keys], dtype=np.int64)
