"""The model store: names, resolution, and `rm` freeing Hugging Face cache blobs no other entry uses.

The cache is laid out by hand here exactly as huggingface_hub lays it out (blobs, snapshot links,
refs); tests/test_pull.py covers the same paths with the real client."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llmcli import store
from quant.errors import ModelFileError, ModelNotFoundError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path / "store"))
    return tmp_path


def cached(home: Path, repo_id: str, files: dict[str, bytes], commit: str = "c" * 40) -> dict[str, Path]:
    """Files in a Hugging Face cache snapshot, each a link to its blob; equal contents share a blob."""
    repo = home / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    out = {}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        out[name] = link
    return out


def test_register_keeps_the_snapshot_name_and_lists(home):
    files = cached(home, "o/r", {"m-Q4_K_M.gguf": b"x" * 1000})
    store.register("o/r:Q4_K_M", "hf:o/r@main", "Q4_1", files["m-Q4_K_M.gguf"])
    (entry,) = store.list_models()
    assert entry.path == files["m-Q4_K_M.gguf"] and entry.path.name == "m-Q4_K_M.gguf"  # not the blob
    assert (entry.name, entry.source, entry.type, entry.base) == ("o/r:Q4_K_M", "hf:o/r@main", "Q4_1", "o/r")
    assert entry.size() == 1000


def test_names_resolve_case_insensitively_and_refuse_ambiguity(home):
    files = cached(home, "o/r", {"m-Q4_K_M.gguf": b"a" * 10, "m-Q8_0.gguf": b"b" * 20})
    store.register("o/r:Q4_K_M", "hf:o/r@main", "Q4_K_M", files["m-Q4_K_M.gguf"])
    assert store.resolve_model("o/r") == files["m-Q4_K_M.gguf"]  # REPO alone: the only one there is
    store.register("o/r:Q8_0", "hf:o/r@main", "Q8_0", files["m-Q8_0.gguf"])
    with pytest.raises(ModelNotFoundError, match=r"ambiguous.*o/r:Q4_K_M, o/r:Q8_0"):
        store.resolve_model("o/r")
    with pytest.raises(ModelNotFoundError, match="ambiguous"):
        store.find_one("O/R")
    assert store.resolve_model("O/R:q8_0") == files["m-Q8_0.gguf"]
    with pytest.raises(ModelNotFoundError, match="llm pull o/x"):
        store.resolve_model("o/x")


def test_a_checkpoint_is_not_run_but_its_gguf_is(home):
    files = cached(home, "o/s", {"config.json": b"{}", "model.safetensors": b"w" * 50})
    store.register("o/s:safetensors", "hf:o/s@main", store.SAFETENSORS, files["config.json"].parent,
                   parts=list(files.values()))
    (entry,) = store.list_models()
    assert entry.size() == 52 and entry.files() == list(files.values())
    with pytest.raises(ModelFileError, match="llm quantize o/s -t q4_0"):
        store.resolve_model("o/s")
    gguf = store.model_dir("o/s:q4_0") / "model.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"g" * 30)
    store.register("o/s:q4_0", "o/s", "q4_0", gguf)
    assert store.resolve_model("o/s") == gguf


def test_rm_frees_blobs_only_when_no_other_entry_uses_them(home):
    files = cached(home, "o/r", {"m-Q4_K_M.gguf": b"same" * 100, "m-Q8_0.gguf": b"same" * 100})
    a = store.register("o/r:Q4_K_M", "hf:o/r@main", "Q4_1", files["m-Q4_K_M.gguf"])
    b = store.register("o/r:Q8_0", "hf:o/r@main", "Q4_1", files["m-Q8_0.gguf"])
    blob = Path(os.path.realpath(files["m-Q8_0.gguf"]))
    assert blob == Path(os.path.realpath(files["m-Q4_K_M.gguf"]))

    assert store.remove_model(b) == 0
    assert blob.is_file() and files["m-Q4_K_M.gguf"].is_file() and not files["m-Q8_0.gguf"].exists()
    assert [m.name for m in store.list_models()] == ["o/r:Q4_K_M"]

    assert store.remove_model(a) == 400
    assert store.list_models() == []
    assert not (home / "hf" / "hub" / "models--o--r").exists()  # nothing of the repository is left


def test_rm_of_a_model_in_the_store_folder(home):
    gguf = store.model_dir("local:q4_0") / "model.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"q" * 123)
    entry = store.register("local:q4_0", "local", "q4_0", gguf)
    assert store.list_models()[0].file == str(gguf)
    assert store.remove_model(entry) == 123
    assert not gguf.parent.exists()


def test_a_damaged_manifest_hides_only_its_entry(home):
    files = cached(home, "o/r", {"m-Q4_0.gguf": b"z"})
    store.register("o/r:Q4_0", "hf:o/r@main", "Q4_0", files["m-Q4_0.gguf"])
    broken = store.models_dir() / "broken" / "manifest.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    assert [m.name for m in store.list_models()] == ["o/r:Q4_0"]
