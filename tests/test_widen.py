"""benchmarks/make_bench_models.widen: SmolLM2 embedded in larger widths (zero padding, its query heads moved to
keep their KV groups, norm weights and epsilon rescaled) gives SmolLM2's logits and greedy text. The widths here
are smaller than the 1B shape's so that the F32 file stays near 1 GB; they still pad every axis and widen the GQA
group (3 -> 4), the two things the 1B shape's widths ask for."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bench_models, greedy
from oracle import kl_per_position

from backends import load_model
from quant.gguf_file import read_gguf

PROMPT = [1, 504, 3458, 282, 4195, 314, 253, 1345, 30, 216, 701, 3124, 28, 3, 99, 1412, 30, 2052, 314, 260]
WIDTHS = {"n_embd": 1024, "n_heads": 16, "n_kv_heads": 4, "n_ff": 2048}


@pytest.mark.slow
def test_widened_model_computes_the_same_function(smollm2_path, tmp_path):
    """The numpy backend computes in float32 from dequantized weights, so SmolLM2's Q4_1 file and its widened F32
    copy hold the same numbers: only the float order of the longer, zero-padded sums may differ."""
    module = bench_models()
    wide_path = module.widen(smollm2_path, tmp_path / "wide.gguf", **WIDTHS)
    assert module.widths_of(wide_path) == WIDTHS
    src, wide = (load_model(read_gguf(p), "numpy") for p in (smollm2_path, wide_path))
    assert wide.hparams.n_layers == src.hparams.n_layers == 30
    want = src.forward(np.array(PROMPT), src.new_cache(32), all_logits=True)
    got = wide.forward(np.array(PROMPT), wide.new_cache(32), all_logits=True)
    assert kl_per_position(got, want).max() < 1e-5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert greedy(wide, PROMPT, 10) == greedy(src, PROMPT, 10)


def test_widen_refuses_widths_it_cannot_embed_in(smollm2_path, tmp_path):
    module = bench_models()
    for bad in ({**WIDTHS, "n_heads": 8, "n_embd": 1024},  # head_dim 128
                {**WIDTHS, "n_kv_heads": 8},  # GQA group 2 < SmolLM2's 3
                {**WIDTHS, "n_ff": 1024}):  # narrower feed-forward
        with pytest.raises(ValueError):
            module.widen(smollm2_path, tmp_path / "bad.gguf", **bad)
    assert not (tmp_path / "bad.gguf").exists()
