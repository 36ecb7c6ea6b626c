"""The generation loop: a session owns a model, its tokenizer and one KV cache, and yields small records.

Prefill and decode are separate steps. The cache is allocated once per session and reused: a new
prompt that starts with tokens already in the cache (the earlier turns of a chat) only prefills
what is new.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import HParams, KVCache, Model, default_kv_type, load_model
from llmcli.grammar import Constraint, Grammar, vocabulary_bytes
from llmcli.sampling import Sampler, SamplingConfig
from llmcli.speculative import DraftLength, DraftModel, PromptLookup, SpeculativeConfig, accept, check_vocab
from llmcli.template import ChatTemplate
from llmcli.tokenizer import Tokenizer
from quant.errors import FieldError, LlmError, ModelFileError, PromptError
from quant.gguf_file import GGUFFile, read_gguf

DEFAULT_CTX_CAP = 4096
MAX_CTX = 1 << 24  # positions: past any model's training context (a cache this long would take terabytes)
PREFILL_CHUNK = 512  # tokens per batched prefill pass: bounds the activation memory of long prompts
AHEAD_MOST = 64  # the most tokens a session runs ahead of its next prompt (Session.run_ahead)


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate; defaults live here and in SamplingConfig. Errors name these fields (FieldError): the
    CLI words them as its flags, the server as the request's JSON fields."""

    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before sampling
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely
    grammar: Grammar | None = None  # the output must follow it (llmcli/json_schema.py: JSON); None: free text

    def __post_init__(self):
        if self.max_tokens < 1:
            raise FieldError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if any(s == "" for s in self.stop):
            raise FieldError("stop", "needs a non-empty string")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise FieldError("top_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")


MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling filters), with the most likely
    alternatives at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens behind `text` (with config.logprobs)
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and how many of them the model kept
    accepted_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the text, on the last record


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


def encode_chat(session: Session, messages: list[dict], options: dict | None = None) -> list[int]:
    """Messages -> prompt ids via the chat template (the template adds BOS itself where the model wants it);
    `options`: more variables for the template."""
    lm = session.lm
    return lm.tokenizer.encode(lm.template.render(messages, add_generation_prompt=True, options=options),
                               add_special=False)


POOLINGS = ("mean", "cls", "last")  # how a text's token states make its embedding (llama.cpp's names)


def embedding_pooling(hp: HParams, wanted: str | None = None) -> str:
    """The pooling of this model's embeddings: `wanted` (the `pooling` field), else what the file says (an
    embedding model's GGUF names it: Qwen3-Embedding "last"), else "mean" (a chat model's states, averaged)."""
    if wanted is not None:
        if wanted not in POOLINGS:
            raise FieldError("pooling", f"must be one of {', '.join(POOLINGS)}, got {wanted!r}")
        return wanted
    if hp.pooling == "rank":
        raise LlmError("this model is a reranker (the file's pooling type is rank): it scores pairs, it does not "
                       "embed texts (choose a pooling to embed with its states anyway)")
    return hp.pooling or "mean"


def normalized(v: np.ndarray) -> np.ndarray:
    """v scaled to length 1 (as OpenAI's and ollama's embeddings are); zeros stay zeros."""
    norm = float(np.linalg.norm(v.astype(np.float64)))
    return (v / norm).astype(np.float32) if norm > 0 else v.astype(np.float32)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def next_turn_start(encode: Callable[[list[dict]], list[int]], messages: list[dict],
                    then: Callable[[str], dict] = lambda text: {"role": "user", "content": text}) -> list[int]:
    """The tokens a conversation's next prompt starts with: `messages` (ending with the reply as it will be sent
    back), then what the chat template writes before any next message `then(text)` (a user's; a tool's result),
    where two unlike probe messages agree (ChatML's `<|im_end|>\\n<|im_start|>user\\n`). encode: messages -> the
    prompt's tokens."""
    a, b = (encode(messages + [then(probe)]) for probe in ("A", "1"))
    return a[:common_prefix(a, b)]


