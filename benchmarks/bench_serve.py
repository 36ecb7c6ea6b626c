"""`llm serve` under concurrent clients, against one client, `llm run`, and llama-cpp-python's server.

For each model and server, over real HTTP on 127.0.0.1 (streaming /v1/completions, greedy, the stop tokens
banned through logit_bias so every request decodes exactly -n tokens):

- aggregate decode tok/s of C concurrent streaming clients (C = 1 and --clients): the decode tokens of all
  clients (each one's tokens after its first) over the time from the first client's first token to the last
  client's last token; the ratio C ÷ 1 is what batching buys;
- follow-up TTFT: a chat with --history tokens of history (one turn already answered), then, --pause seconds
  after the answer (a user reading it and typing; 0: at once, as an agent does), the next user turn: request sent
  -> first streamed token; against a fresh 20-token raw prompt's (words in an order no slot holds);
- one client's decode tok/s through the server against `llm run --verbose`'s on the same prompt and model;
- tool-result TTFT (`llm serve` only): a chat whose reply must call a tool, then, --pause seconds later (the tool
  running), the request with the tool's result: sent -> its one-token reply, and the tokens it prefilled.

Every figure is a median over -r repetitions (min..max beside it). Models: SmolLM2-135M Q4_0 and the 1B-shape
random Q4_0 model (made by bench_decode.prepare_models into .test-models/numba/ on first use).

    python benchmarks/bench_serve.py --threads 2 -n 32 -r 3 [--json out.json] [--skip-llama] [--models smollm2,1b]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "The best way to learn Python is",
           "def fibonacci(n):", "Water boils at", "My favourite colour is", "The sun rises in the",
           "In 1492, Columbus", "The quick brown fox", "To make bread you need", "Dear diary, today",
           "The mitochondria is", "import numpy as np", "Roses are red,", "The theory of relativity"]
FRESH_WORDS = ("zebra quartz violin harbour lantern copper meadow glacier orchid tunnel saffron pebble falcon ember "
               "thistle marble canyon velvet").split()
HISTORY_TEXT = REPO / "llmcli" / "data" / "calibration.txt"  # English prose, shipped with the package


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (ours or llama-cpp-python's) on a free port."""

    def __init__(self, kind: str, model: Path, threads: int, clients: int, ctx: int):
        self.kind, self.port = kind, _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if kind == "llm":
            cmd = [sys.executable, "-m", "llmcli", "serve", str(model), "--port", str(self.port), "--ctx", str(ctx),
                   "--parallel", str(clients), "--threads", str(threads)]
        else:
            # by default a new request interrupts the one streaming; here they queue, as clients expect
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(self.port),
                   "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--interrupt_requests", "False"]
        # the log goes to a file: a pipe nobody reads fills up and stalls a chatty server (llama.cpp's load log)
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env)
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} server exited: {self.log.read()[-2000:]}")
            try:
                r = httpx.get(self.base + "/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_clients = threading.local()


def client() -> httpx.Client:
    """This thread's HTTP client, kept across requests as a real client keeps its connection: a new httpx
    client per request costs ~27 ms here (its TLS context), which a time to first token would count."""
    if not hasattr(_clients, "http"):
        _clients.http = httpx.Client(timeout=900)
    return _clients.http


def stream(base: str, path: str, body: dict, usage: dict | None = None) -> tuple[float, float, float, int]:
    """-> (request sent, first token, last token, streamed chunks) in perf_counter seconds; the usage chunk's
    fields go into `usage` when given."""
    http = client()
    t0 = time.perf_counter()
    t_first = t_last = None
    n = 0
    extra = {"stream_options": {"include_usage": True}} if usage is not None else {}
    with http.stream("POST", base + path, json={**body, "stream": True, **extra}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if usage is not None and chunk.get("usage"):
                usage.update(chunk["usage"])
            choice = chunk["choices"]
            piece = choice[0].get("text") or (choice[0].get("delta") or {}).get("content") if choice else None
            if piece:
                t_last = time.perf_counter()
                t_first = t_first or t_last
                n += 1
    return t0, t_first, t_last, n


def aggregate_decode(server: Server, clients: int, n: int, ban: dict) -> float:
    """Decode tokens of `clients` concurrent streams (pieces after each one's first) over the span from the
    first first token to the last token."""
    out: list = [None] * clients

    def one(i):
        out[i] = stream(server.base, "/v1/completions", {"model": server.model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                         "max_tokens": n, "temperature": 0, "logit_bias": ban})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(o[1] for o in out), max(o[2] for o in out)
    # tokens counted as streamed pieces (a piece may hold two tokens: counts low, never high)
    return sum(o[3] - 1 for o in out) / (end - start)


def history_messages(tokens: int) -> list[dict]:
    """A user message of about `tokens` tokens of prose (SmolLM2's tokenizer: ~3.3 characters per token)."""
    text = HISTORY_TEXT.read_text(encoding="utf-8")[: int(tokens * 3.3)]
    return [{"role": "user", "content": "Summarize this text.\n\n" + text}]


def followup_ttft(server: Server, history: int, reps: int, pause: float) -> dict:
    """Follow-up and fresh-prompt TTFTs, each sent at once after the server's last reply ("now") and after `pause`
    seconds of quiet ("paused": a user reading and typing; the first request after quiet also pays for waking the
    server's threads, which the fresh prompt then pays as well). Also the prompt tokens of the follow-up, and the
    tokens each follow-up prefilled (the rest came from the cache)."""
    out: dict = {"now": [], "paused": [], "fresh_now": [], "fresh_paused": [], "prefilled_now": [],
                 "prefilled_paused": [], "prompt_tokens": 0}
    for r in range(reps):
        for wait, key in ((0.0, "now"), (pause, "paused")):
            time.sleep(pause)  # every conversation starts on a quiet server
            msgs = history_messages(history)
            msgs[0]["content"] = f"[{r}, {wait}] " + msgs[0]["content"]  # a new conversation each time
            first = client().post(server.base + "/v1/chat/completions", json={
                "model": server.model, "messages": msgs, "max_tokens": 8, "temperature": 0}).json()
            out["prompt_tokens"] = first["usage"]["prompt_tokens"]
            msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And what happened next?"}]
            time.sleep(wait)
            usage: dict = {}
            t0, t1, _, _ = stream(server.base, "/v1/chat/completions",
                                  {"model": server.model, "messages": msgs, "max_tokens": 2, "temperature": 0}, usage)
            out[key].append(t1 - t0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                out["prefilled_" + key].append(usage["prompt_tokens"] - cached)
            # a fresh prompt of 20 tokens that no slot holds (raw: the chat template's system prompt would be cached)
            words = FRESH_WORDS[r % len(FRESH_WORDS):] + FRESH_WORDS[:r % len(FRESH_WORDS)]
            words = words if key == "now" else words[::-1]
            time.sleep(wait)
            t0, t1, _, _ = stream(server.base, "/v1/completions", {"model": server.model, "prompt": " ".join(words),
                                                                   "max_tokens": 2, "temperature": 0})
            out["fresh_" + key].append(t1 - t0)
    return out


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                   "additionalProperties": False}}}


