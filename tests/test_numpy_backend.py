"""The numpy reference backend against transformers on the same GGUF file."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import hf_greedy, hf_logits, hf_tokenizer

from backends import load_model

TEXT = ("The history of the printing press begins in 1440, when Johannes Gutenberg combined movable "
        "metal type, oil-based ink and a screw press. Within fifty years presses were running in more than "
        "two hundred cities across Europe, and the price of books fell sharply as a result. Literacy spread, "
        "scientific ideas travelled faster, and the Reformation owed much to pamphlets.")


@pytest.fixture(scope="module")
def numpy_model(smollm2_gguf):
    return load_model(smollm2_gguf, "numpy")


@pytest.mark.slow
def test_logits_match_transformers_at_every_position(smollm2_path, numpy_model):
    ids = hf_tokenizer(smollm2_path)(TEXT, add_special_tokens=False)["input_ids"][:64]
    assert len(ids) == 64
    ref = hf_logits(smollm2_path, ids)
    ours = numpy_model.forward(np.array(ids), numpy_model.new_cache(128), all_logits=True)
    assert ours.shape == ref.shape
    for t in range(64):
        diff = np.abs(ours[t] - ref[t]).max()
        assert diff <= 1e-3 * np.abs(ref[t]).max(), f"position {t}: max |diff| {diff}"
        assert ours[t].argmax() == ref[t].argmax(), f"position {t}"


def test_pieces_with_cache_equal_one_pass(numpy_model):
    ids = np.array([1, 504, 3158, 8, 6233, 314, 253, 1345, 281, 34, 29, 41, 730, 5])
    whole = numpy_model.forward(ids, numpy_model.new_cache(32), all_logits=True)
    cache = numpy_model.new_cache(32)
    parts = [numpy_model.forward(ids[a:b], cache, all_logits=True) for a, b in ((0, 5), (5, 6), (6, 11), (11, 14))]
    assert cache.offset == len(ids)
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=2e-4 * np.abs(whole).max())


def test_trim_then_rerun_equals_fresh(numpy_model):
    ids = np.array([1, 504, 3158, 8, 6233, 314, 253, 1345])
    cache = numpy_model.new_cache(16)
    numpy_model.forward(ids, cache)
    numpy_model.forward(np.array([77, 88]), cache)
    assert cache.trim(2) == 2 and cache.offset == len(ids)
    again = numpy_model.forward(np.array([99]), cache)
    fresh = numpy_model.forward(np.append(ids, 99), numpy_model.new_cache(16))
    np.testing.assert_allclose(again, fresh, atol=2e-4 * np.abs(fresh).max())


@pytest.mark.slow
def test_greedy_tokens_match_transformers(smollm2_path, numpy_model):
    from llmcli.engine import GenerationConfig, Session, load
    from llmcli.sampling import SamplingConfig

    lm = load(smollm2_path, "numpy")
    session = Session(lm, 256)
    config = GenerationConfig(max_tokens=32, sampling=SamplingConfig(temperature=0.0))
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"):
        ids = lm.tokenizer.encode(prompt)
        ours = [r.token for r in session.generate(ids, config) if r.token is not None]
        ref = hf_greedy(smollm2_path, ids, 32)
        assert ours[:len(ref)] == ref[:len(ours)] and len(ours) >= 1, prompt
