"""Phi-3 / 3.5 / 4-mini: the llama block with one fused Q/K/V matrix (`attn_qkv`, rows q then k then v) and one
fused gate/up matrix (`ffn_up`, gate rows first), NeoX RoPE, and LongRoPE: per-frequency factors in the tensors
`rope_factors_short` / `rope_factors_long`, the long ones used when the context exceeds the original training
context (llama.cpp picks by context length the same way), and cos/sin scaled by the attention factor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from quant.families.family import HF_TOP_NAMES, Family
from quant.families.spec import HParams, positive_float, read_common
from quant.gguf_file import GGUFFile

ARCH = "phi3"


def read_hparams(gguf: GGUFFile) -> HParams:
    hp = read_common(gguf, ARCH, scaling_types=("longrope", "su"), rope_neox=True, fused_qkv=True,
                     fused_gate_up=True)
    longrope = "rope_factors_long.weight" in gguf.tensors
    orig = gguf.get_int(f"{ARCH}.rope.scaling.original_context_length", hp.n_ctx_train, lo=1, hi=1 << 24)
    return replace(hp, rope_long=longrope, rope_orig_ctx=orig,
                   rope_attn_factor=positive_float(gguf, f"{ARCH}.rope.scaling.attn_factor", 1.0))


HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def longrope(config: dict, head_dim: int) -> tuple[np.ndarray, np.ndarray, float, int] | None:
    """(long factors, short factors, attention factor, original context) of a LongRoPE config, else None."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    if params.get("rope_type", params.get("type")) not in ("longrope", "su"):
        return None
    orig = int(params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings"))
    factor = config["max_position_embeddings"] / orig
    attn = params.get("attention_factor") or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig)))
    long_f, short_f = (np.asarray(params[k], dtype=np.float32) for k in ("long_factor", "short_factor"))
    return long_f, short_f, float(attn), orig


def hf_metadata(config: dict) -> dict:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    lr = longrope(config, head_dim)
    if lr is None:
        return {}
    return {"rope.scaling.attn_factor": lr[2], "rope.scaling.original_context_length": lr[3]}


def hf_extra_tensors(config: dict) -> dict:
    lr = longrope(config, config["hidden_size"] // config["num_attention_heads"])
    return {} if lr is None else {"rope_factors_long.weight": lr[0], "rope_factors_short.weight": lr[1]}


FAMILY = Family(
    arch=ARCH,
    read_hparams=read_hparams,
    hf_layer_names=HF_LAYER_NAMES,
    hf_top_names=HF_TOP_NAMES,
    hf_required=lambda config: list(HF_LAYER_NAMES.values()),
    hf_metadata=hf_metadata,
    hf_rope_types=("longrope", "su"),
    hf_extra_tensors=hf_extra_tensors,
)
