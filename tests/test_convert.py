"""HF folder / GGUF -> GGUF: tensors against gguf.quants on independently mapped data, metadata against
the original SmolLM2 GGUF, and loading in transformers and in llm with the same greedy tokens."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llmcli.quantize import quantize, run_quantize
from quant.errors import LlmError
from quant.gguf_file import read_gguf

PROMPT = "The capital of France is Paris, and the capital of Germany is"


@pytest.fixture(scope="session")
def converted(smollm2_hf_dir, tmp_path_factory) -> dict:
    """SmolLM2 from the HF folder as f16, q8_0 and q4_0 (--pure)."""
    out = tmp_path_factory.mktemp("converted")
    return {qt: quantize(str(smollm2_hf_dir), qt, out / f"smollm2-{qt}.gguf", pure=True)
            for qt in ("f16", "q8_0", "q4_0")}


def _oracle_tensors(hf_dir) -> dict[str, np.ndarray]:
    """The HF weights under GGUF names, Q/K permuted the way llama.cpp's converter writes them (float32)."""
    import json

    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    out = {}
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        w = w.astype(np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        else:
            layer, part = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name).groups()
            gname = names[part]
            if gname in ("attn_q", "attn_k"):
                heads = n_head if gname == "attn_q" else n_kv
                w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            out[f"blk.{layer}.{gname}.weight"] = w
    return out


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_every_tensor_bit_identical_to_gguf_quants(converted, smollm2_hf_dir, qtype):
    g = read_gguf(converted[qtype])
    oracle = _oracle_tensors(smollm2_hf_dir)
    assert sorted(g.tensors) == sorted(oracle)
    for name, expected in oracle.items():
        t = g.tensors[name]
        if expected.ndim == 1:
            assert t.qtype == Q.F32
            assert np.array_equal(t.data, expected), name
        else:
            assert t.qtype == Q[qtype.upper()] and t.shape == expected.shape
            ref = quants.quantize(expected, t.qtype).view(np.uint8).reshape(t.data.shape)
            assert np.array_equal(np.asarray(t.data), ref), name


def test_tokenizer_and_template_match_the_original(converted, smollm2_path):
    """The HF fixture was written from the original GGUF: the tokenizer must come back the same."""
    ours, orig = read_gguf(converted["q8_0"]).metadata, read_gguf(smollm2_path).metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"):
        assert ours[key] == orig[key], key
    # this tokenizer.json splits with the plain GPT-2 byte-level regex, which llama.cpp calls "gpt-2"
    assert ours["tokenizer.ggml.pre"] == "gpt-2"
    assert ours["general.file_type"] == 7 and ours["general.quantization_version"] == 2


def test_gguf_source_gives_the_same_tensors(converted, tmp_path):
    """HF -> q8_0 and HF -> f16 -> q8_0 (the GGUF path) write the same bytes."""
    again = quantize(str(converted["f16"]), "q8_0", tmp_path / "from-f16.gguf", pure=True)
    a, b = read_gguf(converted["q8_0"]), read_gguf(again)
    assert a.metadata["tokenizer.ggml.merges"] == b.metadata["tokenizer.ggml.merges"]
    for name, t in a.tensors.items():
        assert t.qtype == b.tensors[name].qtype and np.array_equal(t.data, b.tensors[name].data), name


def _greedy_llm(path, ids, n):
    from backends import load_model

    model = load_model(read_gguf(path), "numpy")
    cache = model.new_cache(len(ids) + n)
    logits, out = model.forward(np.asarray(ids, dtype=np.int32), cache), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.asarray(out[-1:], dtype=np.int32), cache)
    return out


@pytest.mark.slow
def test_f16_file_matches_the_hf_model(converted, smollm2_hf_dir):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from backends import load_model

    ids = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json")).encode(PROMPT).ids
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    model = load_model(read_gguf(converted["f16"]), "numpy")
    got = model.forward(np.asarray(ids, dtype=np.int32), model.new_cache(len(ids)), all_logits=True)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_loads_in_transformers_and_llm_with_same_greedy_tokens(converted, smollm2_hf_dir, qtype):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    path = converted[qtype]
    ids = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json")).encode(PROMPT).ids
    tf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        tf_out = tf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert _greedy_llm(path, ids, 8) == tf_out


