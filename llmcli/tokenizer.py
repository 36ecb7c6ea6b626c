"""The tokenizer a GGUF file describes, built from its metadata.

Two vocabulary kinds (`tokenizer.ggml.model`):
  gpt2   byte-level BPE: tokens spelled in GPT-2's byte alphabet, ranked merges, and a pre-tokenizer
         split regex picked by `tokenizer.ggml.pre` (the names llama.cpp writes).
  llama  SentencePiece BPE: tokens with U+2581 for spaces, a score per token, `<0xNN>` byte tokens
         for text the vocabulary cannot spell. The file has no merges; they follow from the scores.

Byte-level BPE encodes with `tokenizers`; SentencePiece encodes with our own merge loop (llmcli/spm.py),
which ranks pairs by score as it meets them instead of building half a million merges at start.
Decoding needs neither: every token id maps to the bytes it stands for, so `decode` and the streaming
decoder are the same byte concatenation and always agree.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from llmcli.spm import SPIECE_SPACE, SentencePieceBPE
from quant.errors import ModelFileError, UnsupportedError
from quant.gguf_file import GGUFFile, GGUFValueType, safe_text

if TYPE_CHECKING:  # imported where a byte-level vocabulary is built: a SentencePiece one never needs it
    from tokenizers import Tokenizer as _HFTokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes. A vocabulary's merges were learned on text cut by one of these; each
# regex of a sequence cuts every piece left by the one before it, keeping what it does not match.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_HANGUL = r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"

_SPLIT_FAMILIES = [  # (tokenizer.ggml.pre names, their regexes), as llama.cpp groups them
    (("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral", "chatglm-bpe"),
     (_LLAMA3,)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2,)),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    (("deepseek-coder",), (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")),
]
_SPLITS = {name: regexes for names, regexes in _SPLIT_FAMILIES for name in names}
# Llama 3 style vocabularies: a word that is itself a token maps straight to it, and BOS comes first
# (llama.cpp's defaults for files that do not say).
_LLAMA3_FAMILY = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}

# Control tokens that end a turn or a generation, in the chat formats we know.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>",
                      "<end_of_turn>", "<|end|>", "</s>", "<|return|>", "<|call|>")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 bytes take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _byte_alphabet().items()}


class Tokenizer:
    """Text <-> token ids for one model. Build with `Tokenizer.from_gguf`."""

    def __init__(self, *, kind: str, tokens: list[str], token_types: list[int],
                 backend: _HFTokenizer | SentencePieceBPE,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, stop_ids: frozenset[int]):
        self.kind = kind  # "gpt2" or "llama"
        self.tokens = tokens
        self.token_types = token_types
        self._backend = backend
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_token = tokens[bos_id] if bos_id is not None else None
        self.eos_token = tokens[eos_id] if eos_id is not None else None
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.stop_ids = stop_ids
        self.token_bytes = lru_cache(maxsize=None)(self._token_bytes)

    # ---- building ----

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """The tokenizer from `tokenizer.ggml.*` metadata. Raises UnsupportedError for vocabulary kinds
        other than gpt2 and llama, ModelFileError when the metadata is missing or inconsistent."""
        meta, where = gguf.metadata, gguf.path
        kind = gguf.get_str("tokenizer.ggml.model")
        if kind is None:
            raise ModelFileError(f"{where}: has no tokenizer (no tokenizer.ggml.model in its metadata)")
        if kind not in ("gpt2", "llama"):
            raise UnsupportedError(f"{where}: tokenizer type {safe_text(repr(kind), 60)} is not supported "
                                   "(supported: gpt2, llama)")
        tokens = _array(gguf, "tokenizer.ggml.tokens", str)
        if not tokens:
            raise ModelFileError(f"{where}: tokenizer.ggml.tokens is missing or empty")
        token_types = _array(gguf, "tokenizer.ggml.token_type", int)
        if token_types is None or len(token_types) == 0:
            token_types = [NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelFileError(f"{where}: {len(token_types)} token types for {len(tokens)} tokens")
        token_types = [int(t) for t in token_types] if not isinstance(token_types, list) else token_types

        def token_id(key: str) -> int | None:
            if meta.get(f"tokenizer.ggml.{key}") is None:
                return None
            value = gguf.get_int(f"tokenizer.ggml.{key}")
            if not 0 <= value < len(tokens):
                raise ModelFileError(f"{where}: tokenizer.ggml.{key} = {value} is outside the vocabulary "
                                     f"of {len(tokens)} tokens")
            return value

        # decoded once to build the backend; the tokenizer keeps the compact array (quant.gguf_file.StringArray)
        texts = list(tokens)
        vocab = dict(zip(texts, range(len(texts)), strict=True))
        pre = gguf.get_str("tokenizer.ggml.pre", "default")
        backend: _HFTokenizer | SentencePieceBPE
        if kind == "gpt2":
            merges = _array(gguf, "tokenizer.ggml.merges", str)
            if merges is None:
                raise ModelFileError(f"{where}: a gpt2 tokenizer needs tokenizer.ggml.merges, "
                                     "which is missing")
            backend = _byte_level_backend(vocab, merges, pre, where)
            add_space_prefix = False
            try:
                _add_special_tokens(backend, texts, token_types)
            except Exception as e:  # tokenizers raises bare Exceptions; the vocabulary is data from the file
                raise ModelFileError(f"{where}: bad tokenizer vocabulary: {_one_line(e)}") from None
        else:
            scores = _array(gguf, "tokenizer.ggml.scores", float)
            if scores is None or len(scores) != len(tokens):
                raise ModelFileError(f"{where}: a llama tokenizer needs one tokenizer.ggml.scores "
                                     "entry per token")
            add_space_prefix = gguf.get_bool("tokenizer.ggml.add_space_prefix", True)
            unk_id = token_id("unknown_token_id")
            added = [t for t, ty in zip(texts, token_types, strict=True)
                     if ty in (CONTROL, UNKNOWN, USER_DEFINED)]
            backend = SentencePieceBPE(texts, vocab, scores, added, add_space_prefix,
                                       texts[unk_id] if unk_id is not None else None)

        eos_id = token_id("eos_token_id")
        stops = {i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        stops.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and token_types[vocab[t]] == CONTROL)
        return cls(kind=kind, tokens=tokens, token_types=token_types, backend=backend,
                   bos_id=token_id("bos_token_id"), eos_id=eos_id,
                   # llama.cpp's defaults: SentencePiece and Llama 3 vocabularies start with BOS, other
                   # byte-level ones do not
                   add_bos=gguf.get_bool("tokenizer.ggml.add_bos_token", kind == "llama" or pre in _LLAMA3_FAMILY),
                   add_eos=gguf.get_bool("tokenizer.ggml.add_eos_token", False),
                   add_space_prefix=add_space_prefix, stop_ids=frozenset(stops))

    # ---- encoding ----

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`. Special-token strings in the text become their ids; BOS (and EOS, where
        the model asks for it) are added when `add_special`."""
        text = _valid_text(text)
        if isinstance(self._backend, SentencePieceBPE):
            ids = self._backend.encode(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    # ---- decoding ----

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (control tokens: their text)."""
        text, ttype = self.tokens[token_id], self.token_types[token_id]
        if ttype in (CONTROL, USER_DEFINED, UNKNOWN):
            return text.encode("utf-8")
        if self.kind == "gpt2":
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in text)
            except KeyError:  # not spelled in the byte alphabet: the text itself (llama.cpp does the same)
                return text.encode("utf-8")
        if ttype == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace(SPIECE_SPACE, " ").encode("utf-8")

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of `ids`. Control tokens appear as their text unless `skip_special`. Bytes that do
        not form valid UTF-8 become U+FFFD."""
        stream = self.stream(skip_special=skip_special)
        return "".join(stream.add(i) for i in ids) + stream.flush()

    def piece(self, token_id: int) -> str:
        """A token as readable text: its UTF-8 text, with bytes that are not whole characters escaped."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def is_special(self, token_id: int) -> bool:
        """A control token (BOS, EOS, <|im_start|>, ...) or the unknown token."""
        return self.token_types[token_id] in (CONTROL, UNKNOWN)

    def stream(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, {self.vocab_size} tokens, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r})")


class StreamDecoder:
    """Decodes tokens one at a time. `add` returns only complete characters: a multi-byte character
    split across tokens is held back until its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # A SentencePiece encoder put one space in front of the text; the first piece gives it back.
        self._strip_space = tokenizer.kind == "llama" and tokenizer.add_space_prefix

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < self._tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self._tok.vocab_size}")
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        text = self._utf8.decode(self._tok.token_bytes(token_id))
        if self._strip_space and text:
            self._strip_space = False
            if text[0] == " ":
                text = text[1:]
        return text

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---- backends ----

