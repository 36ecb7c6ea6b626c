"""Tokenizer tests. Oracles: transformers' tokenizer for the same GGUF file, and for the SentencePiece
path also the `sentencepiece` library that trained the vocabulary."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import gguf
import pytest
from conftest import WIKITEXT
from oracle import hf_tokenizer, scored_bpe_oracle

from llmcli.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer
from quant.errors import ModelFileError, UnsupportedError
from quant.gguf_file import read_gguf

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? They'll say we've I'd.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * 3.14159e-2); }',
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e10 0x1F 1,000,000 2024-11-25",
    "中文分词测试：你好，世界！日本語のテキストも。한국어 문장입니다.",
    "العربية: مرحبا بالعالم، كيف حالك؟",
    "Русский текст: Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "हिन्दी: नमस्ते दुनिया, आप कैसे हैं?",
    "Emoji: 🤗🚀🔥 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs\n\nnewlines\r\n\r\nwindows\n\n\n   \n\t \n",
    "a  b   c    d     e      f",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "Mixed: café naïve résumé Ångström ﬁ Straße ∑ ∫ √ ∞ → ⇒",
    "URLs https://example.com/path?q=1&x=y#frag and a.b@c.org",
    "zero\u200bwidth, soft\u00adhyphen, ZWJ\u200dalone",
    "",
    " ",
    "\n",
]


def random_texts(n: int, seed: int) -> list[str]:
    """Short strings of mixed scripts, emoji parts, odd whitespace, digits and special-token strings."""
    import random

    rng = random.Random(seed)
    alphabet = [chr(c) for r in ((0x20, 0x7F), (0xC0, 0x250), (0x400, 0x450), (0x4E00, 0x4E40),
                                 (0x905, 0x939)) for c in range(*r)]
    alphabet += ["🤗", "\u200d", "\ufe0f", " ", "  ", "\n", "\t", "\r", "\u3000", "\u2028",
                 "<|im_start|>", "<|im_end|>", "'s", "'LL", " 123", "²", "٣"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


# Text cut so that multi-byte characters span several byte-level tokens.
MULTIBYTE = "日本語のテキスト 👨‍👩‍👧‍👦 🏳️‍🌈 한국어 🤗 नमस्ते"


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    return hf_tokenizer(smollm2_path)


def test_builds_fast_with_the_model_metadata(smollm2_gguf):
    # CPU time, not wall time: the test machine is shared, and what we check is our own work.
    times = []
    for _ in range(3):
        start = time.process_time()
        tok = Tokenizer.from_gguf(smollm2_gguf)
        times.append(time.process_time() - start)
    print(f"tokenizer build (49152 tokens, 48900 merges): best {min(times) * 1e3:.0f} ms CPU")
    assert min(times) < 0.3  # 50-90 ms on a 2-core machine
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.bos_token, tok.eos_id, tok.eos_token) == (1, "<|im_start|>", 2, "<|im_end|>")
    assert tok.add_bos is False  # tokenizer.ggml.add_bos_token = false in this file
    assert tok.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>


@pytest.mark.slow
def test_encode_and_decode_match_transformers(tok, hf_tok):
    # Neither side adds BOS here: the file says add_bos_token = false, and transformers reads the same key.
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert ids == tok.encode(text, add_special=False)
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    text = WIKITEXT.read_text(encoding="utf-8")[:50_000]
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == text


# tokenizer.ggml.pre = smollm: every digit (\p{N}) is split off before GPT-2's regex runs, as in
# SmolLM2's own tokenizer.json (a Digits pre-tokenizer) and in llama.cpp. transformers' GGUF loader
# gives every gpt2 vocabulary GPT-2's regex alone, which differs on digits after two or more spaces
# and on non-ASCII digits after a space. There we follow SmolLM2's tokenizer.json and llama.cpp.


def test_digits_are_split_off_like_smollm2_and_llama_cpp(tok):
    # transformers' GGUF tokenizer: " ²" -> [3351 " Â", 127 "²"], "^  7" -> [78, 216, 216, 39]
    assert tok.encode(". ²") == [30, 216, 19133]
    assert tok.encode("x ½ y") == [104, 216, 16738, 329]
    assert tok.encode("^  7") == [78, 256, 39]
    assert tok.encode("v 2") == [102, 216, 34]


@pytest.mark.slow
def test_random_text_matches_smollm2_own_pre_tokenizer(tok, hf_tok):
    # The oracle: transformers' GGUF tokenizer with SmolLM2's tokenizer.json pre-tokenizer put back.
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    reference = Backend.from_str(hf_tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in [*CORPUS, *random_texts(500, seed=0), "x =  7", "12 ² ½ ٣"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text


def test_special_tokens_inside_text(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert tok.is_special(1) and not tok.is_special(ids[1])
    assert tok.piece(1) == "<|im_start|>"
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    # Only whole special strings count: a near miss is ordinary text.
    assert 1 not in tok.encode("<|im_start |>")


def test_piece_is_readable(tok):
    assert tok.piece(19556) == "Hello"
    assert tok.piece(905) == " world"
    first = tok.encode("日")[0]  # the first token holds only part of the character's three bytes
    assert tok.piece(first).startswith("\\x")


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode(MULTIBYTE)
    stream = tok.stream()
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") > 0  # some tokens ended mid-character and had to wait
    # A character cut off at the end comes out as U+FFFD on flush, not before.
    stream = tok.stream()
    partial = [stream.add(i) for i in tok.encode("🤗")[:-1]]
    assert partial == ["", ""] and stream.flush() == "\ufffd"


def test_stream_decoder_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.stream().add(tok.vocab_size)


# ---- files that are not SmolLM2 ----

def write_vocab_gguf(path: Path, model: str, tokens: list[str], types: list[int], **keys) -> Path:
    """A GGUF with tokenizer metadata and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "scores" in keys:
        writer.add_token_scores(keys.pop("scores"))
    if "merges" in keys:
        writer.add_token_merges(keys.pop("merges"))
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_and_broken_tokenizers(tmp_path):
    bert = write_vocab_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [CONTROL, NORMAL])
    with pytest.raises(UnsupportedError, match="tokenizer type 'bert' is not supported"):
        Tokenizer.from_gguf(read_gguf(bert))
    no_merges = write_vocab_gguf(tmp_path / "gpt2.gguf", "gpt2", ["a", "b"], [NORMAL, NORMAL])
    with pytest.raises(ModelFileError, match="merges"):
        Tokenizer.from_gguf(read_gguf(no_merges))
    unknown_part = write_vocab_gguf(tmp_path / "part.gguf", "gpt2", ["a", "ac"], [NORMAL, NORMAL],
                                    merges=["a c"])
    with pytest.raises(ModelFileError, match="bad tokenizer merges"):
        Tokenizer.from_gguf(read_gguf(unknown_part))
    # A merge that makes no token is skipped, as llama.cpp does.
    dangling = write_vocab_gguf(tmp_path / "dangling.gguf", "gpt2", ["a", "b"], [NORMAL, NORMAL],
                                merges=["a b"])
    assert Tokenizer.from_gguf(read_gguf(dangling)).encode("ab") == [0, 1]
    bad_eos = write_vocab_gguf(tmp_path / "eos.gguf", "gpt2", ["a", "b", "ab"], [NORMAL] * 3, merges=["a b"],
                               eos_token_id=7)
    with pytest.raises(ModelFileError, match="outside the vocabulary"):
        Tokenizer.from_gguf(read_gguf(bad_eos))


