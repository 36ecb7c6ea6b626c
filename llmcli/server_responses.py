"""`llm serve`'s OpenAI Responses API (/v1/responses), which newer OpenAI clients and agent frameworks call instead
of chat completions.

A request's `instructions` and `input` items (messages, function calls and their outputs) become a chat request
that runs on the same scheduler, grammars and checks as /v1/chat/completions (server.py); the reply comes back as
output items (reasoning, a message, function calls), whole or as the API's stream of typed events. The server
keeps its newest responses in memory (`store`, true by default, as OpenAI's): a request may go on from one
(`previous_response_id`: its input and output come before the new input, its instructions do not), and a client
may read or delete one; they are gone with the server.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmcli.engine import GenerationResponse
from llmcli.server import Api, ApiError, _bool, _guard, _records_or_error, list_field, reply_with
from llmcli.thinking import ReplyStream
from llmcli.tools import ToolChoice

MAX_STORED, MAX_STORED_BYTES = 1000, 64 << 20  # responses kept, and their JSON at most: the newest
KEPT = f"llm serve keeps its newest {MAX_STORED} responses, in memory, while it runs"
# Fields that ask for what this server does not do, and why; fields not named here nor read are ignored, as
# OpenAI's own optional ones (metadata, user, service_tier, truncation, ...).
REFUSED = {
    "conversation": "conversations are not supported: use 'previous_response_id', or send the whole conversation",
    "prompt": "stored prompts are not supported: send 'instructions' and 'input'",
    "background": "background responses are not supported",
}
TEXT_PARTS = ("input_text", "output_text", "text")
# chat requests' fields, as this API names them
AS_CHAT = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def _named_as_ours(e: ApiError) -> None:
    """A chat request's error, its field (and its message's mention of it) named as this request names it."""
    for chat, ours in AS_CHAT.items():
        if e.param is not None and (e.param == chat or e.param.startswith((chat + ".", chat + "["))):
            e.message, e.param = e.message.replace(f"'{chat}", f"'{ours}", 1), ours
            return


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _text(content, where: str) -> str:
    """A message's or a function output's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(
                    part.get("text"), str):
                raise ApiError(400, f"'{where}[{j}]' must be a text part ({', '.join(TEXT_PARTS)}): only text is "
                                    "supported", where, "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", where, "invalid_type")


def input_items(body: dict) -> list:
    """The request's `input` as a list of items (a text is one user message)."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", "input", "invalid_value")
    return given


def _messages(instructions, items: list, earlier: int = 0) -> list[dict]:
    """`instructions` and input items as chat messages: a run of function calls becomes one assistant turn with
    tool_calls (joined to the assistant message just before it), each output a tool message; reasoning items
    clients send back are left out, as chat clients leave out reasoning. The first `earlier` items come from
    stored responses (an error names the request's own items)."""
    out: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "'instructions' must be a string", "instructions", "invalid_type")
        out.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        where = f"input[{i - earlier}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"'{where}.role' must be user, system, developer or assistant", f"{where}.role",
                               "invalid_value")
            out.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise ApiError(400, f"'{where}.{key}' must be a string", f"{where}.{key}", "invalid_type")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"'{where}.call_id' must be a string", f"{where}.call_id", "invalid_type")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(item.get("output"), f"{where}.output")})
        elif kind != "reasoning":
            raise ApiError(400, f"'{where}.type' {kind!r} is not supported: messages, function_call and "
                                "function_call_output items are", f"{where}.type", "invalid_value")
    return out


def _tools(body: dict) -> list | None:
    """Function tools, from the Responses API's flat shape to chat completions'."""
    tools = list_field(body, "tools", "'tools' must be a list")
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise ApiError(400, f"'tools[{i}]': only function tools are supported, not {kind!r}", f"tools[{i}]",
                           "invalid_value")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}})
    return out


