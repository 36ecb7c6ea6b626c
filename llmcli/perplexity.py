"""Perplexity of a model on a text, and how far a quantized model's predictions drift from a base model's.

As llama-perplexity does: the text is tokenized once and cut into windows of `ctx` tokens; each window
runs from an empty cache (its first token replaced by BOS when the model adds one), and only the
second half is scored, so every scored token has at least ctx/2 tokens of context.

With a base model, each scored position also gets KL(base || model) over the whole vocabulary, and
whether both models' most likely token agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backends import default_kv_type
from quant.errors import LlmError


@dataclass
class PerplexityResult:
    ppl: float
    n_tokens: int  # tokens scored
    n_chunks: int
    ctx: int
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agree: float | None = None  # fraction of positions where argmax(model) == argmax(base)

    def to_json(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, n_vocab) float32 -> float64 log-probabilities."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None) -> list[np.ndarray]:
    """The evaluation windows: consecutive `ctx`-token slices (at most `chunks`), BOS first if given."""
    if ctx < 16:
        raise LlmError(f"--ctx must be at least 16, got {ctx}")
    if chunks is not None and chunks < 1:
        raise LlmError(f"--chunks must be at least 1, got {chunks}")
    n = len(tokens) // ctx
    if n == 0:
        raise LlmError(f"the text has {len(tokens)} tokens; a {ctx}-token window needs at least {ctx} "
                       f"(use a longer text or a smaller --ctx)")
    n = min(n, chunks) if chunks else n
    out = []
    for c in range(n):
        w = np.asarray(tokens[c * ctx:(c + 1) * ctx], dtype=np.int32)
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def _tokenize(tok, text: str, needed: int | None) -> list[int]:
    """Token ids of `text`, or of a prefix long enough for the first `needed` ids (a long text is not
    tokenized whole to score a few windows). A margin of tokens past the cut keeps the ids before it exact."""
    if needed is None:
        return tok.encode(text, add_special=False)
    chars = needed * 8
    while True:
        ids = tok.encode(text[:chars], add_special=False)
        if chars >= len(text):
            return ids
        if len(ids) >= needed + 64:
            return ids[:needed]
        chars *= 2


def _load(path: Path, backend: str | None, threads: int | None):
    from backends import load_model
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gguf = read_gguf(path)
    return load_model(gguf, backend, threads), Tokenizer.from_gguf(gguf)


def perplexity(model: Path, text: str, ctx: int = 512, chunks: int | None = None, base: Path | None = None,
               backend: str | None = None, threads: int | None = None,
               on_chunk: Callable[[int, int], None] | None = None, kv_type: str | None = None) -> PerplexityResult:
    """Perplexity of `model` (a GGUF path) on `text` with its KV cache stored as kv_type (None: the backend's
    default); with `base`, KL divergence against it (whose cache is f32: the reference, so that `base` = `model`
    measures what the cache type costs). `on_chunk(done, total)` is called after each window."""
    lm, tok = _load(model, backend, threads)
    base_lm = None
    if base is not None:
        base_lm, base_tok = _load(base, backend, threads)
        if base_tok.tokens != tok.tokens:
            raise LlmError(f"{base} and {model} have different vocabularies; KL divergence needs the same one")
    tokens = _tokenize(tok, text, ctx * chunks if chunks else None)
    wins = windows(tokens, ctx, chunks, tok.bos_id if tok.add_bos else None)
    first = ctx // 2
    nll, n_scored = 0.0, 0
    klds: list[np.ndarray] = []
    agree = 0
    cache = lm.new_cache(ctx, kv_type or default_kv_type(lm.name))
    base_cache = base_lm.new_cache(ctx, "f32") if base_lm is not None else None
    for i, w in enumerate(wins):
        cache.reset()
        logp = log_softmax(lm.forward(w, cache, all_logits=True)[first:ctx - 1])  # (ctx - 1 - first, n_vocab)
        targets = w[first + 1:ctx]
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        n_scored += len(targets)
        if base_lm is not None:
            base_cache.reset()
            base_logp = log_softmax(base_lm.forward(w, base_cache, all_logits=True)[first:ctx - 1])
            klds.append((np.exp(base_logp) * (base_logp - logp)).sum(axis=-1))
            agree += int((base_logp.argmax(axis=-1) == logp.argmax(axis=-1)).sum())
        if on_chunk is not None:
            on_chunk(i + 1, len(wins))
    result = PerplexityResult(ppl=float(np.exp(nll / n_scored)), n_tokens=n_scored, n_chunks=len(wins), ctx=ctx)
    if klds:
        kl = np.concatenate(klds)
        result.kld_mean = float(kl.mean())
        result.kld_p99 = float(np.percentile(kl, 99))
        result.top1_agree = agree / n_scored
    return result