# ---- SentencePiece (tokenizer.ggml.model = llama) ----

SPM_CONTROL = ["<|im_start|>", "<|im_end|>"]
SPM_USER = ["<tool>"]


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    """A SentencePiece BPE model trained here on wikitext (vocabulary 1200, byte fallback: CJK and emoji
    are not in it), and a GGUF holding its vocabulary the way llama.cpp's converter writes one."""
    import io

    spm = pytest.importorskip("sentencepiece")
    lines = [line for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:3000]
    lines += ["Съешь же ещё этих мягких французских булок, да выпей чаю."] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=1200,
        byte_fallback=True, character_coverage=1.0, split_digits=True, control_symbols=SPM_CONTROL,
        user_defined_symbols=SPM_USER, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return UNKNOWN
        if sp.is_control(i):
            return CONTROL
        if sp.is_unused(i):
            return UNUSED
        if sp.is_byte(i):
            return BYTE
        return USER_DEFINED if sp.id_to_piece(i) in SPM_USER else NORMAL

    n = sp.get_piece_size()
    path = write_vocab_gguf(
        tmp_path_factory.mktemp("spm") / "spm-bpe.gguf", "llama",
        [sp.id_to_piece(i) for i in range(n)], [token_type(i) for i in range(n)],
        scores=[sp.get_score(i) for i in range(n)], bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
        unk_token_id=sp.unk_id(), add_bos_token=True, add_space_prefix=True)
    return sp, path


