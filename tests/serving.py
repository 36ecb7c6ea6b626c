"""An `llm serve` process on 127.0.0.1 for the server tests, and the clients that talk to it."""

from __future__ import annotations

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
