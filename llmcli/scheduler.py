"""Many generations on one model at once: slots, a queue, and batched decode steps.

A slot is a Session (its own KV cache and the tokens it holds). One worker thread runs every model call, so
the model's scratch buffers are never used by two forward passes at once. Each turn of its loop it admits
waiting requests into free slots (prefilling only what a slot does not hold already: a follow-up turn of a
conversation goes back to the slot that holds its earlier turns), then runs one decode step for every active
slot: their tokens go to one `model.forward_batch(tokens, caches)` where the backend has it (the weights are
read once for all of them; decoding is memory-bound), else one forward per slot.

With speculative decoding (--lookup, --draft) a step with one active slot is a speculative step of that slot
(Session.speculate: its draft verified in one pass); with several, the batched plain step as above: batching
already reads each weight once for every slot, and a verification pass per slot would read them once per slot
again, whereas the batched step costs little more than one token's. Either step keeps the distribution, so a
generation may change from one to the other between steps; each slot's draft length adapts across its steps.

When nothing else waits, a finished chat's slot runs ahead: the start of the conversation's next request (the
turn's end and the next user turn's header, which every follow-up repeats; after tool calls, the calls and a
tool result's lead) is prefilled while the user reads and types or the tool runs, so a follow-up's first token
costs only what its user or the tool wrote.

Front ends talk to it through `submit`, which returns a Job: an iterator of GenerationResponse records
(pieces of text, then a last record with the finish reason and counts), and `cancel` to end it early.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from backends import default_kv_type
from llmcli.engine import (
    GenerationConfig,
    GenerationResponse,
    LoadedModel,
    Session,
    broken_model_math,
    check_kv_memory,
    context_size,
    finish_record,
)
from llmcli.speculative import DraftLength, SpeculativeConfig
from quant.errors import LlmError

_END = object()  # the record that closes a job's stream
AHEAD_AFTER = 0.05  # seconds the worker stays idle before running ahead: a request that comes at once (an agent's,
# another client's) does not wait behind a guess, while a person's next turn comes seconds later


class Closing(LlmError):
    """The server is shutting down: no new request is taken, and those waiting end with this."""


@dataclass(kw_only=True)
class _Stream:
    """What the worker hands back to a front end, record by record."""

    records: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    notify: Callable[[], None] | None = None  # called (on the worker thread) after each record is queued
    t_submit: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        self.records.put(item)
        if self.notify is not None:
            self.notify()

    def cancel(self) -> None:
        """End the generation at its next token (a client went away); its slot is freed."""
        self.cancelled.set()

    def __iter__(self) -> Iterator:
        """Records as they come (blocking); an error the worker met is raised here."""
        while True:
            item = self.records.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class Job(_Stream):
    """A generation: its prompt and settings; its records are GenerationResponse."""

    prompt: list[int]
    config: GenerationConfig
    # the reply's text -> the tokens the conversation's next request starts with ([] where no guess holds)
    next_turn: Callable[[str], list[int]] | None = None
    prefilled: int | None = None  # prompt tokens run once admitted (a slot's cache held the others)


@dataclass
class EmbedJob(_Stream):
    """Texts to embed (token ids each), pooled as `pooling`; its records are one float32 vector per text, in
    order (not normalized)."""

    inputs: list[list[int]]
    pooling: str
    done: int = 0  # texts embedded so far


@dataclass
class Counters:
    """What the worker has done since it started, for `llm serve`'s /metrics; only the worker writes them."""

    requests: int = 0  # generations ended
    prompt_tokens: int = 0  # prompt tokens run (a slot's cache held the others)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0  # model calls after the prompts' (one step serves every active slot)
    decode_seconds: float = 0.0  # their time, sampling included
    decoded_tokens: int = 0  # the tokens they gave (a generation's first comes from its prompt's call)
    busy_slots: int = 0  # summed over the decode steps
    embedded_texts: int = 0
    embedded_tokens: int = 0


