"""`llm serve`'s Anthropic Messages API (/v1/messages and /v1/messages/count_tokens), for the tools written against
Anthropic's API (its `anthropic` clients, coding agents pointed at ANTHROPIC_BASE_URL).

A request's `system` and `messages` (text, tool_use and tool_result blocks) become a chat request that runs on
the same scheduler, grammars and checks as /v1/chat/completions (server.py); the reply comes back as content
blocks (thinking, text, tool_use), whole or as the API's stream of events. Errors are Anthropic's error body; the
API key may come as `x-api-key`, as its clients send it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmcli.engine import GenerationResponse
from llmcli.server import Api, ApiError, _bool, _guard, _records_or_error, _tool_choice, list_field, reply_with
from llmcli.thinking import ReplyStream
from llmcli.tools import ToolChoice

TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's -> chat completions'
THINKING = ("enabled", "adaptive", "between_tools", "disabled")  # all but "disabled" leave a model's reasoning on
UNSUPPORTED_BLOCKS = ("image", "document", "search_result", "server_tool_use", "web_search_tool_result")


def _text_of(content, where: str) -> str:
    """A text, or text blocks, as one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(
            b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise ApiError(400, f"{where}: must be a string or a list of text blocks (only text is supported)", where)


def _messages(body: dict) -> list[dict]:
    """`system` and `messages` as chat messages: a user turn's tool_result blocks become tool messages (before its
    text), an assistant turn's tool_use blocks its tool_calls; thinking blocks clients send back are left out, as
    chat clients leave out reasoning."""
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: must be user or assistant", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: must be a string or a list of content blocks", f"{where}.content")
        texts, calls, results = [], [], []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise ApiError(400, f"{at}: a tool_use block needs an id and a name (strings)", at)
                calls.append({"id": block["id"], "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
            elif kind == "tool_result" and m["role"] == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise ApiError(400, f"{at}.tool_use_id: must be a string", f"{at}.tool_use_id")
                result = _text_of(block.get("content", ""), f"{at}.content")
                if block.get("is_error") is True:
                    result = f"Error: {result}"
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
            elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
                continue
            elif kind in UNSUPPORTED_BLOCKS:
                raise ApiError(400, f"{at}: {kind} blocks are not supported (only text, tool_use and tool_result)", at)
            else:
                raise ApiError(400, f"{at}: not a content block a {m['role']} turn can hold", at)
        out += results
        if texts or calls or not results:
            turn = {"role": m["role"], "content": "".join(texts) or (None if calls else "")}
            out.append(turn | ({"tool_calls": calls} if calls else {}))
    return out


def _tools(body: dict) -> list | None:
    """Custom tools, from Anthropic's shape to chat completions'."""
    tools = list_field(body, "tools", "tools: must be a list")
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
            raise ApiError(400, f"tools.{i}: only custom tools (a name and an input_schema) are supported", "tools")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                     "parameters": t.get("input_schema", {})}})
    return out


def chat_body(body: dict) -> dict:
    """A Messages API request as the chat completions request it asks for."""
    if body.get("max_tokens") is None:
        raise ApiError(400, "max_tokens: Field required", "max_tokens")
    out = {"messages": _messages(body), "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):  # older clients' (newer ones leave sampling to the server)
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        choice = body.get("tool_choice")
        if choice is not None:
            if not isinstance(choice, dict) or choice.get("type") not in (*TOOL_CHOICES, "tool"):
                raise ApiError(400, "tool_choice: must be {\"type\": auto, any, tool or none}", "tool_choice")
            out["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}}
                                  if choice["type"] == "tool" else TOOL_CHOICES[choice["type"]])
            if choice.get("disable_parallel_tool_use") is True:
                out["parallel_tool_calls"] = False
    config = body.get("output_config")
    if config is not None:  # its effort is the model's own business
        fmt = config.get("format") if isinstance(config, dict) else None
        if not isinstance(config, dict) or (fmt is not None and not (
                isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict))):
            raise ApiError(400, "output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}",
                           "output_config")
        if fmt is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return out


def _options(body: dict) -> dict:
    """The chat template's options: `thinking` disabled turns a thinking model's reasoning off."""
    thinking = body.get("thinking")
    if thinking is None:
        return {}
    if not isinstance(thinking, dict) or thinking.get("type") not in THINKING:
        raise ApiError(400, f"thinking: must be {{\"type\": {', '.join(THINKING)}}}", "thinking")
    return {"enable_thinking": False} if thinking["type"] == "disabled" else {}


class Messages:
    """/v1/messages over an Api (its scheduler, model, defaults and API key)."""

    def __init__(self, api: Api):
        self.api = api

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", _guard(self.create, "anthropic"), methods=["POST"]),
                Route("/v1/messages/count_tokens", _guard(self.count_tokens, "anthropic"), methods=["POST"])]

    async def count_tokens(self, request: Request) -> Response:
        body = await self.api._body(request)
        body.setdefault("max_tokens", 1)  # not part of this request
        chat = chat_body(body)
        prompt, _, _ = self.api.conversation(chat, _tool_choice(chat), _options(body))
        return JSONResponse({"input_tokens": len(prompt)})

    async def create(self, request: Request) -> Response:
        body = await self.api._body(request)
        job, wake, tools, think, prompt_tokens = await self.api.start_chat(chat_body(body), _options(body))
        return await reply_with(request, _bool(body, "stream"), _Reply(self.api, tools, think, prompt_tokens), job,
                                wake)


