"""Sampling: a chain of pure filters (logits -> logits) and one draw.

Order as in llama.cpp: penalties, top-k, top-p, min-p, temperature, draw. A removed token has
logit -inf. Temperature 0 means greedy (argmax after penalties).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from quant.errors import LlmError

Filter = Callable[[np.ndarray], np.ndarray]


class SamplingError(LlmError):
    """A sampling option is out of range, or the model gave logits nothing can be drawn from."""


@dataclass(frozen=True)
class SamplingConfig:
    """Every sampling default lives here (the CLI passes None for 'not given')."""

    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None or -1: a random seed

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise SamplingError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.seed is not None and self.seed < -1:
            raise SamplingError(f"--seed must be -1 (random) or a number >= 0, got {self.seed}")
        if self.temperature < 0:
            raise SamplingError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise SamplingError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise SamplingError(f"--repeat-last-n must be >= 0, got {self.repeat_last_n}")

    @classmethod
    def from_options(cls, **options) -> SamplingConfig:
        """Build from CLI options, ignoring those left at None."""
        return cls(**{k: v for k, v in options.items() if v is not None})


def apply_penalties(logits: np.ndarray, history: Sequence[int], cfg: SamplingConfig) -> np.ndarray:
    """Repeat penalty (llama.cpp style: divide positive logits, multiply negative ones) and OpenAI-style
    frequency/presence penalties, over the last `repeat_last_n` tokens."""
    if not history or cfg.repeat_last_n == 0 or (
        cfg.repeat_penalty == 1.0 and cfg.frequency_penalty == 0.0 and cfg.presence_penalty == 0.0
    ):
        return logits
    ids, counts = np.unique(np.asarray(history[-cfg.repeat_last_n:], dtype=np.int64), return_counts=True)
    inside = (ids >= 0) & (ids < logits.size)  # a prompt id the output layer has no row for has no logit
    ids, counts = ids[inside], counts[inside]
    out = logits.copy()
    seen = out[ids]
    seen = np.where(seen > 0, seen / cfg.repeat_penalty, seen * cfg.repeat_penalty)
    out[ids] = seen - counts * cfg.frequency_penalty - cfg.presence_penalty
    return out


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - np.max(logits))
    return e / e.sum()


def top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability adds up to at least p."""
    if p >= 1.0:
        return logits
    live = np.flatnonzero(np.isfinite(logits))  # after top-k only k tokens are left to sort
    probs = softmax(logits[live])
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = live[order[: int(np.searchsorted(cum, p) + 1)]]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least p times that of the most likely token."""
    if p <= 0.0:
        return logits
    threshold = np.max(logits) + np.log(p)
    return np.where(logits >= threshold, logits, -np.inf)


def make_filters(cfg: SamplingConfig) -> list[Filter]:
    return [
        lambda x: top_k(x, cfg.top_k),
        lambda x: top_p(x, cfg.top_p),
        lambda x: min_p(x, cfg.min_p),
    ]


class Sampler:
    """Draws the next token from logits and the token history. Same seed, same tokens."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(None if cfg.seed == -1 else cfg.seed)
        self.filters = make_filters(cfg)

    @property
    def greedy(self) -> bool:
        return self.cfg.temperature == 0.0

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if not np.isfinite(logits).all():
            # as llama.cpp: a NaN or +inf logit is not a choice; nothing finite left means the model is broken
            logits = np.where(np.isfinite(logits), logits, np.float32(-np.inf))
            if not np.isfinite(logits).any():
                raise SamplingError("the model produced no finite logits (NaN or infinity): its weights or "
                                    "parameters are broken")
        return apply_penalties(logits, history, self.cfg)

    def probabilities(self, logits: np.ndarray, history: Sequence[int], allowed: np.ndarray | None = None
                      ) -> np.ndarray:
        """The distribution __call__ draws from, over the whole vocabulary: (n_vocab,) float64, zero where a
        filter removed the token; one-hot at the argmax when greedy. Speculative sampling compares these."""
        logits = self._penalized(logits, history)
        probs = np.zeros(logits.size, dtype=np.float64)
        if self.greedy:
            probs[self._argmax(logits, allowed)] = 1.0
            return probs
        ids, p = self._survivors(logits, allowed)
        probs[ids] = p
        return probs

    def draw(self, weights: np.ndarray) -> int:
        """A token drawn with probability proportional to `weights` (n_vocab,), >= 0 with a positive sum."""
        live = np.flatnonzero(weights > 0)
        return self._pick(live, weights[live])

    def __call__(self, logits: np.ndarray, history: Sequence[int], allowed: np.ndarray | None = None) -> int:
        """The next token; `allowed` (n_vocab,) bool: only these may be drawn (an output format's mask)."""
        logits = self._penalized(logits, history)
        if self.cfg.temperature == 0.0:
            return self._argmax(logits, allowed)
        return self._pick(*self._survivors(logits, allowed))

    @staticmethod
    def _argmax(logits: np.ndarray, allowed: np.ndarray | None) -> int:
        if allowed is None:
            return int(np.argmax(logits))
        ids = np.flatnonzero(allowed)
        return int(ids[np.argmax(logits[ids])])

    def _survivors(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The token ids top-k and the filters leave, and their probabilities (float64, summing to 1)."""
        ids = None  # the vocabulary ids of `logits` when it holds only some of them
        if allowed is not None:
            # few allowed: work on them alone (partitioning many equal -inf is slow); most: mask the others
            if 4 * np.count_nonzero(allowed) < allowed.size:
                ids = np.flatnonzero(allowed)
                logits = logits[ids]
            else:
                logits = np.where(allowed, logits, np.float32(-np.inf))
        if 0 < self.cfg.top_k < logits.size:  # one pass over the vocabulary; the rest works on ~k tokens
            keep = np.flatnonzero(logits >= np.partition(logits, -self.cfg.top_k)[-self.cfg.top_k])
            ids = keep if ids is None else ids[keep]
            logits = logits[keep]
        for f in self.filters:
            logits = f(logits)
        live = np.flatnonzero(np.isfinite(logits))
        if live.size == 0:
            raise SamplingError("no token is left to sample (the penalties removed every candidate)")
        return (live if ids is None else ids[live]), softmax(logits[live].astype(np.float64) / self.cfg.temperature)

    def _pick(self, ids: np.ndarray, weights: np.ndarray) -> int:
        """One of `ids`, drawn with probability proportional to `weights`."""
        cdf = np.cumsum(weights)
        return int(ids[min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), ids.size - 1)])
