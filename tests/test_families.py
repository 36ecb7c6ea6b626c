"""The family modules' checked reading of GGUF metadata: every hyper-parameter a buffer or a loop is sized by is
checked (type and range) before use, and a bad one is one ModelFileError line naming the file and the key.
Each case is a small GGUF written with gguf.GGUFWriter from a valid tiny model with one value changed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter
from oracle import kl_per_position

from backends import load_model
from quant.errors import ModelFileError, UnsupportedError
from quant.families import FAMILIES, HF_TYPES, layer_slots, read_hparams
from quant.gguf_file import read_gguf

U32, I32, F32, STR, BOOL = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32,
                            GGUFValueType.STRING, GGUFValueType.BOOL)


def tiny_metadata(arch: str = "llama") -> dict:
    """key -> (value type, value) of a valid 2-layer model: 64 wide, 4 heads of 16, 2 KV heads."""
    a = arch
    return {f"{a}.block_count": (U32, 2), f"{a}.embedding_length": (U32, 64), f"{a}.feed_forward_length": (U32, 96),
            f"{a}.context_length": (U32, 256), f"{a}.attention.head_count": (U32, 4),
            f"{a}.attention.head_count_kv": (U32, 2), f"{a}.attention.layer_norm_rms_epsilon": (F32, 1e-5),
            f"{a}.rope.freq_base": (F32, 10000.0), f"{a}.rope.dimension_count": (U32, 16),
            f"{a}.vocab_size": (U32, 40)}




def write_model(path, arch="llama", meta=None, n_layers=2, n_vocab=40, head_dim=16, extra_tensors=(),
                sliding_window=None):
    """A tiny random float32 model of `arch` with metadata `meta` (key -> (type, value), None to leave a key
    out) written over tiny_metadata's; its tensors follow the family's slots for 2 layers."""
    fields = tiny_metadata(arch)
    if sliding_window is not None:
        fields[f"{arch}.attention.sliding_window"] = (U32, sliding_window)
    if head_dim != 16:
        fields[f"{arch}.attention.key_length"] = (U32, head_dim)
        fields[f"{arch}.attention.value_length"] = (U32, head_dim)
        fields[f"{arch}.rope.dimension_count"] = (U32, head_dim)
    fields.update(meta or {})
    w = GGUFWriter(path, arch)
    for key, item in fields.items():
        if item is not None:
            w.add_key_value(key, item[1], item[0])
    rng = np.random.default_rng(0)
    hp = read_hparams_like(arch, n_vocab, head_dim)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    for i in range(n_layers):
        for slot in layer_slots(hp).values():
            data = 0.1 * rng.standard_normal(slot.shape) + (1.0 if slot.gguf.endswith("norm.weight") else 0.0)
            w.add_tensor(f"blk.{i}.{slot.gguf}", data.astype(np.float32))
    for name, data in extra_tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_hparams_like(arch, n_vocab, head_dim):
    """The HParams of the valid tiny model (to lay out its tensors)."""
    from quant.families.spec import HParams

    fields = dict(arch=arch, n_vocab=n_vocab, n_embd=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                  n_ff=96, n_ctx_train=256, norm_eps=1e-5, rope_base=1e4, rope_dim=head_dim, rope_neox=False,
                  rope_scale=1.0, tied_embeddings=True, qkv_bias=False, qk_norm=False, has_rope_freqs=False)
    fields |= {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True},
               "gemma3": {"qk_norm": True, "norm": "sandwich"},
               "phi3": {"fused_qkv": True, "fused_gate_up": True}}[arch]
    return HParams(**fields)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_valid_tiny_models_load(arch, tmp_path):
    gguf = read_gguf(write_model(tmp_path / "m.gguf", arch, sliding_window=8 if arch == "gemma3" else None))
    hp = read_hparams(gguf)
    assert (hp.arch, hp.n_layers, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.n_vocab) == (arch, 2, 4, 2, 16, 40)


KEY_CASES = [
    # (key suffix, (type, value), what the message says)
    ("block_count", (U32, 0), "in 1..4096"),
    ("block_count", (U32, 5000), "in 1..4096"),
    ("block_count", (I32, -2), "in 1..4096"),
    ("block_count", (F32, 2.0), "an integer"),
    ("block_count", (STR, "2"), "an integer"),
    ("block_count", (BOOL, True), "an integer"),
    ("block_count", None, "missing"),
    ("embedding_length", (U32, 0), "in 1.."),
    ("embedding_length", (F32, math.nan), "an integer"),
    ("feed_forward_length", (U32, 0), "in 1.."),
    ("context_length", (U32, 0), "in 1.."),
    ("attention.head_count", (U32, 0), "in 1.."),
    ("attention.head_count_kv", (U32, 0), "in 1.."),
    ("attention.head_count_kv", (U32, 8), "not a multiple"),
    ("attention.head_count_kv", (U32, 3), "not a multiple"),
    ("attention.key_length", (U32, 15), "odd"),
    ("attention.key_length", (U32, 0), "in 2.."),
    ("attention.value_length", (U32, 32), "differs"),
    ("rope.dimension_count", (U32, 7), "must be even"),
    ("rope.dimension_count", (U32, 32), "at most the head size 16"),
    ("rope.freq_base", (F32, 0.0), "above 0"),
    ("rope.freq_base", (F32, -1.0), "above 0"),
    ("rope.freq_base", (F32, math.nan), "finite"),
    ("rope.freq_base", (F32, math.inf), "finite"),
    ("rope.freq_base", (STR, "1e4"), "a number"),
    ("attention.layer_norm_rms_epsilon", (F32, 0.0), "above 0"),
    ("attention.layer_norm_rms_epsilon", (F32, math.nan), "finite"),
    ("vocab_size", (U32, 41), "in 1..40"),
    ("vocab_size", (U32, 39), "differs from the 40 rows"),
    ("attention.sliding_window", (U32, 0), "in 1.."),
]


@pytest.mark.parametrize("suffix,item,says", KEY_CASES, ids=[f"{k}={v[1] if v else None}" for k, v, _ in KEY_CASES])
def test_bad_hyper_parameter_is_one_line_naming_file_and_key(suffix, item, says, tmp_path):
    path = write_model(tmp_path / "bad.gguf", meta={f"llama.{suffix}": item})
    gguf = read_gguf(path)
    with pytest.raises(ModelFileError) as e:
        read_hparams(gguf)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and says in msg
    if "differs" not in says:
        assert f"llama.{suffix}" in msg


def test_block_count_beyond_the_tensors_names_the_missing_one(tmp_path):
    gguf = read_gguf(write_model(tmp_path / "m.gguf", meta={"llama.block_count": (U32, 3)}))
    with pytest.raises(ModelFileError, match=r"tensor blk\.2\.attn_norm\.weight is missing"):
        read_hparams(gguf)


def test_wrong_tensor_shape_is_named(tmp_path):
    gguf = read_gguf(write_model(tmp_path / "m.gguf", meta={"llama.feed_forward_length": (U32, 128)}))
    with pytest.raises(ModelFileError, match=r"blk\.0\.ffn_gate\.weight has shape \(96, 64\), expected \(128, 64\)"):
        read_hparams(gguf)


def test_gemma3_needs_its_sliding_window(tmp_path):
    gguf = read_gguf(write_model(tmp_path / "m.gguf", "gemma3"))
    with pytest.raises(ModelFileError, match="gemma3.attention.sliding_window is missing"):
        read_hparams(gguf)


def test_unknown_architecture_and_rope_scaling(tmp_path):
    gguf = read_gguf(write_model(tmp_path / "m.gguf", meta={"llama.rope.scaling.type": (STR, "wild")}))
    with pytest.raises(UnsupportedError, match="RoPE scaling 'wild'"):
        read_hparams(gguf)
    gguf.metadata["general.architecture"] = "gpt\x1b[2J"
    with pytest.raises(UnsupportedError, match=r"unsupported architecture 'gpt\\x1b\[2J'"):
        read_hparams(gguf)


def test_registry():
    assert set(FAMILIES) >= {"llama", "qwen2", "qwen3", "gemma3", "phi3"}
    assert HF_TYPES["mistral"] is FAMILIES["llama"] and HF_TYPES["gemma3_text"] is FAMILIES["gemma3"]


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [16, 48])
def test_numba_partial_rope_and_odd_head_sizes_match_numpy(head_dim, tmp_path):
    """The accepted extremes the numba stack indexes by: RoPE on part of each head (rope_dim < head_dim), head
    sizes that are not multiples of 32, a sliding window shorter than the prompt; same logits as numpy."""
    meta = {"llama.rope.dimension_count": (U32, 8)}
    gguf = read_gguf(write_model(tmp_path / "m.gguf", meta=meta, head_dim=head_dim, sliding_window=5))
    assert read_hparams(gguf).windows == (5, 5)
    fast, ref = load_model(gguf, "numba", threads=2), load_model(gguf, "numpy")
    tokens = np.array([3, 17, 9, 5, 39, 2, 7, 31, 8, 1, 12, 30])
    want = ref.forward(tokens, ref.new_cache(16), all_logits=True)
    cache = fast.new_cache(16)
    got = np.concatenate([fast.forward(tokens[:9], cache, all_logits=True),
                          fast.forward(tokens[9:], cache, all_logits=True)])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_rotating_cache_equals_full_attention_masked_to_the_window(tmp_path):
    """numba keeps a sliding-window layer's last window + SMALL_T positions in a ring; decoding 40 tokens one
    at a time and in chunks (wrapping the ring many times), then a long prompt through the prompt path, gives
    the numpy reference's logits (a full cache, attention masked to the window)."""
    from backends.base import kv_cache_bytes
    from backends.numba import NumbaOptions

    GEMM_MIN_T_COLD, SMALL_T = NumbaOptions().gemm_min_t_cold, NumbaOptions().small_t

    gguf = read_gguf(write_model(tmp_path / "m.gguf", sliding_window=5))
    fast, ref = load_model(gguf, "numba", threads=2), load_model(gguf, "numpy")
    tokens = np.random.default_rng(1).integers(0, 40, 40 + GEMM_MIN_T_COLD)
    want = ref.forward(tokens, ref.new_cache(len(tokens)), all_logits=True)
    cache = fast.new_cache(len(tokens))
    assert cache.k.nbytes == kv_cache_bytes(fast.hparams, len(tokens), SMALL_T) // 2 == 2 * (5 + SMALL_T) * 2 * 16 * 4
    steps = [1] * 20 + [3, 8, 2, 7]  # 40 positions
    got, pos = [], 0
    for n in steps:
        got.append(fast.forward(tokens[pos:pos + n], cache, all_logits=True))
        pos += n
    got.append(fast.forward(tokens[pos:], cache, all_logits=True))  # >= GEMM_MIN_T_COLD: the prompt path
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-3, atol=1e-3)
    # the same pieces for their last logits only: the last layer then runs past its keys and values for the last
    # token alone (the ring still gets every position)
    cache, pos = fast.new_cache(len(tokens)), 0
    for n in steps + [len(tokens) - 40]:
        np.testing.assert_allclose(fast.forward(tokens[pos:pos + n], cache), want[pos + n - 1], rtol=1e-3, atol=1e-3)
        pos += n


