"""Perplexity against transformers on the same windows, and KL divergence between quantizations."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import WIKITEXT

from llmcli.perplexity import perplexity, windows
from llmcli.quantize import quantize
from quant.errors import LlmError

CTX = 512
CHUNKS = 2  # the numpy reference backend takes seconds per 512-token window


@pytest.fixture(scope="session")
def f16_and_q4(smollm2_hf_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ppl")
    return {qt: quantize(str(smollm2_hf_dir), qt, out / f"smollm2-{qt}.gguf") for qt in ("f16", "q4_0")}


@pytest.fixture(scope="session")
def wikitext() -> str:
    return WIKITEXT.read_text(encoding="utf-8")


def test_windows():
    toks = list(range(100))
    ws = windows(toks, 32, None, None)
    assert len(ws) == 3 and ws[1].tolist() == list(range(32, 64))
    ws = windows(toks, 32, 2, bos_id=7)
    assert len(ws) == 2 and ws[0][0] == 7 and ws[1][0] == 7 and ws[1][1] == 33
    with pytest.raises(LlmError, match="at least 128"):
        windows(toks, 128, None, None)
    with pytest.raises(LlmError, match="--chunks"):
        windows(toks, 32, 0, None)


@pytest.mark.slow
def test_f16_perplexity_matches_transformers(f16_and_q4, smollm2_hf_dir, wikitext):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ours = perplexity(f16_and_q4["f16"], wikitext, ctx=CTX, chunks=CHUNKS, backend="numpy")
    hf_tok = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    ids = hf_tok.encode(wikitext, add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in range(CHUNKS):
            window = torch.tensor([ids[c * CTX:(c + 1) * CTX]])
            logp = torch.log_softmax(model(window).logits[0].double(), dim=-1)
            first = CTX // 2
            targets = window[0, first + 1:]
            nll -= logp[first:CTX - 1].gather(1, targets[:, None]).sum().item()
            n += len(targets)
    expected = float(np.exp(nll / n))
    assert ours.n_tokens == n == CHUNKS * (CTX - 1 - CTX // 2)
    assert abs(ours.ppl - expected) / expected < 0.005, (ours.ppl, expected)


@pytest.mark.slow
def test_kl_divergence_against_base(f16_and_q4, wikitext):
    same = perplexity(f16_and_q4["f16"], wikitext, ctx=128, chunks=1, base=f16_and_q4["f16"], backend="numpy")
    assert same.kld_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agree == 1.0
    q4 = perplexity(f16_and_q4["q4_0"], wikitext, ctx=128, chunks=2, base=f16_and_q4["f16"], backend="numpy")
    assert 0.0 < q4.kld_mean < q4.kld_p99 < 5.0
    assert 0.5 < q4.top1_agree < 1.0
    assert q4.n_tokens == 2 * (128 - 1 - 64) and q4.ppl > 1.0


def test_cli_json(f16_and_q4, wikitext, tmp_path, monkeypatch, capsys):
    from llmcli.cli import main

    text = tmp_path / "text.txt"
    text.write_text(wikitext[:4000])
    monkeypatch.setattr(sys, "argv", ["llm", "perplexity", str(f16_and_q4["q4_0"]), str(text), "--ctx", "64",
                                      "--chunks", "2", "--base", str(f16_and_q4["f16"]), "--json",
                                      "--backend", "numpy"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ppl", "n_tokens", "kld_mean", "kld_p99", "top1_agree"} <= set(result)
    assert result["n_tokens"] == 2 * (64 - 1 - 32) and result["ppl"] > 1.0 and result["kld_mean"] > 0.0


def test_cli_says_one_window(f16_and_q4, wikitext, tmp_path, monkeypatch, capsys):
    from llmcli.cli import main

    text = tmp_path / "text.txt"
    text.write_text(wikitext[:4000])
    monkeypatch.setattr(sys, "argv", ["llm", "perplexity", str(f16_and_q4["q4_0"]), str(text), "--ctx", "64",
                                      "--chunks", "1", "--backend", "numpy"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    assert "(1 window of 64)" in capsys.readouterr().out
