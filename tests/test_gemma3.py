"""The real Gemma 3 270M (Q4_K_M) against transformers loading the same GGUF: logits on every backend (with a
prompt past the 512-token sliding window), tokenization of hostile texts, greedy tokens, and the built-in chat
template."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import hf_logits, hf_tokenizer, kl_per_position

from backends import load_model, mlx_available
from llmcli.template import ChatTemplate
from llmcli.tokenizer import Tokenizer
from quant.families import read_hparams
from quant.gguf_file import read_gguf

TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At 330 metres it was the tallest "
        "structure in the world until 1930, when the Chrysler Building in New York overtook it. ")




@pytest.fixture(scope="module")
def gguf(gemma3_path):
    return read_gguf(gemma3_path)


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return Tokenizer.from_gguf(gguf)


def test_hparams(gguf):
    hp = read_hparams(gguf)
    assert (hp.n_layers, hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_vocab) == (18, 640, 4, 1, 256, 262144)
    assert hp.windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert hp.rope_bases == tuple(1e6 if (i + 1) % 6 == 0 else 1e4 for i in range(18))
    assert (hp.norm, hp.act, hp.rope_neox, hp.qk_norm, hp.tied_embeddings) == ("sandwich", "gelu_tanh", True, True,
                                                                               True)
    assert hp.embed_scale == pytest.approx(640 ** 0.5) and hp.scale == 1 / 16


HOSTILE = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand    runs of     spaces",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά, עברית",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "<start_of_turn>user\nspecial tokens inline<end_of_turn>\n<bos>",
    "\u200b zero width \u00a0 nbsp \r\n crlf",
    "1234567890 3.14159 1e-9 0xDEADBEEF",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", HOSTILE)
def test_tokenization_equals_transformers(text, tokenizer, gemma3_path):
    want = hf_tokenizer(gemma3_path)(text)["input_ids"]
    assert tokenizer.encode(text) == want
    assert tokenizer.decode(want[1:]) == hf_tokenizer(gemma3_path).decode(want[1:])


@pytest.fixture(scope="module")
def long_prompt(tokenizer):
    """A prompt past the local layers' 512-token window."""
    ids = tokenizer.encode(TEXT * 30)
    assert len(ids) > 600
    return ids[:600]


@pytest.fixture(scope="module")
def reference(gemma3_path, long_prompt):
    return hf_logits(gemma3_path, long_prompt)


NARROW_WINDOW = 16


@pytest.fixture(scope="module")
def narrow_gemma3(gemma3_path, tmp_path_factory):
    """The real file with its window cut to NARROW_WINDOW tokens (one header value changed): a prompt goes past
    the window in a few dozen tokens, for a backend too slow on this CPU for 600 (MLX's CPU build: ~0.25 s a
    prompt token and ~0.3 s a row of logits)."""
    import shutil

    key = b"gemma3.attention.sliding_window"
    path = tmp_path_factory.mktemp("narrow") / "model.gguf"
    shutil.copyfile(gemma3_path, path)
    with open(path, "r+b") as f:
        head = f.read(1 << 20)
        at = head.index(key) + len(key)
        assert int.from_bytes(head[at:at + 4], "little") == 4  # a uint32 value
        f.seek(at + 4)
        f.write(NARROW_WINDOW.to_bytes(4, "little"))
    return path


BACKENDS = ["numba", "numpy"] + (["mlx"] if mlx_available() else [])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(backend, gguf, long_prompt, request):
    """Every position of a 600-token prompt (the local layers see only the last 512) in one call, and the last
    positions again through the cache after a prefix. MLX runs the same checks on the file with a 16-token
    window and a 32-token prompt (transformers reads the window from the same file)."""
    if backend == "mlx":
        path = request.getfixturevalue("narrow_gemma3")
        gguf = read_gguf(path)
        assert read_hparams(gguf).window(0) == NARROW_WINDOW
        long_prompt = long_prompt[:2 * NARROW_WINDOW]
        reference = hf_logits(path, long_prompt)
    else:
        reference = request.getfixturevalue("reference")
    model = load_model(gguf, backend, threads=2)
    n = len(long_prompt)
    ids = np.array(long_prompt)
    whole = model.forward(ids, model.new_cache(n), all_logits=True)
    cache = model.new_cache(n)
    model.forward(ids[:n - 12], cache)
    pieces = np.concatenate([model.forward(ids[n - 12:n - 5], cache, all_logits=True),
                             model.forward(ids[n - 5:], cache, all_logits=True)])
    for got, want in ((whole, reference), (pieces, reference[n - 12:])):
        kl = kl_per_position(got, want)
        assert kl.max() < 1e-3, (backend, kl.max(), kl.argmax())
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(prompt, gguf, tokenizer, gemma3_path):
    """32 greedy tokens on numba; each must be the oracle's top token on the same prefix, or within a near-tie
    of it (0.05 in logit)."""
    model = load_model(gguf, "numba", threads=2)
    ids = tokenizer.encode(prompt)
    cache = model.new_cache(len(ids) + 32)
    logits = model.forward(np.array(ids), cache)
    out = []
    for _ in range(32):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.array(out[-1:]), cache)
    ref = hf_logits(gemma3_path, ids + out)[len(ids) - 1:-1]  # the oracle's logits for each generated token
    gaps = ref.max(-1) - ref[np.arange(32), out]
    assert gaps.max() < 0.05, (prompt, gaps.max(), tokenizer.decode(out))


def test_show_prints_the_kv_cache_at_the_chosen_context(gemma3_path):
    """At 32k tokens the 15 local layers keep 512 + 8 positions each: 207 MiB of float32 keys and values against
    1152 MiB for a cache that keeps every position of every layer."""
    from llmcli.cli_core import describe

    kv = describe(str(gemma3_path), ctx=32768, kv_type="f32")["kv_cache"]
    per_position = 2 * 1 * 256 * 4
    assert kv == {"context": 32768, "type": "f32", "bytes": (3 * 32768 + 15 * 520) * per_position,
                  "full_bytes": 18 * 32768 * per_position}


def test_chat_template_is_gemmas(gguf, tokenizer):
    """The file carries no template: the built-in Gemma one renders Gemma's format, and <end_of_turn> stops."""
    assert gguf.get("tokenizer.chat_template") is None
    tmpl = ChatTemplate.from_gguf(gguf, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    assert tmpl.origin == "built-in (Gemma)"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! \n"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tmpl.render(msgs) == ("<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
                                 "<start_of_turn>model\nHello.<end_of_turn>\n"
                                 "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tmpl.render(msgs[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
    ids = tokenizer.encode(tmpl.render(msgs[1:2]), add_special=False)
    assert ids[:2] == [tokenizer.bos_id, tokenizer.encode("<start_of_turn>", add_special=False)[0]]
    assert tokenizer.encode("<end_of_turn>", add_special=False)[0] in tokenizer.stop_ids
