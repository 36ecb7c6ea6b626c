"""Decode on a shared machine: one core kept busy by another process, numba at 1 thread, at the default threads
(with the thread governor, backends/numba/governor.py, and without it), llama.cpp at the same counts.

    python benchmarks/bench_shared.py [--model FILE.gguf] [--tg 64] [--reps 5] [--quiet-too]

The busy loop is a second Python process pinned to core 0 (taskset). The configurations take turns, one
repetition each; medians (min-max) of decode tok/s over `tg` tokens after a 1-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / ".test-models" / "models" / "smollm2" / "model.gguf"


def configurations(path: Path, threads: int) -> dict:
    """name -> decode(n) running n single-token steps after a 1-token prompt."""
    from llama_cpp import Llama

    import backends.numba.governor as gov
    from backends import load_model
    from quant.gguf_file import read_gguf

    def numba_decode(model):
        cache = model.new_cache(4096)

        def run(n):
            cache.reset()
            model.forward(np.array([1]), cache)
            for i in range(n):
                model.forward(np.array([100 + i]), cache)
        return run

    def llama_decode(llm):
        def run(n):
            llm.reset()
            llm.eval([1])
            for i in range(n):
                llm.eval([100 + i])
        return run

    out = {}
    gguf = read_gguf(path)
    one = load_model(gguf, "numba", 1)
    out["numba 1 thread"] = numba_decode(one)
    fixed = load_model(gguf, "numba", threads)
    fixed.governor = gov.ThreadGovernor(threads)
    fixed.governor.counts = (threads,)  # always all threads: what decode did before the governor
    out[f"numba {threads} threads, fixed"] = numba_decode(fixed)
    out[f"numba {threads} threads, governed"] = numba_decode(load_model(gguf, "numba", threads))
    for t in (1, threads):
        llm = Llama(model_path=str(path), n_threads=t, n_threads_batch=t, n_ctx=4096, verbose=False)
        out[f"llama.cpp {t} thread{'s' if t > 1 else ''}"] = llama_decode(llm)
    return out


def measure(runs: dict, tg: int, reps: int) -> dict:
    times: dict = {name: [] for name in runs}
    for run in runs.values():
        run(8)  # warm-up
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            run(tg)
            times[name].append(tg / (time.perf_counter() - t))
    return {name: {"tok_s": statistics.median(r), "min": min(r), "max": max(r)} for name, r in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quiet-too", action="store_true", help="also without the busy loop, first")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = configurations(args.model, args.threads)
    result = {}
    if args.quiet_too:
        result["no busy loop"] = measure(runs, args.tg, args.reps)
    busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        result["one core busy"] = measure(runs, args.tg, args.reps)
    finally:
        busy.kill()
        busy.wait()
    for label, r in result.items():
        print(f"\n{label} ({args.model.name}, tg{args.tg}, {args.reps} reps)\n")
        print("| configuration | decode tok/s |\n|---|---:|")
        for name, v in r.items():
            print(f"| {name} | {v['tok_s']:.1f} ({v['min']:.0f}-{v['max']:.0f}) |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
