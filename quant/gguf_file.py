"""Read a GGUF file: metadata decoded once, tensors as read-only views into one memory map.

`gguf.GGUFReader` builds a Python object for every element of every array field, which
takes about two seconds on a 49k-token vocabulary; this reader decodes the same header
in tens of milliseconds (the test suite checks it against GGUFReader) and shares its
constants with the `gguf` package.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quant.errors import ModelFileError, UnsupportedError
from quant.formats import READABLE_TYPES

GGUF_MAGIC = b"GGUF"
# the families in quant/families (which imports this module)
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.FLOAT64: np.float64,
    GGUFValueType.BOOL: np.bool_,
}


@dataclass(frozen=True)
class Tensor:
    """One tensor: `shape` in numpy order (rows, cols); `data` is the raw bytes as stored
    (uint8 (rows, row_bytes) for block formats, float32/float16 for float types)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


def check_arch(arch: str | None) -> None:
    """Refuse, in one line, an architecture the engine does not run."""
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})")


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF header (needs {self.pos + n} bytes, file has "
                                 f"{len(self.buf)})")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings: the vocabulary and merges, so this loop is kept tight."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > end:
                break
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        if len(out) < count:
            raise ModelFileError(f"{self.path}: truncated GGUF header (string array cut off)")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype}")


@dataclass
class GGUFFile:
    """A parsed GGUF file. `metadata` maps keys to Python values; tensors view the memory map."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, Tensor]
    file_size: int
    # key -> (value type, element type for arrays): what a rewrite needs to store each value as it was
    types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # Typed reads: a value from the file is data, so each is checked before anything sizes a buffer or bounds a
    # loop with it. A value of the wrong type or out of range is one ModelFileError naming the file and the key.

    def _bad(self, key: str, value: Any, want: str) -> ModelFileError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return ModelFileError(f"{self.path}: metadata {key} = {safe_text(shown)} is not {want}")

    def get_int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        """An integer in [lo, hi]; `default` when absent (ModelFileError when absent and no default)."""
        value = self.metadata.get(key)
        if value is None:
            if default is None:
                raise ModelFileError(f"{self.path}: metadata key {key} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self._bad(key, value, "an integer")
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._bad(key, value, f"in {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
        return value

    def get_float(self, key: str, default: float | None = None, lo: float | None = None,
                  hi: float | None = None) -> float:
        """A finite number in [lo, hi] (integers are accepted); `default` when absent."""
        value = self.metadata.get(key)
        if value is None:
            if default is None:
                raise ModelFileError(f"{self.path}: metadata key {key} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._bad(key, value, "a number")
        value = float(value)
        if not np.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._bad(key, value, f"a finite number in {lo if lo is not None else '-inf'}.."
                                        f"{hi if hi is not None else 'inf'}")
        return value

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """A string; `default` (possibly None) when absent."""
        value = self.metadata.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.metadata.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "a boolean")
        return value


def safe_text(text: str, limit: int = 200) -> str:
    """File bytes fit for a one-line error message: control characters escaped, long text cut."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def read_gguf(path: str | os.PathLike, check_types: bool = True) -> GGUFFile:
    """Parse and validate a GGUF file. Raises ModelFileError / UnsupportedError with the reason."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    cur = _Cursor(memoryview(mm), path)
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelFileError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    try:
        for _ in range(n_kv):
            key = cur.string()
            vtype = GGUFValueType(cur.scalar("<I"))
            sub = GGUFValueType(struct.unpack_from("<I", cur.buf, cur.pos)[0]) if vtype == GGUFValueType.ARRAY else None
            types[key] = (vtype, sub)
            metadata[key] = cur.value(vtype)
    except ValueError as e:
        raise ModelFileError(f"{path}: corrupt GGUF metadata: {e}") from None

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 4:
            raise ModelFileError(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        raw_type = cur.scalar("<I")
        offset = cur.scalar("<Q")
        infos.append((name, dims, raw_type, offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment

    tensors: dict[str, Tensor] = {}
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedError(f"{path}: tensor {name} has unknown type id {raw_type}") from None
        if check_types and qtype not in READABLE_TYPES:
            raise UnsupportedError(f"{path}: tensor {name} has type {qtype.name}, which llm cannot read "
                                   f"(readable: {', '.join(sorted(t.name for t in READABLE_TYPES))})")
        shape = tuple(int(d) for d in reversed(dims))  # ggml lists the fastest dimension first
        block, tsize = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ModelFileError(f"{path}: tensor {name} row length {shape[-1]} is not a multiple of {block}")
        n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * tsize
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFileError(f"{path}: truncated: tensor {name} ends at byte {start + n_bytes}, "
                                 f"file has {size}")
        raw = mm[start:start + n_bytes]
        if qtype == GGMLQuantizationType.F32:
            data = raw.view(np.float32).reshape(shape)
        elif qtype == GGMLQuantizationType.F16:
            data = raw.view(np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // block * tsize)
        tensors[name] = Tensor(name, qtype, shape, data)
    return GGUFFile(path, version, metadata, tensors, size, types)
