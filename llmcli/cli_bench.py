"""Command: bench. Parses options, iterates llmcli.bench.run_bench, renders progress and the table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated

import typer

from llmcli import options as opt
from quant.errors import LlmError

OUTPUTS = ("md", "json", "csv")


def _ints(text: str | None, option: str):
    from llmcli.bench import parse_int_list

    return None if text is None else parse_int_list(text, option)


def bench(
    model: opt.ModelArg = None,
    n_prompt: Annotated[str | None, typer.Option(
        "--n-prompt", "-p", help="Prompt tokens for the prefill test, comma list; 0 skips it (default 512).",
        show_default=False)] = None,
    n_gen: Annotated[str | None, typer.Option(
        "--n-gen", "-n", help="Tokens for the decode test, comma list; 0 skips it (default 128).",
        show_default=False)] = None,
    repetitions: Annotated[int | None, typer.Option(
        "--repetitions", "-r", help="Timed repetitions of each test (default 5).",
        show_default=False)] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="Backends, comma list: numba, mlx, numpy (default: this machine's).",
        show_default=False)] = None,
    threads: Annotated[str | None, typer.Option(
        "--threads", "-t", help="CPU threads, comma list (default: physical cores).",
        show_default=False)] = None,
    depth: Annotated[str | None, typer.Option(
        "--depth", "-d", help="Context tokens filled before each test, comma list (default 0).",
        show_default=False)] = None,
    kv_type: opt.KvType = None,
    output: Annotated[str, typer.Option("--output", "-o", help="md (a Markdown table), json or csv.")] = "md",
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw tok/s across the swept threads or depths into this PNG (needs matplotlib).",
        show_default=False)] = None,
    remeasure_bw: Annotated[bool, typer.Option(
        "--remeasure-bw", help="Measure the machine's read bandwidth again, not the cached figure.",
        metavar=" ")] = False,
    lookup: opt.Lookup = None, draft: opt.Draft = None, draft_max: opt.DraftMax = None,
) -> None:
    """Measure prefill (pp) and decode (tg) speed; every combination of the listed values is one row.

    pp = one forward pass of p prompt tokens; tg = n single-token forward passes, each fed the greedy
    argmax of the last, so tokenization and sampling are not in the figures. After a warm-up run,
    each test is repeated r times: tok/s is the mean ± standard deviation. Also reported: time to
    first token of a p-token prompt, model load time, peak RSS, and decode GB/s (weight bytes read per
    token × tok/s) next to the machine's read bandwidth (measured once, cached in the model store).

    With --lookup N or --draft MODEL, each row also times speculative decoding: n greedy tokens of a reply that
    copies a paragraph of its prompt, against plain decoding of the same reply, and the acceptance rate.

    Example: llm bench smollm2 -p 512 -n 128 --threads 1,2 --depth 0,1024 -o json
    """
    from llmcli.bench import BenchConfig, parse_str_list
    from llmcli.cli_core import _spec_config

    if output not in OUTPUTS:
        raise LlmError(f"-o/--output must be one of {', '.join(OUTPUTS)}, got '{output}'")
    kwargs = dict(model=model, n_prompt=_ints(n_prompt, "-p/--n-prompt"), n_gen=_ints(n_gen, "-n/--n-gen"),
                  repetitions=repetitions, depth=_ints(depth, "--depth"), threads=_ints(threads, "--threads"),
                  backends=None if backend is None else parse_str_list(backend, "--backend"), kv_type=kv_type,
                  spec=_spec_config(lookup, draft, draft_max) if lookup or draft else None, draft=draft)
    config = BenchConfig(**{k: v for k, v in kwargs.items() if v is not None})
    if plot is not None:
        _check_plot_target(plot)
    results, bandwidth = _run_with_progress(config, remeasure_bw)
    if output == "json":
        print(json.dumps(_dicts(results), indent=2))
    elif output == "csv":
        print(to_csv(results), end="")
    else:
        print(to_markdown(results, bandwidth, config.repetitions))
    if plot is not None:
        write_plot(results, plot)


def _dicts(results) -> list[dict]:
    from llmcli.bench import result_dicts

    return result_dicts(results)


def _run_with_progress(config, remeasure_bw: bool = False):
    """Run the benchmark under a live progress bar on stderr; -> (results, bandwidth GB/s)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmcli.bench import BackendFailure, BenchResult, BenchStep, machine_bandwidth, prepare, rebased, run_bench

    plan = prepare(config)
    err = Console(stderr=True, highlight=False)
    with err.status("measuring the machine's read bandwidth (once)…"):
        bandwidth = machine_bandwidth(remeasure=remeasure_bw)
    results, failures = [], []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}"))
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("starting", total=None, last="")
        for event in run_bench(plan, bandwidth):
            if isinstance(event, BenchStep):
                where = f"row {event.row + 1}/{event.n_rows} {event.spec.label()} · {event.phase}"
                progress.update(task, total=event.total, completed=event.done, description=where)
            elif isinstance(event, BenchResult):
                results.append(event)
                progress.update(task, last=_summary(event))
            elif isinstance(event, BackendFailure):
                failures.append(event)
    lines = [f"backend {f.backend} ({f.threads} threads): {f.message}" for f in failures]
    if not results:
        raise LlmError("nothing was measured: " + "; ".join(lines))
    for line in lines:  # the rows of the backends that did load still get rendered
        err.print(f"error: {line}", markup=False, highlight=False)
    cached = bandwidth
    results, bandwidth, again = rebased(results, bandwidth)
    if again:
        err.print(f"note: the cached read bandwidth ({cached:.1f} GB/s) was below what decoding read; measured "
                  f"again: {bandwidth:.1f} GB/s", markup=False, highlight=False)
    return results, bandwidth


