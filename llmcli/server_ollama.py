"""`llm serve`'s ollama API, for the tools written against ollama: /api/chat, /api/generate, /api/embed (and the
older /api/embeddings), /api/tags, /api/show, /api/ps and /api/version, on the same scheduler, grammars and request
checks as the OpenAI routes (server.py).

ollama's shapes: replies stream by default, one JSON object per line; sampling settings come in `options`;
durations are nanoseconds; an error is {"error": message}. Managing models (pull, create, delete, ...) is not
served, and each of those routes says so."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import llmcli
from llmcli.engine import MAX_TOP_LOGPROBS, GenerationConfig, GenerationResponse, normalized
from llmcli.server import (
    MAX_INPUTS,
    Api,
    ApiError,
    _bool,
    _guard,
    _number,
    _records_or_error,
    _tool_choice,
    generation_config,
    token_logprobs,
    whole_reply,
)
from llmcli.thinking import ReplyStream, Thinking, think_options
from llmcli.tools import ToolChoice
from quant.errors import LlmError

# ollama's options (its client's `Options`), by what llm does with each
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
            "frequency_penalty", "seed", "stop")
# how the model is run rather than what it writes: the server's own settings (`llm serve --ctx --threads`) hold;
# mirostat's tau and eta matter only with mirostat on, which is refused below
IGNORED = frozenset(("numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                     "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                     "penalize_newline", "mirostat_tau", "mirostat_eta"))
# samplers llm does not have, taken only at the value that turns them off (clients send the defaults)
OFF = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
MAX_STOPS = 16  # Modelfiles often list several stop strings
UNSERVED = {
    "/api/pull": "llm serve serves the model it was started with: fetch models with `llm pull`",
    "/api/push": "llm serve does not push models",
    "/api/create": "llm serve does not create models: `llm quantize` writes GGUF files",
    "/api/copy": "llm serve does not copy models",
    "/api/delete": "llm serve does not delete models: `llm rm` does",
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _options(body: dict, n_ctx: int) -> dict:
    """ollama's `options` as the request fields generation_config reads (num_predict as max_tokens; -1 and -2,
    ollama's "until the context is full", as the context)."""
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object", "options")
    fields = {}
    for name, value in options.items():
        if value is None or name in IGNORED:
            continue
        if name in SAMPLING:
            fields[name] = value
        elif name in OFF:
            if isinstance(value, bool) or value != OFF[name]:
                raise ApiError(400, f"'options.{name}' is not supported (only {OFF[name]}, which turns it off)",
                               f"options.{name}")
        elif name != "num_predict":
            raise ApiError(400, f"'options.{name}' is not an option llm serve knows", f"options.{name}")
    predict = _number(options, "num_predict", -2, None, integer=True)
    if predict == 0:
        raise ApiError(400, "'num_predict' must be at least 1, or -1 (until the context is full)", "num_predict")
    if predict is not None:
        fields["max_tokens"] = n_ctx if predict < 0 else predict
    if fields.get("repeat_last_n") == -1:  # ollama's "the whole context"
        fields["repeat_last_n"] = n_ctx
    return fields


def _schema(body: dict) -> str | None:
    """`format` as the JSON Schema text Api.grammar takes: "json" is any JSON object; absent or "": free text."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return "null"
    if isinstance(fmt, dict):
        return json.dumps(fmt)  # not sorted: the properties are written in the schema's order
    raise ApiError(400, "'format' must be \"json\" or a JSON Schema object", "format")


def _no_images(obj: dict, where: str) -> None:
    if obj.get("images"):
        raise ApiError(400, f"'{where}images': this server's model reads text only", f"{where}images")


def _openai_messages(messages: list) -> list:
    """ollama's messages in OpenAI's shape, for server._chat_messages: a call's arguments are an object, not
    JSON text, and a tool's result names its function (`tool_name`) instead of a call id."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)  # _chat_messages words the error
            continue
        _no_images(m, f"messages[{i}].")
        m = {k: v for k, v in m.items() if k not in ("thinking", "tool_name")}
        if isinstance(messages[i].get("tool_name"), str):
            m["name"] = messages[i]["tool_name"]
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ApiError(400, f"'messages[{i}].tool_calls' must be a list", f"messages[{i}].tool_calls")
            m["tool_calls"] = [_openai_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(m)
    return out


def _openai_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), dict):
        raise ApiError(400, f"'{where}' must be {{\"function\": {{\"name\", \"arguments\": {{...}}}}}}", where)
    return {"type": "function", "function": {"name": fn["name"], "arguments": json.dumps(fn["arguments"])}}


