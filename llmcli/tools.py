"""Tool calls: the functions a request offers the model, what the model is told about them, the grammar its reply
follows, and the call read back from the reply.

Chat templates spell tools in as many ways as there are model families, and many (SmolLM2's, Gemma 3's) have no
way at all. So the model is told in its system message, in words and JSON Schema, and a call is a bare JSON object
{"name": ..., "arguments": {...}} that the grammar (llmcli/json_schema.tool_call_grammar) makes well formed: the
name one of the tools', the arguments what that tool takes. Where the model may also answer in text ("auto"), a
reply that begins with "{" (or "[": a list of calls) is a call and any other is text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmcli.grammar import Grammar
from llmcli.json_schema import tool_call_grammar
from quant.errors import FieldError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict | bool  # JSON Schema of the arguments


@dataclass(frozen=True)
class ToolChoice:
    """The tools a reply may call, and whether it must call one (else it may be text)."""

    tools: tuple[Tool, ...]
    required: bool
    several: bool = True  # several calls in one reply (a JSON list of them): OpenAI's parallel_tool_calls

    def grammar(self) -> Grammar:
        return tool_call_grammar([(t.name, t.parameters) for t in self.tools], text=not self.required,
                                 several=self.several)

    def begins_call(self, text: str) -> bool:
        """Whether a reply that begins with `text` is a call: "{", or "[" where a list of calls may come (where it
        may not, "[" begins text)."""
        return text.startswith(("{", "[") if self.several else "{")

    def read(self, text: str) -> list[tuple[str, str]] | None:
        """[(name, arguments as JSON text)] when the reply is a whole call or list of calls; None for text (or calls
        cut short). The grammar wrote it, so a call that parses has the call's shape."""
        if not self.begins_call(text):
            return None
        try:
            calls = json.loads(text)
        except ValueError:
            return None
        return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                for c in (calls if isinstance(calls, list) else [calls])]

    def instructions(self) -> str:
        """What the system message tells the model."""
        listed = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                      ensure_ascii=False) for t in self.tools)
        how = '{"name": "<function name>", "arguments": {<its arguments>}}'
        several = " To call several at once, reply with a JSON list of such objects." if self.several else ""
        if self.required:
            return (f"You have these functions (their arguments as JSON Schema):\n{listed}\n"
                    f"Reply with only a JSON object that calls one of them: {how}.{several}")
        return (f"You can call these functions (their arguments as JSON Schema):\n{listed}\n"
                f"To call one, reply with only a JSON object: {how}.{several} Otherwise reply in plain text.")


def parse_tools(tools, choice, parallel=None) -> ToolChoice | None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` -> what the reply may call; None: no tool (text).
    FieldError names the request field that is wrong."""
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls", "must be true or false")
    several = parallel is not False
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise FieldError("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise FieldError("tools", "must be a list of tools")
    parsed: dict[str, Tool] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise FieldError(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ...}}')
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise FieldError(f"tools[{i}].function.name", "must be 1 to 64 letters, digits, '_' or '-'")
        if name in parsed:
            raise FieldError(f"tools[{i}].function.name", f"{name!r} is given twice")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise FieldError(f"tools[{i}].function.description", "must be a string")
        parameters = fn.get("parameters", NO_ARGUMENTS)
        if not isinstance(parameters, dict | bool):
            raise FieldError(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        parsed[name] = Tool(name, description, parameters)
    if choice in (None, "auto"):
        return ToolChoice(tuple(parsed.values()), required=False, several=several)
    if choice == "none":
        return None
    if choice == "required":
        return ToolChoice(tuple(parsed.values()), required=True, several=several)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise FieldError("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                        '{"name": ...}}')
    if name not in parsed:
        raise FieldError("tool_choice", f"names {name!r}, which is not among 'tools'")
    return ToolChoice((parsed[name],), required=True, several=several)


def with_instructions(messages: list[dict], choice: ToolChoice) -> list[dict]:
    """`messages` with the tools' instructions at the end of the system message (one is added first if none)."""
    text = choice.instructions()
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_text(calls: list[tuple[str, str]]) -> str:
    """Calls ((name, arguments as JSON text)) as the model writes them: an earlier assistant turn that called tools,
    given back in the prompt. Arguments that are not JSON are given back as the string they are."""
    written = []
    for name, arguments in calls:
        try:
            args = json.loads(arguments)
        except ValueError:
            args = arguments
        written.append(json.dumps({"name": name, "arguments": args}, ensure_ascii=False))
    return written[0] if len(written) == 1 else "[" + ", ".join(written) + "]"


def result_text(name: str | None, content: str) -> str:
    """A tool's result as the user turn that gives it back (`name`: the function, where its call is known)."""
    return f"{f'The function {name}' if name else 'A function'} returned: {content}"
