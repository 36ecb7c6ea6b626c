"""Write a block-quantized GGUF from a Hugging Face folder or a float GGUF, one tensor at a time.

A source is a list of tensors under their GGUF names, each able to hand out row ranges, plus a
function that writes its metadata. The plan gives every tensor a type (the policy below); the
writer streams: header first, then each tensor read in row chunks, quantized, written, dropped.
A second thread writes one tensor while the next is quantized, so at most three output tensors
(being written, waiting, being built) and one input chunk are held at a time.

Type policy for the legacy types: 1-D tensors stay F32; the token embedding and the output matrix get
q8_0 (or the requested type when it is q8_0 or a float type); every other matrix gets the requested
type. --embedding-type / --output-type / --tensor-type REGEX=TYPE override, --pure turns the q8_0
exception off. A row length that does not split into 32-weight blocks falls back to f16.
The K-quant mixes (q4_k_m, ...) follow llama.cpp's own per-tensor policy: quant/policy.py.
"""

from __future__ import annotations

import math
import os
import queue
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, RopeScalingType

from quant import policy
from quant.errors import LlmError, ModelFileError, UnsupportedError
from quant.families import FAMILIES, Family, hf_family
from quant.formats import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
from quant.gguf_file import check_arch, read_gguf
from quant.hf_tokenizer import read_hf_tokenizer
from quant.jit import use_kernel_cache
from quant.kquants import K_TYPES, quantize_k_rows
from quant.quantize import BLOCK_TYPES, QK, QUANTIZE_TYPES, quantize_rows
from quant.safetensors_file import SafeTensor, read_safetensors