def _parameter_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _plain(value):
    """A metadata value as JSON can carry it: numbers, strings and booleans; arrays and non-finite numbers (a
    file may hold anything) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, str | int | float | bool) else None


class Ollama:
    """ollama's routes over an Api (its scheduler, model, defaults and API key)."""

    def __init__(self, api: Api):
        self.api, self.lm = api, api.lm
        # ollama names models name:tag, and clients send back the name its list gave them
        self.name = api.model_id if ":" in api.model_id else f"{api.model_id}:latest"
        self._digest: str | None = None

    def routes(self) -> list[Route]:
        g = lambda handler: _guard(handler, "ollama")  # noqa: E731
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", g(self.version), methods=["GET"]),
            Route("/api/tags", g(self.tags), methods=["GET"]),
            Route("/api/ps", g(self.ps), methods=["GET"]),
            Route("/api/show", g(self.show), methods=["POST"]),
            Route("/api/chat", g(self.chat), methods=["POST"]),
            Route("/api/generate", g(self.generate), methods=["POST"]),
            Route("/api/embed", g(self.embed), methods=["POST"]),
            Route("/api/embeddings", g(self.embeddings), methods=["POST"]),
            *(Route(path, g(self.unserved), methods=["POST", "DELETE"]) for path in UNSERVED),
        ]

    # --- the model ----------------------------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("llm serve is running (the ollama API under /api, OpenAI's under /v1)")

    async def version(self, request: Request) -> Response:
        self.api._authorize(request)
        return JSONResponse({"version": llmcli.__version__})

    async def unserved(self, request: Request) -> Response:
        self.api._authorize(request)
        raise ApiError(501, UNSERVED[request.url.path])

    async def digest(self) -> str:
        """The file's SHA-256, as ollama names a model's blob: the Hub cache's blob name where it is one, else
        hashed once (off the event loop: a large file takes seconds)."""
        if self._digest is None:
            path = self.lm.gguf.path.resolve()
            if re.fullmatch(r"[0-9a-f]{64}", path.name):
                self._digest = path.name
            else:
                def sha256() -> str:
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                    return h.hexdigest()
                self._digest = await asyncio.to_thread(sha256)
        return self._digest

    @functools.cached_property
    def parameters(self) -> int:
        from backends.base import count_params

        return count_params(self.lm.gguf)

    def details(self) -> dict:
        from llmcli.bench import quant_name

        arch = self.lm.hparams.arch
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": _parameter_size(self.parameters), "quantization_level": quant_name(self.lm.gguf)}

    def _modified(self) -> str:
        modified = datetime.datetime.fromtimestamp(self.lm.gguf.path.stat().st_mtime, datetime.timezone.utc)
        return modified.isoformat().replace("+00:00", "Z")

    async def _entry(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self._modified(),
                "size": self.lm.gguf.file_size, "digest": await self.digest(), "details": self.details()}

    async def tags(self, request: Request) -> Response:
        self.api._authorize(request)
        return JSONResponse({"models": [await self._entry()]})

    async def ps(self, request: Request) -> Response:
        self.api._authorize(request)
        entry = await self._entry()
        del entry["modified_at"]
        # loaded for as long as the server runs: ollama writes a keep_alive of forever as a far-off expiry
        entry |= {"expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                  "context_length": self.api.scheduler.n_ctx}
        return JSONResponse({"models": [entry]})

    async def show(self, request: Request) -> Response:
        await self._body(request)
        gguf, d = self.lm.gguf, self.api.defaults
        s = d.sampling
        info = {k: _plain(v) for k, v in gguf.metadata.items()}
        info["general.parameter_count"] = self.parameters  # a count, as ollama gives it
        params = [("temperature", s.temperature), ("top_k", s.top_k), ("top_p", s.top_p), ("min_p", s.min_p),
                  ("repeat_penalty", s.repeat_penalty), ("repeat_last_n", s.repeat_last_n),
                  ("num_predict", d.max_tokens), ("num_ctx", self.api.scheduler.n_ctx),
                  *(("stop", json.dumps(stop)) for stop in d.stop)]
        parameters = "\n".join(f"{k:<30} {v}" for k, v in params)
        template = self.lm.template.source
        modelfile = (f"# served by llm serve: the model's chat template is Jinja, not Go\nFROM {gguf.path}\n"
                     f'TEMPLATE """{template}"""\n' + "".join(f"PARAMETER {k} {v}\n" for k, v in params))
        license_ = gguf.get("general.license")
        return JSONResponse({
            "license": license_ if isinstance(license_, str) else "", "modelfile": modelfile,
            "parameters": parameters, "template": template, "details": self.details(), "model_info": info,
            "capabilities": ["completion", "tools", *(["thinking"] if self.api.think else []),
                             *(["embedding"] if self.lm.hparams.pooling else [])],  # the file says it embeds
            "modified_at": self._modified()})

    # --- generation ---------------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        body = await self.api.read_json(request)
        model = body.get("model", body.get("name"))  # older clients name it "name"
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required (a string)", "model")
        if model not in (self.api.model_id, self.name):
            raise ApiError(404, f"model '{model}' not found (this server serves '{self.name}')", "model")
        return body

    def _config(self, body: dict, grammar) -> GenerationConfig:
        want = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if top and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        fields = _options(body, self.api.scheduler.n_ctx)
        return generation_config(fields, self.api.defaults, self.lm.hparams.n_vocab, (top or 0) if want else None,
                                 grammar, MAX_STOPS)

    def _think(self, body: dict) -> dict:
        """`think` as the chat template's options: false turns thinking off where the template can (Qwen3's
        `enable_thinking`); true asks for a model that thinks."""
        think = body.get("think")
        if think is not None and not isinstance(think, bool):
            raise ApiError(400, "'think' must be true or false", "think")
        try:
            return think_options(self.api.think, think)[0]
        except LlmError as e:
            raise ApiError(400, f"'{self.name}': {e}", "think") from None

    def _loaded(self, chat: bool) -> Response:
        """ollama's answer to a request with nothing to generate: the model is loaded (it always is here)."""
        out = {"model": self.name, "created_at": _now()}
        out |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        return JSONResponse(out | {"done": True, "done_reason": "load"})

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        stream = _stream(body)
        if body.get("messages") in (None, []):
            return self._loaded(chat=True)
        messages = body["messages"]
        if not isinstance(messages, list):
            raise ApiError(400, "'messages' must be a list", "messages")
        tools_given = body.get("tools")
        if isinstance(tools_given, list):  # ollama's tools may leave out the type: a function is all there is
            tools_given = [{"type": "function"} | t if isinstance(t, dict) else t for t in tools_given]
        options = self._think(body)
        prompt, tools, next_turn = self.api.conversation({"messages": _openai_messages(messages)},
                                              _tool_choice({"tools": tools_given}), options)
        if tools is not None:
            if _schema(body) is not None:
                raise ApiError(400, "'format' together with 'tools' is not supported", "format")
            grammar = await self.api.grammar("tools", tools=tools, think=self.api.reasoning(options))
        else:
            grammar = await self.api.grammar("format", _schema(body), think=self.api.reasoning(options))
        config = self._config(body, grammar)
        return await self._respond(request, prompt, config, stream, chat=True, tools=tools,
                                   think=self.api.reasoning(options), next_turn=next_turn)

    async def generate(self, request: Request) -> Response:
        body = await self._body(request)
        stream = _stream(body)
        _no_images(body, "")
        for name, why in (("template", "the model's own chat template is used (`llm serve --template` sets "
                                       "another)"),
                          ("suffix", "fill-in-the-middle is not supported")):
            if body.get(name) not in (None, ""):
                raise ApiError(400, f"'{name}' is not supported: {why}", name)
        prompt, system = body.get("prompt"), body.get("system")
        for name, value in (("prompt", prompt), ("system", system)):
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"'{name}' must be a string", name)
        context = body.get("context") or []
        n_vocab = self.lm.hparams.n_vocab
        if not isinstance(context, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in context):
            raise ApiError(400, f"'context' must be a list of token ids in 0..{n_vocab - 1}", "context")
        if not prompt:
            return self._loaded(chat=False)
        options, raw = self._think(body), _bool(body, "raw")
        if raw:
            if system:
                raise ApiError(400, "'system' needs the chat template, which 'raw' leaves out", "system")
            ids = self.lm.tokenizer.encode(prompt, add_special=not context)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            ids = self.api.chat_prompt(messages + [{"role": "user", "content": prompt}], options=options)
        think = None if raw else self.api.reasoning(options)  # a raw prompt is the caller's: no reasoning assumed
        grammar = await self.api.grammar("format", _schema(body), think=think)
        config = self._config(body, grammar)
        return await self._respond(request, context + ids, config, stream, chat=False, think=think)

    # --- embeddings -----------------------------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        """/api/embed: normalized embeddings of one text or several; `truncate` (default true) cuts a text to the
        context, else a text that does not fit is refused; `dimensions` keeps the first ones (normalized again)."""
        started = time.monotonic_ns()
        body = await self._body(request)
        texts = _texts(body.get("input"))
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ApiError(400, "'truncate' must be a boolean", "truncate")
        dims = _number(body, "dimensions", 1, self.lm.hparams.n_embd, integer=True)
        _options(body, self.api.scheduler.n_ctx)  # checked like a generation's; none of them changes an embedding
        if not texts:
            return JSONResponse({"model": self.name, "embeddings": []})
        n_ctx = self.api.scheduler.n_ctx
        inputs = await asyncio.to_thread(lambda: [self.lm.tokenizer.encode(t) for t in texts])
        if truncate:
            inputs = [ids[:n_ctx] for ids in inputs]
        vectors = await self.api.embed(request, inputs, "input")
        return JSONResponse({"model": self.name, "embeddings": [normalized(v[:dims]).tolist() for v in vectors],
                             "total_duration": time.monotonic_ns() - started, "load_duration": 0,
                             "prompt_eval_count": sum(map(len, inputs))})

    async def embeddings(self, request: Request) -> Response:
        """/api/embeddings, ollama's older route: one `prompt`, its embedding as the model gives it (not
        normalized, as ollama's)."""
        body = await self._body(request)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        _options(body, self.api.scheduler.n_ctx)
        if not prompt:
            return JSONResponse({"embedding": []})
        ids = await asyncio.to_thread(self.lm.tokenizer.encode, prompt)
        vector, = await self.api.embed(request, [ids], "prompt")
        return JSONResponse({"embedding": vector.tolist()})

    async def _respond(self, request: Request, prompt: list[int], config: GenerationConfig, stream: bool,
                       chat: bool, tools: ToolChoice | None = None, think: Thinking | None = None,
                       next_turn: Callable[[str], list[int]] | None = None) -> Response:
        started = time.monotonic_ns()
        job, wake = self.api.start(prompt, config, next_turn)
        reply = _Reply(self, chat, config.logprobs is not None, tools, prompt, started, think)
        if stream:
            return StreamingResponse(reply.lines(job, wake), media_type="application/x-ndjson")
        return JSONResponse(reply.whole(await whole_reply(request, job, wake)))


