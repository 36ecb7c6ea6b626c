"""The Q2_K and Q3_K matrix-vector kernels (quant/kernels_lowbit.py) next to Q4_K's, one thread, CPU time.

    python benchmarks/bench_lowbit.py [--json out.json]

Each format's random matrix (4096 x 2048: cache-resident; and the same bytes repeated to ~100 MB: streamed from
memory) goes through quant.kernels.matvec, the formats taking turns in every round; medians of 9 rounds. Prints
GB/s of weights read, G weights/s, and the row dequantization rate (the prompt path's weight tiles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numba
    from gguf import GGMLQuantizationType as Q
    from test_kernels import random_k_blocks
    from test_kernels_lowbit import random_blocks

    from quant.kernels import activation_blocks, dequant_rows, matvec, prepare, weight_views

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, n = 4096, 2048
    cases = []
    for qtype in (Q.Q4_K, Q.Q3_K, Q.Q2_K):
        one = (random_k_blocks if qtype == Q.Q4_K else random_blocks)(qtype, rows, n, rng)
        for label, repeat in (("cache", 1), ("memory", max(1, int(100e6 // one.nbytes)))):
            raw = np.ascontiguousarray(np.concatenate([one] * repeat)).view(np.uint8)
            x = rng.standard_normal((1, n)).astype(np.float32)
            xb = activation_blocks(1, n)
            prepare(x, xb)
            out = np.empty((1, raw.shape[0]), dtype=np.float32)
            wv = weight_views(raw)
            reps = max(1, int(50e6 // raw.nbytes))
            cases.append({"format": qtype.name, "where": label, "qtype": int(qtype), "wv": wv, "raw": raw, "x": x,
                          "xb": xb, "out": out, "reps": reps, "times": [], "dq": []})
    tile = np.empty((rows, n), dtype=np.float32)
    for c in cases:  # compile (or load) first
        matvec(c["wv"], c["qtype"], 0, c["raw"].shape[0], c["x"], c["xb"], c["out"])
        dequant_rows(c["wv"], c["qtype"], 0, n, 0, tile)
    for _ in range(9):
        for c in cases:
            t = time.process_time()
            for _ in range(c["reps"]):
                matvec(c["wv"], c["qtype"], 0, c["raw"].shape[0], c["x"], c["xb"], c["out"])
            c["times"].append((time.process_time() - t) / c["reps"])
            if c["where"] == "cache":
                t = time.process_time()
                dequant_rows(c["wv"], c["qtype"], 0, n, 0, tile)
                c["dq"].append(time.process_time() - t)
    result = []
    print("| format | matrix | MB | GB/s | G weights/s | dequant G weights/s |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        s, r = float(np.median(c["times"])), c["raw"].shape[0]
        dq = r * n / float(np.median(c["dq"])) / 1e9 if c["dq"] else float("nan")
        row = {"format": c["format"], "matrix": f"{r}x{n}", "where": c["where"], "mb": c["raw"].nbytes / 1e6,
               "gb_s": c["raw"].nbytes / s / 1e9, "gweights_s": r * n / s / 1e9, "dequant_gweights_s": dq}
        result.append(row)
        print(f"| {row['format']} | {row['matrix']} ({row['where']}) | {row['mb']:.1f} | {row['gb_s']:.2f} | "
              f"{row['gweights_s']:.2f} | {'' if c['where'] != 'cache' else f'{dq:.2f}'} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
