"""Speculative decoding (--lookup, --draft): greedy text equals plain greedy text on every backend; sampled tokens
follow the model's distribution exactly (chi-square against the distribution computed branch by branch); rotating
caches keep the slack a draft needs; the CLI and the server."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from fuzz_gguf import read_model, serialize, write_seed

from llmcli.engine import GenerationConfig, Session, encode_chat, load
from llmcli.sampling import SamplingConfig
from llmcli.speculative import DraftLength, SpeculativeConfig, lookup_draft
from quant.errors import LlmError

GREEDY = GenerationConfig(max_tokens=40, sampling=SamplingConfig(temperature=0.0))
PROMPTS = [  # a reply that copies its input (long drafts kept), one that does not (drafts rejected)
    "Repeat this sentence exactly: the old lighthouse keeper climbed the stairs every night to light the lamp.",
    "Name three colours.",
]


@pytest.fixture(scope="module")
def q4_0_copy(smollm2_path, tmp_path_factory):
    """SmolLM2 requantized to Q4_0: a draft close to the Q4_1 model that still disagrees with it now and then."""
    from conftest import TEST_HOME

    from llmcli.quantize import run_quantize

    out = TEST_HOME / "speculative" / "smollm2-q4_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        run_quantize(str(smollm2_path), "q4_0", out, allow_requantize=True, pure=True)
    return out


def texts(session: Session, ids: list[int], config: GenerationConfig) -> tuple[str, object]:
    records = list(session.generate(ids, config))
    assert session.cache.offset == len(session.tokens)  # the cache holds exactly what the session says
    return "".join(r.text for r in records), records[-1]


def test_lookup_draft():
    assert lookup_draft([5, 6, 7, 8, 1, 5, 6, 7], 3) == [8, 1, 5]  # the 3-gram 5 6 7 matched
    assert lookup_draft([5, 6, 7, 8, 9, 2, 7], 2) == [8]  # only the 1-gram 7: weak evidence, one token
    assert lookup_draft([5, 6, 7, 8, 9, 2, 6, 7], 8) == [8, 9, 2, 6]  # the 2-gram 6 7: up to four
    assert lookup_draft([1, 2, 3, 1, 2, 3, 1, 2], 8, ngram_max=2) == [3, 1, 2]  # the latest occurrence
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([1], 4) == []


def test_draft_length_backs_off_and_grows():
    d = DraftLength(16)
    assert d.next(100) == 2
    d.update(2, 2, 0.02)
    assert d.next(100) == 3 and d.next(2) == 2
    d.update(3, 3, 0.02)
    assert d.next(100) == 7  # past 3, k + 1 (the tokens a verification runs) is a power of two
    d.update(7, 0, 0.1)
    assert d.next(100) == 3
    d.update(3, 0, 0.1)  # two misses: a pause of 8 plain steps
    assert [d.next(100) for _ in range(9)] == [0] * 8 + [2]
    d.plain_step(0.01)
    d.update(2, 2, 0.5)  # kept its draft but took longer than three plain steps: a miss, and after a pause
    assert [d.next(100) for _ in range(17)] == [0] * 16 + [1]  # one miss starts the next, twice as long
    d.update(1, 1, 0.01)  # the pauses end; it stays at 1, since 2 was measured slower
    assert d.next(100) == 1 and d.pause == 0


def test_draft_length_settles_where_tokens_per_second_peak():
    """Whole drafts kept each time, but a step of 7 drafts makes tokens more slowly than one of 3: it goes back to 3
    and stays."""
    d, cost = DraftLength(16), {2: 0.03, 3: 0.035, 7: 0.08}  # seconds of a step by draft length
    seen = []
    for _ in range(8):
        n = d.next(100)
        seen.append(n)
        d.update(n, n, cost[n])
    assert seen == [2, 3, 7, 3, 3, 3, 3, 3]
    assert DraftLength(4).ladder == [1, 2, 3] and DraftLength(1).ladder == [1]


def greedy_equal_plain(lm, draft_lm, prompts: list[list[int]], max_tokens: int, ctx: int) -> None:
    """Greedy text with lookup and with the draft model equals plain greedy text on each prompt; over them drafts
    were kept and drafts were rejected."""
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0))
    plain = Session(lm, ctx)
    engines = {"lookup": Session(lm, ctx, spec=SpeculativeConfig(lookup=8)),
               "draft": Session(lm, ctx, spec=SpeculativeConfig(draft_max=4), draft=draft_lm)}
    drafted = {name: [0, 0] for name in engines}
    for ids in prompts:
        want, _ = texts(plain, ids, config)
        for name, s in engines.items():
            got, last = texts(s, ids, config)
            assert got == want, (name, ids)
            drafted[name][0] += last.draft_tokens
            drafted[name][1] += last.accepted_tokens
    for name, (n, kept) in drafted.items():
        assert 0 < kept < n, (name, n, kept)


@pytest.mark.slow  # the Q4_0 copy takes ~1.5 min to make on a fresh test store
def test_greedy_lookup_and_draft_equal_plain_smollm2(smollm2_path, q4_0_copy):
    lm = load(smollm2_path, "numba", threads=2)
    prompts = [encode_chat(Session(lm, 64), [{"role": "user", "content": p}]) for p in PROMPTS]
    greedy_equal_plain(lm, load(q4_0_copy, "numba", threads=2), prompts, 32, 512)


@pytest.mark.parametrize("backend", ["numpy", "mlx", "numba"])
def test_greedy_lookup_and_draft_equal_plain_tiny(backend, tmp_path):
    """Every backend, on the tiny model (the reference backend and MLX's CPU build take seconds per SmolLM2
    token on a busy 2-core machine); prompts that end where the model's own greedy text repeats."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    seed_path = write_seed(tmp_path / "seed.gguf")
    lm = load(seed_path, backend, threads=2)
    draft_lm = load(_draft_copy(seed_path, tmp_path / "draft.gguf"), backend, threads=2)
    prompts = []
    for word in ("hello", "he ll", "Ġh"):
        start = lm.tokenizer.encode(word)
        s = Session(lm, 128)
        list(s.generate(start, GenerationConfig(max_tokens=12, sampling=SamplingConfig(temperature=0.0))))
        prompts += [start, s.tokens + start]
    greedy_equal_plain(lm, draft_lm, prompts, 24, 128)


