"""Commands: run, chat, tokenize, show."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from llmcli import options as opt
from quant.errors import LlmError, PromptError

MAX_SCHEMA_BYTES = 1 << 20


def _gen_config(max_tokens, stop, sampling: dict, fmt: str | None = None):
    from llmcli.engine import GenerationConfig
    from llmcli.sampling import SamplingConfig

    kwargs = {"sampling": SamplingConfig.from_options(**sampling), "stop": tuple(stop or ())}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if fmt is not None:
        kwargs["grammar"] = _output_format(fmt)
    return GenerationConfig(**kwargs)


def _thinking(lm, think: bool | None, config, fmt: str | None):
    """--think / --no-think for the loaded model -> (the template's options, how its reasoning is told from its
    answer or None, the config with --format's grammar after any reasoning)."""
    from llmcli.thinking import think_options, thinking

    options, reasoning = think_options(thinking(lm.template), think)
    if reasoning is not None and fmt is not None:
        config = dataclasses.replace(config, grammar=_output_format(fmt, reasoning))
    return options, reasoning, config


def _reasoning_out(text: str) -> None:
    """A thinking model's reasoning, on stderr: dimmed on a terminal."""
    if text:
        sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if sys.stderr.isatty() else text)
        sys.stderr.flush()


def _output_format(fmt: str, think=None):
    """--format: 'json', or a JSON Schema file -> its Grammar (`think`: after any reasoning, as json_grammar)."""
    from llmcli.grammar import GrammarError
    from llmcli.json_schema import json_grammar

    if fmt == "json":
        return json_grammar(None, think)
    path = Path(fmt)
    try:
        if path.stat().st_size > MAX_SCHEMA_BYTES:
            raise LlmError(f"--format {fmt}: the schema file is over {MAX_SCHEMA_BYTES >> 20} MiB")
        schema = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise LlmError(f"--format {fmt}: no such file (give 'json' or a JSON Schema file)") from None
    except OSError as e:
        raise LlmError(f"--format {fmt}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise LlmError(f"--format {fmt}: not a JSON file ({e})") from None
    try:
        return json_grammar(schema, think)
    except GrammarError as e:
        raise LlmError(f"--format {fmt}: {e}") from None


def _spec_config(lookup: int | None, draft: str | None, draft_max: int | None):
    """--lookup / --draft / --draft-max -> SpeculativeConfig (checked before any model is loaded)."""
    from llmcli.speculative import SpeculativeConfig

    if lookup and draft:
        raise LlmError("--lookup and --draft are two ways to draft: choose one")
    kwargs = {"lookup": lookup or 0}
    if draft_max is not None:
        kwargs["draft_max"] = draft_max
    return SpeculativeConfig(**kwargs)


def _is_model_ref(ref: str) -> bool:
    from llmcli.store import PACKAGED_MODELS, match_models

    return Path(ref).is_file() or ref.endswith(".gguf") or ref.lower() in PACKAGED_MODELS or bool(match_models(ref))


def _split_model_and_text(model: str | None, text: str | None) -> tuple[str | None, str | None]:
    """`cmd [MODEL] [TEXT]`: a lone argument is the model when it names one (a file, a .gguf path, a store name,
    an alias), else the text."""
    if text is None and model is not None and not _is_model_ref(model):
        return None, model
    return model, text


def _piped_stdin() -> str | None:
    """What is piped to stdin (None at a terminal), decoded with replacement: bytes that are not UTF-8 become
    U+FFFD. One trailing newline is dropped: `echo X | llm run` is `llm run X`."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def _text_and_stdin(text: str | None, what: str) -> str:
    """The text argument, the piped text, or both (the argument first, as in `cat notes.txt | llm run "Sum it"`)."""
    piped = _piped_stdin()
    if text is None:
        if piped is None:
            raise PromptError(f"no {what}: give it as an argument or on stdin")
        return piped
    return f"{text}\n\n{piped}" if piped else text


def _warn_ctx(session, ctx: int | None) -> None:
    trained = session.lm.hparams.n_ctx_train
    if ctx is not None and ctx > trained:
        print(f"warning: --ctx {ctx} is beyond the model's trained context of {trained} tokens; "
              "output past it may degrade", file=sys.stderr)


def _open(model: str | Path | None, backend, threads, template=None):
    """Load the model for a command. The garbage collector is paused while loading: the start-up allocates some
    hundred thousand objects that live as long as the process (numba's registries, the vocabulary), and
    collecting them again and again cost ~0.2 s; they are then frozen, which also spares the collector and the
    interpreter's exit from walking them (exit ~0.35 s -> ~0.08 s)."""
    from llmcli import engine
    from llmcli.store import resolve_model

    path = model if isinstance(model, Path) else resolve_model(model)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return engine.load(path, backend, threads, template)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def run(
    model: opt.ModelArg = None,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; text piped to stdin is added after it.",
                                                    show_default=False)] = None,
    system: opt.System = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as-is, without the chat template.",
                                      metavar=opt.FLAG)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print statistics on stderr.",
                                          metavar=opt.FLAG)] = False,
    template: opt.Template = None,
    backend: opt.Backend = None, threads: opt.Threads = None, ctx: opt.Ctx = None, kv_type: opt.KvType = None,
    temperature: opt.Temperature = None, top_k: opt.TopK = None, top_p: opt.TopP = None, min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None, repeat_last_n: opt.RepeatLastN = None,
    frequency_penalty: opt.FrequencyPenalty = None, presence_penalty: opt.PresencePenalty = None,
    seed: opt.Seed = None, max_tokens: opt.MaxTokens = None, stop: opt.Stop = None, fmt: opt.Format = None,
    lookup: opt.Lookup = None, draft: opt.Draft = None, draft_max: opt.DraftMax = None, think: opt.Think = None,
) -> None:
    """One-shot generation; only the generated text goes to stdout (a thinking model's reasoning to stderr).

    Example: llm run smollm2 "Write a haiku about the sea" --temperature 0
    """
    from llmcli.engine import Session, encode_chat
    from llmcli.speculative import acceptance_line
    from llmcli.store import resolve_model
    from llmcli.thinking import ThinkStream

    model, prompt = _split_model_and_text(model, prompt)
    if raw and system:
        raise PromptError("--system needs the chat template, which --raw skips: drop one of them")
    path = resolve_model(model)  # a model that is not there is said before anything about the prompt
    prompt = _text_and_stdin(prompt, "prompt")
    if not prompt.strip():
        raise PromptError("the prompt is empty")
    config = _gen_config(max_tokens, stop, opt.sampling_options(
        temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, seed),
        fmt)
    spec = _spec_config(lookup, draft, draft_max)
    lm = _open(path, backend, threads, template)
    session = Session(lm, ctx, kv_type=kv_type, spec=spec, draft=_open(draft, backend, threads) if draft else None)
    _warn_ctx(session, ctx)
    if raw:
        ids, reasoning = lm.tokenizer.encode(prompt), None
    else:
        options, reasoning, config = _thinking(lm, think, config, fmt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = encode_chat(session, messages, options)
    split = ThinkStream(reasoning) if reasoning is not None else None
    last = None
    for r in session.generate(ids, config):
        if r.text:
            thought, text = split.feed(r.text) if split is not None else ("", r.text)
            _reasoning_out(thought)
            sys.stdout.write(text)
            sys.stdout.flush()
        last = r
    if split is not None:
        thought, text = split.finish()
        _reasoning_out(thought)
        sys.stdout.write(text)
    if not raw or sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        print(f"model: {lm.gguf.path} ({lm.model.name} backend, load {lm.load_s:.2f} s)\n"
              f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s, TTFT {last.ttft_s * 1000:.0f} ms\n"
              f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s\n"
              f"finish: {last.finish_reason}", file=sys.stderr)
        if session.drafter is not None:
            print(acceptance_line(last.draft_tokens, last.accepted_tokens), file=sys.stderr)
    if last is not None and last.finish_reason == "interrupted":
        raise typer.Exit(130)


def chat(
    model: opt.ModelArg = None,
    system: opt.System = None,
    template: opt.Template = None,
    backend: opt.Backend = None, threads: opt.Threads = None, ctx: opt.Ctx = None, kv_type: opt.KvType = None,
    temperature: opt.Temperature = None, top_k: opt.TopK = None, top_p: opt.TopP = None, min_p: opt.MinP = None,
    repeat_penalty: opt.RepeatPenalty = None, repeat_last_n: opt.RepeatLastN = None,
    frequency_penalty: opt.FrequencyPenalty = None, presence_penalty: opt.PresencePenalty = None,
    seed: opt.Seed = None, max_tokens: opt.MaxTokens = None, stop: opt.Stop = None,
    context_shift: Annotated[bool, typer.Option(
        "--context-shift", help="When the context is full, drop the oldest turns and shift the KV cache past them "
        "instead of recomputing the rest.", metavar=opt.FLAG)] = False,
    fmt: opt.Format = None,
    lookup: opt.Lookup = None, draft: opt.Draft = None, draft_max: opt.DraftMax = None, think: opt.Think = None,
) -> None:
    """Chat in the terminal, streaming replies (a thinking model's reasoning dimmed); the KV cache is reused
    across turns.

    Example: llm chat smollm2 --system "You are terse."
    """
    from rich.console import Console

    from llmcli.chat import ChatLoop
    from llmcli.engine import Session
    from llmcli.store import DEFAULT_MODEL

    config = _gen_config(max_tokens, stop, opt.sampling_options(
        temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, seed),
        fmt)
    spec = _spec_config(lookup, draft, draft_max)
    # soft_wrap: notices stay one line each (a terminal wraps them itself; a log or a pipe gets them whole)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with err.status("loading model…"):
        lm = _open(model, backend, threads, template)
        draft_lm = _open(draft, backend, threads) if draft else None
    session = Session(lm, ctx, kv_type=kv_type, spec=spec, draft=draft_lm)
    _warn_ctx(session, ctx)
    options, reasoning, config = _thinking(lm, think, config, fmt)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 must not end the conversation
    label = model or DEFAULT_MODEL
    err.print(f"[dim]{label} · {lm.hparams.arch} · {lm.model.name} backend · context {session.n_ctx}[/]")
    ChatLoop(session, config, Console(highlight=False), err, system=system, context_shift=context_shift,
             options=options, reasoning=reasoning).run()


def tokenize(
    model: opt.ModelArg = None,
    text: Annotated[str | None, typer.Argument(help="Text to tokenize (default: stdin).", show_default=False)] = None,
    as_json: opt.Json = False,
) -> None:
    """Token ids of TEXT, exactly as `llm run --raw` feeds them.

    Example: llm tokenize smollm2 "Hello, world!" --json
    """
    from rich.console import Console
    from rich.table import Table

    from llmcli.store import resolve_model
    from llmcli.tokenizer import Tokenizer
    from quant.gguf_file import read_gguf

    model, text = _split_model_and_text(model, text)
    path = resolve_model(model)
    text = _text_and_stdin(text, "text")
    tok = Tokenizer.from_gguf(read_gguf(path))
    ids = tok.encode(text)
    if as_json:
        print(json.dumps({"ids": ids, "count": len(ids)}))
        return
    table = Table("#", "id", "piece", title=f"{len(ids)} token{'s' if len(ids) != 1 else ''}")
    for i, t in enumerate(ids):
        table.add_row(str(i), str(t), repr(tok.piece(t)))
    Console().print(table)


def embed(
    model: opt.ModelArg = None,
    text: Annotated[str | None, typer.Argument(
        help="The text to embed (default: each line of stdin, one embedding per line).", show_default=False)] = None,
    pooling: opt.Pooling = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize/--no-normalize", help="Scale each embedding to length 1, as OpenAI's and ollama's are.")] = True,
    backend: opt.Backend = None, threads: opt.Threads = None, ctx: opt.Ctx = None, kv_type: opt.KvType = None,
) -> None:
    """Embeddings: one JSON array of floats per line, for TEXT or for each line of stdin (as `llm serve` gives them
    at /v1/embeddings and /api/embed).

    Example: cat sentences.txt | llm embed Qwen/Qwen3-Embedding-0.6B-GGUF > vectors.jsonl
    """
    from llmcli.engine import Session, embedding_pooling, normalized
    from llmcli.store import resolve_model

    model, text = _split_model_and_text(model, text)
    path = resolve_model(model)
    if text is not None:
        texts = [text]
    else:
        piped = _piped_stdin()
        if piped is None:
            raise PromptError("no text: give it as an argument, or lines on stdin")
        texts = [line for line in piped.splitlines() if line.strip()]
    if not texts or not all(t.strip() for t in texts):
        raise PromptError("the text is empty")
    lm = _open(path, backend, threads)
    how = embedding_pooling(lm.hparams, pooling)
    session = Session(lm, ctx, kv_type=kv_type)
    _warn_ctx(session, ctx)
    for t in texts:
        v = session.embed(lm.tokenizer.encode(t), how)
        print(json.dumps((normalized(v) if normalize else v).tolist()), flush=True)


def describe(model: str | None, template: Path | None = None, ctx: int | None = None,
             kv_type: str | None = None) -> dict:
    """What `llm show` prints, as a dict."""
    from backends import default_kv_type
    from backends.base import count_params, kv_cache_bytes, read_hparams
    from llmcli.engine import context_size
    from llmcli.store import resolve_model
    from llmcli.template import ChatTemplate
    from llmcli.thinking import thinking
    from llmcli.tokenizer import Tokenizer
    from llmcli.tools import call_syntax
    from quant.gguf_file import read_gguf
    from quant.kvtypes import check_kv_type

    gguf = read_gguf(resolve_model(model))
    hp = read_hparams(gguf)
    tok = Tokenizer.from_gguf(gguf)
    tmpl = ChatTemplate.from_gguf(gguf, override=template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    special = {"bos": tok.bos_token, "eos": tok.eos_token,
               "stop": sorted(tok.piece(i) for i in tok.stop_ids), "add_bos": tok.add_bos}
    n_ctx = context_size(hp, ctx)
    kv_type = kv_type or default_kv_type()
    check_kv_type(kv_type, hp.head_dim)
    return {
        "file": str(gguf.path),
        "name": gguf.get("general.name"),
        "architecture": hp.arch,
        "parameters": count_params(gguf),
        "context_length": hp.n_ctx_train,
        "embedding_length": hp.n_embd, "layers": hp.n_layers, "heads": hp.n_heads, "kv_heads": hp.n_kv_heads,
        "vocab_size": hp.n_vocab, "rope_base": hp.rope_base, "tied_embeddings": hp.tied_embeddings,
        "pooling": hp.pooling or None,  # the file's: an embedding model's (`llm embed` pools by it)
        "tensor_types": dict(Counter(t.qtype.name for t in gguf.tensors.values()).most_common()),
        "file_size": gguf.file_size,
        "tokenizer": gguf.get("tokenizer.ggml.model"), "pre_tokenizer": gguf.get("tokenizer.ggml.pre"),
        "special_tokens": special,
        "chat_template": {"origin": tmpl.origin, "fallback": tmpl.is_fallback, "source": tmpl.source,
                          "tool_use": tmpl.tool_use.source if tmpl.tool_use is not None else None},
        # what `llm serve` makes of the template: how tool calls are written (None: told in the system message,
        # as JSON), and whether replies reason first
        "tool_calls": dataclasses.asdict(syntax) if (syntax := call_syntax(tmpl, tok)) else None,
        "thinking": dataclasses.asdict(think) if (think := thinking(tmpl)) else None,
        # keys and values stored as kv_type at the chosen context (numba's rotating cache), and if every layer
        # kept all
        "kv_cache": {"context": n_ctx, "type": kv_type, "bytes": kv_cache_bytes(hp, n_ctx, kv_type=kv_type),
                     "full_bytes": kv_cache_bytes(hp, n_ctx, slack=None, kv_type=kv_type)},
    }


def show(model: opt.ModelArg = None, template: opt.Template = None, ctx: opt.Ctx = None,
         kv_type: opt.KvType = None, as_json: opt.Json = False) -> None:
    """Architecture, size, tensor types, chat template and special tokens of a model.

    Example: llm show smollm2
    """
    from rich.console import Console
    from rich.table import Table

    info = describe(model, template, ctx, kv_type)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = Console(highlight=False)
    table = Table(show_header=False, box=None, padding=(0, 2))
    for key in ("name", "file", "architecture", "parameters", "context_length", "embedding_length", "layers",
                "heads", "kv_heads", "vocab_size", "rope_base", "tied_embeddings", "tokenizer", "pre_tokenizer"):
        value = info[key]
        if key == "parameters":
            value = f"{value / 1e6:.1f} M"
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("file size", f"{info['file_size'] / 2**20:.1f} MiB")
    table.add_row("tensor types", ", ".join(f"{k} × {v}" for k, v in info["tensor_types"].items()))
    kv = info["kv_cache"]
    table.add_row("kv cache", f"{kv['bytes'] / 2**20:.1f} MiB of {kv['type']} at {kv['context']} tokens (keeping "
                              f"every position of every layer: {kv['full_bytes'] / 2**20:.1f} MiB)")
    sp = info["special_tokens"]
    table.add_row("special tokens", f"bos {sp['bos']!r}, eos {sp['eos']!r}, stop {sp['stop']}, add_bos {sp['add_bos']}")
    ct = info["chat_template"]
    note = " (the model has none)" if ct["fallback"] else ""
    note += ", and its tool_use template for requests that offer tools" if ct["tool_use"] is not None else ""
    table.add_row("chat template", ct["origin"] + note)
    calls = info["tool_calls"]
    table.add_row("tool calls", f"as the template writes them: {calls['begin'].strip() or 'JSON'}" if calls
                  else "as JSON, told in the system message")
    if info["pooling"] is not None:
        table.add_row("embeddings", f"{info['pooling']} pooling (the file's)")
    if info["thinking"] is not None:
        table.add_row("thinking", "reasons first (<think>), " + ("opened by the prompt" if info["thinking"]["opened"]
                                                                 else "opened by the model"))
    console.print(table)
    console.rule("chat template", style="dim")
    console.print(ct["source"], markup=False)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(chat)
    app.command()(tokenize)
    app.command()(embed)
    app.command()(show)

