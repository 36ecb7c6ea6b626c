"""forward_batch: one decode step for several conversations at once gives each the logits that its own forward
would (each token keeps its own position and KV cache): exactly on numpy; on numba within the int16 activation
rounding's noise, since a step of several tokens decodes each weight block once for all of them and adds the
same integer block sums in another float order (quant/simd_multi.py), and 30 layers carry that rounding on."""

from __future__ import annotations

import numpy as np
import pytest

from backends import load_model
from llmcli.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time there was a", "def f(x):"]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_forward_batch_equals_forward_per_conversation(smollm2_gguf, backend):
    model = load_model(smollm2_gguf, backend, 1)
    tok = Tokenizer.from_gguf(smollm2_gguf)
    prompts = [tok.encode(p) for p in PROMPTS]
    new_caches = getattr(model, "new_caches", None)
    caches = new_caches(len(prompts), 64) if new_caches else [model.new_cache(64) for _ in prompts]
    alone = []
    for p, cache in zip(prompts, caches, strict=True):
        model.forward(np.asarray(p), cache)
        ref = model.new_cache(64)
        model.forward(np.asarray(p), ref)
        alone.append([model.forward(np.asarray([t]), ref) for t in (17, 42)])
    # two steps, the second with the conversations in another order and one left out
    step1 = model.forward_batch(np.array([17] * 4), caches)
    order = [2, 0, 3]
    step2 = model.forward_batch(np.array([42] * 3), [caches[i] for i in order])
    assert [c.offset for c in caches] == [len(p) + (2 if i in order else 1) for i, p in enumerate(prompts)]
    got = [(step1[i], alone[i][0]) for i in range(4)] + [(step2[row], alone[i][1]) for row, i in enumerate(order)]
    for batched, own in got:
        if backend == "numpy":
            np.testing.assert_array_equal(batched, own)
        else:  # measured: up to 6e-4 of the largest logit, as far as numba's own logits are from numpy's
            assert np.max(np.abs(batched - own)) <= 2e-3 * np.max(np.abs(own))
            assert np.argmax(batched) == np.argmax(own)
