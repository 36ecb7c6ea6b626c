"""`llm serve`: the OpenAI HTTP API (chat completions, completions, embeddings, models) over the scheduler.

Starlette routes parse and check each request into the engine's GenerationConfig, submit it to the
Scheduler (which runs the model on its own thread) and render its records as OpenAI's JSON or as
Server-Sent Events. Every bad request gets OpenAI's error body {"error": {"message", "type", "param", "code"}}
and a 4xx status; the engine's own errors (FieldError names the request field) become 400s.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import json
import math
import queue
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmcli.engine import (
    MAX_TOP_LOGPROBS,
    GenerationConfig,
    GenerationResponse,
    TokenLogprob,
    embedding_pooling,
    next_turn_start,
    normalized,
)
from llmcli.grammar import Constraint, Grammar, GrammarError, vocabulary_bytes
from llmcli.json_schema import json_grammar
from llmcli.scheduler import _END, Closing, EmbedJob, Job, Scheduler
from llmcli.template import TEMPLATE_GIVES
from llmcli.thinking import ReplyStream, Thinking, thinking
from llmcli.tools import (
    CallIds,
    CallSyntax,
    Tool,
    ToolChoice,
    call_syntax,
    calls_text,
    parse_tools,
    result_text,
    template_calls,
    template_id,
    with_instructions,
)
from quant.errors import FieldError, LlmError

MAX_STOPS = 4  # as OpenAI
MAX_BODY = 32 << 20  # bytes of a request body: far more than a whole context of text
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' `logprobs`
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_INPUTS = 2048  # texts per embeddings request, as OpenAI


class ApiError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)

    def ollama_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)

    def anthropic_response(self) -> JSONResponse:
        kind = ANTHROPIC_ERRORS.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": self.message}},
                            status_code=self.status)


# Anthropic's error types by status (its API's error body names the kind, not the field)
ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


# --- request fields ---------------------------------------------------------------------------------------

def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False):
    """body[name] as a finite number (an int when `integer`) within [lo, hi] (or (lo, hi]); None when absent."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name, "invalid_type")
    if not integer and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", name, "invalid_value")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        rng = f"in {left}{lo}, {hi}]" if hi is not None else (f"> {lo}" if lo_open else f">= {lo}")
        raise ApiError(400, f"'{name}' must be {rng}, got {value}", name, "invalid_value")
    return value


def list_field(body: dict, name: str, message: str) -> list | None:
    """body[name] when it is a list, None when absent; else a 400 with `message`."""
    value = body.get(name)
    if value is not None and not isinstance(value, list):
        raise ApiError(400, message, name, "invalid_type")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean", name, "invalid_type")
    return value


def _stops(body: dict, most: int = MAX_STOPS) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stops) > most:
        raise ApiError(400, f"'stop' takes at most {most} strings", "stop", "invalid_value")
    return tuple(stops)


def _logit_bias(body: dict, n_vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids to numbers", "logit_bias", "invalid_type")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", "logit_bias", "invalid_value") from None
        if not 0 <= token < n_vocab:
            raise ApiError(400, f"'logit_bias' token {token} is outside the vocabulary (0..{n_vocab - 1})",
                           "logit_bias", "invalid_value")
        out.append((token, float(_number({"logit_bias": value}, "logit_bias", -100, 100))))
    return tuple(out)


def generation_config(body: dict, defaults: GenerationConfig, n_vocab: int, logprobs: int | None,
                      grammar: Grammar | None = None, most_stops: int = MAX_STOPS) -> GenerationConfig:
    """The request's settings over the server's defaults (`llm serve`'s options); `grammar`: the reply's format."""
    if _number(body, "n", 1, None, integer=True) not in (None, 1):
        raise ApiError(400, "only n = 1 is supported", "n", "invalid_value")
    sampling = {}
    for name, lo, hi, integer, lo_open in (
            ("temperature", 0, 2, False, False), ("top_p", 0, 1, False, True), ("top_k", 0, None, True, False),
            ("min_p", 0, 1, False, False), ("repeat_penalty", 0, None, False, True),
            ("repeat_last_n", 0, None, True, False),
            ("frequency_penalty", -2, 2, False, False), ("presence_penalty", -2, 2, False, False),
            ("seed", -1, 2**63 - 1, True, False)):
        value = _number(body, name, lo, hi, integer, lo_open)
        if value is not None:
            sampling[name] = value
    if sampling.get("seed") == -1:  # -1: a random seed, as llama.cpp's servers take it
        sampling["seed"] = None
    max_tokens = _number(body, "max_completion_tokens", 1, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, None, integer=True)
    stop = _stops(body, most_stops)
    try:
        return dataclasses.replace(
            defaults, sampling=dataclasses.replace(defaults.sampling, **sampling),
            max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
            stop=defaults.stop if stop is None else stop,
            logit_bias=_logit_bias(body, n_vocab), logprobs=logprobs, grammar=grammar or defaults.grammar)
    except FieldError as e:
        raise ApiError(400, str(e), e.field, "invalid_value") from None
    except LlmError as e:  # SamplingConfig's own checks
        raise ApiError(400, str(e), None, "invalid_value") from None


