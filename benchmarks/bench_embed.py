"""Embeddings: llm's engine against llama-cpp-python on the same GGUF file, same threads, mean pooling.

Texts are cut from WikiText-2 to a token length; each round embeds the same batch with each engine in turn
(alternating, in one process: the calls never overlap), and reports texts per second, medians of the rounds.
The vectors are compared too: llama.cpp rounds activations to 8 bits, so its vectors differ a little from a
float engine's; the cosine says how little.

    python benchmarks/bench_embed.py [MODEL] [--lengths 16,128,512] [--batch 16] [--rounds 5] [--threads 2]
                                     [--json FILE]
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
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"


def texts_of(tokenizer, n_tokens: int, count: int) -> list[str]:
    """`count` texts of about n_tokens tokens each, consecutive pieces of WikiText-2."""
    words = WIKITEXT.read_text(encoding="utf-8").split()
    out, at = [], 0
    while len(out) < count:
        take = n_tokens
        while True:  # grow or shrink the word count until the text tokenizes to about n_tokens
            text = " ".join(words[at:at + take])
            n = len(tokenizer.encode(text))
            if abs(n - n_tokens) <= max(1, n_tokens // 20) or take <= 1:
                break
            take = max(1, take + (n_tokens - n) // 2 or (1 if n < n_tokens else -1))
        out.append(text)
        at += take
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO / ".test-models" / "models" / "smollm2" / "model.gguf"))
    ap.add_argument("--lengths", default="16,128,512", help="token lengths of the texts")
    ap.add_argument("--batch", type=int, default=16, help="texts per batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import llama_cpp

    from llmcli.engine import Session, load, normalized

    lm = load(Path(args.model), threads=args.threads)
    session = Session(lm, 2048)
    peer = llama_cpp.Llama(args.model, embedding=True, n_ctx=2048, n_batch=2048, n_ubatch=2048,
                           n_threads=args.threads, n_threads_batch=args.threads,
                           pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)

    def ours(texts):
        return [normalized(session.embed(lm.tokenizer.encode(t), "mean")) for t in texts]

    def theirs(texts):
        return peer.embed(texts, normalize=True)

    rows = []
    for n_tokens in (int(x) for x in args.lengths.split(",")):
        texts = texts_of(lm.tokenizer, n_tokens, args.batch)
        ours(texts[:2]), theirs(texts[:2])  # warm-up
        times = {"llm": [], "llama.cpp": []}
        for _ in range(args.rounds):
            for name, fn in (("llm", ours), ("llama.cpp", theirs)):
                t = time.perf_counter()
                vectors = fn(texts)
                times[name].append(time.perf_counter() - t)
                if name == "llm":
                    a = np.array(vectors)
                else:
                    b = np.array(vectors)
        cos = (a * b).sum(1)
        tokens = sum(len(lm.tokenizer.encode(t)) for t in texts)
        row = {"tokens_per_text": n_tokens, "texts": len(texts), "tokens": tokens,
               "llm_texts_per_s": len(texts) / statistics.median(times["llm"]),
               "llama_cpp_texts_per_s": len(texts) / statistics.median(times["llama.cpp"]),
               "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        row["ratio"] = row["llm_texts_per_s"] / row["llama_cpp_texts_per_s"]
        rows.append(row)
        print(f"{n_tokens:>5} tokens x {len(texts)}: llm {row['llm_texts_per_s']:8.1f} texts/s, llama.cpp "
              f"{row['llama_cpp_texts_per_s']:8.1f} texts/s, ratio {row['ratio']:.2f}x; cosine min "
              f"{row['min_cosine']:.6f} mean {row['mean_cosine']:.6f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
