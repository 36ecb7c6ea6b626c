"""The `llm` command line. Thin: each command parses, calls one library function, renders."""

from __future__ import annotations

import sys

import typer

from quant.errors import LlmError

app = typer.Typer(
    name="llm",
    help="Run quantized language models locally: chat, run, pull, quantize, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register_commands() -> None:
    # each module adds its commands to `app`; imports inside them stay lazy
    from llmcli import cli_bench, cli_core, cli_quantize, cli_store

    for module in (cli_core, cli_store, cli_quantize, cli_bench):
        module.register(app)


def main() -> None:
    """Entry point: every LlmError becomes one line on stderr and exit code 1."""
    _register_commands()
    try:
        app(standalone_mode=False)
    except LlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
