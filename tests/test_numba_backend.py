"""The numba backend against the numpy reference: same logits (per-position KL) and the same greedy tokens on the
real SmolLM2 (its Q4_1 file and Q4_0 / Q8_0 copies), and on small random models for the features SmolLM2
lacks (NeoX RoPE with Q/K/V biases, Q/K norms)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import bench_models, greedy
from oracle import kl_per_position

import backends.numba
from backends import load_model
from backends.numba import NumbaOptions, jit_cache_is_cold
from quant.errors import PromptError
from quant.gguf_file import read_gguf

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = REPO / ".test-models"

DEFAULTS = NumbaOptions()
GEMM_MIN_T_COLD, SMALL_T = DEFAULTS.gemm_min_t_cold, DEFAULTS.small_t


def with_options(model, **changes):
    """`model` with some tuning options changed (the options are read at each forward)."""
    model.options = replace(DEFAULTS, **changes)
    return model


PROMPTS = [
    [1, 504, 3458, 282, 4195, 314, 253, 1345, 30, 216, 701, 3124, 28, 3, 99, 1412, 30, 2052, 314, 260],
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 30, 2],
]


@pytest.fixture(scope="session")
def smollm2_variants(smollm2_path):
    """{'q4_1': original, 'q4_0': copy, 'q8_0': copy} paths; the copies are made once into .test-models."""
    from gguf import GGMLQuantizationType

    paths = {"q4_1": smollm2_path}
    for name in ("q4_0", "q8_0"):
        dst = TEST_HOME / "numba" / f"smollm2-{name}.gguf"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            bench_models().requantize(smollm2_path, dst, GGMLQuantizationType[name.upper()])
        paths[name] = dst
    return paths




@pytest.fixture(scope="session")
def models(smollm2_variants):
    """(numba, numpy) model pairs per variant, loaded lazily and shared."""
    loaded = {}

    def get(name):
        if name not in loaded:
            gguf = read_gguf(smollm2_variants[name])
            loaded[name] = (load_model(gguf, "numba", threads=2), load_model(gguf, "numpy"))
        return loaded[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0"])
def test_logits_match_numpy(models, variant):
    """Every numba path gives the reference's distribution at every position: the prompt in one GEMM pass (the
    integer GEMM, and BLAS on dequantized tiles: which one runs by default depends on the CPU), the prompt through
    the matvec kernels in chunks of SMALL_T (what prompts shorter than model.gemm_min_t take), and pieces of 5 tokens
    through the cache."""
    fast, ref = models(variant)
    tokens = np.array(PROMPTS[0])
    want = ref.forward(tokens, ref.new_cache(32), all_logits=True)
    whole = {}
    for product in ("int", "blas"):  # these 20 tokens through the GEMM path
        with_options(fast, gemm_min_t=2 * SMALL_T, gemm_min_t_cold=0, prompt_gemm=product)
        whole[product] = fast.forward(tokens, fast.new_cache(32), all_logits=True)
        # for the last logits alone, the last layer runs past its attention for the last token only
        np.testing.assert_allclose(fast.forward(tokens, fast.new_cache(32)), whole[product][-1], rtol=0,
                                   atol=1e-4 * np.abs(whole[product][-1]).max())
    assert len(tokens) % SMALL_T  # and in chunks with a partial last one
    with_options(fast, gemm_min_t=len(tokens) + 1)
    chunked = fast.forward(tokens, fast.new_cache(32), all_logits=True)
    last = fast.forward(tokens, fast.new_cache(32))
    with_options(fast)
    # the same pass, except the last layer past its attention and the output matrix: for the last token alone by
    # the one-token kernels, for all by the several-token ones (quant/simd_multi.py: the same integer block sums,
    # added in another float order)
    np.testing.assert_allclose(last, chunked[-1], rtol=0, atol=1e-4 * np.abs(last).max())
    cache = fast.new_cache(32)
    pieces = np.concatenate([fast.forward(tokens[i:i + 5], cache, all_logits=True) for i in range(0, 20, 5)])
    for got in (whole["int"], whole["blas"], chunked, pieces):
        assert got.shape == want.shape and got.dtype == np.float32
        assert kl_per_position(got, want).max() < 1e-3
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0"])
def test_greedy_tokens_match_numpy(models, variant):
    """64 tokens on the store's file for every prompt; a shorter check on the copies keeps the suite lean."""
    fast, ref = models(variant)
    n, prompts = (64, PROMPTS) if variant == "q4_1" else (16, PROMPTS[:1])
    for prompt in prompts:
        assert greedy(fast, prompt, n) == greedy(ref, prompt, n)