def context_size(hp: HParams, ctx: int | None) -> int:
    """--ctx, or the model's context length capped at DEFAULT_CTX_CAP."""
    if ctx is None:
        return min(hp.n_ctx_train, DEFAULT_CTX_CAP)
    if not 8 <= ctx <= MAX_CTX:
        raise LlmError(f"--ctx must be in 8..{MAX_CTX}, got {ctx}")
    return ctx


def check_kv_memory(hp: HParams, n_ctx: int, kv_type: str, conversations: int = 1) -> None:
    """Refuse a KV cache larger than this machine's memory before allocating it: the allocation may succeed
    (memory is overcommitted) and fail only when the cache fills, or take the machine into swap."""
    from backends.base import kv_cache_bytes
    from quant.kvtypes import check_kv_type

    check_kv_type(kv_type, hp.head_dim)
    need = conversations * kv_cache_bytes(hp, n_ctx, kv_type=kv_type)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return  # a platform that does not say: the allocation itself decides
    if have > 0 and need > have:
        each = f" for {conversations} conversations" if conversations > 1 else ""
        fewer = ", --parallel" if conversations > 1 else ""
        raise LlmError(f"--ctx {n_ctx} needs a {need / 1e9:.1f} GB KV cache{each}: not enough memory "
                       f"({have / 1e9:.1f} GB here); lower --ctx{fewer}, or use --kv-type q8_0")


class StopMatcher:
    """Holds back text that could still turn into a stop string, so stop strings are never printed."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending = list(stops), ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
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
def broken_model_math():
    """NaN or infinite weights can leave a softmax with nothing to normalise by; the numba kernels then raise
    ZeroDivisionError. That is a broken file, said in one line like non-finite logits."""
    try:
        yield
    except ZeroDivisionError:
        raise ModelFileError("the model's computation broke down (a division by zero on non-finite values): "
                             "its weights or parameters are broken") from None


def top_logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """log softmax of the model's logits at `token`, and the k most likely tokens (float64 for the sum)."""
    x = np.asarray(logits, dtype=np.float64)
    top = float(np.max(x))
    log_z = top + float(np.log(np.sum(np.exp(x - top))))
    best = np.argsort(-x, kind="stable")[:k] if k else np.zeros(0, dtype=np.int64)
    return TokenLogprob(int(token), float(x[token] - log_z), [(int(i), float(x[i] - log_z)) for i in best])


