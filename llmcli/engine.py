"""The generation loop: a session owns a model, its tokenizer and one KV cache, and yields small records.

Prefill and decode are separate steps. The cache is allocated once per session and reused: a new
prompt that starts with tokens already in the cache (the earlier turns of a chat) only prefills
what is new.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import HParams, Model, load_model
from llmcli.sampling import Sampler, SamplingConfig
from llmcli.template import ChatTemplate
from llmcli.tokenizer import Tokenizer
from quant.errors import LlmError, ModelFileError, PromptError
from quant.gguf_file import GGUFFile, read_gguf

DEFAULT_CTX_CAP = 4096
PREFILL_CHUNK = 512  # tokens per batched prefill pass: bounds the activation memory of long prompts


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate; defaults live here and in SamplingConfig."""

    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise LlmError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if any(s == "" for s in self.stop):
            raise LlmError("--stop needs a non-empty string")


@dataclass
class GenerationResponse:
    """One step of a generation: a piece of text, and on the last step a finish reason and timings."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop", "length" or "interrupted" on the last record
    prompt_tokens: int = 0  # prompt length
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from the cache)
    generation_tokens: int = 0
    ttft_s: float = 0.0  # prompt given -> first token sampled
    prompt_tps: float = 0.0
    generation_tps: float = 0.0


@dataclass
class LoadedModel:
    gguf: GGUFFile
    hparams: HParams
    model: Model
    tokenizer: Tokenizer
    template: ChatTemplate
    load_s: float


def load(path: Path, backend: str | None = None, threads: int | None = None,
         template: Path | None = None) -> LoadedModel:
    """Open a GGUF file and load it on a backend, with its tokenizer and chat template."""
    t0 = time.perf_counter()
    gguf = read_gguf(path)
    model = load_model(gguf, backend, threads)
    tok = Tokenizer.from_gguf(gguf)
    tmpl = ChatTemplate.from_gguf(gguf, override=template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    return LoadedModel(gguf, model.hparams, model, tok, tmpl, time.perf_counter() - t0)


def encode_chat(session: Session, messages: list[dict]) -> list[int]:
    """Messages -> prompt ids via the chat template (the template adds BOS itself where the model wants it)."""
    lm = session.lm
    return lm.tokenizer.encode(lm.template.render(messages, add_generation_prompt=True), add_special=False)


def context_size(hp: HParams, ctx: int | None) -> int:
    """--ctx, or the model's context length capped at DEFAULT_CTX_CAP."""
    if ctx is None:
        return min(hp.n_ctx_train, DEFAULT_CTX_CAP)
    if ctx < 8:
        raise LlmError(f"--ctx must be at least 8, got {ctx}")
    return ctx


