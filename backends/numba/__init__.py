"""The Numba CPU backend: kernels that read the quantized blocks in the memory map.

Decoding (a few tokens per call) runs the whole layer stack in one jitted call (layers.forward_stack) with
integer block dot products; a prompt of NumbaOptions.gemm_min_t tokens or more (gemm_min_t_cold before the first such
prompt in the process) goes through `_forward_gemm`, whose products are matrix x matrix: the integer GEMM of
quant/gemm.py (packed int16 codes x the int16 activation copies the matvec kernels use), or BLAS on dequantized
float32 tiles for the float formats.
"""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from backends.base import (
    HParams,
    RingKVCache,
    global_weights,
    layer_weights,
    rope_groups,
    rotate_keys,
    weight_bytes_per_token,
)
from backends.numba import layers as L
from backends.numba.batch import CachePool, NumbaKVCache, PooledKVCache, RunScratch
from backends.numba.governor import ThreadGovernor
from quant.errors import BackendError, PromptError, UnsupportedError
from quant.gguf_file import GGUFFile, Tensor
from quant.jit import use_kernel_cache
from quant.kernels import (
    F32,
    KERNEL_TYPES,
    Q5_K,
    Q6_K,
    QUANTIZED_TYPES,
    activation_blocks,
    dequant_rows,
    matvec_multi,
    prepare,
    weight_views,
)
from quant.kv_kernels import decode_rows, encode_rows


@dataclass(frozen=True)
class NumbaOptions:
    """Tuning thresholds of the numba backend, chosen at load (benchmarks/RESULTS.md holds the measurements behind
    the defaults; re-measure the crossover with `python benchmarks/bench_start.py --crossover`)."""

    small_t: int = 8  # tokens per forward_stack call (its scratch buffers hold this many)
    # Prompts of at least gemm_min_t tokens take the GEMM path (a fixed cost of packing or dequantizing every
    # weight, then cheap per token); shorter ones run forward_stack over chunks of small_t tokens (no fixed cost,
    # the matvec kernels' cost per token; since those decode each block once for several tokens, the decode stack
    # keeps up with BLAS on AVX2 to ~40 tokens, but to ~20 on Q6_K layers and ~24 on Q5_K, whose kernels are the
    # slowest there; the integer GEMM of a VNNI CPU overtakes it at ~24-28 tokens on the 1B shape, at ~48 on
    # SmolLM2, whose small layers leave the GEMM path's fixed cost per layer in front: RESULTS.md). 0:
    # NumbaModel.gemm_min_t picks for the CPU, the model and its main weight type.
    gemm_min_t: int = 0
    # ... once the GEMM path's machine code is loaded in this process: loading it costs a fresh process's first
    # prompt more than a prompt this short earns back, so until a prompt of gemm_min_t_cold tokens has taken the
    # GEMM path, shorter ones take the decode stack. (A chat's first turn usually loads it.)
    gemm_min_t_cold: int = 48
    # A hand-off to the prompt path's pool costs ~0.1 ms, so an activation smaller than prepare_split floats is
    # prepared on the calling thread, and an integer GEMM of fewer multiply-adds than split_min_work runs there.
    prepare_split: int = 1 << 16
    split_min_work: float = 3e7
    query_block: int = 128  # prompt attention: queries per block of score products
    tile_floats: int = 1 << 22  # weight tile of the BLAS path (float formats): 16 MiB of float32, fits a desktop L3
    # The prompt path's products for quantized weights: "int", the integer GEMM (quant/gemm.py); "blas", BLAS on
    # dequantized tiles; "auto", the integer GEMM where the CPU has AVX-512 VNNI or AVX-VNNI (1.6-1.9x BLAS) and
    # BLAS on plain AVX2 (the integer GEMM at ~0.8x BLAS there: benchmarks/RESULTS.md).
    prompt_gemm: str = "auto"

    def __post_init__(self):
        if self.prompt_gemm not in ("auto", "int", "blas"):
            raise BackendError(f"prompt_gemm must be auto, int or blas, got {self.prompt_gemm!r}")