class Generation:
    """The state of one request's generation, apart from the model: its sampler (and random generator), the
    token history, the streaming detokenizer and the stop matcher. Whoever runs the model (Session.generate for
    one conversation, the server's scheduler for many at once) hands it each step's logits; `step` samples a
    token and says what text it makes and whether the generation is over."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], config: GenerationConfig, budget: int,
                 n_vocab: int | None = None):
        """n_vocab: the model's logits per step (its output rows; the tokenizer's vocabulary when None)."""
        self.tokenizer, self.config = tokenizer, config
        self.sampler = Sampler(config.sampling)
        self.constraint = None
        if config.grammar is not None:
            vocab = vocabulary_bytes(tokenizer, n_vocab or tokenizer.vocab_size, config.grammar.specials)
            self.constraint = Constraint(config.grammar, vocab, tokenizer.stop_ids)
        self.bias = None
        if config.logit_bias:
            self.bias = np.zeros(tokenizer.vocab_size, dtype=np.float32)
            for token, value in config.logit_bias:
                self.bias[token] += value
        self.history = list(prompt)
        self.n_prompt = len(prompt)
        self.budget = budget  # most tokens to sample (max_tokens, or less where the context ends first)
        self.detok, self.stops = tokenizer.stream(), StopMatcher(config.stop)
        self.n_gen = 0
        self.finish: str | None = None
        self.stop_matched = False  # a stop string ended it (the text held back for it is not output)
        self.logprobs: list[TokenLogprob] = []  # of tokens whose text is not yet handed out
        self.n_drafted = self.n_accepted = 0  # speculative decoding's tally

    def sample(self, logits: np.ndarray) -> int:
        """The next token from the model's logits for this step."""
        if self.bias is not None:
            logits = np.asarray(logits, dtype=np.float32) + self.bias
        if self.constraint is None:
            return self.sampler(logits, self.history)
        if self.sampler.greedy:  # the most likely token is most often allowed: one walk instead of a mask
            token = self.sampler(logits, self.history)
            if self.constraint.allows(token):
                return token
        return self.sampler(logits, self.history, self._allowed())

    def distribution(self, logits: np.ndarray, history: Sequence[int], constraint: Constraint | None = None
                     ) -> np.ndarray:
        """What `sample` would draw from after `history`: (n_vocab,) float64 probabilities. `constraint`: where the
        output format stands after `history`, when that is ahead of this generation (a draft's later tokens)."""
        if self.bias is not None:
            logits = np.asarray(logits, dtype=np.float32) + self.bias
        constraint = constraint or self.constraint
        return self.sampler.probabilities(logits, history, None if constraint is None else self._allowed(constraint))

    def _allowed(self, constraint: Constraint | None = None) -> np.ndarray:
        """(n_vocab,) bool: the tokens the output format allows next."""
        mask = (constraint or self.constraint).mask()
        if not mask.any():
            raise LlmError("no token of the model's vocabulary can continue the requested output format")
        return mask

    def step(self, logits: np.ndarray) -> tuple[int, str]:
        """Sample a token from `logits` and take it: -> (token, text it completes). Sets `finish` when this
        was the last token; the token then need not be fed back."""
        return self.take(self.sample(logits), logits)

    def take(self, token: int, logits: np.ndarray) -> tuple[int, str]:
        """Take `token`, chosen from `logits` (by `step`, or by speculative verification)."""
        if self.config.logprobs is not None:
            self.logprobs.append(top_logprobs(logits, token, self.config.logprobs))
        self.n_gen += 1
        self.history.append(token)
        if token in self.tokenizer.stop_ids:
            self.finish = "stop"
            return token, ""
        if self.constraint is not None:
            self.constraint.take(token)
        # an id past the tokenizer's vocabulary (a table padded beyond it) has no text
        text, stopped = self.stops.feed(self.detok.add(token) if token < self.tokenizer.vocab_size else "")
        if stopped:
            self.finish, self.stop_matched = "stop", True
        elif self.constraint is not None and self.constraint.finished:
            self.finish = "stop"
        elif self.n_gen >= self.budget:
            self.finish = "length"
        return token, text

    def tail(self) -> str:
        """Text still held back when the generation ends other than by a stop (a partial stop string or
        character is real output then). Under an output format every byte taken is part of the value."""
        if self.stop_matched or (self.finish == "stop" and self.constraint is None):
            return ""
        return self.stops.feed(self.detok.flush())[0] + self.stops.flush()

    def take_logprobs(self) -> list[TokenLogprob]:
        out, self.logprobs = self.logprobs, []
        return out