def _tool_choice_of(choice):
    """tool_choice in chat completions' shape ({"type": "function", "name"} names the function directly here)."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text) -> dict | None:
    """`text.format` as chat completions' response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ApiError(400, "'text' must be an object", "text", "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ApiError(400, "'text.format' must be an object", "text.format", "invalid_type")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise ApiError(400, "'text.format' of type json_schema must have a 'name' (a string) and a 'schema' "
                                "(an object)", "text.format", "invalid_value")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def _reasoning_options(reasoning) -> dict:
    """The chat template's options for `reasoning`: effort "none" turns a thinking model's reasoning off (where
    its template can, as Qwen3's enable_thinking); the other efforts leave it on."""
    if reasoning is None:
        return {}
    if not isinstance(reasoning, dict):
        raise ApiError(400, "'reasoning' must be an object", "reasoning", "invalid_type")
    return {"enable_thinking": False} if reasoning.get("effort") == "none" else {}


def _store(body: dict) -> bool:
    """Whether the response is kept: `store`, true unless the request says false (as OpenAI's)."""
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise ApiError(400, "'store' must be a boolean", "store", "invalid_type")
    return store


def chat_body(body: dict, earlier: list | None = None) -> dict:
    """A Responses API request as the chat completions request it asks for; `earlier`: the items of the stored
    responses it goes on from (previous_response_id), oldest first."""
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False):
            raise ApiError(400, f"'{name}' is not supported: {why}", name, "unsupported_parameter")
    earlier = earlier or []
    out = {"messages": _messages(body.get("instructions"), earlier + input_items(body), len(earlier))}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "max_tokens"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        if body.get(ours) is not None:
            out[theirs] = body[ours]
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        if body.get("tool_choice") is not None:
            out["tool_choice"] = _tool_choice_of(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    return out


def _as_item(item: dict) -> dict:
    """An input item as OpenAI lists it: a message with a type, its text as a part."""
    if item.get("type", "message") != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": part, "text": content}]
    return {"type": "message"} | item | {"content": content}


class Stored:
    """The newest responses (MAX_STORED, MAX_STORED_BYTES of JSON), each with the items that led to it and its
    output items, and the response it went on from. Only the event loop's thread reads and writes them."""

    def __init__(self):
        self.kept: OrderedDict[str, tuple[str | None, list, dict, int]] = OrderedDict()  # previous, items, ...
        self.size = 0

    def put(self, response: dict, previous: str | None, items: list) -> None:
        size = len(json.dumps(items)) + len(json.dumps(response))  # the output is the response's
        self.kept[response["id"]] = (previous, items + response["output"], response, size)
        self.size += size
        while len(self.kept) > MAX_STORED or (self.size > MAX_STORED_BYTES and len(self.kept) > 1):
            self.size -= self.kept.popitem(last=False)[1][3]

    def get(self, response_id: str) -> tuple[str | None, list, dict, int]:
        if response_id not in self.kept:
            raise ApiError(404, f"No response with id '{response_id}' is stored ({KEPT})", None, "not_found")
        return self.kept[response_id]

    def delete(self, response_id: str) -> None:
        self.size -= self.get(response_id)[3]
        del self.kept[response_id]

    def history(self, response_id) -> list:
        """The items of the conversation up to and including response `response_id`'s output, oldest first."""
        if not isinstance(response_id, str):
            raise ApiError(400, "'previous_response_id' must be a string", "previous_response_id", "invalid_type")
        chain, seen = [], set()
        while response_id is not None and response_id not in seen:
            seen.add(response_id)
            if response_id not in self.kept:
                raise ApiError(400, f"Previous response with id '{response_id}' not found ({KEPT})",
                               "previous_response_id", "previous_response_not_found")
            response_id, items, _, _ = self.kept[response_id]
            chain.append(items)
        return [item for items in reversed(chain) for item in items]


class Responses:
    """/v1/responses over an Api (its scheduler, model, defaults and API key), and the responses it keeps."""

    def __init__(self, api: Api):
        self.api, self.stored = api, Stored()

    def routes(self) -> list[Route]:
        return [Route("/v1/responses", _guard(self.create), methods=["POST"]),
                Route("/v1/responses/{id}", _guard(self.one), methods=["GET", "DELETE"]),
                Route("/v1/responses/{id}/input_items", _guard(self.input_items), methods=["GET"])]

    async def one(self, request: Request) -> Response:
        self.api._authorize(request)
        response_id = request.path_params["id"]
        if request.method == "DELETE":
            self.stored.delete(response_id)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        return JSONResponse(self.stored.get(response_id)[2])

    async def input_items(self, request: Request) -> Response:
        """The items that led to a stored response, newest first (as OpenAI lists them), each with an id."""
        self.api._authorize(request)
        response_id = request.path_params["id"]
        previous, items, response, _ = self.stored.get(response_id)
        given = items[:len(items) - len(response["output"])]
        earlier = self.stored.history(previous) if previous is not None else []
        data = [{"id": f"item_{i}"} | _as_item(item) for i, item in enumerate(earlier + given)][::-1]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})

    async def create(self, request: Request) -> Response:
        body = await self.api._body(request)
        options, store = _reasoning_options(body.get("reasoning")), _store(body)
        previous = body.get("previous_response_id")
        earlier = self.stored.history(previous) if previous is not None else []
        try:  # the chat request's checks, their errors named by this request's fields
            job, wake, tools, think, _ = await self.api.start_chat(chat_body(body, earlier), options)
        except ApiError as e:
            _named_as_ours(e)
            raise
        keep = None
        if store:
            keep = lambda response: self.stored.put(response, previous, input_items(body))  # noqa: E731
        return await reply_with(request, _bool(body, "stream"), _Reply(self.api, body, tools, think, keep), job,
                                wake)


