"""Interactive chat: the conversation (messages, context policy, transcripts) and the terminal loop."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from llmcli.engine import GenerationConfig, GenerationResponse, Session, encode_chat, next_turn_start
from llmcli.speculative import acceptance_line
from llmcli.thinking import Thinking, ThinkStream
from quant.errors import LlmError, PromptError

HELP = """\
Commands:
  /clear          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt
  /stats          context use and the speed of the last reply
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /help           this help
  /exit, /bye     leave (or Ctrl-D)
Multi-line input: start and end it with \"\"\", or end a line with \\ to continue it.
Ctrl-C stops a reply; Ctrl-D leaves."""


@dataclass
class Conversation:
    """The messages of a chat and the policy that keeps them within the context: the prompt leaves out the
    oldest turns, keeps the system prompt, and says so. Every turn stays in `turns` (and in /save)."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user/assistant messages, oldest first
    first: int = 0  # the oldest turn the prompt still holds

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns[self.first:]

    def clear(self) -> None:
        self.turns.clear()
        self.first = 0

    def fit(self, session: Session, reserve: int, options: dict | None = None) -> tuple[list[int], int]:
        """Prompt ids for the conversation leaving `reserve` positions for the reply; leaves the oldest turns
        out if needed. Returns (ids, number of messages left out now). A last message that cannot fit even
        alone is refused before anything is left out. `options`: more variables for the template."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        alone = encode_chat(session, head + self.turns[-1:], options)
        if len(alone) + reserve > session.n_ctx:
            raise PromptError(f"the message needs {len(alone)} tokens, and the context holds {session.n_ctx} "
                              f"with {reserve} kept for the reply (raise --ctx or shorten it)")
        dropped = 0
        while True:
            ids = encode_chat(session, self.messages(), options)
            if len(ids) + reserve <= session.n_ctx or self.first >= len(self.turns) - 1:
                return ids, dropped
            # leave out the oldest exchange: a user message and the reply that follows it
            rest = self.turns[self.first:]
            n = 2 if len(rest) > 2 and rest[1]["role"] == "assistant" else 1
            self.first += n
            dropped += n

    def to_json(self) -> str:
        return json.dumps({"system": self.system, "messages": self.turns}, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        try:
            data = json.loads(text)
            turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in data["messages"]]
            system = data.get("system")
        except (ValueError, KeyError, TypeError) as e:
            raise LlmError(f"not a chat transcript: {e}") from None
        if turns and turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
        return cls(system=system, turns=turns)


def _messages(n: int) -> str:
    return f"{n} message{'' if n == 1 else 's'}"


def read_input(console: Console, prompts: bool = True) -> str | None:
    """One user message; None at end of input (Ctrl-D). Without `prompts` (input from a pipe) no `>>> `
    is written: the output is only the replies."""
    first, more = ("[bold green]>>> [/]", "[dim]... [/]") if prompts else ("", "")
    try:
        line = console.input(first)
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].endswith('"""'):
            try:
                lines.append(console.input(more))
            except EOFError:
                break
        lines[-1] = lines[-1].removesuffix('"""')
        return "\n".join(lines).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(console.input(more))
        except EOFError:
            break
    return "\n".join(lines)


