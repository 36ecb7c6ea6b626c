"""forward_batch: one decode step for several conversations at once gives each exactly the logits that its own
forward would (each token keeps its own position and KV cache)."""

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
    for i in range(4):
        np.testing.assert_array_equal(step1[i], alone[i][0])
    for row, i in enumerate(order):
        np.testing.assert_array_equal(step2[row], alone[i][1])
