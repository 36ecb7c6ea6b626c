"""SentencePiece BPE encoding straight from a scored vocabulary, with no merge list.

A GGUF `llama` vocabulary has no merges: a pair of adjacent pieces may merge when their concatenation is a
token, and the best-scoring such token merges first. transformers turns the scores into an explicit merge
list (every way to cut every token in two, sorted) and hands it to the `tokenizers` BPE; for Gemma's 262k
tokens that is half a million merges and seconds of start-up. Here the rank of a pair is computed when the
pair is met, from the same keys transformers sorts by, so the output is the same token for token:

    rank(a, b) = (score of a+b, descending; len(a), descending; len(b), descending; position of a+b)

and the merge loop is the one `tokenizers` runs (lowest rank first; the leftmost of equal ranks; a pair
that went stale is skipped). Text is cut at added tokens (control, unknown and user-defined tokens, the
longest match at the leftmost place) and each piece between them is one word: spaces become U+2581, and
the first piece of the text gets a U+2581 in front when the vocabulary asks for a space prefix.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence

SPIECE_SPACE = "\u2581"
MAX_MERGED_TOKEN = 256  # longest token a merge may make (Gemma's longest pieces are ~32 characters)


class SentencePieceBPE:
    """Text -> token ids for a scored SentencePiece vocabulary (byte fallback, unknown pieces fused)."""

    def __init__(self, tokens: Sequence[str], vocab: dict[str, int], scores: Sequence[float],
                 added: Iterable[str], add_space_prefix: bool, unk_token: str | None):
        """`vocab` maps each token to its id; a string that appears twice in `tokens` maps to its last id
        (and so its last score), and ranks by its first place, as transformers' dicts keep them."""
        self._vocab = vocab
        self._scores = scores
        self._first: dict[str, int] = {}
        if len(self._vocab) != len(tokens):
            for i, t in enumerate(tokens):
                self._first.setdefault(t, i)
        self._unk = unk_token
        self._bytes = [t if t in vocab else None for t in (f"<0x{b:02X}>" for b in range(256))]
        self._add_space_prefix = add_space_prefix
        self._added = {t for t in added if t}
        # Added tokens by first character: the distinct lengths to try there, longest first.
        lengths: dict[str, set[int]] = {}
        for t in self._added:
            lengths.setdefault(t[0], set()).add(len(t))
        self._added_lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._added_start = (re.compile("[" + "".join(re.escape(c) for c in sorted(lengths)) + "]")
                             if lengths else None)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for at, token in self._added_matches(text):
            if at > start:
                ids += self._word(text[start:at], start == 0)
            ids.append(self._vocab[token])
            start = at + len(token)
        if start < len(text):
            ids += self._word(text[start:], start == 0)
        return ids

    def _added_matches(self, text: str) -> Iterable[tuple[int, str]]:
        """(position, token) of each added token in `text`: leftmost first, the longest where several start."""
        if self._added_start is None:
            return
        i = 0
        while (m := self._added_start.search(text, i)) is not None:
            at = m.start()
            for n in self._added_lengths[text[at]]:
                if text[at:at + n] in self._added:
                    yield at, text[at:at + n]
                    i = at + n
                    break
            else:
                i = at + 1

    def _word(self, piece: str, first: bool) -> list[int]:
        piece = piece.replace(" ", SPIECE_SPACE)
        if first and self._add_space_prefix and not piece.startswith(SPIECE_SPACE):
            piece = SPIECE_SPACE + piece
        syms = self._symbols(piece)
        # syms[i] is None once merged into its left neighbour; nxt/prv link the live ones.
        n = len(syms)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            rank = self._rank(syms[i], syms[i + 1])
            if rank is not None:
                heap.append((rank, i, syms[i], syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] != a or j >= n or syms[j] != b:
                continue  # stale: one side merged since this pair was queued
            merged = syms[i] = a + b
            syms[j] = None
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
                rank = self._rank(merged, syms[k])
                if rank is not None:
                    heapq.heappush(heap, (rank, i, merged, syms[k]))
            h = prv[i]
            if h >= 0:
                rank = self._rank(syms[h], merged)
                if rank is not None:
                    heapq.heappush(heap, (rank, h, syms[h], merged))
        vocab = self._vocab
        return [vocab[s] for s in syms if s is not None]

    def _symbols(self, piece: str) -> list[str]:
        """One symbol per character; a character the vocabulary lacks becomes its byte tokens, else the
        unknown token (a run of them fused into one; a pending one is placed at the next known character,
        after any byte tokens, as `tokenizers` does)."""
        vocab, byte_tokens = self._vocab, self._bytes
        syms: list[str] = []
        unk_pending = False
        for ch in piece:
            if ch in vocab:
                if unk_pending:
                    syms.append(self._unk)
                    unk_pending = False
                syms.append(ch)
                continue
            fallback = [byte_tokens[b] for b in ch.encode("utf-8")]
            if None not in fallback:
                syms += fallback
            elif self._unk is not None:
                unk_pending = True
        if unk_pending:
            syms.append(self._unk)
        return syms

    def _rank(self, a: str, b: str) -> tuple | None:
        """Sort key of merging `a` and `b`, or None when they make no token."""
        t = a + b
        tid = self._vocab.get(t)
        if tid is None or len(t) > MAX_MERGED_TOKEN:
            return None
        score = self._scores[tid]
        # A NaN score sorts after every other (as numpy sorts it).
        return (score != score, 0.0 if score != score else -score, -len(a), -len(b), self._first.get(t, tid))
