"""Benchmark measurements: prefill and decode speed, time to first token, load time, peak memory and the
share of the machine's memory bandwidth that decoding reaches. No printing: `run_bench` yields progress
records and result rows, and the CLI renders them.

The model's forward pass is timed directly, with synthetic token ids and greedy argmax between decode
steps, so tokenization and sampling do not pollute the figures:
  pp (prefill): one forward of p tokens (in PREFILL_CHUNK pieces, as `llm run` does) on a cache trimmed
                back to the depth;
  tg (decode):  n single-token forwards, each fed the argmax of the previous one, from the depth;
  depth D:      D tokens are run into the cache first (untimed), so both tests see a filled context.
A warm-up (one prefill and a short decode) runs before the timed repetitions of every row.
With --lookup or --draft, each row also times speculative decoding through the engine: n greedy tokens of a reply
that copies a paragraph of its prompt, speculative and plain runs alternating, with the acceptance rate.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from backends import BACKENDS, default_backend, default_kv_type, physical_cores, read_hparams
from backends.base import kv_cache_bytes
from llmcli import engine
from llmcli.sampling import SamplingConfig
from llmcli.speculative import SpeculativeConfig
from llmcli.store import resolve_model, store_root
from quant.errors import LlmError
from quant.files import write_atomic
from quant.gguf_file import read_gguf
from quant.kvtypes import check_kv_type

WARMUP_DECODE_TOKENS = 8
BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far larger than any CPU cache
BANDWIDTH_REPEATS = 5
BANDWIDTH_FILE = "bandwidth.json"


class BenchError(LlmError):
    """A bad benchmark option."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Every combination of the listed values is one row."""

    model: str | None = None  # a path, a store name, or None for the default model
    n_prompt: tuple[int, ...] = (512,)
    n_gen: tuple[int, ...] = (128,)
    repetitions: int = 5
    backends: tuple[str, ...] | None = None  # None: the default backend of this machine
    threads: tuple[int, ...] | None = None  # None: the physical cores
    depth: tuple[int, ...] = (0,)
    kv_type: str | None = None  # the KV cache's storage type; None: the backend's default
    spec: SpeculativeConfig | None = None  # speculative decoding to time as well (--lookup, --draft-max)
    draft: str | None = None  # the draft model (a path or a store name)

    def __post_init__(self):
        if self.repetitions < 1:
            raise BenchError(f"-r/--repetitions must be at least 1, got {self.repetitions}")
        lists = {"-p/--n-prompt": self.n_prompt, "-n/--n-gen": self.n_gen, "--depth": self.depth,
                 "--threads": self.threads, "--backend": self.backends}
        for option, values in lists.items():
            if values is not None and not values:
                raise BenchError(f"{option} needs at least one value")
        for option, low in (("-p/--n-prompt", 0), ("-n/--n-gen", 0), ("--depth", 0), ("--threads", 1)):
            bad = [v for v in lists[option] or () if v < low]
            if bad:
                raise BenchError(f"{option} must be at least {low}, got {bad[0]}")
        if all(p == 0 for p in self.n_prompt) and all(n == 0 for n in self.n_gen):
            raise BenchError("nothing to measure: -p and -n are both 0")
        for b in self.backends or ():
            if b not in BACKENDS:
                raise BenchError(f"unknown backend '{b}' (choose from {', '.join(BACKENDS)})")


@dataclass(frozen=True)
class RowSpec:
    """The parameters of one row."""

    backend: str
    threads: int
    n_prompt: int
    n_gen: int
    depth: int

    def label(self) -> str:
        tests = [f"pp{self.n_prompt}"] * bool(self.n_prompt) + [f"tg{self.n_gen}"] * bool(self.n_gen)
        at = f" @ d{self.depth}" if self.depth else ""
        return f"{self.backend} · {self.threads} threads · {'+'.join(tests)}{at}"