@dataclass
class _Active:
    """A slot's generation in flight."""

    job: Job
    gen: object  # engine.Generation
    token: int  # sampled, not yet fed to the model
    n_prefilled: int
    t_first: float
    length: DraftLength | None = None  # speculative decoding: this generation's draft length
    text: list[str] = field(default_factory=list)  # the pieces handed out


class Scheduler:
    """Runs up to `parallel` generations at once on `lm`, each in its own slot; more wait in a queue."""

    def __init__(self, lm: LoadedModel, parallel: int = 4, ctx: int | None = None, kv_type: str | None = None,
                 spec: SpeculativeConfig | None = None, draft: LoadedModel | None = None,
                 log: Callable[[str], None] | None = None):
        """kv_type: as in Session; `spec`, `draft`: speculative decoding as in Session (each slot gets its own
        draft session); `log`: given a line about each generation as it ends."""
        if parallel < 1:
            raise LlmError(f"--parallel must be at least 1, got {parallel}")
        self.lm = lm
        n_ctx = context_size(lm.hparams, ctx)
        spec = spec or SpeculativeConfig()
        slack = spec.draft_max if draft is not None else spec.lookup
        new_caches = getattr(lm.model, "new_caches", None)  # caches forward_batch can run together (one pool)
        kv_type = kv_type or default_kv_type(lm.model.name)
        check_kv_memory(lm.hparams, n_ctx, kv_type, parallel)
        caches = (new_caches(parallel, n_ctx, kv_type=kv_type, slack=slack) if new_caches is not None
                  else [lm.model.new_cache(n_ctx, kv_type=kv_type, slack=slack) for _ in range(parallel)])
        self.slots = [Session(lm, n_ctx, cache, spec=spec, draft=draft) for cache in caches]
        self._kv_type = kv_type
        self._embedder: Session | None = None  # embeddings' own cache, made on the first request for one
        self._embeds: deque[EmbedJob] = deque()
        self.n_ctx = self.slots[0].n_ctx
        self._active: dict[int, _Active] = {}  # slot index -> its generation
        self._last_used = [0.0] * parallel
        self._ahead: dict[int, tuple[Callable[[str], list[int]], str]] = {}  # slot -> its chat's next turn, reply
        self._idle_since = 0.0  # when the last generation ended
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._batched = getattr(lm.model, "forward_batch", None)
        self.counters = Counters()
        self._log = log
        self._thread = threading.Thread(target=self._loop, name="llm-scheduler", daemon=True)
        self._thread.start()

    # --- front end side -----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], config: GenerationConfig,
               notify: Callable[[], None] | None = None,
               next_turn: Callable[[str], list[int]] | None = None) -> Job:
        """Queue a generation; a prompt that cannot fit raises PromptError here, before anything runs.
        `notify` is called from the worker thread after each record (an event loop's wake-up); `next_turn`, for a
        chat, gives from the reply's text the tokens its conversation's next request will start with, which the
        slot runs ahead when the worker is idle (called on the worker thread)."""
        self.slots[0].check_prompt(prompt)
        return self._queue(Job(list(prompt), config, next_turn, notify=notify), self._waiting)

    def submit_embed(self, inputs: Sequence[Sequence[int]], pooling: str,
                     notify: Callable[[], None] | None = None) -> EmbedJob:
        """Queue texts to embed; one that cannot be embedded (empty, longer than the context) raises PromptError
        here. The worker embeds one text per turn of its loop, between the decode steps of the generations."""
        with self._cond:
            if self._embedder is None:
                self._embedder = Session(self.lm, self.n_ctx, kv_type=self._kv_type)
        for tokens in inputs:
            self._embedder.check_input(tokens)
        return self._queue(EmbedJob(inputs=[list(t) for t in inputs], pooling=pooling, notify=notify), self._embeds)

    def _queue(self, job, line: deque):
        """Put `job` at the end of `line` and wake the worker (refused once the server is closing)."""
        with self._cond:
            if self._closing:
                raise Closing("the server is shutting down")
            line.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """End every request in flight or waiting (finish reason "interrupted") and stop the worker. Returns at
        once (safe in a signal handler); the worker ends them after its current model call."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Generations queued for a free slot."""
        return len(self._waiting)

    @property
    def cached_tokens(self) -> int:
        """Positions the slots' KV caches hold."""
        return sum(len(slot.tokens) for slot in self.slots)

    # --- worker side -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._active and not self._waiting and not self._embeds:
                    if not self._ahead:
                        self._cond.wait()
                        continue
                    due = self._idle_since + AHEAD_AFTER - time.monotonic()
                    if due <= 0:
                        break
                    self._cond.wait(due)
                if self._closing:
                    break
                admit = []
                while self._waiting and len(self._active) + len(admit) < len(self.slots):
                    admit.append(self._waiting.popleft())
                embed = self._embeds[0] if self._embeds else None
                idle = not admit and embed is None and not self._active
            for job in admit:
                self._admit(job)
            if embed is not None:
                self._embed_one(embed)
            if idle and self._ahead:  # the newest finished chat first: its user is the likeliest to come back
                i, (next_turn, reply) = self._ahead.popitem()
                self._run_ahead(i, next_turn, reply)
            self._drop_cancelled()
            if self._active:
                self._decode_step()
        for i in list(self._active):
            self._end(i, "interrupted")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            embeds, self._embeds = list(self._embeds), deque()
        for job in waiting:
            job.put(GenerationResponse("", None, "interrupted", prompt_tokens=len(job.prompt)))
            job.put(_END)
        for job in embeds:
            job.put(Closing("the server is shutting down"))
            job.put(_END)

    def _embed_one(self, job: EmbedJob) -> None:
        """The next text of the first embedding request; the request leaves the queue after its last."""
        finished = job.cancelled.is_set()
        if not finished:
            try:
                job.put(self._embedder.embed(job.inputs[job.done], job.pooling))
                self.counters.embedded_texts += 1
                self.counters.embedded_tokens += len(job.inputs[job.done])
                job.done += 1
                finished = job.done == len(job.inputs)
            except Exception as e:  # LlmError, or a bug: this request ends with it, the worker goes on
                self._embedder.reset()
                job.put(e)
                finished = True
        if finished:
            with self._cond:
                self._embeds.popleft()
            job.put(_END)

    def _pick_slot(self, prompt: list[int]) -> int:
        """The free slot holding the longest prefix of `prompt`; else the one unused the longest."""
        free = [i for i in range(len(self.slots)) if i not in self._active]
        return max(free, key=lambda i: (self.slots[i].common_prefix(prompt), -self._last_used[i]))

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.put(_END)
            return
        i = self._pick_slot(job.prompt)
        self._ahead.pop(i, None)  # the slot changes hands or goes on: a guess for it is stale
        slot = self.slots[i]
        t0 = time.perf_counter()
        try:
            gen = slot.start(job.prompt, job.config)
            logits = slot.prefill(job.prompt)
        except LlmError as e:
            job.put(e)
            job.put(_END)
            return
        except Exception as e:  # a bug must end this request, not the worker that serves every other one
            slot.reset()
            job.put(e)
            job.put(_END)
            return
        self._last_used[i] = time.monotonic()
        active = _Active(job, gen, 0, len(job.prompt) - slot.reused, time.perf_counter(),
                         DraftLength(slot.drafter.n_max) if slot.drafter is not None else None)
        job.prefilled = active.n_prefilled  # before its first record
        self.counters.prompt_tokens += active.n_prefilled
        self.counters.prompt_seconds += active.t_first - t0
        self._active[i] = active
        self._take(i, logits)

    def _take(self, i: int, logits: np.ndarray) -> None:
        """Sample slot i's next token from `logits` and hand out its text; end the slot when it is done."""
        a = self._active[i]
        token, text = a.gen.step(logits)
        a.token = token
        if text:
            a.text.append(text)
            a.job.put(GenerationResponse(text, token, logprobs=a.gen.take_logprobs()))
        if a.gen.finish is not None:
            self._end(i, a.gen.finish)

    def _end(self, i: int, finish: str) -> None:
        a = self._active.pop(i)
        a.gen.finish = finish
        tail = a.gen.tail()
        last = finish_record(a.gen, tail, a.n_prefilled, a.job.t_submit, a.t_first, time.perf_counter())
        a.job.put(last)
        a.job.put(_END)
        if self._log is not None:
            self._log(f"slot {i}: {last.prompt_tokens} prompt tokens ({last.prompt_tokens - last.prefilled_tokens} "
                      f"cached), first token after {last.ttft_s:.3f} s; {last.generation_tokens} generated at "
                      f"{last.generation_tps:.1f} tok/s; {finish}")
        self.counters.requests += 1
        self.counters.generated_tokens += a.gen.n_gen
        self._last_used[i] = self._idle_since = time.monotonic()
        if a.job.next_turn is not None and finish in ("stop", "length"):
            self._ahead[i] = (a.job.next_turn, "".join(a.text) + tail)

    def _run_ahead(self, i: int, next_turn: Callable[[str], list[int]], reply: str) -> None:
        """Prefill in slot i what its chat's next request will start with (Session.run_ahead)."""
        try:
            tokens = next_turn(reply)
        except Exception:  # noqa: BLE001 - a template that cannot render the guess: the request will say why
            return
        self.slots[i].run_ahead(tokens)
        self._last_used[i] = time.monotonic()

    def _drop_cancelled(self) -> None:
        for i in [i for i, a in self._active.items() if a.job.cancelled.is_set()]:
            self._end(i, "interrupted")

    def _decode_step(self) -> None:
        """Feed every active slot its sampled token, all in one model call where the backend batches; a slot
        alone takes a speculative step where the server drafts."""
        order = sorted(self._active)
        tokens = [self._active[i].token for i in order]
        t0 = time.perf_counter()
        try:
            if len(order) == 1 and self._active[order[0]].length is not None:
                self._counted(1, self._speculate(order[0]), t0)
                return
            if self._batched is not None and len(order) > 1:
                with broken_model_math():
                    logits = self._batched(np.asarray(tokens, dtype=np.int32), [self.slots[i].cache for i in order])
                for i, token in zip(order, tokens, strict=True):
                    self.slots[i].tokens.append(token)
            else:
                logits = [self.slots[i].feed(token) for i, token in zip(order, tokens, strict=True)]
        except Exception as e:  # the step's requests end with the error; the slots start afresh
            for i in order:
                a = self._active.pop(i)
                self.slots[i].reset()
                a.job.put(e)
                a.job.put(_END)
            return
        for row, i in enumerate(order):
            self._take(i, logits[row])
        self._counted(len(order), len(order), t0)

    def _counted(self, slots: int, tokens: int, t0: float) -> None:
        c = self.counters
        c.decode_steps, c.busy_slots = c.decode_steps + 1, c.busy_slots + slots
        c.decoded_tokens += tokens
        c.decode_seconds += time.perf_counter() - t0

    def _speculate(self, i: int) -> int:
        """A speculative step of slot i: hand out the text of every token it took; how many it took."""
        a, taken = self._active[i], 0
        for token, text in self.slots[i].speculate(a.gen, a.token, a.length):
            a.token, taken = token, taken + 1
            if text:
                a.text.append(text)
                a.job.put(GenerationResponse(text, token, logprobs=a.gen.take_logprobs()))
        if a.gen.finish is not None:
            self._end(i, a.gen.finish)
        return taken
