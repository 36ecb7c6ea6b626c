"""Constrained decoding: a byte machine that says which tokens may come next, and the run state of one generation.

A Grammar is built once (llmcli/json_schema.py builds them for JSON) and shared; a Constraint follows one
generation through it. Each step the sampler only sees tokens whose bytes the machine accepts from where the
output stands, plus the stop tokens once the output is complete; a complete output that nothing can extend ends
the generation at once. The machine works on bytes, not characters, so a token holding part of a UTF-8
character is judged by the bytes it has.

The machine is a recursive transition network (llmcli/grammar_kernels.py walks it). It is deterministic: each
byte has at most one move, so one state and one stack describe the output so far.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from quant.errors import LlmError

MAX_STATES = 20000  # a schema that needs more states than this is refused (its tables would be large)


class GrammarError(LlmError):
    """The requested output format cannot be built (a schema keyword not supported, or one that conflicts)."""


class Builder:
    """States and their byte moves, before they are packed into tables. Calls into another machine (`call`)
    and unions of machines (`merge`) name start states whose moves may not exist yet (recursive schemas); they
    are resolved by `build`. A start state is never final and none of its moves pushes."""

    def __init__(self):
        self.moves: list[dict[int, tuple[int, int]]] = []  # state -> byte -> (target, return state or -1)
        self.final: list[bool] = []
        self.structural: list[bool] = []
        self.loop: list[bool] = []
        # free text: the state it stays in while nothing it watches for comes (-1: not free text of that kind)
        self.watch: list[int] = []
        self._pending: list[tuple[int, int, int]] = []  # (state, start state, return state or -1 for merge)
        self._disjoint: list[tuple[list[int], str]] = []

    def state(self, final: bool = False, structural: bool = True) -> int:
        if len(self.moves) >= MAX_STATES:
            raise GrammarError(f"the format needs more than {MAX_STATES} states; simplify the schema")
        self.moves.append({})
        self.final.append(final)
        self.structural.append(structural)
        self.loop.append(False)
        self.watch.append(-1)
        return len(self.moves) - 1

    def edge(self, s: int, data: Iterable[int] | bytes, target: int, ret: int = -1) -> None:
        for b in data:
            old = self.moves[s].get(b)
            if old is not None and old != (target, ret):
                raise GrammarError(f"two alternatives of the format both start with {bytes([b])!r} at the same "
                                   f"place; the output could not tell them apart")
            self.moves[s][b] = (target, ret)

    def blanks(self, s: int) -> None:
        """Whitespace may repeat at s (the walk caps its run)."""
        self.edge(s, b" \t\n\r", s)

    def call(self, s: int, start: int, ret: int) -> None:
        """At s, the value that starts at `start` may begin; when it ends, the output goes on at `ret`."""
        self._pending.append((s, start, ret))

    def merge(self, s: int, start: int) -> None:
        """s takes every first move of `start` as its own (one of several values may begin at s)."""
        self._pending.append((s, start, -1))

    def disjoint(self, starts: list[int], where: str) -> None:
        """No two of these values may begin with the same byte (checked by `build`, once their moves are known)."""
        self._disjoint.append((starts, where))

    def build(self, start: int) -> Grammar:
        # a worklist: when a state gains moves, the calls and merges that copy from it run again (merges of merges
        # and recursive references settle when nothing new arrives)
        readers: dict[int, list[tuple[int, int, int]]] = {}
        for item in self._pending:
            readers.setdefault(item[1], []).append(item)
        work = deque(self._pending)
        while work:
            s, sub, ret = work.popleft()
            grew = False
            for b, (target, push) in list(self.moves[sub].items()):
                if push >= 0:
                    raise GrammarError("internal: a value's first byte calls another value")
                if self.moves[s].get(b) != (target, ret):
                    self.edge(s, [b], target, ret)
                    grew = True
            if grew:
                work.extend(readers.get(s, ()))
        for starts, where in self._disjoint:
            seen: set[int] = set()
            for sub in starts:
                if seen & self.moves[sub].keys():
                    raise GrammarError(f"{where}: two alternatives can begin with the same byte, so a value could "
                                       f"match both")
                seen |= self.moves[sub].keys()
        # a value that cannot start (a schema that is only a reference to itself) would leave a generation stuck
        if not self.moves[start] or any(not self.moves[sub] for _, sub, _ in self._pending):
            raise GrammarError("a part of the format never says how its value starts (a reference to itself?)")
        n = len(self.moves)
        trans = np.full((n, 256), -1, dtype=np.int32)
        push = np.full((n, 256), -1, dtype=np.int32)
        for s, moves in enumerate(self.moves):
            for b, (target, ret) in moves.items():
                trans[s, b], push[s, b] = target, ret
        # bytes every state treats alike share a column: tables shrink from 256 columns to a few dozen
        columns = np.concatenate([trans, push], axis=0).T
        _, first, classes = np.unique(columns, axis=0, return_index=True, return_inverse=True)
        return Grammar(np.ascontiguousarray(trans[:, first]), np.ascontiguousarray(push[:, first]),
                       np.asarray(self.final), np.asarray(self.structural), np.asarray(self.loop),
                       classes.reshape(-1).astype(np.int32), start, np.asarray(self.watch, dtype=np.int32))


class Grammar:
    """A built machine: read-only tables (llmcli/grammar_kernels.py documents them) and its start state."""

    def __init__(self, trans, push, final, structural, loop, classes, start: int, watch=None):
        self.trans, self.push, self.final = trans, push, final
        self.structural, self.loop, self.classes = structural, loop, classes
        self.start = start
        # free text that watches for something (watch[s]: its home state, where the other bytes keep it): only
        # the tokens that could leave it are walked; else loop states are a JSON string's plain run
        self.watch = np.full(final.size, -1, dtype=np.int32) if watch is None else watch
        self._watched: dict[int, tuple[bytes, bytes]] = {}
        self.specials: tuple[int, ...] = ()  # control tokens it writes as their text (a template's call marker)

    def watched(self, s: int) -> tuple[bytes, bytes]:
        """For free text at s: (the bytes that take its home state elsewhere, the bytes that take s elsewhere than
        home). A token that holds none of the first and does not begin with one of the second ends at home."""
        if s not in self._watched:
            home = int(self.watch[s])
            leave = [bytes(c for c in range(256) if self.trans[t, self.classes[c]] != home) for t in (home, s)]
            self._watched[s] = (leave[0], leave[1])
        return self._watched[s]

    @property
    def tables(self) -> tuple:
        return self.trans, self.push, self.final, self.structural, self.classes

    def accepts(self, data: bytes) -> bool:
        """Whether `data` is a whole output of this grammar."""
        c = Constraint(self)
        return c.feed(data) and c.complete


@lru_cache(maxsize=1)
def _kernels():
    """The jitted walk, imported on first use: a run without a format never loads numba for it."""
    from llmcli import grammar_kernels
    from quant.jit import use_kernel_cache

    use_kernel_cache()
    return grammar_kernels


class VocabularyBytes:
    """Every token's bytes, end to end, for the kernels: data (total,) uint8; offsets (n + 1,) int64; plain (n,)
    bool, a token of whole UTF-8 characters a JSON string holds as they are (odd: the ids of the others); key (n,)
    uint16, how it begins (grammar_kernels.allowed). Control tokens have no bytes (they are never text)."""

    def __init__(self, pieces: list[bytes]):
        n_vocab = len(pieces)
        self.offsets = np.zeros(n_vocab + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.plain = np.array([_plain(p) for p in pieces], dtype=np.bool_)
        self.odd = np.flatnonzero(~self.plain)
        self.filled = self.offsets[1:] > self.offsets[:-1]  # tokens with bytes: all but control tokens
        self._leaving: dict[tuple[bytes, bytes], np.ndarray] = {}
        kernels = _kernels()
        self.key = np.array([_begins(p, kernels) for p in pieces], dtype=np.uint16)

    def leaving(self, held: bytes, first: bytes) -> np.ndarray:
        """The ids of the tokens that hold one of `held` or begin with one of `first`."""
        key = (held, first)
        if key not in self._leaving:
            at = np.flatnonzero(np.isin(self.data, np.frombuffer(held, dtype=np.uint8)))
            ids = np.searchsorted(self.offsets, at, side="right") - 1
            begins = self.data[np.minimum(self.offsets[:-1], max(self.data.size - 1, 0))]
            starting = np.flatnonzero(self.filled & np.isin(begins, np.frombuffer(first, dtype=np.uint8)))
            self._leaving[key] = np.union1d(ids, starting)
        return self._leaving[key]


def _begins(piece: bytes, k) -> int:
    """How a token begins, for grammar_kernels.allowed (k): BEGINS_* * 256 + its first byte after leading blanks."""
    rest = piece.lstrip(b" \t\n\r")
    blanks = piece[:len(piece) - len(rest)]
    if not piece:
        return k.EMPTY * 256
    if not blanks:
        return k.BEGINS_BYTE * 256 + piece[0]
    tail = blanks[1:] if blanks.startswith(b"\n") else blanks
    if b"\n" in tail or b"\r" in tail:
        return k.BEGINS_OTHER * 256 + piece[0]
    newline = tail is not blanks
    if not rest:
        return (k.ALL_NEWLINE if newline else k.ALL_BLANKS) * 256
    return (k.BEGINS_NEWLINE if newline else k.BEGINS_BLANKS) * 256 + rest[0]


def _plain(piece: bytes) -> bool:
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and '"' not in text and "\\" not in text and min(text) >= " "


@lru_cache(maxsize=4)
def vocabulary_bytes(tokenizer, n_vocab: int, specials: tuple[int, ...] = ()) -> VocabularyBytes:
    """A tokenizer's VocabularyBytes for n_vocab logits, built once (a 262k vocabulary takes ~0.5 s). Control
    tokens have no bytes but `specials` (a grammar's own, Grammar.specials), which have their text."""
    return VocabularyBytes([b"" if i >= tokenizer.vocab_size or (tokenizer.is_special(i) and i not in specials)
                            else tokenizer.token_bytes(i) for i in range(n_vocab)])


class Constraint:
    """One generation's place in a grammar: state, stack, the run of blanks; the tokens that may follow."""

    def __init__(self, grammar: Grammar, vocab: VocabularyBytes | None = None, stop_ids: Iterable[int] = ()):
        self.g, self.vocab = grammar, vocab
        self.k = _kernels()
        n_vocab = vocab.plain.size if vocab is not None else 0
        self.stop_ids = np.asarray(sorted(i for i in stop_ids if i < n_vocab), dtype=np.int64)
        self.state, self.blanks = grammar.start, 0
        self.stack = np.zeros(self.k.MAX_DEPTH, dtype=np.int32)
        self.depth = 0
        self._pushed = np.empty(self.k.MAX_DEPTH, dtype=np.int32)
        self._mask = np.empty(n_vocab, dtype=np.bool_)

    def copy(self) -> Constraint:
        """The same place in the same grammar, to move on from separately (a draft model's proposals)."""
        c = Constraint.__new__(Constraint)
        c.__dict__.update(self.__dict__)
        c.stack, c._pushed, c._mask = self.stack.copy(), self._pushed.copy(), self._mask.copy()
        return c

    def _walk(self, data: np.ndarray, lo: int, hi: int) -> tuple[int, int, int, int]:
        return self.k.walk(*self.g.tables, self.stack, self.depth, self.state, self.blanks, data, lo, hi,
                           self._pushed)

    def _advance(self, data: np.ndarray, lo: int, hi: int) -> bool:
        state, blanks, popped, n = self._walk(data, lo, hi)
        if state < 0:
            return False
        self.depth -= popped
        self.stack[self.depth:self.depth + n] = self._pushed[:n]
        self.depth += n
        self.state, self.blanks = state, blanks
        return True

    def feed(self, data: bytes) -> bool:
        """Move past `data`; False (and no move) when the grammar refuses it."""
        chunk = np.frombuffer(data, dtype=np.uint8)
        return self._advance(chunk, 0, chunk.size)

    @property
    def complete(self) -> bool:
        """The output so far is a whole value: the stop tokens may come."""
        s, d = self.state, self.depth
        while self.g.final[s] and d > 0:
            d -= 1
            s = int(self.stack[d])
        return d == 0 and bool(self.g.final[s])

    @property
    def finished(self) -> bool:
        """Complete, and no byte can extend it: the generation is over."""
        return self.complete and not any(self._walk(_BYTES[b], 0, 1)[0] >= 0 for b in range(256))

    def allows(self, token: int) -> bool:
        if token in self.stop_ids:
            return self.complete
        if not 0 <= token < self._mask.size:
            return False
        lo, hi = int(self.vocab.offsets[token]), int(self.vocab.offsets[token + 1])
        return hi > lo and self._walk(self.vocab.data, lo, hi)[0] >= 0

    def mask(self) -> np.ndarray:
        """(n_vocab,) bool: the tokens that may come next (a view, valid until the next call)."""
        if self.g.watch[self.state] >= 0:  # free text: only tokens that could take it elsewhere are walked
            plain, odd = self.vocab.filled, self.vocab.leaving(*self.g.watched(self.state))
        else:
            plain, odd = self.vocab.plain, self.vocab.odd
        self.k.allowed(*self.g.tables, self.g.loop, self.stack, self.depth, self.state, self.blanks,
                       self.vocab.data, self.vocab.offsets, plain, odd, self.vocab.key, self._mask)
        self._mask[self.stop_ids] = self.complete
        return self._mask

    def take(self, token: int) -> None:
        """Move past `token`, which `allows`."""
        if token in self.stop_ids:
            return
        if not self._advance(self.vocab.data, int(self.vocab.offsets[token]), int(self.vocab.offsets[token + 1])):
            raise LlmError(f"internal: token {token} does not continue the output format")


_BYTES = [np.frombuffer(bytes([b]), dtype=np.uint8) for b in range(256)]