def _texts(value) -> list[str]:
    """/api/embed's `input`: a text or a list of texts; nothing (absent, "" or []) is ollama's "load"."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_INPUTS:
            raise ApiError(400, f"'input' has {len(value)} texts, at most {MAX_INPUTS} are taken", "input")
        empty = next((i for i, v in enumerate(value) if not v), None)
        if empty is not None:
            raise ApiError(400, f"'input[{empty}]' is an empty string", "input")
        return value
    raise ApiError(400, "'input' must be a string or a list of strings", "input")


def _stream(body: dict) -> bool:
    stream = body.get("stream", True)  # ollama streams unless told not to
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    return stream


@dataclasses.dataclass
class _Reply:
    """ollama's reply objects for one request: pieces, then the one that says it is done (with its counts)."""

    ollama: Ollama
    chat: bool
    logprobs: bool
    tools: ToolChoice | None
    prompt: list[int]
    started_ns: int
    think: Thinking | None = None

    def _obj(self, text: str, logprobs=None, calls=None, thinking: str = "") -> dict:
        out = {"model": self.ollama.name, "created_at": _now()}
        if self.chat:
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [{"function": {"index": i, "name": name, "arguments": json.loads(args)}}
                                         for i, (name, args) in enumerate(calls)]
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        if self.logprobs and logprobs:
            out["logprobs"] = token_logprobs(self.ollama.lm.tokenizer, logprobs)
        return out | {"done": False}

    def _done(self, out: dict, last: GenerationResponse, tokens: list[int]) -> dict:
        out |= {"done": True, "done_reason": "length" if last.finish_reason == "length" else "stop"}
        if not self.chat:
            out["context"] = self.prompt + tokens  # ollama's memory of a conversation for /api/generate
        eval_ns = last.generation_tokens / last.generation_tps * 1e9 if last.generation_tps else 0
        return out | {"total_duration": time.monotonic_ns() - self.started_ns, "load_duration": 0,
                      "prompt_eval_count": last.prompt_tokens, "prompt_eval_duration": int(last.ttft_s * 1e9),
                      "eval_count": last.generation_tokens, "eval_duration": int(eval_ns)}

    def whole(self, records: list[GenerationResponse]) -> dict:
        thinking, text, calls = ReplyStream(self.think, self.tools).whole("".join(r.text for r in records))
        lps = [i for r in records for i in r.logprobs]
        out = self._obj(text, lps, calls, thinking)
        return self._done(out, records[-1], [r.token for r in records if r.token is not None])

    async def lines(self, job, wake: asyncio.Event) -> AsyncIterator[str]:
        """The NDJSON stream; whenever it stops early (the client left), the job ends at its next token. A tool
        call is held back until it is whole, then sent as one piece."""
        tokens: list[int] = []
        split = ReplyStream(self.think, self.tools)
        try:
            async for r in _records_or_error(job, wake):
                if isinstance(r, ApiError):  # the status is out: the error becomes the stream's last line
                    yield _line({"error": r.message})
                    return
                if r.finish_reason == "interrupted":
                    yield _line({"error": "the server is shutting down"})
                    return
                if r.token is not None:
                    tokens.append(r.token)
                thinking, text = split.feed(r.text)
                if thinking or text or (r.logprobs and not split.in_call):
                    yield _line(self._obj(text, r.logprobs, thinking=thinking))
                if r.finish_reason is not None:
                    thinking, text, calls = split.finish()  # calls cut short by max_tokens come as text
                    if thinking or text or calls:
                        yield _line(self._obj(text, None, calls, thinking))
                    yield _line(self._done(self._obj(""), r, tokens))
        finally:
            job.cancel()


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