class StopMatcher:
    """Holds back text that could still turn into a stop string, so stop strings are never printed."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending = list(stops), ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0  # longest tail of pending that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@contextmanager
def _broken_model_math():
    """NaN or infinite weights can leave a softmax with nothing to normalise by; the numba kernels then raise
    ZeroDivisionError. That is a broken file, said in one line like non-finite logits."""
    try:
        yield
    except ZeroDivisionError:
        raise ModelFileError("the model's computation broke down (a division by zero on non-finite values): "
                             "its weights or parameters are broken") from None


class Session:
    """A model with one KV cache, for one conversation or a stream of prompts."""

    def __init__(self, lm: LoadedModel, ctx: int | None = None):
        self.lm = lm
        self.n_ctx = context_size(lm.hparams, ctx)
        self.cache = lm.model.new_cache(self.n_ctx)
        self.tokens: list[int] = []  # exactly what the cache holds, position by position
        self.reused = 0  # prompt tokens the last prefill found in the cache

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def _sync_cache(self, prompt: Sequence[int]) -> int:
        """Keep the longest cached prefix of `prompt` (at least one token is left to run); return its length."""
        n = 0
        for a, b in zip(self.tokens, prompt, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        self.cache.trim(len(self.tokens) - n)
        n = self.cache.offset  # a rotating cache may have to drop more than asked
        del self.tokens[n:]
        return n

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Run the part of `prompt` not already cached; return the logits of its last token."""
        if not prompt:
            raise PromptError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise PromptError(f"the prompt has {len(prompt)} tokens, the context holds {self.n_ctx} "
                              f"(raise --ctx or shorten the prompt)")
        n_vocab = self.lm.hparams.n_vocab
        if min(prompt) < 0 or max(prompt) >= n_vocab:
            # a tokenizer vocabulary larger than the embedding table spells ids the model has no row for
            bad = next(t for t in prompt if not 0 <= t < n_vocab)
            raise PromptError(f"the prompt has token id {bad}, outside the model's {n_vocab}-row embedding table "
                              f"(the file's vocabulary and weights disagree)")
        start = self._sync_cache(prompt)
        self.reused = start
        logits = None
        for i in range(start, len(prompt), PREFILL_CHUNK):
            chunk = list(prompt[i:i + PREFILL_CHUNK])
            with _broken_model_math():
                logits = self.lm.model.forward(np.asarray(chunk, dtype=np.int32), self.cache)
            self.tokens.extend(chunk)
        return logits

    def _decode(self, logits: np.ndarray, sampler: Sampler, history: list[int], n: int) -> Iterator[int]:
        """Sample up to `n` tokens, each fed back through the model. Every token yielded but the last is
        in the cache (self.tokens tracks it); the caller appends each token to `history` before asking for
        the next. A backend with `decode_stream` (MLX) pipelines the steps asynchronously."""
        token = sampler(logits, history)
        yield token
        stream = getattr(self.lm.model, "decode_stream", None)
        if stream is not None:
            with closing(stream(token, self.cache, lambda x: sampler(x, history), n - 1)) as steps:
                for nxt in steps:
                    self.tokens.append(token)
                    token = nxt
                    yield token
            return
        for _ in range(n - 1):
            with _broken_model_math():
                logits = self.lm.model.forward(np.asarray([token], dtype=np.int32), self.cache)
            self.tokens.append(token)
            token = sampler(logits, history)
            yield token

    def generate(self, prompt: Sequence[int], config: GenerationConfig | None = None) -> Iterator[GenerationResponse]:
        """Yield text pieces as they are decoded; the last record carries the finish reason and timings."""
        config = config or GenerationConfig()
        sampler = Sampler(config.sampling)
        tok = self.lm.tokenizer
        detok, stops = tok.stream(), StopMatcher(config.stop)
        t0 = time.perf_counter()
        history = list(prompt)
        n_gen, finish, t_first = 0, None, None
        try:
            logits = self.prefill(prompt)
            t_first = time.perf_counter()
            budget = min(config.max_tokens, self.n_ctx - len(self.tokens))
            with closing(self._decode(logits, sampler, history, budget)) as tokens:
                for token in tokens:
                    n_gen += 1
                    history.append(token)
                    if token in tok.stop_ids:
                        finish = "stop"
                        break
                    # an id past the tokenizer's vocabulary (a table padded beyond it) has no text
                    text, stopped = stops.feed(detok.add(token) if token < tok.vocab_size else "")
                    if text:
                        yield GenerationResponse(text, token)
                    if stopped:
                        finish = "stop"
                        break
                else:
                    finish = "length"
        except KeyboardInterrupt:
            finish = "interrupted"
        if finish != "stop":
            # text held back for a possible stop string (or a partial character) is real output
            tail = stops.feed(detok.flush())[0] + stops.flush()
        else:
            tail = ""
        t_end = time.perf_counter()
        t_first = t_first or t_end
        n_prefilled = len(prompt) - self.reused
        decode_n = max(n_gen - 1, 0)  # the first token comes from the prefill
        yield GenerationResponse(
            tail, None, finish,
            prompt_tokens=len(prompt), prefilled_tokens=n_prefilled, generation_tokens=n_gen,
            ttft_s=t_first - t0,
            prompt_tps=n_prefilled / max(t_first - t0, 1e-9),
            generation_tps=decode_n / (t_end - t_first) if decode_n and t_end > t_first else 0.0,
        )
