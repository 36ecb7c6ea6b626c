"""Our GGUF reader against gguf-py's GGUFReader, and its validation of bad files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

from backends import read_hparams
from quant.errors import ModelFileError, UnsupportedError
from quant.gguf_file import read_gguf


def test_reader_equals_gguf_py(smollm2_path, smollm2_gguf):
    ref = GGUFReader(smollm2_path)
    assert len(ref.tensors) == len(smollm2_gguf.tensors) == 272
    for t in ref.tensors:
        ours = smollm2_gguf.tensors[t.name]
        assert ours.qtype == t.tensor_type
        assert ours.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(ours.data).view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel())
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert smollm2_gguf.metadata[key] == pytest.approx(field.contents()), key


def test_type_tables_equal_gguf_py():
    """quant.formats and quant.gguf_file keep their own copies of gguf-py's type tables (a start-up saving)."""
    import gguf

    from quant import formats, gguf_file

    ours = {t.name: (t.value, formats.GGML_QUANT_SIZES[t]) for t in formats.GGMLQuantizationType}
    theirs = {t.name: (t.value, gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert ours == {k: v for k, v in theirs.items() if k in ours}
    assert set(ours) >= {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                         "Q5_K", "Q6_K"}
    assert {v.name: v.value for v in gguf_file.GGUFValueType} == {v.name: v.value for v in gguf.GGUFValueType}


def test_tensors_are_views_of_the_file_not_copies(smollm2_gguf):
    t = smollm2_gguf.tensors["blk.0.ffn_up.weight"]
    assert isinstance(t.data.base, np.memmap) or isinstance(t.data, np.memmap)
    assert not t.data.flags.writeable


def test_hparams_of_smollm2(smollm2_gguf):
    hp = read_hparams(smollm2_gguf)
    assert (hp.arch, hp.n_layers, hp.n_embd, hp.n_heads, hp.n_kv_heads, hp.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (hp.n_ff, hp.n_vocab, hp.n_ctx_train, hp.rope_base) == (1536, 49152, 8192, 100000.0)
    assert hp.tied_embeddings and not hp.qkv_bias and not hp.qk_norm and not hp.rope_neox


def write_tiny(path, arch="llama", qtype=GGMLQuantizationType.F32):
    """A one-layer model file with the given architecture and weight type."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(64)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.normal(size=(16, 32)).astype(np.float32))
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor("blk.0.attn_q.weight", rng.normal(size=(32, 32)).astype(np.float32))
    else:
        # one 256-weight block per row
        size = GGML_QUANT_SIZES[qtype][1] * 256 // GGML_QUANT_SIZES[qtype][0]
        w.add_tensor("blk.0.attn_q.weight", np.zeros((32, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("items", [
    ["a", "", "bc", "é€😀", " ", "\n\n", "<0x00>"],  # decoded at once
    ["a", "b\x00c", "", "d"],  # a NUL inside a string: one at a time
    [b"ok", b"\xff\xfe bad", "", b"\xe2\x82"],  # not UTF-8: one at a time, replaced
])
def test_string_arrays(tmp_path, items):
    w = GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_array("test.strings", items)
    w.add_array("test.empty", [])
    w.add_string("test.after", "still read")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    g = read_gguf(tmp_path / "s.gguf", check_types=False)
    as_text = [i.decode("utf-8", "replace") if isinstance(i, bytes) else i for i in items]
    strings = g.metadata["test.strings"]  # kept as the file's bytes: read one by one, or all at once
    assert strings == as_text and list(strings) == as_text and len(strings) == len(as_text)
    assert [strings[i] for i in range(-len(items), len(items))] == as_text * 2
    assert strings[1:3] == as_text[1:3] and strings[::-1] == as_text[::-1]
    with pytest.raises(IndexError):
        strings[len(items)]
    assert g.metadata["test.after"] == "still read"


def test_a_vocabulary_stays_in_the_file_until_read(smollm2_path):
    """Reading SmolLM2's header makes no Python string per token or merge (97,884 of them, 8.3 MB as
    strings): a process that never tokenizes (a benchmark, `llm show`) does not hold them."""
    import tracemalloc

    tracemalloc.start()
    try:
        g = read_gguf(smollm2_path)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152 and len(g.metadata["tokenizer.ggml.merges"]) == 48900
    assert held < 1.5e6, held
    assert g.metadata["tokenizer.ggml.tokens"][1] == "<|im_start|>"


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 10**6])
def test_string_array_with_a_length_past_the_end(tmp_path, length):
    w = GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_array("test.strings", ["first", "second", "third"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    raw = bytearray((tmp_path / "s.gguf").read_bytes())
    at = raw.index(b"second") - 8
    raw[at:at + 8] = length.to_bytes(8, "little")
    (tmp_path / "s.gguf").write_bytes(raw)
    with pytest.raises(ModelFileError, match="string array cut off"):
        read_gguf(tmp_path / "s.gguf", check_types=False)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is a text file, not a model " * 10)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(p)


def test_truncated_gguf(tmp_path, smollm2_path):
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        p.write_bytes(src.read(20_000_000))
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf(p)
    p.write_bytes(p.read_bytes()[:100_000])  # cut inside the metadata
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf(p)


def test_unsupported_architecture(tmp_path):
    gguf = read_gguf(write_tiny(tmp_path / "neox.gguf", arch="gptneox"))
    with pytest.raises(UnsupportedError, match="unsupported architecture 'gptneox'"):
        read_hparams(gguf)


def test_unsupported_tensor_type(tmp_path):
    p = write_tiny(tmp_path / "iq2.gguf", qtype=GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        read_gguf(p)


def test_missing_tensor_is_named(tmp_path):
    gguf = read_gguf(write_tiny(tmp_path / "tiny.gguf"))
    with pytest.raises(ModelFileError, match="tensor .* is missing"):
        read_hparams(gguf)
