"""`llm pull`: models from the Hugging Face Hub, kept in its standard cache and named in the store.

The Hub client (`huggingface_hub`) lists repositories, resolves revisions, reads file metadata and lays
out the cache (`$HF_HOME/hub/models--org--name/{blobs,snapshots,refs}`); `HF_HOME`, `HF_TOKEN`,
`HF_ENDPOINT` and `HF_HUB_OFFLINE` mean what they mean for every other Hub tool. Only the transfer of
a blob is ours: huggingface_hub 2.x deletes a partial file when a download fails, and a pull of a
4 GB model must survive Ctrl-C and a dropped connection. Partial blobs live next to the finished
ones as `blobs/<etag>.incomplete` and the next pull continues them with an HTTP Range request.

GGUF repositories: one model is picked by its quant tag (a split set `-0000k-of-0000n` counts as one
model and is merged into one file, since the engine reads single files). Safetensors repositories:
only what conversion needs is fetched, never pickles or other formats.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmcli import store
from llmcli.store import StoredModel
from quant.errors import LlmError, ModelFileError, ModelNotFoundError

# without a tag, the first of these the repository has wins; then the smallest file
GGUF_PREFERENCE = ("Q4_K_M", "Q4_0")
# a safetensors repository: these names, `*.safetensors`, and nothing else (no .bin/.pt/.pth/.onnx)
CONVERSION_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
})
DOWNLOAD_ATTEMPTS = 3  # per blob and pull, counted only while no byte arrives
RETRY_DELAY_S = 0.5

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# ggml type names as they appear in file names: Q4_K_M, IQ2_XXS, TQ1_0, Q8_0, BF16, F16, MXFP4, ...
_QUANT = re.compile(r"(?<![A-Za-z0-9])((?:I|T)?Q\d+(?:_[A-Za-z0-9]+)*|BF16|F16|F32|FP16|FP32|MXFP4)"
                    r"(?![A-Za-z0-9])", re.IGNORECASE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")


class HubError(LlmError):
    """The Hub refused or failed a request."""


class NetworkError(HubError):
    """The Hub could not be reached, or a transfer broke off."""


class AuthRequiredError(HubError):
    """The repository is gated or private and no valid token was sent."""


class DiskFullError(LlmError):
    """No room left for a download or a merge."""


class PullInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pull; the message says what was kept."""


@dataclass(frozen=True)
class PullSpec:
    """What `llm pull` was asked for."""

    repo_id: str
    tag: str | None = None  # a quant tag: REPO:Q4_K_M
    file: str | None = None  # --file: exactly this GGUF
    revision: str = "main"
    convert: bool = False  # a safetensors repository is wanted (for `llm pull -q`): refuse a GGUF one


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repository root
    size: int | None


@dataclass(frozen=True)
class GGUFChoice:
    """One model of a GGUF repository: a single file, or every part of a split set in order."""

    name: str
    tag: str | None
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: what it holds, and whether it was read from the local cache only."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]
    offline: bool


# ---------------------------------------------------------------- names and choices (no network)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'org/name:Q4_K_M' -> ('org/name', 'Q4_K_M'); an hf.co/ or huggingface.co/ prefix is dropped."""
    for prefix in _HUB_PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix):]
            break
    repo_id, _, tag = ref.strip("/").partition(":")
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(f"'{ref}' is not a Hugging Face repository (expected ORG/NAME[:QUANT], "
                                 f"e.g. bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M)")
    return repo_id, (tag or None)


def quant_tag(filename: str) -> str | None:
    """The ggml quant tag a file name carries ('SmolLM2-Q4_K_M.gguf' -> 'Q4_K_M'); the last one wins."""
    stem = _SPLIT.sub(r"\g<stem>.gguf", Path(filename).name)
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


def gguf_choices(files: tuple[RemoteFile, ...] | list[RemoteFile]) -> list[GGUFChoice]:
    """The GGUF models among `files`; a split set is one choice, and only when all its parts are there."""
    singles, splits = [], {}
    for f in files:
        if not f.path.lower().endswith(".gguf"):
            continue
        m = _SPLIT.match(f.path)
        if m is None:
            singles.append(GGUFChoice(f.path, quant_tag(f.path), (f,)))
        else:
            splits.setdefault((m["stem"], int(m["count"])), {})[int(m["no"])] = f
    for (stem, count), parts in splits.items():
        if sorted(parts) == list(range(1, count + 1)):
            name = f"{stem}-*-of-{count:05d}.gguf"
            ordered = tuple(parts[i] for i in sorted(parts))
            singles.append(GGUFChoice(name, quant_tag(stem + ".gguf"), ordered))
    return sorted(singles, key=lambda c: c.name)