def _chat_messages(body: dict, syntax: CallSyntax | None = None) -> list[dict]:
    """The request's messages as the template takes them: text content; an assistant turn that called tools and a
    tool's result in the template's own way where it has one (`syntax`), else as the calls' JSON and as a user turn
    that says which function returned it (llmcli/tools.py)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    called: dict[str, str] = {}  # tool call id -> function name
    results = 0  # tool results just before, told as one user turn (templates want user and assistant in turn)
    ids = syntax is not None and syntax.id_key is not None  # ids in the template's shape (Mistral's)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {sorted(CHAT_ROLES)}", f"{where}.role",
                           "invalid_value")
        content = _text_content(m.get("content"), f"{where}.content")
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls(m["tool_calls"], f"{where}.tool_calls", called)
            if syntax is not None:
                if ids:
                    calls = [(name, args, template_id(c, j)) for j, (name, args, c) in enumerate(calls)]
                out.append({"role": "assistant", "content": content, "tool_calls": template_calls(calls)})
                results = 0
                continue
            written = calls_text([call[:2] for call in calls])
            content = f"{content}\n{written}" if content else written
        elif role == "tool":
            answers = m.get("tool_call_id")
            if answers is not None and not isinstance(answers, str):
                raise ApiError(400, f"'{where}.tool_call_id' must be a string", f"{where}.tool_call_id",
                               "invalid_type")
            # which function returned it: the call it answers, else its `name` (ollama's tool_name, read as that)
            name = called.get(answers) or (m.get("name") if isinstance(m.get("name"), str) else None)
            if syntax is not None and syntax.results:
                # a result without an id answers the call in its place (the first result the first call)
                out.append({"role": "tool", "content": content, "name": name,
                            "tool_call_id": template_id(answers, results) if ids else answers})
                results += 1
                continue
            text = result_text(name, content)
            if results:
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": "user", "content": text})
            results += 1
            continue
        results = 0
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _text_content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"'{where}' parts must be text parts", where, "invalid_value")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}' must be a string", where, "invalid_type")
    return content


def _calls(calls, where: str, called: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """An assistant turn's tool calls: [(name, arguments, id)]; their ids are remembered for the results."""
    if not isinstance(calls, list):
        raise ApiError(400, f"'{where}' must be a list", where, "invalid_type")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ApiError(400, f"'{where}[{j}]' must be a call: {{\"id\", \"type\": \"function\", \"function\": "
                                f"{{\"name\", \"arguments\"}}}}", f"{where}[{j}]", "invalid_value")
        if isinstance(call.get("id"), str):
            called[call["id"]] = fn["name"]
        out.append((fn["name"], fn["arguments"], call.get("id") if isinstance(call.get("id"), str) else None))
    return out


def _tool_choice(body: dict) -> ToolChoice | None:
    """What the reply may call (`tools`, `tool_choice`); the legacy `functions` are refused by name."""
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' is not supported: give the functions as 'tools'", name,
                           "unsupported_value")
    try:
        choice = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except FieldError as e:
        raise ApiError(400, str(e), e.field, "invalid_value") from None
    if choice is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' together with 'tools' is not supported", "response_format",
                       "unsupported_value")
    return choice


def _template_options(body: dict) -> dict:
    """`chat_template_kwargs` (as vLLM and llama.cpp's server take it): more variables for the chat template, such
    as Qwen3's `enable_thinking`."""
    options = body.get("chat_template_kwargs")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    for key in options:
        if not key.isidentifier() or key in TEMPLATE_GIVES:
            raise ApiError(400, f"'chat_template_kwargs' cannot set {key!r}", "chat_template_kwargs",
                           "invalid_value")
    return options