_gemm_path_loaded = False  # the GEMM path has run in this process (its dispatchers hold their machine code)
# The prompt path splits each product across its own pool of --threads Python threads, each running GIL-free
# numba (the integer GEMM's groups; or a dequantization beside a single-threaded BLAS product for the formats it
# does not take, and the attention's score products): one set of threads, which sleep when idle. BLAS's own
# thread pool beside numba's spun against it (benchmarks/RESULTS.md).

_KIND_SLOTS = {  # layer_tab column -> weight slot (quant/families/spec.py)
    L.ATTN_NORM: "attn_norm", L.WQ: "wq", L.WK: "wk", L.WV: "wv", L.WO: "wo", L.FFN_NORM: "ffn_norm",
    L.GATE: "gate", L.UP: "up", L.DOWN: "down", L.BQ: "bq", L.BK: "bk", L.BV: "bv", L.Q_NORM: "q_norm",
    L.K_NORM: "k_norm", L.POST_ATTN_NORM: "post_attn_norm", L.POST_FFN_NORM: "post_ffn_norm",
}
_FUSED = {"wqkv": (L.WQ, L.WK, L.WV), "gate_up": (L.GATE, L.UP)}  # fused slot -> the kinds of its row blocks
_ACTS = {"silu": L.ACT_SILU, "gelu_tanh": L.ACT_GELU_TANH}


@functools.cache
def _cpu_has_vnni() -> bool:
    """The CPU multiplies int16 (or int8) pairs into int32 sums in one instruction, which the integer GEMM needs to
    beat BLAS."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") or features.get("avxvnni"))


def load(gguf: GGUFFile, hp: HParams, threads: int, options: NumbaOptions | None = None) -> NumbaModel:
    # Idle OpenMP workers spin a few milliseconds, then sleep (unless the user chose a policy): decode runs ~150
    # short parallel regions per token, which a sleeping pool slows, and after 1000 spins the first prompt after a
    # pause ran 2.3x slower; endless spinning starves the prompt path's threads (benchmarks/RESULTS.md). Read when
    # numba starts its pool.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "300000"
    use_kernel_cache()
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise BackendError(f"--threads {threads} exceeds the {numba.config.NUMBA_NUM_THREADS} threads numba "
                           "can start on this machine")
    numba.set_num_threads(threads)
    threadpool_limits(1, user_api="blas")  # parallel products come from the prompt path's own pool (above)
    cold = jit_cache_is_cold()
    if cold:
        print("compiling kernels… (first run only)", file=sys.stderr, flush=True)
        _import_numba_registries_lean()  # compiling imports numba's registries (a warm start only loads code)
    model = NumbaModel(gguf, hp, threads, options or NumbaOptions())
    if cold:  # compile both paths now, so that the message is not shown again by a run that used only one
        model.warm_up()
    return model


def _import_numba_registries_lean() -> None:
    """Spare the start-up ~0.25 s of scipy and ~25 ms of cffi that numba would import for nothing.

    The first compilation in a process imports all of numba's implementation modules. Two of
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
                     scale: float, window: int = 0, run=None, query_block: int = 128) -> None:
    """Causal grouped-query attention of many queries as matrix products: per KV head, the queries of its heads
    stacked against the keys, query_block queries at a time (bounds the score matrix; later blocks see more
    keys). BLAS for the two products, numba for the masked softmax (faster than a numba kernel along the keys:
    benchmarks/RESULTS.md). The (block, KV head) tasks go to run(work, n_tasks) (the model's pool), or run here
    in turn. A window > 0 keeps each query to its last `window` keys."""
    T, H, D = q.shape
    KVH = k_cache.shape[0]
    group = H // KVH
    scale = np.float32(scale)
    tasks = [(t0, kv) for t0 in range(0, T, query_block) for kv in range(KVH)]

    def work(i):
        t0, kv = tasks[i]
        t1 = min(T, t0 + query_block)
        S = start + t1  # keys seen by the block's last query
        k0 = max(0, start + t0 + 1 - window) if window > 0 else 0  # and the first query's first key
        qg = q[t0:t1, kv * group:(kv + 1) * group].transpose(1, 0, 2).reshape(group * (t1 - t0), D)
        scores = (qg * scale) @ k_cache[kv, k0:S].T  # (group * block, S - k0)
        L.causal_softmax(scores, t1 - t0, start + t0, k0, window)
        out[t0:t1, kv * group:(kv + 1) * group] = (scores @ v_cache[kv, k0:S]).reshape(group, t1 - t0, D
                                                                                       ).transpose(1, 0, 2)

    if run is None:
        for i in range(len(tasks)):
            work(i)
    else:
        run(work, len(tasks))


