"""GGUF files for the numba backend's tests and benchmarks (kept out of git, in .test-models/):

- `requantize(src, dst, qtype)`: a copy of a GGUF model whose matrices are re-quantized to `qtype` from their
  dequantized weights (gguf-py's quantizers, bit-exact with ggml). The token embedding keeps its type.
- `write_random_model(dst, ...)`: a model of any shape with random blocks, for bandwidth benchmarks and for
  architecture features SmolLM2 lacks (NeoX RoPE, Q/K/V biases, Q/K norms); it can borrow the tokenizer of
  another GGUF so that llama.cpp loads it too. `mix="q4_k_m"` (or "q5_k_m") gives each tensor the type
  llama.cpp's Q4_K_M / Q5_K_M files give it (`mixed_type`), written directly quantized.
- `widen(src, dst, ...)`: a llama model embedded exactly in larger widths (zero-padded hidden size, heads and
  feed-forward): the same logits at the cost per layer of a larger model; `widths_of(gguf)` reads a model's widths.
  SmolLM2 widened to the 1B shape's widths is a 1B-cost model that copies text, for prompt lookup's benchmark.

    python benchmarks/make_bench_models.py SRC.gguf q4_0 DST.gguf
    python benchmarks/make_bench_models.py widen SRC.gguf LIKE.gguf TYPE DST.gguf  # SRC in LIKE's widths; TYPE
                                                                                  # f32, q4_0, ... or "same"
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.formats import dequantize  # noqa: E402

Q = GGMLQuantizationType


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip=lambda key: False) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or skip(field.name):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


PADDED = {"tokenizer.ggml.tokens": lambda i: f"<|pad_{i}|>", "tokenizer.ggml.token_type": lambda i: 4,
          "tokenizer.ggml.scores": lambda i: 0.0}  # per-token arrays, and what a padding token i has there


def _copy_tokenizer(reader: GGUFReader, writer: GGUFWriter, n_vocab: int) -> None:
    """The tokenizer of another model, its vocabulary padded with user-defined tokens to n_vocab entries (llama.cpp
    wants as many tokens as the embedding has rows; a smaller model's tokenizer serves a larger vocabulary)."""
    _copy_metadata(reader, writer, skip=lambda key: not key.startswith("tokenizer.") or key in PADDED)
    for key, pad in PADDED.items():
        if key in reader.fields:
            field = reader.fields[key]
            values = list(field.contents())
            values += [pad(i) for i in range(len(values), n_vocab)]
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=GGUFValueType(field.types[-1]))


