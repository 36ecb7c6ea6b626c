"""Speculative decoding: draft a few tokens cheaply, verify them all in one forward pass of the model.

A drafter proposes tokens after the text so far: prompt lookup copies what followed an earlier occurrence of the
last few tokens (prompt + output); a draft model (a small model with the same vocabulary) decodes them itself.
The model then runs the pending token and the drafts in one pass (all_logits), and `accept` walks the drafts in
order: greedy keeps a draft while it is the model's own argmax; sampling keeps draft x with probability
min(1, p(x) / q(x)) and on a rejection draws from norm(max(0, p - q)) (Leviathan et al. 2023), where p is the
distribution the sampler would draw from at that position (its filters and penalties over the history up to
there) and q the drafter's (one-hot at x for prompt lookup). The tokens kept thus follow p exactly; only the
random stream differs from plain decoding, so a seed gives other (equally likely) text with speculation on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from quant.errors import FieldError, LlmError

if TYPE_CHECKING:
    from llmcli.engine import Generation, LoadedModel, Session

MAX_DRAFT = 32  # most tokens drafted per step: a rotating cache keeps this many positions past its window


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a session drafts; defaults live here. lookup > 0: prompt lookup of up to `lookup` tokens per step; with
    a draft model given to the session, it proposes up to `draft_max` tokens per step."""

    lookup: int = 0  # 0 = off
    draft_max: int = 8
    ngram_max: int = 3  # prompt lookup matches the last ngram_max tokens, then fewer, down to one

    def __post_init__(self):
        if not 0 <= self.lookup <= MAX_DRAFT:
            raise FieldError("lookup", f"must be in 0..{MAX_DRAFT}, got {self.lookup}")
        if not 1 <= self.draft_max <= MAX_DRAFT:
            raise FieldError("draft_max", f"must be in 1..{MAX_DRAFT}, got {self.draft_max}")
        if self.ngram_max < 1:
            raise FieldError("ngram_max", f"must be at least 1, got {self.ngram_max}")