@pytest.fixture(scope="module")
def spm_tok(spm_files) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(spm_files[1]))


def test_sentencepiece_matches_transformers(spm_files, spm_tok):
    from transformers import AutoTokenizer

    path = spm_files[1]
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert spm_tok.add_bos and spm_tok.bos_id == 1  # both add BOS: add_bos_token = true in the file
    assert spm_tok.stop_ids == {2, spm_tok.tokens.index("<|im_end|>")}
    corpus = CORPUS + random_texts(300, seed=1)
    corpus += ["<tool>call<tool> and <|im_start|>x<|im_end|>", "<unk> stays whole", "<s>x</s>", "word"]
    for text in corpus:
        ids = spm_tok.encode(text)
        assert ids == hf.encode(text), text
        # transformers' decoder drops one leading space, as ours does, so compare without the BOS
        assert spm_tok.decode(ids[1:]) == hf.decode(ids[1:]), text
        if not text.startswith(" "):
            assert spm_tok.decode(ids[1:]) == text
    text = WIKITEXT.read_text(encoding="utf-8")[300_000:350_000]
    assert spm_tok.encode(text) == hf.encode(text)


def test_sentencepiece_matches_sentencepiece(spm_files, spm_tok):
    # The merges we derive from the scores must cut text as SentencePiece itself does. (Leading spaces
    # and special-token strings are where transformers and SentencePiece differ; we follow transformers.)
    sp = spm_files[0]
    text = WIKITEXT.read_text(encoding="utf-8")[300_000:400_000].replace("<unk>", "unk")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines += ["中文 🤗 text", "Съешь же ещё", "x 👨‍👩‍👧‍👦 y"]
    for line in lines:
        assert spm_tok.encode(line) == [sp.bos_id(), *sp.encode(line)], line


def test_sentencepiece_byte_fallback_streams_whole_characters(spm_tok):
    ids = spm_tok.encode(MULTIBYTE, add_special=False)
    assert sum(spm_tok.token_types[i] == BYTE for i in ids) > 10  # CJK and emoji are not in the vocabulary
    stream = spm_tok.stream()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == spm_tok.decode(ids) == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)
    assert spm_tok.piece(spm_tok.tokens.index("<0x41>")) == "A"


# ---- other byte-level pre-tokenizers (tokenizer.ggml.pre) ----

BYTE_LEVEL_PRES = ["gpt-2", "llama-bpe", "qwen2", "smollm", "starcoder", "falcon", "deepseek-coder"]


