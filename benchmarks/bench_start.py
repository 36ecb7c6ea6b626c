"""Warm start of `llm run`: process start -> first token -> exit, as a user sees it (issue #3: <= 1.0 s).

  python benchmarks/bench_start.py                # 5 fresh `llm run MODEL "Hi" -n 1`: median (min-max)
  python benchmarks/bench_start.py --breakdown    # where the time goes, phase by phase, in one fresh process
  python benchmarks/bench_start.py --crossover    # prompt forward: GEMM path vs matvec path for T = 8..128
  python benchmarks/bench_start.py --model A --also B --llama-cpp   # A, B and llama-cpp-python on each, in turn

The JIT cache must be warm (run `llm run` once first); the checkout's bytecode is written first, as `pip install .`
writes it for a user. Every run starts a new process from a scratch directory,
the way the issue measures it (`cd /tmp && /usr/bin/time llm run ...`); the load average is printed with the
figures because the 2 cores of the test machine are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / ".test-models" / "numba" / "smollm2-q4_0.gguf"

# One process doing what `llm run MODEL PROMPT -n 1` does, phase by phase (engine.load's steps taken apart).
_BREAKDOWN = r"""
import json, sys, time
t = [time.perf_counter()]
phases = {}
def lap(name):
    now = time.perf_counter()
    phases[name] = now - t[0]
    t[0] = now
from llmcli import cli
cli._register_commands("run")
lap("import llmcli.cli (typer) + register run's commands")
from llmcli import engine
lap("import engine (numpy, jinja2, tokenizers, gguf)")
import gc
gc.disable()  # as cli_core._open does while loading
from quant.gguf_file import read_gguf
gguf = read_gguf(sys.argv[1])
lap("read_gguf (metadata)")
from backends import load_model
model = load_model(gguf, None, json.loads(sys.argv[3]))
lap("load_model (numba import and registries, tables)")
from llmcli.tokenizer import Tokenizer
tok = Tokenizer.from_gguf(gguf)
lap("Tokenizer.from_gguf")
from llmcli.template import ChatTemplate
tmpl = ChatTemplate.from_gguf(gguf, bos_token=tok.bos_token, eos_token=tok.eos_token)
gc.freeze()
gc.enable()
lap("ChatTemplate.from_gguf")
lm = engine.LoadedModel(gguf, model.hparams, model, tok, tmpl, 0.0)
session = engine.Session(lm)
ids = engine.encode_chat(session, [{"role": "user", "content": sys.argv[2]}])
lap("session + chat template + encode")
logits = session.prefill(ids)
lap(f"prefill {len(ids)} tokens (first call: loads its cached machine code)")
from llmcli.sampling import Sampler, SamplingConfig
Sampler(SamplingConfig())(logits, list(ids))
lap("sample the first token")
print(json.dumps(phases))
cli._exit_now(0)  # as `llm` ends: no interpreter teardown
"""

# The prompt forward both ways for several lengths, on one and two threads.
_CROSSOVER = r"""
import json, sys, time
import numpy as np
import dataclasses
from backends import load_model
from quant.gguf_file import read_gguf
gguf = read_gguf(sys.argv[1])
lengths, reps = json.loads(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
rows = []
for threads in (1, 2):
    model = load_model(gguf, "numba", threads)
    cache = model.new_cache(max(lengths + [16]))
    def timed(T, gemm_min_t):
        model.options = dataclasses.replace(model.options, gemm_min_t=gemm_min_t, gemm_min_t_cold=0)
        tokens = rng.integers(0, model.hparams.n_vocab, T)
        cache.reset()
        t0 = time.perf_counter()
        model.forward(tokens, cache)
        return time.perf_counter() - t0
    for path in (1, 1 << 30):  # warm-up: every dispatcher of both paths
        timed(16, path)
    for T in lengths:
        row = {"threads": threads, "T": T}
        for name, path in (("gemm", 1), ("stack", 1 << 30)):
            times = sorted(timed(T, path) for _ in range(reps))
            row[name] = times[len(times) // 2]
        rows.append(row)
print(json.dumps(rows))
"""


def _env() -> dict[str, str]:
    """The environment of the measured processes: they import this checkout (as the editable install does)."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def compile_sources() -> None:
    """Write the bytecode of this checkout's modules, as `pip install .` does for a user's install. Without it (an
    editable install under PYTHONDONTWRITEBYTECODE, as on the test machines), every start compiles ~40 modules'
    source again, ~0.1 s that no user pays."""
    import compileall

    for package in ("llmcli", "quant", "backends"):
        compileall.compile_dir(str(REPO / package), quiet=1)


def llm_command() -> list[str]:
    """The `llm` console script next to this interpreter (the pyenv shim adds ~0.5 s per start)."""
    script = Path(sys.executable).with_name("llm")
    if not script.exists():
        sys.exit(f"no llm script next to {sys.executable}: pip install -e . first")
    return [str(script)]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_runs(model: Path, prompt: str, runs: int, threads: int | None) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of `llm run MODEL PROMPT -n 1`, each a new process started in a scratch
    directory. CPU time (user + system) tells more than wall time when other jobs share the cores."""
    cmd = [*llm_command(), "run", str(model), prompt, "-n", "1", *(["--threads", str(threads)] if threads else [])]
    times, cpu = [], []
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(runs):
            t0, c0 = time.perf_counter(), _children_cpu()
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
            times.append(time.perf_counter() - t0)
            cpu.append(_children_cpu() - c0)
            if done.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
            if "compiling kernels" in done.stderr:
                sys.exit("the JIT cache was cold (this run compiled): run again")
    return times, cpu


# llama-cpp-python's warm start: load the file, one token of a completion (no chat template).
_LLAMA_CPP_START = r"""
import sys
from llama_cpp import Llama
model = Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]) or None, verbose=False)
print(model(sys.argv[2], max_tokens=1)["choices"][0]["text"])
"""


def time_in_turn(commands: dict[str, list[str]], runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """(wall seconds, CPU seconds) of each command, `runs` fresh processes each, the commands taking turns (a
    load that comes and goes then falls on all of them)."""
    out = {label: ([], []) for label in commands}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(runs):
            for label, cmd in commands.items():
                t0, c0 = time.perf_counter(), _children_cpu()
                done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
                if done.returncode:
                    sys.exit(f"{label} failed: {done.stderr.strip()[-500:]}")
                out[label][0].append(time.perf_counter() - t0)
                out[label][1].append(_children_cpu() - c0)
    return out


def python_start() -> float:
    """Median wall seconds of `python -c pass`: the interpreter and site-packages start-up."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_child(code: str, *args: str) -> object:
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                              env=_env())
    if done.returncode != 0:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def breakdown(model: Path, prompt: str, threads: int | None) -> None:
    start = python_start()
    t0 = time.perf_counter()
    phases = run_child(_BREAKDOWN, str(model), prompt, json.dumps(threads))
    wall = time.perf_counter() - t0
    print(f"phases of `llm run {model.name} {prompt!r} -n 1` in one process (load average {load_average()}):\n")
    print("| phase | ms |\n|---|---:|")
    print(f"| python start (`python -c pass`) | {start * 1e3:.0f} |")
    for name, s in phases.items():
        print(f"| {name} | {s * 1e3:.0f} |")
    rest = wall - start - sum(phases.values())
    print(f"| the rest (exit, typer's argument parsing is not in this script) | {rest * 1e3:.0f} |")
    print(f"| **total** | **{wall * 1e3:.0f}** |")


