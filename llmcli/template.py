"""Chat templates: a conversation rendered into the prompt text a model was trained on.

Templates are Jinja2, run in a sandbox with what Hugging Face transformers gives them (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML, `trim_blocks` and `lstrip_blocks`), so a template renders here as it does in
`tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from quant.errors import LlmError
from quant.gguf_file import GGUFFile, safe_text

# Used when the model carries no template: the ChatML format of Qwen, SmolLM and many others.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's format, for its GGUF files that carry no template: `<start_of_turn>user|model`, the content trimmed,
# a system message folded into the first user turn, and roles that must alternate (as Google's template does).
GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
BUILT_IN = {"gemma3": ("built-in (Gemma)", GEMMA)}  # architecture -> template for files without one


class TemplateError(LlmError):
    """A chat template is missing, does not parse, or fails while rendering."""


class _RaisedByTemplate(Exception):
    """A template called raise_exception(message)."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part for training masks in
    transformers; rendering a prompt only needs the text inside."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# Limits on what a template (code from a file) may do in one render. Chat templates loop over a few messages
# and concatenate their text; these bounds are far above that and far below a hang or an exhausted process.
MAX_SOURCE_CHARS = 1 << 20
MAX_STEPS = 1_000_000  # loop iterations, calls and operators
MAX_SECONDS = 5.0
MAX_TEXT_CHARS = 1 << 22  # one string or list built by the template (plus 8x the messages' text)
MAX_INT_BITS = 4096
MAX_CALL_INT = 1 << 16  # an integer passed to a method or filter (a width, a count)
_HUGE_FORMAT_WIDTH = re.compile(r"\d{6,}")  # a width of a million characters or more in a format string


class _LimitExceeded(Exception):
    """A render went past one of the limits above."""


class _Limits:
    """One render's budget of steps, time and characters."""

    def __init__(self, text_chars: int):
        self.max_text = MAX_TEXT_CHARS + 8 * text_chars
        self.chars_left = 16 * self.max_text  # all the strings built, together
        self.steps_left = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise _LimitExceeded(f"more than {MAX_STEPS} steps (loops, calls, operators)")
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"rendering took more than {MAX_SECONDS:g} s")

    def text(self, n: int) -> None:
        """Charge a string or list of `n` items about to be built."""
        if n > self.max_text:
            raise _LimitExceeded(f"a string or list of {n} items (the limit is {self.max_text})")
        self.chars_left -= n
        if self.chars_left < 0:
            raise _LimitExceeded(f"built more than {16 * self.max_text} characters in all")


_limits: ContextVar[_Limits] = ContextVar("template_limits")


def _current() -> _Limits:
    limits = _limits.get(None)
    if limits is None:  # outside render (nothing calls the guards then, but stay bounded if something does)
        limits = _Limits(0)
        _limits.set(limits)
    return limits


def _sized(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_int_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CALL_INT:
            raise _LimitExceeded(f"an argument of {a} (the limit is {MAX_CALL_INT})")
        if isinstance(a, str) and _HUGE_FORMAT_WIDTH.search(a):
            raise _LimitExceeded("a format width of a million characters or more")


def _estimate(name: str, obj: Any, args: tuple, kwargs: dict) -> int:
    """The size of what a string method or filter is about to build, from its arguments (0: not sized here)."""
    if not isinstance(obj, str):
        return 0
    if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        return len(obj) + (len(obj) + 1) * len(args[1])
    if name == "join" and args and hasattr(args[0], "__len__"):
        return len(obj) * len(args[0])
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        return len(obj) + (obj.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width or 0))
    return 0


def _guard_filter(name: str, f):
    skip = 1 if getattr(f, "jinja_pass_arg", None) else 0  # a context or environment comes first

    def guarded(*args, **kwargs):
        limits = _current()
        limits.step()
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        _check_int_args((value, *rest) if name == "format" else rest, kwargs)
        if name == "join" and hasattr(value, "__len__") and rest and isinstance(rest[0], str):
            limits.text(len(value) * len(rest[0]))
        else:
            limits.text(_estimate(name, value, rest, kwargs))
        result = f(*args, **kwargs)
        n = _sized(result)
        if n is not None:
            limits.text(n)
        return result

    if skip:
        guarded.jinja_pass_arg = f.jinja_pass_arg  # jinja's pass_context / pass_environment marker
    return guarded


def _guarded_iter(iterable: Any):
    """Every for loop iterates through this (see _Sandbox._parse): each item costs a step."""
    limits = _current()
    for item in iterable:
        limits.step()
        yield item


_ITER_GUARD = "__llm_loop_guard"


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with every loop iteration, call and operator charged to the render's budget. The operators
    are intercepted at run time, so the compiler cannot fold `10 ** 100000000` while compiling."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name(_ITER_GUARD, "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limits = _current()
        limits.step()
        ints = all(isinstance(x, int) for x in (left, right))
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_INT_BITS:
                raise _LimitExceeded(f"{left} ** {right} is too large")
        elif operator == "*" and ints:
            if abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                raise _LimitExceeded("an integer product is too large")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if _sized(seq) is not None and isinstance(n, int):
                limits.text(_sized(seq) * max(n, 0))
        elif operator == "+" and _sized(left) is not None and _sized(right) is not None:
            limits.text(_sized(left) + _sized(right))
        elif operator == "%" and isinstance(left, str):
            _check_int_args(right if isinstance(right, tuple) else (right,), {})
            _check_int_args((left,), {})
        result = super().call_binop(context, operator, left, right)
        n = _sized(result)
        if n is not None:
            limits.text(n)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        limits = _current()
        limits.step()
        if __obj is not _guarded_iter:
            _check_int_args(args, kwargs)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
            if isinstance(owner, str):
                _check_int_args((owner,), {})
            limits.text(_estimate(getattr(__obj, "__name__", ""), owner, args, kwargs))
        result = super().call(__context, __obj, *args, **kwargs)
        n = _sized(result)
        if n is not None:
            limits.text(n)
        return result


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, optimized=False, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals[_ITER_GUARD] = _guarded_iter
    return env


