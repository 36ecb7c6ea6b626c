"""Quantizers against gguf.quants (bit-exact), the --optimize search, and `llm quantize` on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llmcli.quantize import run_quantize
from quant.quantize import f16_bits, quantize_rows

BLOCK = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
ALL = BLOCK + [Q.F16, Q.BF16]


def _weights(rows: int = 96, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Rows of very different scales, with the awkward blocks: all zero, constant, one outlier, ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * (10.0 ** rng.uniform(-6, 2, (rows, 1)))
    x[0, :32] = 0.0
    x[1, :32] = 0.5
    x[2, 7] *= 300.0
    x[3, :32] = np.linspace(-1, 1, 32)
    x[4, :32] = np.where(np.arange(32) % 2, 1.0, -1.0)
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["f32", "f16", "bf16"])
def test_bit_identical_to_gguf_quants(qtype, source):
    x = _weights()
    if source == "f32":
        rows, values = x, x
    elif source == "f16":
        rows = x.astype(np.float16).view(np.uint16)
        values = rows.view(np.float16).astype(np.float32)
    else:
        rows = quantize_rows(x, Q.BF16).view(np.uint16).reshape(x.shape)
        values = (rows.astype(np.uint32) << 16).view(np.float32)
    ours = quantize_rows(rows, qtype, source=source)
    oracle = quants.quantize(values, qtype).view(np.uint8).reshape(ours.shape)
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, oracle)


def test_half_conversion_matches_numpy():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(200_000).astype(np.float32) * 10.0 ** rng.uniform(-12, 6, 200_000).astype(np.float32)
    edges = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, -65520.0, 6.1035156e-05, 6.1e-05,
             5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08, 1e-12]
    v = np.concatenate([v, np.asarray(edges, dtype=np.float32)])[None, :]
    with np.errstate(over="ignore"):
        expected = v.astype(np.float16).view(np.uint16)
    assert np.array_equal(f16_bits(v), expected)


def _weighted_block_error(x: np.ndarray, data: np.ndarray, qtype) -> np.ndarray:
    xb = x.reshape(-1, 32).astype(np.float64)
    deq = quants.dequantize(data, qtype).reshape(-1, 32).astype(np.float64)
    w = xb * xb + (xb * xb).mean(axis=1, keepdims=True)
    return (w * (xb - deq) ** 2).sum(axis=1)


@pytest.mark.parametrize("qtype", BLOCK, ids=lambda t: t.name)
def test_optimize_never_worse_and_better_on_average(qtype):
    x = _weights(rows=64, cols=512, seed=2)
    ref = quantize_rows(x, qtype)
    opt = quantize_rows(x, qtype, optimize=True)
    assert opt.shape == ref.shape  # same format: gguf.quants (and ggml) read it as usual
    e_ref, e_opt = _weighted_block_error(x, ref, qtype), _weighted_block_error(x, opt, qtype)
    assert np.all(e_opt <= e_ref * (1 + 1e-9) + 1e-30)
    assert e_opt.sum() < 0.95 * e_ref.sum()
    mse = lambda data: float(((quants.dequantize(data, qtype).reshape(x.shape) - x) ** 2).mean())  # noqa: E731
    assert mse(opt) < mse(ref)


def test_row_length_must_split_into_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(np.ones((2, 48), dtype=np.float32), Q.Q4_0)


# ---- the command on bad input: one line, exit 1, no file -----------------------------------------------------

def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from llmcli.cli import main

    monkeypatch.setattr(sys, "argv", ["llm", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def _hf_folder(tmp_path: Path, config: dict | None, files: dict[str, bytes] = {}) -> Path:  # noqa: B006
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
                "vocab_size": 100, "intermediate_size": 128}


@pytest.mark.parametrize("case, expected", [
    ("missing config", "no config.json"),
    ("unsupported architecture", "unsupported architecture 'gpt_neox'"),
    ("pickle weights", "pickle"),
    ("bad type name", "unknown quantization type 'q3_x'"),
    ("unwritable output", "cannot write"),
    ("output folder missing", "does not exist"),
])
def test_bad_input_one_line_and_no_file(case, expected, tmp_path, monkeypatch, capsys, smollm2_hf_dir):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    qtype = "q4_0"
    if case == "missing config":
        source = _hf_folder(tmp_path, None, {"model.safetensors": b"\0" * 16})
    elif case == "unsupported architecture":
        source = _hf_folder(tmp_path, {**LLAMA_CONFIG, "model_type": "gpt_neox"})
    elif case == "pickle weights":
        source = _hf_folder(tmp_path, LLAMA_CONFIG, {"pytorch_model.bin": b"PK\3\4 not really"})
    elif case == "bad type name":
        source, qtype = smollm2_hf_dir, "q3_x"
    elif case == "unwritable output":
        source = smollm2_hf_dir
        blocker = tmp_path / "out" / "a-file"
        blocker.write_text("x")
        out = blocker / "model.gguf"  # a path below a regular file
    else:
        source, out = smollm2_hf_dir, tmp_path / "nowhere" / "model.gguf"
    code, err = _cli(["quantize", str(source), "-t", qtype, "-o", str(out)], monkeypatch, capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == (["a-file"] if case == "unwritable output" else [])


def test_interrupted_write_leaves_nothing(smollm2_hf_dir, tmp_path):
    out = tmp_path / "model.gguf"
    seen = []

    def stop_after_three(plan_entry):
        seen.append(plan_entry.name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(smollm2_hf_dir), "q8_0", out, on_tensor=stop_after_three)
    assert list(tmp_path.iterdir()) == []


def test_bad_tensor_type_spec(smollm2_hf_dir, tmp_path):
    from quant.errors import LlmError

    with pytest.raises(LlmError, match="REGEX=TYPE"):
        run_quantize(str(smollm2_hf_dir), "q4_0", tmp_path / "x.gguf", tensor_types=["attn_v"])
    with pytest.raises(LlmError, match="bad regular expression"):
        run_quantize(str(smollm2_hf_dir), "q4_0", tmp_path / "x.gguf", tensor_types=["attn_(v=q8_0"])
    assert list(tmp_path.iterdir()) == []


def test_output_is_never_the_source_unless_force(smollm2_path, tmp_path, monkeypatch, capsys):
    import shutil

    src = tmp_path / "m.gguf"
    shutil.copy(smollm2_path, src)
    before = src.read_bytes()
    code, err = _cli(["quantize", str(src), "-t", "q8_0", "-o", str(src), "--allow-requantize"], monkeypatch, capsys)
    assert code == 1 and err.startswith("error: ") and "is the source itself" in err and "--force" in err, err
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    # into the store: `llm quantize NAME:TYPE -t TYPE` would land on the stored file itself
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "home"))
    from llmcli import store

    first = run_quantize(str(src), "q8_0", allow_requantize=True)
    stored = store.resolve_model(first.store_name)
    mtime = stored.stat().st_mtime_ns
    from quant.errors import LlmError

    with pytest.raises(LlmError, match="is the source itself"):
        run_quantize(first.store_name, "q8_0", allow_requantize=True)
    assert stored.stat().st_mtime_ns == mtime
    again = run_quantize(first.store_name, "q8_0", allow_requantize=True, force=True)
    assert again.result.path == stored and stored.stat().st_mtime_ns != mtime


def test_interrupted_store_write_leaves_no_folder(smollm2_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "home"))

    def stop(plan_entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(smollm2_hf_dir), "q8_0", on_tensor=stop)
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_error_has_no_blank_line_before_it(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "llmcli", "quantize", str(tmp_path / "missing.gguf"), "-t",
                           "q4_k_m"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1 and proc.stderr.startswith("error: "), repr(proc.stderr)