class _Reply:
    """One response's objects: the response itself, its output items, and its stream's events."""

    def __init__(self, api: Api, body: dict, tools: ToolChoice | None, think, keep=None):
        """keep: given the finished response, to store it (None: not stored)."""
        self.api, self.body, self.tools, self.think, self.keep = api, body, tools, think, keep
        self.id, self.created = _new_id("resp"), int(time.time())
        self.message_id, self.reasoning_id = _new_id("msg"), _new_id("rs")
        self.sequence = 0

    def response(self, status: str, output: list[dict], last: GenerationResponse | None = None) -> dict:
        b = self.body
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "model": self.api.model_id, "output": output, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
               "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
               "temperature": b.get("temperature"), "top_p": b.get("top_p"), "tools": b.get("tools") or [],
               "tool_choice": b.get("tool_choice") or "auto", "parallel_tool_calls": b.get("parallel_tool_calls", True),
               "previous_response_id": b.get("previous_response_id"), "reasoning": None,
               "store": self.keep is not None, "truncation": "disabled",
               "text": b.get("text") or {"format": {"type": "text"}}, "metadata": b.get("metadata") or {},
               "usage": None}
        if last is not None:
            cached = last.prompt_tokens - last.prefilled_tokens
            out["usage"] = {"input_tokens": last.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                            "output_tokens": last.generation_tokens,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": last.prompt_tokens + last.generation_tokens}
        return out

    def reasoning_item(self, text: str | None) -> dict:
        """The reasoning item; None: open, its text still to come."""
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [],
                "status": "in_progress" if text is None else "completed",
                "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}

    def message_item(self, text: str | None, status: str = "completed") -> dict:
        """The message item; None: open, its text still to come."""
        return {"type": "message", "id": self.message_id, "status": "in_progress" if text is None else status,
                "role": "assistant", "content": [] if text is None else [self.part(text)]}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def call_item(self, index: int, name: str, arguments: str) -> dict:
        made = self.tools.ids[index]  # Api.conversation gave the request its ids
        return {"type": "function_call", "id": "fc_" + made.removeprefix("call_"), "call_id": made, "name": name,
                "arguments": arguments, "status": "completed"}

    def output(self, reasoning: str, text: str, calls, status: str) -> list[dict]:
        items = [self.reasoning_item(reasoning)] if reasoning else []
        if text or calls is None:
            items.append(self.message_item(text, status))
        return items + [self.call_item(i, *c) for i, c in enumerate(calls or [])]

    def whole(self, records: list[GenerationResponse]) -> dict:
        last = records[-1]
        reasoning, text, calls = ReplyStream(self.think, self.tools).whole("".join(r.text for r in records))
        status = "incomplete" if last.finish_reason == "length" and calls is None else "completed"
        return self.finished(self.response(status, self.output(reasoning, text, calls, status), last))

    def finished(self, response: dict) -> dict:
        if self.keep is not None:
            self.keep(response)
        return response

    def _event(self, kind: str, **fields) -> str:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, job, wake) -> AsyncIterator[str]:
        """The typed events of a streamed response: each output item as it opens, its text as it comes (function
        calls whole, once complete), its end, then the response whole. The job ends early if the client goes."""
        try:
            yield self._event("response.created", response=self.response("in_progress", []))
            yield self._event("response.in_progress", response=self.response("in_progress", []))
            split = ReplyStream(self.think, self.tools)
            stream = _ItemStream(self)
            async for r in _records_or_error(job, wake):
                if isinstance(r, ApiError) or r.finish_reason == "interrupted":
                    message = r.message if isinstance(r, ApiError) else "the server is shutting down"
                    yield self._event("error", code=getattr(r, "code", None) or "server_error", message=message,
                                      param=getattr(r, "param", None))
                    return
                for e in stream.text(*split.feed(r.text)):
                    yield e
                if r.finish_reason is None:
                    continue
                reasoning, text, calls = split.finish()  # calls cut short by max_tokens come as text
                status = "incomplete" if r.finish_reason == "length" and calls is None else "completed"
                for e in stream.text(reasoning, text) + stream.end(calls, status):
                    yield e
                yield self._event(f"response.{status}", response=self.finished(self.response(status, stream.items, r)))
        finally:
            job.cancel()


