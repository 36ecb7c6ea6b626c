"""Make tests/data/kquants_llamacpp.npz: what real llama.cpp (llama-cpp-python's llama_model_quantize, no
imatrix) writes, to pin tests/kquants_ref.py and quant/policy.py.

Two F16 sources: a random model of the Llama-3.2-1B shape cut to 2 layers (rows of 2048 and 8192, GQA 4,
untied output) and SmolLM2-135M converted to F16 by `llm quantize` (rows of 576 and 1536, tied, GQA 3).
For every K-quant file type the fixture keeps each tensor's type (the plan), and for a few tensors the
first 512 source weights of two rows with llama.cpp's bytes of them in every type it wrote there (a
super-block is quantized on its own without an imatrix, so a row's first blocks stand alone).

    PYTHONPATH=. python tests/data/make_kquants_fixture.py   (needs llama_cpp; a few minutes)
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

Q = GGMLQuantizationType
OUT = Path(__file__).with_name("kquants_llamacpp.npz")
MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
PINNED = {"1b": ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight", "output.weight"],
          "smollm2": ["token_embd.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.29.ffn_down.weight"]}
N_COLS = 512
ROWS = (0, 1)


def one_b_model(dst: Path) -> Path:
    from make_bench_models import write_random_model

    return write_random_model(dst, n_embd=2048, n_layers=2, n_heads=32, n_kv_heads=8, n_ff=8192, n_vocab=512,
                              qtype=Q.F16, tied=False, seed=7)


def smollm2_f16(dst: Path) -> Path:
    from llmcli.quantize import run_quantize

    src = REPO / ".test-models" / "models" / "smollm2" / "model.gguf"
    run_quantize(str(src), "f16", dst, allow_requantize=True)
    return dst


def llama_quantize(src: Path, dst: Path, mix: str, pure: bool = False, nthread: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = nthread
    params.pure = pure
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {mix} failed")


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"plans": {}, "tensors": {}}
    with tempfile.TemporaryDirectory(dir=REPO / ".test-models") as tmp:
        tmp = Path(tmp)
        for model, src in (("1b", one_b_model(tmp / "1b.gguf")), ("smollm2", smollm2_f16(tmp / "smollm2.gguf"))):
            reader = GGUFReader(src)
            meta["tensors"][model] = [[t.name, [int(d) for d in reversed(t.shape.tolist())], t.tensor_type.name]
                                      for t in reader.tensors]
            src_t = {t.name: t for t in reader.tensors}
            for name in PINNED[model]:
                rows = np.asarray(src_t[name].data)[list(ROWS), :N_COLS]
                arrays[f"{model}/{name}/src"] = np.ascontiguousarray(rows).view(np.uint16)
            meta["plans"][model] = {}
            for mix in MIXES:
                dst = tmp / f"{model}-{mix}.gguf"
                llama_quantize(src, dst, mix)
                out = GGUFReader(dst)
                meta["plans"][model][mix] = {t.name: t.tensor_type.name for t in out.tensors}
                for t in out.tensors:
                    if t.name not in PINNED[model]:
                        continue
                    key = f"{model}/{t.name}/{t.tensor_type.name}"
                    block, size = GGML_QUANT_SIZES[t.tensor_type]
                    raw = np.asarray(t.data).reshape(int(t.shape[-1]), -1)
                    arrays.setdefault(key, np.ascontiguousarray(raw[list(ROWS), :N_COLS // block * size]))
                dst.unlink()
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays) - 1} arrays)")


if __name__ == "__main__":
    main()
