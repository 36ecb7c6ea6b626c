"""Throughput of the numba matrix-vector kernels, one thread, CPU time (robust on a shared machine).

    python benchmarks/bench_kernels.py                      # every format on random matrices (cache-resident):
                                                            # matrix-vector product, and dequantizing (prompt path)
    python benchmarks/bench_kernels.py --model FILE.gguf    # every matrix of a model once, as decoding reads them
    python benchmarks/bench_kernels.py --kl FILE.gguf       # what the int16 activations cost: numba vs numpy logits
                                                            # (decode stack and prompt path)
    python benchmarks/bench_kernels.py --rounding FILE.gguf # the numpy reference on rounded activations (int8, int16)
    python benchmarks/bench_kernels.py --against OTHER_SIMD.py [--formats q4_0,q8_0]
                                                            # a variant of quant/simd.py against it, in one process
    python benchmarks/bench_kernels.py --gemm [--formats q4_0,q8_0]
                                                            # the prompt path's integer GEMM against BLAS on
                                                            # dequantized float32, 512 tokens, 1 and 2 threads
    python benchmarks/bench_kernels.py --streaming          # the Q4_0 kernel streaming 302 MB from memory at
                                                            # 1 and 2 threads, next to the parallel-sum bandwidth
    python benchmarks/bench_kernels.py --tokens [--formats q4_0,q4_k,q6_k]
                                                            # T = 1, 2, 4, 8 tokens through matvec (each block
                                                            # decoded once for up to 8) vs the one-token kernel
                                                            # per token, one thread, CPU time
    python benchmarks/bench_kernels.py --steps FILE.gguf [--threads 1]
                                                            # CPU time of a batched decode step of 1, 2, 4, 8
                                                            # conversations (forward_batch), median of 7
    python benchmarks/bench_kernels.py --long-rows [--formats q4_0,q4_k,q6_k]
                                                            # the same bytes as rows of 2048, 8192, 16384
                                                            # weights, one thread, CPU time

Prints a table (GB/s of weights read, G weights/s) and, with --json, writes the numbers.
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


def best_cpu_seconds(fn, reps: int, rounds: int = 7) -> float:
    """Least CPU time per call over `rounds` rounds of `reps` calls."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t) / reps)
    return best


