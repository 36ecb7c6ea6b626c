"""Command: serve (the OpenAI-compatible HTTP server)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llmcli import options as opt


def serve(
    model: opt.ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    parallel: Annotated[int, typer.Option(
        "--parallel", help="Requests generated at once, each with its own KV cache; more wait in a queue.")] = 4,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="LLM_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every /v1 and /api request.",
        show_default=False)] = None,
    template: opt.Template = None, pooling: opt.Pooling = None,
    backend: opt.Backend = None, threads: opt.Threads = None, ctx: opt.Ctx = None, kv_type: opt.KvType = None,
    temperature: opt.Temperature = None, top_k: opt.TopK = None, top_p: opt.TopP = None, min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None, repeat_last_n: opt.RepeatLastN = None,
    frequency_penalty: opt.FrequencyPenalty = None, presence_penalty: opt.PresencePenalty = None,
    seed: opt.Seed = None, max_tokens: opt.MaxTokens = None, stop: opt.Stop = None,
    lookup: opt.Lookup = None, draft: opt.Draft = None, draft_max: opt.DraftMax = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="A line on stderr for each generation: its tokens, time to first token, speed.")
    ] = False,
) -> None:
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/responses, /v1/completions, /v1/embeddings,
    /v1/models), Anthropic's (/v1/messages) and ollama's (/api/chat, /api/generate, /api/embed, /api/tags, ...). The
    sampling options are the defaults of requests that do not set them.

    Example: llm serve smollm2 --port 8080 --parallel 4
    """
    import uvicorn

    from llmcli.cli_core import _gen_config, _open, _spec_config
    from llmcli.engine import embedding_pooling
    from llmcli.scheduler import Scheduler
    from llmcli.server import Api
    from llmcli.store import DEFAULT_MODEL
    from quant.errors import FieldError, LlmError

    if not 0 <= port <= 65535:
        raise LlmError(f"--port must be in 0..65535, got {port}")
    defaults = _gen_config(max_tokens, stop, opt.sampling_options(
        temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, seed))
    spec = _spec_config(lookup, draft, draft_max)
    lm = _open(model, backend, threads, template)
    try:
        pooled = f"embeddings by {embedding_pooling(lm.hparams, pooling)} pooling"
    except FieldError:  # a --pooling that is not one is refused before the server starts
        raise
    except LlmError:  # a reranker's file: each embeddings request is refused, saying why
        pooled = "no embeddings (a reranker: --pooling chooses a pooling)"
    log = (lambda line: print(f"llm serve: {line}", file=sys.stderr, flush=True)) if verbose else None
    scheduler = Scheduler(lm, parallel, ctx, kv_type, spec, _open(draft, backend, threads) if draft else None, log)
    ref = model or DEFAULT_MODEL
    model_id = Path(ref).name if ref.endswith(".gguf") else ref
    api = Api(scheduler, model_id, defaults, api_key, pooling)
    app = api.app()
    # what a client of tools and reasoning should know about this model's template
    notes = [f"tool calls as its template writes them ({api.syntax.begin.strip() or 'JSON'})" if api.syntax
             else "tool calls as JSON told in the system message", *(["reasoning apart from answers"] if api.think
                                                                     else []), pooled]

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C / SIGTERM: requests in flight end now, not at max_tokens
            scheduler.close()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"llm serve: {model_id} ({lm.model.name} backend, {parallel} slots of {scheduler.n_ctx} "
                      f"tokens) on http://{host}:{port}/v1 (OpenAI, Anthropic) and /api (ollama)"
                      + (" (API key required)" if api_key else "") + "; " + ", ".join(notes),
                      file=sys.stderr, flush=True)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                   timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        scheduler.close()
        scheduler.join(10)
    if not server.started:
        raise LlmError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    print("llm serve: stopped", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command()(serve)
