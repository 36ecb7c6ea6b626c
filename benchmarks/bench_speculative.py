"""Speculative decoding: tokens/s of plain greedy decoding against --lookup (and --draft) on an input-copying task
and on free-form text, with the acceptance rate and a check that the outputs are identical; and the cost of
verifying k tokens in one pass against one decode step, with the speedup that cost implies at a given acceptance.

    python benchmarks/bench_speculative.py --reps 5 --lookup 16 [--models smollm2,1b-wide,1b] [--draft Q8_0-copy]

Models: `smollm2` (the store's Q4_1 file); `1b-wide`, SmolLM2 embedded exactly in the 1B shape's widths (hidden
2048, 32/8 heads, ffn 8192; make_bench_models.widen): SmolLM2's function, 30 layers and vocabulary, at about the
1B shape's cost per layer, so a model of that width that copies its input; `1b`, the random-weight 1B shape,
which copies nothing: its verification-cost curve only.

Engines alternate within each repetition (plain, speculative, plain, ...) and the tables show medians, because
the machine is shared. Decode speed is the engine's own generation_tps (first token to last, prefill excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"

FREE_FORM = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def typo_paragraph(n_words: int = 110, every: int = 7) -> str:
    """The first wikitext-2 paragraph of at least n_words words, tidied, with two letters swapped in every
    `every`-th longer word (deterministic)."""
    text = WIKITEXT.read_text(encoding="utf-8")
    para = next(p.strip() for p in text.split("\n") if len(p.split()) >= n_words and not p.strip().startswith("="))
    para = re.sub(r" ([,.;:)]) ?", r"\1 ", para).replace("( ", "(").replace(" @-@ ", "-").replace(" @.@ ", ".")
    words = para.split()[:n_words]
    for i in range(3, len(words), every):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[:2] + w[3] + w[2] + w[4:]
    return " ".join(words)


def tasks() -> dict[str, str]:
    return {"copy (fix typos)": "Fix the typos in this paragraph. Reply with the corrected paragraph only.\n\n"
                                + typo_paragraph(),
            "free-form": FREE_FORM}


def generate(session, ids, config) -> tuple[str, dict]:
    session.reset()
    records = list(session.generate(ids, config))
    last = records[-1]
    return "".join(r.text for r in records), {"tps": last.generation_tps, "n": last.generation_tokens,
                                              "drafted": last.draft_tokens, "accepted": last.accepted_tokens}


def bench_model(path: Path, backend: str, threads: int, reps: int, max_tokens: int, lookup: int,
                draft: Path | None) -> list[dict]:
    from llmcli.engine import GenerationConfig, Session, encode_chat, load
    from llmcli.sampling import SamplingConfig
    from llmcli.speculative import SpeculativeConfig

    lm = load(path, backend, threads)
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0))
    engines = {"plain": Session(lm, 2048), f"lookup {lookup}": Session(lm, 2048, spec=SpeculativeConfig(lookup=lookup))}
    if draft is not None:
        engines[f"draft {draft.name}"] = Session(lm, 2048, spec=SpeculativeConfig(draft_max=lookup),
                                                 draft=load(draft, backend, threads))
    rows = []
    for task, prompt in tasks().items():
        ids = encode_chat(engines["plain"], [{"role": "user", "content": prompt}])
        for s in engines.values():  # warm-up: compiles/loads every path a timed run takes
            generate(s, ids, GenerationConfig(max_tokens=16, sampling=config.sampling))
        runs = {name: [] for name in engines}
        texts = {}
        for _ in range(reps):
            for name, s in engines.items():
                text, r = generate(s, ids, config)
                runs[name].append(r)
                texts.setdefault(name, text)
        plain_tps = float(np.median([r["tps"] for r in runs["plain"]]))
        for name, rs in runs.items():
            tps = [r["tps"] for r in rs]
            drafted, accepted = rs[0]["drafted"], rs[0]["accepted"]
            rows.append({"model": path.name, "task": task, "engine": name, "tokens": rs[0]["n"],
                         "tps_median": float(np.median(tps)), "tps_min": min(tps), "tps_max": max(tps),
                         "speedup": float(np.median(tps)) / plain_tps, "drafted": drafted, "accepted": accepted,
                         "acceptance": accepted / drafted if drafted else None,
                         "identical": texts[name] == texts["plain"]})
            print(f"  {path.name:28s} {task:18s} {name:26s} {rows[-1]['tps_median']:6.1f} tok/s "
                  f"x{rows[-1]['speedup']:.2f}  accepted {accepted}/{drafted}  identical {rows[-1]['identical']}",
                  flush=True)
    return rows


def verify_cost(path: Path, backend: str, threads: int, reps: int, ks=(1, 2, 3, 4, 8, 12, 16)) -> list[dict]:
    """Time of one forward of k+1 tokens (all logits; the pending token and k drafts) against one of 1 token,
    at depth 256, and the speedup that implies with every draft kept (a copying task) or with acceptance 0.7."""
    from llmcli.engine import load

    lm = load(path, backend, threads)
    m = lm.model
    cache = m.new_cache(1024, slack=max(ks))
    m.forward(np.arange(100, 356, dtype=np.int32) % lm.hparams.n_vocab, cache)
    depth = cache.offset
    times = {k: [] for k in (0, *ks)}
    for _ in range(reps):
        for k in times:
            t = time.perf_counter()
            m.forward(np.arange(500, 501 + k, dtype=np.int32), cache, all_logits=True)
            times[k].append(time.perf_counter() - t)
            cache.trim(cache.offset - depth)
    one = float(np.median(times[0]))
    rows = []
    for k in ks:
        cost = float(np.median(times[k])) / one

        def speedup(a, k=k, cost=cost):
            return (k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)) / cost

        rows.append({"model": path.name, "k": k, "verify_ms": 1000 * float(np.median(times[k])),
                     "decode_ms": 1000 * one, "cost_ratio": cost, "speedup_all_kept": speedup(1.0),
                     "speedup_at_0.7": speedup(0.7)})
        print(f"  {path.name:28s} k={k:2d}  verify {rows[-1]['verify_ms']:7.1f} ms  = {cost:5.2f} x decode "
              f"({1000 * one:.1f} ms)  speedup all kept x{speedup(1.0):.2f}, at 0.7 x{speedup(0.7):.2f}", flush=True)
    return rows


def widened_smollm2() -> Path:
    """SmolLM2 widened to the widths of the 1B shape, made into .test-models/numba/ on first use. Its matrices keep
    SmolLM2's types (Q4_1, the embedding Q8_0), so its logits are SmolLM2's: requantized to Q4_0 like the 1B shape,
    SmolLM2 stops copying the paragraph after a sentence and loops, and there is nothing left for lookup to find."""
    from bench_decode import MODELS, prepare_models
    from make_bench_models import widen, widths_of

    from llmcli.store import ensure_smollm2

    dst = MODELS / "smollm2-wide-1b.gguf"
    if not dst.exists():
        widen(ensure_smollm2(), dst, **widths_of(prepare_models()["1B-shape random Q4_0"]), qtype=None)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b-wide,1b")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--lookup", type=int, default=16)
    ap.add_argument("--draft", type=Path, default=None,
                    help="a draft model with SmolLM2's vocabulary (e.g. a Q4_0 copy)")
    ap.add_argument("--skip-verify", action="store_true", help="no verification-cost curve")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("LLMCLI_HOME", str(REPO / ".test-models"))
    from llmcli.store import ensure_smollm2

    out = {"speed": [], "verify": []}
    for name in args.models.split(","):
        if name in ("smollm2", "1b-wide"):
            path = ensure_smollm2() if name == "smollm2" else widened_smollm2()
            out["speed"] += bench_model(path, args.backend, args.threads, args.reps, args.max_tokens, args.lookup,
                                        args.draft)
            if not args.skip_verify:
                out["verify"] += verify_cost(path, args.backend, args.threads, args.reps)
        elif name == "1b":
            from bench_decode import prepare_models

            path = prepare_models()["1B-shape random Q4_0"]
            out["verify"] += verify_cost(path, args.backend, args.threads, args.reps)
        else:
            raise SystemExit(f"unknown model {name!r} (smollm2, 1b-wide, 1b)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