# Where prompts go through BLAS (no VNNI), the token count from which that beats the decode stack, by the type of
# most of the layers' weights; 40 for the others. The decode stack runs at its format's matvec speed, and Q6_K's and
# Q5_K's are the slowest there (the 1B shape's crossovers: RESULTS.md, "The prompt threshold on AVX2").
_BLAS_GEMM_MIN_T = {Q6_K: 20, Q5_K: 24}


class NumbaModel:
    name = "numba"

    def __init__(self, gguf: GGUFFile, hp: HParams, threads: int, options: NumbaOptions | None = None):
        self.gguf, self.hparams, self.threads = gguf, hp, threads
        self.options = options or NumbaOptions()  # may be replaced later, but for small_t (sizes the scratch)
        self.governor = ThreadGovernor(threads)  # decode's thread count on a shared machine
        root = _mmap_root(gguf)
        self._base = root.ctypes.data
        self.wv = weight_views(root)
        # layer_tab: (n_layers, N_KINDS, 2) int64 (byte offset, qtype); -1 for tensors the model lacks
        self.layer_tab = np.full((hp.n_layers, L.N_KINDS, 2), -1, dtype=np.int64)
        kinds = {slot: kind for kind, slot in _KIND_SLOTS.items()}
        q, kv = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        layer_bytes: dict[int, int] = {}  # qtype -> bytes of the layers' weights in it
        for i in range(hp.n_layers):
            for slot, t in layer_weights(gguf, hp, i).items():
                layer_bytes[int(t.qtype)] = layer_bytes.get(int(t.qtype), 0) + t.n_bytes
                if slot in _FUSED:  # a fused matrix is its parts' rows one after the other: located by offset
                    off, qtype = self._locate(t)
                    row = t.n_bytes // t.shape[0]
                    parts = {"wqkv": (q, kv, kv), "gate_up": (hp.n_ff, hp.n_ff)}[slot]
                    for kind, first in zip(_FUSED[slot], np.cumsum((0, *parts[:-1])), strict=True):
                        self.layer_tab[i, kind] = (off + int(first) * row, qtype)
                        self._check_aligned(t, off + int(first) * row)
                    continue
                if slot not in kinds:
                    raise UnsupportedError(f"numba backend cannot use {hp.arch} weight slot '{slot}' ({t.name})")
                self.layer_tab[i, kinds[slot]] = self._locate(t)
        self.main_type = max(layer_bytes, key=layer_bytes.get) if layer_bytes else -1  # most of the layers' bytes
        g = global_weights(gguf, hp)
        self.glob_tab = np.array([self._locate(g["embd"]), self._locate(g["out_norm"]), self._locate(g["output"])],
                                 dtype=np.int64)
        self.dims = np.zeros(L.N_DIMS, dtype=np.int64)
        self.dims[[L.D_EMBD, L.D_HEADS, L.D_KV_HEADS, L.D_HEAD_DIM, L.D_FF, L.D_VOCAB, L.D_ROPE_HALF,
                   L.D_NEOX, L.D_LAYERS, L.D_ACT]] = [
            hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_ff, hp.n_vocab, hp.rope_dim // 2,
            int(hp.rope_neox), hp.n_layers, _ACTS[hp.act]]
        self.fparams = np.zeros(L.N_FPARAMS, dtype=np.float32)
        self.fparams[[L.F_EPS, L.F_EMBED_SCALE, L.F_ATTN_SCALE, L.F_SOFTCAP, L.F_ROPE_MSCALE]] = [
            hp.norm_eps, hp.embed_scale, hp.scale, hp.logit_softcap, hp.rope_attn_factor]
        # inv_freq: (G, rope_dim/2), the distinct RoPE frequency sets; layer_opt: (n_layers, N_LAYER_OPTS). With
        # LongRoPE, a second set for contexts past the original one (picked by the cache's size)
        self.inv_freq, groups = rope_groups(hp, gguf)
        self.inv_freq_long = rope_groups(hp, gguf, hp.rope_orig_ctx + 1)[0] if hp.rope_long else self.inv_freq
        self.layer_opt = np.zeros((hp.n_layers, L.N_LAYER_OPTS), dtype=np.int64)
        self.layer_opt[:, L.L_WINDOW] = [hp.window(i) for i in range(hp.n_layers)]
        self.layer_opt[:, L.L_ROPE] = groups
        # the prompt path's workers, shared: a call waits only for its own tasks, and none submits more
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="llm-prompt") if threads > 1 else None

    def _locate(self, t: Tensor) -> tuple[int, int]:
        """(byte offset in the file, qtype code) of a tensor the kernels can read."""
        qtype = int(t.qtype)
        if qtype not in KERNEL_TYPES:
            raise UnsupportedError(f"numba backend has no kernel for {t.name} of type {t.qtype.name}")
        if len(t.shape) == 1 and qtype != F32:
            raise UnsupportedError(f"numba backend expects float32 for {t.name}, found {t.qtype.name}")
        off = t.data.ctypes.data - self._base
        self._check_aligned(t, off)
        return off, qtype

    @staticmethod
    def _check_aligned(t: Tensor, off: int) -> None:
        if off % 4:  # the float views address whole words (GGUF aligns tensors to 32 bytes by default)
            raise UnsupportedError(f"{t.name} starts at byte {off}, not a multiple of 4")

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
                f32(len(self.inv_freq), T, hp.rope_dim // 2), f32(len(self.inv_freq), T, hp.rope_dim // 2),
                activation_blocks(T, E), activation_blocks(T, nq), activation_blocks(T, F),
                qkv_desc, gu_desc)

    @property
    def gemm_min_t(self) -> int:
        """Prompts of this many tokens or more take the GEMM path (NumbaOptions.gemm_min_t, unless 0): where the
        integer GEMM runs, 24 if a layer holds 2^24 weights or more (the 1B shape: 60 M), else 40; on BLAS, by the
        layers' main weight type, _BLAS_GEMM_MIN_T."""
        if self.options.gemm_min_t:
            return self.options.gemm_min_t
        if not self._int_gemm:
            return _BLAS_GEMM_MIN_T.get(self.main_type, 40)
        hp = self.hparams
        q, kv = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        per_layer = hp.n_embd * (2 * q + 2 * kv) + 3 * hp.n_embd * hp.n_ff
        return 24 if per_layer >= 1 << 24 else 40

    def warm_up(self) -> None:
        """Run the prompt path and the decode stack once on a scratch cache (compiles or loads their kernels)."""
        n = max(self.gemm_min_t, self.options.gemm_min_t_cold)
        cache = self.new_cache(n + 1)
        self.forward(np.zeros(n, dtype=np.int64), cache)
        self.forward(np.zeros(1, dtype=np.int64), cache)

    def new_cache(self, max_seq: int, kv_type: str = "f32", slack: int = 0) -> NumbaKVCache:
        """Each KV head's positions one contiguous run, which attention streams in order; a sliding-window layer
        keeps its window plus small_t positions (a decode-stack step writes up to small_t), or `slack` if more.
        The cache carries the conversation's scratch buffers too."""
        return NumbaKVCache(self.hparams, max_seq, max(self.options.small_t, slack), self._new_scratch(),
                            kv_type=kv_type)

    def new_caches(self, n: int, max_seq: int, kv_type: str = "f32", slack: int = 0) -> list[PooledKVCache]:
        """KV caches for `n` conversations that forward_batch can decode together (slots of one pool)."""
        return CachePool(self.hparams, n, max_seq, max(self.options.small_t, slack), self._make_scratch(n),
                         self._new_scratch, kv_type).caches

    def _new_scratch(self) -> RunScratch:
        return RunScratch(self._make_scratch(self.options.small_t))

    @staticmethod
    def _scratch_of(cache: RingKVCache) -> RunScratch:
        scratch = getattr(cache, "scratch", None)
        if not isinstance(scratch, RunScratch):
            raise BackendError("the numba backend runs on caches made by its new_cache or new_caches")
        return scratch

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.gguf, self.hparams)

    def forward_batch(self, tokens: np.ndarray, caches: list[PooledKVCache]) -> np.ndarray:
        """One token for each cache (of one pool from new_caches), at that cache's offset; advances each.
        Returns logits (B, n_vocab) float32. The weights are read once for the batch."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        pool = caches[0].pool if caches and isinstance(caches[0], PooledKVCache) else None
        if pool is None or any(getattr(c, "pool", None) is not pool for c in caches):
            raise BackendError("forward_batch needs caches of one pool (NumbaModel.new_caches)")
        slots = np.array([c.slot for c in caches], dtype=np.int64)
        positions = np.array([c.offset for c in caches], dtype=np.int64)
        if len(tokens) != len(caches) or len(set(slots.tolist())) != len(slots):
            raise BackendError("forward_batch needs one token per cache, each cache once")
        if len(caches) > len(pool.caches):
            raise BackendError(f"forward_batch takes at most {len(pool.caches)} tokens")
        if positions.max() >= pool.max_seq:
            raise PromptError(f"context full: the KV cache holds {pool.max_seq} positions")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise PromptError(f"token id out of range 0..{self.hparams.n_vocab - 1}")
        logits = np.empty((len(tokens), self.hparams.n_vocab), dtype=np.float32)
        numba.set_num_threads(self.threads)
        L.forward_stack(self.wv, self.layer_tab, self.glob_tab, self.dims, self.fparams, self.layer_opt,
                        self._inv_freq(caches[0]), tokens, positions, slots, pool.k.view(np.uint8),
                        pool.v.view(np.uint8), caches[0].byte_layout, caches[0].kv_code, len(tokens), pool.scratch,
                        logits, False, numba.get_num_threads())
        for c in caches:
            c.offset += 1
        return logits

    def forward(self, tokens: np.ndarray, cache: RingKVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        T, start = len(tokens), cache.offset
        if T == 0:
            raise PromptError("no tokens to run")
        if start + T > cache.max_seq:
            raise PromptError(f"context full: the KV cache holds {cache.max_seq} positions, {start + T} needed")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise PromptError(f"token id out of range 0..{self.hparams.n_vocab - 1}")
        global _gemm_path_loaded
        # numba's thread count belongs to the calling thread, and a new one (a server's worker, a chat running
        # ahead) starts at every core: --threads holds on any of them
        numba.set_num_threads(self.threads)
        opts = self.options
        scratch = self._scratch_of(cache)
        if T >= (self.gemm_min_t if _gemm_path_loaded else max(self.gemm_min_t, opts.gemm_min_t_cold)):
            with threadpool_limits(1, user_api="blas"):  # in case another backend in this process raised it
                logits = self._forward_gemm(tokens, cache, all_logits, scratch, hidden)
            _gemm_path_loaded = True
        else:
            width = self.hparams.n_embd if hidden else self.hparams.n_vocab
            logits = np.empty((T if all_logits else 1, width), dtype=np.float32)

            def stack():
                for c0 in range(0, T, opts.small_t):  # only the last chunk's last logits unless all_logits
                    chunk = tokens[c0:c0 + opts.small_t]
                    outputs = len(chunk) if all_logits else int(c0 + len(chunk) == T)
                    out = logits[c0:c0 + len(chunk)] if all_logits else logits
                    L.forward_stack(*self._stack_args(cache, chunk, start + c0, outputs, scratch, out, hidden))

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

    @property
    def _int_gemm(self) -> bool:
        """Whether the prompt path multiplies quantized weights with the integer GEMM (NumbaOptions.prompt_gemm)."""
        choice = self.options.prompt_gemm
        return _cpu_has_vnni() if choice == "auto" else choice == "int"

    def _gemm_cat(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]], scratch: RunScratch) -> np.ndarray:
        """x @ [W1; W2; ...].T for matrices sharing the input (Q/K/V, gate/up; or one matrix): (T, sum of rows),
        the outputs side by side. The integer GEMM (quant/gemm.py) when NumbaOptions.prompt_gemm picks it and every
        matrix has a type it takes, else BLAS on dequantized tiles."""
        if self._int_gemm_takes(parts):
            return self._gemm_int(x, parts, scratch)
        return self._gemm_float(x, parts, scratch)

    def _int_gemm_takes(self, parts: list[tuple[np.ndarray, int]]) -> bool:
        """Whether the integer GEMM runs here and takes every matrix of parts."""
        return self._int_gemm and all(int(desc[1]) in QUANTIZED_TYPES for desc, _ in parts)

    @staticmethod
    def _descs(parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """(byte offset, qtype, rows) of each matrix of parts, as the stacked-row kernels take them."""
        return np.array([[desc[0], desc[1], rows] for desc, rows in parts], dtype=np.int64)

    def _gemm_int(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]], scratch: RunScratch) -> np.ndarray:
        """_gemm_cat with quant.gemm (imported on first use: a run whose prompts are short never needs it); each
        thread takes a range of groups of GROUP stacked rows."""
        from quant.gemm import GROUP, gemm_groups, packed_buffers, padded_activation

        if scratch.packed is None:
            hp = self.hparams
            widest = max(hp.n_embd, hp.n_heads * hp.head_dim, hp.n_ff)
            scratch.packed = [packed_buffers(widest) for _ in range(self.threads)]
        T = x.shape[0]
        descs = self._descs(parts)
        rows = int(descs[:, 2].sum())
        groups = -(-rows // GROUP)
        # the pool's threads share a product worth more than a hand-off; packing a weight costs ~9 multiply-adds
        madds = rows * x.shape[1] * (T + 9)
        workers = 1 if self._pool is None or madds < self.options.split_min_work else self.threads
        xb, tp = padded_activation(x, self._run, workers if x.size >= self.options.prepare_split else 1)
        out = np.empty((tp, groups * GROUP), dtype=np.float32)
        bounds = [groups * i // workers for i in range(workers + 1)]

        def work(i):
            gemm_groups(self.wv[0], descs, bounds[i], bounds[i + 1], xb, scratch.packed[i], out)

        self._run(work, workers)
        return out[:T] if groups * GROUP == rows else np.ascontiguousarray(out[:T, :rows])

    def _gemm_float(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]], scratch: RunScratch) -> np.ndarray:
        """_gemm_cat with BLAS: each thread takes a range of the stacked rows, dequantizes them into its own tile
        (tile_floats / threads floats at most at a time) and multiplies them with single-threaded BLAS."""
        T, n = x.shape
        segs, r = [], 0  # (first stacked row, rows, byte offset, qtype) of each matrix
        for desc, rows in parts:
            segs.append((r, rows, int(desc[0]), int(desc[1])))
            r += rows
        out = np.empty((T, r), dtype=np.float32)
        ranges = self._parts(r)
        if scratch.tiles is None:
            tile, per = np.empty(self.options.tile_floats, dtype=np.float32), self.options.tile_floats // self.threads
            scratch.tiles = [tile[i * per:(i + 1) * per] for i in range(self.threads)]
        tiles = scratch.tiles
        tile_rows = max(1, len(tiles[0]) // n)

        def work(i):
            r0, r1 = ranges[i]
            for a in range(r0, r1, tile_rows):
                b = min(r1, a + tile_rows)
                tile = tiles[i][: (b - a) * n].reshape(b - a, n)
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

    def _products(self, x: np.ndarray, parts: list[tuple[np.ndarray, int]], scratch: RunScratch) -> np.ndarray:
        """_gemm_cat for the prompt's tokens; for a few rows (the last token's logits and last layer) the integer
        GEMM still where it runs (as fast as the matvec kernels there: packing costs about what the dot products
        do, and a process whose prompt takes this path need not load the matvec kernels' machine code as well), else
        the matvec kernels: BLAS would dequantize whole matrices for one row."""
        if len(x) > self.options.small_t or self._int_gemm_takes(parts):
            return self._gemm_cat(x, parts, scratch)
        xb = activation_blocks(len(x), x.shape[1])
        prepare(x, xb)
        out = np.empty((len(x), sum(rows for _, rows in parts)), dtype=np.float32)
        matvec_multi(self.wv, self._descs(parts), x, xb, out)
        return out

    def _forward_gemm(self, tokens: np.ndarray, cache: RingKVCache, all_logits: bool,
                      scratch: RunScratch, hidden: bool = False) -> np.ndarray:
        hp = self.hparams
        T, start = len(tokens), cache.offset
        E, H, KVH, D, F = hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_ff
        eps, f32 = hp.norm_eps, self.wv[2]
        x = np.empty((T, E), dtype=np.float32)  # residual stream
        h = np.empty((T, E), dtype=np.float32)
        att = np.empty((T, H, D), dtype=np.float32)
        ff = np.empty((T, F), dtype=np.float32)
        cos = np.empty((len(self.inv_freq), T, hp.rope_dim // 2), dtype=np.float32)  # per RoPE frequency set
        sin = np.empty_like(cos)
        L.embed(self.wv, self.glob_tab[L.EMBD, 1], self.glob_tab[L.EMBD, 0], E, tokens, np.float32(hp.embed_scale),
                x)
        L.rope_tables(start, self._inv_freq(cache), np.float32(hp.rope_attn_factor), cos, sin)
        for i in range(hp.n_layers):
            # the last layer caches every token's keys and values, but past its attention it runs for the last
            # token alone when only its logits are wanted (as llama.cpp does): 1/n_layers of a prompt's products
            out_t = 1 if i == hp.n_layers - 1 and not all_logits else T
            lt = self.layer_tab[i]
            g = self.layer_opt[i, L.L_ROPE]
            L.rms_norm(x, f32, lt[L.ATTN_NORM, 0], eps, h)
            qkv = self._gemm_cat(h, [(lt[L.WQ], H * D), (lt[L.WK], KVH * D), (lt[L.WV], KVH * D)], scratch)
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
            L.rope(q3, cos[g], sin[g], hp.rope_neox)
            L.rope(k3, cos[g], sin[g], hp.rope_neox)
            self._attend_prompt(cache, i, q3, k3, v.reshape(T, KVH, D), start, att, out_t)
            if out_t < T:
                x, h, att, ff = x[-1:], h[-1:], att[-1:], ff[-1:]
            x += self._post_norm(self._products(att.reshape(out_t, H * D), [(lt[L.WO], E)], scratch),
                                 lt[L.POST_ATTN_NORM])
            L.rms_norm(x, f32, lt[L.FFN_NORM, 0], eps, h)
            gu = self._products(h, [(lt[L.GATE], F), (lt[L.UP], F)], scratch)
            L.glu(gu, ff, self.dims[L.D_ACT])
            x += self._post_norm(self._products(ff, [(lt[L.DOWN], E)], scratch), lt[L.POST_FFN_NORM])

        L.rms_norm(x, f32, self.glob_tab[L.OUT_NORM, 0], eps, h)
        if hidden:
            return h
        logits = self._products(h, [(self.glob_tab[L.OUTPUT], hp.n_vocab)], scratch)
        if hp.logit_softcap:
            L.softcap(logits, np.float32(hp.logit_softcap))
        return logits

    def _stack_args(self, cache: RingKVCache, tokens: np.ndarray, start: int, outputs: int,
                    scratch: RunScratch, out: np.ndarray, hidden: bool = False) -> tuple:
        """forward_stack's arguments for tokens at positions start.. of one conversation's cache (the one row of a
        pool, as bytes)."""
        n = len(tokens)
        return (self.wv, self.layer_tab, self.glob_tab, self.dims, self.fparams, self.layer_opt, self._inv_freq(cache),
                tokens, np.arange(start, start + n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                cache.k.view(np.uint8)[None], cache.v.view(np.uint8)[None], cache.byte_layout, cache.kv_code,
                outputs, scratch.stack, out, hidden, numba.get_num_threads())

    def _inv_freq(self, cache: RingKVCache) -> np.ndarray:
        """The RoPE frequency sets for this cache's context (LongRoPE: long factors past the original one)."""
        return self.inv_freq_long if cache.max_seq > self.hparams.rope_orig_ctx else self.inv_freq

    def _attend_prompt(self, cache: RingKVCache, i: int, q3: np.ndarray, k3: np.ndarray, v3: np.ndarray,
                       start: int, att: np.ndarray, out_t: int) -> None:
        """Store layer i's new keys and values k3, v3: (T, n_kv_heads, head_dim) and attend to them with the last
        out_t queries of q3 (into att's last out_t rows). A full layer attends over its cache (in place when it is
        float32; else over a float32 copy of the positions seen, which BLAS needs); a windowed one over its ring's
        positions the first query sees, in order, followed by the new ones, and its ring then keeps the last of them.
        An encoded cache (f16, q8_0) is attended as stored: the new keys and values too go through the encoding
        first, as on the decode path."""
        T, window = len(q3), self.hparams.window(i)
        kc, vc = cache.layer(i)  # (n_kv_heads, S, row elements)
        S = kc.shape[1]
        keys, values = self._encoded(cache, k3.transpose(1, 0, 2)), self._encoded(cache, v3.transpose(1, 0, 2))
        if not window:
            kc[:, start:start + T], vc[:, start:start + T] = keys, values
            if cache.kv_type != "f32":
                keys, values = self._decoded(cache, kc[:, :start + T]), self._decoded(cache, vc[:, :start + T])
            else:
                keys, values = kc, vc
            prompt_attention(q3[T - out_t:], keys, values, start + T - out_t, att[T - out_t:], self.hparams.scale, 0,
                             self._run, self.options.query_block)
            return
        base = max(0, start - window + 1)
        slots = np.arange(base, start) % S
        old_k, old_v = self._decoded(cache, kc[:, slots]), self._decoded(cache, vc[:, slots])
        all_k = np.concatenate([old_k, self._decoded(cache, keys)], axis=1)
        all_v = np.concatenate([old_v, self._decoded(cache, values)], axis=1)
        prompt_attention(q3[T - out_t:], all_k, all_v, start - base + T - out_t, att[T - out_t:], self.hparams.scale,
                         window, self._run, self.options.query_block)
        keep = min(T, S)
        slots = np.arange(start + T - keep, start + T) % S
        kc[:, slots] = keys[:, T - keep:]
        vc[:, slots] = values[:, T - keep:]

    @staticmethod
    def _encoded(cache: RingKVCache, x: np.ndarray) -> np.ndarray:
        """x: (..., head_dim) float32 -> rows in the cache's storage type (x itself for f32)."""
        if cache.kv_type == "f32":
            return x
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        out = np.empty((flat.shape[0], cache.row), dtype=cache.k.dtype)
        encode_rows(flat, out.view(np.uint8), cache.kv_code)
        return out.reshape(*x.shape[:-1], cache.row)

    def _decoded(self, cache: RingKVCache, rows: np.ndarray) -> np.ndarray:
        """Stored rows (..., row elements) -> (..., head_dim) float32 (rows themselves for f32)."""
        if cache.kv_type == "f32":
            return rows
        flat = np.ascontiguousarray(rows).reshape(-1, cache.row)
        out = np.empty((flat.shape[0], self.hparams.head_dim), dtype=np.float32)
        decode_rows(flat.view(np.uint8), out, cache.kv_code)
        return out.reshape(*rows.shape[:-1], self.hparams.head_dim)

    def shift_cache(self, cache: RingKVCache, start: int, n: int) -> bool:
        """Drop cached positions start .. start + n and move the later ones down by n, their keys rotated back by
        n positions (decoded, rotated, encoded again for f16 / q8_0: one more rounding). False, and the cache
        untouched, for a model with sliding-window layers: their rings have overwritten positions that the
        shifted queries would see again, so the caller recomputes instead."""
        hp = self.hparams
        end = cache.offset
        if any(hp.window(i) for i in range(hp.n_layers)) or n <= 0 or not 0 <= start <= end - n:
            return False
        inv = self._inv_freq(cache)
        for i in range(hp.n_layers):
            kc, vc = cache.layer(i)
            keys = rotate_keys(self._decoded(cache, kc[:, start + n:end]), -n, inv[self.layer_opt[i, L.L_ROPE]],
                               hp.rope_neox)
            kc[:, start:end - n] = self._encoded(cache, keys)
            vc[:, start:end - n] = vc[:, start + n:end].copy()
        cache.offset = end - n
        return True

    def _post_norm(self, y: np.ndarray, desc: np.ndarray) -> np.ndarray:
        """y normalized in place by the post-norm weight at desc (Gemma's sandwich), or y when there is none."""
        if desc[0] >= 0:
            L.rms_norm(y, self.wv[2], desc[0], self.hparams.norm_eps, y)
        return y
