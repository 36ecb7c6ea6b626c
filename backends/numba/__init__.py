"""The Numba CPU backend: kernels that read the quantized blocks in the memory map.

Decoding (a few tokens per call) runs the whole layer stack in one jitted call (layers.forward_stack) with
integer block dot products; a prompt of GEMM_MIN_T tokens or more goes through `_forward_gemm`, which multiplies
dequantized weight tiles with BLAS (faster than the matvec kernels once many tokens share each weight).
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
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
from quant.errors import BackendError, PromptError, UnsupportedError
from quant.gguf_file import GGUFFile, Tensor
from quant.kernels import (
    F32,
    KERNEL_TYPES,
    block_sums,
    dequant_rows,
    matvec,
    weight_views,
)

SMALL_T = 8  # tokens per forward_stack call (its scratch buffers hold this many)
# Prompts of at least GEMM_MIN_T tokens multiply dequantized weight tiles with BLAS (a fixed cost of dequantizing
# every weight, then cheap per token); shorter ones run forward_stack over chunks of SMALL_T tokens (no fixed
# cost, the matvec kernels' cost per token). The crossover moves with the kernels' speed: re-measure with
# `python benchmarks/bench_start.py --crossover` (table in benchmarks/RESULTS.md).
GEMM_MIN_T = 16
# The GEMM path of a prompt shorter than this keeps BLAS on one thread: its products are small, and a second BLAS
# thread that has to be scheduled for each of them made a 31-token prompt take 3-7 s instead of ~0.2 s when
# other jobs shared the 2 cores (benchmarks/RESULTS.md, warm start).
PARALLEL_BLAS_MIN_T = 128
QUERY_BLOCK = 128  # prompt attention: queries per block of score products
TILE_FLOATS = 1 << 22  # weight tile for the GEMM path: 16 MiB of float32, fits the L3 of a desktop CPU

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

    _import_numba_registries_without_scipy()
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise BackendError(f"--threads {threads} exceeds the {numba.config.NUMBA_NUM_THREADS} threads numba "
                           "can start on this machine")
    numba.set_num_threads(threads)
    if jit_cache_is_cold():
        print("compiling kernels… (first run only)", file=sys.stderr, flush=True)
    # The first jitted call of a process, even one served from the cache, makes numba import its implementation
    # registries (~0.2 s, once). Pay it here, with a call the prompt path makes anyway (same types), so that
    # loading is loading and the first token's time is the forward pass.
    block_sums(np.zeros((1, 32), dtype=np.float32), np.zeros((1, 1), dtype=np.float32))
    return NumbaModel(gguf, hp, threads)


def _import_numba_registries_without_scipy() -> None:
    """Spare the start-up the ~0.25 s of importing scipy.linalg that numba would spend for nothing.

    The first jitted call (even one loaded from the cache) imports all of numba's implementation modules; one of
    them, numba.np.arraymath, imports scipy.linalg at import time only to decide whether np.correlate and
    np.convolve may call BLAS (our kernels call neither). It is imported here with scipy's BLAS module marked
    not importable (a None entry in sys.modules), then the mark is removed. The only effect: jitted
    np.correlate/np.convolve use numba's plain loop in this process. Everything else in numba that needs BLAS
    (np.dot, np.linalg) imports scipy itself when compiled, as before. Nothing to do when scipy.linalg or that
    module is already imported.
    """
    blas = "scipy.linalg.cython_blas"
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules[blas] = None
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass  # a numba that cannot do without it here: the first jitted call imports everything as usual
    finally:
        if blas in sys.modules and sys.modules[blas] is None:
            del sys.modules[blas]


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


class NumbaModel:
    name = "numba"

    def __init__(self, gguf: GGUFFile, hp: HParams, threads: int):
        self.gguf, self.hparams, self.threads = gguf, hp, threads
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
        self._tile = np.empty(TILE_FLOATS, dtype=np.float32)

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
                f32(T, hp.rope_dim // 2), f32(T, hp.rope_dim // 2), f32(T, E // 32), f32(T, nq // 32), f32(T, F // 32),
                qkv_desc, gu_desc)

    def new_cache(self, max_seq: int) -> SimpleKVCache:
        return SimpleKVCache(self.hparams, max_seq)

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
        if T >= GEMM_MIN_T:
            with threadpool_limits(1, user_api="blas") if T < PARALLEL_BLAS_MIN_T else nullcontext():
                logits = self._forward_gemm(tokens, cache, all_logits)
        else:
            logits = np.empty((T if all_logits else 1, self.hparams.n_vocab), dtype=np.float32)
            for c0 in range(0, T, SMALL_T):  # only the last chunk's logits are kept unless all_logits
                chunk = tokens[c0:c0 + SMALL_T]
                out = logits[c0:c0 + len(chunk)] if all_logits else logits
                L.forward_stack(self.wv, self.layer_tab, self.glob_tab, self.dims, self.hparams.norm_eps,
                                self.inv_freq, chunk, start + c0, cache.k, cache.v, all_logits, self._scratch, out)
        cache.offset = start + T
        return logits if all_logits else logits[-1]

    # --- prompt path: many tokens at once ------------------------------------------------------------------

    def _gemm(self, x: np.ndarray, desc: np.ndarray, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """x @ W.T for x: (T, n) and the (rows, n) weight at desc = (byte offset, qtype), one dequantized
        tile of rows at a time (never the whole matrix when it is larger than a tile)."""
        n = x.shape[1]
        off, qtype = int(desc[0]), int(desc[1])
        out = np.empty((x.shape[0], rows), dtype=np.float32) if out is None else out
        if qtype == F32:
            w = self.wv[2][off // 4: off // 4 + rows * n].reshape(rows, n)
            np.matmul(x, w.T, out=out)
            return out
        step = max(1, TILE_FLOATS // n)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            tile = self._tile[: (r1 - r0) * n].reshape(r1 - r0, n)
            dequant_rows(self.wv, qtype, off, n, r0, tile)
            if r0 == 0 and r1 == rows:
                np.matmul(x, tile.T, out=out)
            else:
                out[:, r0:r1] = x @ tile.T
        return out

    def _gemm_cat(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """x @ [W1; W2; ...].T for matrices sharing the input (Q/K/V, gate/up), as one BLAS product over their
        dequantized rows stacked in one tile when they fit: (T, sum of rows), the outputs side by side."""
        n, total = x.shape[1], sum(rows for _, rows in parts)
        out = np.empty((x.shape[0], total), dtype=np.float32)
        if total * n > TILE_FLOATS or any(int(desc[1]) == F32 for desc, _ in parts):
            c0 = 0
            for desc, rows in parts:
                self._gemm(x, desc, rows, out[:, c0:c0 + rows])
                c0 += rows
            return out
        tile = self._tile[: total * n].reshape(total, n)
        r0 = 0
        for desc, rows in parts:
            dequant_rows(self.wv, int(desc[1]), int(desc[0]), n, 0, tile[r0:r0 + rows])
            r0 += rows
        np.matmul(x, tile.T, out=out)
        return out

    @staticmethod
    def _attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, out: np.ndarray) -> None:
        """Causal grouped-query attention of many queries as matrix products: per KV head, the queries of its
        heads stacked against the keys, QUERY_BLOCK queries at a time (bounds the score matrix; later blocks
        see more keys). BLAS for the two products, numba for the masked softmax: 9 ms per SmolLM2 layer at
        pp512 on one thread, against 25 ms for a numba kernel vectorized along the keys (RESULTS.md)."""
        T, H, D = q.shape
        KVH = k_cache.shape[1]
        group = H // KVH
        scale = np.float32(1.0 / np.sqrt(D))
        for t0 in range(0, T, QUERY_BLOCK):
            t1 = min(T, t0 + QUERY_BLOCK)
            S = start + t1  # keys seen by the block's last query
            for kv in range(KVH):
                qg = q[t0:t1, kv * group:(kv + 1) * group].transpose(1, 0, 2).reshape(group * (t1 - t0), D)
                scores = (qg * scale) @ k_cache[:S, kv].T  # (group * block, S)
                L.causal_softmax(scores, t1 - t0, start + t0)
                o = scores @ v_cache[:S, kv]
                out[t0:t1, kv * group:(kv + 1) * group] = o.reshape(group, t1 - t0, D).transpose(1, 0, 2)

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
            cache.k[i, start:start + T] = k3
            cache.v[i, start:start + T] = v.reshape(T, KVH, D)
            self._attention(q3, cache.k[i], cache.v[i], start, att)
            x += self._gemm(att.reshape(T, H * D), lt[L.WO], E)
            L.rms_norm(x, f32, lt[L.FFN_NORM, 0], eps, h)
            gu = self._gemm_cat(h, [(lt[L.GATE], F), (lt[L.UP], F)])
            L.swiglu(gu, ff)
            x += self._gemm(ff, lt[L.DOWN], E)

        rows = x if all_logits else x[-1:]
        h = h[: len(rows)]
        L.rms_norm(rows, f32, self.glob_tab[L.OUT_NORM, 0], eps, h)
        if len(rows) > SMALL_T:
            return self._gemm(h, self.glob_tab[L.OUTPUT], hp.n_vocab)
        xs = np.empty((len(rows), E // 32), dtype=np.float32)
        block_sums(h, xs)
        logits = np.empty((len(rows), hp.n_vocab), dtype=np.float32)
        matvec(self.wv, self.glob_tab[L.OUTPUT, 1], self.glob_tab[L.OUTPUT, 0], hp.n_vocab, h, xs, logits)
        return logits
