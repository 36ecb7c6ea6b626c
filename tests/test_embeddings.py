"""Embeddings: the states every backend pools from against transformers' on the same GGUF, the poolings, the
file's pooling type, `llm embed`, and `llm serve`'s /v1/embeddings (the official `openai` client), ollama's
/api/embed and /api/embeddings (the official `ollama` client) over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
from conftest import rewritten_gguf
from gguf import GGUFValueType
from oracle import hf_states
from serving import KEY, Served
from test_cli import assert_one_line_error, llm

from backends import mlx_available

BACKENDS = ["numba", "numpy"] + (["mlx"] if mlx_available() else [])
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France, and its largest city.",
         "def add(a, b):\n    return a + b", "Embeddings place similar texts close together."]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def same_direction(got, want) -> bool:
    """`got` is a unit vector along `want`, as far as the numba backend's paths agree with each other."""
    return bool(np.allclose(got, unit(want), atol=1e-3) and cosines(got, want)[0] > 0.99999)


@pytest.fixture(scope="module")
def long_ids(smollm2_path):
    """A text of ~90 tokens: past the numba backend's decode stack, on its prompt path."""
    from llmcli.engine import load

    lm = load(smollm2_path, backend="numpy")
    ids = lm.tokenizer.encode(" ".join(TEXTS * 3))
    assert len(ids) > 64
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_and_poolings_match_transformers(backend, smollm2_path, long_ids):
    """The output norm's states of every token, as transformers computes them from the same file (numba: the
    decode stack for a short text and the prompt path for a long one); each pooling of them; and the numba
    backend's K/V of a text it has embedded (the next text reuses them) are those of a plain prefill."""
    from llmcli.engine import Session, load

    lm = load(smollm2_path, backend=backend)
    session = Session(lm, 512)
    for ids in (long_ids[:7], long_ids):
        ref = hf_states(smollm2_path, ids)
        session.reset()
        states = lm.model.forward(np.asarray(ids, dtype=np.int32), session.cache, all_logits=True, hidden=True)
        assert states.shape == ref.shape and states.dtype == np.float32
        assert cosines(states, ref).min() > 0.9999
        assert np.abs(states - ref).max() < 2e-3 * np.abs(ref).max()
        session.reset()
        last = lm.model.forward(np.asarray(ids, dtype=np.int32), session.cache, hidden=True)
        assert last.shape == (lm.hparams.n_embd,) and cosines(last, ref[-1])[0] > 0.9999
        for pooling, want in (("mean", ref.mean(0)), ("cls", ref[0]), ("last", ref[-1])):
            v = session.embed(ids, pooling)
            assert v.shape == (lm.hparams.n_embd,) and cosines(v, want)[0] > 0.9999, pooling


def test_gemma3_states_match_transformers(gemma3_path):
    """Gemma 3 (its sandwich norms, scaled embeddings and sliding-window layers) gives transformers' states."""
    from oracle import hf_tokenizer

    from llmcli.engine import Session, load

    ids = hf_tokenizer(gemma3_path)(" ".join(TEXTS))["input_ids"]
    ref = hf_states(gemma3_path, ids)
    lm = load(gemma3_path, backend="numba")
    session = Session(lm, 512)
    states = lm.model.forward(np.asarray(ids, dtype=np.int32), session.cache, all_logits=True, hidden=True)
    assert cosines(states, ref).min() > 0.999
    assert cosines(session.embed(ids, "mean"), ref.mean(0))[0] > 0.9999


def test_last_pooling_reuses_a_shared_prefix(smollm2_path):
    """With last-token pooling a text starting like the one before (an instruction every query repeats) runs only
    what is new, and its embedding is the one a fresh session gives."""
    from llmcli.engine import Session, load

    lm = load(smollm2_path)
    tok = lm.tokenizer
    first, second = (tok.encode(f"Instruct: find passages about the question.\nQuery: {t}") for t in TEXTS[:2])
    session = Session(lm, 512)
    session.embed(first, "last")
    shared = session.common_prefix(second)
    assert shared >= 10
    v = session.embed(second, "last")
    alone = Session(lm, 512).embed(second, "last")
    assert session.tokens == second
    # the new tokens take the decode stack, a fresh text the prompt path: the same numbers summed in other orders
    # (on VNNI hosts the two differ by up to ~3e-4 of the largest state)
    np.testing.assert_allclose(v, alone, rtol=1e-3, atol=1e-3 * np.abs(alone).max())
    assert v @ alone / (np.linalg.norm(v) * np.linalg.norm(alone)) > 0.99999
    # mean pooling needs every state, so it runs the whole text
    np.testing.assert_allclose(session.embed(second, "mean"), Session(lm, 512).embed(second, "mean"), atol=1e-5)