@pytest.fixture(scope="module")
def byte_level_files(tmp_path_factory) -> dict[str, Path]:
    """A byte-level BPE trained here on wikitext (1500 tokens, digits merged), written once per
    pre-tokenizer name, each file in its own folder (transformers loads a folder)."""
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    lines = [line for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:3000]
    backend.train_from_iterator(lines, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [CONTROL if t in specials else NORMAL for t in tokens]
    root = tmp_path_factory.mktemp("byte-level")
    files = {}
    for pre in BYTE_LEVEL_PRES:
        (root / pre).mkdir()
        files[pre] = write_vocab_gguf(root / pre / "bpe.gguf", "gpt2", tokens, types, merges=merges,
                                      tokenizer_pre=pre, eos_token_id=tokens.index("<|im_end|>"))
    return files


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(byte_level_files, pre):
    # transformers knows these three split regexes (it reads the others as gpt-2, unlike llama.cpp).
    from transformers import AutoTokenizer

    path = byte_level_files[pre]
    ours = Tokenizer.from_gguf(read_gguf(path))
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [*CORPUS, "I'M HERE, YOU'LL SEE", "12345678 x²"]:
        ids = ours.encode(text, add_special=False)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text


def test_pre_tokenizers_match_llama_cpp(byte_level_files, smollm2_path, tok):
    # llama.cpp is the reference for GGUF files; its Python binding is optional here.
    llama_cpp = pytest.importorskip("llama_cpp")
    files = {**byte_level_files, "smollm2": smollm2_path}
    for name, path in files.items():
        ours = tok if name == "smollm2" else Tokenizer.from_gguf(read_gguf(path))
        reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        for text in [*CORPUS, "I'M HERE, YOU'LL SEE", "12345678 x² ½"]:
            expected = reference.tokenize(text.encode(), add_bos=False, special=True)
            assert ours.encode(text, add_special=False) == expected, (name, text)


# ---- SentencePiece without a merge list, against the merge list transformers builds ----

def test_gemma3_scored_merging_equals_the_merge_list(gemma3_path):
    """Our encoder ranks pairs as it meets them; transformers sorts half a million merges up front. Same ids on
    hostile text, random strings, random runs of Gemma's own pieces and a page of wikitext."""
    gguf = read_gguf(gemma3_path)
    tok = Tokenizer.from_gguf(gguf)
    unk = gguf.metadata.get("tokenizer.ggml.unknown_token_id")
    oracle = scored_bpe_oracle(tok.tokens, list(gguf.metadata["tokenizer.ggml.scores"]), tok.token_types,
                               tok.add_space_prefix, tok.tokens[unk] if unk is not None else None)
    rng = random.Random(0)
    pieces = [rng.choice(tok.tokens).replace("\u2581", rng.choice([" ", "\u2581"])) for _ in range(3000)]
    runs = ["".join(pieces[i:i + rng.randint(1, 12)]) for i in range(0, 3000, 6)]
    for text in [*CORPUS, *random_texts(300, seed=2), *runs, WIKITEXT.read_text(encoding="utf-8")[:20_000]]:
        assert tok.encode(text, add_special=False) == oracle(text), text


def test_scored_merging_on_odd_vocabularies(tmp_path):
    """Duplicate pieces, NaN and tied scores, a missing byte token (so the unknown token, fused), user-defined
    and control tokens that overlap: the same ids as the merge-list oracle."""
    chars = ["a", "b", "c", "\u2581"]
    tokens = ["<unk>", "<s>", "</s>", "<ctl>", "<ctl>x", "ab"]
    types = [UNKNOWN, CONTROL, CONTROL, CONTROL, USER_DEFINED, USER_DEFINED]
    tokens += [f"<0x{b:02X}>" for b in range(256) if b != 0xA9]  # é's second byte is missing: é is unknown
    types += [BYTE] * 255
    tokens += chars + ["".join(p) for n in (2, 3) for p in itertools.product(chars, repeat=n)]
    tokens += ["ab", "\u2581a"]  # duplicates
    types += [NORMAL] * (len(tokens) - len(types))
    scores = [float((i * 7919) % 13) for i in range(len(tokens))]
    scores[len(tokens) - 30] = float("nan")
    scores[len(tokens) - 31] = float("nan")
    path = write_vocab_gguf(tmp_path / "odd.gguf", "llama", tokens, types, scores=scores, unk_token_id=0,
                            add_space_prefix=True)
    tok = Tokenizer.from_gguf(read_gguf(path))
    oracle = scored_bpe_oracle(tokens, scores, types, True, "<unk>")
    rng = random.Random(3)
    alphabet = ["a", "b", "c", " ", "é", "éé", "ab", "<ctl>", "<ctl>x", "<s>", "\u2581", "z", "日"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(2000)]
    for text in texts:
        assert tok.encode(text, add_special=False) == oracle(text), text
