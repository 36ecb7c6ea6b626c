"""The CLI as a user runs it: real processes, the real model, one clean error line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rewritten_gguf, sigint_default
from test_gguf_file import write_tiny

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def llm(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # stdin is always a pipe (empty unless `input`): a run never waits on a stdin inherited from the test runner
    return subprocess.run([sys.executable, "-m", "llmcli", *args], input=input or "", capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "llmcli", "--help"], capture_output=True, text=True, timeout=300,
                       env=ENV | {"COLUMNS": "200"})
    assert r.returncode == 0
    for cmd in ("run", "chat", "tokenize", "show", "embed", "pull", "list", "rm", "quantize", "perplexity", "bench",
                "serve"):
        assert f"│ {cmd} " in r.stdout
    # each command's summary flows as one paragraph (a docstring's line breaks are not the terminal's)
    assert "the KV cache is reused across turns." in r.stdout


def test_tokenize_json_equals_what_run_raw_feeds(smollm2_path):
    text = "<|im_start|>user\nHi there 👋 — ça va? 1234<|im_end|>"
    r = llm("tokenize", str(smollm2_path), text, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    ids = Tokenizer.from_gguf(read_gguf(smollm2_path)).encode(text)
    assert out == {"ids": ids, "count": len(ids)}
    assert out["ids"][0] == 1 and out["ids"][-1] == 2  # special-token strings became special tokens
    r = llm("run", str(smollm2_path), text, "--raw", "--temperature", "0", "-n", "1", "--verbose",
            "--backend", "numpy")
    assert f"prompt: {len(ids)} tokens" in r.stderr


def test_run_raw_greedy_is_deterministic_and_stops_at_max_tokens(smollm2_path):
    args = ("run", str(smollm2_path), "The capital of France is", "--raw", "--temperature", "0", "-n", "6",
            "--backend", "numpy", "--verbose")
    a, b = llm(*args), llm(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and "Paris" in a.stdout
    assert "finish: length" in a.stderr and "decode: 6 tokens" in a.stderr


def test_run_reads_the_prompt_from_stdin_and_uses_the_chat_template(smollm2_path):
    r = llm("run", str(smollm2_path), "--temperature", "0", "-n", "40", "--backend", "numpy", "--verbose",
            input="What is the capital of France? Answer in one word.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "finish: stop" in r.stderr  # the reply ends with <|im_end|>, which is never printed
    assert "<|im_end|>" not in r.stdout


def test_stop_strings_end_the_reply_and_are_not_printed(smollm2_path):
    r = llm("run", str(smollm2_path), "1, 2, 3, 4, 5,", "--raw", "--temperature", "0", "-n", "30",
            "--stop", " 9", "--backend", "numpy", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "8," in r.stdout and "9" not in r.stdout
    assert "finish: stop" in r.stderr


def test_same_seed_same_text(smollm2_path):
    args = ("run", str(smollm2_path), "Tell me a story.", "--temperature", "1.0", "--seed", "7", "-n", "12",
            "--backend", "numpy")
    a, b = llm(*args), llm(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_show_json(smollm2_path):
    r = llm("show", str(smollm2_path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["context_length"] == 8192
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert 130e6 < info["parameters"] < 140e6
    assert info["chat_template"]["origin"] == "model" and not info["chat_template"]["fallback"]
    assert info["special_tokens"]["eos"] == "<|im_end|>"
    assert info["tool_calls"] is None and info["thinking"] is None  # SmolLM2's template shows no tools, no <think>
    here = Path(__file__).parent / "data"
    r = llm("show", str(smollm2_path), "--json", "--template", str(here / "tools_chatml.jinja"))
    assert json.loads(r.stdout)["tool_calls"] == {"begin": "<tool_call>\n", "between": "\n</tool_call>\n<tool_call>\n",
                                                  "end": "\n</tool_call>", "name_key": "name",
                                                  "args_key": "arguments", "results": True, "specials": [],
                                                  "id_key": None}
    r = llm("show", str(smollm2_path), "--template", str(here / "think_chatml.jinja"))
    assert "reasons first (<think>), opened by the prompt" in r.stdout and "told in the system message" in r.stdout


def test_show_says_when_chatml_is_the_fallback(tmp_path, smollm2_gguf):
    # SmolLM2 rewritten without its chat template
    rewritten_gguf(smollm2_gguf, tmp_path / "notemplate.gguf", drop=("tokenizer.chat_template",))
    r = llm("show", str(tmp_path / "notemplate.gguf"))
    assert r.returncode == 0, r.stderr
    assert "fallback (ChatML)" in r.stdout and "the model has none" in r.stdout


def test_chat_session_with_commands(tmp_path, smollm2_path):
    save = tmp_path / "chat.json"
    script = "\n".join([
        "/system You answer in one short sentence.",
        "What is the capital of France?",
        "And of Italy?",
        "/stats",
        f"/save {save}",
        "/clear",
        f"/load {save}",
        "/help",
        "/exit",
    ]) + "\n"
    r = llm("chat", str(smollm2_path), "--temperature", "0", "-n", "40", "--backend", "numpy", input=script)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout
    transcript = json.loads(save.read_text())
    assert transcript["system"] == "You answer in one short sentence."
    assert [m["role"] for m in transcript["messages"]] == ["user", "assistant", "user", "assistant"]
    # the second turn reused the cache: only its new tokens were prefilled
    assert "context:" in r.stderr and "new," in r.stderr
    assert "loaded 4 messages" in r.stderr and "/clear" in r.stdout


def test_chat_runs_ahead_to_the_next_turn_while_its_user_types(smollm2_path):
    """After each reply `llm chat` prefills the turn's end and the next user header while it waits for input: the
    next message prefills only what its user wrote and the reply's header (what /stats counts as new)."""
    from oracle import hf_tokenizer

    script = "What is the capital of France?\nAnd of Italy?\n/stats\n"
    r = llm("chat", str(smollm2_path), "--temperature", "0", "-n", "24", input=script)
    assert r.returncode == 0, r.stderr
    own = hf_tokenizer(smollm2_path).encode("And of Italy?<|im_end|>\n<|im_start|>assistant\n",
                                             add_special_tokens=False)
    assert f"({len(own)} new," in r.stderr, r.stderr
    assert "Rome" in r.stdout


