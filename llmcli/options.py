"""CLI options shared by every command: one name, one help text. Defaults are None here and
live in the dataclasses (SamplingConfig, GenerationConfig) and in engine.context_size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

FLAG = " "  # the metavar of an option that takes no value (typer would show <bool>)
ModelArg = Annotated[str | None, typer.Argument(
    help="A .gguf path, a name from `llm list`, or an alias: `smollm2` (the default) or `gemma3`.", show_default=False)]
Backend = Annotated[str | None, typer.Option(
    "--backend", help="numba (CPU, default), mlx (Apple GPU) or numpy (reference).", show_default=False)]
Threads = Annotated[int | None, typer.Option(
    "--threads", help="CPU threads (default: physical cores).", show_default=False)]
Ctx = Annotated[int | None, typer.Option(
    "--ctx", help="Context length (default: the model's, capped at 4096).", show_default=False)]
KvType = Annotated[str | None, typer.Option(
    "--kv-type", help="KV cache storage: f32, f16 or q8_0 (34/128 of f32's bytes). Default: f16 on numba, f32 on "
    "mlx and numpy.", show_default=False)]
Temperature = Annotated[float | None, typer.Option(
    "--temperature", help="0 = greedy (default 0.8).", show_default=False)]
TopK = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens; 0 = off (default 40).",
                                             show_default=False)]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling; 1 = off (default 0.95).",
                                               show_default=False)]
MinP = Annotated[float | None, typer.Option(
    "--min-p", help="Drop tokens below min-p × the top probability; 0 = off (default 0.05).", show_default=False)]
RepeatPenalty = Annotated[float | None, typer.Option(
    "--repeat-penalty", help="Penalise recent tokens; 1 = off (default).", show_default=False)]
RepeatLastN = Annotated[int | None, typer.Option(
    "--repeat-last-n", help="How many recent tokens the penalties look at (default 64).", show_default=False)]
FrequencyPenalty = Annotated[float | None, typer.Option(
    "--frequency-penalty", help="Subtract per occurrence (default 0).", show_default=False)]
PresencePenalty = Annotated[float | None, typer.Option(
    "--presence-penalty", help="Subtract once if present (default 0).", show_default=False)]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed: same seed, same text; -1 = random.",
                                             show_default=False)]
MaxTokens = Annotated[int | None, typer.Option(
    "--max-tokens", "-n", help="Most tokens to generate (default 512).", show_default=False)]
Stop = Annotated[list[str] | None, typer.Option(
    "--stop", help="Stop at this string (repeatable; never printed).", show_default=False)]
Template = Annotated[Path | None, typer.Option(
    "--template", help="A Jinja chat template file that overrides the model's.", show_default=False)]
System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.", metavar=FLAG)]
Pooling = Annotated[str | None, typer.Option(
    "--pooling", help="How an embedding pools the token states: mean, cls (the first token's) or last. Default: "
    "what the model file says (an embedding model's), else mean.", show_default=False)]
Think = Annotated[bool | None, typer.Option(
    "--think/--no-think", help="For a model that reasons first (Qwen3, QwQ, ...): its reasoning goes apart from "
    "the answer (to stderr, dimmed); --no-think turns thinking off where its template can (Qwen3's "
    "enable_thinking).", show_default=False)]
Format = Annotated[str | None, typer.Option(
    "--format", help="The reply's format: 'json' (a JSON object) or a JSON Schema file the reply follows "
    "(its objects' properties in the schema's order).", show_default=False)]
Lookup = Annotated[int | None, typer.Option(
    "--lookup", help="Speculative decoding by prompt lookup: draft up to N tokens that followed the last few "
    "tokens earlier in the prompt or reply, verified in one pass (the same text, faster when the reply repeats "
    "its input).", show_default=False)]
Draft = Annotated[str | None, typer.Option(
    "--draft", help="Speculative decoding with a small draft model of the same vocabulary (a .gguf path or a "
    "store name) that proposes tokens for the model to verify.", show_default=False)]
DraftMax = Annotated[int | None, typer.Option(
    "--draft-max", help="Most tokens the --draft model proposes per step (default 8).", show_default=False)]


def sampling_options(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty,
                     presence_penalty, seed) -> dict:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty, seed=seed)