# the names a template is given by `render` and by its environment: options may not set them
TEMPLATE_GIVES = frozenset({"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token",
                            "raise_exception", "strftime_now"})


class ChatTemplate:
    """A chat template, compiled on first use: a template that does not parse fails the renders, not the
    commands that never render (`--raw`, `show`, `tokenize`). Build with `ChatTemplate.from_gguf`."""

    def __init__(self, source: str, origin: str, is_fallback: bool = False,
                 bos_token: str | None = None, eos_token: str | None = None, tool_use: ChatTemplate | None = None):
        """tool_use: the model's second template for requests that offer tools (Hermes' GGUFs carry one as
        `tokenizer.chat_template.tool_use`), which transformers and llama.cpp render those with."""
        self.source = source
        self.origin = origin  # "model", "file <path>" or "fallback (ChatML)"
        self.is_fallback = is_fallback
        self.bos_token, self.eos_token = bos_token, eos_token
        self.tool_use = tool_use
        self._template: jinja2.Template | None = None

    def _fail(self, detail: str) -> TemplateError:
        return TemplateError(f"chat template failed: {safe_text(detail, 300)} (template: {safe_text(self.origin)})")

    def compile(self) -> jinja2.Template:
        """The compiled template; TemplateError when it does not parse."""
        if self._template is None:
            if len(self.source) > MAX_SOURCE_CHARS:
                raise self._fail(f"the template has {len(self.source)} characters (the limit is {MAX_SOURCE_CHARS})")
            try:
                self._template = _environment().from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise self._fail(f"does not parse: line {e.lineno}: {_one_line(e.message or '')}") from None
            except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError) as e:
                # nesting deep enough to exhaust the parser or Python's compiler
                raise self._fail(f"does not compile: {type(e).__name__}: {_one_line(e)}") from None
        return self._template

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, override: Path | None = None,
                  bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        """The template from `override` (a file) if given, else the model's `tokenizer.chat_template`, else
        the built-in one of its architecture (Gemma), else ChatML."""
        if override is not None:
            override = Path(override)
            try:
                source = override.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise TemplateError(f"template file {override}: no such file") from None
            except UnicodeDecodeError:
                raise TemplateError(f"template file {override}: not UTF-8 text") from None
            except OSError as e:
                raise TemplateError(f"template file {override}: cannot read: {e.strerror or e}") from None
            if not source.strip():
                raise TemplateError(f"template file {override} is empty")
            return cls(source, f"file {override}", bos_token=bos_token, eos_token=eos_token)
        source = gguf.get("tokenizer.chat_template")
        tools = gguf.get("tokenizer.chat_template.tool_use")
        tool_use = (cls(tools, "model (tool_use)", bos_token=bos_token, eos_token=eos_token)
                    if isinstance(tools, str) and tools.strip() else None)
        if isinstance(source, str) and source.strip():
            return cls(source, "model", bos_token=bos_token, eos_token=eos_token, tool_use=tool_use)
        if gguf.get("general.architecture") in BUILT_IN:
            origin, source = BUILT_IN[gguf.get("general.architecture")]
            return cls(source, origin, bos_token=bos_token, eos_token=eos_token)
        return cls(CHATML, "fallback (ChatML)", is_fallback=True, bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               options: dict | None = None) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts; an assistant's may carry `tool_calls`, and a
        `tool` message a result), ending with the assistant's turn opened when `add_generation_prompt`. `tools`:
        the functions the model may call, as OpenAI and transformers give them; `options`: more variables for the
        template (`enable_thinking`: False, say). Every failure is one TemplateError."""
        if tools and self.tool_use is not None:
            return self.tool_use.render(messages, add_generation_prompt, tools, options)
        template = self.compile()
        # transformers leaves a token the model lacks undefined
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        special = {name: value for name, value in tokens.items() if value is not None}
        text_chars = sum(len(str(m.get("content", ""))) + len(str(m.get("tool_calls") or "")) for m in messages)
        text_chars += len(str(tools or ""))
        limits = _Limits(text_chars)
        token = _limits.set(limits)
        try:
            out, n = [], 0
            for chunk in template.generate(**(options or {}), messages=messages,
                                           add_generation_prompt=add_generation_prompt, tools=tools, documents=None,
                                           **special):
                n += len(chunk)
                if n > limits.max_text:
                    raise _LimitExceeded(f"the prompt grew past {limits.max_text} characters")
                out.append(chunk)
            return "".join(out)
        except _RaisedByTemplate as e:
            raise self._fail(_one_line(e)) from None
        except _LimitExceeded as e:
            raise self._fail(f"over a limit: {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise self._fail(_one_line(e)) from None
        except Exception as e:  # noqa: BLE001 - a template is code from a file: whatever it raises is its failure
            raise self._fail(f"{type(e).__name__}: {_one_line(e)}") from None
        finally:
            _limits.reset(token)


def _one_line(error: Exception | str) -> str:
    return " ".join(str(error).split())