def choose_gguf(repo_id: str, choices: list[GGUFChoice], tag: str | None, file: str | None) -> GGUFChoice:
    """Pick one model: `file` exactly, else the one whose name carries `tag`, else by GGUF_PREFERENCE."""
    listing = ", ".join(c.name for c in choices)
    if file is not None:
        for c in choices:
            if file in (c.name, *(f.path for f in c.files)):
                return c
        raise ModelNotFoundError(f"file '{file}' not found in {repo_id}; GGUF files there: {listing}")
    if tag is not None:
        hits = [c for c in choices if c.tag == tag.upper()]
        if not hits:  # tags outside the ggml names ('UD-Q4_K_XL', 'imat'): a whole word of the file name
            word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9])", re.IGNORECASE)
            hits = [c for c in choices if word.search(c.name)]
        if not hits:
            tags = ", ".join(sorted({c.tag for c in choices if c.tag})) or "none"
            raise ModelNotFoundError(f"no GGUF file in {repo_id} carries the tag '{tag}'; tags there: {tags} "
                                     f"(files: {listing})")
        return _one(repo_id, hits, f"tag '{tag}'")
    for preferred in GGUF_PREFERENCE:
        hits = [c for c in choices if c.tag == preferred]
        if hits:
            return _one(repo_id, hits, f"tag '{preferred}'")
    smallest = min(c.size for c in choices)
    return _one(repo_id, [c for c in choices if c.size == smallest], "the smallest size")


def _one(repo_id: str, hits: list[GGUFChoice], what: str) -> GGUFChoice:
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(c.name for c in hits)
    raise LlmError(f"{len(hits)} GGUF files in {repo_id} match {what}: {names}; pick one with --file NAME")


def conversion_files(files: tuple[RemoteFile, ...] | list[RemoteFile]) -> list[RemoteFile]:
    """What converting a safetensors repository needs: top-level config, tokenizer and weights only."""
    return [f for f in files if "/" not in f.path
            and (f.path in CONVERSION_FILES or f.path.endswith(".safetensors"))]


def model_name(repo_id: str, choice: GGUFChoice) -> str:
    """The store name of a pulled GGUF: REPO:TAG (the file's stem when its name has no quant tag)."""
    if choice.tag:
        return f"{repo_id}:{choice.tag}"
    stem = _SPLIT.sub(r"\g<stem>", choice.files[0].path)
    return f"{repo_id}:{Path(stem).stem}"


# ---------------------------------------------------------------- the cache


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache(repo_id: str) -> Path:
    """The cache folder of a model repository: $HF_HUB_CACHE/models--org--name."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(repo_id: str, revision: str = "main") -> Path:
    """The cached snapshot of `repo_id` at `revision` (a branch, tag or commit), without any network."""
    folder = repo_cache(repo_id)
    commit = _cached_commit(folder, revision)
    if commit is None or not (folder / "snapshots" / commit).is_dir():
        raise ModelNotFoundError(f"{repo_id}@{revision} is not in the Hugging Face cache ({folder}); "
                                 f"run `llm pull {repo_id}` first")
    return folder / "snapshots" / commit


def _cached_commit(folder: Path, revision: str) -> str | None:
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = folder / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = repo_cache(repo_id) / "refs" / revision
    if not ref.is_file() or ref.read_text().strip() != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


# ---------------------------------------------------------------- listing


def snapshot(spec: PullSpec) -> Snapshot:
    """The repository's files at `spec.revision`: from the Hub, or from the cache when HF_HUB_OFFLINE=1."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return _cached_snapshot(spec)
    info = HfApi().model_info(spec.repo_id, revision=spec.revision, files_metadata=True)
    if not info.sha:
        raise HubError(f"{constants.ENDPOINT} did not say which commit {spec.revision} of {spec.repo_id} is; "
                       f"is HF_ENDPOINT a Hugging Face Hub?")
    files = tuple(RemoteFile(s.rfilename, s.size) for s in info.siblings or [])
    return Snapshot(spec.repo_id, spec.revision, info.sha, files, offline=False)


def _cached_snapshot(spec: PullSpec) -> Snapshot:
    try:
        folder = snapshot_dir(spec.repo_id, spec.revision)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"offline (HF_HUB_OFFLINE is set) and {spec.repo_id}@{spec.revision} is "
                                 f"not in the Hugging Face cache ({hub_cache()}); unset HF_HUB_OFFLINE to "
                                 f"download it") from None
    files = tuple(RemoteFile(p.relative_to(folder).as_posix(), p.stat().st_size)
                  for p in sorted(folder.rglob("*")) if p.is_file())
    return Snapshot(spec.repo_id, spec.revision, folder.name, files, offline=True)


