"""Numba backend vs llama.cpp (llama-cpp-python) on the same GGUF files and the same thread count, in one run.

Measures, per model: decode (tg: N single-token forwards after a 1-token prompt) and prefill (pp: one forward of
N tokens on an empty cache), as medians over repetitions with the spread (min..max); warm-up runs excluded.
The two engines take turns, one repetition each, so that a load coming and going hits both alike.
Also the machine's read bandwidth (parallel sum over 1 GiB) and, for the 1B-shape random Q4_0 model, the
decode bandwidth as a fraction of it; and the warm start of `llm run` (process start -> first token).

    python benchmarks/bench_decode.py --threads 2 [--reps 3] [--json out.json] [--skip-llama]
    python benchmarks/bench_decode.py --threads 2 --depth 2000 --pp 0   # decode after a 2000-token context
    python benchmarks/bench_decode.py --threads 2 --depth 3584 --tg 16  # and prefill after it (pp N @ d D)

Models are generated into .test-models/numba/ on first use (never committed): SmolLM2-135M Q4_0 and Q8_0
copies of the store's Q4_1 file, and a random-weight model with the 1B shape (hidden 2048, 16 layers,
32/8 heads, ffn 8192, vocab 49152) carrying SmolLM2's tokenizer so llama.cpp loads it.
"""

from __future__ import annotations

import argparse
import json
import os
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
CHUNK = 512  # the untimed context of --depth is prompted in pieces of this many tokens (llmcli.engine.PREFILL_CHUNK)


def prepare_models() -> dict[str, Path]:
    from gguf import GGMLQuantizationType as Q
    from make_bench_models import requantize, write_random_model

    from llmcli.store import ensure_smollm2

    os.environ.setdefault("LLMCLI_HOME", str(REPO / ".test-models"))
    src = ensure_smollm2()
    MODELS.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("q4_0", "q8_0"):
        dst = MODELS / f"smollm2-{name}.gguf"
        if not dst.exists():
            requantize(src, dst, Q[name.upper()])
        paths[f"SmolLM2-135M {name.upper()}"] = dst
    big = MODELS / "random-1b-q4_0.gguf"
    if not big.exists():
        write_random_model(big, n_embd=2048, n_layers=16, n_heads=32, n_kv_heads=8, n_ff=8192, n_vocab=49152,
                           qtype=Q.Q4_0, tokenizer_from=src)
    paths["1B-shape random Q4_0"] = big
    return paths


def read_bandwidth_gbs(threads: int) -> float:
    """Bytes per second of a parallel sum over 1 GiB (well beyond any cache), best of 5, in GB/s."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=False)  # fastmath: a vectorized sum, so memory is the limit
    def psum(a, chunks):
        n = a.size // chunks
        total = np.float32(0.0)
        for c in prange(chunks):
            chunk = a[c * n:(c + 1) * n]  # a slice: indices known non-negative, so the loop vectorizes
            s = np.float32(0.0)
            for j in range(chunk.size):
                s += chunk[j]
            total += s
        return total

    numba.set_num_threads(threads)
    a = np.ones((1 << 30) // 4, dtype=np.float32)
    psum(a, 64)
    best = min(_timed(lambda: psum(a, 64)) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _run_seconds(run) -> float:
    """Seconds an engine's run takes, or the seconds it reports itself (a run with an untimed set-up)."""
    t = time.perf_counter()
    own = run()
    return time.perf_counter() - t if own is None else own


def summarize(times: list[float], n_tokens: int) -> dict:
    rates = sorted(n_tokens / t for t in times)
    return {"tok_s": statistics.median(rates), "min": rates[0], "max": rates[-1], "reps": len(rates)}


def numba_runs(path: Path, threads: int, tg: int, pp: int, tokens: np.ndarray, depth: int = 0) -> dict:
    """{"tg": decode run, "pp": prefill run} on the numba backend, plus the weight bytes read per token. With a
    depth, each run first fills the cache with an untimed prompt of `depth` tokens (in chunks of CHUNK, as the
    engine prefills) and reports its own time."""
    from backends import load_model
    from quant.gguf_file import read_gguf

    model = load_model(read_gguf(path), "numba", threads)
    cache = model.new_cache(max(pp + depth, depth + tg + 1) + 1)

    def context(n):
        cache.reset()
        for i in range(0, n, CHUNK):
            model.forward(tokens[i:min(n, i + CHUNK)], cache)

    def decode():
        context(depth + 1)
        t = time.perf_counter()
        for i in range(tg):
            model.forward(tokens[depth + 1 + i: depth + 2 + i], cache)
        return time.perf_counter() - t if depth else None

    def prefill():
        context(depth)
        t = time.perf_counter()
        model.forward(tokens[depth:depth + pp], cache)
        return time.perf_counter() - t if depth else None

    return {"tg": decode, "pp": prefill, "weight_bytes_per_token": model.weight_bytes_per_token()}


def llama_runs(path: Path, threads: int, tg: int, pp: int, tokens: np.ndarray, depth: int = 0) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                n_ctx=max(pp + depth, depth + tg + 1) + 16, n_batch=max(pp, CHUNK), verbose=False)
    ids = [int(t) for t in tokens]

    def context(n):
        llm.reset()
        if n:
            llm.eval(ids[:n])

    def decode():
        context(depth + 1)
        t = time.perf_counter()
        for i in range(tg):
            llm.eval(ids[depth + 1 + i: depth + 2 + i])
        return time.perf_counter() - t if depth else None

    def prefill():
        context(depth)
        t = time.perf_counter()
        llm.eval(ids[depth:depth + pp])
        return time.perf_counter() - t if depth else None

    return {"tg": decode, "pp": prefill, "close": llm.close}


