"""Sampling filters on hand-checkable arrays, penalties, and seed reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from llmcli.sampling import (
    Sampler,
    SamplingConfig,
    SamplingError,
    apply_penalties,
    min_p,
    softmax,
    top_k,
    top_p,
)

NEG = -np.inf


def test_top_k_keeps_the_k_largest():
    x = np.array([1.0, 5.0, 3.0, 4.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(top_k(x, 2), [NEG, 5.0, NEG, 4.0, NEG])
    np.testing.assert_array_equal(top_k(x, 0), x)  # 0 = off
    np.testing.assert_array_equal(top_k(x, 10), x)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    x = np.log(probs).astype(np.float32)
    assert np.isfinite(top_p(x, 0.5)).tolist() == [True, False, False, False]
    assert np.isfinite(top_p(x, 0.6)).tolist() == [True, True, False, False]  # ties keep the earlier
    assert np.isfinite(top_p(x, 0.85)).tolist() == [True, True, True, False]
    assert np.isfinite(top_p(x, 1.0)).all()


def test_min_p_is_relative_to_the_top_probability():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    x = np.log(probs).astype(np.float32)
    # threshold 0.2 * 0.5 = 0.1
    assert np.isfinite(min_p(x, 0.2)).tolist() == [True, True, True, False]
    assert np.isfinite(min_p(x, 0.7)).tolist() == [True, False, False, False]
    assert np.isfinite(min_p(x, 0.0)).all()


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    x = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    cfg = SamplingConfig(repeat_penalty=2.0, repeat_last_n=2)
    # only the last two tokens (0 and 1) count; token 2 is further back
    out = apply_penalties(x, [2, 0, 1], cfg)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])


def test_frequency_and_presence_penalties():
    x = np.zeros(4, dtype=np.float32)
    cfg = SamplingConfig(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(x, [3, 3, 3, 1], cfg)
    np.testing.assert_allclose(out, [0.0, -1.5, 0.0, -2.5])


def test_temperature_zero_is_greedy_after_penalties():
    x = np.array([1.0, 3.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingConfig(temperature=0.0))(x, []) == 1
    assert Sampler(SamplingConfig(temperature=0.0, repeat_penalty=1.5))(x, [1]) == 2


def test_sampling_follows_the_distribution():
    x = np.log(np.array([0.7, 0.2, 0.1])).astype(np.float32)
    s = Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    counts = np.bincount([s(x, []) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_filters_never_let_a_removed_token_through():
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    s = Sampler(SamplingConfig(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=1))
    assert {s(x, []) for _ in range(500)} == {0, 1}


def test_same_seed_same_tokens_different_seed_differs():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    cfg = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    a = [Sampler(SamplingConfig(seed=42, **cfg))(x, []) for _ in range(1)]
    s1, s2, s3 = (Sampler(SamplingConfig(seed=s, **cfg)) for s in (42, 42, 7))
    r1, r2, r3 = ([s(x, []) for _ in range(50)] for s in (s1, s2, s3))
    assert r1 == r2 and r1 != r3 and a[0] == r1[0]


def test_softmax_sums_to_one():
    p = softmax(np.array([1.0, 2.0, NEG], dtype=np.float32))
    assert p[2] == 0 and abs(p.sum() - 1) < 1e-6


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=2.0), dict(repeat_penalty=0.0), dict(repeat_last_n=-3)])
def test_out_of_range_options_are_refused(bad):
    with pytest.raises(SamplingError):
        SamplingConfig(**bad)
