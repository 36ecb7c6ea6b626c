"""Numba's `njit` and `prange`, with the compiled-kernel cache in a folder named after our kernels' sources.

Numba checks a cached function against its own file only, not against the files of the functions it calls:
after an edit (or an upgrade) of quant/kernels.py, the decode stack in backends/numba/layers.py would keep
running the old inlined kernels from its cache. So every jitted module of this package imports `njit` from
here, which first points numba's cache at <user cache>/llmcli/numba/<hash of the shared kernel sources>.
A user's NUMBA_CACHE_DIR is left alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba import njit, prange

__all__ = ["njit", "prange"]

# Modules whose jitted functions are called from other files (a function's own file numba checks itself).
_SHARED = ("jit.py", "kernels.py", "simd.py")


def _sources_hash() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for name in _SHARED:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


if not os.environ.get("NUMBA_CACHE_DIR"):
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    numba.config.CACHE_DIR = str(base / "llmcli" / "numba" / _sources_hash())