def _summary(r) -> str:
    parts = []
    if r.pp_tok_s is not None:
        parts.append(f"pp {r.pp_tok_s:.1f}")
    if r.tg_tok_s is not None:
        parts.append(f"tg {r.tg_tok_s:.1f}")
    if r.spec_tok_s is not None:
        parts.append(f"speculative {r.spec_tok_s:.1f} (plain {r.spec_plain_tok_s:.1f})")
    return "last: " + ", ".join(parts) + " tok/s"


def _pm(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def to_markdown(results, bandwidth_gbps: float, repetitions: int) -> str:
    """The results as a Markdown table, with a line on what the figures are."""
    head = ["model", "quant", "backend", "threads", "depth", "test", "pp tok/s", "tg tok/s", "TTFT s",
            "load s", "peak RSS MiB", "decode GB/s", "BW use", "KV cache"]
    align = ["---"] * 6 + ["---:"] * (len(head) - 6)  # text left, numbers right
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in results:
        test = "+".join(([f"pp{r.n_prompt}"] if r.n_prompt else []) + ([f"tg{r.n_gen}"] if r.n_gen else []))
        cells = [r.model, r.quant, r.backend, str(r.threads), str(r.depth), test,
                 _pm(r.pp_tok_s, r.pp_tok_s_std), _pm(r.tg_tok_s, r.tg_tok_s_std), _num(r.ttft_s, ".3f"),
                 f"{r.load_s:.2f}", f"{r.peak_rss_mb:.0f}", _num(r.decode_gbps, ".2f"),
                 "–" if r.bw_util is None else f"{100 * r.bw_util:.1f}%",
                 f"{r.kv_type} {r.kv_bytes / 2**20:.1f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    runs = "one run" if repetitions == 1 else f"{repetitions} runs"
    lines.append(f"Mean ± standard deviation of {runs} after a warm-up; machine read bandwidth "
                 f"{bandwidth_gbps:.1f} GB/s.")
    spec = [r for r in results if r.spec_tok_s is not None]
    if spec:
        lines += ["", "| model | backend | threads | test | plain tok/s | speculative tok/s | speedup | accepted |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in spec:
            accepted = "–" if r.spec_acceptance is None else f"{100 * r.spec_acceptance:.0f}%"
            lines.append(f"| {r.model} | {r.backend} | {r.threads} | copy tg{r.n_gen} | {r.spec_plain_tok_s:.2f} | "
                         f"{r.spec_tok_s:.2f} | {r.spec_tok_s / r.spec_plain_tok_s:.2f}× | {accepted} |")
        lines += ["", "Speculative decoding: greedy replies that copy a paragraph of the prompt, through the engine "
                  "(prefill excluded), speculative and plain runs alternating; medians."]
    return "\n".join(lines)


def to_csv(results) -> str:
    from llmcli.bench import SCHEMA

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCHEMA, lineterminator="\n")
    writer.writeheader()
    for row in _dicts(results):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


# --- --plot --------------------------------------------------------------------------------------------

def _check_plot_target(path: Path) -> None:
    """Fail before measuring, not after: matplotlib must import and the folder must exist."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LlmError("--plot needs matplotlib: pip install 'llmcli[plot]'") from None
    if path.suffix.lower() != ".png":
        raise LlmError(f"--plot writes a PNG file; give a name ending in .png, got '{path}'")
    if not path.parent.resolve().is_dir():
        raise LlmError(f"--plot: folder {path.parent} does not exist")


def _swept_axis(results) -> str:
    """The x axis: threads or depth, whichever took several values (threads when both or neither did)."""
    if len({r.threads for r in results}) > 1:
        return "threads"
    if len({r.depth for r in results}) > 1:
        return "depth"
    return "threads"


def write_plot(results, path: Path) -> None:
    """Two panels (prefill, decode) of tok/s against the swept value, one line per other combination."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = _swept_axis(results)
    other = [k for k in ("backend", "threads", "depth", "n_prompt", "n_gen") if k != x_key
             and len({getattr(r, k) for r in results}) > 1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, test, key in ((axes[0], "prefill (pp)", "pp_tok_s"), (axes[1], "decode (tg)", "tg_tok_s")):
        series: dict[tuple, list] = {}
        for r in results:
            if getattr(r, key) is not None:
                series.setdefault(tuple(getattr(r, k) for k in other), []).append(r)
        for label, rows in series.items():
            rows.sort(key=lambda r: getattr(r, x_key))
            name = ", ".join(f"{k}={v}" for k, v in zip(other, label, strict=True)) or results[0].backend
            ax.errorbar([getattr(r, x_key) for r in rows], [getattr(r, key) for r in rows],
                        yerr=[getattr(r, key + "_std") for r in rows], marker="o", capsize=3, label=name)
        ax.set_title(test)
        ax.set_xticks(sorted({getattr(r, x_key) for r in results}))
        ax.set_xlabel(x_key)
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"llm bench · {results[0].model} · {results[0].quant}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(bench)