def test_the_files_pooling_type(tmp_path, smollm2_gguf, smollm2_path):
    """An embedding model's GGUF names its pooling (`ARCH.pooling_type`, llama.cpp's enum): `llm show` says it and
    `llm embed` pools by it; a reranker's (rank) is refused unless a pooling is chosen; a value past the enum is a
    broken file, said in one line."""
    from llmcli.engine import Session, load

    def with_pooling(value: int):
        return rewritten_gguf(smollm2_gguf, tmp_path / f"pooling{value}.gguf",
                              add={"llama.pooling_type": (value, GGUFValueType.UINT32)})

    last = with_pooling(3)
    r = llm("show", str(last), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pooling"] == "last"
    assert json.loads(llm("show", str(smollm2_path), "--json").stdout)["pooling"] is None
    assert "last pooling (the file's)" in llm("show", str(last)).stdout
    lm = load(smollm2_path)
    ids = lm.tokenizer.encode(TEXTS[1])
    r = llm("embed", str(last), TEXTS[1])
    assert r.returncode == 0, r.stderr
    got = np.array(json.loads(r.stdout))
    assert cosines(got, Session(lm, 512).embed(ids, "last"))[0] > 0.99999 and abs(np.linalg.norm(got) - 1) < 1e-6

    rank = with_pooling(4)
    assert_one_line_error(llm("embed", str(rank), TEXTS[1]), "reranker", "pooling")
    r = llm("embed", str(rank), TEXTS[1], "--pooling", "mean")
    assert r.returncode == 0 and cosines(json.loads(r.stdout), Session(lm, 512).embed(ids, "mean"))[0] > 0.99999
    assert_one_line_error(llm("embed", str(with_pooling(9)), TEXTS[1]), "pooling_type", "9")


def test_a_rerankers_server_refuses_embeddings_and_chats(tmp_path, smollm2_gguf):
    """A server started on a reranker's file (pooling type rank) says at start that it gives no embeddings, refuses
    them in words, and serves everything else; --pooling makes it embed."""
    path = rewritten_gguf(smollm2_gguf, tmp_path / "rank.gguf", add={"llama.pooling_type": (4, GGUFValueType.UINT32)})
    s = Served(path, "--parallel", "1")
    try:
        r = httpx.post(s.base + "/v1/embeddings", json={"input": "a"})
        assert r.status_code == 400 and "reranker" in r.json()["error"]["message"]
        r = httpx.post(s.base + "/api/embed", json={"model": s.model, "input": "a"})
        assert r.status_code == 400 and "reranker" in r.json()["error"]
        r = httpx.post(s.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        code, err = s.stop()
    assert "no embeddings (a reranker" in err and "Traceback" not in err
    s = Served(path, "--parallel", "1", "--pooling", "last")
    try:
        r = httpx.post(s.base + "/v1/embeddings", json={"input": "a"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 576
    finally:
        code, err = s.stop()
    assert "embeddings by last pooling" in err


def test_llm_embed(smollm2_path):
    """`llm embed`: an argument, or each line of stdin, as one JSON array per line; normalized unless
    --no-normalize; bad input in one line."""
    from llmcli.engine import Session, load

    lm = load(smollm2_path)
    session = Session(lm, 512)
    want = [session.embed(lm.tokenizer.encode(t), "mean") for t in TEXTS[:3]]
    r = llm("embed", str(smollm2_path), TEXTS[0])
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)
    # CI saw this process and a new one give a short text's vector by different paths (the decode stack, the
    # integer GEMM, BLAS: up to 2.3e-4 apart on SmolLM2's unit vectors, measured on Zen 4)
    assert len(one) == lm.hparams.n_embd and same_direction(one, want[0])
    # the third text has a line break of its own: stdin is one text per line
    r = llm("embed", str(smollm2_path), input="\n".join(TEXTS[:2]) + "\n\n")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr
    for line, w in zip(lines, want, strict=False):
        assert same_direction(json.loads(line), w)
    # a new process takes the same path for each: a line is its text alone, exactly, whatever came before it
    second = json.loads(llm("embed", str(smollm2_path), TEXTS[1]).stdout)
    assert np.allclose(json.loads(lines[0]), one, atol=1e-7) and np.allclose(json.loads(lines[1]), second, atol=1e-7)
    raw = json.loads(llm("embed", str(smollm2_path), TEXTS[0], "--no-normalize", "--pooling", "cls").stdout)
    assert np.allclose(raw, session.embed(lm.tokenizer.encode(TEXTS[0]), "cls"), rtol=1e-5, atol=1e-5)
    assert_one_line_error(llm("embed", str(smollm2_path), "x", "--pooling", "max"), "--pooling", "mean, cls, last")
    assert_one_line_error(llm("embed", str(smollm2_path), input="\n \n"), "empty")
    assert_one_line_error(llm("embed", str(smollm2_path), "x " * 600, "--ctx", "64"), "context holds 64", "--ctx")


# ---- llm serve -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_path):
    import ollama

    s = Served(smollm2_path, "--parallel", "2", "--api-key", KEY)
    s.ollama = ollama.Client(host=s.base, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """The texts' embeddings from `llm embed` (normalized), which the server must give."""
    out = []
    for text in TEXTS:  # one process each: stdin would split the text with a line break
        r = llm("embed", str(smollm2_path), text)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout))
    return np.array(out)


def test_openai_embeddings(server, reference, smollm2_path):
    """/v1/embeddings through the `openai` client: base64 (the client's default) and float lists agree with each
    other and with `llm embed`; several texts at once are each as alone; token ids are their text; `dimensions`
    keeps the first ones, normalized again; usage counts the tokens."""
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    c = server.client()
    batch = c.embeddings.create(model=server.model, input=TEXTS)
    assert batch.object == "list" and batch.model == server.model
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in batch.data])
    np.testing.assert_allclose(got, reference, atol=1e-6)
    floats = c.embeddings.create(model=server.model, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), got, atol=1e-7)
    alone = c.embeddings.create(model=server.model, input=TEXTS[2], encoding_format="float")
    np.testing.assert_allclose(alone.data[0].embedding, reference[2], atol=1e-6)

    tok = Tokenizer.from_gguf(read_gguf(smollm2_path))
    ids = [tok.encode(t) for t in TEXTS]
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(map(len, ids))
    by_ids = c.embeddings.create(model=server.model, input=ids, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), reference, atol=1e-6)
    one = c.embeddings.create(model=server.model, input=ids[1], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference[1], atol=1e-6)

    short = c.embeddings.create(model=server.model, input=TEXTS[0], dimensions=64)
    assert len(short.data[0].embedding) == 64
    np.testing.assert_allclose(short.data[0].embedding, unit(reference[0][:64]), atol=1e-5)


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": ["a", ""]}, 400, "input[1]"),
    ({"input": ["a", [1, 2]]}, 400, "input"),
    ({"input": [[1, 2], [True]]}, 400, "input[1]"),
    ({"input": [1, 49152]}, 400, "input"),
    ({"input": 7}, 400, "input"),
    ({"input": None}, 400, "input"),
    ({"input": {"text": "a"}}, 400, "input"),
    ({"input": ["a"] * 2049}, 400, "input"),
    ({"input": "word " * 700}, 400, "input"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions"),
    ({"input": "a", "dimensions": 577}, 400, "dimensions"),
    ({"input": "a", "dimensions": "64"}, 400, "dimensions"),
    ({"input": "a", "model": "text-embedding-3-small"}, 404, "model"),
])
def test_openai_embeddings_refuse_bad_requests(server, body, status, param):
    r = httpx.post(server.base + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}
    if "word" in str(body["input"]):
        assert error["code"] == "context_length_exceeded"


