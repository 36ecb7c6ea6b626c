"""qwen2 and qwen3 end to end against transformers: a small random HF model is converted by
`llm quantize` to f16, and the numpy reference backend's logits equal transformers' on the HF model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from backends import load_model
from llmcli.quantize import quantize
from quant.gguf_file import read_gguf

IDS = [504, 3158, 8, 6233, 314, 253, 1345, 281, 34, 29, 41, 730, 5, 1180, 1347, 30]


def make_hf_model(kind: str, folder, tokenizer_dir):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # head_dim deliberately not hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common))
    with torch.no_grad():  # random norms and biases, so a missing or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(1.0 * (name.endswith("norm.weight")) + 0.2 * torch.randn_like(p))
    model = model.to(torch.float16)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, folder / f)
    return model.float().eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_converted_model_matches_transformers(kind, tmp_path, smollm2_hf_dir):
    import torch

    hf = make_hf_model(kind, tmp_path / kind, smollm2_hf_dir)
    out = quantize(str(tmp_path / kind), "f16", tmp_path / f"{kind}.gguf")
    gguf = read_gguf(out)
    assert gguf.get("general.architecture") == kind
    model = load_model(gguf, "numpy")
    ours = model.forward(np.array(IDS), model.new_cache(32), all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].numpy()
    for t in range(len(IDS)):
        assert np.abs(ours[t] - ref[t]).max() <= 1e-3 * np.abs(ref[t]).max(), f"{kind} position {t}"
        assert ours[t].argmax() == ref[t].argmax()