# ---------------------------------------------------------------- fetching one file


def fetch(snap: Snapshot, file: RemoteFile, progress: Any = None) -> Path:
    """The file's path in the cache snapshot; downloaded (or a partial download continued) if needed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import WeakFileLock

    cached = try_to_load_from_cache(snap.repo_id, file.path, revision=snap.commit)
    if isinstance(cached, str):
        _write_ref(snap.repo_id, snap.revision, snap.commit)
        return Path(cached)
    if snap.offline:
        raise ModelFileError(f"{file.path} of {snap.repo_id} is not in the cache (offline)")
    url = hf_hub_url(snap.repo_id, file.path, revision=snap.commit)
    meta = get_hf_file_metadata(url)
    blob = repo_cache(snap.repo_id) / "blobs" / meta.etag
    # the client's own lock for this blob: two pulls never append to one partial file
    lock = hub_cache() / ".locks" / repo_cache(snap.repo_id).name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.exists():
            # a redirect to a CDN carries its own signature: the token goes to the Hub's host only
            send_token = urlsplit(meta.location).netloc == urlsplit(url).netloc
            _download_blob(meta.location, blob, meta.size, meta.etag, file.path, progress, send_token)
    # the blob is in place: the client only links it into the snapshot (no transfer)
    path = hf_hub_download(snap.repo_id, file.path, revision=snap.commit)
    _write_ref(snap.repo_id, snap.revision, snap.commit)
    return Path(path)


def missing_bytes(snap: Snapshot, files: list[RemoteFile]) -> int:
    """Bytes still to download for `files` (partial downloads count what they lack)."""
    from huggingface_hub import try_to_load_from_cache

    total = 0
    for f in files:
        if isinstance(try_to_load_from_cache(snap.repo_id, f.path, revision=snap.commit), str):
            continue
        total += f.size or 0
    partial = sum(p.stat().st_size for p in (repo_cache(snap.repo_id) / "blobs").glob("*.incomplete"))
    return max(total - partial, 0)


def check_free_space(need: int, where: Path) -> None:
    """Raise DiskFullError when the file system holding `where` has less than `need` bytes free."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DiskFullError(f"not enough disk space: the pull needs {human_size(need)} more, "
                            f"{human_size(free)} free on {probe} (free some space, or set HF_HOME to a "
                            f"bigger disk)")


def _download_blob(url: str, blob: Path, size: int | None, etag: str, label: str, progress: Any,
                   send_token: bool = True) -> None:
    """Stream `url` into blob.incomplete, continuing what is there; checked, then renamed to `blob`."""
    part = blob.with_name(blob.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file: not ours to continue
    hasher = _content_hasher(etag)
    have = _hash_existing(part, hasher)
    task = progress.add_task(label, total=size, completed=have) if progress is not None else None
    failures = 0
    try:
        while True:
            start = have
            try:
                have, hasher = _stream(url, part, have, hasher, progress, task, send_token)
                break
            except _transport_errors() as e:
                hasher = _content_hasher(etag)  # what the file holds now, whatever the broken GET did
                have = _hash_existing(part, hasher)
                failures = 0 if have > start else failures + 1
                if failures >= DOWNLOAD_ATTEMPTS:
                    raise NetworkError(f"download of {label} broke off ({_reason(e)}); "
                                       f"{human_size(have)} of {human_size(size)} kept: run the same "
                                       f"`llm pull` again to resume") from None
                time.sleep(RETRY_DELAY_S * (failures + 1))
    except KeyboardInterrupt:
        kept = part.stat().st_size if part.exists() else 0
        raise PullInterrupted(f"interrupted: {human_size(kept)} of {label} kept in {part.parent}; "
                              f"run the same `llm pull` again to resume") from None
    if size is not None and have != size:
        raise NetworkError(f"download of {label} ended at {have} bytes of {size}; run `llm pull` again "
                           f"to resume")
    if hasher is not None and hasher.hexdigest() != etag:
        part.unlink()
        raise HubError(f"download of {label} is corrupt (checksum differs from the Hub's {etag[:12]}…); "
                       f"it was deleted: run `llm pull` again")
    os.replace(part, blob)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection refused, reset or cut short, timeouts: worth another Range request."""
    import httpx2

    return (httpx2.TransportError,)


def _stream(url: str, part: Path, have: int, hasher: Any, progress: Any, task: Any,
            send_token: bool) -> tuple[int, Any]:
    """One GET from byte `have` on; returns the new length and the hasher (reset if the server restarted)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=None if send_token else False)
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                              follow_redirects=True) as r:
        restart = have and (r.status_code == 416 or (r.is_success and r.status_code != 206))
        if restart:  # the partial is stale (416), or the server ignored the Range (200)
            have, hasher = 0, (hashlib.new(hasher.name) if hasher is not None else None)
            part.unlink(missing_ok=True)
            if progress is not None:
                progress.update(task, completed=0)
            if r.status_code == 416:
                return _stream(url, part, 0, hasher, progress, task, send_token)
        hf_raise_for_status(r)
        # unbuffered: what is on disk is what arrived (a partial holds exactly `have` bytes)
        with open(part, "ab", buffering=0) as f:
            for chunk in r.iter_bytes():
                view = memoryview(chunk)
                while view:  # a raw write may take less than all
                    view = view[f.write(view):]
                have += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                if progress is not None:
                    progress.advance(task, len(chunk))
    return have, hasher