def crossover(model: Path, lengths: list[int], reps: int) -> None:
    rows = run_child(_CROSSOVER, str(model), json.dumps(lengths), str(reps))
    print(f"prompt forward (one call on an empty cache), median of {reps}, ms; load average {load_average()}:\n")
    print("| threads | T | GEMM path | forward_stack in chunks of SMALL_T |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['T']} | {r['gemm'] * 1e3:.0f} | {r['stack'] * 1e3:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--prompt", default="Hi")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, help="--threads for llm run (default: its own)")
    ap.add_argument("--also", type=Path, action="append", default=[], help="another model, timed in turn")
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama-cpp-python's start on each model")
    ap.add_argument("--breakdown", action="store_true", help="time each phase of the start in one process")
    ap.add_argument("--crossover", action="store_true", help="time the two prompt paths for several lengths")
    ap.add_argument("--lengths", default="8,16,32,64,128", help="prompt lengths for --crossover")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model}: not found (benchmarks/make_bench_models.py writes it)")
    compile_sources()
    if args.crossover:
        crossover(args.model, [int(x) for x in args.lengths.split(",")], max(args.runs, 3))
        return
    if args.breakdown:
        breakdown(args.model, args.prompt, args.threads)
        return
    before = load_average()
    if args.also or args.llama_cpp:
        threads = ["--threads", str(args.threads)] if args.threads else []
        commands = {}
        for model in [args.model, *args.also]:
            name = f"{model.parent.name}/{model.name}"  # store files are all model.gguf
            commands[f"llm run {name}"] = [*llm_command(), "run", str(model), args.prompt, "-n", "1", *threads]
            if args.llama_cpp:
                commands[f"llama-cpp-python {name}"] = [sys.executable, "-c", _LLAMA_CPP_START, str(model),
                                                              args.prompt, str(args.threads or 0)]
        results = time_in_turn(commands, args.runs)
        print(f"{args.runs} fresh processes each, in turn; prompt {args.prompt!r}, one token; load average {before} "
              f"before, {load_average()} after\n")
        print("| command | wall median s (min–max) | CPU median s |\n|---|---:|---:|")
        for label, (wall, cpu) in results.items():
            print(f"| {label} | {statistics.median(wall):.2f} ({min(wall):.2f}–{max(wall):.2f}) | "
                  f"{statistics.median(cpu):.2f} |")
        return
    times, cpu = time_runs(args.model, args.prompt, args.runs, args.threads)
    print(f"llm run {args.model.name} {args.prompt!r} -n 1{f' --threads {args.threads}' if args.threads else ''}, "
          f"{args.runs} fresh processes: wall median {statistics.median(times):.2f} s "
          f"({min(times):.2f}–{max(times):.2f}), CPU median {statistics.median(cpu):.2f} s; "
          f"runs {', '.join(f'{t:.2f}' for t in times)}; load average {before} before, {load_average()} after")


if __name__ == "__main__":
    main()
