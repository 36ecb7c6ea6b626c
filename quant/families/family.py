"""The record a family module registers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quant.families.spec import HParams
from quant.gguf_file import GGUFFile


@dataclass(frozen=True)
class Family:
    """An architecture: how to read its blueprint from GGUF, and how to convert it from Hugging Face."""

    arch: str  # GGUF general.architecture
    read_hparams: Callable[[GGUFFile], HParams]
    # Hugging Face conversion
    hf_layer_names: dict[str, str]  # name under model.layers.{i}. -> GGUF name under blk.{i}.
    hf_top_names: dict[str, str]  # whole HF name -> GGUF name
    hf_required: Callable[[dict], list[str]]  # config.json -> per-layer GGUF names a complete checkpoint has
    hf_aliases: tuple[str, ...] = ()  # other model_type values converted as this family (mistral -> llama)
    permute_qk: bool = False  # Q/K rows reordered from HF's rotate-half to GGUF llama's adjacent pairs
    norm_offset: float = 0.0  # added to every norm weight (Gemma's HF norms multiply by 1 + w)
    # config.json -> extra metadata (key suffix after "{arch}.", value) beyond the common keys
    hf_metadata: Callable[[dict], dict[str, Any]] = field(default=lambda config: {})
    hf_rope_types: tuple[str, ...] = ()  # RoPE scaling types of config.json the family converts itself
    # config.json -> extra float32 tensors by GGUF name (Phi-3's LongRoPE factors)
    hf_extra_tensors: Callable[[dict], dict[str, Any]] = field(default=lambda config: {})


LLAMA_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LLAMA_REQUIRED = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
