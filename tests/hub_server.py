"""A Hugging Face Hub stand-in for tests: model repositories served from local files on 127.0.0.1.

It answers what `huggingface_hub` asks when HF_ENDPOINT points at it:
  GET  /api/models/{repo}[/revision/{rev}]   repository info (sha, siblings with sizes and LFS ids)
  GET  /api/models/{repo}/tree/{rev}          file listing
  HEAD /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}           the bytes, with Range support (206)
LFS files (*.gguf, *.safetensors, ...) are answered as the Hub does: a 302 to a CDN host ("localhost"
instead of "127.0.0.1") with X-Linked-Etag / X-Linked-Size; like a signed S3 URL, the CDN refuses
requests that carry an Authorization header.
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), so the
real client raises its real exceptions. No Xet headers are ever sent: the client stays on plain HTTP.

For the tests it counts the bytes it sends per file, can cut a transfer off after N bytes (and then
play dead), can stall one after N bytes until released, and can advertise a file bigger than it is.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx")
CHUNK = 1 << 16


@dataclass
class Repo:
    revisions: dict[str, dict[str, Path]]  # revision name -> {path in the repo: local file}
    token: str | None = None  # gated: /resolve answers 401 unless "Authorization: Bearer <token>"
    sizes: dict[str, int] = field(default_factory=dict)  # advertised sizes that differ from the file

    def commit(self, revision: str) -> str:
        files = self.revisions[revision]
        listing = "\n".join(f"{p}:{f.stat().st_size}" for p, f in sorted(files.items()))
        return hashlib.sha1(f"{revision}\n{listing}".encode()).hexdigest()

    def resolve(self, rev: str) -> tuple[str, dict[str, Path]] | None:
        """A branch/tag name or a commit hash -> (commit, files)."""
        for name, files in self.revisions.items():
            if rev in (name, self.commit(name)):
                return self.commit(name), files
        return None


@dataclass
class _Cut:
    after: int
    then_down: bool


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.url` goes into HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.sent: Counter[tuple[str, str]] = Counter()  # (repo, path) -> bytes of file content sent
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.down = False  # True: close every connection without an answer
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._stalls: dict[tuple[str, str], int] = {}
        self.stalled = threading.Event()  # set when a stalled transfer reached its byte count
        self._release = threading.Event()
        self._etags: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._generation = 0  # bumped by reset(): transfers from before stop sending (and counting)
        self._httpd: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- setup

    def add_repo(self, repo_id: str, files: dict[str, Path], *, token: str | None = None,
                 revisions: dict[str, dict[str, Path]] | None = None) -> Repo:
        repo = Repo({"main": dict(files), **(revisions or {})}, token=token)
        self.repos[repo_id] = repo
        return repo

    def cut_after(self, repo_id: str, path: str, n_bytes: int, then_down: bool = True) -> None:
        """The next GET of this file stops after n_bytes; with then_down the server stops answering."""
        self._cuts[(repo_id, path)] = _Cut(n_bytes, then_down)

    def stall_after(self, repo_id: str, path: str, n_bytes: int) -> None:
        """The next GET of this file pauses after n_bytes (sets `stalled`) until `release()`."""
        self.stalled.clear()
        self._release.clear()
        self._stalls[(repo_id, path)] = n_bytes

    def release(self) -> None:
        self._release.set()

    def reset(self) -> None:
        """Forget counts, cuts and stalls; transfers still running stop without counting."""
        self._generation += 1
        self.sent.clear()
        self.requests.clear()
        self.down = False
        self._cuts.clear()
        self._stalls.clear()
        self.release()

    def bytes_sent(self, repo_id: str, path: str | None = None) -> int:
        return sum(n for (r, p), n in self.sent.items() if r == repo_id and (path is None or p == path))

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---------------------------------------------------------------- file identity, as the Hub does it

    def etag(self, file: Path) -> str:
        """sha256 of the content for LFS files; the git blob id for the others."""
        file = file.resolve()
        with self._lock:
            if file not in self._etags:
                data = file.read_bytes()
                if file.name.endswith(LFS_SUFFIXES):
                    self._etags[file] = hashlib.sha256(data).hexdigest()
                else:
                    self._etags[file] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return self._etags[file]

    def entry(self, repo: Repo, path: str, file: Path) -> dict:
        size = repo.sizes.get(path, file.stat().st_size)
        item = {"type": "file", "path": path, "size": size, "oid": hashlib.sha1(path.encode()).hexdigest()}
        if file.name.endswith(LFS_SUFFIXES):
            item["lfs"] = {"oid": self.etag(file), "size": size, "pointerSize": 134}
        return item


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # ---------------------------------------------------------------- routing

    def _route(self, body: bool) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        hub.requests.append((self.command, path))
        if hub.down:
            self.close_connection = True
            return
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._info(repo_id, "main")
            if rest[0] == "revision" and len(rest) >= 2:
                return self._info(repo_id, "/".join(rest[1:]))
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        if len(parts) >= 5 and parts[0] == "cdn":
            return self._cdn("/".join(parts[1:3]), parts[3], "/".join(parts[4:]), body)
        self._error(404, "NotFound", "no such route")

    def _repo(self, repo_id: str, rev: str) -> tuple[Repo, str, dict[str, Path]] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        found = repo.resolve(rev)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, *found

    def _info(self, repo_id: str, rev: str) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit, files = found
        siblings = []
        for p, f in sorted(files.items()):
            e = self.hub.entry(repo, p, f)
            sibling = {"rfilename": p, "size": e["size"], "blobId": e["oid"]}
            if "lfs" in e:
                sibling["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(sibling)
        self._json({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.token else False, "disabled": False, "tags": [],
                    "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings})

    def _tree(self, repo_id: str, rev: str) -> None:
        found = self._repo(repo_id, rev)
        if found is not None:
            repo, _, files = found
            self._json([self.hub.entry(repo, p, f) for p, f in sorted(files.items())])

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit, files = found
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                                 f"access to it and be authenticated to access it.")
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"",
                               {"X-Repo-Commit": commit})
        file = files[path]
        size = repo.sizes.get(path, file.stat().st_size)
        if file.name.endswith(LFS_SUFFIXES):
            port = self.server.server_address[1]
            return self._send(302, b"", {"Location": f"http://localhost:{port}/cdn/{repo_id}/{commit}/{path}",
                                         "X-Repo-Commit": commit, "X-Linked-Etag": f'"{self.hub.etag(file)}"',
                                         "X-Linked-Size": str(size), "ETag": f'"{commit[:8]}-redirect"'})
        self._bytes(repo_id, commit, path, file, size, body)

    def _cdn(self, repo_id: str, commit: str, path: str, body: bool) -> None:
        if "Authorization" in self.headers:
            return self._error(400, "InvalidArgument", "Only one auth mechanism allowed")
        found = self._repo(repo_id, commit)
        if found is None:
            return
        repo, commit, files = found
        if path not in files:
            return self._error(404, "NoSuchKey", "The specified key does not exist.")
        file = files[path]
        self._bytes(repo_id, commit, path, file, repo.sizes.get(path, file.stat().st_size), body)

    def _bytes(self, repo_id: str, commit: str, path: str, file: Path, size: int, body: bool) -> None:
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start, status = int(m[1]), 206
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{self.hub.etag(file)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(size - start)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self._stream(repo_id, path, file, start)

    def _stream(self, repo_id: str, path: str, file: Path, start: int) -> None:
        hub, key = self.hub, (repo_id, path)
        cut = hub._cuts.pop(key, None)
        stall = hub._stalls.pop(key, None)
        sent, generation = 0, hub._generation
        try:
            with open(file, "rb") as f:
                f.seek(start)
                while chunk := f.read(CHUNK):
                    if hub._generation != generation:
                        self.close_connection = True
                        return
                    if cut is not None and sent + len(chunk) >= cut.after:
                        chunk = chunk[:cut.after - sent]
                        self.wfile.write(chunk)
                        hub.sent[key] += len(chunk)
                        self.wfile.flush()
                        if cut.then_down:
                            hub.down = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if stall is not None and sent + len(chunk) >= stall:
                        head = chunk[:stall - sent]
                        self.wfile.write(head)
                        hub.sent[key] += len(head)
                        self.wfile.flush()
                        sent += len(head)
                        chunk = chunk[len(head):]
                        stall = None
                        hub.stalled.set()
                        hub._release.wait(60)
                        if hub._generation != generation:  # the test moved on: this client is gone
                            self.close_connection = True
                            return
                    self.wfile.write(chunk)
                    hub.sent[key] += len(chunk)
                    sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---------------------------------------------------------------- answers

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, json.dumps({"error": message}).encode(), {**headers, **(extra or {})})

    def _send(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