def bench_pair(engines: dict[str, dict], tests: dict[str, int], reps: int) -> dict:
    """Each test run once per engine as a warm-up, then `reps` rounds in which every engine runs it once, one
    after the other: a load that comes and goes on a shared machine hits both engines alike."""
    times: dict = {name: {test: [] for test in tests} for name in engines}
    for test in tests:
        for runs in engines.values():
            runs[test]()
        for _ in range(reps):
            for name, runs in engines.items():
                times[name][test].append(_run_seconds(runs[test]))
    return {name: {test: summarize(times[name][test], n) for test, n in tests.items()} for name in engines}


def warm_start_s(path: Path, threads: int, reps: int) -> float:
    """Wall time of `llm run MODEL "Hi" -n 1` (process start -> first token -> exit), median; JIT cache warm."""
    cmd = [sys.executable, "-m", "llmcli", "run", str(path), "Hi", "-n", "1", "--temperature", "0",
           "--backend", "numba", "--threads", str(threads)]
    subprocess.run(cmd, capture_output=True, check=True, cwd=REPO)  # warms the JIT and page caches
    return statistics.median(_timed(lambda: subprocess.run(cmd, capture_output=True, check=True, cwd=REPO))
                             for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--big-tg", type=int, default=32, help="decode tokens for the 1B-shape model")
    ap.add_argument("--depth", type=int, default=0,
                    help="decode and prefill after an untimed prompt of this many tokens (llama-bench's @ d D)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--only", default=None, help="run only models whose name contains this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--llama-lib", type=Path, default=None,
                    help="directory with a libllama.so built for this CPU (sets LLAMA_CPP_LIB_PATH)")
    args = ap.parse_args()
    if args.llama_lib:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(args.llama_lib.resolve())

    paths = prepare_models()
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 49152, size=args.depth + max(args.pp, args.tg + 1) + 1).astype(np.int64)
    results: dict = {"threads": args.threads, "depth": args.depth, "models": {}}
    results["read_bandwidth_gbs"] = read_bandwidth_gbs(args.threads)
    for name, path in paths.items():
        if args.only and args.only not in name:
            continue
        big = name.startswith("1B")
        tg, pp = (args.big_tg, 0) if big else (args.tg, args.pp)
        tg_tokens = tg if args.depth else tg + 1  # with a depth, only the decoded tokens are timed
        entry = {"file": str(path.relative_to(REPO)), "tg_tokens": tg_tokens, "pp_tokens": pp}
        engines = {"numba": numba_runs(path, args.threads, tg, pp, tokens, args.depth)}
        if not args.skip_llama:
            engines["llama.cpp"] = llama_runs(path, args.threads, tg, pp, tokens, args.depth)
        tests = {"tg": tg_tokens, **({"pp": pp} if pp else {})}
        entry.update(bench_pair(engines, tests, args.reps))
        entry["numba"]["weight_bytes_per_token"] = engines["numba"]["weight_bytes_per_token"]
        if "llama.cpp" in engines:
            engines["llama.cpp"]["close"]()
        if big:
            gbs = entry["numba"]["weight_bytes_per_token"] * entry["numba"]["tg"]["tok_s"] / 1e9
            entry["numba"]["decode_gbs"] = gbs
            entry["numba"]["fraction_of_read_bandwidth"] = gbs / results["read_bandwidth_gbs"]
        results["models"][name] = entry
        print(f"done: {name}", file=sys.stderr, flush=True)
    if not args.only:
        results["warm_start_s"] = warm_start_s(paths["SmolLM2-135M Q4_0"], args.threads, args.reps)

    print(f"\nthreads={args.threads}  read bandwidth {results['read_bandwidth_gbs']:.1f} GB/s")
    print(f"{'model':24} {'test':6} {'numba tok/s':>20} {'llama.cpp tok/s':>20} {'ratio':>6}")
    for name, e in results["models"].items():
        for test in ("tg", "pp"):
            if test not in e["numba"]:
                continue
            ours = e["numba"][test]
            label = f"{test}{e[test + '_tokens'] - (test == 'tg' and not args.depth)}"
            if args.depth:
                label += f"@d{args.depth}"
            row = f"{name:24} {label:<6} " \
                  f"{ours['tok_s']:8.1f} ({ours['min']:.0f}-{ours['max']:.0f})".ljust(20)
            theirs = e.get("llama.cpp", {}).get(test)
            if theirs:
                row += f" {theirs['tok_s']:8.1f} ({theirs['min']:.0f}-{theirs['max']:.0f})".rjust(20)
                row += f" {ours['tok_s'] / theirs['tok_s']:6.2f}"
            print(row)
        if "decode_gbs" in e["numba"]:
            print(f"{'':24} decode reads {e['numba']['decode_gbs']:.1f} GB/s = "
                  f"{100 * e['numba']['fraction_of_read_bandwidth']:.0f} % of the read bandwidth")
    if "warm_start_s" in results:
        print(f"warm start, llm run -> first token (whole process): {results['warm_start_s']:.2f} s")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
