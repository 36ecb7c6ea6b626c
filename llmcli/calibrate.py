"""Activation statistics for `llm quantize --optimize` (an importance matrix, as llama.cpp's imatrix).

The source model runs in float32 (the numpy reference backend) over a calibration text; for every
weight matrix W (n_rows, n_cols) we keep the mean over tokens of the squared input, E[x_j²] per input
column j. A weight W[i, j] adds W[i, j] * x_j to output i, so its rounding error costs about
E[x_j²] * err² in the output's squared error: the quantizer's block search weights its error by that.

Inputs: attn_q/k/v see the attention norm's output, attn_output the attention's output, ffn_gate/up
the FFN norm's output, ffn_down silu(gate) * up, the output matrix (token_embd when tied) the final
norm's output.

A Hugging Face source is first written as a pure F16 GGUF next to the output (deleted afterwards);
a GGUF source runs as it is.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from quant.convert import ConvertOptions, Source, write_gguf
from quant.errors import LlmError

CALIB_CTX = 512  # tokens per window (each from an empty cache)
CALIB_MAX_TOKENS = 2048  # tokens used at most: bounds the cost (4 windows)
CALIB_MIN_TOKENS = 128  # fewer says too little about the activations


def default_text() -> str:
    """The calibration text shipped with llm: varied prose, dialogue, code, lists and numbers."""
    return resources.files("llmcli").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def read_calibration(path: Path | str | None) -> str:
    """The user's calibration text (one clear error if it cannot be read), or the default one."""
    if path is None:
        return default_text()
    path = Path(path).expanduser()
    if not path.is_file():
        raise LlmError(f"--calibration {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmError(f"--calibration {path}: not UTF-8 text") from None
    except OSError as e:
        raise LlmError(f"--calibration {path}: cannot read it ({e.strerror or e})") from None


def check_length(text: str, where: str) -> None:
    """Refuse a text too short to hold CALIB_MIN_TOKENS tokens (a token spans at least one character), before
    any work is done; `calibration_windows` counts the tokens themselves."""
    if len(text.strip()) < CALIB_MIN_TOKENS:
        raise LlmError(f"the calibration text {where} has {len(text.strip())} characters; it needs at least "
                       f"{CALIB_MIN_TOKENS} tokens (a few paragraphs)")


def calibration_windows(ids: list[int], bos_id: int | None, where: str) -> list[np.ndarray]:
    """Up to CALIB_MAX_TOKENS // CALIB_CTX windows of CALIB_CTX tokens (BOS first if given), spread evenly
    over the text so that a long one is sampled from start to end."""
    if len(ids) < CALIB_MIN_TOKENS:
        raise LlmError(f"the calibration text {where} has {len(ids)} tokens; it needs at least {CALIB_MIN_TOKENS}")
    step = CALIB_CTX - (bos_id is not None)
    n = min(-(-len(ids) // step), CALIB_MAX_TOKENS // CALIB_CTX)
    starts = np.linspace(0, max(0, len(ids) - step), n).astype(int)
    head = [bos_id] if bos_id is not None else []
    return [np.asarray(head + ids[s:s + step], dtype=np.int32) for s in starts]


class ActivationStats:
    """Per weight matrix: the sum over tokens of the squared input per column, and the token count."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # name -> (n_cols,) float64
        self.counts: dict[str, int] = {}

    def add(self, name: str, h: np.ndarray) -> None:
        """h: (T, n_cols) float32, the rows multiplied by weight `name`."""
        sq = np.square(h).sum(axis=0, dtype=np.float64)
        if name in self.sums:
            self.sums[name] += sq
            self.counts[name] += h.shape[0]
        else:
            self.sums[name], self.counts[name] = sq, h.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        """name -> E[x_j²] (n_cols,) float64."""
        return {name: s / self.counts[name] for name, s in self.sums.items()}


def collect(gguf_path: Path, text: str, where: str = "",
            on_window: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run the model at `gguf_path` (float32, numpy) over `text`: {weight name: E[x_j²] per input column}.
    `on_window(done, total)` after each window."""
    from backends import read_hparams
    from backends.numpy import NumpyModel
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gguf = read_gguf(gguf_path)
    tok = Tokenizer.from_gguf(gguf)
    ids = tok.encode(text, add_special=False)
    wins = calibration_windows(ids, tok.bos_id if tok.add_bos else None, where)
    stats = ActivationStats()
    model = NumpyModel(gguf, read_hparams(gguf), keep_weights=len(wins) > 1 and _small(gguf), on_input=stats.add)
    cache = model.new_cache(CALIB_CTX)
    for i, w in enumerate(wins):
        cache.reset()
        model.forward(w, cache, all_logits=True)  # all positions reach the output matrix
        if on_window is not None:
            on_window(i + 1, len(wins))
    return stats.means()


def _small(gguf) -> bool:
    """Whether the float32 copy of every weight fits comfortably in memory (kept between windows)."""
    return sum(t.n_elements for t in gguf.tensors.values()) * 4 < 2 << 30


@contextlib.contextmanager
def float_gguf(source: Source, next_to: Path) -> Iterator[Path]:
    """A GGUF of `source` the numpy backend can run: the source file itself, or a temporary pure F16
    conversion next to `next_to` (removed on exit, also on error or Ctrl-C)."""
    if source.path is not None:
        yield source.path
        return
    from quant.formats import GGMLQuantizationType

    tmp = next_to.parent / f".{next_to.name}.calibration-{secrets.token_hex(4)}.gguf"
    try:
        write_gguf(source, ConvertOptions(qtype=GGMLQuantizationType.F16, pure=True), tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def importance(source: Source, text: str, next_to: Path, where: str = "",
               on_window: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Importance of each input column of each weight matrix of `source`, measured on `text`."""
    with float_gguf(source, next_to) as path:
        return collect(path, text, where, on_window)