def test_chat_drops_the_oldest_turns_visibly_when_the_context_fills(smollm2_path):
    msgs = [f"Tell me one fact about the number {i}." for i in range(6)]
    r = llm("chat", str(smollm2_path), "--temperature", "0", "-n", "24", "--ctx", "160", "--system", "Be brief.",
            input="\n".join(msgs) + "\n")
    assert r.returncode == 0, r.stderr
    assert "dropped the" in r.stderr and "system prompt is kept" in r.stderr


@pytest.mark.parametrize("case", ["missing", "not_gguf", "truncated", "arch", "tensor_type", "directory"])
def test_bad_model_files_get_one_clear_line(tmp_path, smollm2_path, case):
    path = tmp_path / "model.gguf"
    word = {"missing": "no such file", "not_gguf": "not a GGUF", "truncated": "truncated",
            "arch": "unsupported architecture", "tensor_type": "IQ2_XXS", "directory": "directory"}[case]
    if case == "not_gguf":
        path.write_text("hello " * 100)
    elif case == "truncated":
        path.write_bytes(Path(smollm2_path).read_bytes()[:30_000_000])
    elif case == "arch":
        write_tiny(path, arch="gptneox")
    elif case == "tensor_type":
        from gguf import GGMLQuantizationType

        write_tiny(path, qtype=GGMLQuantizationType.IQ2_XXS)
    elif case == "directory":
        path = tmp_path
    r = llm("run", str(path), "hello", "--backend", "numpy")
    assert_one_line_error(r, word)


def test_unknown_model_name():
    r = llm("show", "no-such-model")
    assert_one_line_error(r, "'no-such-model' not found")


