"""Numba's `njit` and `prange`, with the compiled-kernel cache in a folder named after our kernels' sources.

Numba checks a cached function against its own file only, not against the files of the functions it calls:
after an edit (or an upgrade) of quant/kernels.py, the decode stack in backends/numba/layers.py would keep
running the old inlined kernels from its cache. So every jitted module of this package imports `njit` from
here, which first points numba's cache at <user cache>/llmcli/numba/<hash of the shared kernel sources>.
A user's NUMBA_CACHE_DIR is left alone.

Each version of the sources gets a new folder, so old ones are pruned: every start marks its folder as used
(its modification time), and the first start of a new version removes the folders not used for
PRUNE_AFTER_DAYS (another install of llm on the same account keeps its folder while it is used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numba
from numba import njit, prange

__all__ = ["njit", "prange"]

# Modules whose jitted functions are called from other files (a function's own file numba checks itself).
_SHARED = ("jit.py", "kernels.py", "simd.py", "gemm.py", "quantize.py", "kv_kernels.py")
PRUNE_AFTER_DAYS = 30


def _sources_hash() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for name in _SHARED:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def use_cache_dir(folder: Path, now: float | None = None) -> None:
    """Mark `folder` used; when it is new, remove its siblings unused for PRUNE_AFTER_DAYS. Never raises: a
    cache that cannot be tidied only costs disk."""
    now = time.time() if now is None else now
    try:
        if folder.is_dir():
            os.utime(folder, (now, now))
            return
        folder.mkdir(parents=True)
        for old in folder.parent.iterdir():
            if old != folder and old.is_dir() and old.stat().st_mtime < now - PRUNE_AFTER_DAYS * 86400:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


if not os.environ.get("NUMBA_CACHE_DIR"):
    _folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcli" / "numba" / _sources_hash()
    use_cache_dir(_folder)
    numba.config.CACHE_DIR = str(_folder)