def test_rotating_cache_trims_within_its_slack_else_drops_everything(tmp_path):
    from backends.base import RingKVCache

    gguf = read_gguf(write_model(tmp_path / "m.gguf", sliding_window=5))
    cache = RingKVCache(read_hparams(gguf), 100, slack=3)  # rings of 8 positions
    cache.offset = 30
    assert cache.trim(4) == 4 and cache.offset == 26  # positions 22..25 (what 26 sees) still in the ring 22..29
    cache.offset = 30
    assert cache.trim(5) == 30 and cache.offset == 0  # position 21 was overwritten: start again
    cache.offset = 6
    assert cache.trim(6) == 6 and cache.offset == 0


@pytest.mark.skipif(not __import__("backends").mlx_available(), reason="needs MLX")
def test_mlx_windowed_layers_keep_a_bounded_cache(tmp_path):
    """MLX keeps window - 1 + SLACK positions of a windowed layer: 40 tokens one at a time and in chunks give the
    numpy reference's logits (full cache, masked), its buffers stay that short, and trim within the slack works."""
    from backends.mlx.cache import SLACK

    gguf = read_gguf(write_model(tmp_path / "m.gguf", sliding_window=5))
    fast, ref = load_model(gguf, "mlx"), load_model(gguf, "numpy")
    tokens = np.random.default_rng(1).integers(0, 40, 40)
    want = ref.forward(tokens, ref.new_cache(64), all_logits=True)
    cache = fast.new_cache(64)
    got, pos = [], 0
    for n in [1] * 20 + [3, 8, 2, 7]:
        got.append(fast.forward(tokens[pos:pos + n], cache, all_logits=True))
        pos += n
        assert cache.keys[0].shape[2] <= 5 - 1 + SLACK
    # MLX holds float matrices as float16: compare distributions
    assert kl_per_position(np.concatenate(got), want).max() < 1e-4
    assert cache.trim(3) == 3
    assert kl_per_position(fast.forward(tokens[37:], cache, all_logits=True), want[37:]).max() < 1e-4
    cache, pos = fast.new_cache(64), 0
    for n in [1] * 20 + [3, 8, 2, 7]:  # last logits only: the last layer's windowed mask for the last query
        assert kl_per_position(fast.forward(tokens[pos:pos + n], cache)[None], want[pos + n - 1:pos + n]).max() < 1e-4
        pos += n
