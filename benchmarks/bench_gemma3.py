"""Where Gemma 3's start and decode go: the tokenizer build, and a decode step against its output matvec.

  python benchmarks/bench_gemma3.py [MODEL] [--threads 1] [--steps 20] [--rounds 3]

Prints the CPU time of Tokenizer.from_gguf (a 262k-token SentencePiece vocabulary), then, per round, the median
decode step and the median of the output matrix's matvec alone (the tied 262k x 640 Q8_0 embedding: most of a
token's reads), with the share of the step it takes. Medians, rounds alternating the two timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="gemma3", help="GGUF path or store name (default gemma3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import backends.numba.layers as L
    from backends import load_model
    from llmcli.store import resolve_model
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf
    from quant.kernels import activation_blocks, matvec, prepare

    gguf = read_gguf(resolve_model(args.model))
    cpu = []
    for _ in range(3):
        t = time.process_time()
        Tokenizer.from_gguf(gguf)
        cpu.append(time.process_time() - t)
    print(f"Tokenizer.from_gguf: {statistics.median(cpu):.2f} s CPU (median of 3)")

    model = load_model(gguf, "numba", threads=args.threads)
    hp = model.hparams
    cache = model.new_cache(8 + args.rounds * args.steps + 1)
    model.forward(np.arange(8), cache)
    h = np.random.default_rng(0).standard_normal((1, hp.n_embd)).astype(np.float32)
    xb, out = activation_blocks(1, hp.n_embd), np.empty((1, hp.n_vocab), dtype=np.float32)
    qtype, off = model.glob_tab[L.OUTPUT, 1], model.glob_tab[L.OUTPUT, 0]

    def step() -> float:
        t = time.perf_counter()
        model.forward(np.array([7]), cache)
        return time.perf_counter() - t

    def head() -> float:
        t = time.perf_counter()
        prepare(h, xb)
        matvec(model.wv, qtype, off, hp.n_vocab, h, xb, out)
        return time.perf_counter() - t

    head()
    for r in range(args.rounds):
        a = statistics.median(step() for _ in range(args.steps))
        b = statistics.median(head() for _ in range(args.steps))
        print(f"round {r + 1}: decode step {a * 1e3:.1f} ms, output matvec alone {b * 1e3:.1f} ms "
              f"(share {b / a:.2f}), {args.threads} thread(s)")


if __name__ == "__main__":
    main()
