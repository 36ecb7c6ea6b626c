"""Numba's `njit` and `prange`, with the compiled-kernel cache in a folder named after our kernels' sources.

Numba checks a cached function against its own file only, not against the files of the functions it calls:
after an edit (or an upgrade) of quant/kernels.py, the decode stack in backends/numba/layers.py would keep
running the old inlined kernels from its cache. So the cache lives in
<user cache>/llmcli/numba/<hash of the shared kernel sources>. A user's NUMBA_CACHE_DIR is left alone.

Importing a jitted module does nothing to the disk: `njit(cache=True)` only marks the function, and
`use_kernel_cache()` (called by the numba backend's load and by the converter, before their first jitted
call) picks the folder and turns caching on for every marked function, and for those defined afterwards.
Numba binds a function's cache folder when caching is turned on, which is why it is done here and not by
setting numba.config.CACHE_DIR late.

Before loading a cached function, numba refreshes every registry of its compiler, which imports most of numba
(~0.1 s of a warm start), though only compiling needs them and numba's compiler refreshes them itself. Our cached
functions load without that refresh, starting only numba's runtime, which cached code needs (`_load_cached`).

Each version of the sources gets a new folder, so old ones are pruned: every start marks its folder as used
(its modification time), and the first start of a new version removes the folders not used for
PRUNE_AFTER_DAYS (another install of llm on the same account keeps its folder while it is used).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numba
from numba import prange
from numba.core.dispatcher import Dispatcher
from numba.core.runtime import rtsys

__all__ = ["njit", "prange", "use_kernel_cache"]

# Modules whose jitted functions are called from other files (a function's own file numba checks itself).
_SHARED = ("jit.py", "kernels.py", "kernels_lowbit.py", "kv_kernels.py", "simd.py", "simd_multi.py", "gemm.py",
           "quantize.py")
PRUNE_AFTER_DAYS = 30
SIMD_WIDTH_VAR = "LLMCLI_SIMD_WIDTH"  # "256": the several-token kernels of 256-bit vectors on any host (tests)


def _sources_hash() -> str:
    # and the vector width forced for tests (quant/simd_multi.py), which changes the code the kernels compile to
    h = hashlib.sha256((numba.__version__ + os.environ.get(SIMD_WIDTH_VAR, "")).encode())
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


def njit(func=None, /, *, cache: bool = False, **options):
    """numba.njit; with cache=True the function caches its machine code once `use_kernel_cache()` has run."""

    def decorate(f):
        dispatcher = numba.njit(**options)(f)
        if cache:
            if numba.config.CACHE_DIR:  # the folder is chosen (or the user's NUMBA_CACHE_DIR)
                _enable_caching(dispatcher)
            else:
                dispatcher._llm_cache_pending = True
        return dispatcher

    return decorate(func) if func is not None else decorate


def _enable_caching(dispatcher: Dispatcher) -> None:
    dispatcher.enable_caching()
    cache = dispatcher._cache
    # A numba whose cache lacks these internals keeps its own loading (slower start, same results).
    if hasattr(cache, "_load_overload") and hasattr(cache, "_guard_against_spurious_io_errors"):
        cache.load_overload = functools.partial(_load_cached, cache)


def _load_cached(cache, sig, target_context):
    """numba's Cache.load_overload without its `target_context.refresh()` (see the module's docstring), but with
    the one part of it that cached code needs: its runtime (array allocation) set up."""
    rtsys.initialize(target_context)
    with cache._guard_against_spurious_io_errors():
        return cache._load_overload(sig, target_context)
    return None  # the guard swallowed an I/O error: numba compiles instead


def kernel_cache_dir() -> Path:
    """The folder for this version of the kernels' sources."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llmcli" / "numba" / _sources_hash()


def use_kernel_cache() -> None:
    """Choose the cache folder (unless NUMBA_CACHE_DIR is set) and turn caching on for the jitted functions
    marked so far; call before their first call. Later calls only catch functions defined since."""
    if not numba.config.CACHE_DIR:
        folder = kernel_cache_dir()
        use_cache_dir(folder)
        numba.config.CACHE_DIR = str(folder)
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", None)
        if names is None or names.get("njit") is not njit:  # only a module that imported ours marks functions
            continue
        for value in list(names.values()):
            if isinstance(value, Dispatcher) and value.__dict__.pop("_llm_cache_pending", False):
                _enable_caching(value)
