"""Qwen 3: the llama block with RMSNorm on each query and key head and NeoX RoPE."""

from __future__ import annotations

from quant.families.family import HF_TOP_NAMES, LLAMA_HF_LAYER_NAMES, LLAMA_REQUIRED, Family
from quant.families.spec import HParams, read_common
from quant.gguf_file import GGUFFile

HF_LAYER_NAMES = LLAMA_HF_LAYER_NAMES | {"self_attn.q_norm.weight": "attn_q_norm.weight",
                                         "self_attn.k_norm.weight": "attn_k_norm.weight"}


def read_hparams(gguf: GGUFFile) -> HParams:
    # Qwen3Config.attention_bias may add Q/K/V biases; the file says so by having them
    return read_common(gguf, "qwen3", rope_neox=True, qk_norm=True, qkv_bias="blk.0.attn_q.bias" in gguf.tensors)


FAMILY = Family(
    arch="qwen3",
    read_hparams=read_hparams,
    hf_layer_names=HF_LAYER_NAMES,
    hf_top_names=HF_TOP_NAMES,
    hf_required=lambda config: LLAMA_REQUIRED + ["attn_q_norm.weight", "attn_k_norm.weight"],
)