def random_formats(shapes: list[tuple[int, int]]) -> list[dict]:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from test_kernels import random_k_blocks

    from quant.kernels import activation_blocks, dequant_rows, matvec, prepare, weight_views

    rng = np.random.default_rng(0)
    rows_out = []
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32):
        for rows, n in shapes:
            if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
                n = n // 256 * 256  # whole super-blocks
                raw = random_k_blocks(qtype, rows, n, rng)
            else:
                w = rng.standard_normal((rows, n)).astype(np.float32)
                raw = w if qtype == Q.F32 else quants.quantize(w, qtype)
            raw = np.ascontiguousarray(raw).view(np.uint8)
            wv = weight_views(raw)
            x = rng.standard_normal((1, n)).astype(np.float32)
            xs = activation_blocks(1, n)
            prepare(x, xs)
            out = np.empty((1, rows), dtype=np.float32)
            reps = max(3, int(1e8 // raw.nbytes))
            s = best_cpu_seconds(lambda: matvec(wv, int(qtype), 0, rows, x, xs, out), reps)  # noqa: B023
            tile = np.empty((rows, n), dtype=np.float32)  # the prompt path's weight tiles
            sd = best_cpu_seconds(lambda: dequant_rows(wv, int(qtype), 0, n, 0, tile), reps)  # noqa: B023
            rows_out.append({"format": qtype.name, "shape": f"{rows}x{n}", "mb": raw.nbytes / 1e6,
                             "gb_s": raw.nbytes / s / 1e9, "gweights_s": rows * n / s / 1e9,
                             "dequant_gweights_s": rows * n / sd / 1e9})
    return rows_out


def model_pass(path: Path) -> dict:
    """Every 2-D tensor of the model multiplied once by a random vector, in file order: CPU ms per pass."""
    from backends.numba import _mmap_root
    from quant.gguf_file import read_gguf
    from quant.kernels import activation_blocks, matvec, prepare, weight_views

    gguf = read_gguf(path)
    root = _mmap_root(gguf)
    wv, base = weight_views(root), root.ctypes.data
    jobs, total = [], 0
    for t in gguf.tensors.values():
        if len(t.shape) != 2:
            continue
        rows, n = t.shape
        x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
        xs = activation_blocks(1, n)
        prepare(x, xs)
        jobs.append((int(t.qtype), t.data.ctypes.data - base, rows, x, xs, np.empty((1, rows), dtype=np.float32)))
        total += t.data.nbytes

    def one_pass():
        for qtype, off, rows, x, xs, out in jobs:
            matvec(wv, qtype, off, rows, x, xs, out)

    s = best_cpu_seconds(one_pass, 1)
    return {"model": path.name, "mb": total / 1e6, "cpu_ms": s * 1e3, "gb_s": total / s / 1e9}


def kl_against_numpy(path: Path, n_tokens: int = 256) -> list[dict]:
    """Per-position KL(numpy || numba) of the next-token distributions over the first n_tokens of wikitext-2,
    and top-1 agreement: through the decode stack (the matvec kernels, chunks of SMALL_T tokens) and through the
    prompt path (the integer GEMM, one pass)."""
    import dataclasses

    from conftest import WIKITEXT
    from test_numba_backend import kl_per_position

    from backends import load_model
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    gguf = read_gguf(path)
    ids = np.array(Tokenizer.from_gguf(gguf).encode(WIKITEXT.read_text()[:20000])[:n_tokens])
    fast, ref = load_model(gguf, "numba", threads=1), load_model(gguf, "numpy")
    want = ref.forward(ids, ref.new_cache(len(ids)), all_logits=True)
    rows = []
    for label, min_t in (("decode stack", 1 << 30), ("prompt path", 1)):
        fast.options = dataclasses.replace(fast.options, gemm_min_t=min_t, gemm_min_t_cold=0)
        got = fast.forward(ids, fast.new_cache(len(ids)), all_logits=True)
        kl = kl_per_position(got, want)
        rows.append({"model": path.name, "path": label, "tokens": len(ids), "kl_mean": float(kl.mean()),
                     "kl_max": float(kl.max()), "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
                     "max_logit_diff": float(np.abs(got - want).max())})
    return rows


def against(variant: Path, formats: list[str]) -> list[dict]:
    """quant/simd.py (A) against a variant file of it (B): both compiled in this process, their int16 kernels
    timed in turn, one thread, CPU time, median of 11 rounds; on a cache-resident matrix and on one streamed from
    memory (2048 x 2048 repeated to 604 MB, the 1B model's size). Results must agree."""
    import importlib.util

    from numba import njit
    from test_kernels import weights

    from quant import simd
    from quant.kernels import activation_blocks, prepare

    spec = importlib.util.spec_from_file_location("simd_variant", variant)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)

    def rows_loop(module, name):
        dot = getattr(module, "dot_" + name)

        @njit
        def run(u8, rows, rb, nb, xq, xd, xs, xc, out):
            for r in range(rows):
                out[r] = dot(u8, r * rb, xq, xd, xs, xc, nb)
        return run

    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(0)
    result = []
    for name in formats:
        qtype = Q[name.upper()]
        for rows, n, repeat in [(8192, 2048, 1), (2048, 2048, 64)]:
            raw = np.ascontiguousarray(np.concatenate([weights(qtype, rows, n, rng).view(np.uint8)] * repeat))
            x = rng.standard_normal((1, n)).astype(np.float32)
            xb = activation_blocks(1, n)
            prepare(x, xb)
            nb = n // (256 if name.endswith("_k") else 32)
            args = (raw.reshape(-1), raw.shape[0], raw.shape[1], nb, xb[1][0], xb[2][0], xb[0][0], xb[3][0])
            runs = [rows_loop(simd, name), rows_loop(other, name)]
            outs = [np.empty(raw.shape[0], np.float32) for _ in runs]
            for run, out in zip(runs, outs, strict=True):
                run(*args, out)
            np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-3)
            times: list[list[float]] = [[], []]
            reps = max(1, int(1e8 // raw.nbytes))
            for _ in range(11):
                for run, out, t in zip(runs, outs, times, strict=True):
                    t0 = time.process_time()
                    for _ in range(reps):
                        run(*args, out)
                    t.append((time.process_time() - t0) / reps)
            a, b = (float(np.median(t)) for t in times)
            result.append({"format": name, "matrix": f"{raw.shape[0]}x{n}", "a_gb_s": raw.nbytes / a / 1e9,
                           "b_gb_s": raw.nbytes / b / 1e9, "b_over_a": a / b})
    return result


def long_rows(formats: list[str]) -> list[dict]:
    """One thread streaming ~270 MB of a format (a 2048x2048 matrix's bytes repeated 64 times) as rows of 2048,
    8192 and 16384 weights; CPU time, medians of 9 rounds taking turns."""
    from gguf import GGMLQuantizationType as Q
    from numba import njit
    from test_kernels import weights

    from quant import simd
    from quant.kernels import activation_blocks, prepare

    rng = np.random.default_rng(0)
    result = []
    for name in formats:
        dot = getattr(simd, "dot_" + name)

        @njit
        def run(u8, rows, rb, nb, xq, xd, xs, xc, out, dot=dot):
            for r in range(rows):
                out[r] = dot(u8, r * rb, xq, xd, xs, xc, nb)

        cases = []
        for rows, n in [(2048, 2048), (512, 8192), (256, 16384)]:
            one = weights(Q[name.upper()], rows, n, rng).view(np.uint8)
            raw = np.ascontiguousarray(np.concatenate([one] * (64 * 2048 * 2048 // (rows * n))))
            x = rng.standard_normal((1, n)).astype(np.float32)
            xb = activation_blocks(1, n)
            prepare(x, xb)
            nb = n // (256 if name.endswith("_k") else 32)
            cases.append((n, (raw.reshape(-1), raw.shape[0], raw.shape[1], nb, xb[1][0], xb[2][0], xb[0][0],
                              xb[3][0], np.empty(raw.shape[0], np.float32)), raw.nbytes, []))
            run(*cases[-1][1])
        for _ in range(9):
            for _, args, _, times in cases:
                t = time.process_time()
                run(*args)
                times.append(time.process_time() - t)
        base = cases[0][2] / float(np.median(cases[0][3]))
        for n, _, nbytes, times in cases:
            gbs = nbytes / float(np.median(times))
            result.append({"format": name, "row": n, "gb_s": gbs / 1e9, "vs_2048": gbs / base})
    return result


def rounded(h: np.ndarray, bits: int, block: int, outlier: float) -> np.ndarray:
    """h (T, n) rounded to `bits`-bit integers with one scale per `block` values (0: per row); values beyond
    `outlier` times the row's rms (when > 0) are kept exact, as a sparse float part."""
    T, n = h.shape
    block = block or n
    keep = np.zeros_like(h)
    if outlier:
        big = np.abs(h) > outlier * np.sqrt((h * h).mean(-1, keepdims=True))
        keep, h = np.where(big, h, 0), np.where(big, 0, h)
    g = h.reshape(T, n // block, block)
    step = np.abs(g).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
    return ((np.rint(g / np.where(step == 0, 1, step)) * step).reshape(T, n) + keep).astype(np.float32)


def rounding_study(path: Path, n_tokens: int = 512) -> list[dict]:
    """The numpy reference with its matrix inputs rounded as an integer kernel would see them, against itself
    unrounded: per-position KL and top-1 over wikitext-2, and whether greedy decoding of the test prompts
    changes. What decided int16 copies per block of 32 over llama.cpp's int8 ones."""
    from conftest import WIKITEXT
    from test_numba_backend import PROMPTS, greedy, kl_per_position

    from backends import load_model
    from backends.numpy import NumpyModel
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    class Rounded(NumpyModel):
        def __init__(self, gguf, hp, bits, block, outlier, only):
            super().__init__(gguf, hp)
            self.cfg, self.only = (bits, block, outlier), only

        def matmul(self, h, name):
            if self.only in name:
                h = rounded(h, *self.cfg)
            return h @ self.w(name).T

    gguf = read_gguf(path)
    ref = load_model(gguf, "numpy")
    ids = np.array(Tokenizer.from_gguf(gguf).encode(WIKITEXT.read_text()[:20000])[:n_tokens])
    want = ref.forward(ids, ref.new_cache(len(ids)), all_logits=True)
    want_greedy = [greedy(ref, p, 64) for p in PROMPTS]
    rows = []
    for label, bits, block, outlier, only in [("int8 per 32", 8, 32, 0, ""),
                                              ("int8 per 32, outliers > 6 rms kept in float", 8, 32, 6, ""),
                                              ("int8 per 32 into ffn_down only", 8, 32, 0, "ffn_down"),
                                              ("int16 per row", 16, 0, 0, ""), ("int16 per 32", 16, 32, 0, "")]:
        m = Rounded(gguf, ref.hparams, bits, block, outlier, only)
        got = m.forward(ids, m.new_cache(len(ids)), all_logits=True)
        kl = kl_per_position(got, want)
        same = sum(greedy(m, p, 64) == g for p, g in zip(PROMPTS, want_greedy, strict=True))
        rows.append({"copy": label, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                     "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
                     "greedy_same": f"{same}/{len(PROMPTS)}"})
    return rows


def _gemm_runners(raw: np.ndarray, qtype: int, w: np.ndarray, x: np.ndarray, pool):
    """(integer GEMM, BLAS) of x @ W.T, each called with a thread count (1 here, or 2 on `pool`)."""
    from quant.gemm import GROUP, gemm_groups, packed_buffers, padded_activation
    from quant.kernels import weight_views

    rows, n = w.shape
    u8 = weight_views(raw)[0]
    descs = np.array([[0, qtype, rows]], dtype=np.int64)
    packed = [packed_buffers(n) for _ in range(2)]
    groups = -(-rows // GROUP)

    def spread(work, threads):
        if threads == 1:
            work(0)
        else:
            list(pool.map(work, range(threads)))

    def int_gemm(threads):
        xb, tp = padded_activation(x, spread, threads)
        out = np.empty((tp, groups * GROUP), dtype=np.float32)
        bounds = [groups * i // threads for i in range(threads + 1)]
        spread(lambda i: gemm_groups(u8, descs, bounds[i], bounds[i + 1], xb, packed[i], out), threads)

    def blas(threads):
        out = np.empty((x.shape[0], rows), dtype=np.float32)
        step = -(-rows // threads)
        spread(lambda i: np.matmul(x, w[i * step:(i + 1) * step].T, out=out[:, i * step:(i + 1) * step]), threads)

    return int_gemm, blas


def gemm_vs_blas(formats: list[str], T: int = 512) -> list[dict]:
    """The integer GEMM (quant/gemm.py, including packing its groups and preparing x) against BLAS float32
    multiplying the same matrix already dequantized (the BLAS path also dequantizes its tiles: not counted), on
    SmolLM2's and the 1B shape's matrices: G multiply-adds per second, wall time, medians of 7 alternating runs;
    2 threads as the backend runs them (each a range of groups, or of rows for BLAS)."""
    from concurrent.futures import ThreadPoolExecutor

    from gguf import GGMLQuantizationType as Q
    from test_kernels import reference, weights
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(2)
    out_rows = []
    for name in formats:
        qtype = Q[name.upper()]
        for rows, n in [(1536, 576), (576, 1536), (8192, 2048), (2048, 8192)]:
            if name.endswith("_k"):
                n = n // 256 * 256  # whole super-blocks (SmolLM2's 576 -> 512)
            raw = np.ascontiguousarray(weights(qtype, rows, n, rng)).view(np.uint8)
            x = rng.standard_normal((T, n)).astype(np.float32)
            runners = _gemm_runners(raw, int(qtype), reference(raw, qtype, n), x, pool)
            with threadpool_limits(1, user_api="blas"):
                for threads in (1, 2):
                    times: list[list[float]] = [[], []]
                    for _ in range(7):
                        for fn, t in zip(runners, times, strict=True):
                            t0 = time.perf_counter()
                            fn(threads)
                            t.append(time.perf_counter() - t0)
                    ti, tb = (float(np.median(t)) for t in times)
                    macs = rows * n * T
                    out_rows.append({"format": name, "matrix": f"{rows}x{n}", "tokens": T, "threads": threads,
                                     "int16_gmacs": macs / ti / 1e9, "blas_gmacs": macs / tb / 1e9,
                                     "speedup": tb / ti})
    return out_rows


def streaming(threads_list=(1, 2)) -> list[dict]:
    """What the 1B-shape decode can reach at most: the Q4_0 matrix-vector kernel over a 302 MB matrix (far beyond
    the caches) as one parallel region, in 128 regions of 2.4 MB (a decode token runs ~65 regions of 2.4-19 MB),
    and with rows of 8192 weights (the 1B shape's down projection) instead of 2048; beside bench_decode's read
    bandwidth (a parallel float32 sum over 1 GiB) at the same thread count. Wall time, medians of 5."""
    import numba
    from bench_decode import read_bandwidth_gbs
    from gguf import GGMLQuantizationType as Q
    from numba import njit, prange
    from test_kernels import weights

    from quant import simd
    from quant.kernels import activation_blocks, prepare

    @njit(parallel=True)
    def region(u8, off, rows, rb, nb, xq, xd, xs, xc, out):
        for r in prange(rows):
            out[r] = simd.dot_q4_0(u8, off + r * rb, xq, xd, xs, xc, nb)

    @njit
    def regions(u8, k, rows, rb, nb, xq, xd, xs, xc, out):
        per = rows // k
        for i in range(k):
            region(u8, i * per * rb, per, rb, nb, xq, xd, xs, xc, out[i * per:])

    rng = np.random.default_rng(0)
    result = []
    for threads in threads_list:
        numba.set_num_threads(threads)
        row = {"threads": threads, "read_bandwidth_gbs": read_bandwidth_gbs(threads)}
        numba.set_num_threads(threads)
        for label, rows, n, k in [("one_region", 8192, 2048, 1), ("regions_2mb", 8192, 2048, 128),
                                  ("rows_8192", 2048, 8192, 1)]:
            one = weights(Q.Q4_0, rows, n, rng).view(np.uint8).reshape(-1)
            buf = np.concatenate([one] * 32)
            x = rng.standard_normal((1, n)).astype(np.float32)
            xb = activation_blocks(1, n)
            prepare(x, xb)
            out = np.empty(rows * 32, dtype=np.float32)
            args = (buf, k, rows * 32, n // 32 * 18, n // 32, xb[1][0], xb[2][0], xb[0][0], xb[3][0], out)
            regions(*args)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                regions(*args)
                times.append(time.perf_counter() - t0)
            row[label] = buf.nbytes / float(np.median(times)) / 1e9
        numba.set_num_threads(1)
        result.append(row)
    return result


def several_tokens(formats: list[str], tokens=(1, 2, 4, 8)) -> list[dict]:
    """The small-T path: matvec (each block decoded once for up to 8 tokens, quant/simd_multi.py) against the
    one-token kernel called per token (what matvec did before), on a 2048 x 2048 matrix (cache-resident: the step
    is compute-bound once tokens share it), one thread, CPU time, alternating; and each T's cost relative to
    T = 1."""
    from gguf import GGMLQuantizationType as Q
    from test_kernels import weights

    from quant import simd
    from quant.jit import njit
    from quant.kernels import (
        Q4_0,
        Q4_K,
        Q5_K,
        Q6_K,
        Q8_0,
        activation_blocks,
        dot_row,
        matvec,
        prepare,
        row_bytes,
        weight_views,
    )

    @njit(cache=False)
    def per_token(wv, qtype, rows, n, x, xb, out):  # the format's kernel called directly, as matvec did
        xs, xq, xd, xc = xb
        rb, u8, nb = row_bytes(qtype, n), wv[0], n // 32
        for r in range(rows):
            for t in range(x.shape[0]):
                if qtype == Q4_0:
                    out[t, r] = simd.dot_q4_0(u8, r * rb, xq[t], xd[t], xs[t], xc[t], nb)
                elif qtype == Q8_0:
                    out[t, r] = simd.dot_q8_0(u8, r * rb, xq[t], xd[t], xs[t], xc[t], nb)
                elif qtype == Q4_K:
                    out[t, r] = simd.dot_q4_k(u8, r * rb, xq[t], xd[t], xs[t], xc[t], nb // 8)
                elif qtype == Q5_K:
                    out[t, r] = simd.dot_q5_k(u8, r * rb, xq[t], xd[t], xs[t], xc[t], nb // 8)
                elif qtype == Q6_K:
                    out[t, r] = simd.dot_q6_k(u8, r * rb, xq[t], xd[t], xs[t], xc[t], nb // 8)
                else:
                    out[t, r] = dot_row(wv, qtype, r * rb, n, x[t], xs[t], xq[t], xd[t], xc[t])

    rng = np.random.default_rng(0)
    result = []
    for name in formats:
        qtype = Q[name.upper()]
        rows, n = 2048, 2048
        wv = weight_views(np.ascontiguousarray(weights(qtype, rows, n, rng)).view(np.uint8))
        base = None
        for T in tokens:
            x = rng.standard_normal((T, n)).astype(np.float32)
            xb = activation_blocks(T, n)
            prepare(x, xb)
            out = np.empty((T, rows), dtype=np.float32)
            new = best_cpu_seconds(lambda: matvec(wv, int(qtype), 0, rows, x, xb, out), 20)  # noqa: B023
            old = best_cpu_seconds(lambda: per_token(wv, int(qtype), rows, n, x, xb, out), 20)  # noqa: B023
            base = base or new
            result.append({"format": name, "T": T, "new_ms": new * 1e3, "per_token_ms": old * 1e3,
                           "speedup": old / new, "vs_t1": new / base})
    return result


def batch_steps(path: Path, threads: int, reps: int = 7) -> dict:
    """CPU time of one forward_batch step of B = 1, 2, 4, 8 conversations (a batched decode step, as `llm serve`
    runs it), median of `reps` after a warm-up: CPU time, since on a loaded machine wall time swings 2-3x."""
    import statistics

    from backends import load_model
    from quant.gguf_file import read_gguf

    model = load_model(read_gguf(path), "numba", threads)
    caches = model.new_caches(8, 512)
    for i, c in enumerate(caches):
        model.forward(np.arange(5, 10 + i, dtype=np.int64), c)
    ms = {}
    for B in (1, 2, 4, 8):
        times = []
        for _ in range(reps + 1):
            t0 = time.process_time()
            model.forward_batch(np.full(B, 17), caches[:B])
            times.append(time.process_time() - t0)
        ms[B] = statistics.median(times[1:]) * 1e3
    return {"model": path.name, "threads": threads, "step_cpu_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="a GGUF file (repeatable)")
    ap.add_argument("--kl", type=Path, action="append", help="a GGUF file (repeatable): numba vs numpy logits")
    ap.add_argument("--rounding", type=Path, help="a GGUF file: the reference on rounded activations")
    ap.add_argument("--against", type=Path, help="a variant of quant/simd.py to time against it")
    ap.add_argument("--formats", default="q4_0,q8_0",
                    help="for --against, --gemm, --long-rows: comma-separated format names")
    ap.add_argument("--gemm", action="store_true", help="the integer GEMM against BLAS float32")
    ap.add_argument("--streaming", action="store_true", help="the Q4_0 kernel streaming from memory, 1-2 threads")
    ap.add_argument("--long-rows", action="store_true", help="rows of 2048, 8192, 16384 weights, same bytes")
    ap.add_argument("--tokens", action="store_true", help="several tokens at once (T = 1, 2, 4, 8) vs per token")
    ap.add_argument("--steps", type=Path, help="a GGUF file: CPU time of forward_batch steps of 1, 2, 4, 8 tokens")
    ap.add_argument("--threads", type=int, default=1, help="for --steps")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import numba

    numba.set_num_threads(1)
    if args.steps:
        result = batch_steps(args.steps, args.threads)
        ms = result["step_cpu_ms"]
        print(json.dumps(result))
        print(" | ".join(f"B={b}: {v:.1f} ms ({v / ms[1]:.2f}x)" for b, v in ms.items()))
    elif args.tokens:
        result = several_tokens(args.formats.split(","))
        print("| format | T | several at once ms | per token ms | speed-up | cost vs T = 1 |\n"
              "|---|---:|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['format']} | {r['T']} | {r['new_ms']:.3f} | {r['per_token_ms']:.3f} | x{r['speedup']:.2f} | "
                  f"{r['vs_t1']:.2f} |")
    elif args.long_rows:
        result = long_rows(args.formats.split(","))
        print("| format | row length | GB/s | vs rows of 2048 |\n|---|---:|---:|---:|")
        for r in result:
            print(f"| {r['format']} | {r['row']} | {r['gb_s']:.2f} | {r['vs_2048']:.2f}x |")
    elif args.streaming:
        result = streaming()
        print("| threads | read bandwidth GB/s | kernel, one region | in regions of 2.4 MB | rows of 8192 |\n"
              "|---:|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['threads']} | {r['read_bandwidth_gbs']:.1f} | {r['one_region']:.1f} | "
                  f"{r['regions_2mb']:.1f} | {r['rows_8192']:.1f} |")
    elif args.gemm:
        result = gemm_vs_blas(args.formats.split(","))
        print("| format | matrix | tokens | threads | integer GEMM G MAC/s | BLAS float32 G MAC/s | speed-up |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['format']} | {r['matrix']} | {r['tokens']} | {r['threads']} | {r['int16_gmacs']:.1f} | "
                  f"{r['blas_gmacs']:.1f} | x{r['speedup']:.2f} |")
    elif args.against:
        result = against(args.against, args.formats.split(","))
        print("| format | matrix | quant/simd.py GB/s | variant GB/s | variant speed |\n|---|---|---:|---:|---:|")
        for r in result:
            print(f"| {r['format']} | {r['matrix']} | {r['a_gb_s']:.2f} | {r['b_gb_s']:.2f} | x{r['b_over_a']:.3f} |")
    elif args.rounding:
        result = rounding_study(args.rounding)
        print("| activation copy | KL mean | KL max | top-1 | greedy 64 tokens unchanged |\n|---|---:|---:|---:|---|")
        for r in result:
            print(f"| {r['copy']} | {r['kl_mean']:.1e} | {r['kl_max']:.1e} | {100 * r['top1']:.1f} % | "
                  f"{r['greedy_same']} prompts |")
    elif args.kl:
        result = [r for p in args.kl for r in kl_against_numpy(p)]
        print("| model | path | tokens | KL mean | KL max | top-1 agreement | max logit difference |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['model']} | {r['path']} | {r['tokens']} | {r['kl_mean']:.1e} | {r['kl_max']:.1e} | "
                  f"{r['top1']:.4f} | {r['max_logit_diff']:.3g} |")
    elif args.model:
        result = [model_pass(p) for p in args.model]
        print("| model | weights MB | CPU ms per pass | GB/s |\n|---|---:|---:|---:|")
        for r in result:
            print(f"| {r['model']} | {r['mb']:.1f} | {r['cpu_ms']:.2f} | {r['gb_s']:.2f} |")
    else:
        result = random_formats([(8192, 2048), (1536, 576)])
        print("| format | matrix | MB | matvec GB/s | matvec G weights/s | dequantize G weights/s |\n"
              "|---|---|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['format']} | {r['shape']} | {r['mb']:.1f} | {r['gb_s']:.2f} | {r['gweights_s']:.2f} | "
                  f"{r['dequant_gweights_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
