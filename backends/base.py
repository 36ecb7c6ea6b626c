"""What every backend shares: the model blueprint (`HParams`), the weight naming, and the
interface of a loaded model and its KV cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from quant.errors import ModelFileError
from quant.gguf_file import GGUFFile, Tensor, check_arch


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a decoder-only transformer, read from GGUF metadata."""

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
    rope_base: float
    rope_dim: int
    rope_neox: bool  # qwen: rotate halves (x[i], x[i + d/2]); llama GGUF: adjacent pairs (x[2i], x[2i+1])
    rope_scale: float  # linear position scaling (1.0 = none)
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    has_rope_freqs: bool  # llama3-style per-frequency factors in tensor `rope_freqs.weight`


# Bounds on counts read from a file: far above any real model, low enough that nothing sized by them can
# exhaust the process before the tensor shapes are checked against them.
MAX_COUNT = 1 << 20  # layers, heads
MAX_DIM = 1 << 24  # embedding, feed-forward and head sizes
MAX_CTX = 1 << 24


def read_hparams(gguf: GGUFFile) -> HParams:
    """Build HParams from metadata; refuses architectures the engine cannot run, and values the kernels
    could not run safely (each one ModelFileError naming the key)."""
    arch = gguf.get_str("general.architecture")
    if arch is None:
        raise ModelFileError(f"{gguf.path}: no general.architecture in metadata")
    check_arch(arch)
    where = gguf.path

    def count(key: str, default: int | None = None, lo: int = 1, hi: int = MAX_COUNT) -> int:
        return gguf.get_int(f"{arch}.{key}", default, lo, hi)

    n_embd = count("embedding_length", hi=MAX_DIM)
    n_heads = count("attention.head_count")
    n_kv_heads = count("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        # attention maps query head h to KV head h // (n_heads // n_kv_heads): past the cache otherwise
        raise ModelFileError(f"{where}: metadata {arch}.attention.head_count = {n_heads} is not a multiple of "
                             f"{arch}.attention.head_count_kv = {n_kv_heads}")
    head_dim = count("attention.key_length", n_embd // n_heads if n_embd >= n_heads else None, hi=MAX_DIM)
    if "token_embd.weight" not in gguf.tensors:
        raise ModelFileError(f"{where}: tensor token_embd.weight is missing")
    n_vocab = count("vocab_size", gguf.tensors["token_embd.weight"].shape[0], hi=1 << 31)
    rope_dim = count("rope.dimension_count", head_dim, hi=MAX_DIM)
    if rope_dim > head_dim or rope_dim % 2:
        # RoPE rotates pairs within each head: an odd count or one past the head would write past it
        raise ModelFileError(f"{where}: metadata {arch}.rope.dimension_count = {rope_dim} must be even and at "
                             f"most the head size {head_dim}")
    scaling = gguf.get_str(f"{arch}.rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = gguf.get_float(f"{arch}.rope.scaling.factor", 1.0, lo=1e-6, hi=1e6)
    hp = HParams(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layers=count("block_count", hi=4096),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        n_ff=count("feed_forward_length", hi=MAX_DIM),
        n_ctx_train=count("context_length", 2048, hi=MAX_CTX),
        norm_eps=gguf.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, lo=1e-12, hi=1.0),
        rope_base=gguf.get_float(f"{arch}.rope.freq_base", 10000.0, lo=1.0, hi=1e12),
        rope_dim=rope_dim,
        rope_neox=arch in ("qwen2", "qwen3"),
        rope_scale=rope_scale,
        tied_embeddings="output.weight" not in gguf.tensors,
        qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        has_rope_freqs="rope_freqs.weight" in gguf.tensors,
    )
    check_tensors(gguf, hp)
    return hp


def layer_tensor_names(hp: HParams) -> list[str]:
    names = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
             "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if hp.qkv_bias:
        names += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    if hp.qk_norm:
        names += ["attn_q_norm.weight", "attn_k_norm.weight"]
    return names


def check_tensors(gguf: GGUFFile, hp: HParams) -> None:
    """Every tensor the forward pass needs is present with the shape the metadata implies."""
    q_dim, kv_dim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    expected = {
        "token_embd.weight": (hp.n_vocab, hp.n_embd),
        "output_norm.weight": (hp.n_embd,),
    }
    if not hp.tied_embeddings:
        expected["output.weight"] = (hp.n_vocab, hp.n_embd)
    shapes = {
        "attn_norm.weight": (hp.n_embd,), "ffn_norm.weight": (hp.n_embd,),
        "attn_q.weight": (q_dim, hp.n_embd), "attn_k.weight": (kv_dim, hp.n_embd),
        "attn_v.weight": (kv_dim, hp.n_embd), "attn_output.weight": (hp.n_embd, q_dim),
        "ffn_gate.weight": (hp.n_ff, hp.n_embd), "ffn_up.weight": (hp.n_ff, hp.n_embd),
        "ffn_down.weight": (hp.n_embd, hp.n_ff),
        "attn_q.bias": (q_dim,), "attn_k.bias": (kv_dim,), "attn_v.bias": (kv_dim,),
        "attn_q_norm.weight": (hp.head_dim,), "attn_k_norm.weight": (hp.head_dim,),
    }
    # checked layer by layer as the names are made: a block_count the file does not back stops at the first
    # missing tensor instead of first listing billions of names
    layers = ((f"blk.{i}.{name}", shapes[name]) for i in range(hp.n_layers) for name in layer_tensor_names(hp))
    for name, shape in itertools.chain(expected.items(), layers):
        t = gguf.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{gguf.path}: tensor {name} is missing")
        if t.shape != shape:
            raise ModelFileError(f"{gguf.path}: tensor {name} has shape {t.shape}, expected {shape}")
    freqs = gguf.tensors.get("rope_freqs.weight")
    if freqs is not None and (freqs.shape != (hp.rope_dim // 2,) or freqs.data.dtype.kind != "f"):
        raise ModelFileError(f"{gguf.path}: tensor rope_freqs.weight has shape {freqs.shape} and type "
                             f"{freqs.qtype.name}, expected {(hp.rope_dim // 2,)} and a float type")


def count_params(gguf: GGUFFile) -> int:
    return sum(t.n_elements for t in gguf.tensors.values())


def rope_inv_freq(hp: HParams, gguf: GGUFFile) -> np.ndarray:
    """Inverse frequencies (rope_dim/2,) float32, with llama3 factors and linear scaling folded in."""
    inv = 1.0 / hp.rope_base ** (np.arange(0, hp.rope_dim, 2, dtype=np.float64) / hp.rope_dim)
    if hp.has_rope_freqs:
        inv = inv / np.asarray(gguf.tensors["rope_freqs.weight"].data, dtype=np.float64)
    return (inv / hp.rope_scale).astype(np.float32)


def weight_bytes_per_token(gguf: GGUFFile, hp: HParams) -> int:
    """Bytes of weights a decoded token reads: every tensor, except that the embedding table is read one
    row per token unless it is also the output matrix."""
    total = sum(t.n_bytes for t in gguf.tensors.values())
    return total if hp.tied_embeddings else total - gguf.tensors["token_embd.weight"].n_bytes


def output_tensor(gguf: GGUFFile, hp: HParams) -> Tensor:
    return gguf.tensors["token_embd.weight" if hp.tied_embeddings else "output.weight"]


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

    def new_cache(self, max_seq: int) -> KVCache:
        """A KV cache for up to `max_seq` positions."""

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
