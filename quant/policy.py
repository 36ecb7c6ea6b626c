"""llama.cpp's per-tensor type policy for the K-quant mixes (llama-quant.cpp, llama_tensor_get_type).

A mix is a file type (Q4_K_M, ...) whose tensors get different types: the output matrix Q6_K, attn_v and
ffn_down more bits in the `use_more_bits` layers, and so on. The rules below follow llama.cpp's for the
mixes llm writes (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K), including its walk order: the attn_v and
ffn_down counters advance in llama.cpp's loader order (by layer, then by name), and only for tensors the
mix rules see (not for --pure or a --tensor-type match). Hyper-parameters come from the tensor shapes: the
layer count from the `blk.N.` names, the GQA ratio from the attn_q / attn_k row counts. Not modelled:
llama.cpp's 70B-only attn_v bump (it keys on the model's size class), its Falcon rules, and the expert
rules (llm reads neither Falcon nor a mixture-of-experts model).

Row lengths that do not split into 256-weight super-blocks fall back as llama.cpp does: Q2_K and Q3_K to
Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 when even 32 does not divide the row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import LlamaFileType

from quant.formats import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
FT = LlamaFileType


@dataclass(frozen=True)
class Mix:
    """A K-quant file type: its name, its GGUF file type and the type most tensors get."""

    name: str
    ftype: LlamaFileType
    default: GGMLQuantizationType


MIXES = {m.name: m for m in (
    Mix("q2_k", FT.MOSTLY_Q2_K, Q.Q2_K),
    Mix("q3_k_s", FT.MOSTLY_Q3_K_S, Q.Q3_K), Mix("q3_k_m", FT.MOSTLY_Q3_K_M, Q.Q3_K),
    Mix("q3_k_l", FT.MOSTLY_Q3_K_L, Q.Q3_K),
    Mix("q4_k_s", FT.MOSTLY_Q4_K_S, Q.Q4_K), Mix("q4_k_m", FT.MOSTLY_Q4_K_M, Q.Q4_K),
    Mix("q5_k_s", FT.MOSTLY_Q5_K_S, Q.Q5_K), Mix("q5_k_m", FT.MOSTLY_Q5_K_M, Q.Q5_K),
    Mix("q6_k", FT.MOSTLY_Q6_K, Q.Q6_K),
)}
# llama-quantize's own aliases: a bare Q3_K / Q4_K / Q5_K is the _M mix
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}

_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_FLOATS = (Q.F32, Q.F16, Q.BF16)


def find_mix(name: str) -> Mix | None:
    key = name.strip().lower()
    return MIXES.get(ALIASES.get(key, key))


@dataclass(frozen=True)
class MixOptions:
    """The user's overrides, as llama-quantize's params."""

    embedding_type: GGMLQuantizationType | None = None
    output_type: GGMLQuantizationType | None = None
    tensor_types: tuple[tuple[str, GGMLQuantizationType], ...] = ()
    pure: bool = False


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp quantizes 2-D (and 3-D) weights, not norms nor an expert router."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(qtype: GGMLQuantizationType, n_cols: int) -> tuple[GGMLQuantizationType, str]:
    block = GGML_QUANT_SIZES[qtype][0]
    if n_cols % block == 0:
        return qtype, ""
    to = _FALLBACK.get(qtype, qtype)
    if n_cols % GGML_QUANT_SIZES[to][0]:
        to = Q.F16
    return to, f"rows of {n_cols} do not split into {block}-weight blocks: {qtype.name} -> {to.name}, as llama.cpp"


def plan_mix(tensors: Sequence[tuple[str, tuple[int, ...], GGMLQuantizationType]], mix: Mix,
             opts: MixOptions) -> list[tuple[GGMLQuantizationType, str]]:
    """(name, shape (rows, cols) as llm stores it, source type) per tensor, in file order ->
    (type, note) per tensor, as llama-quantize chooses them for `mix`."""
    names = [t[0] for t in tensors]
    shapes = {t[0]: t[1] for t in tensors}
    layers = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    n_layer = max(layers) + 1 if layers else 0
    q_rows = next((s[0] for n, s in shapes.items() if n.endswith("attn_q.weight")), 0)
    k_rows = next((s[0] for n, s in shapes.items() if n.endswith("attn_k.weight")), 0)
    n_gqa = q_rows // k_rows if k_rows else 1
    tied = "output.weight" not in shapes
    n_attn_v = sum(_category(n) == "attn_v" for n in names)
    counters = {"attn_v": 0, "ffn_down": 0}
    ft = mix.ftype
    patterns = [(re.compile(p), t) for p, t in opts.tensor_types]

    def mix_rule(name: str, cat: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
        n_cols = shapes[name][-1]
        if cat == "output" or (tied and cat == "token_embd"):
            if opts.output_type is not None:
                return opts.output_type
            if n_cols % GGML_QUANT_SIZES[qtype][0]:
                return Q.Q8_0
            return Q.Q6_K if qtype != Q.Q8_0 else qtype
        if cat == "token_embd":
            return qtype
        if cat == "attn_v":
            i = counters["attn_v"]
            if ft == FT.MOSTLY_Q2_K:
                qtype = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
            elif ft == FT.MOSTLY_Q3_K_M:
                qtype = Q.Q5_K if i < 2 else Q.Q4_K
            elif ft == FT.MOSTLY_Q3_K_L:
                qtype = Q.Q5_K
            elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, n_attn_v):
                qtype = Q.Q6_K
            elif ft == FT.MOSTLY_Q4_K_S and i < 4:
                qtype = Q.Q5_K
            counters["attn_v"] += 1
        elif cat == "ffn_down":
            i, n = counters["ffn_down"], n_layer
            if ft == FT.MOSTLY_Q2_K:
                qtype = Q.Q3_K
            elif ft == FT.MOSTLY_Q3_K_M:
                qtype = Q.Q5_K if i < n // 16 else Q.Q4_K  # Q3_K only for Falcon
            elif ft == FT.MOSTLY_Q3_K_L:
                qtype = Q.Q5_K
            elif ft == FT.MOSTLY_Q4_K_M:
                if _use_more_bits(i, n):
                    qtype = Q.Q6_K
            elif ft == FT.MOSTLY_Q5_K_M and _use_more_bits(i, n):
                qtype = Q.Q6_K
            elif ft == FT.MOSTLY_Q4_K_S and i < n // 8:
                qtype = Q.Q5_K
            counters["ffn_down"] += 1
        elif cat == "attn_output":
            if ft == FT.MOSTLY_Q2_K:
                qtype = Q.Q3_K
            elif ft == FT.MOSTLY_Q3_K_M:
                qtype = Q.Q4_K
            elif ft == FT.MOSTLY_Q3_K_L:
                qtype = Q.Q5_K
        return qtype

    chosen = {}
    # llama.cpp walks the tensors in its loader's map order: by layer (other tensors first), then by name
    for name, shape, src_type in sorted(tensors, key=lambda t: (_layer(t[0]), t[0])):
        cat = _category(name)
        if not _quantizable(name, shape):
            # norms and biases F32, as llama.cpp's converter writes them (the numba backend reads only F32 there)
            chosen[name] = (src_type if src_type in _FLOATS and len(shape) > 1 else Q.F32, "")
        elif opts.embedding_type is not None and cat == "token_embd":
            chosen[name] = (opts.embedding_type, "")
        elif opts.output_type is not None and cat == "output":
            chosen[name] = (opts.output_type, "")
        else:
            qtype = mix.default
            manual = next((t for p, t in patterns if p.search(name)), None)
            if manual is not None:
                qtype = manual
            elif not opts.pure:
                qtype = mix_rule(name, cat, qtype)
            chosen[name] = fallback(qtype, shape[-1])
    return [chosen[name] for name, _, _ in tensors]