_GGUF_STRING, _GGUF_ARRAY = GGUFValueType.STRING, GGUFValueType.ARRAY
_ELEMENT_KINDS = {
    str: {GGUFValueType.STRING},
    int: {GGUFValueType.INT8, GGUFValueType.UINT8, GGUFValueType.INT16, GGUFValueType.UINT16, GGUFValueType.INT32,
          GGUFValueType.UINT32, GGUFValueType.INT64, GGUFValueType.UINT64},
}
_ELEMENT_KINDS[float] = _ELEMENT_KINDS[int] | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


def _array(gguf: GGUFFile, key: str, kind: type) -> Sequence | None:
    """An array of `kind` elements (checked by its stored type, not element by element: a vocabulary has
    ~10^5 of them); None when absent."""
    if gguf.metadata.get(key) is None:
        return None
    vtype, sub = gguf.types.get(key, (None, None))
    if vtype != _GGUF_ARRAY or sub not in _ELEMENT_KINDS[kind]:
        shown = sub.name.lower() if vtype == _GGUF_ARRAY and sub is not None else getattr(vtype, "name", "?").lower()
        raise ModelFileError(f"{gguf.path}: metadata {key} is {'an array of ' if vtype == _GGUF_ARRAY else 'a '}"
                             f"{shown}, not an array of {kind.__name__}")
    return gguf.metadata[key]


