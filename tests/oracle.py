"""The independent implementation: transformers + torch loading the same GGUF file."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=4)
def hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@functools.lru_cache(maxsize=4)
def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_logits(path: Path, ids: list[int]):
    """(T, n_vocab) float32 numpy logits of transformers for `ids`."""
    import torch

    with torch.no_grad():
        return hf_model(path)(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def kl_per_position(logits, ref, rows: int = 32) -> np.ndarray:
    """KL(ref || logits) for each row, in float64, a few rows at a time (a 600 x 262k pair of logits would take
    gigabytes of float64 temporaries at once)."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logits, ref = np.atleast_2d(logits), np.atleast_2d(ref)
    out = np.empty(len(ref))
    for i in range(0, len(ref), rows):
        lp, lq = log_softmax(ref[i:i + rows]), log_softmax(logits[i:i + rows])
        out[i:i + rows] = (np.exp(lp) * (lp - lq)).sum(-1)
    return out
