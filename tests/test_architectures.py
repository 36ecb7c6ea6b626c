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


def make_family_model(kind: str, folder, tokenizer_dir):
    """A tiny random HF model of each newer family, in float32: Gemma 3 (sandwich norms, GELU, q/k norms, a
    4-token window on five layers of six), Llama 3 (llama3 RoPE factors), Mistral (a sliding window)."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                                   sliding_window=4, tie_word_embeddings=True, **common))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, rope_parameters=rope, tie_word_embeddings=False,
                                             **common))
    else:
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=4, tie_word_embeddings=False,
                                                 **common))
    with torch.no_grad():  # random norms, so a missing or misplaced one shows (Gemma's are 1 + w)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if kind == "gemma3" else 1.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return model.eval()


def _kl(logits, ref):
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma3", "llama3", "mistral"])
def test_family_converted_to_f32_and_q8_0_matches_transformers(kind, tmp_path, smollm2_hf_dir):
    """`llm quantize` to F32 and Q8_0, then every backend against transformers on the same weights: per-position
    KL < 1e-3 and the same argmax on 99 % of positions (16 positions: past the 4-token windows)."""
    import torch

    from backends import BACKENDS, mlx_available

    hf = make_family_model(kind, tmp_path / kind, smollm2_hf_dir)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float().numpy()
    for qtype in ("f32", "q8_0"):
        gguf = read_gguf(quantize(str(tmp_path / kind), qtype, tmp_path / f"{kind}-{qtype}.gguf"))
        assert gguf.get("general.architecture") == ("gemma3" if kind == "gemma3" else "llama")
        for backend in BACKENDS:
            if backend == "mlx" and not mlx_available():
                continue
            model = load_model(gguf, backend, threads=2)
            cache = model.new_cache(32)
            ours = np.concatenate([model.forward(np.array(IDS[:10]), cache, all_logits=True),
                                   model.forward(np.array(IDS[10:]), cache, all_logits=True)])
            kl = _kl(ours, ref)
            assert kl.max() < 1e-3, (kind, qtype, backend, kl.max())
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99, (kind, qtype, backend)


def make_phi3_model(folder, tokenizer_dir):
    """A tiny random Phi-3 with LongRoPE (fused Q/K/V and gate/up); original context 64 of 512."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    half = 8  # head_dim 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.5 * i for i in range(half)]}
    config = Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        original_max_position_embeddings=64, rope_parameters=rope, tie_word_embeddings=False,
                        rms_norm_eps=1e-6, pad_token_id=0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return model.eval()


@pytest.mark.slow
def test_phi3_longrope_converted_matches_transformers(tmp_path, smollm2_hf_dir):
    """Phi-3 converted to F32 and Q8_0 against transformers on 16 tokens (short factors: the sequence is within
    the original context), every backend; the fused matrices are split by the backends."""
    import torch

    from backends import BACKENDS, mlx_available

    hf = make_phi3_model(tmp_path / "phi3", smollm2_hf_dir)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float().numpy()
    for qtype in ("f32", "q8_0"):
        gguf = read_gguf(quantize(str(tmp_path / "phi3"), qtype, tmp_path / f"phi3-{qtype}.gguf"))
        assert gguf.get("general.architecture") == "phi3" and "rope_factors_long.weight" in gguf.tensors
        for backend in BACKENDS:
            if backend == "mlx" and not mlx_available():
                continue
            model = load_model(gguf, backend, threads=2)
            cache = model.new_cache(32)  # within the original 64: the short factors, as transformers at 16 tokens
            ours = np.concatenate([model.forward(np.array(IDS[:10]), cache, all_logits=True),
                                   model.forward(np.array(IDS[10:]), cache, all_logits=True)])
            kl = _kl(ours, ref)
            assert kl.max() < 1e-3, ("phi3", qtype, backend, kl.max())
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