class _Reply:
    """One reply's objects: the message, its content blocks, and its stream's events."""

    def __init__(self, api: Api, tools: ToolChoice | None, think, prompt_tokens: int):
        self.api, self.tools, self.think, self.prompt_tokens = api, tools, think, prompt_tokens
        self.id = "msg_" + secrets.token_hex(12)

    def message(self, content: list[dict], usage: dict, last: GenerationResponse | None = None, calls=None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.api.model_id,
                "content": content, "stop_reason": _stop_reason(last, calls) if last else None,
                "stop_sequence": last.stop_sequence if last else None, "usage": usage}

    def usage(self, prefilled: int, output: int) -> dict:
        """Anthropic's counts: the prompt tokens run, and apart those a slot's cache held."""
        return {"input_tokens": prefilled, "cache_read_input_tokens": self.prompt_tokens - prefilled,
                "cache_creation_input_tokens": 0, "output_tokens": output}

    def tool_use(self, index: int, name: str, arguments: str) -> dict:
        return {"type": "tool_use", "id": self.tools.ids[index], "name": name, "input": json.loads(arguments)}

    def whole(self, records: list[GenerationResponse]) -> dict:
        last = records[-1]
        reasoning, text, calls = ReplyStream(self.think, self.tools).whole("".join(r.text for r in records))
        content = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
        if text or calls is None:
            content.append({"type": "text", "text": text})
        content += [self.tool_use(i, *c) for i, c in enumerate(calls or [])]
        return self.message(content, self.usage(last.prefilled_tokens, last.generation_tokens), last, calls)

    async def events(self, job, wake) -> AsyncIterator[str]:
        """The stream's events: the message's start, each block's start, deltas and stop, then the message's
        stop reason and usage. The job ends early if the client goes."""
        try:
            split = ReplyStream(self.think, self.tools)
            blocks = _Blocks()
            started = False
            async for r in _records_or_error(job, wake):
                if not started:  # once admitted, so that the usage it gives says what the cache held
                    prefilled = job.prefilled if job.prefilled is not None else self.prompt_tokens
                    yield _event("message_start", message=self.message([], self.usage(prefilled, 0)))
                    yield _event("ping")
                    started = True
                if isinstance(r, ApiError) or r.finish_reason == "interrupted":
                    message = r.message if isinstance(r, ApiError) else "the server is shutting down"
                    yield _event("error", error={"type": "overloaded_error" if not isinstance(r, ApiError)
                                                 else "invalid_request_error", "message": message})
                    return
                for e in blocks.text(*split.feed(r.text)):
                    yield e
                if r.finish_reason is None:
                    continue
                reasoning, text, calls = split.finish()  # calls cut short by max_tokens come as text
                out = blocks.text(reasoning, text)
                if calls is None and not blocks.said:  # a reply with no text is one empty text block
                    out += blocks.open("text")
                out += blocks.close()
                for i, c in enumerate(calls or []):
                    use = self.tool_use(i, *c)
                    out += blocks.open("tool_use", id=use["id"], name=use["name"], input={})
                    out.append(_event("content_block_delta", index=blocks.index, delta={
                        "type": "input_json_delta", "partial_json": c[1]}))
                    out += blocks.close()
                for e in out:
                    yield e
                yield _event("message_delta", delta={"stop_reason": _stop_reason(r, calls),
                                                     "stop_sequence": r.stop_sequence},
                             usage=self.usage(r.prefilled_tokens, r.generation_tokens))
                yield _event("message_stop")
        finally:
            job.cancel()


class _Blocks:
    """The events of a streamed reply's content blocks, in order: thinking and text while they come (each ends
    when the other begins, or at the end), then the tool calls."""

    def __init__(self):
        self.index, self.kind, self.said = -1, None, False  # the open block's index and kind (None: none open)

    def open(self, kind: str, **fields) -> list[str]:
        self.index, self.kind = self.index + 1, kind
        block = {"type": kind, **({"text": ""} if kind == "text" else {}),
                 **({"thinking": "", "signature": ""} if kind == "thinking" else {}), **fields}
        self.said |= kind == "text"
        return [_event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":  # the block's signature: none here (it proves nothing about a local model)
            out.append(_event("content_block_delta", index=self.index, delta={"type": "signature_delta",
                                                                               "signature": ""}))
        self.kind = None
        return out + [_event("content_block_stop", index=self.index)]

    def _delta(self, kind: str, text: str) -> list[str]:
        out = [] if self.kind == kind else self.close() + self.open(kind)
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta",
                                                                                        "text": text}
        return out + [_event("content_block_delta", index=self.index, delta=delta)]

    def text(self, reasoning: str, text: str) -> list[str]:
        return (self._delta("thinking", reasoning) if reasoning else []) + (
            self._delta("text", text) if text else [])


def _stop_reason(last: GenerationResponse, calls) -> str:
    if calls is not None:
        return "tool_use"
    if last.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if last.stop_sequence is not None else "end_turn"


def _event(kind: str, **fields) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"