class ChatLoop:
    """The REPL: reads messages and slash commands, streams replies."""

    def __init__(self, session: Session, config: GenerationConfig, console: Console, err: Console,
                 system: str | None = None, context_shift: bool = False, options: dict | None = None,
                 reasoning: Thinking | None = None):
        """context_shift: when old turns are dropped, shift the KV cache past them (Session.shift_for) rather
        than recompute the turns that stay. options: more variables for the template; reasoning: how a thinking
        model's reasoning is told from its answer (shown dimmed)."""
        self.session, self.config, self.console, self.err = session, config, console, err
        self.context_shift, self.options, self.reasoning = context_shift, options, reasoning
        self.conv = Conversation(system=system)
        self.last: GenerationResponse | None = None
        self.interactive = sys.stdin.isatty()
        self._ahead: threading.Thread | None = None  # prefilling the next turn's start while the user types

    def reserve(self) -> int:
        """Positions kept free for a reply: max tokens, but never more than half the context."""
        return min(self.config.max_tokens, self.session.n_ctx // 2)

    def run_ahead(self) -> None:
        """After a reply, prefill the turn's end and the next user header (Session.run_ahead) on a thread of its
        own while the user reads and types: the next message then prefills only what they wrote."""
        try:
            tokens = next_turn_start(lambda m: encode_chat(self.session, m, self.options), self.conv.messages())
        except LlmError:  # the next message will say why the template fails
            return
        self._ahead = threading.Thread(target=self.session.run_ahead, args=(tokens,), name="llm-run-ahead",
                                       daemon=True)
        self._ahead.start()

    def settle(self) -> None:
        """Wait for the run ahead: the session is the main thread's again. It is a few tokens long, so a Ctrl-C
        meanwhile waits for it too (leaving the chat would be more than the user asked)."""
        while self._ahead is not None:
            try:
                self._ahead.join()
                self._ahead = None
            except KeyboardInterrupt:
                continue

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        self.settle()
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False, highlight=False)
        elif name == "/clear":
            self.conv.clear()
            self.session.reset()  # the cache held the old conversation: /stats counts from zero again
            self.last = None
            self.err.print("[dim]conversation cleared[/]")
        elif name == "/system":
            self.conv.system = arg or None
            self.err.print("[dim]system prompt " + ("set" if arg else "removed") + "[/]")
        elif name == "/stats":
            self.stats()
        elif name in ("/save", "/load"):
            if not arg:
                self.err.print(f"[red]usage: {name} FILE[/]")
            elif name == "/save":
                self.save(Path(arg))
            else:
                self.load(Path(arg))
        else:
            self.err.print(f"[red]unknown command {name}[/] (try /help)")
        return True

    def save(self, path: Path) -> None:
        from quant.files import write_atomic

        try:
            write_atomic(path, self.conv.to_json().encode())
        except OSError as e:
            self.err.print(f"[red]cannot write {path}: {e.strerror or e}[/]")
            return
        self.err.print(f"[dim]saved {_messages(len(self.conv.turns))} to {path}[/]")

    def load(self, path: Path) -> None:
        try:
            # bytes that are not UTF-8 become U+FFFD rather than ending the chat
            self.conv = Conversation.from_json(path.read_bytes().decode("utf-8", errors="replace"))
        except OSError as e:
            self.err.print(f"[red]cannot read {path}: {e.strerror or e}[/]")
            return
        except LlmError as e:
            self.err.print(f"[red]{path}: {e}[/]")
            return
        self.err.print(f"[dim]loaded {_messages(len(self.conv.turns))} from {path}[/]")

    def stats(self) -> None:
        s = self.session
        self.err.print(f"context: {len(s.tokens)} / {s.n_ctx} tokens, {_messages(len(self.conv.turns))}")
        if self.last:
            r = self.last
            self.err.print(f"last reply: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s; prompt: "
                           f"{r.prompt_tokens} tokens ({r.prefilled_tokens} new, {r.prompt_tps:.1f} tok/s), "
                           f"TTFT {r.ttft_s * 1000:.0f} ms; finish: {r.finish_reason}")
            if s.drafter is not None:
                self.err.print(acceptance_line(r.draft_tokens, r.accepted_tokens))

    def reply(self, text: str) -> None:
        self.settle()
        self.conv.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = self.conv.fit(self.session, self.reserve(), self.options)
        except LlmError as e:  # too long, or the template failed: the message is refused, the history kept
            self.conv.turns.pop()
            self.err.print(str(e), style="red", markup=False)
            return
        if dropped and self.context_shift:
            shifted = self.session.shift_for(ids)
            how = (f"shifted the cache by {shifted} tokens" if shifted
                   else "recomputing the rest (this cache cannot be shifted)")
            self.err.print(f"[yellow]context shift: dropped the {dropped} oldest messages (the system prompt is "
                           f"kept; /save keeps them all); {how}[/]")
        elif dropped:
            self.err.print(f"[yellow]context nearly full: dropped the {dropped} oldest messages from the prompt "
                           f"(the system prompt is kept; /save keeps them all)[/]")
        pieces, interrupted = [], False
        split = ThinkStream(self.reasoning) if self.reasoning is not None else None
        try:
            for r in self.session.generate(ids, self.config):
                if r.text:
                    pieces.append(r.text)
                    self.show(*(split.feed(r.text) if split is not None else ("", r.text)))
                if r.finish_reason:
                    self.last = r
                    interrupted = r.finish_reason == "interrupted"
        except KeyboardInterrupt:  # arrived while printing, outside the generator
            interrupted = True
        except LlmError as e:  # the model failed mid-reply (non-finite logits): say so, keep the conversation
            self.console.print()
            self.err.print(str(e), style="red", markup=False)
            self.conv.turns.pop()
            self.session.reset()
            return
        if split is not None:
            self.show(*split.finish())
        self.console.print()
        if interrupted:
            self.err.print("[dim](reply stopped)[/]")
        self.conv.turns.append({"role": "assistant", "content": "".join(pieces)})
        self.run_ahead()

    def show(self, reasoning: str, text: str) -> None:
        """A piece of the reply: its reasoning dimmed, its answer as it is."""
        if reasoning:
            self.console.print(reasoning, end="", style="dim italic", markup=False, highlight=False, soft_wrap=True)
        if text:
            self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def run(self) -> None:
        self.err.print("[dim]Type a message, /help for commands, Ctrl-D to leave.[/]")
        while True:
            try:
                text = read_input(self.console, prompts=self.interactive)
            except KeyboardInterrupt:
                self.console.print()
                self.err.print("[dim](use /exit or Ctrl-D to leave)[/]")
                continue
            if text is None:
                self.console.print()
                self.settle()
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.reply(text)