class Session:
    """A model with one KV cache, for one conversation or a stream of prompts."""

    def __init__(self, lm: LoadedModel, ctx: int | None = None, cache: KVCache | None = None,
                 kv_type: str | None = None, spec: SpeculativeConfig | None = None,
                 draft: LoadedModel | None = None):
        """`cache`: one made by the backend for `ctx` positions with slack for `spec` (the server's slots share a
        pool); else a new one stored as kv_type (None: the backend's default, backends.default_kv_type). `spec`
        with `draft` (a model of the same vocabulary) or spec.lookup: speculative decoding
        (llmcli/speculative.py); the draft's cache is stored as its backend's default."""
        self.lm = lm
        self.n_ctx = context_size(lm.hparams, ctx)
        self.spec = spec or SpeculativeConfig()
        self.drafter: PromptLookup | DraftModel | None = None
        if draft is not None:
            check_vocab(lm, draft)
            n = self.spec.draft_max
            draft_cache = draft.model.new_cache(self.n_ctx, kv_type=default_kv_type(draft.model.name), slack=n)
            self.drafter = DraftModel(Session(draft, self.n_ctx, draft_cache), n)
        elif self.spec.lookup:
            self.drafter = PromptLookup(self.spec.lookup, self.spec.ngram_max)
        if cache is None:
            kv_type = kv_type or default_kv_type(lm.model.name)
            check_kv_memory(lm.hparams, self.n_ctx, kv_type)
            cache = lm.model.new_cache(self.n_ctx, kv_type=kv_type, slack=self.slack)
        self.cache = cache
        self.tokens: list[int] = []  # exactly what the cache holds, position by position
        self.reused = 0  # prompt tokens the last prefill found in the cache

    @property
    def slack(self) -> int:
        """Positions trim() must be able to take back: the most tokens drafted per step."""
        return self.drafter.n_max if self.drafter is not None else 0

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def common_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` the cache holds already."""
        return common_prefix(self.tokens, prompt)

    def _sync_cache(self, prompt: Sequence[int]) -> int:
        """Keep the longest cached prefix of `prompt` (at least one token is left to run); return its length."""
        n = min(self.common_prefix(prompt), len(prompt) - 1)
        self.cache.trim(len(self.tokens) - n)
        n = self.cache.offset  # a rotating cache may have to drop more than asked
        del self.tokens[n:]
        return n

    def shift_for(self, prompt: Sequence[int]) -> int:
        """When `prompt` continues the cached tokens with a run left out after their common prefix (a chat whose
        oldest turns were dropped), drop that run from the cache and move what follows down (the backend
        re-rotates the keys: model.shift_cache) instead of recomputing it; cached tokens past what the prompt
        repeats are trimmed. Returns the positions dropped; 0 when no run of the cache lines up with the prompt,
        or the backend cannot shift this cache (the next prefill then recomputes)."""
        shift = getattr(self.lm.model, "shift_cache", None)
        start = self.common_prefix(prompt)
        cached, new = np.asarray(self.tokens[start:], dtype=np.int64), np.asarray(prompt[start:], dtype=np.int64)
        if shift is None or len(cached) < 2 or not len(new):
            return 0
        best_n, best_m = 0, 0  # the run to leave out, and how many cached tokens after it the prompt repeats
        for n in np.flatnonzero(cached[1:] == new[0]) + 1:
            k = min(len(cached) - n, len(new))
            diff = np.flatnonzero(cached[n:n + k] != new[:k])
            m = int(diff[0]) if len(diff) else k
            if m > best_m:
                best_n, best_m = int(n), m
        if not best_m or not shift(self.cache, start, best_n):
            return 0
        del self.tokens[start:start + best_n]
        self.cache.trim(len(self.tokens) - (start + best_m))
        del self.tokens[self.cache.offset:]
        return best_n

    def run_ahead(self, tokens: Sequence[int]) -> None:
        """Prefill `tokens`, a guess at the next prompt (next_turn_start), while its user reads and types: only
        where the cache holds all but at most AHEAD_MOST of them (a template that rewrites earlier turns is left
        to the prompt itself). A guess that fails costs only its time: the cache is emptied, the prompt runs all."""
        if not 0 < len(tokens) - self.common_prefix(tokens) <= AHEAD_MOST or len(tokens) >= self.n_ctx:
            return
        try:
            self.prefill(tokens)
        except Exception:  # noqa: BLE001 - the next prompt meets the error itself, and says it
            self.reset()

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise PromptError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise PromptError(f"the prompt has {len(prompt)} tokens, the context holds {self.n_ctx} "
                              f"(raise --ctx or shorten the prompt)")
        self._check_ids(prompt)

    def _check_ids(self, prompt: Sequence[int]) -> None:
        n_vocab = self.lm.hparams.n_vocab
        if min(prompt) < 0 or max(prompt) >= n_vocab:
            # a tokenizer vocabulary larger than the embedding table spells ids the model has no row for
            bad = next(t for t in prompt if not 0 <= t < n_vocab)
            raise PromptError(f"the prompt has token id {bad}, outside the model's {n_vocab}-row embedding table "
                              f"(the file's vocabulary and weights disagree)")

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Run the part of `prompt` not already cached; return the logits of its last token."""
        self.check_prompt(prompt)
        start = self._sync_cache(prompt)
        self.reused = start
        logits = None
        for i in range(start, len(prompt), PREFILL_CHUNK):
            chunk = list(prompt[i:i + PREFILL_CHUNK])
            with broken_model_math():
                logits = self.lm.model.forward(np.asarray(chunk, dtype=np.int32), self.cache)
            self.tokens.extend(chunk)
        return logits

    def check_input(self, tokens: Sequence[int]) -> None:
        """A text to embed fits: not empty, at most the context, ids the model has."""
        if not tokens:
            raise PromptError("the input is empty")
        if len(tokens) > self.n_ctx:
            raise PromptError(f"the input has {len(tokens)} tokens, the context holds {self.n_ctx} (raise --ctx, up "
                              f"to the model's {self.lm.hparams.n_ctx_train}, or shorten the text)")
        self._check_ids(tokens)

    def embed(self, tokens: Sequence[int], pooling: str) -> np.ndarray:
        """The embedding of `tokens` as a text of its own: the output norm's states pooled as `pooling` (POOLINGS;
        "cls" is the first token's), float32 (n_embd,), not normalized. The cache keeps the text's tokens; with
        "last" pooling the next text reuses their common prefix (an instruction every query starts with)."""
        self.check_input(tokens)
        if pooling == "cls":  # causal: the first token's state is the same with or without the rest
            tokens = tokens[:1]
        if pooling == "last":
            start = self._sync_cache(tokens)
        else:
            self.reset()
            start = 0
        total, last = np.zeros(self.lm.hparams.n_embd, dtype=np.float64), None
        for i in range(start, len(tokens), PREFILL_CHUNK):
            chunk = list(tokens[i:i + PREFILL_CHUNK])
            with broken_model_math():
                states = self.lm.model.forward(np.asarray(chunk, dtype=np.int32), self.cache,
                                               all_logits=pooling == "mean", hidden=True)
            self.tokens.extend(chunk)
            if pooling == "mean":
                total += states.sum(axis=0, dtype=np.float64)
            last = states
        v = (total / len(tokens)).astype(np.float32) if pooling == "mean" else np.asarray(last, np.float32).ravel()
        if not np.isfinite(v).all():
            raise ModelFileError("the model's states are not finite numbers: its weights or parameters are broken")
        return v

    def feed(self, token: int) -> np.ndarray:
        """Run one sampled token; return the logits for the next."""
        with broken_model_math():
            logits = self.lm.model.forward(np.asarray([token], dtype=np.int32), self.cache)
        self.tokens.append(token)
        return logits

    def start(self, prompt: Sequence[int], config: GenerationConfig) -> Generation:
        """A Generation for `prompt` whose budget is what the context leaves after it."""
        self.check_prompt(prompt)
        return Generation(self.lm.tokenizer, prompt, config, min(config.max_tokens, self.n_ctx - len(prompt)),
                          self.lm.hparams.n_vocab)

    def _decode(self, gen: Generation, logits: np.ndarray) -> Iterator[tuple[int, str]]:
        """gen.step over the logits of each token fed back, until gen finishes. A backend with
        `decode_stream` (MLX) pipelines the steps asynchronously: it samples through gen.step and runs ahead
        by a token, so self.tokens records a token once the next one is out."""
        if self.drafter is not None:
            yield from self._decode_speculative(gen, logits)
            return
        stream = getattr(self.lm.model, "decode_stream", None)
        token, text = gen.step(logits)
        yield token, text
        if gen.finish is not None:
            return
        if stream is not None:
            texts = []

            def sample(x):
                nxt, piece = gen.step(x)
                texts.append(piece)
                return nxt

            with closing(stream(token, self.cache, sample, gen.budget - gen.n_gen)) as steps:
                for nxt in steps:
                    self.tokens.append(token)
                    token = nxt
                    yield token, texts.pop(0)
                    if gen.finish is not None:
                        return
            return
        while gen.finish is None:
            token, text = gen.step(self.feed(token))
            yield token, text

    def _decode_speculative(self, gen: Generation, logits: np.ndarray) -> Iterator[tuple[int, str]]:
        """_decode with drafts: each step verifies the pending token and a draft in one forward pass."""
        token, text = gen.step(logits)
        yield token, text
        length = DraftLength(self.drafter.n_max)
        while gen.finish is None:
            out = self.speculate(gen, token, length)
            token = out[-1][0]
            yield from out

    def speculate(self, gen: Generation, token: int, length: DraftLength) -> list[tuple[int, str]]:
        """One decode step after `token` (sampled, not yet fed), with a draft where the drafter has one and
        `length` allows: -> the (token, text) pairs taken, one without a draft. Each step is timed for
        `length`, drafting included (a draft model's steps cost)."""
        t0 = time.perf_counter()
        k = length.next(gen.budget - gen.n_gen - 1)  # room for the drafts and the token after them
        drafts, qs = self.drafter.propose(gen, k) if k else ([], [])
        if not drafts:
            out = [gen.step(self.feed(token))]
            length.plain_step(time.perf_counter() - t0)
            return out
        out, kept = self.speculative_step(gen, token, drafts, qs)
        length.update(len(drafts), kept, time.perf_counter() - t0)
        return out

    def speculative_step(self, gen: Generation, token: int, drafts: list[int],
                         qs: list[np.ndarray | None]) -> tuple[list[tuple[int, str]], int]:
        """Run `token` (sampled, not yet fed) and `drafts` in one pass, keep the drafts the model agrees with and
        one token of its own after them; -> (the (token, text) taken, in order; drafts kept). The rejected drafts'
        positions are trimmed from the cache: it then holds the tokens before the last one taken, as after plain
        steps (or all of them, when the generation ended on a kept draft)."""
        fed = [token, *drafts]
        with broken_model_math():
            logits = self.lm.model.forward(np.asarray(fed, dtype=np.int32), self.cache, all_logits=True)
        self.tokens.extend(fed)
        out, kept = [], 0
        for j, draft in enumerate(drafts):
            nxt, ok = accept(gen, logits[j], draft, qs[j])
            out.append(gen.take(nxt, logits[j]))
            kept += ok
            if not ok or gen.finish is not None:
                break
        else:
            out.append(gen.step(logits[len(drafts)]))
        gen.n_drafted += len(drafts)
        gen.n_accepted += kept
        self._rewind(len(self.tokens) - (len(drafts) - kept), gen.history)
        return out, kept

    def _rewind(self, keep: int, history: Sequence[int]) -> None:
        """Keep the first `keep` positions of the cache (`history` is what they hold). A rotating cache that
        cannot go back that far (slack below the draft) drops everything; the positions are then run again."""
        self.cache.trim(len(self.tokens) - keep)
        del self.tokens[self.cache.offset:]
        missing = list(history[len(self.tokens):keep])
        for i in range(0, len(missing), PREFILL_CHUNK):
            with broken_model_math():
                self.lm.model.forward(np.asarray(missing[i:i + PREFILL_CHUNK], dtype=np.int32), self.cache)
            self.tokens.extend(missing[i:i + PREFILL_CHUNK])

    def generate(self, prompt: Sequence[int], config: GenerationConfig | None = None) -> Iterator[GenerationResponse]:
        """Yield text pieces as they are decoded; the last record carries the finish reason and timings."""
        config = config or GenerationConfig()
        gen = self.start(prompt, config)
        t0 = time.perf_counter()
        t_first = None
        try:
            logits = self.prefill(prompt)
            t_first = time.perf_counter()
            with closing(self._decode(gen, logits)) as steps:
                for token, text in steps:
                    if text:
                        yield GenerationResponse(text, token, logprobs=gen.take_logprobs())
        except KeyboardInterrupt:
            gen.finish = "interrupted"
        tail = gen.tail()
        t_end = time.perf_counter()
        yield finish_record(gen, tail, len(prompt) - self.reused, t0, t_first or t_end, t_end)


def finish_record(gen: Generation, tail: str, n_prefilled: int, t0: float, t_first: float,
                  t_end: float) -> GenerationResponse:
    """The last record of a generation: the held-back text, the finish reason, counts and timings."""
    decode_n = max(gen.n_gen - 1, 0)  # the first token comes from the prefill
    return GenerationResponse(
        tail, None, gen.finish,
        prompt_tokens=gen.n_prompt, prefilled_tokens=n_prefilled, generation_tokens=gen.n_gen,
        ttft_s=t_first - t0,
        prompt_tps=n_prefilled / max(t_first - t0, 1e-9),
        generation_tps=decode_n / (t_end - t_first) if decode_n and t_end > t_first else 0.0,
        logprobs=gen.take_logprobs(),
        draft_tokens=gen.n_drafted, accepted_tokens=gen.n_accepted, stop_sequence=gen.stops.matched,
    )
