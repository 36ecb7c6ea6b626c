"""The list of backends. Each is imported lazily so `llm --help` never pays for a JIT or a GPU framework."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys

from backends.base import HParams, KVCache, Model, read_hparams
from quant.errors import BackendError
from quant.gguf_file import GGUFFile

BACKENDS = ("numba", "mlx", "numpy")

__all__ = ["BACKENDS", "DEFAULT_KV_TYPES", "HParams", "KVCache", "Model", "default_backend", "default_kv_type",
           "load_model", "physical_cores", "read_hparams"]

# The KV cache's storage type when --kv-type is not given, per backend: f16 where it costs no speed. numba: decode
# and prefill as fast as f32 at a short context and ~2x faster at 4096 (benchmarks/RESULTS.md, "KV cache types");
# numpy stays the exact reference; MLX keeps its compute dtype (float32 on the CPU build, where converting the
# cache each step would cost; float16 on a GPU anyway).
DEFAULT_KV_TYPES = {"numba": "f16", "mlx": "f32", "numpy": "f32"}


def mlx_available() -> bool:
    return importlib.util.find_spec("mlx") is not None


def default_kv_type(backend: str | None = None) -> str:
    """The KV cache type of `backend` (default: default_backend()) when none is chosen."""
    return DEFAULT_KV_TYPES.get(backend or default_backend(), "f32")


def default_backend() -> str:
    """mlx on Apple Silicon when importable, numba elsewhere."""
    if platform.system() == "Darwin" and platform.machine() == "arm64" and mlx_available():
        return "mlx"
    return "numba"


def physical_cores(sysfs: str = "/sys/devices") -> int:
    """The default thread count: the physical cores this process may run on; on a hybrid CPU only the
    performance cores, where the OS says which they are (Linux: sysfs cpu_core/cpus; macOS: hw.perflevel0)."""
    cores = _cores() or os.cpu_count() or 1
    performance = _performance_cores(sysfs)
    if performance:
        cores = min(cores, performance)
    if hasattr(os, "sched_getaffinity"):  # a process limited to some CPUs (taskset, a container)
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores)


def _cores() -> int | None:
    """Physical cores: on Linux the distinct sibling lists of the logical CPUs, read as psutil reads them (its
    import costs ~20 ms of `llm run`'s start); elsewhere, or where sysfs does not say, psutil's count."""
    if sys.platform.startswith("linux"):
        from glob import glob

        lists = set()
        for path in (glob("/sys/devices/system/cpu/cpu[0-9]*/topology/core_cpus_list")
                     or glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list")):
            try:
                with open(path, "rb") as f:
                    lists.add(f.read().strip())
            except OSError:
                lists.clear()
                break
        if lists:
            return len(lists)
    import psutil

    return psutil.cpu_count(logical=False)


def _performance_cores(sysfs: str) -> int:
    """Physical performance cores of a hybrid CPU, or 0 where the OS does not tell."""
    from pathlib import Path

    try:
        if platform.system() == "Darwin":
            import ctypes

            value, size = ctypes.c_int(0), ctypes.c_size_t(4)
            libc = ctypes.CDLL(None)
            ok = libc.sysctlbyname(b"hw.perflevel0.physicalcpu", ctypes.byref(value), ctypes.byref(size), None, 0)
            return value.value if ok == 0 else 0
        cpus = Path(sysfs, "cpu_core", "cpus")  # Intel hybrid: the P-cores' logical CPUs, e.g. "0-15"
        if not cpus.exists():
            return 0
        logical = []
        for part in cpus.read_text().strip().split(","):
            lo, _, hi = part.partition("-")
            logical += range(int(lo), int(hi or lo) + 1)
        siblings = Path(sysfs, "system", "cpu", f"cpu{logical[0]}", "topology", "thread_siblings_list")
        per_core = len(siblings.read_text().replace("-", ",").split(",")) if siblings.exists() else 1
        return len(logical) // max(1, per_core)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def _import_backend(backend: str):
    """The backend's module. numba's import checks scipy's version by importing scipy (~15 ms of `llm run`'s
    start, for a package our kernels never call), so numba is imported with scipy marked not importable, as if
    it were absent; numba imports scipy itself later where it needs it (jitted np.dot, np.linalg)."""
    if backend == "numba" and "numba" not in sys.modules and "scipy" not in sys.modules:
        sys.modules["scipy"] = None
        try:
            import numba  # noqa: F401
        finally:
            if "scipy" in sys.modules and sys.modules["scipy"] is None:
                del sys.modules["scipy"]
    return importlib.import_module(f"backends.{backend}")


def load_model(gguf: GGUFFile, backend: str | None = None, threads: int | None = None, options=None) -> Model:
    """Load the weights of `gguf` on `backend` (default: default_backend()); `options`, the backend's tuning
    options (backends.numba.NumbaOptions), default its defaults."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if threads is not None and threads < 1:
        raise BackendError(f"--threads must be at least 1, got {threads}")
    hp = read_hparams(gguf)
    if backend == "mlx" and not mlx_available():
        raise BackendError("backend 'mlx' needs MLX: pip install 'llmcli[mlx]'")
    threads = threads or physical_cores()
    # --threads bounds BLAS too (numpy matmuls, prefill tiles); idle spinning BLAS threads cost decode speed
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")
    module = _import_backend(backend)
    return module.load(gguf, hp, threads) if options is None else module.load(gguf, hp, threads, options)
