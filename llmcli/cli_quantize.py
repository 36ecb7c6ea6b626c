"""Commands: quantize, perplexity."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from llmcli import options as opt

QTYPE_HELP = ("q4_0, q4_1, q5_0, q5_1, q8_0, f16, bf16 (or f32); K-quants as llama-quantize names them: q2_k, "
              "q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (q3_k, q4_k, q5_k are the _m mixes).")


def _progress(console):
    from rich import progress as rp

    # off when stderr is not a terminal: a log gets no bar, and no blank line the bar leaves before an error
    return rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.TaskProgressColumn(),
                       rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[detail]}"),
                       console=console, transient=True, disable=not console.is_terminal)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _plan_table(report):
    from rich.table import Table

    table = Table(title=f"{report.source} → {report.qtype} (dry run: nothing written)")
    for col in ("tensor", "type", "shape", "bytes", "bits/weight"):
        table.add_column(col, justify="left" if col in ("tensor", "type", "shape") else "right")
    for p in report.plan:
        table.add_row(p.name, p.qtype.name, "×".join(str(d) for d in p.shape), f"{p.n_bytes:,}",
                      f"{p.bits_per_weight:.2f}")
    table.add_section()
    table.add_row(f"total ({len(report.plan)} tensors)", "", f"{report.n_weights:,} weights", f"{report.n_bytes:,}",
                  f"{8 * report.n_bytes / max(1, report.n_weights):.2f}")
    return table


def quantize(
    source: Annotated[str, typer.Argument(help="A Hugging Face model folder, a repo id in the HF cache, a F16/BF16/"
                                               "F32 .gguf, or a model name from `llm list`.", show_default=False)],
    qtype: Annotated[str, typer.Option("--type", "-t", help=f"Target type: {QTYPE_HELP}")] = "q4_0",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the GGUF (default: the "
                                                   "model store, as <source>:<type>).", show_default=False)] = None,
    embedding_type: Annotated[str | None, typer.Option("--embedding-type", help="Type of the token embedding "
                                                          "(default q8_0).", show_default=False)] = None,
    output_type: Annotated[str | None, typer.Option("--output-type", help="Type of the output matrix "
                                                       "(default q8_0).", show_default=False)] = None,
    tensor_type: Annotated[list[str] | None, typer.Option("--tensor-type", help="REGEX=TYPE for the tensors "
                                                             "whose name matches (repeatable; first match wins).",
                                                             show_default=False)] = None,
    pure: Annotated[bool, typer.Option("--pure", help="One type for every matrix (no q8_0 embedding/output).")] = False,
    optimize: Annotated[bool, typer.Option("--optimize", help="Search each block's scale for the smallest error, "
                                                              "weighted by activations measured on a calibration "
                                                              "text (same format, slower).")] = False,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="The text --optimize measures "
                                                        "activations on (default: a varied text built into llm).",
                                                        show_default=False)] = None,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Accept an already-quantized GGUF "
                                                                             "as the source.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (types, sizes); write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow the output to replace the source's own file.")] = False,
    threads: opt.Threads = None,
) -> None:
    """Quantize a model into a GGUF (tokenizer and chat template included).

    Example: llm quantize ./SmolLM2-135M-Instruct -t q4_k_m --optimize -o smollm2-q4_k_m.gguf
    """
    from rich.console import Console

    from llmcli.quantize import run_quantize

    # the quantizer runs one parallel region per chunk with Python and the writer thread in between:
    # OpenMP workers that spin while they wait take the cores those need (this process runs nothing else)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        import numba

        from quant.errors import LlmError

        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise LlmError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {threads}")
        numba.set_num_threads(threads)
    err = Console(stderr=True, highlight=False)
    options = dict(embedding_type=embedding_type, output_type=output_type, tensor_types=tensor_type, pure=pure,
                   optimize=optimize, allow_requantize=allow_requantize, force=force)
    if dry_run:
        report = run_quantize(source, qtype, output, dry_run=True, calibration=calibration, **options)
        for w in report.warnings:
            err.print(f"[yellow]warning:[/] {w}")
        Console(highlight=False).print(_plan_table(report))
        return
    t0 = time.perf_counter()
    with _progress(err) as bar:
        task = bar.add_task("reading the source", total=None, detail="")

        plan_of: dict = {}  # the plan, until the quantizing bar has started

        def start_quantizing() -> None:
            plan = plan_of.pop("plan")
            bar.reset(task, description=f"quantizing to {plan.qtype}", total=plan.n_weights, detail="")

        def on_plan(plan) -> None:
            for w in plan.warnings:
                bar.console.print(f"[yellow]warning:[/] {w}")
            plan_of["plan"] = plan
            if optimize:
                bar.update(task, description="calibrating…", detail="activations on the calibration text")
            else:
                start_quantizing()

        def on_calibrate(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, detail=f"window {done} of {total}")

        def on_tensor(p) -> None:
            if plan_of:
                start_quantizing()
            bar.update(task, advance=p.source.n_elements, detail=p.name)

        report = run_quantize(source, qtype, output, on_plan=on_plan, on_tensor=on_tensor, calibration=calibration,
                              on_calibrate=on_calibrate, **options)
    r = report.result
    where = f"{r.path}" + (f" (stored as [bold]{report.store_name}[/])" if report.store_name else "")
    err.print(f"wrote {where}: {_size(r.n_bytes)}, {r.bits_per_weight:.2f} bits/weight, "
              f"{r.n_weights / 1e6:.0f}M weights in {time.perf_counter() - t0:.1f} s")
    # the command is done and the process ends next: spare the collector its last walk over the objects
    # numba and scipy created (~0.3 s of the exit)
    gc.freeze()


def perplexity(
    model: opt.ModelArg = None,
    file: Annotated[Path | None, typer.Argument(help="The text file to score.", show_default=False)] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Window length in tokens; the second half is scored.")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Score at most this many windows (default: "
                                                                   "all).", show_default=False)] = None,
    base: Annotated[str | None, typer.Option("--base", help="A reference model (e.g. the F16 one): adds KL "
                                                               "divergence and top-1 agreement.",
                                                show_default=False)] = None,
    backend: opt.Backend = None, threads: opt.Threads = None, kv_type: opt.KvType = None,
    as_json: opt.Json = False,
) -> None:
    """Perplexity of a model on a text file, and its drift from a base model (whose KV cache is f32: the same
    model as --base measures what --kv-type costs).

    Example: llm perplexity smollm2:q4_0 wiki.txt --base smollm2:f16 --chunks 20
    """
    from rich.console import Console

    from llmcli.perplexity import perplexity as run_perplexity
    from llmcli.store import resolve_model
    from quant.errors import LlmError

    if file is None:
        if model is None:
            raise LlmError("give the text file to score: llm perplexity [MODEL] FILE")
        model, file = None, Path(model)
    if not file.is_file():
        raise LlmError(f"{file}: no such file")
    text = file.read_text(encoding="utf-8", errors="replace")
    model_path = resolve_model(model)
    base_path = resolve_model(base) if base else None
    err = Console(stderr=True, highlight=False)
    with _progress(err) as bar:
        task = bar.add_task("perplexity", total=None, detail="")
        result = run_perplexity(model_path, text, ctx=ctx, chunks=chunks, base=base_path, backend=backend,
                                threads=threads, kv_type=kv_type,
                                on_chunk=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        print(json.dumps(result.to_json()))
        return
    out = Console(highlight=False)
    windows = "window" if result.n_chunks == 1 else "windows"
    tokens = "token" if result.n_tokens == 1 else "tokens"
    out.print(f"perplexity {result.ppl:.4f} over {result.n_tokens} {tokens} ({result.n_chunks} {windows} of {ctx})")
    if result.kld_mean is not None:
        out.print(f"KL divergence vs base: mean {result.kld_mean:.6f}, p99 {result.kld_p99:.6f}; "
                  f"top-1 agreement {100 * result.top1_agree:.2f} %")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(quantize)
    app.command()(perplexity)