@pytest.mark.slow
def test_cache_trim_reset_and_threads(models, smollm2_path):
    """Trimming the cache and running again reproduces the logits; the thread count does not change them."""
    fast, _ = models("q4_1")
    tokens = np.array(PROMPTS[1])
    cache = fast.new_cache(32)
    first = fast.forward(tokens, cache)
    nxt = fast.forward(np.array([42]), cache)
    assert cache.offset == len(tokens) + 1
    assert cache.trim(1) == 1
    np.testing.assert_array_equal(fast.forward(np.array([42]), cache), nxt)
    cache.reset()
    np.testing.assert_array_equal(fast.forward(tokens, cache), first)
    import numba

    before = numba.get_num_threads()  # numba's thread count is the calling thread's
    try:
        one = load_model(read_gguf(smollm2_path), "numba", threads=1)
        c1 = one.new_cache(32)
        np.testing.assert_array_equal(one.forward(tokens, c1), first)
        np.testing.assert_array_equal(one.forward(np.array([42]), c1), nxt)
        seen = []

        def elsewhere():  # a server's worker, a chat running ahead: numba starts a new thread at every core
            one.forward(tokens, one.new_cache(32))
            seen.append(numba.get_num_threads())

        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
        assert seen == [1]
    finally:
        numba.set_num_threads(before)
    assert not jit_cache_is_cold()


@pytest.mark.slow
def test_short_prompts_take_the_decode_stack_until_the_gemm_path_is_loaded(models, monkeypatch):
    """A prompt shorter than GEMM_MIN_T_COLD runs on the decode stack in a process whose GEMM path has not run yet
    (loading its machine code would cost more than it saves), and on the GEMM path once a longer prompt has
    loaded it. The two paths round differently, so each result shows which path made it."""
    fast, _ = models("q4_1")
    tokens = np.resize(np.array(PROMPTS[0]), GEMM_MIN_T_COLD - 1)
    assert fast.gemm_min_t == 40  # a small model's threshold (VNNI), a Q4_1 model's (BLAS)
    assert len(tokens) >= fast.gemm_min_t

    def forward(t):
        return fast.forward(t, fast.new_cache(len(t)))

    with_options(fast, gemm_min_t=1 << 30)
    stack = forward(tokens)
    with_options(fast, gemm_min_t=1, gemm_min_t_cold=0)
    assert fast.gemm_min_t == 1
    gemm = forward(tokens)
    assert not np.array_equal(stack, gemm)
    with_options(fast)
    monkeypatch.setattr(backends.numba, "_gemm_path_loaded", False)
    np.testing.assert_array_equal(forward(tokens), stack)
    forward(np.resize(tokens, GEMM_MIN_T_COLD))
    assert backends.numba._gemm_path_loaded
    np.testing.assert_array_equal(forward(tokens), gemm)