def _response_format(body: dict) -> str | None:
    """The JSON Schema the reply must follow, as JSON text ("null": any JSON object); None: free text.
    OpenAI's shapes: {"type": "text" | "json_object"} and {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "null"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ApiError(400, "'response_format.json_schema' must be an object with a 'name'",
                           "response_format.json_schema", "invalid_value")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict | bool):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON Schema object",
                           "response_format.json_schema.schema", "invalid_type")
        return json.dumps(schema)  # not sorted: the order of the properties is the order they are written in
    raise ApiError(400, "'response_format' must be an object with 'type' 'text', 'json_object' or 'json_schema'",
                   "response_format", "invalid_value")


# --- the app ---------------------------------------------------------------------------------------------

class Api:
    """The routes, over one scheduler and the model it serves."""

    def __init__(self, scheduler: Scheduler, model_id: str, defaults: GenerationConfig,
                 api_key: str | None = None, pooling: str | None = None):
        """pooling: how embeddings are pooled (engine.POOLINGS); None: as the model file says."""
        self.scheduler, self.model_id, self.defaults, self.api_key = scheduler, model_id, defaults, api_key
        self.pooling = pooling
        self.lm = scheduler.lm
        self.created = int(time.time())
        # a format's JSON text (a schema, "null" for any object; or the tools offered) -> its Grammar
        self._grammar = functools.lru_cache(maxsize=32)(self._build_grammar)
        # how the model's template writes tool calls, where it does (else tools are told in the system message)
        self.syntax = call_syntax(self.lm.template, self.lm.tokenizer)
        self.think = thinking(self.lm.template)  # whether replies begin with reasoning

    def _build_grammar(self, kind: str, text: str, think: Thinking | None) -> Grammar:
        if kind == "tools":
            required, several, listed, syntax = json.loads(text)
            grammar = ToolChoice(tuple(Tool(*t) for t in listed), required, several,
                                 CallSyntax(*syntax) if syntax else None).grammar(think)
        else:
            grammar = json_grammar(json.loads(text), think)
        # the vocabulary's bytes and the compiled walk are made here, not on the thread that runs every request
        Constraint(grammar, vocabulary_bytes(self.lm.tokenizer, self.lm.hparams.n_vocab, grammar.specials)).mask()
        return grammar

    async def grammar(self, param: str, schema: str | None = None, tools: ToolChoice | None = None,
                      think: Thinking | None = None) -> Grammar | None:
        """The grammar of a reply that must follow `schema` (JSON Schema as JSON text, "null": any JSON object) or
        call `tools`, after any reasoning (`think`, from `reasoning`); built off the event loop (a schema can take a
        while). `param`: the request field a schema that cannot be followed is blamed on."""
        if tools is not None:
            key = ("tools", json.dumps(
                [tools.required, tools.several, [[t.name, t.description, t.parameters] for t in tools.tools],
                 dataclasses.astuple(tools.syntax) if tools.syntax else None]))
        elif schema is not None:
            key = ("schema", schema)
        else:
            return None
        try:
            return await asyncio.to_thread(self._grammar, *key, think)
        except GrammarError as e:
            raise ApiError(400, f"'{param}': {e}", param, "invalid_value") from None

    async def _format(self, body: dict, tools: ToolChoice | None = None, think: Thinking | None = None
                      ) -> Grammar | None:
        """The grammar `response_format` or the tools ask for."""
        if tools is not None:
            return await self.grammar("tools", tools=tools, think=think)
        return await self.grammar("response_format", _response_format(body), think=think)

    def app(self) -> Starlette:
        routes = [
            Route("/health", _guard(self.health), methods=["GET"]),
            Route("/metrics", _guard(self.metrics), methods=["GET"]),
            Route("/v1/models", _guard(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", _guard(self.model), methods=["GET"]),
            Route("/v1/chat/completions", _guard(self.chat), methods=["POST"]),
            Route("/v1/completions", _guard(self.completions), methods=["POST"]),
            Route("/v1/embeddings", _guard(self.embeddings), methods=["POST"]),
            # llama.cpp's server's, which its clients call to count and cut text
            Route("/tokenize", _guard(self.tokenize), methods=["POST"]),
            Route("/detokenize", _guard(self.detokenize), methods=["POST"]),
        ]
        from llmcli.server_anthropic import Messages  # they build on this module
        from llmcli.server_ollama import Ollama
        from llmcli.server_responses import Responses

        routes += Responses(self).routes() + Messages(self).routes() + Ollama(self).routes()
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if "x-api-key" in request.headers:  # Anthropic's clients send the key on its own
            given = "Bearer " + request.headers["x-api-key"]
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided" if given else
                           "Missing API key (Authorization: Bearer, or x-api-key)", None, "invalid_api_key")

    async def metrics(self, request: Request) -> Response:
        self._authorize(request)
        return PlainTextResponse(metrics_text(self.scheduler), media_type="text/plain; version=0.0.4")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "slots": len(self.scheduler.slots), "busy": self.scheduler.busy})

    def _model_card(self) -> dict:
        """The model as OpenAI's and Anthropic's clients list it (each reads its own fields)."""
        created = datetime.datetime.fromtimestamp(self.created, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llm",
                "type": "model", "display_name": self.model_id, "created_at": created}

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()], "has_more": False,
                             "first_id": self.model_id, "last_id": self.model_id})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    def _check_model(self, model) -> None:
        if model is not None and model != self.model_id:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves '{self.model_id}')",
                           "model", "model_not_found")

    async def read_json(self, request: Request) -> dict:
        """The request's JSON object, once its API key is checked. A body over MAX_BODY is refused as it arrives,
        before it can fill the memory."""
        self._authorize(request)
        too_big = ApiError(413, f"The request body is over {MAX_BODY >> 20} MiB.", None, "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request.", None, "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "The JSON body of your request is nested too deeply.", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", None, "invalid_type")
        return body

    async def _body(self, request: Request) -> dict:
        body = await self.read_json(request)
        if "model" in body and not isinstance(body["model"], str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        self._check_model(body.get("model"))
        return body

    def submit(self, prompt: list[int], config: GenerationConfig, notify,
               next_turn: Callable[[str], list[int]] | None = None) -> Job:
        try:
            return self.scheduler.submit(prompt, config, notify, next_turn)
        except LlmError as e:  # the prompt does not fit the context, or the server is closing
            raise _submit_error(e, "messages") from None

    def token_ids(self, value, param: str) -> list[int]:
        """A text as tokens (the model's own leading and trailing special tokens included), or a list of token
        ids as they are."""
        if isinstance(value, str):
            if not value:
                raise ApiError(400, f"'{param}' is an empty string", param, "invalid_value")
            return self.lm.tokenizer.encode(value)
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if not all(0 <= t < self.lm.hparams.n_vocab for t in value):
                raise ApiError(400, f"'{param}' token ids must be in 0..{self.lm.hparams.n_vocab - 1}", param,
                               "invalid_value")
            return list(value)
        raise ApiError(400, f"'{param}' must be a string or a list of token ids", param, "invalid_type")

    async def embed(self, request: Request, inputs: list[list[int]], param: str) -> list[np.ndarray]:
        """The embeddings of `inputs` (tokens each), pooled as the server says, not normalized; computed by the
        scheduler's thread between decode steps, and given up if the client goes away."""
        try:
            pooling = embedding_pooling(self.lm.hparams, self.pooling)
        except LlmError as e:
            raise ApiError(400, str(e), None, "unsupported_model") from None
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        try:
            job = self.scheduler.submit_embed(inputs, pooling, lambda: loop.call_soon_threadsafe(wake.set))
        except LlmError as e:
            raise _submit_error(e, param) from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            return [v async for v in _records(job, wake)]
        finally:
            watcher.cancel()
            job.cancel()

    async def tokenize(self, request: Request) -> Response:
        """llama.cpp's /tokenize: `content` as token ids (`add_special`: the model's leading and trailing special
        tokens too; control-token text becomes its id either way); `with_pieces`: each with its text, or its byte
        values where they are not whole UTF-8 characters."""
        body = await self.read_json(request)
        content = body.get("content", "")
        if not isinstance(content, str):
            raise ApiError(400, "'content' must be a string", "content", "invalid_type")
        tok = self.lm.tokenizer
        ids = await asyncio.to_thread(tok.encode, content, _bool(body, "add_special"))
        if not _bool(body, "with_pieces"):
            return JSONResponse({"tokens": ids})

        def piece(t: int):
            raw = tok.token_bytes(t)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return list(raw)

        return JSONResponse({"tokens": [{"id": t, "piece": piece(t)} for t in ids]})

    async def detokenize(self, request: Request) -> Response:
        """llama.cpp's /detokenize: the text of `tokens` (control tokens as their text)."""
        body = await self.read_json(request)
        tokens = body.get("tokens", [])
        n_vocab = self.lm.hparams.n_vocab
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids in 0..{n_vocab - 1}", "tokens",
                           "invalid_value")
        return JSONResponse({"content": self.lm.tokenizer.decode(tokens)})

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        value = body.get("input")
        many = isinstance(value, list) and bool(value) and (all(isinstance(v, str) for v in value)
                                                            or all(isinstance(v, list) for v in value))
        if isinstance(value, list) and not value:
            raise ApiError(400, "'input' is an empty list", "input", "invalid_value")
        if many and len(value) > MAX_INPUTS:
            raise ApiError(400, f"'input' has {len(value)} texts, at most {MAX_INPUTS} are taken", "input",
                           "invalid_value")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format", "invalid_value")
        dims = _number(body, "dimensions", 1, self.lm.hparams.n_embd, integer=True)
        items = value if many else [value]
        inputs = await asyncio.to_thread(
            lambda: [self.token_ids(v, f"input[{i}]" if many else "input") for i, v in enumerate(items)])
        vectors = await self.embed(request, inputs, "input")
        n = sum(map(len, inputs))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(normalized(v[:dims]), fmt)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.model_id,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        options = _template_options(body)
        prompt, tools, next_turn = self.conversation(body, _tool_choice(body), options)
        think = self.reasoning(options)
        grammar = await self._format(body, tools, think)
        want_logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        config = generation_config(body, self.defaults, self.lm.hparams.n_vocab,
                                   (top or 0) if want_logprobs else None, grammar)
        return await self._respond(request, body, prompt, config, chat=True, tools=tools, think=think,
                                   next_turn=next_turn)

    def reasoning(self, options: dict) -> Thinking | None:
        """Whether a reply reasons first, for its grammar and to tell its reasoning from its answer: None for a
        model that does not think, or where the template's options turn thinking off."""
        return None if options.get("enable_thinking") is False else self.think

    def conversation(self, body: dict, tools: ToolChoice | None, options: dict | None = None
                     ) -> tuple[list[int], ToolChoice | None, Callable[[str], list[int]]]:
        """The prompt of a chat request's `messages` and the tools it offers, and the tools as the reply may call
        them: in the template's own way where it has one, else as the system message tells. `options`: more
        variables for the template. Third, the guess at the conversation's next request for the scheduler to run
        ahead: from the reply's text, the history with the reply as clients send it back, and the start of the next
        user turn, or of the first tool's result after calls (engine.next_turn_start), with the ids the response
        gives the calls."""
        shown = None
        if tools is not None and self.syntax is not None:
            tools = dataclasses.replace(tools, syntax=self.syntax)
            shown = [t.as_dict() for t in tools.tools]
        if tools is not None:
            tools = dataclasses.replace(tools, ids=CallIds(tools.syntax))

        def prompt(sent: list[dict]) -> list[int]:
            messages = _chat_messages({"messages": sent}, self.syntax)
            if tools is not None and self.syntax is None:
                messages = with_instructions(messages, tools)
            return self.chat_prompt(messages, shown, options)

        think = self.reasoning(options or {})
        sent = body["messages"]

        def next_turn(reply: str) -> list[int]:
            _, text, calls = ReplyStream(think, tools).whole(reply)
            if calls is None:
                return next_turn_start(prompt, sent + [{"role": "assistant", "content": text}])
            made = [{"id": tools.ids[j], "type": "function", "function": {"name": name, "arguments": arguments}}
                    for j, (name, arguments) in enumerate(calls)]
            return next_turn_start(prompt, sent + [{"role": "assistant", "content": text or None, "tool_calls": made}],
                                   lambda result: {"role": "tool", "tool_call_id": tools.ids[0], "content": result})

        return prompt(sent), tools, next_turn

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, options: dict | None = None
                    ) -> list[int]:
        """The messages (and the tools offered) through the model's chat template, as tokens, ready for the
        reply."""
        try:
            text = self.lm.template.render(messages, add_generation_prompt=True, tools=tools, options=options)
        except LlmError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        return self.lm.tokenizer.encode(text, add_special=False)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.lm.tokenizer.encode(prompt)
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            if not all(0 <= t < self.lm.hparams.n_vocab for t in prompt):
                raise ApiError(400, f"'prompt' token ids must be in 0..{self.lm.hparams.n_vocab - 1}", "prompt",
                               "invalid_value")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string, or a list of token ids (one prompt per request)",
                           "prompt", "invalid_type")
        if not ids:
            raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
        for name in ("echo",):
            if _bool(body, name):
                raise ApiError(400, f"'{name}' is not supported", name, "unsupported_value")
        if body.get("suffix") is not None:
            raise ApiError(400, "'suffix' is not supported", "suffix", "unsupported_value")
        if _number(body, "best_of", 1, 1, integer=True) not in (None, 1):
            raise ApiError(400, "only best_of = 1 is supported", "best_of", "invalid_value")
        logprobs = _number(body, "logprobs", 0, MAX_LEGACY_LOGPROBS, integer=True)
        config = generation_config(body, self.defaults, self.lm.hparams.n_vocab, logprobs, await self._format(body))
        return await self._respond(request, body, ids, config, chat=False)

    async def _respond(self, request: Request, body: dict, prompt: list[int], config: GenerationConfig,
                       chat: bool, tools: ToolChoice | None = None, think: Thinking | None = None,
                       next_turn: Callable[[str], list[int]] | None = None) -> Response:
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not stream):
            raise ApiError(400, "'stream_options' must be an object, and only with 'stream': true",
                           "stream_options", "invalid_value")
        include_usage = bool(options and _bool(options, "include_usage"))
        job, wake = self.start(prompt, config, next_turn)
        render = _Render(self, chat, config.logprobs is not None, tools, think)
        if stream:
            return event_stream(self._events(job, wake, render, include_usage))
        return JSONResponse(render.whole(await whole_reply(request, job, wake)))

    async def start_chat(self, chat: dict, options: dict) -> tuple[Job, asyncio.Event, ToolChoice | None,
                                                                    Thinking | None, int]:
        """Queue a chat completions request given as a dict (another API's request, translated), with the chat
        template's `options`: its job and wake event (Api.start), the tools it offers (with its calls' ids), how
        its reply reasons (Api.reasoning), and its prompt's length."""
        prompt, tools, next_turn = self.conversation(chat, _tool_choice(chat), options)
        think = self.reasoning(options)
        grammar = await self._format(chat, tools, think)
        config = generation_config(chat, self.defaults, self.lm.hparams.n_vocab, None, grammar)
        job, wake = self.start(prompt, config, next_turn)
        return job, wake, tools, think, len(prompt)

    def start(self, prompt: list[int], config: GenerationConfig,
              next_turn: Callable[[str], list[int]] | None = None) -> tuple[Job, asyncio.Event]:
        """Queue a generation: its job, and the event the scheduler's thread sets after each of its records.
        `next_turn`: a chat's guess at its next request (Api.conversation)."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        return self.submit(prompt, config, lambda: loop.call_soon_threadsafe(wake.set), next_turn), wake

    async def _events(self, job: Job, wake: asyncio.Event, render: _Render, include_usage: bool
                      ) -> AsyncIterator[str]:
        """The SSE stream; whenever it stops early (the client left), the job ends at its next token."""
        try:
            if render.chat:
                yield _sse(render.chunk({"role": "assistant", "content": ""}, None, [], include_usage))
            split = ReplyStream(render.think, render.tools)  # calls are sent whole, once complete
            async for r in _records_or_error(job, wake):
                if isinstance(r, ApiError):  # the headers are out: the error becomes the stream's last event
                    yield _sse({"error": {"message": r.message, "type": r.kind, "param": r.param, "code": r.code}})
                    return
                if r.finish_reason == "interrupted":
                    yield _sse({"error": {"message": "the server is shutting down", "type": "server_error",
                                          "param": None, "code": "server_shutting_down"}})
                    return
                reasoning, text = split.feed(r.text)
                if reasoning:
                    yield _sse(render.chunk({"reasoning_content": reasoning}, None, [], include_usage))
                if text or (r.logprobs and not split.in_call):
                    yield _sse(render.chunk(text, None, r.logprobs, include_usage))
                if r.finish_reason is not None:
                    finish = r.finish_reason
                    reasoning, text, calls = split.finish()  # calls cut short by max_tokens come as text
                    if reasoning:
                        yield _sse(render.chunk({"reasoning_content": reasoning}, None, [], include_usage))
                    if text:
                        yield _sse(render.chunk(text, None, [], include_usage))
                    if calls is not None:
                        deltas = [render.tool_call(i, *c, streamed=True) for i, c in enumerate(calls)]
                        yield _sse(render.chunk({"tool_calls": deltas}, None, [], include_usage))
                        finish = "tool_calls"
                    yield _sse(render.chunk(None, finish, [], include_usage))
                    if include_usage:
                        yield _sse(render.usage_chunk(r))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()


def metrics_text(scheduler: Scheduler) -> str:
    """The scheduler's counters in Prometheus' text format, named as llama.cpp's server names its metrics (with
    `llm:` for `llamacpp:`), so that the same dashboards read them; the requests and embeddings ones are ours."""
    c, slots, cached = scheduler.counters, len(scheduler.slots), scheduler.cached_tokens
    rows = [
        ("counter", "prompt_tokens_total", "Prompt tokens run (those a slot's cache held are not).", c.prompt_tokens),
        ("counter", "prompt_seconds_total", "Time spent running prompts.", c.prompt_seconds),
        ("counter", "tokens_predicted_total", "Tokens generated.", c.generated_tokens),
        ("counter", "tokens_predicted_seconds_total", "Time spent in decode steps.", c.decode_seconds),
        ("counter", "n_decode_total", "Decode steps (one step decodes every active slot).", c.decode_steps),
        ("gauge", "n_busy_slots_per_decode", "Average active slots per decode step.",
         c.busy_slots / max(c.decode_steps, 1)),
        ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
         c.prompt_tokens / c.prompt_seconds if c.prompt_seconds else 0.0),
        ("gauge", "predicted_tokens_seconds", "Average decode throughput in tokens/s, all slots together.",
         c.decoded_tokens / c.decode_seconds if c.decode_seconds else 0.0),
        ("gauge", "kv_cache_usage_ratio", "Share of the slots' KV cache positions in use.",
         cached / (slots * scheduler.n_ctx)),
        ("gauge", "kv_cache_tokens", "KV cache positions in use.", cached),
        ("gauge", "requests_processing", "Generations in flight.", scheduler.busy),
        ("gauge", "requests_deferred", "Generations waiting for a free slot.", scheduler.waiting),
        ("counter", "requests_total", "Generations ended.", c.requests),
        ("counter", "embedding_texts_total", "Texts embedded.", c.embedded_texts),
        ("counter", "embedding_tokens_total", "Tokens of the texts embedded.", c.embedded_tokens),
    ]
    return "".join(f"# HELP llm:{name} {text}\n# TYPE llm:{name} {kind}\nllm:{name} {value}\n"
                   for kind, name, text, value in rows)


def _submit_error(e: LlmError, param: str) -> ApiError:
    """A request the scheduler refused: it does not fit the context (400), or the server is closing (503)."""
    if isinstance(e, Closing):
        return ApiError(503, str(e), None, "server_shutting_down", "server_error")
    code = "context_length_exceeded" if "context" in str(e) else None
    return ApiError(400, str(e), param if code else None, code)


def _encoded(v: np.ndarray, fmt: str):
    """An embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes (what the
    `openai` client asks for by default)."""
    if fmt == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, sent as they come (no proxy buffering)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def reply_with(request: Request, stream: bool, reply, job: Job, wake: asyncio.Event) -> Response:
    """A generation's response: `reply.events` streamed, or `reply.whole` of all its records."""
    if stream:
        return event_stream(reply.events(job, wake))
    return JSONResponse(reply.whole(await whole_reply(request, job, wake)))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _records(job: Job | EmbedJob, wake: asyncio.Event) -> AsyncIterator:
    """The job's records, awaited without a thread: the worker sets `wake` after each one."""
    while True:
        wake.clear()
        try:
            item = job.records.get_nowait()
        except queue.Empty:
            await wake.wait()
            continue
        if item is _END:
            return
        if isinstance(item, Closing):
            raise ApiError(503, str(item), None, "server_shutting_down", "server_error")
        if isinstance(item, LlmError):
            raise ApiError(400, str(item), getattr(item, "field", None), "invalid_value")
        if isinstance(item, BaseException):
            raise ApiError(500, f"generation failed: {type(item).__name__}: {item}", None, None, "server_error")
        yield item