def test_embeddings_need_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.base + "/v1/embeddings", json={"input": "a"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(server.base + "/api/embed", json={"model": server.model, "input": "a"}, headers=headers)
        assert r.status_code == 401 and list(r.json()) == ["error"]


def test_ollama_embed(server, reference):
    """/api/embed through the `ollama` client gives the normalized embeddings /v1 gives; a text past the context
    is cut to it (truncate, the default) or refused; nothing to embed is ollama's "load"; /api/embeddings gives one
    text's embedding as the model makes it, not normalized."""
    from ollama import ResponseError

    o = server.ollama
    name = o.list().models[0].model
    e = o.embed(model=name, input=TEXTS)
    assert e.model == name and e.prompt_eval_count > len(TEXTS) and e.total_duration > 0
    np.testing.assert_allclose(np.array(e.embeddings), reference, atol=1e-6)
    assert np.allclose(o.embed(model=name, input=TEXTS[3]).embeddings[0], reference[3], atol=1e-6)
    short = o.embed(model=name, input=TEXTS[0], dimensions=32).embeddings[0]
    assert np.allclose(short, unit(reference[0][:32]), atol=1e-5)

    long = "word " * 700  # past the server's 512-token context
    cut = o.embed(model=name, input=long)
    assert cut.prompt_eval_count == 512 and abs(np.linalg.norm(cut.embeddings[0]) - 1) < 1e-6
    with pytest.raises(ResponseError) as err:
        o.embed(model=name, input=long, truncate=False)
    assert err.value.status_code == 400 and "context holds 512" in err.value.error
    for bad in ({"input": 5}, {"input": ["a", 1]}, {"input": ["a", ""]}, {"input": "a", "truncate": "no"},
                {"input": "a", "options": {"nonsense": 1}}, {"input": "a", "dimensions": -1}):
        r = httpx.post(server.base + "/api/embed", json={"model": name, **bad},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and list(r.json()) == ["error"], (bad, r.text)
    assert o.embed(model=name, input=[]).embeddings == []
    with pytest.raises(ResponseError) as err:
        o.embed(model="nomic-embed-text", input="a")
    assert err.value.status_code == 404

    raw = o.embeddings(model=name, prompt=TEXTS[1]).embedding
    assert abs(np.linalg.norm(raw) - 1) > 0.1 and np.allclose(unit(raw), reference[1], atol=1e-6)
    assert o.embeddings(model=name, prompt="").embedding == []


def test_a_client_that_leaves_cancels_its_embeddings(server):
    """A client that goes away mid-request gives up the rest of its texts: the next request is answered at once,
    not after them."""
    import time

    texts = [f"{i} " + "word " * 400 for i in range(100)]  # ~100 x 0.5 s of work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/embeddings", json={"input": texts},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(60, read=1.0))
    t = time.monotonic()
    r = httpx.post(server.base + "/v1/embeddings", json={"input": "a"}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200 and time.monotonic() - t < 10


def test_random_bodies_get_embeddings_or_a_4xx(server):
    """Wrongly typed and out-of-range fields on the three embedding routes: each answer is embeddings of the
    route's shape, or a 4xx with the route's error body; never a 500."""
    import random

    from serving import junk_maker

    rng = random.Random(11)
    values = [None, True, 0, -1, 1, 2.5, 1e300, "", "x", "two words", [], {}, ["a"], ["a", "b"], [1, 2], [[1], [2]],
              [[]], [-5], [10**9], "base64", "float", 10**30]
    keys = ["input", "model", "encoding_format", "dimensions", "truncate", "options", "prompt", "user"]
    junk = junk_maker(rng, values, keys)
    answered = 0
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        for _ in range(400):
            path = rng.choice(["/v1/embeddings", "/api/embed", "/api/embeddings"])
            body = {k: junk() for k in rng.sample(keys, rng.randrange(1, 5))}
            if rng.random() < 0.8:
                body["model"] = server.model
            r = h.post(path, json=body)
            assert r.status_code == 200 or 400 <= r.status_code < 500, (path, body, r.text)
            out = r.json()
            if r.status_code != 200:
                assert (set(out["error"]) == {"message", "type", "param", "code"} if path.startswith("/v1")
                        else list(out) == ["error"]), (path, body, out)
                continue
            answered += 1
            vectors = ([d["embedding"] for d in out["data"]] if path.startswith("/v1") else
                       out["embeddings"] if path == "/api/embed" else [out["embedding"]] if out["embedding"] else [])
            assert all(isinstance(v, str) or len(v) <= 576 for v in vectors)
    assert answered > 20


def test_embeddings_beside_generations(server):
    """Embedding requests are served while greedy generations stream, between their decode steps: each stream
    is exactly what it is alone, and every embedding is the one it is alone."""
    c = server.client()
    messages = [[{"role": "user", "content": q}] for q in ("Write a haiku about the sea", "Name three colors")]
    alone = [c.chat.completions.create(model=server.model, messages=m, temperature=0, max_tokens=48)
             .choices[0].message.content for m in messages]
    want = [np.array(d.embedding) for d in c.embeddings.create(model=server.model, input=TEXTS).data]
    texts, vectors = [None, None], []

    def stream(i):
        parts = c.chat.completions.create(model=server.model, messages=messages[i], temperature=0, max_tokens=48,
                                          stream=True)
        texts[i] = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in range(3):
        vectors.append([np.array(d.embedding) for d in c.embeddings.create(model=server.model, input=TEXTS).data])
    for t in threads:
        t.join()
    assert texts == alone
    for got in vectors:
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    assert httpx.get(server.base + "/health").json()["busy"] == 0
