"""Qwen 2 / 2.5: the llama block with Q/K/V biases and NeoX RoPE (rotate halves)."""

from __future__ import annotations

from quant.families.family import HF_TOP_NAMES, LLAMA_HF_LAYER_NAMES, LLAMA_REQUIRED, Family
from quant.families.spec import HParams, read_common
from quant.gguf_file import GGUFFile


def read_hparams(gguf: GGUFFile) -> HParams:
    return read_common(gguf, "qwen2", rope_neox=True, qkv_bias=True)


FAMILY = Family(
    arch="qwen2",
    read_hparams=read_hparams,
    hf_layer_names=LLAMA_HF_LAYER_NAMES,
    hf_top_names=HF_TOP_NAMES,
    hf_required=lambda config: LLAMA_REQUIRED + ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
)
