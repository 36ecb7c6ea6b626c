"""The list of backends. Each is imported lazily so `llm --help` never pays for a JIT or a GPU framework."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform

from backends.base import HParams, KVCache, Model, read_hparams
from quant.errors import BackendError
from quant.gguf_file import GGUFFile

BACKENDS = ("numba", "mlx", "numpy")

__all__ = ["BACKENDS", "HParams", "KVCache", "Model", "default_backend", "load_model", "physical_cores",
           "read_hparams"]


def mlx_available() -> bool:
    return importlib.util.find_spec("mlx") is not None


def default_backend() -> str:
    """mlx on Apple Silicon when importable, numba elsewhere."""
    if platform.system() == "Darwin" and platform.machine() == "arm64" and mlx_available():
        return "mlx"
    return "numba"


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


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
    module = importlib.import_module(f"backends.{backend}")
    return module.load(gguf, hp, threads) if options is None else module.load(gguf, hp, threads, options)
