"""Interactive chat: the conversation (messages, context policy, transcripts) and the terminal loop."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from llmcli.engine import GenerationConfig, GenerationResponse, Session, encode_chat
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
    """The messages of a chat and the policy that keeps them within the context: drop the oldest turns,
    keep the system prompt, and say so."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user/assistant messages, oldest first

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def fit(self, session: Session, reserve: int) -> tuple[list[int], int]:
        """Prompt ids for the conversation leaving `reserve` positions for the reply; drops the oldest
        turns if needed. Returns (ids, number of messages dropped)."""
        dropped = 0
        while True:
            ids = encode_chat(session, self.messages())
            if len(ids) + reserve <= session.n_ctx:
                return ids, dropped
            if len(self.turns) <= 1:
                raise PromptError(f"the message needs {len(ids)} tokens, and the context holds {session.n_ctx} "
                                  f"with {reserve} kept for the reply (raise --ctx or shorten it)")
            # drop the oldest exchange: a user message and the reply that follows it
            n = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:n]
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


def read_input(console: Console) -> str | None:
    """One user message; None at end of input (Ctrl-D)."""
    try:
        line = console.input("[bold green]>>> [/]")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].endswith('"""'):
            try:
                lines.append(console.input("[dim]... [/]"))
            except EOFError:
                break
        lines[-1] = lines[-1].removesuffix('"""')
        return "\n".join(lines).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(console.input("[dim]... [/]"))
        except EOFError:
            break
    return "\n".join(lines)


class ChatLoop:
    """The REPL: reads messages and slash commands, streams replies."""

    def __init__(self, session: Session, config: GenerationConfig, console: Console, err: Console,
                 system: str | None = None):
        self.session, self.config, self.console, self.err = session, config, console, err
        self.conv = Conversation(system=system)
        self.last: GenerationResponse | None = None

    def reserve(self) -> int:
        """Positions kept free for a reply: max tokens, but never more than half the context."""
        return min(self.config.max_tokens, self.session.n_ctx // 2)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False, highlight=False)
        elif name == "/clear":
            self.conv.turns.clear()
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
        from llmcli.store import write_atomic

        try:
            write_atomic(path, self.conv.to_json().encode())
        except OSError as e:
            self.err.print(f"[red]cannot write {path}: {e.strerror or e}[/]")
            return
        self.err.print(f"[dim]saved {len(self.conv.turns)} messages to {path}[/]")

    def load(self, path: Path) -> None:
        try:
            self.conv = Conversation.from_json(path.read_text())
        except OSError as e:
            self.err.print(f"[red]cannot read {path}: {e.strerror or e}[/]")
            return
        except LlmError as e:
            self.err.print(f"[red]{path}: {e}[/]")
            return
        self.err.print(f"[dim]loaded {len(self.conv.turns)} messages from {path}[/]")

    def stats(self) -> None:
        s = self.session
        self.err.print(f"context: {len(s.tokens)} / {s.n_ctx} tokens, {len(self.conv.turns)} messages")
        if self.last:
            r = self.last
            self.err.print(f"last reply: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s; prompt: "
                           f"{r.prompt_tokens} tokens ({r.prefilled_tokens} new, {r.prompt_tps:.1f} tok/s), "
                           f"TTFT {r.ttft_s * 1000:.0f} ms; finish: {r.finish_reason}")

    def reply(self, text: str) -> None:
        self.conv.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = self.conv.fit(self.session, self.reserve())
        except PromptError as e:
            self.conv.turns.pop()
            self.err.print(f"[red]{e}[/]")
            return
        if dropped:
            self.err.print(f"[yellow]context nearly full: dropped the {dropped} oldest messages "
                           f"(the system prompt is kept)[/]")
        pieces, interrupted = [], False
        try:
            for r in self.session.generate(ids, self.config):
                if r.text:
                    pieces.append(r.text)
                    self.console.print(r.text, end="", markup=False, highlight=False, soft_wrap=True)
                if r.finish_reason:
                    self.last = r
                    interrupted = r.finish_reason == "interrupted"
        except KeyboardInterrupt:  # arrived while printing, outside the generator
            interrupted = True
        self.console.print()
        if interrupted:
            self.err.print("[dim](reply stopped)[/]")
        self.conv.turns.append({"role": "assistant", "content": "".join(pieces)})

    def run(self) -> None:
        self.err.print("[dim]Type a message, /help for commands, Ctrl-D to leave.[/]")
        while True:
            try:
                text = read_input(self.console)
            except KeyboardInterrupt:
                self.console.print()
                self.err.print("[dim](use /exit or Ctrl-D to leave)[/]")
                continue
            if text is None:
                self.console.print()
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.reply(text)