def test_empty_prompt(smollm2_path):
    assert_one_line_error(llm("run", str(smollm2_path), "   ", "--backend", "numpy"), "empty")
    assert_one_line_error(llm("run", str(smollm2_path), "--backend", "numpy", input=""), "empty")


def test_prompt_longer_than_the_context(smollm2_path):
    r = llm("run", str(smollm2_path), "word " * 300, "--raw", "--ctx", "64", "--backend", "numpy")
    assert_one_line_error(r, "context holds 64")


def test_bad_options(smollm2_path):
    assert_one_line_error(llm("run", str(smollm2_path), "hi", "--temperature", "-1"), "--temperature")
    assert_one_line_error(llm("run", str(smollm2_path), "hi", "--backend", "gpu"), "unknown backend")
    assert_one_line_error(llm("run", str(smollm2_path), "hi", "--template", "/nonexistent.jinja",
                              "--backend", "numpy"), "nonexistent.jinja")


def test_format_json_and_a_schema_file(tmp_path, smollm2_path):
    """--format json prints a JSON object; --format FILE one that follows the schema, properties in its order; on
    the numpy and mlx backends as on numba (the same greedy text; mlx samples a token ahead of its model calls)."""
    r = llm("run", str(smollm2_path), "Describe a cat called Tom as JSON.", "--format", "json", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                               "indoor": {"type": "boolean"}},
              "required": ["name", "age", "indoor"], "additionalProperties": False}
    (tmp_path / "cat.json").write_text(json.dumps(schema))
    outs = []
    import importlib.util

    for backend in ("numba", "numpy", "mlx") if importlib.util.find_spec("mlx") else ("numba", "numpy"):
        r = llm("run", str(smollm2_path), "Describe a cat called Tom.", "--format", str(tmp_path / "cat.json"),
                "--temperature", "0", "--backend", backend)
        assert r.returncode == 0, r.stderr
        value = json.loads(r.stdout)
        assert list(value) == ["name", "age", "indoor"]
        assert isinstance(value["age"], int) and isinstance(value["indoor"], bool)
        outs.append(r.stdout)
    assert all(out == outs[0] for out in outs)


def test_bad_formats_get_one_clear_line(tmp_path, smollm2_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "pattern.json").write_text('{"type": "string", "pattern": "(?<=a)b"}')
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    for fmt, words in ((str(tmp_path / "none.json"), ("no such file",)), (str(tmp_path / "bad.json"), ("not a JSON",)),
                       (str(tmp_path / "pattern.json"), ("'pattern'", "is not supported")),
                       (str(tmp_path / "deep.json"), ("--format",)), (str(tmp_path), ("--format",))):
        assert_one_line_error(llm("run", str(smollm2_path), "hi", "--format", fmt), *words)


def test_ctrl_c_stops_the_reply_not_the_chat(tmp_path, smollm2_path):
    import select
    import signal
    import time

    save = tmp_path / "after.json"
    p = subprocess.Popen([sys.executable, "-m", "llmcli", "chat", str(smollm2_path), "--backend", "numpy",
                          "--temperature", "0", "-n", "2000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV, bufsize=0, preexec_fn=sigint_default)
    p.stdin.write("Count from 1 to 500, one number per line.\n")
    p.stdin.flush()
    # Ready when the reply's first token is on stdout (anything but input prompts). A deadline only bounds a
    # broken run; the interrupt is never sent before the reply has started.
    seen, deadline = b"", time.time() + 600
    while not seen.replace(b">>> ", b"").strip():
        assert time.time() < deadline and p.poll() is None, f"the reply never started: {seen!r}"
        if select.select([p.stdout], [], [], 1.0)[0]:
            seen += os.read(p.stdout.fileno(), 1024)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(f"/save {save}\n/exit\n", timeout=120)
    assert p.returncode == 0, err
    assert "(reply stopped)" in err
    transcript = json.loads(save.read_text())  # the chat went on after Ctrl-C and kept the partial reply
    assert [m["role"] for m in transcript["messages"]] == ["user", "assistant"]
    assert transcript["messages"][1]["content"].strip()
