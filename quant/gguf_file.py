"""Read a GGUF file: metadata decoded once, tensors as read-only views into one memory map.

`gguf.GGUFReader` builds a Python object for every element of every array field, which
takes about two seconds on a 49k-token vocabulary; this reader decodes the same header
in tens of milliseconds (the test suite checks it against GGUFReader).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from quant.errors import ModelFileError, UnsupportedError
from quant.formats import GGML_QUANT_SIZES, READABLE_TYPES, GGMLQuantizationType


class GGUFValueType(IntEnum):
    """The metadata value types of the GGUF format (the same ids as gguf-py's; see quant.formats for why a copy)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


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
        shown = safe_text(str(arch), 60)
        raise UnsupportedError(f"unsupported architecture '{shown}' (supported: {', '.join(SUPPORTED_ARCHS)})")


MAX_ARRAY_DEPTH = 4  # arrays of arrays this deep at most: a file cannot make the reader recurse without bound
MAX_ALIGNMENT = 1 << 16
# the fewest bytes one item of a kind can take: a count is checked against what the rest of the file can hold
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def truncated(self, needs: int) -> ModelFileError:
        return ModelFileError(f"{self.path}: truncated GGUF header (needs {needs} bytes, file has {len(self.buf)})")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise self.truncated(self.pos + n)
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def count(self, item_type: GGUFValueType, what: str) -> int:
        """An array's element count, refused when the rest of the file cannot hold that many elements."""
        n = self.scalar("<Q")
        size = np.dtype(_NUMPY[item_type]).itemsize if item_type in _NUMPY else _MIN_BYTES.get(item_type, 1)
        if n * size > self.left():
            raise ModelFileError(f"{self.path}: corrupt GGUF metadata: {what} claims {n} elements, more than the "
                                 f"{self.left()} bytes left in the file hold")
        return n

    def strings(self, count: int) -> StringArray:
        """`count` length-prefixed strings: a vocabulary and its merges (262k for Gemma 3), found by one tight
        loop and left in the file until they are read (StringArray)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        starts = [0] * count
        try:
            for i in range(count):
                starts[i] = pos
                pos += 8 + unpack(buf, pos)[0]  # raises once a length has taken pos past the end
        except (struct.error, OverflowError):
            pos = end + 1
        if pos > end:
            raise ModelFileError(f"{self.path}: truncated GGUF header (string array cut off)")
        self.pos = pos
        return StringArray(buf, starts, pos)

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelFileError(f"{self.path}: corrupt GGUF metadata: {what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        # ARRAY (value_type admits nothing else)
        if depth >= MAX_ARRAY_DEPTH:
            raise ModelFileError(f"{self.path}: corrupt GGUF metadata: {what} nests arrays more than "
                                 f"{MAX_ARRAY_DEPTH} deep")
        item_type = self.value_type(what)
        count = self.count(item_type, what)
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            values = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
            # a list for the sizes metadata has (a vocabulary's scores, token types); a huge one stays an array
            return values.tolist() if count <= _LIST_LIMIT else values
        if item_type == GGUFValueType.STRING:
            return self.strings(count)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


_LIST_LIMIT = 1 << 21


class StringArray(Sequence):
    """A metadata array of strings, kept as the file's bytes and decoded when read: a 49k-token vocabulary and
    its merges as Python strings take 8.3 MB, which a process that never tokenizes (a benchmark, `llm show`)
    need not hold, and a tokenizer built from them holds its own copy. Reads as a list of str (invalid UTF-8
    replaced) and compares equal to one."""

    def __init__(self, buf: memoryview, starts: list[int], end: int):
        """starts: the byte offset in buf of each string's 8-byte length prefix; end: where the last one ends."""
        self._buf, self._end = buf, end
        self._first = starts[0] if starts else end
        # offsets from the first, 4 bytes each where they fit (a vocabulary spans a few MB)
        span = end - self._first
        self._at = np.asarray(starts, dtype=np.int64) - self._first
        if span < 1 << 32:
            self._at = self._at.astype(np.uint32)

    def __len__(self) -> int:
        return len(self._at)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        a = self._first + int(self._at[i])  # IndexError past the end, as a list
        return str(self._buf[a + 8:a + 8 + int.from_bytes(self._buf[a:a + 8], "little")], "utf-8", "replace")

    def __iter__(self):
        return iter(self.decoded())

    def decoded(self) -> list[str]:
        """All the strings, decoded with one call (3x faster than one at a time): the text between length
        prefixes joined with NULs in place of the prefixes, decoded once and split. Text that is not UTF-8, or
        that holds a NUL itself, is decoded one string at a time instead."""
        if not len(self._at):
            return []
        text = np.frombuffer(self._buf, dtype=np.uint8, count=self._end - self._first, offset=self._first).copy()
        at = self._at.astype(np.int64)
        keep = np.ones(text.size, dtype=bool)
        for k in range(1, 8):  # a prefix's first byte becomes the NUL; its other 7 go
            keep[at + k] = False
        text[at] = 0
        try:
            pieces = text[keep][1:].tobytes().decode("utf-8").split("\x00")
        except UnicodeDecodeError:
            pieces = []
        return pieces if len(pieces) == len(self._at) else [self[i] for i in range(len(self))]

    def __eq__(self, other) -> bool:
        if not isinstance(other, (StringArray, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and self.decoded() == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


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
    if n_kv * _MIN_KV_BYTES > cur.left() or n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left():
        raise ModelFileError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys do not fit in "
                             f"{size} bytes)")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    for _ in range(n_kv):
        key = cur.string()
        shown = safe_text(key, 80)
        if key in metadata:
            raise ModelFileError(f"{path}: corrupt GGUF metadata: key {shown} appears twice")
        vtype = cur.value_type(f"key {shown}")
        sub = None
        if vtype == GGUFValueType.ARRAY:
            if cur.left() < 4:
                raise cur.truncated(cur.pos + 4)
            raw = struct.unpack_from("<I", cur.buf, cur.pos)[0]
            sub = GGUFValueType(raw) if raw in _KNOWN_TYPES else None
        types[key] = (vtype, sub)
        metadata[key] = cur.value(vtype, f"key {shown}")

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        shown = safe_text(name, 80)
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise ModelFileError(f"{path}: tensor {shown} has {n_dims} dimensions (1 to 4 are valid)")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        raw_type = cur.scalar("<I")
        offset = cur.scalar("<Q")
        infos.append((name, dims, raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or not 1 <= alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise ModelFileError(f"{path}: metadata general.alignment = {safe_text(repr(alignment), 60)} is not a "
                             f"power of two up to {MAX_ALIGNMENT}")
    data_start = (cur.pos + alignment - 1) // alignment * alignment

    tensors: dict[str, Tensor] = {}
    for name, dims, raw_type, offset in infos:
        shown = safe_text(name, 80)
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {shown} appears twice")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedError(f"{path}: tensor {shown} has unknown type id {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES or (check_types and qtype not in READABLE_TYPES):
            raise UnsupportedError(f"{path}: tensor {shown} has type {qtype.name}, which llm cannot read "
                                   f"(readable: {', '.join(sorted(t.name for t in READABLE_TYPES))})")
        if min(dims) < 1:
            raise ModelFileError(f"{path}: tensor {shown} has an empty dimension {dims}")
        shape = tuple(int(d) for d in reversed(dims))  # ggml lists the fastest dimension first
        block, tsize = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ModelFileError(f"{path}: tensor {shown} row length {shape[-1]} is not a multiple of {block}")
        rows = 1
        for d in shape[:-1]:
            rows *= d  # Python integers: a product past 2^63 is caught below, not wrapped
        n_bytes = rows * (shape[-1] // block) * tsize
        if offset % alignment:
            raise ModelFileError(f"{path}: tensor {shown} offset {offset} is not a multiple of the alignment "
                                 f"{alignment}")
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFileError(f"{path}: truncated: tensor {shown} ends at byte {start + n_bytes}, "
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


_KNOWN_TYPES = {int(t) for t in GGUFValueType}