@dataclass
class BenchResult:
    """One row; the field names and order are the JSON and CSV schema."""

    backend: str
    threads: int
    model: str
    quant: str
    n_prompt: int
    n_gen: int
    depth: int
    pp_tok_s: float | None  # None when n_prompt is 0
    pp_tok_s_std: float | None
    tg_tok_s: float | None  # None when n_gen is 0
    tg_tok_s_std: float | None
    ttft_s: float | None  # mean time from a p-token prompt to its first (greedy) token
    load_s: float
    peak_rss_mb: float
    decode_gbps: float | None  # weight bytes read per token × tg tok/s, in GB/s (1e9)
    bw_util: float | None  # decode_gbps / the machine's read bandwidth (0..1)
    kv_type: str  # the KV cache's storage type
    kv_bytes: int  # bytes of that cache at the row's context (depth + max(p, n))
    spec_tok_s: float | None = None  # --lookup/--draft: median decode tok/s of the copying reply, speculative
    spec_plain_tok_s: float | None = None  # ... and plain, in the same repetitions
    spec_acceptance: float | None = None  # drafted tokens the model kept (0..1)


SCHEMA = tuple(f.name for f in fields(BenchResult))


@dataclass
class BenchStep:
    """Progress: what is running now. `done`/`total` count timed or warm-up passes of the whole run."""

    row: int  # 0-based
    n_rows: int
    spec: RowSpec
    phase: str  # "load", "depth", "warm-up", "pp", "tg"
    done: int
    total: int


@dataclass
class BackendFailure:
    """A backend that could not be loaded; its rows are skipped."""

    backend: str
    threads: int
    message: str


BenchEvent = BenchStep | BenchResult | BackendFailure


# --- comma lists -------------------------------------------------------------------------------------

def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), with an error naming the option on anything else."""
    items = [s.strip() for s in text.split(",")]
    try:
        values = tuple(int(s) for s in items)
    except ValueError:
        raise BenchError(f"{option} takes whole numbers separated by commas, got '{text}'") from None
    return values


def parse_str_list(text: str, option: str) -> tuple[str, ...]:
    values = tuple(s.strip() for s in text.split(","))
    if any(not v for v in values):
        raise BenchError(f"{option} takes names separated by commas, got '{text}'")
    return values


# --- memory: peak RSS and read bandwidth ---------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: since the last reset_peak_rss() on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def measure_read_bandwidth(n_bytes: int = BANDWIDTH_BYTES, repeats: int = BANDWIDTH_REPEATS,
                           threads: int | None = None) -> float:
    """Best read bandwidth in GB/s (1e9) of a multi-threaded sum over an array of `n_bytes`.

    numpy releases the GIL inside reductions, so one chunk per thread reads in parallel.
    """
    threads = threads or physical_cores()
    data = np.ones(n_bytes // 8, dtype=np.float64)  # ones, not empty: every page must be really mapped
    chunks = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


def machine_key() -> str:
    """What identifies this machine's memory system well enough to reuse a bandwidth figure."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = round(psutil.virtual_memory().total / (1 << 30))
    return f"{platform.node()}|{platform.system()}|{cpu}|{os.cpu_count()} cpus|{mem_gib} GiB"


