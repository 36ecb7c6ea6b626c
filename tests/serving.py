"""An `llm serve` process on 127.0.0.1 for the server tests, and the clients that talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An `llm serve` process and a client for it."""

    def __init__(self, model, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmcli", "serve", str(model), "--port", str(self.port), "--ctx", "512", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.monotonic() + 600  # a cold numba cache compiles the kernels first
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llm serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llm serve did not start")
            time.sleep(0.2)
        self.model = httpx.get(self.base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                               ).json()["data"][0]["id"]

    def client(self, key: str = KEY):
        """The official `openai` client, pointed at the server."""
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> tuple[int, str]:
        """SIGINT, as Ctrl-C: -> (exit status, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def junk_maker(rng, values: list, keys: list):
    """A maker of random JSON values (`values`, and lists and objects of them keyed by `keys`), nested a little:
    the fields of a request, wrongly typed."""

    def junk(depth=0):
        if depth > 2 or rng.random() < 0.5:
            return rng.choice(values)
        if rng.random() < 0.5:
            return [junk(depth + 1) for _ in range(rng.randrange(3))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randrange(4))}

    return junk


def read_as_chat(chat: dict):
    """A chat completions request's fields read as the server reads them: its messages checked, then (the tools it
    offers, the JSON Schema text of its format), for refused_in_words. Other APIs' requests, translated, end here."""
    from llmcli.server import _chat_messages, _response_format, _tool_choice

    _chat_messages(chat)
    return _tool_choice(chat), _response_format(chat)


def refused_in_words(parse) -> bool:
    """Whether a request's fields are refused in words: parse() reads them into (the tools it offers, the JSON
    Schema text of its format), whose grammars are then built. A 4xx ApiError or a GrammarError is a refusal; any
    other exception is a bug, and goes up."""
    from llmcli.grammar import GrammarError
    from llmcli.json_schema import json_grammar
    from llmcli.server import ApiError

    try:
        choice, schema = parse()
        if choice is not None:
            choice.grammar()
        if schema is not None:
            json_grammar(json.loads(schema))
    except ApiError as e:
        assert 400 <= e.status < 500
        return True
    except GrammarError:
        return True
    return False