async def whole_reply(request: Request, job: Job, wake: asyncio.Event) -> list[GenerationResponse]:
    """All of a job's records; the job ends early if the client goes away, and a shutdown is a 503."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        records = [r async for r in _records(job, wake)]
    finally:
        watcher.cancel()
        job.cancel()
    if records[-1].finish_reason == "interrupted":
        raise ApiError(503, "the server is shutting down", None, "server_shutting_down", "server_error")
    return records


async def _records_or_error(job: Job, wake: asyncio.Event) -> AsyncIterator[GenerationResponse | ApiError]:
    try:
        async for r in _records(job, wake):
            yield r
    except ApiError as e:
        yield e


async def _cancel_on_disconnect(request: Request, job: Job | EmbedJob) -> None:
    """Wait for the client to go away (the body is read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = ApiError(exc.status_code, exc.detail or "error", None, None)
    return error.ollama_response() if request.url.path.startswith("/api/") else error.response()


def _guard(handler, api: str = "openai"):
    """The route's ApiError as its response, in the error body of its `api` (openai, ollama or anthropic); any
    other exception (a bug, not bad input) as a 500 and one line on the server's stderr, never a traceback."""
    shaped = {"openai": ApiError.response, "ollama": ApiError.ollama_response,
              "anthropic": ApiError.anthropic_response}[api]

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return shaped(e)
        except Exception as e:
            print(f"llm serve: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
            return shaped(ApiError(500, f"internal error: {type(e).__name__}", None, None, "server_error"))

    return route


def token_logprobs(tokenizer, items: list[TokenLogprob]) -> list[dict]:
    """Each token's {"token", "logprob", "bytes", "top_logprobs"}: OpenAI's chat shape, which ollama's is too."""
    def entry(t, lp):
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
    return [entry(i.token, i.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]


class _Render:
    """OpenAI's response objects for one request."""

    def __init__(self, api: Api, chat: bool, logprobs: bool, tools: ToolChoice | None = None,
                 think: Thinking | None = None):
        """tools: what the reply may call (llmcli/tools.py tells a call from text); think: how its reasoning is
        told from its answer (llmcli/thinking.py)."""
        self.api, self.chat, self.logprobs, self.tools, self.think = api, chat, logprobs, tools, think
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offset = 0  # text offset (legacy logprobs)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.api.model_id,
                "system_fingerprint": None}

    def _logprobs(self, items: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        tok = self.api.lm.tokenizer
        if self.chat:
            return {"content": token_logprobs(tok, items), "refusal": None}
        tokens = [tok.token_bytes(i.token).decode("utf-8", errors="replace") for i in items]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [i.logprob for i in items],
                "top_logprobs": [{tok.token_bytes(t).decode("utf-8", errors="replace"): lp for t, lp in i.top}
                                 for i in items],
                "text_offset": offsets}

    def _usage(self, last: GenerationResponse) -> dict:
        # cached_tokens: the prompt's leading tokens that a slot's cache held (OpenAI's field for prompt caching)
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
                "total_tokens": last.prompt_tokens + last.generation_tokens,
                "prompt_tokens_details": {"cached_tokens": last.prompt_tokens - last.prefilled_tokens}}

    def whole(self, records: list[GenerationResponse]) -> dict:
        last = records[-1]
        text = "".join(r.text for r in records)
        lps = self._logprobs([i for r in records for i in r.logprobs])
        reasoning, text, calls = ReplyStream(self.think, self.tools).whole(text)
        thought = {"reasoning_content": reasoning} if reasoning else {}
        if calls is not None:
            made = [self.tool_call(i, *c) for i, c in enumerate(calls)]
            choice = {"index": 0, "message": {"role": "assistant", "content": text or None, "refusal": None,
                                              **thought, "tool_calls": made},
                      "logprobs": None, "finish_reason": "tool_calls"}
        elif self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None, **thought},
                      "logprobs": lps, "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": last.finish_reason}
        return self._head(self.object) | {"choices": [choice], "usage": self._usage(last)}

    def chunk(self, delta, finish: str | None, logprobs: list[TokenLogprob], include_usage: bool) -> dict:
        """A streamed piece: `delta` is the chat delta (dict) or the text (str); None on the finishing chunk."""
        lps = self._logprobs(logprobs) if logprobs else None
        if self.chat:
            if isinstance(delta, str):
                delta = {"content": delta}
            choice = {"index": 0, "delta": delta or {}, "logprobs": lps, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": lps, "finish_reason": finish}
        out = self._head(self.object + ".chunk" if self.chat else self.object) | {"choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def tool_call(self, index: int, name: str, arguments: str, streamed: bool = False) -> dict:
        """The reply's call number `index`, whole or as a streamed delta."""
        call = {"id": self.tools.ids[index], "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"index": index} | call if streamed else call

    def usage_chunk(self, last: GenerationResponse) -> dict:
        obj = self.object + ".chunk" if self.chat else self.object
        return self._head(obj) | {"choices": [], "usage": self._usage(last)}