def tool_result_ttft(server: Server, reps: int, pause: float) -> dict:
    """Per repetition, after a reply that calls TOOL and `pause` seconds: the time of a one-token reply to the
    request that carries the tool's result, and the tokens it prefilled."""
    out: dict = {"tool": [], "prefilled_tool": [], "prompt_tokens_tool": 0}
    ask = {"model": server.model, "tools": [TOOL], "temperature": 0, "parallel_tool_calls": False,
           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    for r in range(reps):
        time.sleep(pause)
        msgs = [{"role": "user", "content": f"[{r}] What is the weather in Paris right now?"}]
        reply = client().post(server.base + "/v1/chat/completions",
                              json={**ask, "messages": msgs, "max_tokens": 64}).json()["choices"][0]["message"]
        msgs += [reply, {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": "Sunny, 18 degrees"}]
        time.sleep(pause)
        t0 = time.perf_counter()
        usage = client().post(server.base + "/v1/chat/completions",
                              json={**ask, "messages": msgs, "max_tokens": 1}).json()["usage"]
        out["tool"].append(time.perf_counter() - t0)
        out["prefilled_tool"].append(usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"])
        out["prompt_tokens_tool"] = usage["prompt_tokens"]
    return out


def llm_run_decode(model: Path, threads: int, n: int) -> float:
    """`llm run --raw --verbose`'s decode tok/s for PROMPTS[0] (it cannot ban EOS: -n small enough)."""
    r = subprocess.run([sys.executable, "-m", "llmcli", "run", str(model), PROMPTS[0], "--raw", "--temperature", "0",
                        "-n", str(n), "--threads", str(threads), "--verbose"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)
    m = re.search(r"decode: (\d+) tokens, ([\d.]+) tok/s", r.stderr)
    if not m:
        raise RuntimeError(r.stderr[-2000:])
    return float(m.group(2))


def med(xs: list[float], digits: int = 2) -> str:
    """The median (min..max)."""
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}..{max(xs):.{digits}f})"


def bench_model(name: str, path: Path, kind: str, args, ban: dict) -> dict:
    server = Server(kind, path, args.threads, args.clients, args.ctx)
    try:
        aggregate_decode(server, 1, 4, ban)  # warm-up
        one, many = [], []
        for _ in range(args.reps):  # alternate, so that a load coming and going hits both alike
            one.append(aggregate_decode(server, 1, args.n, ban))
            many.append(aggregate_decode(server, args.clients, args.n, ban))
        skip = args.skip_ttft or path.name in args.skip_ttft_for.split(",")
        ttft = followup_ttft(server, args.history, args.reps, args.pause) if not skip else {}
        if kind == "llm" and not skip:
            ttft |= tool_result_ttft(server, args.reps, args.pause)
    finally:
        server.stop()
    return {"model": name, "server": kind, "threads": args.threads, "n": args.n, "clients": args.clients,
            "one_tps": one, "many_tps": many, "pause_s": args.pause, "ttft_s": ttft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=32, help="tokens per request")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--history", type=int, default=2000, help="tokens of history for the follow-up TTFT")
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between an answer and its paused follow-up (a user reading and typing)")
    ap.add_argument("--models", default="smollm2,1b", help="comma list of smollm2, 1b")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-ttft-for", default="", help="comma list of model file names to skip the TTFT test for")
    ap.add_argument("-n1b", type=int, default=None, help="tokens per request on the 1B-shape model (default -n)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from bench_decode import prepare_models

    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    paths = prepare_models()
    chosen = {"smollm2": "SmolLM2-135M Q4_0", "1b": "1B-shape random Q4_0"}
    kinds = ["llm"]
    try:
        import llama_cpp  # noqa: F401

        if not args.skip_llama:
            kinds.append("llama_cpp")
    except ImportError:
        print("llama_cpp is not installed: its server is left out", file=sys.stderr)
    results = []
    for key in args.models.split(","):
        name = chosen[key]
        path = paths[name]
        ban = {str(t): -100 for t in Tokenizer.from_gguf(read_gguf(path)).stop_ids}
        for kind in kinds:
            margs = argparse.Namespace(**{**vars(args), "n": args.n1b or args.n}) if key == "1b" else args
            res = bench_model(name, path, kind, margs, ban)
            if kind == "llm":
                res["llm_run_tps"] = [llm_run_decode(path, args.threads, margs.n) for _ in range(args.reps)]
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)

    print(f"\nthreads {args.threads}, {args.n} tokens per request (1B: {args.n1b or args.n}), {args.clients} clients, "
          f"medians of {args.reps} (min..max), load average {os.getloadavg()[0]:.1f}\n")
    print(f"| model | server | 1 client tok/s | {args.clients} clients tok/s (sum) | ratio | follow-up TTFT s "
          f"| fresh TTFT s | ratio | after {args.pause:g} s: follow-up | fresh | ratio | `llm run` tok/s "
          f"| server ÷ run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        one, many = statistics.median(r["one_tps"]), statistics.median(r["many_tps"])
        t = {k: statistics.median(r["ttft_s"][k]) if r["ttft_s"].get(k) else float("nan")
             for k in ("now", "paused", "fresh_now", "fresh_paused")}
        run = statistics.median(r["llm_run_tps"]) if r.get("llm_run_tps") else None
        print(f"| {r['model']} | {r['server']} | {med(r['one_tps'])} | {med(r['many_tps'])} | {many / one:.2f} | "
              f"{t['now']:.3f} | {t['fresh_now']:.3f} | {t['now'] / t['fresh_now']:.2f} | {t['paused']:.3f} | "
              f"{t['fresh_paused']:.3f} | {t['paused'] / t['fresh_paused']:.2f} | "
              + (f"{med(r['llm_run_tps'])} | {one / run:.2f} |" if run else "– | – |"))
    tools = [r for r in results if r["ttft_s"].get("tool")]
    if tools:
        print(f"\nAfter a reply that calls a tool and {args.pause:g} s, the request with its result:\n")
        print("| model | one-token reply s | prefilled tokens | prompt tokens |\n|---|---:|---:|---:|")
        for r in tools:
            t = r["ttft_s"]
            print(f"| {r['model']} | {med(t['tool'], 3)} | {statistics.median(t['prefilled_tool']):.0f} | "
                  f"{t['prompt_tokens_tool']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