def _finish(writer: GGUFWriter, tmp: Path, dst: Path) -> Path:
    """Write the file the writer holds to tmp, then move it to dst (never a half-written dst)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def requantize(src: Path, dst: Path, qtype: GGMLQuantizationType) -> Path:
    """Copy of `src` with every 2-D tensor except token_embd re-quantized to `qtype`."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = GGUFWriter(tmp, arch)
    _copy_metadata(reader, writer, skip=lambda key: key == "general.file_type")
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        data = np.asarray(t.data)
        if len(shape) == 2 and t.name != "token_embd.weight":
            w = dequantize(data, t.tensor_type).reshape(shape)
            writer.add_tensor(t.name, gguf_quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    return _finish(writer, tmp, dst)


def _random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks (rows, row_bytes) whose weights have a standard deviation of about 1/sqrt(cols)."""
    if qtype in (Q.F32, Q.F16):
        w = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        return w.astype(np.float32 if qtype == Q.F32 else np.float16)
    # random bytes, then the float16 scales set so that code * scale has the wanted spread: (byte offset of
    # the scale, std of what it multiplies) per format; K-quants: d (and dmin) over 6-bit or int8 sub-scales
    scales = {Q.Q4_0: [(0, 4.6)], Q.Q8_0: [(0, 74.0)], Q.Q4_K: [(0, 4.6 * 36), (2, 36 * 2)],
              Q.Q5_K: [(0, 9.2 * 36), (2, 36 * 2)], Q.Q6_K: [(208, 18.5 * 74)]}
    if qtype not in scales:
        w = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        return gguf_quants.quantize(w, qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = cols // bs
    raw = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    for at, q_std in scales[qtype]:
        d = np.full((rows, nb, 1), 1.0 / np.sqrt(cols) / q_std, dtype=np.float16)
        raw[:, :, at:at + 2] = d.view(np.uint8)
    return raw.reshape(rows, nb * ts)


MIXES = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K}  # the base type of each mix


def mixed_type(mix: str, name: str, layer: int, n_layers: int) -> GGMLQuantizationType:
    """The type llama.cpp's `mix` gives tensor `name` of block `layer`: Q6_K for the output matrix (the token
    embedding when it is tied), and for attn_v and ffn_down in the first and last eighth of the blocks and every
    third block between; the base type elsewhere."""
    if name == "output.weight":
        return Q.Q6_K
    more_bits = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    if name in ("attn_v.weight", "ffn_down.weight") and more_bits:
        return Q.Q6_K
    return MIXES[mix]


def write_random_model(dst: Path, *, arch: str = "llama", n_embd: int, n_layers: int, n_heads: int,
                       n_kv_heads: int, n_ff: int, n_vocab: int, qtype: GGMLQuantizationType = Q.Q4_0,
                       mix: str | None = None, qkv_bias: bool = False, qk_norm: bool = False, tied: bool = True,
                       tokenizer_from: Path | None = None, seed: int = 0) -> Path:
    """A model of the given shape with random weights (norm weights around 1); every matrix in `qtype`, or per
    tensor as the `mix` ("q4_k_m", "q5_k_m") has it."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_heads
    tmp = dst.with_name(dst.name + ".tmp")
    writer = GGUFWriter(tmp, arch)
    writer.add_name(f"random-{arch}-{n_embd}x{n_layers}")
    writer.add_block_count(n_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    if tokenizer_from is not None:
        _copy_tokenizer(GGUFReader(tokenizer_from), writer, n_vocab)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def add_matrix(name, rows, cols, layer=0, role=None):
        """role: the name whose type the mix gives it (a tied token embedding is the output matrix)."""
        t = mixed_type(mix, role or name.removeprefix(f"blk.{layer}."), layer, n_layers) if mix else qtype
        writer.add_tensor(name, _random_blocks(t, rows, cols, rng), raw_dtype=t)

    add_matrix("token_embd.weight", n_vocab, n_embd, role="output.weight" if tied else None)
    writer.add_tensor("output_norm.weight", norm(n_embd))
    if not tied:
        add_matrix("output.weight", n_vocab, n_embd)
    nq, nkv = n_heads * head_dim, n_kv_heads * head_dim
    for i in range(n_layers):
        p = f"blk.{i}."
        mats = {"attn_q.weight": (nq, n_embd), "attn_k.weight": (nkv, n_embd), "attn_v.weight": (nkv, n_embd),
                "attn_output.weight": (n_embd, nq), "ffn_gate.weight": (n_ff, n_embd),
                "ffn_up.weight": (n_ff, n_embd), "ffn_down.weight": (n_embd, n_ff)}
        writer.add_tensor(p + "attn_norm.weight", norm(n_embd))
        writer.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        for name, (rows, cols) in mats.items():
            add_matrix(p + name, rows, cols, i)
        if qkv_bias:
            for name, n in (("attn_q.bias", nq), ("attn_k.bias", nkv), ("attn_v.bias", nkv)):
                writer.add_tensor(p + name, (0.1 * rng.standard_normal(n)).astype(np.float32))
        if qk_norm:
            writer.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            writer.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
    return _finish(writer, tmp, dst)


WIDTH_KEYS = {"n_embd": "embedding_length", "n_heads": "attention.head_count",
              "n_kv_heads": "attention.head_count_kv", "n_ff": "feed_forward_length"}


def widths_of(path: Path) -> dict[str, int]:
    """{'n_embd', 'n_heads', 'n_kv_heads', 'n_ff'} of a GGUF model, from its metadata."""
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    return {name: int(reader.fields[f"{arch}.{key}"].contents()) for name, key in WIDTH_KEYS.items()}


# where each tensor's rows and columns go in the wider model: "embd" (hidden size), "q" (query heads), "kv" (KV
# heads), "ff" (feed-forward), None (kept: the vocabulary); numpy order (out, in)
WIDEN_AXES = {"token_embd.weight": (None, "embd"), "output.weight": (None, "embd"),
              "output_norm.weight": ("embd",), "attn_norm.weight": ("embd",), "ffn_norm.weight": ("embd",),
              "attn_q.weight": ("q", "embd"), "attn_k.weight": ("kv", "embd"), "attn_v.weight": ("kv", "embd"),
              "attn_output.weight": ("embd", "q"), "ffn_gate.weight": ("ff", "embd"),
              "ffn_up.weight": ("ff", "embd"), "ffn_down.weight": ("embd", "ff")}


def widen(src: Path, dst: Path, *, n_embd: int, n_heads: int, n_kv_heads: int, n_ff: int,
          qtype: GGMLQuantizationType | None = Q.F32) -> Path:
    """`src` (a llama model) embedded in the widths given, computing the same function: every extra row and column
    is zero. Query head h of KV group g keeps its place in the group (slot g * new_group + h % group), so grouped
    attention pairs the same heads; an extra query head attends to zero or to a real head's values, and its output
    columns are zero. RMSNorm divides by the mean square over all n_embd entries, which the zero padding shrinks by
    r = old n_embd / n_embd: the norm weights are scaled by sqrt(r) and the epsilon by r, which makes it exact.
    Matrices are written in `qtype`, or each in its own type if None (a zero block of 32 stays exactly zero), norms
    in F32."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"widen handles llama models, not {arch}")
    old = widths_of(src)
    new = {"n_embd": n_embd, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_ff": n_ff}
    head_dim = old["n_embd"] // old["n_heads"]
    group, new_group = old["n_heads"] // old["n_kv_heads"], n_heads // n_kv_heads
    if n_embd // n_heads != head_dim or any(new[k] < old[k] for k in new) or new_group < group:
        raise ValueError(f"cannot embed {old} in {new}: head_dim must stay {head_dim}, nothing may shrink, "
                         f"and the GQA group may only grow (from {group})")
    heads = np.arange(old["n_heads"])
    q_rows = ((heads // group * new_group + heads % group)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    # old index -> new index along each kind of axis
    where = {"embd": np.arange(old["n_embd"]), "kv": np.arange(old["n_kv_heads"] * head_dim), "q": q_rows,
             "ff": np.arange(old["n_ff"])}
    size = {"embd": n_embd, "kv": n_kv_heads * head_dim, "q": n_heads * head_dim, "ff": n_ff}
    r = old["n_embd"] / n_embd
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"

    tmp = dst.with_name(dst.name + ".tmp")
    writer = GGUFWriter(tmp, arch)
    replaced = {f"{arch}.{key}" for key in WIDTH_KEYS.values()} | {eps_key, "general.file_type", "general.name"}
    _copy_metadata(reader, writer, skip=lambda key: key in replaced)
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else src.stem
    writer.add_name(f"{name} widened to {n_embd}")
    writer.add_embedding_length(n_embd)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_feed_forward_length(n_ff)
    writer.add_layer_norm_rms_eps(float(reader.fields[eps_key].contents()) * r)
    for t in reader.tensors:
        base = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        if base not in WIDEN_AXES:
            raise ValueError(f"widen does not know where tensor {t.name} goes")
        axes = WIDEN_AXES[base]
        old_shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        w = dequantize(np.asarray(t.data), t.tensor_type).reshape(old_shape)
        placed = [(np.arange(n), n) if a is None else (where[a], size[a]) for a, n in zip(axes, old_shape, strict=True)]
        out = np.zeros(tuple(n for _, n in placed), dtype=np.float32)
        out[np.ix_(*(index for index, _ in placed))] = w
        if len(axes) == 1:
            writer.add_tensor(t.name, out * np.float32(np.sqrt(r)))
        else:
            to = t.tensor_type if qtype is None else qtype
            writer.add_tensor(t.name, out if to == Q.F32 else gguf_quants.quantize(out, to), raw_dtype=to)
    return _finish(writer, tmp, dst)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "widen":
        widen(Path(sys.argv[2]), Path(sys.argv[5]), **widths_of(Path(sys.argv[3])),
              qtype=None if sys.argv[4] == "same" else GGMLQuantizationType[sys.argv[4].upper()])
    elif len(sys.argv) == 4:
        requantize(Path(sys.argv[1]), Path(sys.argv[3]), GGMLQuantizationType[sys.argv[2].upper()])
    else:
        sys.exit(__doc__)