class _ItemStream:
    """The events of a streamed response's output items, in order: a reasoning item and a message item while their
    text comes (each ends when the other begins, or at the end), then the function calls."""

    def __init__(self, reply: _Reply):
        self.reply, self.items = reply, []  # the items opened so far; each replaced by its whole once it ends
        self.texts: list[str] = []  # the open item's text so far
        self.status = "completed"  # the message's, once the reply ends ("incomplete": cut by max_output_tokens)

    def _open(self, item: dict) -> list[str]:
        self.items.append(item)
        self.texts = []
        out = [self.reply._event("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        if item["type"] == "message":
            out.append(self.reply._event("response.content_part.added", item_id=item["id"],
                                         output_index=len(self.items) - 1, content_index=0, part=self.reply.part("")))
        return out

    def _close(self) -> list[str]:
        """The open reasoning or message item's end, if one is open."""
        if not self.items or self.items[-1]["status"] != "in_progress":
            return []
        r, index, whole = self.reply, len(self.items) - 1, "".join(self.texts)
        item_id = self.items[-1]["id"]
        if self.items[-1]["type"] == "reasoning":
            self.items[-1] = r.reasoning_item(whole)
            done = [r._event("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0,
                             text=whole)]
        else:
            self.items[-1] = r.message_item(whole, self.status)
            done = [r._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                             text=whole, logprobs=[]),
                    r._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                             part=self.items[-1]["content"][0])]
        return done + [r._event("response.output_item.done", output_index=index, item=self.items[-1])]

    def _delta(self, kind: str, text: str) -> list[str]:
        r, out = self.reply, []
        if not self.items or self.items[-1]["type"] != kind or self.items[-1]["status"] != "in_progress":
            out += self._close() + self._open(r.reasoning_item(None) if kind == "reasoning" else r.message_item(None))
        self.texts.append(text)
        event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [r._event(event, item_id=self.items[-1]["id"], output_index=len(self.items) - 1,
                               content_index=0, delta=text, **extra)]

    def text(self, reasoning: str, text: str) -> list[str]:
        return (self._delta("reasoning", reasoning) if reasoning else []) + (
            self._delta("message", text) if text else [])

    def end(self, calls, status: str) -> list[str]:
        """The open item's end (a message that is the whole reply, even an empty one), then the calls whole."""
        self.status, r = status, self.reply
        out = []
        if calls is None and not any(item["type"] == "message" for item in self.items):
            out += self._close() + self._open(r.message_item(None))
        out += self._close()
        for i, c in enumerate(calls or []):
            item = r.call_item(i, *c)
            out += self._open(item | {"arguments": "", "status": "in_progress"})
            index = len(self.items) - 1
            out += [r._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                             delta=item["arguments"]),
                    r._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             name=item["name"], arguments=item["arguments"])]
            self.items[-1] = item
            out.append(r._event("response.output_item.done", output_index=index, item=item))
        return out
