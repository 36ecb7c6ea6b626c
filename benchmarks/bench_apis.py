"""`llm serve`'s three chat APIs side by side: OpenAI's chat completions, OpenAI's Responses, Anthropic's Messages.

A greedy conversation (a new user turn each time, of the same length), streamed, over real HTTP on 127.0.0.1 through
each route in turn (alternating, so that a load that comes and goes hits all alike): time to the first text delta,
and decode tok/s from the first delta to the last (the reply's tokens, from its usage). The routes share the
engine; what differs is the request's translation and the events' shapes, which this measures.

    python benchmarks/bench_apis.py [--model smollm2] [-n 64] [-r 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import Server, client, med  # noqa: E402

SYSTEM = "You are a storyteller."
USER = "Tell me a long story about a lighthouse keeper and the sea."


def request(api: str, model: str, n: int, tag: str) -> tuple[str, dict]:
    user = f"[{tag}] {USER}"  # a new tag: a user turn no slot holds yet (the system prompt's tokens it does)
    if api == "chat":
        return "/v1/chat/completions", {"model": model, "max_tokens": n, "temperature": 0, "stream": True,
                                        "stream_options": {"include_usage": True}, "messages": [
                                            {"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    if api == "responses":
        return "/v1/responses", {"model": model, "max_output_tokens": n, "temperature": 0, "stream": True,
                                 "instructions": SYSTEM, "input": user}
    return "/v1/messages", {"model": model, "max_tokens": n, "temperature": 0, "stream": True, "system": SYSTEM,
                            "messages": [{"role": "user", "content": user}]}


def piece_and_tokens(api: str, event: dict) -> tuple[str | None, int | None]:
    """The text an event carries, and the reply's token count where it gives it."""
    if api == "chat":
        text = event["choices"][0]["delta"].get("content") if event.get("choices") else None
        return text, (event.get("usage") or {}).get("completion_tokens")
    kind = event.get("type")
    if api == "responses":
        if kind == "response.output_text.delta":
            return event["delta"], None
        if kind in ("response.completed", "response.incomplete"):
            return None, event["response"]["usage"]["output_tokens"]
        return None, None
    if kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
        return event["delta"]["text"], None
    return None, event["usage"]["output_tokens"] if kind == "message_delta" else None


def one(server: Server, api: str, n: int, tag: str) -> dict:
    path, body = request(api, server.model, n, tag)
    t0 = time.perf_counter()
    first = last = None
    tokens, text = None, []
    with client().stream("POST", server.base + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece, count = piece_and_tokens(api, json.loads(line[6:]))
            if piece:
                last = time.perf_counter()
                first = first or last
                text.append(piece)
            tokens = count if count is not None else tokens
    return {"ttft_s": first - t0, "tps": (tokens - 1) / (last - first), "tokens": tokens, "text": "".join(text)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M Q4_0) or 1b (the 1B-shape model)")
    ap.add_argument("-n", type=int, default=64, help="tokens per reply")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from bench_decode import prepare_models

    path = prepare_models()[{"smollm2": "SmolLM2-135M Q4_0", "1b": "1B-shape random Q4_0"}[args.model]]
    apis = ("chat", "responses", "messages")
    server = Server("llm", path, args.threads, 1, 2048)
    runs: dict = {api: [] for api in apis}
    try:
        # the same request through each route: the same text
        same = len({one(server, api, args.n, "same")["text"] for api in apis}) == 1
        for rep in range(args.reps):  # each its own new turn, of the same length in tokens
            for k, api in enumerate(apis):
                runs[api].append(one(server, api, args.n, f"{rep}{'abc'[k]}"))
    finally:
        server.stop()
    print(f"\n{args.model}, {args.n} tokens per reply, threads {args.threads}, medians of {args.reps} (min..max); "
          f"one request's text {'the same' if same else 'NOT the same'} through every route\n")
    print("| route | time to first text, s | decode tok/s | tokens |\n|---|---:|---:|---:|")
    for api, route in zip(apis, ("/v1/chat/completions", "/v1/responses", "/v1/messages"), strict=True):
        t, d = [r["ttft_s"] for r in runs[api]], [r["tps"] for r in runs[api]]
        print(f"| {route} | {med(t, 3)} | {med(d, 1)} | {runs[api][0]['tokens']} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