def _content_hasher(etag: str) -> Any:
    """LFS blobs are named by their sha256; anything else is not checked here (git ids hash a header)."""
    return hashlib.sha256() if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def _hash_existing(part: Path, hasher: Any) -> int:
    """Feed what a partial download holds to the hasher; returns its length."""
    if not part.exists():
        return 0
    size = part.stat().st_size
    if hasher is not None:
        with open(part, "rb") as f:
            left = size
            while left and (chunk := f.read(min(left, 1 << 22))):
                hasher.update(chunk)
                left -= len(chunk)
    return size


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


# ---------------------------------------------------------------- pull


def pull(spec: PullSpec, progress: Any = None) -> StoredModel:
    """Fetch what `spec` names into the Hugging Face cache and record it in the store.

    `progress` is a rich.progress.Progress (or None): one task per file transferred.
    """
    with hub_errors(spec.repo_id, spec.revision):
        snap = snapshot(spec)
        choices = gguf_choices(snap.files)
        if choices and spec.convert:
            raise LlmError(f"{spec.repo_id} holds GGUF files, not safetensors: -q converts safetensors "
                           f"repositories; pick a GGUF with {spec.repo_id}:QUANT instead")
        if choices or spec.file or spec.tag:
            if not choices:
                listing = ", ".join(f.path for f in snap.files) or "none"
                what = f"file '{spec.file}'" if spec.file else "GGUF file"
                raise ModelNotFoundError(f"{what} not found in {spec.repo_id}: it has no GGUF files "
                                         f"(files: {listing})")
            return _pull_gguf(snap, choose_gguf(spec.repo_id, choices, spec.tag, spec.file), progress)
        files = conversion_files(snap.files)
        if not any(f.path.endswith(".safetensors") for f in files):
            listing = ", ".join(f.path for f in snap.files) or "none"
            raise ModelNotFoundError(f"{spec.repo_id} has neither GGUF nor safetensors weights "
                                     f"(files: {listing})")
        return _pull_safetensors(snap, files, progress)


def _source(snap: Snapshot) -> str:
    return f"hf:{snap.repo_id}@{snap.revision}"


def _pull_gguf(snap: Snapshot, choice: GGUFChoice, progress: Any) -> StoredModel:
    name = model_name(snap.repo_id, choice)
    files = list(choice.files)
    check_free_space(missing_bytes(snap, files), hub_cache())
    paths = [fetch(snap, f, progress) for f in files]
    if len(paths) == 1:
        return store.register(name, _source(snap), gguf_type(paths[0]), paths[0])
    merged = store.model_dir(name) / "model.gguf"
    known = store.find_model(name)
    if known is None or known.parts != [str(p) for p in paths] or not merged.is_file():
        check_free_space(choice.size, store.models_dir())
        merge_split_gguf(paths, merged)
    return store.register(name, _source(snap), gguf_type(merged), merged, parts=paths)


def _pull_safetensors(snap: Snapshot, files: list[RemoteFile], progress: Any) -> StoredModel:
    check_free_space(missing_bytes(snap, files), hub_cache())
    paths = [fetch(snap, f, progress) for f in files]
    folder = repo_cache(snap.repo_id) / "snapshots" / snap.commit
    name = f"{snap.repo_id}:{store.SAFETENSORS}"
    return store.register(name, _source(snap), store.SAFETENSORS, folder, parts=paths)