def _valid_text(text: str) -> str:
    """`text` as valid Unicode: an argument or file that was not UTF-8 reaches Python with lone surrogates
    (which `tokenizers` refuses); their bytes are decoded again with U+FFFD for what is not UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogateescape" if _only_escapes(text) else "replace").decode(
            "utf-8", errors="replace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _one_line(error: Exception) -> str:
    return safe_text(" ".join(str(error).split()))


def _byte_level_backend(vocab: dict[str, int], merges: list[str], pre: str, where: Path) -> _HFTokenizer:
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as _HFTokenizer

    # A merge whose result is not a token can never produce one (llama.cpp skips it too); `tokenizers`
    # would crash on it, so it is left out.
    try:
        pairs = [(a, b) for a, b in (m.split(" ", 1) for m in merges) if a + b in vocab]
    except ValueError:
        bad = next(m for m in merges if " " not in m)
        raise ModelFileError(f"{where}: tokenizer merge {safe_text(repr(bad), 60)} is not two tokens") from None
    try:
        model = models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_FAMILY)
    except Exception as e:  # tokenizers raises a bare Exception for merges of unknown tokens
        raise ModelFileError(f"{where}: bad tokenizer merges: {_one_line(e)}") from None
    backend = _HFTokenizer(model)
    splits = _SPLITS.get(pre, _SPLITS["default"])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def _add_special_tokens(backend: _HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control, unknown and user-defined tokens are matched whole wherever their text appears."""
    from tokenizers import AddedToken

    typed = list(zip(tokens, token_types, strict=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in typed if ty in (CONTROL, UNKNOWN) and t])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in typed if ty == USER_DEFINED and t])
