"""KV cache types on the numba backend: decode speed at a deep context, KV bytes, and the logits' KL against f32.

    python benchmarks/bench_kvcache.py --threads 2 [--depth 4096] [--reps 5] [--kl-tokens 2048] [--json out.json]

Per model (SmolLM2-135M Q4_1 from the store; the 1B-shape random Q4_0 model of bench_decode.py):
- decode tok/s at `depth` cached positions for each type: the types take turns, one repetition of --tg single-token
  forwards each (warm-up excluded), medians with the spread (min..max). The cache is filled with encoded random
  keys and values rather than by a prefill: attention costs the same whatever the keys hold, and a 4096-token
  prefill per type would take minutes on a small machine.
- KV bytes at a context of `depth` (numba's layout: windowed layers keep rings; these models have none).
- SmolLM2 only: mean and max KL(f32 || type) of the next-token distribution per position over --kl-tokens tokens
  of wikitext-2, run through the cache in chunks of 512 as the engine's prefill does.

Targets (issue 18): q8_0 decode >= 1.0x f32's at depth 4096, KV bytes <= 0.3x, mean KL < 1e-3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
TYPES = ("f32", "f16", "q8_0")
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"


def filled_cache(model, kv_type: str, depth: int, extra: int):
    """A cache of depth + extra positions whose first `depth` hold encoded random keys and values."""
    from quant.kvtypes import encode

    hp = model.hparams
    cache = model.new_cache(depth + extra, kv_type)
    rng = np.random.default_rng(0)
    for i in range(hp.n_layers):
        for store in cache.layer(i):
            rows = rng.standard_normal((hp.n_kv_heads, depth, hp.head_dim)).astype(np.float32)
            store[:, :depth] = encode(rows, kv_type)
    cache.offset = depth
    return cache


def decode_tps(model, cache, depth: int, n: int) -> float:
    cache.offset = depth
    token = np.array([1], dtype=np.int64)
    t0 = time.perf_counter()
    for _ in range(n):
        model.forward(token, cache)
    return n / (time.perf_counter() - t0)


def prefill_tps(model, kv_type: str, n: int) -> float:
    """n tokens on an empty cache (the prompt path), tok/s."""
    cache = model.new_cache(n, kv_type)
    tokens = np.random.default_rng(1).integers(0, model.hparams.n_vocab, n)
    t0 = time.perf_counter()
    model.forward(tokens, cache)
    return n / (time.perf_counter() - t0)


def kl_figures(model, ids: list[int]) -> dict:
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def logits(kv_type):
        cache = model.new_cache(len(ids), kv_type)
        return np.concatenate([model.forward(np.asarray(ids[a:a + 512]), cache, all_logits=True)
                               for a in range(0, len(ids), 512)])

    ref = log_softmax(logits("f32"))
    out = {}
    for kv_type in TYPES[1:]:
        lq = log_softmax(logits(kv_type))
        kl = (np.exp(ref) * (ref - lq)).sum(-1)
        out[kv_type] = {"mean": float(kl.mean()), "max": float(kl.max()),
                        "top1_agree": float((ref.argmax(-1) == lq.argmax(-1)).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--tg", type=int, default=16, help="decode steps per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--pp", type=int, default=0, help="also time a prefill of this many tokens per type")
    ap.add_argument("--models", default="smollm2,1b")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from bench_decode import prepare_models

    from backends import load_model
    from backends.base import kv_cache_bytes
    from llmcli.store import ensure_smollm2
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    paths = {"smollm2": ("SmolLM2-135M Q4_1", ensure_smollm2())}
    if "1b" in args.models:
        paths["1b"] = ("1B-shape random Q4_0", prepare_models()["1B-shape random Q4_0"])
    results = {"depth": args.depth, "threads": args.threads, "models": {}}
    for key in args.models.split(","):
        label, path = paths[key]
        gguf = read_gguf(path)
        model = load_model(gguf, "numba", args.threads)
        hp = model.hparams
        caches = {t: filled_cache(model, t, args.depth, args.tg + 1) for t in TYPES}
        for t in TYPES:  # warm-up: compile or load each type's kernels
            decode_tps(model, caches[t], args.depth, 2)
        runs = {t: [] for t in TYPES}
        for _ in range(args.reps):
            for t in TYPES:
                runs[t].append(decode_tps(model, caches[t], args.depth, args.tg))
        r = {"kv_bytes": {t: kv_cache_bytes(hp, args.depth, kv_type=t) for t in TYPES}, "decode_tps": {}}
        for t in TYPES:
            r["decode_tps"][t] = {"median": statistics.median(runs[t]), "min": min(runs[t]), "max": max(runs[t])}
        if args.pp:
            pp = {t: [] for t in TYPES}
            for _ in range(args.reps + 1):  # the first round is the warm-up
                for t in TYPES:
                    pp[t].append(prefill_tps(model, t, args.pp))
            r["prefill_tps"] = {t: {"median": statistics.median(v[1:]), "min": min(v[1:]), "max": max(v[1:])}
                                for t, v in pp.items()}
        del caches
        if key == "smollm2" and args.kl_tokens:
            ids = Tokenizer.from_gguf(gguf).encode(WIKITEXT.read_text(encoding="utf-8")[:40 * args.kl_tokens])
            r["kl"] = kl_figures(model, ids[:args.kl_tokens])
            r["kl_tokens"] = min(len(ids), args.kl_tokens)
        results["models"][label] = r
        f32 = r["decode_tps"]["f32"]["median"]
        print(f"\n{label}: decode at depth {args.depth}, {args.threads} threads, median of {args.reps} x {args.tg} "
              "tokens (min..max)")
        print(f"{'type':6} {'tok/s':>22} {'vs f32':>7} {'KV MiB':>8} {'vs f32':>7} {'mean KL':>9} {'max KL':>9}")
        for t in TYPES:
            d = r["decode_tps"][t]
            kb = r["kv_bytes"][t]
            kl = r.get("kl", {}).get(t)
            kls = f"{kl['mean']:9.2e} {kl['max']:9.2e}" if kl else f"{'-':>9} {'-':>9}"
            print(f"{t:6} {d['median']:8.2f} ({d['min']:5.2f}..{d['max']:5.2f}) {d['median'] / f32:7.2f} "
                  f"{kb / 2**20:8.1f} {kb / r['kv_bytes']['f32']:7.3f} {kls}")
        if args.pp:
            base = r["prefill_tps"]["f32"]["median"]
            print(f"prefill of {args.pp} tokens on an empty cache, tok/s: " + ", ".join(
                f"{t} {v['median']:.1f} ({v['min']:.1f}..{v['max']:.1f}) {v['median'] / base:.2f}x"
                for t, v in r["prefill_tps"].items()))
        sys.stdout.flush()
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.rename(args.json)


if __name__ == "__main__":
    main()
