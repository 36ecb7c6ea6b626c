"""The model families: one module each, registered in one table.

A family module holds everything its architecture means: `read_hparams` (hyper-parameters and block options from
GGUF metadata, checked), which weight slots a block reads (quant/families/spec.py gives their GGUF names and
shapes), and its Hugging Face names for `llm quantize`. Backends get an `HParams` and the weights by slot.
"""

from __future__ import annotations

from quant.errors import ModelFileError, UnsupportedError
from quant.families import gemma3, llama, phi3, qwen2, qwen3
from quant.families.family import Family
from quant.families.spec import (
    HParams,
    Slot,
    check_tensors,
    global_slots,
    global_weights,
    layer_slots,
    layer_weights,
    rope_groups,
    rope_inv_freq,
)
from quant.gguf_file import GGUFFile, safe_text

FAMILIES: dict[str, Family] = {f.arch: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY,
                                                    phi3.FAMILY)}
# Hugging Face model_type -> the family that converts it (an alias converts to its family's architecture)
HF_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in (f.arch, *f.hf_aliases)}

__all__ = ["FAMILIES", "HF_TYPES", "Family", "HParams", "Slot", "check_tensors", "family_for", "global_slots",
           "global_weights", "hf_family", "layer_slots", "layer_weights", "read_hparams", "rope_groups",
           "rope_inv_freq"]


def family_for(arch: str | None) -> Family:
    """The family of a GGUF architecture; one clear error for one the engine does not run."""
    family = FAMILIES.get(arch) if isinstance(arch, str) else None
    if family is None:
        shown = safe_text(str(arch), 60)
        raise UnsupportedError(f"unsupported architecture '{shown}' (supported: {', '.join(FAMILIES)})")
    return family


def hf_family(model_type: str | None) -> Family:
    """The family that converts a Hugging Face config's model_type."""
    family = HF_TYPES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        shown = safe_text(str(model_type), 60)
        raise UnsupportedError(f"unsupported architecture '{shown}' (config.json model_type; supported: "
                               f"{', '.join(HF_TYPES)})")
    return family


def read_hparams(gguf: GGUFFile) -> HParams:
    """The checked blueprint of `gguf`: its family's hyper-parameters, with every tensor the forward pass reads
    present in the shape they imply."""
    arch = gguf.get_str("general.architecture")  # ModelFileError when it is not a string
    if arch is None:
        raise ModelFileError(f"{gguf.path}: no general.architecture in metadata")
    hp = family_for(arch).read_hparams(gguf)
    check_tensors(gguf, hp)
    return hp