def test_greedy_lookup_on_gemma3_past_its_sliding_window(gemma3_path):
    """Gemma 3 (sliding-window layers) with drafts of up to 16 past its window: the same text, and every trim
    takes back what it was asked to (none drops the cache)."""
    lm = load(gemma3_path, "numba", threads=2)
    words = " ".join(f"item{i % 37} is {['red', 'blue', 'green'][i % 3]}," for i in range(110))
    ids = encode_chat(Session(lm, 1024), [{"role": "user", "content": "Copy this list: " + words}])
    assert len(ids) > lm.hparams.window(0) > 0
    config = GenerationConfig(max_tokens=32, sampling=SamplingConfig(temperature=0.0))
    plain = Session(lm, 1024)
    want, _ = texts(plain, ids, config)
    spec = Session(lm, 1024, spec=SpeculativeConfig(lookup=16))
    trims = []
    trim = spec.cache.trim
    spec.cache.trim = lambda n: trims.append((n, trim(n))) or trims[-1][1]
    got, last = texts(spec, ids, config)
    assert got == want and last.accepted_tokens > 0
    assert any(n > 0 for n, _ in trims) and all(n == dropped for n, dropped in trims)  # never dropped it all


@pytest.mark.parametrize("backend", ["numpy", "mlx", "numba"])
def test_rotating_cache_takes_back_a_rejected_draft_of_its_slack(backend, tmp_path):
    """A cache made with slack 16 for a model with a sliding window of 8: run 17 tokens past the window (a pending
    token and 16 drafts), trim the 16; the next token's logits are those of a cache that never saw them."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from test_families import write_model

    from backends import load_model
    from quant.gguf_file import read_gguf

    model = load_model(read_gguf(write_model(tmp_path / "g.gguf", arch="gemma3", sliding_window=8)), backend, 1)
    ids = np.arange(1, 31, dtype=np.int32) % 40
    spec, plain = model.new_cache(64, slack=16), model.new_cache(64)
    model.forward(ids[:-1], spec)
    model.forward(np.concatenate([ids[-1:], np.arange(16, dtype=np.int32) + 3]), spec, all_logits=True)
    assert spec.trim(16) == 16 and spec.offset == len(ids)
    model.forward(ids, plain)
    np.testing.assert_allclose(model.forward(np.array([7], dtype=np.int32), spec),
                               model.forward(np.array([7], dtype=np.int32), plain), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_run_lookup_and_draft(smollm2_path, q4_0_copy):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llmcli", "run", str(smollm2_path), PROMPTS[0], "-n", "24",
                               "--temperature", "0", *args], capture_output=True, text=True, timeout=600)

    plain, lookup, draft = run(), run("--lookup", "8", "--verbose"), run("--draft", str(q4_0_copy))
    assert plain.returncode == lookup.returncode == draft.returncode == 0, (lookup.stderr, draft.stderr)
    assert lookup.stdout == plain.stdout == draft.stdout
    assert "drafted tokens accepted" in lookup.stderr
    both = run("--lookup", "4", "--draft", str(q4_0_copy))
    assert both.returncode == 1 and both.stderr.strip() == "error: --lookup and --draft are two ways to draft: " \
                                                             "choose one"
    bad = run("--lookup", "99")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --lookup must be in 0..32, got 99"


def test_draft_with_another_vocabulary_is_one_error(smollm2_path, gemma3_path):
    with pytest.raises(LlmError, match="does not share the model's vocabulary"):
        Session(load(smollm2_path, "numpy", threads=1), 64, draft=load(gemma3_path, "numpy", threads=1))


# ---- sampling keeps the distribution ----

def _draft_copy(seed_path, out):
    """The tiny model with its embeddings changed: a draft whose distribution q differs from the model's p."""
    m = read_model(seed_path)
    t = next(t for t in m.tensors if t.name == "token_embd.weight")
    emb = np.frombuffer(t.data, dtype=np.float32)
    t.data = (1.5 * emb + 0.1 * np.random.default_rng(1).standard_normal(emb.size)).astype(np.float32).tobytes()
    out.write_bytes(serialize(m)[0])
    return out