def gguf_type(path: Path) -> str:
    """What a GGUF holds, from its metadata (general.file_type, else its most common weight type)."""
    from collections import Counter

    from gguf import LlamaFileType

    from quant.gguf_file import read_gguf

    gguf = read_gguf(path, check_types=False)
    file_type = gguf.get("general.file_type")
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        counts = Counter(t.qtype.name for t in gguf.tensors.values() if len(t.shape) == 2)
        return counts.most_common(1)[0][0] if counts else "unknown"


# ---------------------------------------------------------------- split GGUF


def merge_split_gguf(parts: list[Path], out: Path) -> Path:
    """Join a llama.cpp split set into one GGUF: the first part's metadata (less split.*), every tensor."""
    import numpy as np
    from gguf import GGUFReader

    readers = [GGUFReader(p) for p in parts]
    first = readers[0]
    count = _field(first, "split.count")
    if count != len(parts):
        raise ModelFileError(f"{parts[0]}: split set of {count} parts, {len(parts)} given")
    for i, r in enumerate(readers):
        if _field(r, "split.no") != i:
            raise ModelFileError(f"{parts[i]}: is not part {i + 1} of its split set")
    tensors = [t for r in readers for t in r.tensors]
    expected = _field(first, "split.tensors.count")
    if expected is not None and expected != len(tensors):
        raise ModelFileError(f"{parts[0]}: split set declares {expected} tensors, "
                             f"its parts hold {len(tensors)}")
    align = _field(first, "general.alignment") or 32
    fields = [f for name, f in first.fields.items() if not name.startswith(("GGUF.", "split."))]

    def pad(n: int) -> int:
        return -n % align

    header = bytearray(b"GGUF")
    header += np.array([3], "<u4").tobytes() + np.array([len(tensors), len(fields)], "<u8").tobytes()
    for f in fields:
        header += b"".join(p.tobytes() for p in f.parts)
    offset = 0
    for t in tensors:
        name = t.name.encode()
        dims = np.asarray(t.shape, dtype="<u8")
        header += np.array([len(name)], "<u8").tobytes() + name
        header += np.array([len(dims)], "<u4").tobytes() + dims.tobytes()
        header += np.array([int(t.tensor_type)], "<u4").tobytes() + np.array([offset], "<u8").tobytes()
        offset += t.n_bytes + pad(t.n_bytes)
    header += bytes(pad(len(header)))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for reader in readers:
                for t in reader.tensors:
                    f.write(memoryview(reader.data[t.data_offset:t.data_offset + t.n_bytes]))
                    f.write(bytes(pad(t.n_bytes)))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


# ---------------------------------------------------------------- errors


@contextmanager
def hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """Turn the Hub client's and the OS's exceptions into one clear LlmError line each."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise AuthRequiredError(f"{repo_id} is gated: authentication required; accept its terms on the Hub, "
                                f"then set HF_TOKEN to a token of yours (or run `hf auth login`)") from None
    except RepositoryNotFoundError as e:
        hint = (" — or it is private: set HF_TOKEN to a token with access" if _status(e) == 401 else "")
        raise ModelNotFoundError(f"repository {repo_id} not found on {constants.ENDPOINT}{hint}") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision '{revision}' not found in {repo_id}") from None
    except RemoteEntryNotFoundError as e:
        raise ModelNotFoundError(f"a file of {repo_id} is gone from the Hub ({_reason(e)}); "
                                 f"pull again") from None
    except HFValidationError as e:
        raise ModelNotFoundError(f"'{repo_id}' is not a valid repository id: {_reason(e)}") from None
    except HfHubHTTPError as e:
        status = _status(e)
        if status == 401:
            raise AuthRequiredError(f"{repo_id}: authentication required (HTTP 401); set HF_TOKEN to a valid "
                                    f"token") from None
        raise HubError(f"the Hub answered HTTP {status} for {repo_id}; retry later "
                       f"(`llm pull` resumes partial downloads)") from None
    except httpx2.TransportError as e:
        cached = _cached_commit(repo_cache(repo_id), revision) is not None
        hint = "; or use the cached copy: HF_HUB_OFFLINE=1 llm pull ..." if cached else ""
        raise NetworkError(f"cannot reach the Hub at {constants.ENDPOINT} ({_reason(e)}): check the network "
                           f"(or HF_ENDPOINT) and retry{hint}") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full writing {e.filename or hub_cache()}: free some space (or set "
                                f"HF_HOME to a bigger disk) and pull again; partial downloads are "
                                f"kept") from None
        raise


def _status(e: Any) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)
