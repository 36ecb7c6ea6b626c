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

Numba also parses, for every library it loads from the cache, the LLVM module that later compilations link
against, and keeps it: 17 MB for the decode stack, and the peak of a process that never compiles. Ours parse it
when a compilation first links against them (`_LazyLinking`), and take the symbols they define from their object
code's symbol table instead.

Numba's runtime (reference counts, array allocation) has a few helper functions in LLVM IR that numba compiles in
every process: ~25 ms, and that first compilation pulls ~27 MB of LLVM's own code into memory, a process that only
loads cached kernels needs nothing else of. Their machine code is cached beside the kernels (`_start_runtime`).

Each version of the sources gets a new folder, so old ones are pruned: every start marks its folder as used
(its modification time), and the first start of a new version removes the folders not used for
PRUNE_AFTER_DAYS (another install of llm on the same account keeps its folder while it is used).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import llvmlite
import numba
from numba import prange
from numba.core.dispatcher import Dispatcher
from numba.core.runtime import nrtdynmod, rtsys

from quant.files import write_atomic

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
    _lazy_linking(target_context.codegen())
    _start_runtime(target_context)
    with cache._guard_against_spurious_io_errors():
        return cache._load_overload(sig, target_context)
    return None  # the guard swallowed an I/O error: numba compiles instead


def _start_runtime(context) -> None:
    """rtsys.initialize, with the runtime's compiled helpers loaded from the cache folder (see the module's
    docstring), where this numba has the internals that takes."""
    if getattr(rtsys, "_init", True) or not hasattr(nrtdynmod, "create_nrt_module") or not numba.config.CACHE_DIR:
        rtsys.initialize(context)
        return
    compile_nrt = nrtdynmod.compile_nrt_functions
    nrtdynmod.compile_nrt_functions = _cached_runtime  # what rtsys.initialize calls, by the module's name
    try:
        rtsys.initialize(context)
    finally:
        nrtdynmod.compile_nrt_functions = compile_nrt


def _cached_runtime(context):
    """numba's compile_nrt_functions, its result kept as object code in a file of the cache folder named after
    what the code depends on (numba's IR, LLVM, the CPU): the library loaded from there when it exists and reads
    back, else compiled (and the file written whole; a cache that cannot be written only costs time)."""
    codegen = context.codegen()
    key = repr((numba.__version__, llvmlite.__version__, codegen.magic_tuple()))
    path = Path(numba.config.CACHE_DIR) / f"runtime-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"
    try:
        state = _runtime_state(path.read_bytes())
        if state is not None:
            return codegen.unserialize_library(state)
    except (OSError, RuntimeError, ValueError):  # unreadable, or LLVM refused its bitcode: compile instead
        pass
    ir_module, library = nrtdynmod.create_nrt_module(context)
    library.enable_object_caching()
    library.add_ir_module(ir_module)
    library.finalize()
    name, _, (obj, bitcode) = library.serialize_using_object_code()
    try:
        write_atomic(path, b"".join(struct.pack("<Q", len(part)) + part for part in (name.encode(), obj, bitcode)))
    except OSError:
        pass
    return library


def _runtime_state(data: bytes) -> tuple | None:
    """(name, "object", (object code, bitcode)) from a runtime file's three length-prefixed parts, or None when
    they do not add up to the file."""
    parts, at = [], 0
    while at + 8 <= len(data) and len(parts) < 3:
        n, = struct.unpack_from("<Q", data, at)
        parts.append(data[at + 8:at + 8 + n])
        at += 8 + n
    if len(parts) != 3 or at != len(data) or not all(parts):
        return None
    return parts[0].decode("utf-8", errors="replace"), "object", (parts[1], parts[2])


def elf_defined_symbols(obj: bytes) -> set[str] | None:
    """The names of the functions and data an ELF64 little-endian object defines (what numba lists from a
    module's definitions), or None for any other object format, a malformed one or one without a symbol table."""
    try:
        if obj[:6] != b"\x7fELF\x02\x01":
            return None
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        entsize, count = struct.unpack_from("<HH", obj, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * entsize) for i in range(count)]
        names, tables = set(), 0
        for _, kind, _, _, off, size, link, _, _, sym_size in sections:
            if kind != 2 or sym_size < 16:  # SHT_SYMTAB
                continue
            tables += 1
            strings = sections[link][4]
            for at in range(off, off + size - sym_size + 1, sym_size):
                name, info, _, section = struct.unpack_from("<IBBH", obj, at)
                if name and section and (info & 0xF) in (1, 2):  # defined (not SHN_UNDEF) data or function
                    start = strings + name
                    names.add(obj[start:obj.index(b"\0", start)].decode())
        return names if tables else None
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        return None


def _lazy_linking(codegen) -> None:
    """Make codegen's libraries _LazyLinking ones (once), where this numba has the internals it relies on."""
    base = getattr(codegen, "_library_class", None)
    needed = ("_unserialize", "_get_module_for_linking", "_set_compiled_object", "enable_object_caching",
              "_finalize_final_module")
    if (base is None or issubclass(base, _LazyLinking) or not all(hasattr(base, n) for n in needed)
            or not isinstance(getattr(getattr(codegen, "_engine", None), "_defined_symbols", None), set)):
        return
    codegen._library_class = type(base.__name__, (_LazyLinking, base), {})


class _LazyLinking:
    """Mixed into numba's code library class: a library loaded from the cache keeps its linking module's
    bitcode and parses it when a compilation first links against it (see the module's docstring)."""

    @classmethod
    def _unserialize(cls, codegen, state):
        name, kind, data = state
        names = elf_defined_symbols(data[0]) if kind == "object" else None
        if names is None:
            return super()._unserialize(codegen, state)
        self = codegen.create_library(name)
        self.enable_object_caching()
        self._set_compiled_object(data[0])
        self._linking_bitcode = data[1]
        self._finalize_final_module()
        codegen._engine._defined_symbols |= names
        return self

    def _get_module_for_linking(self):
        bitcode = self.__dict__.pop("_linking_bitcode", None)
        if bitcode is not None:
            import llvmlite.binding as llvm

            self._shared_module = llvm.parse_bitcode(bitcode)
        return super()._get_module_for_linking()


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