def _exact(lm, ids, config, depth):
    """P(token at step `depth`) of plain sampling, marginalised over the steps before it, branch by branch."""
    from llmcli.engine import Generation

    probe = Generation(lm.tokenizer, ids, config, budget=10)
    out = np.zeros(lm.hparams.n_vocab)
    stack = [(list(ids), 1.0)]
    while stack:
        hist, weight = stack.pop()
        cache = lm.model.new_cache(64)
        p = probe.distribution(lm.model.forward(np.asarray(hist, dtype=np.int32), cache), hist)
        if len(hist) - len(ids) == depth:
            out += weight * p
            continue
        stack += [(hist + [int(t)], weight * p[t]) for t in np.flatnonzero(p)]
    return out


def _chi2_pvalue(counts, expected):
    from scipy.stats import chi2

    big = expected >= 5  # cells expected under 5 are pooled into one
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    return float(chi2.sf(stat, keep.sum() - 1))


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_sampling_keeps_the_distribution(how, tmp_path):
    seed_path = write_seed(tmp_path / "seed.gguf")
    lm = load(seed_path, "numpy", threads=1)
    draft = load(_draft_copy(seed_path, tmp_path / "draft.gguf"), "numpy", threads=1) if how == "draft" else None
    # filters, penalties that depend on the history, a logit bias; the stop tokens banned (four tokens each)
    sampling = dict(temperature=0.7, top_k=4, top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=4,
                    frequency_penalty=0.2)
    bias = ((97, 1.0), *((t, -100.0) for t in sorted(lm.tokenizer.stop_ids)))
    # the prompt: text the model itself sampled, so that lookup finds what the model tends to say next
    plain = Session(lm, 64)
    start = lm.tokenizer.encode("hello")
    list(plain.generate(start, GenerationConfig(max_tokens=40, sampling=SamplingConfig(**sampling, seed=123),
                                                logit_bias=bias)))
    ids = plain.tokens
    config = GenerationConfig(max_tokens=4, sampling=SamplingConfig(**sampling), logit_bias=bias)
    spec = SpeculativeConfig(lookup=2) if how == "lookup" else SpeculativeConfig(draft_max=2)
    n = 1500
    counts = {1: np.zeros(lm.hparams.n_vocab), 2: np.zeros(lm.hparams.n_vocab)}
    drafted = kept = 0
    session = Session(lm, 64, spec=spec, draft=draft)
    for seed in range(n):
        session.reset()
        gen_config = GenerationConfig(max_tokens=4, sampling=SamplingConfig(**sampling, seed=seed),
                                      logit_bias=bias)
        last = list(session.generate(ids, gen_config))[-1]
        drafted, kept = drafted + last.draft_tokens, kept + last.accepted_tokens
        out = session.tokens[len(ids):]
        for depth in counts:
            counts[depth][out[depth]] += 1
    assert 50 < kept < drafted - 50, (drafted, kept)  # drafts were kept and drafts were rejected, often
    for depth, c in counts.items():
        p = _chi2_pvalue(c, n * _exact(lm, ids, config, depth))
        assert p > 1e-3, (depth, p)


def test_serve_with_lookup_returns_the_plain_greedy_text(smollm2_path):
    """`llm serve --lookup` over HTTP: greedy replies equal plain greedy decoding, one request alone (speculative
    steps) and two at once (batched steps while both run)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_server import Served

    lm = load(smollm2_path, "numba", threads=2)
    plain = Session(lm, 512)
    config = GenerationConfig(max_tokens=24, sampling=SamplingConfig(temperature=0.0))
    want = [texts(plain, encode_chat(plain, [{"role": "user", "content": p}]), config)[0] for p in PROMPTS]
    server = Served(smollm2_path, "--lookup", "8", "--parallel", "2")
    try:
        client = server.client()

        def ask(prompt):
            r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=24)
            return r.choices[0].message.content

        assert [ask(p) for p in PROMPTS] == want
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, PROMPTS)) == want
    finally:
        server.stop()


def test_bench_reports_speculative_speed_and_acceptance(smollm2_path):
    import json

    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", str(smollm2_path), "-p", "0", "-n", "16", "-r", "1",
                        "--lookup", "8", "-o", "json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["spec_tok_s"] > 0 and row["spec_plain_tok_s"] > 0 and 0 < row["spec_acceptance"] <= 1
