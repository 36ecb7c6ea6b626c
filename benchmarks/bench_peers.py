"""llm against the peers that are installed (llama-cpp-python, transformers) on the same GGUF file.

Every engine gets the same synthetic prompt ids, the same thread count and the same protocol as
`llm bench`: a warm-up, then r repetitions of a p-token prefill (pp) and of n single-token decode
steps fed their own greedy argmax (tg); the figure is the median. Each engine runs in its own
process, so thread pools do not collide and peak RSS is its own.

    python benchmarks/bench_peers.py [MODEL] [-p 128] [-n 64] [-r 5] [--threads N] [--backend numba]
                                     [--engines llm,llama_cpp,transformers] [--rounds K] [--json FILE]

Prints a table with the ratios llm ÷ peer (above 1: llm is faster), then the JSON of all figures. On a shared
machine use --rounds K: the engines take turns K times (llm, peer, llm, peer, ...), each figure is the median
of the rounds' medians, and the ratio is the median of the rounds' ratios (each from neighbouring runs, so a
load that comes and goes moves both sides of it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ENGINES = ("llm", "llama_cpp", "transformers")
PEER_MODULE = {"llm": "llmcli", "llama_cpp": "llama_cpp", "transformers": "transformers"}


# --- one timer per engine: prefill(n) -> seconds, decode(n) -> seconds, both from an empty context -----

class LlmTimer:
    def __init__(self, path: Path, n_ctx: int, threads: int, backend: str | None):
        from llmcli import engine
        from llmcli.bench import ForwardTimer

        lm = engine.load(path, backend, threads)
        self.load_s, self.backend = lm.load_s, lm.model.name
        self.timer = ForwardTimer(lm.model, n_ctx, lm.hparams.n_vocab)

    def prefill(self, n: int) -> float:
        return self.timer.prefill(0, n)[0]

    def decode(self, n: int) -> float:
        return self.timer.decode(0, n)


class LlamaCppTimer:
    def __init__(self, path: Path, n_ctx: int, threads: int, backend: str | None):
        from llama_cpp import Llama

        from llmcli.bench import synthetic_tokens

        t0 = time.perf_counter()
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.load_s, self.backend = time.perf_counter() - t0, "llama.cpp cpu"
        self.n_vocab = self.llm.n_vocab()
        self.tokens = synthetic_tokens(n_ctx, self.n_vocab).tolist()

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def prefill(self, n: int) -> float:
        self.llm.n_tokens = 0  # eval() drops the cache past n_tokens
        t0 = time.perf_counter()
        self.llm.eval(self.tokens[:n])
        return time.perf_counter() - t0

    def decode(self, n: int) -> float:
        self.llm.n_tokens = 0
        token = self.tokens[0]
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
            token = int(np.argmax(self._last_logits()))
        return time.perf_counter() - t0


class TransformersTimer:
    def __init__(self, path: Path, n_ctx: int, threads: int, backend: str | None):
        import torch
        from transformers import AutoModelForCausalLM

        from llmcli.bench import synthetic_tokens

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32)
        self.model.eval()
        self.load_s, self.backend = time.perf_counter() - t0, f"torch {torch.__version__} float32"
        self.torch = torch
        self.tokens = torch.from_numpy(synthetic_tokens(n_ctx, self.model.config.vocab_size).astype(np.int64))

    def prefill(self, n: int) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(input_ids=self.tokens[None, :n], use_cache=True)
            return time.perf_counter() - t0

    def decode(self, n: int) -> float:
        with self.torch.inference_mode():
            token, past = self.tokens[None, :1], None
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(input_ids=token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            return time.perf_counter() - t0


TIMERS = {"llm": LlmTimer, "llama_cpp": LlamaCppTimer, "transformers": TransformersTimer}


def measure(engine_name: str, path: Path, p: int, n: int, reps: int, threads: int,
            backend: str | None) -> dict:
    """Warm-up, then `reps` timed prefills and decodes; medians and every sample."""
    from llmcli.bench import peak_rss_mb

    timer = TIMERS[engine_name](path, p + n + 16, threads, backend)
    timer.prefill(p)
    timer.decode(min(n, 8))
    pp = [p / timer.prefill(p) for _ in range(reps)]
    tg = [n / timer.decode(n) for _ in range(reps)]
    return {"engine": engine_name, "backend": timer.backend, "threads": threads, "n_prompt": p, "n_gen": n,
            "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
            "pp_runs": pp, "tg_runs": tg, "load_s": timer.load_s, "peak_rss_mb": peak_rss_mb()}


# --- the driver ---------------------------------------------------------------------------------------

def run_worker(args, engine_name: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, str(path), "--worker", engine_name, "-p", str(args.p), "-n", str(args.n),
           "-r", str(args.r), "--threads", str(args.threads)]
    if args.backend:
        cmd += ["--backend", args.backend]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode < 0:
        return {"engine": engine_name, "error": f"crashed: {signal.Signals(-done.returncode).name}"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"engine": engine_name, "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine(rounds: list[list[dict]]) -> list[dict]:
    """One row per engine from K rounds: medians of the rounds' medians, every sample, the rounds' ratios."""
    rows = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds]
        if any("error" in r for r in runs):
            rows.append(next(r for r in runs if "error" in r))
            continue
        row = dict(first, rounds=len(runs))
        for key in ("pp", "tg"):
            row[f"{key}_tok_s"] = statistics.median(r[f"{key}_tok_s"] for r in runs)
            row[f"{key}_round_medians"] = [r[f"{key}_tok_s"] for r in runs]
            row[f"{key}_runs"] = [x for r in runs for x in r[f"{key}_runs"]]
        row["load_s"] = statistics.median(r["load_s"] for r in runs)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        rows.append(row)
    base = next((i for i, r in enumerate(rows) if r["engine"] == "llm" and "error" not in r), None)
    for i, row in enumerate(rows):
        if base is None or i == base or "error" in row:
            continue
        for key in ("pp", "tg"):
            ratios = [rnd[base][f"{key}_tok_s"] / rnd[i][f"{key}_tok_s"] for rnd in rounds]
            row[f"llm_ratio_{key}_rounds"] = ratios
            row[f"llm_ratio_{key}"] = statistics.median(ratios)
    return rows


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["engine"] == "llm" and "error" not in r), None)
    lines = ["| engine | backend | threads | pp tok/s | tg tok/s | load s | peak RSS MiB | llm ÷ peer pp | "
             "llm ÷ peer tg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error']} | | | | | | | |")
            continue
        ratio_pp = ratio_tg = "–"
        if base is not None and r is not base:
            ratio_pp = f"{r.get('llm_ratio_pp', base['pp_tok_s'] / r['pp_tok_s']):.2f}"
            ratio_tg = f"{r.get('llm_ratio_tg', base['tg_tok_s'] / r['tg_tok_s']):.2f}"
        lines.append(f"| {r['engine']} | {r['backend']} | {r['threads']} | {r['pp_tok_s']:.1f} | "
                     f"{r['tg_tok_s']:.1f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{ratio_pp} | {ratio_tg} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF path or store name (default smollm2)")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens")
    ap.add_argument("-n", type=int, default=64, help="decode tokens")
    ap.add_argument("-r", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every engine (default: physical cores)")
    ap.add_argument("--backend", default=None, help="llm backend (default: this machine's)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of " + ", ".join(ENGINES))
    ap.add_argument("--rounds", type=int, default=1, help="turns of every engine, alternating (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.p, args.n, args.r, args.rounds) < 1:
        ap.error("-p, -n, -r and --rounds must be at least 1")

    from backends import physical_cores
    from llmcli.store import resolve_model

    args.threads = args.threads or physical_cores()
    path = resolve_model(args.model)
    if args.worker:
        print(json.dumps(measure(args.worker, path, args.p, args.n, args.r, args.threads, args.backend)))
        return
    names = []
    for name in args.engines.split(","):
        if name not in ENGINES:
            ap.error(f"unknown engine '{name}' (choose from {', '.join(ENGINES)})")
        if importlib.util.find_spec(PEER_MODULE[name]) is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        names.append(name)
    rounds = []
    for k in range(args.rounds):
        rounds.append([])
        for name in names:
            print(f"{name}: measuring… (round {k + 1} of {args.rounds})", file=sys.stderr)
            rounds[-1].append(run_worker(args, name, path))
    results = combine(rounds) if args.rounds > 1 else rounds[0]
    print(f"model: {path} · -p {args.p} -n {args.n} -r {args.r} · {args.threads} threads"
          + (f" · {args.rounds} alternating rounds" if args.rounds > 1 else "") + "\n")
    print(table(results))
    print()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
