"""Everyday input as a new user types it (issue #13, part B): real processes on the real model; one clean
error line and a non-zero exit where it fails, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FAST = ("--temperature", "0")


def llm(*args: str | bytes, input: str | bytes = b"", env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`llm ARGS` with `input` piped to stdin (bytes: exactly those bytes)."""
    data = input.encode() if isinstance(input, str) else input
    r = subprocess.run([sys.executable, "-m", "llmcli", *args], input=data, capture_output=True, timeout=timeout,
                       env=env or ENV)
    r.stdout = r.stdout.decode("utf-8", errors="replace")
    r.stderr = r.stderr.decode("utf-8", errors="replace")
    return r


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def prompt_tokens(r: subprocess.CompletedProcess) -> int:
    line = next(x for x in r.stderr.splitlines() if x.startswith("prompt:"))
    return int(line.split()[1])


def test_seed_minus_one_is_random_in_run_and_chat(smollm2_path):
    r = llm("run", str(smollm2_path), "Hi", "--seed", "-1", "-n", "3")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = llm("chat", str(smollm2_path), "--seed", "-1", "-n", "3", input="Hi\n/bye\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert_one_line_error(llm("run", str(smollm2_path), "Hi", "--seed", "-2"), "--seed")


def test_text_that_is_not_utf8(smollm2_path, tmp_path):
    bad = b"caf\xe9 \xff\xfe ok"
    r = llm("run", str(smollm2_path), "-n", "2", *FAST, input=bad)  # stdin
    assert r.returncode == 0, r.stderr
    r = llm("run", str(smollm2_path), b"say " + bad, "-n", "2", *FAST)  # an argument
    assert r.returncode == 0, r.stderr
    r = llm("tokenize", str(smollm2_path), b"caf\xe9", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] >= 2  # 'caf' and U+FFFD
    transcript = tmp_path / "t.json"
    transcript.write_bytes(b'{"system": null, "messages": [{"role": "user", "content": "caf\xe9"}]}')
    r = llm("chat", str(smollm2_path), "-n", "2", *FAST,
            input=b"caf\xe9 \xff\n/load " + str(transcript).encode() + b"\nstill here?\n/stats\n/bye\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "loaded 1 message " in r.stderr
    assert "3 messages" in r.stderr.split("loaded")[1]  # the chat went on after /load with the loaded turn


def test_chat_refuses_a_long_message_and_keeps_the_history(smollm2_path, tmp_path):
    saved = tmp_path / "chat.json"
    long = "word " * 200
    r = llm("chat", str(smollm2_path), "--ctx", "64", "-n", "8", *FAST,
            input=f"My name is Bob.\n{long}\n/save {saved}\nWhat is my name?\nAnd again?\nOnce more?\n/save {saved}\n"
                  "/bye\n")
    assert r.returncode == 0, r.stderr
    assert "the message needs" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("the message needs") == 1  # later short messages are not refused (was every second)
    turns = json.loads(saved.read_text())["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4  # nothing lost, even what left the prompt
    assert turns[0]["content"] == "My name is Bob."


def test_chat_with_piped_input_writes_only_replies_to_stdout(smollm2_path):
    r = llm("chat", str(smollm2_path), "-n", "3", *FAST, input="Hi\n/clear\n/stats\n")
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout
    assert "context: 0 / " in r.stderr  # /stats after /clear


def test_a_bad_store_folder_is_one_line_before_any_download(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    for args in (("run", "gemma3", "Hi"), ("bench", "gemma3"), ("pull", "smollm2")):
        r = llm(*args, env={**ENV, "LLMCLI_HOME": str(not_a_folder)}, timeout=60)
        assert_one_line_error(r, "LLMCLI_HOME", str(not_a_folder))
        assert "Fetching" not in r.stderr


def test_a_lone_argument_that_is_not_a_model_is_the_prompt(smollm2_path):
    # the default model (smollm2) is in the test store; stdin is a pipe, as in scripts and CI
    r = llm("run", "Write a haiku about the sea", "-n", "3", *FAST)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = llm("tokenize", "Hello", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["count"] >= 1, r.stderr
    assert_one_line_error(llm("run", "missing.gguf"), "missing.gguf: no such file")


def test_piped_text_follows_the_prompt_argument_and_loses_one_newline(smollm2_path):
    both = llm("run", str(smollm2_path), "Summarise this", "-n", "1", "--verbose", *FAST, input="The cat sat.\n")
    alone = llm("run", str(smollm2_path), "Summarise this", "-n", "1", "--verbose", *FAST)
    assert both.returncode == alone.returncode == 0, both.stderr
    assert prompt_tokens(both) > prompt_tokens(alone)
    piped = llm("run", str(smollm2_path), "-n", "5", "--verbose", *FAST, input="Say X\n")
    argument = llm("run", str(smollm2_path), "Say X", "-n", "5", "--verbose", *FAST)
    assert piped.stdout == argument.stdout and prompt_tokens(piped) == prompt_tokens(argument)


@pytest.mark.parametrize("args,words", [
    (("--temperature", "nan"), ("--temperature", "finite")),
    (("--temperature", "inf"), ("--temperature", "finite")),
    (("--frequency-penalty", "nan"), ("--frequency-penalty", "finite")),
    (("--raw", "--system", "be terse"), ("--system", "--raw")),
    (("--ctx", "99999999999999999999"), ("--ctx", "8..16777216")),  # past int64: no OverflowError
    (("--ctx", "16000000"), ("not enough memory", "--ctx")),  # a KV cache of hundreds of GB
])
def test_bad_options_are_refused(smollm2_path, args, words):
    assert_one_line_error(llm("run", str(smollm2_path), "Hi", *args), *words)


def test_a_kv_cache_past_the_machines_memory_is_refused_before_allocating(smollm2_path):
    """Whatever the kernel's overcommit policy: the cache's bytes are compared with physical memory first."""
    assert_one_line_error(llm("run", str(smollm2_path), "Hi", "--ctx", "16000000", "--kv-type", "q8_0"),
                          "not enough memory", "GB KV cache", "--ctx")
    assert_one_line_error(llm("serve", str(smollm2_path), "--ctx", "4000000", "--parallel", "8", "--port", "0"),
                          "not enough memory", "8 conversations", "--parallel")


def test_ctx_past_the_trained_context_warns(smollm2_path):
    r = llm("run", str(smollm2_path), "Hi", "-n", "1", "--ctx", "9000", *FAST)
    assert r.returncode == 0, r.stderr
    assert "warning: --ctx 9000 is beyond the model's trained context of 8192" in r.stderr


def test_pull_checks_the_quantization_type_before_the_network(tmp_path):
    env = {**ENV, "LLMCLI_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    assert_one_line_error(llm("pull", "some/repo", "-q", "foo", env=env), "unknown quantization type 'foo'")


COMMANDS = ("run", "chat", "tokenize", "embed", "show", "pull", "list", "rm", "quantize", "perplexity", "bench",
            "serve")


def all_help() -> dict[str, str]:
    """The help text of `llm` ('') and of every command, from one process (each `llm` start costs ~1 s)."""
    code = ("import contextlib, io, json, sys; from llmcli import cli; from typer.main import get_command\n"
            "cli._register_commands(); g = get_command(cli.app)\n"
            "ctx = g.make_context('llm', ['--help'], resilient_parsing=True)\n"
            "def text(c):  # rich prints the help itself\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        print(c.get_help(ctx) or '')\n"
            "    return out.getvalue()\n"
            f"h = {{c: text(g.get_command(ctx, c)) for c in {COMMANDS!r}}}; h[''] = text(g)\n"
            "print(json.dumps(h))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "COLUMNS": "200"},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_and_version():
    helps = all_help()
    assert set(helps) == {"", *COMMANDS} and all("--help" in h for h in helps.values())
    assert "--pure" in helps["quantize"] and "--raw" in helps["run"]
    assert not any("<bool>" in h or "BOOL" in h for h in helps.values())  # flags take no value
    r = llm("quantize", "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "<bool>" not in r.stdout
    r = llm("--version")
    assert r.returncode == 0 and r.stdout.startswith("llm ")


def test_readme_commands_and_options_exist():
    """Every `llm COMMAND --option` of the README's usage block, and every option it lists for run and chat, is in
    that command's help (B.10: the README named options no command had)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Use", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    helps, seen = all_help(), 0
    for line in block.splitlines():
        for part in line.split("#", 1)[0].split("|"):
            words = shlex.split(part)
            if not words or words[0] != "llm":
                continue
            command = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
            assert command in helps, line
            for word in words[2 if command else 1:]:
                if word.startswith("--"):
                    assert word in helps[command], (word, line)
            seen += 1
    assert seen >= 15
    shared = readme.split("Options of `run` and `chat`:", 1)[1].split("\n\n", 1)[0]
    options = set(re.findall(r"`(--[a-z-]+)", shared))
    assert len(options) >= 15
    for command in ("run", "chat"):
        assert not {o for o in options if o not in helps[command]}, command


def test_perplexity_errors_have_no_blank_line(tmp_path):
    assert_one_line_error(llm("perplexity", str(tmp_path / "missing.gguf"), "README.md"), "no such file")


def test_misleading_messages(smollm2_path, tmp_path):
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    assert_one_line_error(llm("run", str(smollm2_path), "Hi", "--template", str(empty)), "is empty")
    r = llm("tokenize", str(smollm2_path), "Hi")
    assert r.returncode == 0 and "1 token" in r.stdout and "1 tokens" not in r.stdout


def test_rm_at_end_of_input_removes_nothing_and_list_shows_upper_case_types(tmp_path, monkeypatch):
    import pty

    from test_gguf_file import write_tiny

    from llmcli import store

    monkeypatch.setenv("LLMCLI_HOME", str(tmp_path))
    store.register("local/tiny", "test", "q4_0", write_tiny(tmp_path / "m.gguf"))
    env = {**ENV, "LLMCLI_HOME": str(tmp_path)}
    r = llm("list", env=env)
    assert r.returncode == 0 and "Q4_0" in r.stdout and "q4_0" not in r.stdout, r.stdout
    pid, fd = pty.fork()
    if pid == 0:  # the child: llm on a terminal that ends its input at once
        os.execve(sys.executable, [sys.executable, "-m", "llmcli", "rm", "local/tiny"], env)
    out = b""
    os.write(fd, b"\x04")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    text = out.decode(errors="replace")
    assert "interrupted" not in text and "nothing removed" in text, text
    assert code == 1
    assert "local/tiny" in llm("list", env=env).stdout  # still there


@pytest.fixture(scope="module")
def broken_template_model(tmp_path_factory):
    """The fuzzer's tiny model with a chat template that does not parse, and one whose architecture name
    carries control characters."""
    from fuzz_gguf import read_model, serialize, write_seed

    folder = tmp_path_factory.mktemp("hostile")
    seed = read_model(write_seed(folder / "seed.gguf"))
    seed.get("tokenizer.chat_template").value = "{% for m in messages %}"
    broken = folder / "broken-template.gguf"
    broken.write_bytes(serialize(seed)[0])
    seed.get("general.architecture").value = "llama\x1b[2J\nrm"
    evil = folder / "evil-arch.gguf"
    evil.write_bytes(serialize(seed)[0])
    return broken, evil


def test_a_template_that_does_not_parse_stops_only_what_renders_it(broken_template_model):
    broken, _ = broken_template_model
    assert llm("show", str(broken)).returncode == 0
    assert llm("tokenize", str(broken), "hello").returncode == 0
    r = llm("run", str(broken), "hello", "--raw", "-n", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert_one_line_error(llm("run", str(broken), "hello", "-n", "1", *FAST), "chat template failed: does not parse")


def test_error_lines_escape_file_bytes(broken_template_model):
    _, evil = broken_template_model
    r = llm("run", str(evil), "hello", "-n", "1")
    assert_one_line_error(r, "unsupported architecture", "\\x1b[2J\\nrm")
    assert "\x1b" not in r.stderr
