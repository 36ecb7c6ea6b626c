"""The `llm` command line. Thin: each command parses, calls one library function, renders."""

from __future__ import annotations

import inspect
import os
import re
import sys

import typer
from typer.core import TyperCommand, TyperGroup

from llmcli.options import FLAG
from quant.errors import FieldError, LlmError


def _flag_metavars(params: list) -> list:
    """Options that take no value (flags, and the --help option typer adds) get no metavar: typer would print
    <bool> after them in the help."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = FLAG
    return params


class _PlainValues:
    """A parameter's coercion for the values a command line mostly holds: an absent option, a string for a `str`,
    plain digits for an `int` or a `float`, a default of the parameter's own type. Typer (0.20+) coerces every
    parameter through a pydantic TypeAdapter, and importing pydantic and building the adapters cost `llm run`
    ~0.15 s of its start; these values come out of an adapter unchanged or as int(value) / float(value), so they
    skip it. Any other value goes to typer's own coercion, built the first time it is needed, with its messages."""

    _INT = re.compile(r"-?(0|[1-9][0-9]*)")
    _FLOAT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")

    def coerce(self, value, param, ctx):
        kind = param.type_descriptor.annotation
        if value is None:  # what typer's own coercion does with an absent value before it validates
            return () if param.multiple or param.nargs == -1 else None
        if type(value) is str:
            if kind is str:
                return value
            if kind is int and self._INT.fullmatch(value):
                return int(value)
            if kind is float and self._FLOAT.fullmatch(value):
                return float(value)
        elif type(value) is kind and kind in (int, float, str, bool):
            return value
        from typer._coercion import build_runtime_param

        param._runtime_param = build_runtime_param(param.type_descriptor)
        return param._runtime_param.coerce(value, param=param, ctx=ctx)


def _plain_values(params: list) -> None:
    """Give the parameters _PlainValues as their coercion."""
    for p in params:
        info = getattr(p, "type_descriptor", None)
        # only a typer that coerces through pydantic (it has _runtime_param), and only a parameter without bounds
        # or a parser (whose checks live in the adapter)
        if (getattr(p, "_runtime_param", False) is None and info is not None and info.parameter_info.min is None
                and info.parameter_info.max is None and info.parameter_info.parser is None):
            p._runtime_param = _PlainValues()


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _flag_metavars(super().get_params(ctx))

    def parse_args(self, ctx, args):
        _plain_values(self.get_params(ctx))
        return super().parse_args(ctx, args)


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _flag_metavars(super().get_params(ctx))

    def parse_args(self, ctx, args):
        _plain_values(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        # typer turns a KeyboardInterrupt into a silent exit code 130; as Abort it reaches main(), which says so
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise typer.Abort() from None


app = typer.Typer(
    name="llm",
    cls=_Group,
    help="Run quantized language models locally: chat, run, pull, quantize, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# The module that adds each command, so that a command line naming one imports and builds only that module's
# commands (all of them cost `llm run` ~25 ms); anything else (help, a typo) gets every command, in this order.
_MODULES = ("cli_core", "cli_store", "cli_quantize", "cli_bench", "cli_serve")
_COMMAND_MODULE = {"run": "cli_core", "chat": "cli_core", "tokenize": "cli_core", "show": "cli_core",
                   "embed": "cli_core",
                   "pull": "cli_store", "list": "cli_store", "rm": "cli_store", "quantize": "cli_quantize",
                   "perplexity": "cli_quantize", "bench": "cli_bench", "serve": "cli_serve"}


def _register_commands(command: str | None = None) -> None:
    """Add the commands to `app`: only the module of `command` when it is one (imports inside the modules stay
    lazy), else all of them. A command this table places wrongly still gets every module."""
    import importlib

    first = _COMMAND_MODULE.get(command)
    for name in ([first] if first else []) + [m for m in _MODULES if m != first]:
        importlib.import_module(f"llmcli.{name}").register(app)
        if first and any(_command_name(info) == command for info in app.registered_commands):
            break
    for info in app.registered_commands:  # app.command() gave each the plain TyperCommand
        if info.cls in (None, TyperCommand):
            info.cls = _Command
        if info.short_help is None and info.callback.__doc__:  # the list of commands keeps a docstring's line breaks
            info.short_help = " ".join(inspect.cleandoc(info.callback.__doc__).split("\n\n")[0].split())


def _command_name(info) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"llm {version('llmcli')}")
        except PackageNotFoundError:
            print("llm (not installed as a package)")
        raise typer.Exit(0)


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", help="Print the version and exit.", metavar=" ",
                                      callback=_version, is_eager=True),
) -> None:
    """Run quantized language models locally: chat, run, pull, quantize, bench."""


def one_line(message: str) -> str:
    """An error message fit for one terminal line: whitespace runs (newlines included) become one space, other
    control characters are escaped (a message can quote bytes from a file)."""
    text = " ".join(message.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main() -> None:
    """Entry point: every LlmError or usage error becomes one line on stderr and a non-zero exit."""
    code = _run()
    if _started_as_llm():
        _exit_now(code)
    sys.exit(code)


def _run() -> int:
    """Run the command line's command; its exit code."""
    from typer._click import exceptions as click_exceptions  # typer ships its own click

    _register_commands(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        code = app(standalone_mode=False)
    except FieldError as e:  # the engine names its field; here it is the option of the same name
        print(f"error: --{e.field.replace('_', '-')} {e.detail}", file=sys.stderr)
        return 1
    except LlmError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # numpy's says how many bytes of what shape: a user needs what to change
        print("error: not enough memory (a smaller --ctx, --parallel or model needs less)", file=sys.stderr)
        return 1
    except click_exceptions.NoArgsIsHelpError as e:
        e.show()  # plain `llm`: the help
        return e.exit_code
    except click_exceptions.ClickException as e:
        print(f"error: {one_line(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    return code if isinstance(code, int) else 0


def _started_as_llm() -> bool:
    """Whether this process was started to run `llm` (the console script or `python -m llmcli`), not by a
    program or a test that calls main() and goes on after it."""
    program = sys.modules.get("__main__")
    return getattr(program, "main", None) is main and hasattr(program, "__file__")


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, which frees the objects of numba, LLVM and the model
    one by one (~50 ms of `llm run`'s exit). What a normal exit does before that still happens: the command has
    closed its files, threads still running are waited for, the at-exit handlers run, the output is flushed. A
    flush that fails leaves the exit to the interpreter, which reports it as usual."""
    import atexit
    import threading

    threading._shutdown()  # as the interpreter's exit begins: joins non-daemon threads, runs their exit hooks
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)