def lookup_draft(history: list[int], k: int, ngram_max: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens of `history` (n from
    ngram_max down to 1); [] when even the last token never occurred before. A shorter match is weaker evidence
    that a copy is under way: below ngram_max it drafts at most 4^(n-1) tokens (1 after one token, 4 after two).
    (A draft nothing accepts costs a verification pass that grows with its length; benchmarks/RESULTS.md.)"""
    arr = np.asarray(history, dtype=np.int64)
    for n in range(min(ngram_max, len(arr) - 1), 0, -1):
        windows = sliding_window_view(arr[:-1], n)  # every n-gram that ends before the last token
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + (k if n == ngram_max else min(k, 4 ** (n - 1)))].tolist()
    return []


class DraftLength:
    """How many tokens to draft next, per generation. From 2, it climbs the ladder 1, 2, 3, 7, 15, ... (up to
    n_max) while whole drafts are kept, and steps down on a miss: a draft kept not at all, or a step that made
    tokens slower than plain steps do (timed as the generation goes: a verification pass costs more than one
    token's step, by how much depends on the backend and the machine). Past 3 the ladder keeps k + 1, the tokens
    a verification runs, a power of two: the numba kernels take 4 tokens per pass over the weights and 8 per
    call, so 4 drafts (5 tokens) cost nearly as much as 7 (benchmarks/RESULTS.md). After two misses in a row it
    stops drafting for a stretch of steps (8, doubling with each stretch up to 128); after a stretch one more miss
    starts the next, so text nothing predicts decodes at nearly plain speed. A whole draft kept ends the pauses.

    Growing stops where it stops paying: each length's tokens per second are timed on its wholly kept drafts, and a
    whole draft kept moves one rung down when that length was measured faster, else one rung up unless that one was
    measured slower. Verifying costs more per token as drafts grow on the numba backend, so on a copying task the
    best length is often 2-7, not the most that lookup finds (benchmarks/RESULTS.md)."""

    def __init__(self, n_max: int):
        self.ladder = [k for k in _LADDER if k <= n_max] or [n_max]
        self.n = min(2, n_max)  # start small: a long draft nothing predicts costs the most
        self.misses, self.pause, self.pause_len = 0, 0, 8
        self.plain_s: float | None = None  # seconds of a plain step (running average)
        self.rate: dict[int, float] = {}  # draft length -> tokens/s of its wholly kept steps (running average)

    def plain_step(self, seconds: float) -> None:
        self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds

    def next(self, room: int) -> int:
        """Tokens to draft now, at most `room`; 0 while paused."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        return max(0, min(self.n, room))

    def update(self, drafted: int, kept: int, seconds: float) -> None:
        """After a speculative step that kept `kept` of `drafted` tokens (and made kept + 1) in `seconds`."""
        slower = self.plain_s is not None and seconds > (kept + 1) * self.plain_s
        if kept == drafted and seconds > 0:  # what a step of this length costs (not how much of it is kept)
            rate, old = (kept + 1) / seconds, self.rate.get(self.n)
            self.rate[self.n] = rate if old is None else 0.7 * old + 0.3 * rate
        if kept == drafted and not slower:
            self.misses, self.pause_len = 0, 8
            here, up, down = self.rate.get(self.n, 0.0), self._step(1), self._step(-1)
            if down != self.n and self.rate.get(down, 0.0) > here:
                self.n = down
            elif self.rate.get(up, here) >= here:
                self.n = up
        elif kept == 0 or slower:
            self.n, self.misses = self._step(-1), self.misses + 1
            if self.misses >= 2:
                self.pause, self.pause_len, self.misses = self.pause_len, min(128, 2 * self.pause_len), 1
        else:
            self.misses = 0

    def _step(self, by: int) -> int:
        """The length `by` rungs up (or down) the ladder from the current one, at its ends the end."""
        i = self.ladder.index(self.n) + by
        return self.ladder[min(max(i, 0), len(self.ladder) - 1)]


_LADDER = (1, 2, 3) + tuple(2**j - 1 for j in range(3, 16))


class PromptLookup:
    """Drafts by prompt lookup; q is one-hot (None) for every token."""

    def __init__(self, n_max: int, ngram_max: int):
        self.n_max, self.ngram_max = n_max, ngram_max

    def propose(self, gen: Generation, k: int) -> tuple[list[int], list[np.ndarray | None]]:
        drafts = lookup_draft(gen.history, k, self.ngram_max)
        return drafts, [None] * len(drafts)


class DraftModel:
    """Drafts with a small model in a session of its own (its own KV cache): each step it first runs what the
    text gained since its last proposal, after dropping the drafts the model rejected."""

    def __init__(self, session: Session, n_max: int):
        self.session, self.n_max = session, n_max

    def propose(self, gen: Generation, k: int) -> tuple[list[int], list[np.ndarray | None]]:
        """k tokens decoded by the draft model: its argmax when greedy, else drawn from its own distribution q
        under the same sampler (filters, penalties, logit bias), which q returns for `accept`."""
        s = self.session
        logits = s.prefill(gen.history)
        history = list(gen.history)
        drafts: list[int] = []
        qs: list[np.ndarray | None] = []
        constraint = gen.constraint.copy() if gen.constraint is not None else None  # an output format, drafted on
        for i in range(k):
            q = gen.distribution(logits, history, constraint)
            token = int(np.argmax(q)) if gen.sampler.greedy else gen.sampler.draw(q)
            drafts.append(token)
            qs.append(None if gen.sampler.greedy else q)
            history.append(token)
            if i + 1 == k or token in gen.tokenizer.stop_ids:
                break
            if constraint is not None:
                constraint.take(token)
                if constraint.finished:
                    break
            logits = s.feed(token)
        return drafts, qs


def acceptance_line(drafted: int, accepted: int) -> str:
    """The acceptance rate of a generation, for --verbose and /stats."""
    rate = f"{100 * accepted / drafted:.0f}%" if drafted else "-"
    return f"speculative: {accepted} of {drafted} drafted tokens accepted ({rate})"


def check_vocab(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft model must spell every token id as the model does (the same tokenizer vocabulary and rows)."""
    a, b = target.tokenizer, draft.tokenizer
    if target.hparams.n_vocab != draft.hparams.n_vocab or a.tokens != b.tokens:
        first = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)) if x != y), None)
        where = (f"token {first} is {a.tokens[first]!r} in one and {b.tokens[first]!r} in the other"
                 if first is not None else
                 f"{a.vocab_size} vs {b.vocab_size} tokens, {target.hparams.n_vocab} vs {draft.hparams.n_vocab} "
                 f"embedding rows")
        raise LlmError(f"the draft model {draft.gguf.path.name} does not share the model's vocabulary ({where})")


def accept(gen: Generation, logits: np.ndarray, draft: int, q: np.ndarray | None) -> tuple[int, bool]:
    """Verify one draft token against the model's `logits` at its position (gen.history ends just before it):
    -> (token to take, whether it is the draft). On a rejection the token comes from the residual distribution,
    so that either way it is distributed as the sampler's p."""
    p = gen.distribution(logits, gen.history)
    if gen.sampler.greedy:
        best = int(np.argmax(p))
        return best, best == draft
    u = gen.sampler.rng.random()
    if q is None:  # a deterministic draft: q is one-hot at `draft`
        if u < p[draft]:
            return draft, True
        residual = p.copy()
        residual[draft] = 0.0
    else:
        if u * q[draft] < p[draft]:
            return draft, True
        residual = np.maximum(p - q, 0.0)
    if not residual.sum() > 0.0:  # p == q up to rounding: rejection was a rounding artefact; p is exact
        residual = p
    return gen.sampler.draw(residual), False
