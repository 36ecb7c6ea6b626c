"""Chat templates: a conversation rendered into the prompt text a model was trained on.

Templates are Jinja2, run in a sandbox with what Hugging Face transformers gives them (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML, `trim_blocks` and `lstrip_blocks`), so a template renders here as it does in
`tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from quant.errors import LlmError
from quant.gguf_file import GGUFFile

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


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. Build with `ChatTemplate.from_gguf`."""

    def __init__(self, source: str, origin: str, is_fallback: bool = False,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.origin = origin  # "model", "file <path>" or "fallback (ChatML)"
        self.is_fallback = is_fallback
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template ({origin}) does not parse: line {e.lineno}: "
                                f"{' '.join((e.message or '').split())}") from None

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
            except (OSError, UnicodeDecodeError) as e:
                raise TemplateError(f"template file {override}: cannot read: {e}") from None
            return cls(source, f"file {override}", bos_token=bos_token, eos_token=eos_token)
        source = gguf.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, "model", bos_token=bos_token, eos_token=eos_token)
        if gguf.get("general.architecture") in BUILT_IN:
            origin, source = BUILT_IN[gguf.get("general.architecture")]
            return cls(source, origin, bos_token=bos_token, eos_token=eos_token)
        return cls(CHATML, "fallback (ChatML)", is_fallback=True, bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), ending with the assistant's
        turn opened when `add_generation_prompt`."""
        # transformers leaves a token the model lacks undefined
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        special = {name: value for name, value in tokens.items() if value is not None}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **special)
        except _RaisedByTemplate as e:
            raise TemplateError(f"chat template ({self.origin}): {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template ({self.origin}) failed: {_one_line(e)}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"chat template ({self.origin}) failed: {type(e).__name__}: "
                                f"{_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
