"""The numba backend against llama.cpp (llama-cpp-python) over formats x model shapes, same files, same threads.

Per model: prefill (pp512: one forward of 512 tokens on an empty cache), decode (tg128: 128 single-token forwards
after a 1-token prompt), decode at depth (tg32 @ d4096: 32 single-token forwards after 4096 cached positions),
and, each in a fresh process: load time, time to first token from process start (an 8-token prompt) and peak
RSS. The two engines take turns, one repetition each (a load that comes and goes on a shared machine hits both
alike); medians over repetitions, warm-up excluded; ratios are numba / llama.cpp (> 1: numba faster, for RSS
and times < 1: numba smaller).

    python benchmarks/bench_matrix.py --threads 2 --shapes 1b --formats q4_0,q4_k_m --tests pp512,tg128
    python benchmarks/bench_matrix.py --threads 2 --shapes 1b,8b --reps 3 --json matrix.json   # everything

Models are random weights written directly quantized (benchmarks/make_bench_models.py) into .test-models/numba/
on first use, with SmolLM2's tokenizer (padded to the shape's vocabulary) so that llama.cpp loads them: the 1B
shape (Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, ffn 8192, vocab 49152 as in earlier runs), 3B (3072,
28 layers, 24/8 heads, ffn 8192, vocab 128256), 8B (Llama-3-8B: 4096, 32 layers, 32/8 heads, ffn 14336, vocab
128256). Formats: q4_0, q8_0, q6_k (every matrix), q4_k_m, q5_k_m (typed per tensor as llama.cpp types them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
MODELS = REPO / ".test-models" / "numba"
SHAPES = {  # name: (n_embd, n_layers, n_heads, n_kv_heads, n_ff, n_vocab)
    "1b": (2048, 16, 32, 8, 8192, 49152), "3b": (3072, 28, 24, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256)}
FORMATS = ("q4_0", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
CHUNK = 512  # a depth's untimed context is prompted in pieces of this many tokens, as the engine does


def model_path(shape: str, fmt: str) -> Path:
    """The random model of `shape` in `fmt`, written on first use."""
    from gguf import GGMLQuantizationType as Q
    from make_bench_models import MIXES, write_random_model

    from llmcli.store import ensure_smollm2

    os.environ.setdefault("LLMCLI_HOME", str(REPO / ".test-models"))
    dst = MODELS / f"matrix-{shape}-{fmt}.gguf"  # bench_decode.py has random-1b-q4_0.gguf (tied)
    if not dst.exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        n_embd, n_layers, n_heads, n_kv, n_ff, n_vocab = SHAPES[shape]
        kind = {"mix": fmt} if fmt in MIXES else {"qtype": Q[fmt.upper()]}
        write_random_model(dst, n_embd=n_embd, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, n_ff=n_ff,
                           n_vocab=n_vocab, tied=False, tokenizer_from=ensure_smollm2(), **kind)
    return dst


def parse_test(test: str) -> tuple[str, int, int]:
    """'pp512' -> ('pp', 512, 0); 'tg32@d4096' -> ('tg', 32, 4096)."""
    name, _, depth = test.partition("@d")
    return name[:2], int(name[2:]), int(depth or 0)


class NumbaEngine:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from backends import load_model
        from quant.gguf_file import read_gguf

        self.model = load_model(read_gguf(path), "numba", threads)
        self.cache = self.model.new_cache(n_ctx)

    def fill(self, tokens: np.ndarray) -> None:
        """The cache holds exactly `tokens` afterwards."""
        self.cache.reset()
        for i in range(0, len(tokens), CHUNK):
            self.model.forward(tokens[i:i + CHUNK], self.cache)

    def rewind(self, n: int) -> None:
        self.cache.offset = n

    def forward(self, tokens: np.ndarray) -> None:
        self.model.forward(tokens, self.cache)

    def close(self) -> None:
        pass


class LlamaEngine:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=CHUNK, verbose=False)

    def fill(self, tokens: np.ndarray) -> None:
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])

    def rewind(self, n: int) -> None:
        self.llm.n_tokens = n  # eval drops the cached positions from n on

    def forward(self, tokens: np.ndarray) -> None:
        self.llm.eval([int(t) for t in tokens])

    def close(self) -> None:
        self.llm.close()


ENGINES = {"numba": NumbaEngine, "llama.cpp": LlamaEngine}


def timed_test(engine, test: str, tokens: np.ndarray) -> float:
    """Seconds of one run of `test`; its untimed context (a 1-token prompt, or the depth) is in the cache first.
    A depth is filled once and rewound to afterwards."""
    kind, n, depth = parse_test(test)
    ctx = max(depth, 1 if kind == "tg" else 0)
    if getattr(engine, "_filled", None) != ctx:
        engine.fill(tokens[:ctx]) if ctx else engine.rewind(0)
        engine._filled = ctx
    engine.rewind(ctx)
    t = time.perf_counter()
    if kind == "pp":
        engine.forward(tokens[ctx:ctx + n])
    else:
        for i in range(ctx, ctx + n):
            engine.forward(tokens[i:i + 1])
    return time.perf_counter() - t


def start_worker(engine: str, path: str, threads: int) -> None:
    """One fresh process: load, an 8-token prompt, its first token; prints the times (wall clock, seconds since
    the epoch) and the peak RSS as JSON."""
    t0 = time.time()
    tokens = np.arange(100, 108)
    if engine == "numba":
        from backends import load_model
        from quant.gguf_file import read_gguf

        model = load_model(read_gguf(Path(path)), "numba", threads)
        loaded = time.time()
        int(np.argmax(model.forward(tokens, model.new_cache(64))))
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=64, verbose=False)
        loaded = time.time()
        llm.eval([int(t) for t in tokens])
        int(np.argmax(llm._ctx.get_logits()[:llm.n_vocab()]))
    first = time.time()
    print(json.dumps({"imported": t0, "loaded": loaded, "first_token": first, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: its own memory map's; ru_maxrss carries over the RSS of the
    process that forked it, here the benchmark with models loaded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_figures(engine: str, path: Path, threads: int) -> dict:
    """Load time, process start -> first token, peak RSS of one fresh process (page cache warm)."""
    t = time.time()
    out = subprocess.run([sys.executable, __file__, "--start-worker", engine, str(path), str(threads)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_s": r["loaded"] - r["imported"], "first_token_s": r["first_token"] - t,
            "peak_rss_mb": r["peak_rss_mb"]}


def bench_model(path: Path, threads: int, tests: list[str], reps: int, engines: list[str]) -> dict:
    rng = np.random.default_rng(0)
    need = max(parse_test(t)[1] + parse_test(t)[2] + 1 for t in tests)
    tokens = rng.integers(100, 49152, size=need + 1).astype(np.int64)
    out: dict = {name: {} for name in engines}
    for name in engines:  # each engine's start figures twice (the first warms the page cache and the JIT)
        start_figures(name, path, threads)
        out[name].update(start_figures(name, path, threads))
    live = {name: ENGINES[name](path, threads, need + 16) for name in engines}
    for test in tests:
        n = parse_test(test)[1]
        times: dict = {name: [] for name in engines}
        for name in engines:
            timed_test(live[name], test, tokens)  # warm-up
        for _ in range(reps):
            for name in engines:
                times[name].append(timed_test(live[name], test, tokens))
        for name in engines:
            rates = sorted(n / s for s in times[name])
            out[name][test] = {"tok_s": statistics.median(rates), "min": rates[0], "max": rates[-1]}
    for e in live.values():
        e.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tests", default="pp512,tg128,tg32@d4096")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--start-worker", nargs=3, metavar=("ENGINE", "FILE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.start_worker:
        start_worker(args.start_worker[0], args.start_worker[1], int(args.start_worker[2]))
        return
    engines = ["numba"] + ([] if args.skip_llama else ["llama.cpp"])
    tests = args.tests.split(",")
    results = {"threads": args.threads, "reps": args.reps, "load_average": os.getloadavg(), "models": {}}
    for shape in args.shapes.split(","):
        for fmt in args.formats.split(","):
            path = model_path(shape, fmt)
            results["models"][f"{shape} {fmt}"] = r = bench_model(path, args.threads, tests, args.reps, engines)
            print(f"done: {shape} {fmt}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    results["load_average_after"] = os.getloadavg()
    cols = tests + ["load_s", "first_token_s", "peak_rss_mb"]
    print(f"\nthreads={args.threads}, reps={args.reps}, load average {results['load_average'][0]:.1f} -> "
          f"{results['load_average_after'][0]:.1f}; tok/s median (min-max); ratio numba / llama.cpp\n")
    print("| model | engine | " + " | ".join(cols) + " |\n|---|---|" + "---:|" * len(cols))
    for model, r in results["models"].items():
        for name in engines:
            cells = [f"{r[name][t]['tok_s']:.1f} ({r[name][t]['min']:.0f}-{r[name][t]['max']:.0f})" for t in tests]
            cells += [f"{r[name][k]:.2f}" if k != "peak_rss_mb" else f"{r[name][k]:.0f}" for k in cols[len(tests):]]
            print(f"| {model} | {name} | " + " | ".join(cells) + " |")
        if len(engines) == 2:
            a, b = r["numba"], r["llama.cpp"]
            cells = [f"**{a[t]['tok_s'] / b[t]['tok_s']:.2f}x**" for t in tests]
            cells += [f"{a[k] / b[k]:.2f}x" for k in cols[len(tests):]]
            print(f"| {model} | ratio | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