Q = GGMLQuantizationType
FLOAT_KINDS = {Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16"}
TYPE_NAMES = {t.name.lower(): t for t in sorted(QUANTIZE_TYPES | K_TYPES, key=lambda t: t.value)}
# what -t accepts: the legacy and float types, and llama.cpp's K-quant file types (q4_k = q4_k_m, as there)
TARGET_NAMES = [n for n in TYPE_NAMES if n not in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] + \
    ["q2_k", "q3_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m", "q6_k"]
_FILE_TYPE = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
CHUNK_WEIGHTS = 1 << 22  # weights read per chunk: bounds the float32 working set to ~16 MB


def parse_type(name: str) -> GGMLQuantizationType:
    """'q4_0' -> Q4_0, for the types this writer produces; one clear error otherwise."""
    t = TYPE_NAMES.get(name.strip().lower())
    if t is None:
        raise LlmError(f"unknown quantization type '{name}' (choose from {', '.join(TYPE_NAMES)})")
    return t


def parse_target(name: str) -> tuple[GGMLQuantizationType, str | None]:
    """-t's value -> (the main tensor type, the K-quant mix name or None); one clear error otherwise."""
    mix = policy.find_mix(name)
    if mix is not None:
        return mix.default, mix.name
    t = TYPE_NAMES.get(name.strip().lower())
    if t is None:
        raise LlmError(f"unknown quantization type '{name}' (choose from {', '.join(TARGET_NAMES)})")
    return t, None


@dataclass(frozen=True)
class ConvertOptions:
    """What to write. Defaults live here."""

    qtype: GGMLQuantizationType = Q.Q4_0
    embedding_type: GGMLQuantizationType | None = None
    output_type: GGMLQuantizationType | None = None
    tensor_types: tuple[tuple[str, GGMLQuantizationType], ...] = ()  # (regex, type), first match wins
    pure: bool = False
    optimize: bool = False
    allow_requantize: bool = False
    mix: str | None = None  # a K-quant file type (policy.MIXES): llama.cpp's per-tensor policy

    @property
    def target_name(self) -> str:
        return self.mix or self.qtype.name.lower()

    @property
    def file_type(self) -> LlamaFileType:
        if self.mix:
            return policy.MIXES[self.mix].ftype
        if self.qtype in K_TYPES:  # a K type without its mix (a library caller): llama.cpp's file type of it
            return policy.find_mix(self.qtype.name.lower()).ftype
        return _FILE_TYPE[self.qtype]


def parse_tensor_types(specs: list[str] | None) -> tuple[tuple[str, GGMLQuantizationType], ...]:
    """['attn_v=q8_0', ...] -> (('attn_v', Q8_0), ...) with the regexes checked."""
    out = []
    for spec in specs or []:
        pattern, sep, tname = spec.rpartition("=")
        if not sep or not pattern:
            raise LlmError(f"--tensor-type needs REGEX=TYPE, got '{spec}'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise LlmError(f"--tensor-type '{spec}': bad regular expression ({e})") from None
        out.append((pattern, parse_type(tname)))
    return tuple(out)


# ---- sources -------------------------------------------------------------------------------------------------

@dataclass
class SourceTensor:
    """A tensor under its GGUF name. `read(r0, r1)` -> (rows r0..r1 (2-D), kind) with kind 'f32' (float32),
    'f16' / 'bf16' (uint16 bits); 1-D tensors are one row. `qtype` is the stored type (for same-type copies)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    read: Callable[[int, int], tuple[np.ndarray, str]]
    raw: Callable[[], np.ndarray] | None = None  # the stored bytes, for a tensor kept in its own type

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class Source:
    arch: str
    name: str
    tensors: list[SourceTensor]
    write_metadata: Callable[[GGUFWriter], None]
    quantized: list[str] = field(default_factory=list)  # names of tensors already block-quantized
    path: Path | None = None  # the GGUF file, for a GGUF source


def _rows_reader(data: np.ndarray, kind: str, perm: np.ndarray | None = None):
    """Reader over a 1-D or 2-D array view; `perm` reorders rows (the Q/K permutation)."""
    two_d = data if data.ndim == 2 else data.reshape(1, -1)

    def read(r0: int, r1: int) -> tuple[np.ndarray, str]:
        if perm is not None:
            if data.ndim == 1:
                return np.ascontiguousarray(data[perm]).reshape(1, -1), kind
            return np.ascontiguousarray(two_d[perm[r0:r1]]), kind
        return np.ascontiguousarray(two_d[r0:r1]), kind

    return read


def qk_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half Q/K rows into GGUF llama's interleaved pairs:
    within each head, output row 2i + j comes from input row j * head_dim / 2 + i."""
    head_dim = n_rows // n_head
    half = head_dim // 2
    h, i, j = np.meshgrid(np.arange(n_head), np.arange(half), np.arange(2), indexing="ij")
    return (h * head_dim + j * half + i).reshape(-1)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def gguf_name(hf_name: str, family: Family = FAMILIES["llama"]) -> str | None:
    """HF tensor name -> GGUF name in `family`; None for buffers that are not weights."""
    if hf_name in family.hf_top_names:
        return family.hf_top_names[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in family.hf_layer_names:
        return f"blk.{m.group(1)}.{family.hf_layer_names[m.group(2)]}"
    if _IGNORED.fullmatch(hf_name):
        return None
    raise UnsupportedError(f"tensor {hf_name} has no GGUF counterpart (not a {family.arch} weight)")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelFileError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise UnsupportedError(f"{folder}: weights are in pickle format ({pickles[0]}), which can run code "
                               f"when loaded; llm reads only .safetensors")
    raise ModelFileError(f"{folder}: no *.safetensors weights")


def _rope_config(config: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from either form of config.json (`rope_theta` + `rope_scaling`,
    or the newer `rope_parameters`)."""
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)  # per layer type (Gemma 3): the global layers' own
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """Llama 3.1 frequency factors (divide each inverse frequency): (head_dim / 2,) float32."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def hf_source(folder: Path, name: str | None = None) -> Source:
    """A Hugging Face model folder: config.json, safetensors (one or sharded), tokenizer files."""
    import json

    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a directory")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFileError(f"{cfg_path}: not valid JSON ({e})") from None
    family = hf_family(config.get("model_type"))
    arch = family.arch

    def need(key: str):
        if key not in config:
            raise ModelFileError(f"{cfg_path}: '{key}' is missing")
        return config[key]

    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    n_layers, n_vocab = int(need("num_hidden_layers")), int(need("vocab_size"))
    theta, scaling = _rope_config(config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear", "llama3", *family.hf_rope_types):
        raise UnsupportedError(f"{cfg_path}: rope scaling '{rope_type}' is not supported (linear, llama3)")
    tied = bool(config.get("tie_word_embeddings", False))

    tensors: dict[str, SafeTensor] = {}
    for f in _weight_files(folder):
        tensors.update(read_safetensors(f))
    if tied or "lm_head.weight" not in tensors:
        if not tied:
            warnings.warn("no lm_head.weight: tying the output to the token embedding", stacklevel=2)
        tensors.pop("lm_head.weight", None)
    tokenizer = read_hf_tokenizer(folder, n_vocab)

    out: list[SourceTensor] = []
    if rope_type == "llama3":
        factors = llama3_rope_factors(scaling, head_dim, theta)
        out.append(SourceTensor("rope_freqs.weight", factors.shape, Q.F32, _rows_reader(factors, "f32")))
    for gname, data in family.hf_extra_tensors(config).items():
        out.append(SourceTensor(gname, data.shape, Q.F32, _rows_reader(data, "f32")))
    for hf_name, t in tensors.items():
        gname = gguf_name(hf_name, family)
        if gname is None:
            continue
        perm = None
        if family.permute_qk and re.search(r"attn_[qk]\.(weight|bias)$", gname):
            perm = qk_permutation(t.shape[0], n_head if ".attn_q." in gname else n_kv)
        qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[t.kind]
        if family.norm_offset and gname.endswith("norm.weight"):  # stored as the multiplier the norm applies
            out.append(SourceTensor(gname, t.shape, Q.F32, _offset_reader(t.data, t.kind, family.norm_offset)))
            continue
        raw = None if perm is not None else (lambda t=t: t.data.view(np.uint8))
        out.append(SourceTensor(gname, t.shape, qtype, _rows_reader(t.data, t.kind, perm), raw))
    _check_complete(out, n_layers, family.hf_required(config), folder)
    out.sort(key=_tensor_order)

    def write_metadata(w: GGUFWriter) -> None:
        w.add_name(name or folder.name)
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(need("intermediate_size")))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(theta)
        w.add_rope_dimension_count(int(head_dim * float(config.get("partial_rotary_factor") or 1.0)))
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(n_vocab)
        if rope_type == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        for key, value in family.hf_metadata(config).items():
            if isinstance(value, float):
                w.add_float32(f"{arch}.{key}", value)
            else:
                w.add_uint32(f"{arch}.{key}", value)
        tokenizer.add_to(w)

    return Source(arch, name or folder.name, out, write_metadata)


def _offset_reader(data: np.ndarray, kind: str, offset: float):
    """Reader of a norm weight as float32 plus `offset` (Gemma's HF norms multiply by 1 + w)."""
    def read(r0: int, r1: int) -> tuple[np.ndarray, str]:
        if kind == "bf16":
            w = (data.astype(np.uint32) << 16).view(np.float32)
        else:
            w = (data.view(np.float16) if kind == "f16" else data).astype(np.float32)
        return (w.reshape(1, -1) + np.float32(offset)).astype(np.float32), "f32"

    return read


def _check_complete(tensors: list[SourceTensor], n_layers: int, per_layer: list[str], folder: Path) -> None:
    names = {t.name for t in tensors}
    need = ["token_embd.weight", "output_norm.weight"]
    for i in range(n_layers):
        need += [f"blk.{i}.{n}" for n in per_layer]
    missing = [n for n in need if n not in names]
    if missing:
        raise ModelFileError(f"{folder}: {len(missing)} weight(s) missing from the safetensors, e.g. {missing[0]}")


def _tensor_order(t: SourceTensor) -> tuple:
    m = re.match(r"blk\.(\d+)\.", t.name)
    if m:
        return (1, int(m.group(1)), t.name)
    first = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight", "token_embd.weight")
    return (0 if t.name in first else 2, 0, t.name)


_REWRITTEN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version"}


def gguf_source(path: Path, allow_requantize: bool = False) -> Source:
    """A GGUF file: float tensors are re-encoded; block-quantized ones only with allow_requantize."""
    g = read_gguf(path)
    arch = g.get("general.architecture")
    check_arch(arch)
    quantized = [t.name for t in g.tensors.values() if t.qtype not in FLOAT_KINDS]
    if quantized and not allow_requantize:
        kinds = sorted({g.tensors[n].qtype.name for n in quantized})
        raise LlmError(f"{path} is already quantized ({', '.join(kinds)}); quantizing it again loses quality — "
                       f"pass --allow-requantize to do it anyway, or start from the F16/BF16/F32 model")
    tensors = []
    for t in g.tensors.values():
        tensors.append(SourceTensor(t.name, t.shape, t.qtype, _gguf_reader(t), lambda t=t: t.data.view(np.uint8)))
    kvs = [(key, *g.types[key], value) for key, value in g.metadata.items() if key not in _REWRITTEN_KEYS]

    def write_metadata(w: GGUFWriter) -> None:
        for key, vtype, sub, value in kvs:
            w.add_key_value(key, value, vtype, sub_type=sub)

    return Source(arch, g.get("general.name") or path.stem, tensors, write_metadata, quantized, path)


def _gguf_reader(t):
    if t.qtype in FLOAT_KINDS:  # f16 and bf16 as their uint16 bits
        return _rows_reader(t.data if t.qtype == Q.F32 else t.data.view(np.uint16), FLOAT_KINDS[t.qtype])
    two_d = t.data if t.data.ndim == 2 else t.data.reshape(1, -1)

    def read(r0: int, r1: int) -> tuple[np.ndarray, str]:
        return dequantize(np.ascontiguousarray(two_d[r0:r1]), t.qtype).reshape(r1 - r0, -1), "f32"

    return read


# ---- the plan ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPlan:
    source: SourceTensor
    qtype: GGMLQuantizationType
    note: str = ""  # why the type differs from the policy (e.g. a fallback)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.source.n_elements // block * size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / self.source.n_elements


def choose_type(t: SourceTensor, opts: ConvertOptions, tied: bool) -> tuple[GGMLQuantizationType, str]:
    """The policy: which type tensor `t` gets (and a note when it falls back)."""
    if len(t.shape) == 1:
        return Q.F32, ""
    chosen = None
    for pattern, qtype in opts.tensor_types:
        if re.search(pattern, t.name):
            chosen = qtype
            break
    if chosen is None:
        keep_high = Q.Q8_0 if not opts.pure and opts.qtype in BLOCK_TYPES and opts.qtype != Q.Q8_0 else opts.qtype
        if t.name == "token_embd.weight":
            chosen = opts.embedding_type or (opts.output_type if tied else None) or keep_high
        elif t.name == "output.weight":
            chosen = opts.output_type or keep_high
        else:
            chosen = opts.qtype
    if chosen in BLOCK_TYPES and t.shape[-1] % QK:
        return Q.F16, f"rows of {t.shape[-1]} do not split into {QK}-weight blocks"
    if chosen in K_TYPES:
        return policy.fallback(chosen, t.shape[-1])
    return chosen, ""


def make_plan(source: Source, opts: ConvertOptions) -> list[TensorPlan]:
    if opts.mix:
        mopts = policy.MixOptions(opts.embedding_type, opts.output_type, opts.tensor_types, opts.pure)
        types = policy.plan_mix([(t.name, t.shape, t.qtype) for t in source.tensors], policy.MIXES[opts.mix], mopts)
        return [TensorPlan(t, qtype, note) for t, (qtype, note) in zip(source.tensors, types, strict=True)]
    tied = not any(t.name == "output.weight" for t in source.tensors)
    plans = []
    for t in source.tensors:
        qtype, note = choose_type(t, opts, tied)
        plans.append(TensorPlan(t, qtype, note))
    return plans


# ---- writing -------------------------------------------------------------------------------------------------

def encode_tensor(t: SourceTensor, qtype: GGMLQuantizationType, optimize: bool | int = False,
                  col_weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The bytes of tensor `t` in `qtype`: read in row chunks, quantized, gathered into one uint8 array
    (`out`, a flat uint8 array of the right size, when given). `col_weights` (n_cols,): the importance of
    each input column for the --optimize search."""
    if t.qtype == qtype and t.raw is not None:
        return np.ascontiguousarray(t.raw()).reshape(-1)
    cols = t.shape[-1]
    block, size = GGML_QUANT_SIZES[qtype]
    if out is None:
        out = np.empty(t.n_rows * (cols // block * size), dtype=np.uint8)
    rows_out = out.reshape(t.n_rows, cols // block * size)
    step = max(1, CHUNK_WEIGHTS // cols)
    for r0 in range(0, t.n_rows, step):
        r1 = min(t.n_rows, r0 + step)
        rows, kind = t.read(r0, r1)
        if qtype in K_TYPES:  # --optimize here is ggml's imatrix search, which needs the importance
            quantize_k_rows(rows, qtype, kind, col_weights if optimize else None, out=rows_out[r0:r1])
        elif qtype in BLOCK_TYPES:
            quantize_rows(rows, qtype, optimize, kind, col_weights, out=rows_out[r0:r1])
        else:
            rows_out[r0:r1] = quantize_rows(rows, qtype, optimize, kind).reshape(r1 - r0, -1)
    return out


@dataclass
class ConvertResult:
    path: Path
    plan: list[TensorPlan]
    n_bytes: int  # file size
    n_weights: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(1, self.n_weights)


def _temp_output(output: Path) -> Path:
    """Create the temporary file next to `output` (checks that it is writable before any work).
    Made with the usual permissions (0666 less the umask), unlike mkstemp's 0600."""
    folder = output.parent
    if not folder.is_dir():
        raise LlmError(f"cannot write {output}: folder {folder} does not exist")
    tmp = folder / f".{output.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        raise LlmError(f"cannot write {output}: {e.strerror or e}") from None
    return tmp


class _BackgroundWriter:
    """Writes tensor data in order on a second thread, so that one tensor is written while the next is
    quantized (the file write and the quantizing kernels both release the GIL). Holds at most one tensor
    waiting besides the one being written, and hands written buffers back for the next tensors: fresh
    memory costs a page fault and a zeroed page per 4 KB, as much as the write itself."""

    KEEP = 3  # buffers kept for reuse

    def __init__(self, writer: GGUFWriter):
        self._writer = writer
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray | None] | None] = queue.Queue(maxsize=1)
        self._free: list[np.ndarray] = []  # written buffers, ready for reuse
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, buffer = item
            if self._error is None and not self._cancelled:
                try:
                    self._writer.write_tensor_data(data)
                except BaseException as e:  # re-raised on the caller's thread by put() / finish()
                    self._error = e
            if buffer is not None:
                with self._lock:
                    self._free.append(buffer)
                    self._free.sort(key=len)
                    del self._free[:-self.KEEP]

    def buffer(self, n_bytes: int) -> np.ndarray:
        """A flat uint8 array of n_bytes, a view of a reused buffer when one is large enough."""
        with self._lock:
            for i, b in enumerate(self._free):
                if len(b) >= n_bytes:
                    return self._free.pop(i)[:n_bytes]
        return np.empty(n_bytes, dtype=np.uint8)

    def put(self, data: np.ndarray, recycle: np.ndarray | None = None) -> None:
        """Queue `data` for writing; `recycle`, an array from `buffer()`, is reused once it is written."""
        if self._error is not None:
            raise self._error
        self._queue.put((data, None if recycle is None else recycle.base if recycle.base is not None else recycle))

    def finish(self, cancel: bool = False) -> None:
        """Wait until everything queued is written (or, with cancel, dropped); re-raise a write error."""
        self._cancelled = cancel
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and not cancel:
            raise self._error


def write_gguf(source: Source, opts: ConvertOptions, output: Path,
               on_tensor: Callable[[TensorPlan], None] | None = None,
               importance: dict[str, np.ndarray] | None = None) -> ConvertResult:
    """Write `source` as a GGUF at `output` (via a temporary file renamed at the end). `importance`:
    {tensor name: mean squared input per column}, which the --optimize search weights its error by."""
    t0 = time.perf_counter()
    use_kernel_cache()
    plan = make_plan(source, opts)
    if output.is_dir():
        raise LlmError(f"cannot write {output}: it is a directory")
    tmp = _temp_output(output)
    writer = GGUFWriter(tmp, source.arch)
    try:
        source.write_metadata(writer)
        writer.add_file_type(opts.file_type)
        writer.add_quantization_version(2)
        for p in plan:
            writer.add_tensor_info(p.name, (p.n_bytes,) if len(p.shape) == 1 else
                                   (p.shape[0], p.n_bytes // p.shape[0]), np.dtype(np.uint8), p.n_bytes,
                                   raw_dtype=p.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        background = _BackgroundWriter(writer)
        try:
            for p in plan:
                colw = importance.get(p.name) if importance and opts.optimize else None
                out = None if p.source.qtype == p.qtype else background.buffer(p.n_bytes)
                background.put(encode_tensor(p.source, p.qtype, opts.optimize, colw, out), recycle=out)
                if on_tensor is not None:
                    on_tensor(p)
        except BaseException:
            background.finish(cancel=True)
            raise
        background.finish()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ConvertResult(output, plan, output.stat().st_size, sum(p.source.n_elements for p in plan),
                         time.perf_counter() - t0)
