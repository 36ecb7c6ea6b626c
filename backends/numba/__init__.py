"""The Numba CPU backend: kernels that read the quantized blocks in the memory map.

Decoding (a few tokens per call) runs the whole layer stack in one jitted call (layers.forward_stack) with
integer block dot products; a prompt of GEMM_MIN_T tokens or more (GEMM_MIN_T_COLD before the first such prompt
in the process) goes through `_forward_gemm`, whose products are matrix x matrix: the integer GEMM of
quant/gemm.py (packed int16 codes x the int16 activation copies the matvec kernels use), or BLAS on dequantized
float32 tiles for the float formats.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from backends.base import (
    HParams,
    SimpleKVCache,
    layer_tensor_names,
    output_tensor,
    rope_inv_freq,
    weight_bytes_per_token,
)
from backends.numba import layers as L
from backends.numba.governor import ThreadGovernor
from quant.errors import BackendError, PromptError, UnsupportedError
from quant.gguf_file import GGUFFile, Tensor
from quant.kernels import (
    F32,
    KERNEL_TYPES,
    QUANTIZED_TYPES,
    activation_blocks,
    dequant_rows,
    matvec,
    prepare,
    weight_views,
)

SMALL_T = 8  # tokens per forward_stack call (its scratch buffers hold this many)
# Prompts of at least GEMM_MIN_T tokens go through the GEMM path (a fixed cost of packing or dequantizing every
# weight, then cheap per token); shorter ones run forward_stack over chunks of SMALL_T tokens (no fixed cost, the
# matvec kernels' cost per token). The crossover moves with the kernels' speed: re-measure with
# `python benchmarks/bench_start.py --crossover` (table in benchmarks/RESULTS.md; with the integer GEMM and its
# packing 16 rows at a time, SmolLM2 Q4_0, ms, GEMM path against chunks: 8 tokens 41-47 / 35-48 at 1 thread,
# 42-48 / 27-39 at 2; 12 tokens 40-41 / 52-53 at 1, 43-49 / 42-56 at 2; 16 tokens 50-51 / 68-75 at 1, 57-58 /
# 52-65 at 2).
GEMM_MIN_T = 12
# ... once the GEMM path's machine code is loaded in this process. Before, a fresh process's first prompt would
# pay ~50 ms to load it (`llm run MODEL "Hi"`, 31 tokens: 1.15 s against 1.09 s in chunks, alternating fresh
# processes), which a prompt this short does not earn back; so until a prompt of GEMM_MIN_T_COLD tokens has taken
# the GEMM path, shorter ones take the decode stack. (A chat's first turn usually loads it.)
GEMM_MIN_T_COLD = 32
_gemm_path_loaded = False  # the GEMM path has run in this process (its dispatchers hold their machine code)
# The prompt path splits each product across its own pool of --threads Python threads, each running GIL-free
# numba (the integer GEMM's groups; or a dequantization beside a single-threaded BLAS product for the formats it
# does not take, and the attention's score products): one set of threads, which sleep when idle.
# (BLAS's own thread pool beside numba's spun against it: with other jobs on the 2 cores, pp512 fell to 50 tok/s
# with two BLAS threads against 330 with one; a 31-token prompt took 3-7 s instead of 0.2 s.) A hand-off to the
# pool costs ~0.1 ms, so an integer GEMM smaller than SPLIT_MIN_WORK stays on the calling thread (SmolLM2's Q/K/V
# up to ~40 tokens), and so does preparing an activation smaller than PREPARE_SPLIT.
PREPARE_SPLIT = 1 << 16  # activations of at least this many floats are prepared by the pool's threads together
SPLIT_MIN_WORK = 3e7  # multiply-adds below which an integer GEMM runs on one thread (~0.3 ms: 3 hand-offs)
QUERY_BLOCK = 128  # prompt attention: queries per block of score products
TILE_FLOATS = 1 << 22  # weight tile of the BLAS path (float formats): 16 MiB of float32, fits a desktop L3

_KIND_NAMES = {
    L.ATTN_NORM: "attn_norm.weight", L.WQ: "attn_q.weight", L.WK: "attn_k.weight", L.WV: "attn_v.weight",
    L.WO: "attn_output.weight", L.FFN_NORM: "ffn_norm.weight", L.GATE: "ffn_gate.weight",
    L.UP: "ffn_up.weight", L.DOWN: "ffn_down.weight", L.BQ: "attn_q.bias", L.BK: "attn_k.bias",
    L.BV: "attn_v.bias", L.Q_NORM: "attn_q_norm.weight", L.K_NORM: "attn_k_norm.weight",
}


def load(gguf: GGUFFile, hp: HParams, threads: int) -> NumbaModel:
    # Idle OpenMP workers spin briefly, then sleep (unless the user chose a policy). Decode runs ~150 short
    # parallel regions per token, back to back: a sleeping pool (OMP_WAIT_POLICY=PASSIVE) halves decode speed
    # on 2 cores, while long spinning (ACTIVE) starves BLAS's threads during the prefill GEMMs (pp128: 50
    # instead of 450 tok/s). 1000 spins serve both (benchmarks/RESULTS.md). Read when numba starts its pool.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "1000"
    import numba

    _import_numba_registries_lean()
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise BackendError(f"--threads {threads} exceeds the {numba.config.NUMBA_NUM_THREADS} threads numba "
                           "can start on this machine")
    numba.set_num_threads(threads)
    threadpool_limits(1, user_api="blas")  # parallel products come from the prompt path's own pool (above)
    cold = jit_cache_is_cold()
    if cold:
        print("compiling kernels… (first run only)", file=sys.stderr, flush=True)
    # The first jitted call of a process, even one served from the cache, makes numba import its implementation
    # registries (~0.2 s, once). Pay it here, with a call the prompt path makes anyway (same types), so that
    # loading is loading and the first token's time is the forward pass.
    prepare(np.zeros((1, 32), dtype=np.float32), activation_blocks(1, 32))
    model = NumbaModel(gguf, hp, threads)
    if cold:  # compile both paths now, so that the message is not shown again by a run that used only one
        model.warm_up()
    return model


def _import_numba_registries_lean() -> None:
    """Spare the start-up ~0.25 s of scipy and ~25 ms of cffi that numba would import for nothing.

    The first jitted call (even one loaded from the cache) imports all of numba's implementation modules. Two of
    them import optional packages at import time: numba.np.arraymath imports scipy.linalg only to decide whether
    np.correlate and np.convolve may call BLAS, and numba.core.typing.cffi_utils imports cffi to support calls
    to cffi functions (our kernels make neither). They are imported here with scipy's BLAS module and cffi
    marked not importable (None entries in sys.modules), then the marks are removed. The only effects, in this
    process: jitted np.correlate/np.convolve use numba's plain loop, and jitted code cannot call cffi functions.
    Everything else in numba that needs BLAS (np.dot, np.linalg) imports scipy itself when compiled, as before.
    A module whose package is already imported is imported as usual.
    """
    blocked = [name for name, pkg in (("scipy.linalg.cython_blas", "scipy.linalg"), ("cffi", "cffi"))
               if pkg not in sys.modules]
    for name in blocked:
        sys.modules[name] = None
    try:
        import numba.core.typing.cffi_utils  # noqa: F401
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass  # a numba that cannot do without them here: the first jitted call imports everything as usual
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def jit_cache_is_cold() -> bool:
    """True when numba has no cached machine code for the decode stack yet (first run, or sources changed)."""
    cache = getattr(L.forward_stack, "_cache", None)
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    return index is None or not Path(index).exists()


def _mmap_root(gguf: GGUFFile) -> np.ndarray:
    """The uint8 array of the whole file that every tensor views."""
    data = next(iter(gguf.tensors.values())).data
    while isinstance(data.base, np.ndarray):
        data = data.base
    root = np.asarray(data)
    if root.dtype != np.uint8 or root.ndim != 1 or root.size != gguf.file_size:
        raise BackendError(f"{gguf.path}: tensors are not views of one memory map")
    return root


def prompt_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, out: np.ndarray,
                     run=None) -> None:
    """Causal grouped-query attention of many queries as matrix products: per KV head, the queries of its heads
    stacked against the keys, QUERY_BLOCK queries at a time (bounds the score matrix; later blocks see more
    keys). BLAS for the two products, numba for the masked softmax: 9 ms per SmolLM2 layer at pp512 on one
    thread, against 25 ms for a numba kernel vectorized along the keys (RESULTS.md). The (block, KV head) tasks
    go to run(work, n_tasks) (the model's pool), or run here in turn."""
    T, H, D = q.shape
    KVH = k_cache.shape[0]
    group = H // KVH
    scale = np.float32(1.0 / np.sqrt(D))
    tasks = [(t0, kv) for t0 in range(0, T, QUERY_BLOCK) for kv in range(KVH)]

    def work(i):
        t0, kv = tasks[i]
        t1 = min(T, t0 + QUERY_BLOCK)
        S = start + t1  # keys seen by the block's last query
        qg = q[t0:t1, kv * group:(kv + 1) * group].transpose(1, 0, 2).reshape(group * (t1 - t0), D)
        scores = (qg * scale) @ k_cache[kv, :S].T  # (group * block, S)
        L.causal_softmax(scores, t1 - t0, start + t0)
        out[t0:t1, kv * group:(kv + 1) * group] = (scores @ v_cache[kv, :S]).reshape(group, t1 - t0, D
                                                                                    ).transpose(1, 0, 2)

    if run is None:
        for i in range(len(tasks)):
            work(i)
    else:
        run(work, len(tasks))


class NumbaModel:
    name = "numba"

    def __init__(self, gguf: GGUFFile, hp: HParams, threads: int):
        self.gguf, self.hparams, self.threads = gguf, hp, threads
        self.governor = ThreadGovernor(threads)  # decode's thread count on a shared machine
        root = _mmap_root(gguf)
        self._base = root.ctypes.data
        self.wv = weight_views(root)
        # layer_tab: (n_layers, N_KINDS, 2) int64 (byte offset, qtype); -1 for tensors the model lacks
        self.layer_tab = np.full((hp.n_layers, L.N_KINDS, 2), -1, dtype=np.int64)
        for i in range(hp.n_layers):
            for kind, name in _KIND_NAMES.items():
                t = gguf.tensors.get(f"blk.{i}.{name}")
                if t is not None:
                    self.layer_tab[i, kind] = self._locate(t)
        missing = set(layer_tensor_names(hp)) - set(_KIND_NAMES.values())
        if missing:
            raise UnsupportedError(f"numba backend cannot use tensors {sorted(missing)}")
        self.glob_tab = np.array([self._locate(gguf.tensors["token_embd.weight"]),
                                  self._locate(gguf.tensors["output_norm.weight"]),
                                  self._locate(output_tensor(gguf, hp))], dtype=np.int64)
        self.dims = np.zeros(L.N_DIMS, dtype=np.int64)
        self.dims[[L.D_EMBD, L.D_HEADS, L.D_KV_HEADS, L.D_HEAD_DIM, L.D_FF, L.D_VOCAB, L.D_ROPE_HALF,
                   L.D_NEOX, L.D_LAYERS]] = [
            hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_ff, hp.n_vocab, hp.rope_dim // 2,
            int(hp.rope_neox), hp.n_layers]
        self.inv_freq = rope_inv_freq(hp, gguf)
        self._scratch = self._make_scratch(SMALL_T)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="llm-prompt") if threads > 1 else None
        tile = np.empty(TILE_FLOATS, dtype=np.float32)
        self._tiles = [tile[i * (TILE_FLOATS // threads):(i + 1) * (TILE_FLOATS // threads)] for i in range(threads)]
        self._packed = None  # each thread's buffers for a group of packed rows, made by the first integer GEMM

    def _locate(self, t: Tensor) -> tuple[int, int]:
        """(byte offset in the file, qtype code) of a tensor the kernels can read."""
        qtype = int(t.qtype)
        if qtype not in KERNEL_TYPES:
            raise UnsupportedError(f"numba backend has no kernel for {t.name} of type {t.qtype.name}")
        if len(t.shape) == 1 and qtype != F32:
            raise UnsupportedError(f"numba backend expects float32 for {t.name}, found {t.qtype.name}")
        off = t.data.ctypes.data - self._base
        if off % 4:  # the float views address whole words (GGUF aligns tensors to 32 bytes by default)
            raise UnsupportedError(f"{t.name} starts at byte {off}, not a multiple of 4")
        return off, qtype

    def _make_scratch(self, T: int) -> tuple:
        """Buffers of the decode stack for up to T tokens, allocated once (shapes in layers.forward_stack)."""
        hp = self.hparams
        E, nq, nkv, F = hp.n_embd, hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim, hp.n_ff

        def f32(*shape):
            return np.zeros(shape, dtype=np.float32)

        qkv_desc = np.array([[0, 0, nq], [0, 0, nkv], [0, 0, nkv]], dtype=np.int64)
        gu_desc = np.array([[0, 0, F], [0, 0, F]], dtype=np.int64)
        return (f32(T, E), f32(T, E), f32(T, nq + 2 * nkv), f32(T, hp.n_heads, hp.head_dim),
                f32(T, hp.n_kv_heads, hp.head_dim), f32(T, nq), f32(T, 2 * F), f32(T, F), f32(T, E),
                f32(T, hp.rope_dim // 2), f32(T, hp.rope_dim // 2),
                activation_blocks(T, E), activation_blocks(T, nq), activation_blocks(T, F),
                qkv_desc, gu_desc)

    def warm_up(self) -> None:
        """Run the prompt path and the decode stack once on a scratch cache (compiles or loads their kernels)."""
        n = max(GEMM_MIN_T, GEMM_MIN_T_COLD)
        cache = self.new_cache(n + 1)
        self.forward(np.zeros(n, dtype=np.int64), cache)
        self.forward(np.zeros(1, dtype=np.int64), cache)

    def new_cache(self, max_seq: int) -> SimpleKVCache:
        return SimpleKVCache(self.hparams, max_seq, heads_first=True)

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.gguf, self.hparams)

    def forward(self, tokens: np.ndarray, cache: SimpleKVCache, all_logits: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        T, start = len(tokens), cache.offset
        if T == 0:
            raise PromptError("no tokens to run")
        if start + T > cache.max_seq:
            raise PromptError(f"context full: the KV cache holds {cache.max_seq} positions, {start + T} needed")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise PromptError(f"token id out of range 0..{self.hparams.n_vocab - 1}")
        global _gemm_path_loaded
        if T >= (GEMM_MIN_T if _gemm_path_loaded else max(GEMM_MIN_T, GEMM_MIN_T_COLD)):
            with threadpool_limits(1, user_api="blas"):  # in case another backend in this process raised it
                logits = self._forward_gemm(tokens, cache, all_logits)
            _gemm_path_loaded = True
        else:
            logits = np.empty((T if all_logits else 1, self.hparams.n_vocab), dtype=np.float32)

            def stack():
                for c0 in range(0, T, SMALL_T):  # only the last chunk's logits are kept unless all_logits
                    chunk = tokens[c0:c0 + SMALL_T]
                    out = logits[c0:c0 + len(chunk)] if all_logits else logits
                    L.forward_stack(self.wv, self.layer_tab, self.glob_tab, self.dims, self.hparams.norm_eps,
                                    self.inv_freq, chunk, start + c0, cache.k, cache.v, all_logits, self._scratch,
                                    out)

            self.governor.run(stack) if T == 1 else stack()  # decode: all threads, or one on a busy machine
        cache.offset = start + T
        return logits if all_logits else logits[-1]

    # --- prompt path: many tokens at once ------------------------------------------------------------------

    def _run(self, work, n_tasks: int) -> None:
        """work(i) for i < n_tasks: on the pool (when there is one: --threads above 1), else here. The tasks are
        dealt to one share per thread in turn; the first share runs here while the pool takes the others: a
        hand-off per share (each costs ~0.1 ms; a short prompt makes ~200 of them)."""
        shares = 1 if self._pool is None else min(n_tasks, self.threads)

        def share(k):
            for i in range(k, n_tasks, shares):
                work(i)

        futures = [self._pool.submit(share, k) for k in range(1, shares)]
        share(0)
        for f in futures:
            f.result()

    def _parts(self, rows: int) -> list[tuple[int, int]]:
        """Row ranges of a product, one per thread (a multiple of 16 rows each, but the last)."""
        per_thread = -(-rows // (1 if self._pool is None else self.threads))
        step = -(-per_thread // 16) * 16
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _gemm_cat(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """x @ [W1; W2; ...].T for matrices sharing the input (Q/K/V, gate/up; or one matrix): (T, sum of rows),
        the outputs side by side. The integer GEMM (quant/gemm.py) when every matrix has a type it takes, else
        BLAS on dequantized tiles."""
        if all(int(desc[1]) in QUANTIZED_TYPES for desc, _ in parts):
            return self._gemm_int(x, parts)
        return self._gemm_float(x, parts)

    def _gemm_int(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """_gemm_cat with quant.gemm (imported on first use: a run whose prompts are short never needs it); each
        thread takes a range of groups of GROUP stacked rows."""
        from quant.gemm import GROUP, gemm_groups, packed_buffers, padded_activation

        if self._packed is None:
            hp = self.hparams
            widest = max(hp.n_embd, hp.n_heads * hp.head_dim, hp.n_ff)
            self._packed = [packed_buffers(widest) for _ in range(self.threads)]
        T = x.shape[0]
        descs = np.array([[desc[0], desc[1], rows] for desc, rows in parts], dtype=np.int64)
        rows = int(descs[:, 2].sum())
        groups = -(-rows // GROUP)
        # the pool's threads share a product worth more than a hand-off; packing a weight costs ~9 multiply-adds
        workers = 1 if self._pool is None or rows * x.shape[1] * (T + 9) < SPLIT_MIN_WORK else self.threads
        xb, tp = padded_activation(x, self._run, workers if x.size >= PREPARE_SPLIT else 1)
        out = np.empty((tp, groups * GROUP), dtype=np.float32)
        bounds = [groups * i // workers for i in range(workers + 1)]

        def work(i):
            gemm_groups(self.wv[0], descs, bounds[i], bounds[i + 1], xb, self._packed[i], out)

        self._run(work, workers)
        return out[:T] if groups * GROUP == rows else np.ascontiguousarray(out[:T, :rows])

    def _gemm_float(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """_gemm_cat with BLAS: each thread takes a range of the stacked rows, dequantizes them into its own tile
        (TILE_FLOATS / threads floats at most at a time) and multiplies them with single-threaded BLAS."""
        T, n = x.shape
        segs, r = [], 0  # (first stacked row, rows, byte offset, qtype) of each matrix
        for desc, rows in parts:
            segs.append((r, rows, int(desc[0]), int(desc[1])))
            r += rows
        out = np.empty((T, r), dtype=np.float32)
        ranges = self._parts(r)
        tile_rows = max(1, len(self._tiles[0]) // n)

        def work(i):
            r0, r1 = ranges[i]
            for a in range(r0, r1, tile_rows):
                b = min(r1, a + tile_rows)
                tile = self._tiles[i][: (b - a) * n].reshape(b - a, n)
                for first, rows, off, qtype in segs:  # the matrices that rows a .. b overlap
                    lo, hi = max(a, first), min(b, first + rows)
                    if lo >= hi:
                        continue
                    if qtype == F32:
                        tile[lo - a:hi - a] = self.wv[2][off // 4 + (lo - first) * n: off // 4 + (hi - first) * n
                                                         ].reshape(hi - lo, n)
                    else:
                        dequant_rows(self.wv, qtype, off, n, lo - first, tile[lo - a:hi - a])
                np.matmul(x, tile.T, out=out[:, a:b])

        self._run(work, len(ranges))
        return out

    def _gemm(self, x: np.ndarray, desc: np.ndarray, rows: int) -> np.ndarray:
        """x @ W.T for x: (T, n) and the (rows, n) weight at desc = (byte offset, qtype)."""
        return self._gemm_cat(x, [(desc, rows)])

    def _forward_gemm(self, tokens: np.ndarray, cache: SimpleKVCache, all_logits: bool) -> np.ndarray:
        hp = self.hparams
        T, start = len(tokens), cache.offset
        E, H, KVH, D, F = hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_ff
        eps, f32 = hp.norm_eps, self.wv[2]
        x = np.empty((T, E), dtype=np.float32)  # residual stream
        h = np.empty((T, E), dtype=np.float32)
        att = np.empty((T, H, D), dtype=np.float32)
        ff = np.empty((T, F), dtype=np.float32)
        cos = np.empty((T, hp.rope_dim // 2), dtype=np.float32)
        sin = np.empty_like(cos)
        L.embed(self.wv, self.glob_tab[L.EMBD, 1], self.glob_tab[L.EMBD, 0], E, tokens, x)
        L.rope_tables(start, self.inv_freq, cos, sin)
        for i in range(hp.n_layers):
            lt = self.layer_tab[i]
            L.rms_norm(x, f32, lt[L.ATTN_NORM, 0], eps, h)
            qkv = self._gemm_cat(h, [(lt[L.WQ], H * D), (lt[L.WK], KVH * D), (lt[L.WV], KVH * D)])
            q, k, v = np.split(qkv, [H * D, (H + KVH) * D], axis=1)
            q, k = np.ascontiguousarray(q), np.ascontiguousarray(k)
            if lt[L.BQ, 0] >= 0:
                L.add_bias(q, f32, lt[L.BQ, 0])
                L.add_bias(k, f32, lt[L.BK, 0])
                L.add_bias(v, f32, lt[L.BV, 0])
            q3, k3 = q.reshape(T, H, D), k.reshape(T, KVH, D)
            if lt[L.Q_NORM, 0] >= 0:
                L.head_norm(q3, f32, lt[L.Q_NORM, 0], eps)
                L.head_norm(k3, f32, lt[L.K_NORM, 0], eps)
            L.rope(q3, cos, sin, hp.rope_neox)
            L.rope(k3, cos, sin, hp.rope_neox)
            cache.k[i, :, start:start + T] = k3.transpose(1, 0, 2)
            cache.v[i, :, start:start + T] = v.reshape(T, KVH, D).transpose(1, 0, 2)
            prompt_attention(q3, cache.k[i], cache.v[i], start, att, self._run)
            x += self._gemm(att.reshape(T, H * D), lt[L.WO], E)
            L.rms_norm(x, f32, lt[L.FFN_NORM, 0], eps, h)
            gu = self._gemm_cat(h, [(lt[L.GATE], F), (lt[L.UP], F)])
            L.swiglu(gu, ff)
            x += self._gemm(ff, lt[L.DOWN], E)

        rows = x if all_logits else x[-1:]
        h = h[: len(rows)]
        L.rms_norm(rows, f32, self.glob_tab[L.OUT_NORM, 0], eps, h)
        if len(rows) > SMALL_T or int(self.glob_tab[L.OUTPUT, 1]) in QUANTIZED_TYPES:
            # the integer GEMM even for the last token alone: as fast as the matvec kernels there (packing costs
            # about what the dot products do), and a process whose prompt takes this path need not load the
            # matvec kernels' machine code (~40 ms) as well as the GEMM's
            return self._gemm(h, self.glob_tab[L.OUTPUT], hp.n_vocab)
        xb = activation_blocks(len(rows), E)
        prepare(h, xb)
        logits = np.empty((len(rows), hp.n_vocab), dtype=np.float32)
        matvec(self.wv, self.glob_tab[L.OUTPUT, 1], self.glob_tab[L.OUTPUT, 0], hp.n_vocab, h, xb, logits)
        return logits
