"""Replies of models that think first (Qwen3, QwQ, DeepSeek-R1's distillations): the reasoning in <think> ...
</think>, then the answer. The server gives the reasoning apart from the answer, as llama.cpp's and vLLM's servers
do (OpenAI's `reasoning_content`) and as ollama does (`thinking`).

Whether a model thinks is read off its chat template: it writes <think> blocks, and its prompt may already open
one (then the reply begins inside it). Templates that take `enable_thinking` (Qwen3's) can turn thinking off.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from llmcli.tools import CallStream, ToolChoice, tail_overlap
from quant.errors import LlmError


@dataclass(frozen=True)
class Thinking:
    """How a model's template thinks: `opened`, its prompt for a reply ends inside a <think> block already. The
    grammars (llmcli/json_schema.py) read the tags from here too."""

    opened: bool
    open: ClassVar[str] = "<think>"
    close: ClassVar[str] = "</think>"


@lru_cache(maxsize=8)
def thinking(template) -> Thinking | None:
    """Whether replies through `template` (a ChatTemplate) begin with reasoning; None for a model that does not
    think (its template writes no </think>)."""
    if Thinking.close not in template.source:
        return None
    try:
        prompt = template.render([{"role": "user", "content": "probe"}], add_generation_prompt=True)
    except LlmError:
        return None
    return Thinking(opened=prompt.rstrip().endswith(Thinking.open))


class ThinkStream:
    """A reply split as it streams into its reasoning and its answer; the tags themselves are neither. A piece
    that could be the start of a tag is held until the next one tells."""

    def __init__(self, think: Thinking):
        self.state = "inside" if think.opened else "start"  # start -> inside -> answer
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """The next piece -> (reasoning, answer) to send now."""
        text, self.held = self.held + text, ""
        reasoning = answer = ""
        if self.state == "start":
            lead = text.lstrip()
            if lead.startswith(Thinking.open):
                self.state, text = "inside", lead[len(Thinking.open):]
            elif Thinking.open.startswith(lead):  # blanks, or part of the tag: not known yet
                self.held = text
                return "", ""
            else:
                self.state = "answer"
        if self.state == "inside":
            at = text.find(Thinking.close)
            if at < 0:
                keep = tail_overlap(text, Thinking.close)
                self.held = text[len(text) - keep:]
                return text[:len(text) - keep], ""
            reasoning, text = text[:at], text[at + len(Thinking.close):].lstrip("\n")
            self.state = "answer" if text else "after"
            if not text:
                return reasoning, ""
        if self.state == "after":  # the blank lines after </think> are not the answer's
            text = text.lstrip("\n")
            if not text:
                return reasoning, ""
            self.state = "answer"
        answer = text
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """At the end: what was held, as reasoning or answer."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "inside" else ("", held)


class ReplyStream:
    """A reply, as it streams, split into its reasoning (where the model thinks), its text and its tool calls."""

    def __init__(self, think: Thinking | None, tools: ToolChoice | None):
        self.think = ThinkStream(think) if think is not None else None
        self.calls = CallStream(tools)

    def feed(self, text: str) -> tuple[str, str]:
        """The next piece -> (reasoning, text) to send now."""
        reasoning, answer = self.think.feed(text) if self.think is not None else ("", text)
        return reasoning, self.calls.feed(answer) if answer else ""

    @property
    def in_call(self) -> bool:
        return self.calls.call is not None

    def finish(self) -> tuple[str, str, list[tuple[str, str]] | None]:
        """At the end: (reasoning, text still to send, the calls or None)."""
        reasoning, answer = self.think.finish() if self.think is not None else ("", "")
        text = self.calls.feed(answer) if answer else ""
        rest, calls = self.calls.finish()
        return reasoning, text + rest, calls

    def whole(self, text: str) -> tuple[str, str, list[tuple[str, str]] | None]:
        """A whole reply -> (reasoning, text, calls)."""
        reasoning, answer = self.feed(text)
        more, rest, calls = self.finish()
        return reasoning + more, answer + rest, calls


def think_options(think: Thinking | None, wanted: bool | None) -> tuple[dict, Thinking | None]:
    """A request's wish (True, False or None: the model's own way) -> (the template's options, how its reasoning
    is told from its answer or None). LlmError where thinking is asked of a model that does not think."""
    if wanted and think is None:
        raise LlmError("this model does not think: its chat template writes no reasoning")
    if wanted is False:
        return {"enable_thinking": False}, None
    return {}, think