def test_default_policy_and_overrides(smollm2_hf_dir):
    plan = {p.name: p.qtype for p in run_quantize(str(smollm2_hf_dir), "q4_0", dry_run=True).plan}
    assert plan["token_embd.weight"] == Q.Q8_0  # tied: also the output matrix
    assert plan["blk.0.attn_norm.weight"] == Q.F32 and plan["output_norm.weight"] == Q.F32
    assert plan["blk.3.ffn_down.weight"] == Q.Q4_0
    plan = {p.name: p.qtype for p in run_quantize(
        str(smollm2_hf_dir), "q4_0", dry_run=True, tensor_types=[r"attn_v\.=q8_0", r"ffn_down=q5_1"],
        embedding_type="q5_0").plan}
    assert plan["blk.0.attn_v.weight"] == Q.Q8_0 and plan["blk.7.ffn_down.weight"] == Q.Q5_1
    assert plan["token_embd.weight"] == Q.Q5_0 and plan["blk.0.attn_q.weight"] == Q.Q4_0
    plan = {p.name: p.qtype for p in run_quantize(str(smollm2_hf_dir), "q5_1", dry_run=True, pure=True).plan}
    assert plan["token_embd.weight"] == Q.Q5_1


def test_dry_run_table_matches_the_written_file(smollm2_hf_dir, tmp_path, monkeypatch, capsys):
    import sys

    from llmcli.cli import main

    out = tmp_path / "m.gguf"
    argv = ["llm", "quantize", str(smollm2_hf_dir), "-t", "q5_0", "-o", str(out), "--dry-run"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:  # main() always exits
        main()
    assert exc.value.code == 0
    table = capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "blk.0.attn_q.weight" in table and "Q5_0" in table and "total (272 tensors)" in table
    report = run_quantize(str(smollm2_hf_dir), "q5_0", out)
    assert f"{report.n_bytes:,}" in table
    g = read_gguf(out)
    assert sum(t.n_bytes for t in g.tensors.values()) == report.n_bytes


def test_requantize_needs_the_flag(smollm2_path, tmp_path):
    with pytest.raises(LlmError, match="already quantized.*--allow-requantize"):
        run_quantize(str(smollm2_path), "q4_0", tmp_path / "x.gguf")
    report = run_quantize(str(smollm2_path), "q4_1", tmp_path / "x.gguf", allow_requantize=True, pure=True)
    assert any("already quantized" in w for w in report.warnings)
    src, out = read_gguf(smollm2_path), read_gguf(tmp_path / "x.gguf")
    assert out.metadata["tokenizer.ggml.pre"] == "smollm"  # metadata is carried over
    for name, t in src.tensors.items():
        assert out.tensors[name].qtype == (Q.F32 if t.qtype == Q.F32 else Q.Q4_1)
        if t.qtype == Q.Q4_1:  # already in the target type: copied, not requantized
            assert np.array_equal(out.tensors[name].data, t.data)


def test_store_and_hf_cache_sources(smollm2_hf_dir, tmp_path, monkeypatch):
    """A repo id in the Hugging Face cache lands in the store as <repo>:<type>."""
    import huggingface_hub.constants as hf_constants

    from llmcli import store

    cache = tmp_path / "hub"
    snap = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    for f in smollm2_hf_dir.iterdir():
        (snap / f.name).symlink_to(f)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "store"))
    path = quantize("HuggingFaceTB/SmolLM2-135M-Instruct", "q8_0")
    entry = store.find_model("HuggingFaceTB/SmolLM2-135M-Instruct:q8_0")
    assert entry is not None and entry.path == path and entry.type == "q8_0"
    assert read_gguf(path).tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0
    # a store name is a source too: requantizing its q8_0 needs the flag
    with pytest.raises(LlmError, match="--allow-requantize"):
        quantize("HuggingFaceTB/SmolLM2-135M-Instruct:q8_0", "q4_0")
    shutil.rmtree(tmp_path / "store")
