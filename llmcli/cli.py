"""The `llm` command line. Thin: each command parses, calls one library function, renders."""

from __future__ import annotations

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


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _flag_metavars(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _flag_metavars(super().get_params(ctx))

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


def _register_commands() -> None:
    # each module adds its commands to `app`; imports inside them stay lazy
    from llmcli import cli_bench, cli_core, cli_quantize, cli_serve, cli_store

    for module in (cli_core, cli_store, cli_quantize, cli_bench, cli_serve):
        module.register(app)
    for info in app.registered_commands:  # app.command() gave each the plain TyperCommand
        if info.cls in (None, TyperCommand):
            info.cls = _Command


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
    from typer._click import exceptions as click_exceptions  # typer ships its own click

    _register_commands()
    try:
        code = app(standalone_mode=False)
    except FieldError as e:  # the engine names its field; here it is the option of the same name
        print(f"error: --{e.field.replace('_', '-')} {e.detail}", file=sys.stderr)
        sys.exit(1)
    except LlmError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.NoArgsIsHelpError as e:
        e.show()  # plain `llm`: the help
        sys.exit(e.exit_code)
    except click_exceptions.ClickException as e:
        print(f"error: {one_line(e.format_message())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
