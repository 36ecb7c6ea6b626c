"""A Hugging Face tokenizer folder -> the GGUF tokenizer metadata (tokenizer.ggml.* and the chat template).

Reads tokenizer.json (byte-level BPE: GPT-2, Llama 3, Qwen 2/3, SmolLM), tokenizer_config.json,
chat_template.jinja / chat_template.json and config.json; writes with gguf.GGUFWriter's add_* calls.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

from quant.errors import ModelFileError, UnsupportedError

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass
class TokenizerMeta:
    """What GGUF stores about a tokenizer. tokens[i] is token id i in the byte-level alphabet."""

    model: str  # tokenizer.ggml.model: "gpt2" for byte-level BPE
    pre: str  # tokenizer.ggml.pre: the pre-tokenizer (the regex split before BPE), as llama.cpp names it
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None

    def add_to(self, w: GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        w.add_token_merges(self.merges)
        w.add_add_space_prefix(False)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _walk(node: Any):
    """Every dict inside a tokenizer.json component (Sequence nests them)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """Name llama.cpp gives to this split: recognized from the regex and the steps of the pre-tokenizer."""
    parts = list(_walk(pre_tokenizer))
    types = [p.get("type") for p in parts]
    regexes = [p["pattern"].get("Regex", "") for p in parts
               if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if regexes:
        rx = regexes[0]
        if r"\p{N}{1,3}" in rx:
            return "llama-bpe"
        if r"(?i:'s|'t|'re|'ve|'m|'ll|'d)" in rx and r"\p{N}" in rx:
            return "qwen2"
    elif "ByteLevel" in types:
        digits = [p for p in parts if p.get("type") == "Digits"]
        if digits and digits[0].get("individual_digits"):
            return "smollm"
        byte_level = next(p for p in parts if p.get("type") == "ByteLevel")
        if byte_level.get("use_regex", True):
            return "gpt-2"  # llama.cpp spells this one with a hyphen
    warnings.warn("unrecognized pre-tokenizer in tokenizer.json; writing 'default' (llama.cpp may split "
                  "text differently)", stacklevel=2)
    return "default"


def _chat_template(folder: Path, tok_config: dict) -> str | list[dict[str, str]] | None:
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = _load_json(folder / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise ModelFileError(f"{folder}: chat_template is neither a string nor a list of named templates")
    return template


def _adds_bos(tok_json: dict, tok_config: dict, bos: str | None) -> tuple[bool, bool]:
    """(add_bos, add_eos): tokenizer_config's flags, else what the post-processor template inserts."""
    add_bos, add_eos = tok_config.get("add_bos_token"), tok_config.get("add_eos_token")
    single = []
    for p in _walk(tok_json.get("post_processor")):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            break
    specials = [(i, s["SpecialToken"]["id"]) for i, s in enumerate(single) if "SpecialToken" in s]
    if add_bos is None:
        add_bos = any(i == 0 for i, _ in specials) and (bos is None or specials[0][1] == bos)
    if add_eos is None:
        add_eos = any(i == len(single) - 1 and i > 0 for i, _ in specials)
    return bool(add_bos), bool(add_eos)


def read_hf_tokenizer(folder: Path, vocab_size: int | None = None) -> TokenizerMeta:
    """Tokenizer metadata from a Hugging Face folder; `vocab_size` (from config.json) pads the token list."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(f"{folder}: no tokenizer.json (llm needs the fast-tokenizer file)")
    tok_json = _load_json(path)
    tok_config = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    model = tok_json.get("model") or {}
    is_byte_level = any(p.get("type") == "ByteLevel" for p in _walk(tok_json.get("pre_tokenizer")))
    if model.get("type") != "BPE" or not is_byte_level:
        raise UnsupportedError(f"{path}: only byte-level BPE tokenizers are supported "
                               f"(this one is {model.get('type')}{'' if is_byte_level else ', not byte-level'})")

    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    n = max(vocab_size or 0, max(vocab.values()) + 1)
    by_id: dict[int, str] = {tid: text for text, tid in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special_ids: dict[str, int] = {}
    for kind in SPECIAL_KINDS:
        text = _token_text(tok_config.get(f"{kind}_token"))
        if text is not None and text in vocab:
            special_ids[kind] = vocab[text]
    config = _load_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    for kind in ("bos", "eos"):  # config.json's ids when the tokenizer config names none
        tid = config.get(f"{kind}_token_id")
        if kind not in special_ids and isinstance(tid, int) and 0 <= tid < n:
            special_ids[kind] = tid
    bos_text = tokens[special_ids["bos"]] if "bos" in special_ids else None
    add_bos, add_eos = _adds_bos(tok_json, tok_config, bos_text)
    return TokenizerMeta(
        model="gpt2", pre=pre_tokenizer_name(tok_json.get("pre_tokenizer")), tokens=tokens,
        token_types=[int(t) for t in types], merges=merges, special_ids=special_ids,
        add_bos=add_bos, add_eos=add_eos, chat_template=_chat_template(folder, tok_config),
    )