@pytest.mark.slow
def test_prompt_pool_equals_one_thread(models, smollm2_variants):
    """A prompt long enough for the prompt path (GEMM_MIN_T_COLD), whose products go to its thread pool, gives the
    logits of the same prompt on one thread, and the numba backend leaves BLAS itself on one thread (its
    products get their parallelism from that pool, not from a second, spinning pool of BLAS threads)."""
    from threadpoolctl import threadpool_info

    fast, _ = models("q4_1")
    one = load_model(read_gguf(smollm2_variants["q4_1"]), "numba", threads=1)
    assert {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == {1}
    tokens = np.resize(np.array(PROMPTS[0] + PROMPTS[1]), GEMM_MIN_T_COLD + 9)
    want = one.forward(tokens, one.new_cache(len(tokens)), all_logits=True)
    got = fast.forward(tokens, fast.new_cache(len(tokens)), all_logits=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_context_full_is_a_clean_error(models):
    fast, _ = models("q4_1")
    cache = fast.new_cache(4)
    with pytest.raises(PromptError, match="context full"):
        fast.forward(np.arange(5), cache)
    with pytest.raises(PromptError, match="out of range"):
        fast.forward(np.array([fast.hparams.n_vocab]), cache)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_models_match_numpy(qtype, tmp_path):
    """A random model in each K-quant format (rows of 256 and 512 weights: one and two super-blocks), through
    the int16 K-quant kernels, the decode stack and the prompt path, against the numpy reference."""
    from gguf import GGMLQuantizationType

    path = bench_models().write_random_model(tmp_path / f"{qtype}.gguf", n_embd=256, n_layers=2, n_heads=8,
                                              n_kv_heads=2, n_ff=512, n_vocab=160,
                                              qtype=GGMLQuantizationType[qtype])
    gguf = read_gguf(path)
    assert {t.qtype.name for t in gguf.tensors.values() if len(t.shape) == 2} == {qtype}
    fast, ref = load_model(gguf, "numba", threads=2), load_model(gguf, "numpy")
    # where prompts go through BLAS, the GEMM path starts sooner on the formats with the slowest matvec kernels
    assert fast.main_type == GGMLQuantizationType[qtype]
    assert fast.gemm_min_t == (40 if fast._int_gemm else {"Q4_K": 40, "Q5_K": 24, "Q6_K": 20}[qtype])
    tokens = np.resize(np.array([3, 17, 99, 5, 140, 2, 77, 31, 8, 64, 12, 150]),
                       GEMM_MIN_T_COLD + 5)
    want = ref.forward(tokens, ref.new_cache(len(tokens)), all_logits=True)
    whole = fast.forward(tokens, fast.new_cache(len(tokens)), all_logits=True)  # the prompt path
    cache = fast.new_cache(len(tokens))
    pieces = np.concatenate([fast.forward(tokens[i:i + 5], cache, all_logits=True)  # the int16 matvec kernels
                             for i in range(0, len(tokens), 5)])
    for got in (whole, pieces):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        assert kl_per_position(got, want).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch,opts", [("qwen2", {"qkv_bias": True}), ("qwen3", {"qk_norm": True}),
                                       ("llama", {"tied": False})])
def test_architecture_features_match_numpy(arch, opts, tmp_path):
    """NeoX RoPE, Q/K/V biases, Q/K norms, an untied output, GQA with 4 query heads per KV head, on a random
    model with rows that are not multiples of 256."""
    path = bench_models().write_random_model(tmp_path / f"{arch}.gguf", arch=arch, n_embd=128, n_layers=2,
                                              n_heads=8, n_kv_heads=2, n_ff=96, n_vocab=160, **opts)
    gguf = read_gguf(path)
    fast, ref = load_model(gguf, "numba", threads=2), load_model(gguf, "numpy")
    assert fast.hparams.rope_neox == (arch != "llama")
    tokens = np.array([3, 17, 99, 5, 140, 2, 77, 31, 8, 64, 12, 150])
    want = ref.forward(tokens, ref.new_cache(16), all_logits=True)
    cache = fast.new_cache(16)
    got = np.concatenate([fast.forward(tokens[:10], cache, all_logits=True),
                          fast.forward(tokens[10:], cache, all_logits=True)])
    # the decode stack multiplies int16 copies of the activations (1.5e-5 of each block's largest value)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_two_conversations_run_at_once_on_one_model(models, smollm2_variants):
    """A loaded model holds no run state: two threads generating greedily on one model, each with its own cache
    (and so its own scratch buffers), get what each gets alone. One prompt takes the prompt path (the integer
    GEMM's packed rows), the other the decode stack. (With one scratch shared by both caches they differ.)"""
    import threading

    fast, _ = models("q4_1")
    long_prompt = (PROMPTS[0] * 3)[:48]  # past gemm_min_t_cold: the prompt path
    prompts = [long_prompt, PROMPTS[1]]
    alone = [greedy(fast, p, 24) for p in prompts]
    together: list = [None, None]
    start = threading.Barrier(2)

    def run(i):
        start.wait()
        for _ in range(3):  # several rounds: the two decode loops overlap for many steps
            out = greedy(fast, prompts[i], 24)
            if together[i] is None or out != alone[i]:
                together[i] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_prompt_gemm_option_is_checked():
    from quant.errors import BackendError

    with pytest.raises(BackendError, match="prompt_gemm"):
        NumbaOptions(prompt_gemm="fast")
