"""Read safetensors files as memory maps: a JSON header, then raw little-endian tensors.

Only the float types a checkpoint is shipped in are read; bfloat16 and float16 come back as their
uint16 bit patterns (numpy has no bfloat16), so nothing is converted until it is quantized.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant.errors import ModelFileError, UnsupportedError

# safetensors dtype -> (numpy view, our source kind)
_DTYPES = {"F32": (np.float32, "f32"), "F16": (np.uint16, "f16"), "BF16": (np.uint16, "bf16")}


@dataclass(frozen=True)
class SafeTensor:
    """One tensor: `data` is a read-only view of the file (float32, or uint16 bits for 'f16'/'bf16')."""

    name: str
    kind: str  # "f32" | "f16" | "bf16"
    shape: tuple[int, ...]
    data: np.ndarray


def read_safetensors(path: Path) -> dict[str, SafeTensor]:
    """Parse and validate one .safetensors file; tensors view one memory map."""
    size = path.stat().st_size
    if size < 8:
        raise ModelFileError(f"{path}: not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        if n_header > min(size - 8, 100 << 20):
            raise ModelFileError(f"{path}: not a safetensors file (header of {n_header} bytes)")
        try:
            header = json.loads(f.read(n_header))
        except ValueError as e:
            raise ModelFileError(f"{path}: corrupt safetensors header ({e})") from None
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n_header
    out: dict[str, SafeTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise UnsupportedError(f"{path}: tensor {name} has dtype {dtype} (supported: F32, F16, BF16)")
        np_type, kind = _DTYPES[dtype]
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
        n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_type).itemsize
        if end - start != n_bytes or base + end > size:
            raise ModelFileError(f"{path}: tensor {name} has a bad extent ({start}..{end}, file has {size} bytes)")
        out[name] = SafeTensor(name, kind, shape, mm[base + start:base + end].view(np_type).reshape(shape))
    return out
