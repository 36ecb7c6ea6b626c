"""Gemma 3 (text): sandwich norms (each sub-block's output is normalized before it joins the residual stream),
GELU-tanh gated FFN, RMSNorm on query and key heads, embeddings scaled by sqrt(n_embd), NeoX RoPE, and
interleaved attention: five local layers (a sliding window, RoPE base 10k) then one global layer (full
attention, the file's RoPE base and scaling), as llama.cpp runs it.

GGUF stores Gemma's norm weights as plain multipliers: the HF checkpoint's norms compute x * (1 + w), and the
converter (llama.cpp's and ours) writes 1 + w.
"""

from __future__ import annotations

import math
from dataclasses import replace

from quant.errors import ModelFileError
from quant.families.family import HF_TOP_NAMES, Family
from quant.families.spec import HParams, read_common
from quant.gguf_file import GGUFFile

ARCH = "gemma3"
SWA_PATTERN = 6  # every sixth layer is global (llama.cpp's gemma3 hparams; the GGUF does not store it)
LOCAL_ROPE_BASE = 10000.0  # RoPE base of the local layers (HF's rope_local_base_freq; llama.cpp fixes it)


def read_hparams(gguf: GGUFFile) -> HParams:
    hp = read_common(gguf, ARCH)
    window = hp.windows[0] if hp.windows else 0
    if not window:
        raise ModelFileError(f"{gguf.path}: metadata key {ARCH}.attention.sliding_window is missing")
    is_global = [(i + 1) % SWA_PATTERN == 0 for i in range(hp.n_layers)]
    # query_pre_attn_scalar is not in the GGUF; llama.cpp derives the scale from the size (27B: n_embd / heads)
    scale = 1.0 / math.sqrt(hp.n_embd // hp.n_heads if hp.n_layers == 62 else hp.head_dim)
    softcap = gguf.get_float(f"{ARCH}.final_logit_softcapping", 0.0, lo=0.0)  # 0: none (Gemma 3 has none)
    return replace(
        hp, rope_neox=True, qk_norm=True, norm="sandwich", act="gelu_tanh", embed_scale=math.sqrt(hp.n_embd),
        attn_scale=scale, logit_softcap=softcap,
        windows=tuple(0 if g else window for g in is_global),
        rope_bases=tuple(hp.rope_base if g else LOCAL_ROPE_BASE for g in is_global),
        rope_scales=tuple(hp.rope_scale if g else 1.0 for g in is_global),
    )


HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_metadata(config: dict) -> dict:
    out = {"attention.sliding_window": int(config.get("sliding_window") or 512)}
    if config.get("final_logit_softcapping"):
        out["final_logit_softcapping"] = float(config["final_logit_softcapping"])
    return out


FAMILY = Family(
    arch=ARCH,
    read_hparams=read_hparams,
    hf_layer_names=HF_LAYER_NAMES,
    hf_top_names=HF_TOP_NAMES,
    hf_required=lambda config: list(HF_LAYER_NAMES.values()),
    hf_aliases=("gemma3_text",),
    norm_offset=1.0,
    hf_metadata=hf_metadata,
)
