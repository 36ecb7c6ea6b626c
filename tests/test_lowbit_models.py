"""SmolLM2 in the 2- and 3-bit K-quant mixes, made by `llm quantize` from its F16 copy, on every backend: numba
(kernels in quant/kernels_lowbit.py) against the numpy reference, per position KL < 1e-3 on the prompt path and the
decode stack, and the same greedy tokens; MLX the same tokens.

SmolLM2's 576-wide rows fall back to Q4_0/Q5_x (as llama.cpp does), so only ffn_down (rows of 1536) takes the
low-bit types: in the Q2_K mix it is Q3_K; the Q3_K_M file gets `--tensor-type ffn_down=q2_k` for a Q2_K tensor."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import kl_per_position

from backends import load_model, mlx_available
from llmcli.quantize import run_quantize
from quant.gguf_file import read_gguf

FILES = {"q2_k": ("q2_k", [], "Q3_K"), "q3_k_m+q2_k": ("q3_k_m", ["ffn_down=q2_k"], "Q2_K")}
PROMPT = np.array([1, 9690, 314, 260, 3345, 282, 4114, 30, 378, 3821, 3441, 314, 2017, 28, 284, 260, 1345, 506,
                   2573, 30, 378, 1345, 3612, 253, 4081, 281, 260, 4962, 30, 378, 3345, 314])


@pytest.fixture(scope="module", params=list(FILES))
def lowbit_model(request, smollm2_hf_dir, tmp_path_factory):
    qtype, tensor_types, low = FILES[request.param]
    path = tmp_path_factory.mktemp("lowbit") / f"smollm2-{request.param}.gguf"
    run_quantize(str(smollm2_hf_dir), qtype, path, tensor_types=tensor_types)
    gguf = read_gguf(path)
    assert {t.qtype.name for name, t in gguf.tensors.items() if "ffn_down" in name} == {low}
    return gguf


def greedy(model, n: int = 10) -> list[int]:
    cache, out = model.new_cache(64), []
    logits = model.forward(PROMPT[:12], cache)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.array(out[-1:]), cache)
    return out


@pytest.mark.slow
def test_numba_and_mlx_match_numpy(lowbit_model):
    ref, fast = load_model(lowbit_model, "numpy"), load_model(lowbit_model, "numba", threads=2)
    want = ref.forward(PROMPT, ref.new_cache(64), all_logits=True)
    whole = fast.forward(PROMPT, fast.new_cache(64), all_logits=True)  # the prompt path (BLAS on dequantized tiles)
    cache = fast.new_cache(64)
    pieces = np.concatenate([fast.forward(PROMPT[i:i + 4], cache, all_logits=True)  # the decode stack (matvec)
                             for i in range(0, len(PROMPT), 4)])
    for got in (whole, pieces):
        assert kl_per_position(got, want).max() < 1e-3
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
    tokens = greedy(ref)
    assert greedy(fast) == tokens
    if mlx_available():
        assert greedy(load_model(lowbit_model, "mlx")) == tokens
