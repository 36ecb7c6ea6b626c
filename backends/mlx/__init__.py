"""The MLX backend (Apple GPUs; the CPU build on Linux): GGUF legacy quants repacked losslessly into
MLX's affine layout, everything else float16, one lazy graph per step.

Imported only when `--backend mlx` is chosen: backends/__init__.py checks that MLX is installed first.
"""

from __future__ import annotations

import mlx.core as mx

from backends.base import HParams
from backends.mlx.model import MlxModel
from quant.gguf_file import GGUFFile


def load(gguf: GGUFFile, hp: HParams, threads: int, dtype: mx.Dtype | None = None) -> MlxModel:
    """Load `gguf` into MLX. `threads` is ignored: MLX sizes its own CPU pool. `dtype` is the activations'
    type, default float32 on the CPU build and float16 on a GPU."""
    return MlxModel(gguf, hp, dtype)