def machine_bandwidth(cache_dir: Path | None = None, remeasure: bool = False) -> float:
    """The machine's read bandwidth in GB/s, measured once and kept in <store>/bandwidth.json by machine."""
    path = (cache_dir or store_root()) / BANDWIDTH_FILE
    key = machine_key()
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if not remeasure and isinstance(entry, dict) and isinstance(entry.get("gbps"), (int, float)):
        return float(entry["gbps"])
    gbps = measure_read_bandwidth()
    known[key] = {"gbps": gbps, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        write_atomic(path, json.dumps(known, indent=1).encode())
    except OSError:
        pass  # a read-only store only costs a re-measurement next time
    return gbps


def rebased(results: Sequence[BenchResult], bandwidth: float) -> tuple[list[BenchResult], float, bool]:
    """A cached bandwidth figure below what a decode itself just read was measured while the machine was busy (or
    on other hardware under the same name): measure again, keep the new figure, recompute bw_util.
    -> (results, bandwidth, whether it was measured again)."""
    top = max((r.decode_gbps for r in results if r.decode_gbps is not None), default=0.0)
    if top <= bandwidth:
        return list(results), bandwidth, False
    bandwidth = machine_bandwidth(remeasure=True)
    return [replace(r, bw_util=None if r.decode_gbps is None else r.decode_gbps / bandwidth) for r in results], \
        bandwidth, True


# --- the measurements ----------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def quant_name(gguf) -> str:
    """The file's quantization, e.g. 'Q4_1': general.file_type, else the type holding most bytes."""
    import gguf as gguf_py

    ftype = gguf.get("general.file_type")
    if ftype is not None:
        try:
            return gguf_py.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    by_type: dict = {}
    for t in gguf.tensors.values():
        by_type[t.qtype] = by_type.get(t.qtype, 0) + t.n_bytes
    return max(by_type, key=by_type.get).name


def model_name(gguf, path: Path) -> str:
    return str(gguf.get("general.name") or path.stem)


def synthetic_tokens(n: int, n_vocab: int) -> np.ndarray:
    """(n,) int32 token ids, the same on every run and for every engine compared."""
    return np.random.default_rng(0).integers(0, n_vocab, size=n, dtype=np.int32)


class ForwardTimer:
    """Times prefill and decode on one loaded model, with one cache reused across rows."""

    def __init__(self, model, n_ctx: int, n_vocab: int, kv_type: str = "f32"):
        self.model, self.chunk = model, engine.PREFILL_CHUNK
        self.cache = model.new_cache(n_ctx, kv_type)
        self.tokens = synthetic_tokens(n_ctx, n_vocab)  # (n_ctx,)
        self.filled = 0  # leading positions of the cache that hold self.tokens[:filled]

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        logits = None
        for i in range(0, len(tokens), self.chunk):
            logits = self.model.forward(tokens[i:i + self.chunk], self.cache)
        return logits

    def to_depth(self, depth: int) -> None:
        """Leave exactly `depth` context tokens in the cache, running only those not there yet."""
        keep = min(self.filled, depth)
        self.cache.trim(self.cache.offset - keep)
        if keep < depth:
            self._run(self.tokens[keep:depth])
        self.filled = depth

    def prefill(self, depth: int, n: int) -> tuple[float, float]:
        """-> (seconds of the forward of n tokens, seconds to the first greedy token)."""
        self.to_depth(depth)
        prompt = self.tokens[depth:depth + n]
        t0 = time.perf_counter()
        logits = self._run(prompt)
        t1 = time.perf_counter()
        int(np.argmax(logits))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    def decode(self, depth: int, n: int) -> float:
        """Seconds for n single-token forwards, each fed the argmax of the one before."""
        self.to_depth(depth)
        token = np.asarray([self.tokens[depth]], dtype=np.int32)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = self.model.forward(token, self.cache)
            token = np.asarray([np.argmax(logits)], dtype=np.int32)
        return time.perf_counter() - t0


COPY_TASK = "Repeat the following text exactly, word for word.\n\n"


class SpecTimer:
    """Greedy replies of n tokens through the engine, plain and speculative, to a prompt that asks to copy the
    first paragraph of the packaged calibration text (a reply that prompt lookup can draft)."""

    def __init__(self, lm: engine.LoadedModel, spec: SpeculativeConfig, draft: engine.LoadedModel | None,
                 n_gen: int, kv_type: str):
        from importlib import resources

        text = resources.files("llmcli").joinpath("data/calibration.txt").read_text(encoding="utf-8")
        n_ctx = 1024 + n_gen
        self.plain = engine.Session(lm, n_ctx, kv_type=kv_type)
        self.spec = engine.Session(lm, n_ctx, kv_type=kv_type, spec=spec, draft=draft)
        self.ids = engine.encode_chat(self.plain, [{"role": "user", "content": COPY_TASK + text.split("\n\n")[0]}])

    def run(self, speculative: bool, n: int) -> engine.GenerationResponse:
        session = self.spec if speculative else self.plain
        session.reset()
        config = engine.GenerationConfig(max_tokens=n, sampling=SamplingConfig(temperature=0.0))
        return list(session.generate(self.ids, config))[-1]


@dataclass(frozen=True)
class BenchPlan:
    """A checked config: the model file, what it is, and the rows to measure."""

    path: Path
    model: str
    quant: str
    n_vocab: int
    rows: tuple[RowSpec, ...]  # grouped by (backend, threads) so each model is loaded once
    repetitions: int
    kv_type: str | None  # None: each backend's default (backends.default_kv_type)
    spec: SpeculativeConfig | None = None
    draft: Path | None = None


def prepare(config: BenchConfig) -> BenchPlan:
    """Resolve the model and check that every row fits its context; cheap, so errors come before timing."""
    path = resolve_model(config.model)
    gguf = read_gguf(path)
    hp = read_hparams(gguf)
    name = model_name(gguf, path)
    backends = config.backends or (default_backend(),)
    threads = config.threads or (physical_cores(),)
    rows = tuple(RowSpec(b, t, p, n, d) for b, t, p, n, d in
                 itertools.product(backends, threads, config.n_prompt, config.n_gen, config.depth))
    need = max(r.depth + max(r.n_prompt, r.n_gen) for r in rows) + 1
    if need > hp.n_ctx_train:
        raise BenchError(f"depth + max(p, n) needs {need} positions; {name} was trained for {hp.n_ctx_train}")
    if config.kv_type is not None:
        check_kv_type(config.kv_type, hp.head_dim)
    draft = resolve_model(config.draft) if config.draft else None
    return BenchPlan(path, name, quant_name(gguf), hp.n_vocab, rows, config.repetitions, config.kv_type,
                     config.spec, draft)


def _measure_row(runner: ForwardTimer, spec: RowSpec, repetitions: int,
                 spec_timer: SpecTimer | None = None) -> Iterator[str]:
    """Yield the name of each pass as it starts ("depth", "warm-up", "pp", "tg", "spec"); return the timings."""
    if spec.depth:
        yield "depth"
        runner.to_depth(spec.depth)
    yield "warm-up"
    if spec.n_prompt:
        runner.prefill(spec.depth, spec.n_prompt)
    runner.decode(spec.depth, max(1, min(spec.n_gen, WARMUP_DECODE_TOKENS)))
    pp, ttft, tg = [], [], []
    for _ in range(repetitions if spec.n_prompt else 0):
        yield "pp"
        t_pp, t_first = runner.prefill(spec.depth, spec.n_prompt)
        pp.append(spec.n_prompt / t_pp)
        ttft.append(t_first)
    for _ in range(repetitions if spec.n_gen else 0):
        yield "tg"
        tg.append(spec.n_gen / runner.decode(spec.depth, spec.n_gen))
    sd = []  # (speculative record, plain record) per repetition
    if spec_timer is not None and spec.n_gen:
        spec_timer.run(True, min(spec.n_gen, 16))  # warm-up: the verification passes' code paths
        for _ in range(repetitions):
            yield "spec"
            sd.append((spec_timer.run(True, spec.n_gen), spec_timer.run(False, spec.n_gen)))
    return pp, ttft, tg, sd


def _passes(spec: RowSpec, repetitions: int, speculative: bool = False) -> int:
    """Progress units of a row: the warm-up and each timed repetition."""
    return 1 + repetitions * (bool(spec.n_prompt) + bool(spec.n_gen) * (1 + speculative))


def run_bench(plan: BenchPlan, bandwidth_gbps: float) -> Iterator[BenchEvent]:
    """Measure every row of `plan`; yields BenchStep progress, BenchResult rows and BackendFailures.

    `bandwidth_gbps`: the machine's read bandwidth (machine_bandwidth()), for bw_util.
    """
    rows, reps, speculative = plan.rows, plan.repetitions, plan.spec is not None
    total, done = sum(_passes(s, reps, speculative) for s in rows), 0
    by_model = itertools.groupby(enumerate(rows), key=lambda x: (x[1].backend, x[1].threads))
    for (backend, threads), group in by_model:
        group = sorted(group, key=lambda x: x[1].depth)  # the cache then only ever grows to the next depth
        yield BenchStep(group[0][0], len(rows), group[0][1], "load", done, total)
        gc.collect()
        reset_peak_rss()
        try:
            lm = engine.load(plan.path, backend, threads)
            draft = engine.load(plan.draft, backend, threads) if plan.draft else None
        except (LlmError, ImportError) as e:  # a backend whose framework is missing or broken here
            yield BackendFailure(backend, threads, str(e))
            done += sum(_passes(s, reps, speculative) for _, s in group)
            continue
        n_ctx = max(s.depth + max(s.n_prompt, s.n_gen, WARMUP_DECODE_TOKENS) for _, s in group) + 1
        kv_type = plan.kv_type or default_kv_type(backend)
        runner = ForwardTimer(lm.model, n_ctx, plan.n_vocab, kv_type)
        bytes_per_token = lm.model.weight_bytes_per_token()
        for index, spec in group:
            timer = SpecTimer(lm, plan.spec, draft, spec.n_gen, kv_type) if speculative and spec.n_gen else None
            passes, phase = _measure_row(runner, spec, reps, timer), None
            while True:
                try:
                    upcoming = next(passes)  # runs the pass named last, then names the next one
                except StopIteration as finished:
                    done += 1  # the last pass of a row is always a counted one
                    pp, ttft, tg, sd = finished.value
                    break
                done += phase not in (None, "depth")
                phase = upcoming
                yield BenchStep(index, len(rows), spec, phase, done, total)
            pp_mean, pp_std = mean_std(pp) if pp else (None, None)
            tg_mean, tg_std = mean_std(tg) if tg else (None, None)
            gbps = bytes_per_token * tg_mean / 1e9 if tg else None
            util = gbps / bandwidth_gbps if gbps is not None and bandwidth_gbps else None
            yield BenchResult(
                backend=backend, threads=threads, model=plan.model, quant=plan.quant,
                n_prompt=spec.n_prompt, n_gen=spec.n_gen, depth=spec.depth,
                pp_tok_s=pp_mean, pp_tok_s_std=pp_std, tg_tok_s=tg_mean, tg_tok_s_std=tg_std,
                ttft_s=float(np.mean(ttft)) if ttft else None, load_s=lm.load_s, peak_rss_mb=peak_rss_mb(),
                decode_gbps=gbps, bw_util=util, kv_type=kv_type,
                kv_bytes=kv_cache_bytes(lm.hparams, spec.depth + max(spec.n_prompt, spec.n_gen), kv_type=kv_type),
                **_speculative_figures(sd),
            )
        del runner, lm, draft


def _speculative_figures(sd: list) -> dict:
    """Median tok/s of the speculative and the plain runs, and the acceptance over all of them."""
    if not sd:
        return {}
    drafted = sum(s.draft_tokens for s, _ in sd)
    return {"spec_tok_s": float(np.median([s.generation_tps for s, _ in sd])),
            "spec_plain_tok_s": float(np.median([p.generation_tps for _, p in sd])),
            "spec_acceptance": sum(s.accepted_tokens for s, _ in sd) / drafted if drafted else None}


def result_dicts(results: Sequence[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]
