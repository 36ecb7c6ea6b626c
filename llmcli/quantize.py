"""`llm quantize` as a library call: resolve the source, convert, register the result in the store.

A source is a Hugging Face model folder, a repo id already in the Hugging Face cache, a GGUF path
or a model from the store. Without an output path the file lands in the store as `<source>:<type>`.
With `optimize`, the source first runs over a calibration text (llmcli/calibrate.py) and the block
search weights each column's error by its activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quant.convert import (
    ConvertOptions,
    ConvertResult,
    Source,
    TensorPlan,
    gguf_source,
    hf_source,
    make_plan,
    parse_target,
    parse_tensor_types,
    parse_type,
    write_gguf,
)
from quant.errors import LlmError, ModelFileError, ModelNotFoundError


@dataclass
class QuantizeReport:
    """What a quantization did: the file written (None on a dry run), its plan, and anything to warn about."""

    source: str
    qtype: str
    plan: list[TensorPlan]
    result: ConvertResult | None = None
    store_name: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(p.n_bytes for p in self.plan)

    @property
    def n_weights(self) -> int:
        return sum(p.source.n_elements for p in self.plan)


def _hf_cache_folder(repo_id: str, revision: str | None = None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def resolve_source(source: str, allow_requantize: bool = False,
                   revision: str | None = None) -> tuple[Source, str]:
    """-> (the source, the name its result is stored under before ':<type>'). `revision` picks the
    cached snapshot of a Hub repo id (default: main)."""
    from llmcli import store

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
            raise ModelFileError(f"{source}: a folder of GGUF files; name the .gguf file itself")
        return hf_source(path), path.resolve().name
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{source}: not a GGUF file (give a Hugging Face folder, a .gguf, or a repo id)")
        return gguf_source(path, allow_requantize), path.stem
    found = store.find_model(source)
    if found is not None or source.lower() in store.PACKAGED_MODELS:
        gguf = store.resolve_model(source)
        return gguf_source(gguf, allow_requantize), (found.name if found else source).split(":")[0]
    if "/" in source and not source.endswith(".gguf"):
        folder = _hf_cache_folder(source, revision)
        if folder is not None:
            return hf_source(folder, name=source.split("/")[-1]), source
        raise ModelNotFoundError(f"'{source}' is not a folder, a GGUF file, a stored model, or a repo in the "
                                 f"Hugging Face cache (download it first: `llm pull {source}`)")
    store.resolve_model(source)  # raises the store's own not-found / no-such-file error
    raise ModelNotFoundError(f"model '{source}' not found")


def _options(qtype: str, embedding_type: str | None = None, output_type: str | None = None,
             tensor_types: list[str] | None = None, pure: bool = False, optimize: bool = False,
             allow_requantize: bool = False) -> ConvertOptions:
    main_type, mix = parse_target(qtype)
    return ConvertOptions(
        qtype=main_type, mix=mix,
        embedding_type=parse_type(embedding_type) if embedding_type else None,
        output_type=parse_type(output_type) if output_type else None,
        tensor_types=parse_tensor_types(tensor_types),
        pure=pure, optimize=optimize, allow_requantize=allow_requantize,
    )


def _notes(plan: list[TensorPlan]) -> list[str]:
    """One warning per distinct note (a fallback hits every layer alike), naming the tensor when it is one."""
    groups: dict[str, list[str]] = {}
    for p in plan:
        if p.note:
            groups.setdefault(p.note, []).append(p.name)
    return [f"{names[0]}: {note}" if len(names) == 1 else f"{len(names)} tensors ({names[0]}, ...): {note}"
            for note, names in groups.items()]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def run_quantize(source: str, qtype: str, output: Path | None = None, *, dry_run: bool = False,
                 on_plan: Callable[[QuantizeReport], None] | None = None,
                 on_tensor: Callable[[TensorPlan], None] | None = None, revision: str | None = None,
                 calibration: Path | str | None = None,
                 on_calibrate: Callable[[int, int], None] | None = None, force: bool = False,
                 **options) -> QuantizeReport:
    """Quantize `source` to `qtype`; see `quantize`. With dry_run, only plan (nothing is written).
    `on_plan(report)` is called once the plan is made, `on_calibrate(done, total)` after each calibration
    window (with optimize), `on_tensor(plan entry)` after each tensor. The output is never the source's own
    file unless `force`."""
    from llmcli import calibrate

    opts = _options(qtype, **options)
    if calibration is not None and not opts.optimize:
        raise LlmError("--calibration is the text --optimize measures activations on; add --optimize")
    text = calibrate.read_calibration(calibration) if opts.optimize else ""
    where = f"{calibration}" if calibration is not None else "(built in)"
    if opts.optimize:
        calibrate.check_length(text, where)
    src, base_name = resolve_source(source, opts.allow_requantize, revision)
    report = QuantizeReport(source, opts.target_name, make_plan(src, opts))
    if output is None:
        from llmcli import store

        report.store_name = f"{base_name}:{report.qtype}"
        target = store.model_dir(report.store_name) / "model.gguf"
    else:
        target = Path(output).expanduser()
    if not dry_run and not force and src.path is not None and _same_file(src.path, target):
        raise LlmError(f"the output {target} is the source itself; write elsewhere (-o), or pass --force to "
                       f"replace it")
    if src.quantized:
        report.warnings.append(f"{len(src.quantized)} tensors are already quantized: requantizing them loses "
                               f"more quality than quantizing from the float model")
    report.warnings += _notes(report.plan)
    if on_plan is not None:
        on_plan(report)
    if dry_run:
        return report
    new_folder = None
    if output is None and not target.parent.is_dir():
        target.parent.mkdir(parents=True)
        new_folder = target.parent
    try:
        importance = calibrate.importance(src, text, target, where, on_calibrate) if opts.optimize else None
        report.result = write_gguf(src, opts, target, on_tensor, importance)
    except BaseException:
        if new_folder is not None:  # an interrupted first write leaves no empty model folder behind
            try:
                new_folder.rmdir()
            except OSError:
                pass
        raise
    if report.store_name is not None:
        from llmcli import store

        local = Path(source).expanduser()
        origin = str(local.resolve()) if local.exists() else source
        store.register(report.store_name, origin, report.qtype, report.result.path)
    return report


def quantize(source: str, qtype: str, output: Path | None = None, **options) -> Path:
    """Quantize `source` (HF folder, HF repo id in the cache, GGUF path or store name) to `qtype`
    ('q4_0', 'q8_0', 'f16', ...); returns the path of the GGUF written (in the store without `output`).

    Options: embedding_type, output_type, tensor_types (['REGEX=TYPE']), pure, optimize, calibration (a text
    file for optimize's activation statistics; default: llm's own), allow_requantize, revision (of a Hub
    repo id in the cache), force (replace the source's own file), on_tensor (called after each tensor).
    """
    report = run_quantize(source, qtype, output, **options)
    if report.result is None:
        raise LlmError("nothing was written (dry run)")
    return report.result.path
