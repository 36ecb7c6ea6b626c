"""`llm quantize` against llama.cpp's quantizer on a 1B-shape F16 model (Llama-3.2-1B shapes, random weights).

    python benchmarks/bench_quantize.py [--threads 2] [--repeats 3] [--types q4_0,q8_0] [--keep]
    python benchmarks/bench_quantize.py --types q4_k_m --repeats 1        # a K-quant mix (llama.cpp's policy)
    python benchmarks/bench_quantize.py --kld HF_FOLDER [--windows 8]   # what --optimize buys
    python benchmarks/bench_quantize.py --kld HF_FOLDER --kquants       # the same for Q4_K_M / Q5_K_M

Both run end to end as separate processes (start-up, reading the F16 file, writing the result) with the
same thread count, alternating, after one warm-up run each (numba's cache and the page cache are warm).
Reports the median wall time with its spread, the CPU time, and output size. llama.cpp runs through
llama-cpp-python's `llama_model_quantize` with `pure` set for the legacy types, so both write the same types
everywhere; for a K-quant mix both apply llama.cpp's per-tensor policy (and write the same file).
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

import numpy as np

# Llama-3.2-1B: 16 layers, 2048 wide, 32 heads (8 KV), FFN 8192, 128256 tokens, tied embeddings
SHAPE = dict(n_embd=2048, n_layers=16, n_head=32, n_kv=8, n_ff=8192, n_vocab=128256)
WORK = Path(os.environ.get("BENCH_DIR", Path(tempfile.gettempdir()) / "llm-bench-quantize"))
LLAMA_FTYPE = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
               "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def make_model(path: Path, n_layers: int = SHAPE["n_layers"]) -> Path:
    """Write the random F16 model once (about 2.5 GB with all 16 layers); weights ~ N(0, 0.02), norms 1."""
    if path.exists():
        return path
    from gguf import GGUFWriter

    s = {**SHAPE, "n_layers": n_layers}
    hd = s["n_embd"] // s["n_head"]
    tensors = [("token_embd.weight", (s["n_vocab"], s["n_embd"])), ("output_norm.weight", (s["n_embd"],))]
    for i in range(s["n_layers"]):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (s["n_embd"],)), (p + "ffn_norm.weight", (s["n_embd"],)),
                    (p + "attn_q.weight", (s["n_head"] * hd, s["n_embd"])),
                    (p + "attn_k.weight", (s["n_kv"] * hd, s["n_embd"])),
                    (p + "attn_v.weight", (s["n_kv"] * hd, s["n_embd"])),
                    (p + "attn_output.weight", (s["n_embd"], s["n_head"] * hd)),
                    (p + "ffn_gate.weight", (s["n_ff"], s["n_embd"])), (p + "ffn_up.weight", (s["n_ff"], s["n_embd"])),
                    (p + "ffn_down.weight", (s["n_embd"], s["n_ff"]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w = GGUFWriter(tmp, "llama")
    w.add_name("bench-1b")
    w.add_context_length(4096)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layers"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(s["n_vocab"])
    w.add_file_type(1)
    for name, shape in tensors:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in tensors:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()
    tmp.rename(path)
    return path


def run_llm(src: Path, out: Path, qtype: str, threads: int) -> None:
    # a cache of our own: kernels edited meanwhile in the source tree must not trigger a recompile mid-run
    env = {"NUMBA_CACHE_DIR": str(WORK / "numba-cache"), **os.environ, "NUMBA_NUM_THREADS": str(threads)}
    pure = ["--pure"] if qtype in LEGACY else []
    subprocess.run([sys.executable, "-m", "llmcli", "quantize", str(src), "-t", qtype, "-o", str(out), *pure,
                    "--threads", str(threads)], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def run_llamacpp(src: Path, out: Path, qtype: str, threads: int) -> None:
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.nthread = {threads}; p.ftype = {LLAMA_FTYPE[qtype]}; p.pure = {qtype in LEGACY}\n"
        f"rc = llama_cpp.llama_model_quantize({str(src)!r}.encode(), {str(out)!r}.encode(), p)\n"
        "sys.exit(rc)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid.txt"


def kld_table(hf_dir: Path, n_windows: int, ctx: int = 512, kquants: bool = False, text_path: Path = WIKITEXT) -> None:
    """KL divergence of q4_0 / q5_0 (default rounding and --optimize) against the F16 conversion, on
    wikitext-2 windows scored as `llm perplexity` does. Logits come from transformers loading each GGUF
    (an independent reader and forward pass; much faster than the numpy reference backend on CPU)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from llmcli.perplexity import log_softmax, windows
    from llmcli.quantize import quantize

    text = text_path.read_text()
    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    wins = windows(ids, ctx, n_windows, None)
    first = ctx // 2
    WORK.mkdir(parents=True, exist_ok=True)
    variants = [("f16", {}), ("q4_0", {}), ("q4_0", {"optimize": True}), ("q5_0", {}), ("q5_0", {"optimize": True})]
    if kquants:  # without --optimize llm's file is llama.cpp's Q4_K_M / Q5_K_M byte for byte (tests/test_kquants.py)
        variants = [("f16", {}), ("q4_k_m", {}), ("q4_k_m", {"optimize": True}), ("q5_k_m", {}),
                    ("q5_k_m", {"optimize": True})]
    base, rows = None, []
    for qtype, opts in variants:
        label = qtype + (" --optimize" if opts else "")
        path = WORK / f"kld-{qtype}{'-opt' if opts else ''}.gguf"
        t0 = time.perf_counter()
        quantize(str(hf_dir), qtype, path, **opts)
        q_s = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        logps = []
        with torch.no_grad():
            for w in wins:
                logits = model(torch.tensor(w[None].astype(np.int64))).logits[0, first:ctx - 1].numpy()
                logps.append(log_softmax(logits).astype(np.float32))
        del model
        targets = np.concatenate([w[first + 1:] for w in wins])
        logp = np.concatenate(logps)
        ppl = float(np.exp(-logp[np.arange(len(targets)), targets].astype(np.float64).mean()))
        if base is None:
            base = logp
            rows.append((label, ppl, 0.0, 0.0, 1.0, q_s, path.stat().st_size))
            continue
        kl = (np.exp(base.astype(np.float64)) * (base - logp)).sum(axis=1)
        top1 = float((base.argmax(1) == logp.argmax(1)).mean())
        rows.append((label, ppl, float(kl.mean()), float(np.percentile(kl, 99)), top1, q_s, path.stat().st_size))
        print(rows[-1], flush=True)
    print(f"\n{len(targets)} scored tokens ({len(wins)} windows of {ctx}), default type policy\n")
    print("| file | PPL | KLD mean | KLD p99 | top-1 agree | quantize s | size |")
    print("|---|---|---|---|---|---|---|")
    for label, ppl, kld, p99, top1, q_s, size in rows:
        print(f"| {label} | {ppl:.3f} | {kld:.5f} | {p99:.4f} | {100 * top1:.2f} % | {q_s:.1f} | "
              f"{size / 1e6:.1f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="q4_0")
    ap.add_argument("--layers", type=int, default=SHAPE["n_layers"], help="cut the model to this many layers")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--kld", type=Path, help="an HF model folder: measure --optimize's KL divergence instead")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--kquants", action="store_true", help="with --kld: Q4_K_M and Q5_K_M instead of Q4_0/Q5_0")
    ap.add_argument("--text", type=Path, default=WIKITEXT, help="with --kld: the text scored (wikitext-2 valid)")
    args = ap.parse_args()
    if args.kld:
        kld_table(args.kld, args.windows, kquants=args.kquants, text_path=args.text)
        return
    layers = args.layers
    src = make_model(WORK / ("bench-1b-f16.gguf" if layers == SHAPE["n_layers"] else f"bench-1b-{layers}l-f16.gguf"),
                     layers)
    per_layer = 2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    n_weights = 128256 * 2048 + 2048 + layers * per_layer
    rows = []
    for qtype in args.types.split(","):
        runners = {"llm": run_llm}
        try:
            import llama_cpp  # noqa: F401

            runners["llama.cpp"] = run_llamacpp
        except ImportError:
            print("llama_cpp not importable: timing llm alone", file=sys.stderr)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
        outs = {k: WORK / f"out-{k}-{qtype}.gguf" for k in runners}
        for name, fn in runners.items():
            fn(src, outs[name], qtype, args.threads)  # warm-up
        for _ in range(args.repeats):
            for name, fn in runners.items():
                results[name].append(timed(fn, src, outs[name], qtype, args.threads))
        for name, runs in results.items():
            walls = sorted(r[0] for r in runs)
            cpus = sorted(r[1] for r in runs)
            size = outs[name].stat().st_size
            rows.append({"tool": name, "type": qtype, "threads": args.threads,
                         "wall_median_s": round(statistics.median(walls), 2), "wall_min_s": round(walls[0], 2),
                         "wall_max_s": round(walls[-1], 2), "cpu_median_s": round(statistics.median(cpus), 2),
                         "out_bytes": size, "mweights_per_s": round(n_weights / 1e6 / statistics.median(walls), 1)})
            print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            for p in outs.values():
                p.unlink(missing_ok=True)
    print("\n| tool | type | threads | wall median (min–max) s | CPU s | output |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['type']} | {r['threads']} | {r['wall_median_s']} ({r['wall_min_s']}–"
              f"{r['wall_max_s']}) | {r['cpu_median_s']} | {r['out_bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
