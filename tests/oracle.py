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


def hf_states(path: Path, ids: list[int]):
    """(T, n_embd) float32 numpy states of transformers' last layer, after the output norm (its
    `last_hidden_state`): what embeddings are pooled from."""
    import torch

    with torch.no_grad():
        return hf_model(path).model(torch.tensor([ids])).last_hidden_state[0].float().numpy()


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


def scored_bpe_oracle(tokens: list[str], scores: list[float], token_types: list[int], add_space_prefix: bool,
                      unk_token: str | None):
    """`text -> ids` for a SentencePiece vocabulary the way transformers builds it: every way to cut every
    token in two is a merge, sorted by the merged token's score (then the longer left part, the longer right
    part, the earlier token), run by the `tokenizers` BPE. Our encoder ranks pairs without the list."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    pairs, keys = [], []
    for token, score in dict(zip(tokens, scores, strict=True)).items():
        if len(token) > 256:
            continue
        for i in range(1, len(token)):
            if token[:i] in vocab and token[i:] in vocab:
                pairs.append((token[:i], token[i:]))
                keys.append((score, i, len(token) - i))
    score, left, right = (np.array(k, dtype=np.float64) for k in zip(*keys, strict=True)) if keys else ([],) * 3
    order = np.lexsort((-np.asarray(right), -np.asarray(left), -np.asarray(score)))
    tok = Tokenizer(models.BPE(vocab, [pairs[k] for k in order.tolist()], unk_token=unk_token, fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                 prepend_scheme="first" if add_space_prefix else "never")
    typed = list(zip(tokens, token_types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in (2, 3) and t])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == 4 and t])
    return lambda text: tok.encode(text, add_special_tokens=False).ids
