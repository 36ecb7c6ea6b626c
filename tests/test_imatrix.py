"""`--optimize` with activation statistics: the statistics against transformers, the weighted search
against the reference rounding, the KL divergence of the result, and bad --calibration input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import WIKITEXT
from gguf import GGMLQuantizationType as Q
from gguf import quants
from test_quantize import BLOCK, _cli, _weights

from llmcli import calibrate
from llmcli.quantize import run_quantize
from quant.convert import hf_source
from quant.quantize import quantize_rows

# a text for the statistics test: short (one window) and not the built-in calibration text
SAMPLE = ("The orchard sloped down to a stream that ran fast in March and nearly dry by August. Every autumn the "
          "family picked apples into wooden crates, 18 kg each, and stacked them in the cool barn. def add(a, b):\n"
          "    return a + b\n\nprint(add(2, 3))  # 5\n- item one\n- item two\n'Are you coming?' she asked. "
          "'In ten minutes,' he said, which everybody knew meant thirty.") * 2

_HF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}


def _transformers_stats(hf_dir, ids: list[int]) -> dict[str, np.ndarray]:
    """E[x²] per input column of every nn.Linear, from forward hooks on the HF model (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    stats: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            stats[name] = (x * x).mean(dim=0).numpy()
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name == "lm_head":
                gname = "token_embd.weight" if model.config.tie_word_embeddings else "output.weight"
            else:
                layer, part = name.removeprefix("model.layers.").split(".", 1)
                gname = f"blk.{layer}.{_HF_NAMES[part]}.weight"
            module.register_forward_pre_hook(hook(gname))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return stats


@pytest.mark.slow
def test_activation_statistics_match_transformers(smollm2_hf_dir, tmp_path):
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json")).encode(SAMPLE, add_special_tokens=False).ids
    assert calibrate.CALIB_MIN_TOKENS <= len(ids) < calibrate.CALIB_CTX  # one window: the whole text
    ours = calibrate.importance(hf_source(smollm2_hf_dir), SAMPLE, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []  # the temporary F16 conversion is gone
    oracle = _transformers_stats(smollm2_hf_dir, ids)
    assert sorted(ours) == sorted(oracle) and len(ours) == 30 * 7 + 1
    for name, expected in oracle.items():
        np.testing.assert_allclose(ours[name], expected, rtol=2e-3, atol=1e-6 * expected.max(), err_msg=name)


def test_calibration_windows_cover_the_text():
    ids = list(range(3000))
    wins = calibrate.calibration_windows(ids, None, "t")
    assert len(wins) == calibrate.CALIB_MAX_TOKENS // calibrate.CALIB_CTX
    assert all(len(w) == calibrate.CALIB_CTX for w in wins)
    assert wins[0][0] == 0 and wins[-1][-1] == 2999  # first and last token both seen
    with_bos = calibrate.calibration_windows(ids[:300], 7, "t")
    assert len(with_bos) == 1 and with_bos[0][0] == 7 and list(with_bos[0][1:]) == ids[:300]
    with pytest.raises(Exception, match="needs at least"):
        calibrate.calibration_windows(ids[:100], None, "t")


def _importance_block_error(x, data, qtype, imp) -> np.ndarray:
    """The search's objective per block: sum imp_j * sqrt(mean x² + x_j²) * err_j²."""
    xb = x.reshape(-1, 32).astype(np.float64)
    deq = quants.dequantize(data, qtype).reshape(-1, 32).astype(np.float64)
    w = np.tile(imp.reshape(-1, 32), (x.shape[0], 1)) * np.sqrt(xb * xb + (xb * xb).mean(axis=1, keepdims=True))
    return (w * (xb - deq) ** 2).sum(axis=1)


@pytest.mark.parametrize("qtype", BLOCK, ids=lambda t: t.name)
def test_importance_search_never_worse_than_reference(qtype):
    x = _weights(rows=64, cols=512, seed=3)
    rng = np.random.default_rng(4)
    imp = rng.lognormal(0.0, 2.0, 512)  # activations differ by orders of magnitude between columns
    imp[:32] = 0.0  # a block no token ever reaches: nothing to optimize, the reference stays
    ref = quantize_rows(x, qtype)
    opt = quantize_rows(x, qtype, optimize=True, col_weights=imp)
    assert opt.shape == ref.shape
    e_ref, e_opt = _importance_block_error(x, ref, qtype, imp), _importance_block_error(x, opt, qtype, imp)
    assert np.all(e_opt <= e_ref * (1 + 1e-9) + 1e-30)
    assert e_opt.sum() < 0.95 * e_ref.sum()
    assert np.array_equal(opt.reshape(64, 16, -1)[:, 0], ref.reshape(64, 16, -1)[:, 0])  # the unreached block


def test_column_weights_must_match_the_rows():
    with pytest.raises(ValueError, match="col_weights"):
        quantize_rows(np.ones((2, 64), dtype=np.float32), Q.Q4_0, optimize=True, col_weights=np.ones(32))


# ---- end to end: KL divergence through `llm perplexity --base` --------------------------------------------------

def _perplexity_json(model, base, monkeypatch, capsys) -> dict:
    from llmcli.cli import main

    monkeypatch.setattr(sys, "argv", ["llm", "perplexity", str(model), str(WIKITEXT), "--base", str(base),
                                      "--ctx", "128", "--chunks", "4", "--backend", "numpy", "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_optimize_lowers_kl_divergence(smollm2_hf_dir, tmp_path, monkeypatch, capsys):
    base = run_quantize(str(smollm2_hf_dir), "f16", tmp_path / "f16.gguf").result.path
    default = run_quantize(str(smollm2_hf_dir), "q4_0", tmp_path / "q4_0.gguf").result.path
    optimized = tmp_path / "q4_0-opt.gguf"
    text = tmp_path / "calibration.txt"  # one window of the built-in text keeps the test short
    text.write_text(calibrate.default_text()[:1800])
    code, err = _cli(["quantize", str(smollm2_hf_dir), "-t", "q4_0", "--optimize", "--calibration", str(text),
                      "-o", str(optimized)], monkeypatch, capsys)
    assert code == 0 and "wrote" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "f16.gguf", "q4_0-opt.gguf",
                                                          "q4_0.gguf"]  # no temporaries left
    kl_default = _perplexity_json(default, base, monkeypatch, capsys)
    kl_optimized = _perplexity_json(optimized, base, monkeypatch, capsys)
    assert kl_optimized["kld_mean"] < 0.9 * kl_default["kld_mean"], (kl_default, kl_optimized)
    assert kl_optimized["top1_agree"] >= kl_default["top1_agree"]


# ---- bad --calibration: one line, exit 1, nothing written -------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("missing file", "no such file"),
    ("too few characters", "needs at least 128 tokens"),
    ("too few tokens", "needs at least 128"),
    ("without --optimize", "add --optimize"),
])
def test_bad_calibration(case, expected, smollm2_hf_dir, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    text = tmp_path / "calib.txt"
    if case == "too few characters":
        text.write_text("Just one short line.")
    elif case == "too few tokens":
        text.write_text("=" * 400)  # many characters, few tokens
    elif case != "missing file":
        text.write_text(calibrate.default_text())
    args = ["quantize", str(smollm2_hf_dir), "-t", "q4_0", "-o", str(out_dir / "m.gguf"), "--calibration", str(text)]
    code, err = _cli(args + ([] if case == "without --optimize" else ["--optimize"]), monkeypatch, capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert list(out_dir.iterdir()) == []
