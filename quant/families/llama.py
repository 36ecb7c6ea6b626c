"""Llama (1/2/3.x, SmolLM) and Mistral: pre-norm blocks, SwiGLU, RoPE on adjacent pairs (the converter permutes
Q/K rows for it), optional Llama 3 `rope_freqs` factors, and a sliding window on every layer where the metadata
sets one (Mistral 7B v0.1).

The window is applied as transformers applies it; llama.cpp ignores `sliding_window` for llama-architecture
files (full attention), so past the window our logits follow transformers, not llama.cpp."""

from __future__ import annotations

from quant.families.family import HF_TOP_NAMES, LLAMA_HF_LAYER_NAMES, LLAMA_REQUIRED, Family
from quant.families.spec import HParams, read_common
from quant.gguf_file import GGUFFile


def read_hparams(gguf: GGUFFile) -> HParams:
    # some llama-architecture models carry Q/K/V biases; the file says so by having them
    return read_common(gguf, "llama", qkv_bias="blk.0.attn_q.bias" in gguf.tensors)


def hf_metadata(config: dict) -> dict:
    window = config.get("sliding_window")
    return {"attention.sliding_window": int(window)} if window else {}


FAMILY = Family(
    arch="llama",
    read_hparams=read_hparams,
    hf_layer_names=LLAMA_HF_LAYER_NAMES,
    hf_top_names=HF_TOP_NAMES,
    hf_required=lambda config: LLAMA_REQUIRED,
    hf_aliases=("mistral",),
    permute_qk=True,
    hf_metadata=hf_metadata,
)
