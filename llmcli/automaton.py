"""Byte automata for output formats that are easiest to say nondeterministically: a JSON Schema `pattern` (a regular
expression) and a range of integers. An Nfa is built piece by piece, made deterministic (subset construction; a
grammar's machines must be deterministic, llmcli/grammar.py) with its dead ends pruned, and written into a grammar
Builder.

A pattern describes the characters of a JSON string, which the grammar writes as they are: the quote, the
backslash and control characters would need escapes, so a pattern's sets leave them out. What is written then
still matches the pattern; a pattern that can only match with them is refused.
"""

from __future__ import annotations

from llmcli.grammar import Builder, GrammarError

MAX_NFA = 20000  # states while building (a bounded repetition copies its part)
MAX_DFA = 2000  # states of the deterministic machine
MAX_REPEAT = 100  # the largest count a pattern's {n,m} may give
# bytes a JSON string holds as they are (printable ASCII but the quote and the backslash)
PLAIN = frozenset(b for b in range(0x20, 0x80) if b not in b'"\\')
DIGIT = frozenset(b"0123456789")
WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
SPACE = frozenset(b" ")  # of the whitespace \s matches, the only one a JSON string holds as it is


class Nfa:
    """States with byte moves and empty moves."""

    def __init__(self):
        self.moves: list[dict[int, set[int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        if len(self.moves) >= MAX_NFA:
            raise GrammarError(f"the format needs more than {MAX_NFA} states to build; simplify it")
        self.moves.append({})
        self.empty.append([])
        return len(self.moves) - 1

    def edge(self, s: int, data, t: int) -> None:
        for b in data:
            self.moves[s].setdefault(b, set()).add(t)

    def link(self, s: int, t: int) -> None:
        self.empty[s].append(t)

    def any_char(self, s: int, t: int, ascii_: bool = True) -> None:
        """Any character a JSON string holds as it is, from s to t: plain ASCII (unless not `ascii_`), or a
        well-formed UTF-8 sequence."""
        if ascii_:
            self.edge(s, PLAIN, t)
        utf8_sequences(self.state, self.edge, s, t)

    def _closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def write(self, b: Builder, start: int, accept: int, at: int, what: str) -> list[int]:
        """Write the deterministic machine of the strings from `start` to `accept` into `b`, beginning at Builder
        state `at` (its moves are added there): -> the Builder states where a string is whole. Dead ends (states
        from which no string can be finished) are left out, so a generation cannot walk into one."""
        first = self._closure([start])
        index, sets, moves = {first: 0}, [first], []
        while len(moves) < len(sets):
            here = sets[len(moves)]
            by_byte: dict[int, set[int]] = {}
            for s in here:
                for byte, targets in self.moves[s].items():
                    by_byte.setdefault(byte, set()).update(targets)
            row = {}
            for byte, targets in by_byte.items():
                nxt = self._closure(targets)
                if nxt not in index:
                    if len(sets) >= MAX_DFA:
                        raise GrammarError(f"{what} needs more than {MAX_DFA} states; simplify it")
                    index[nxt] = len(sets)
                    sets.append(nxt)
                row[byte] = index[nxt]
            moves.append(row)
        final = [accept in s for s in sets]
        # the states from which a final one can be reached
        live = {i for i, f in enumerate(final) if f}
        grew = True
        while grew:
            grew = False
            for i, row in enumerate(moves):
                if i not in live and any(t in live for t in row.values()):
                    live.add(i)
                    grew = True
        if 0 not in live:
            raise GrammarError(f"{what} matches no string that can be written without escapes")
        # states that accept the same strings from here on are merged (Moore's partition refinement): what is left
        # of a match, say, becomes one state that takes any character
        block = {i: int(final[i]) for i in live}
        while True:
            seen: dict[tuple, int] = {}
            refined = {i: seen.setdefault((block[i], tuple(sorted((c, block[t]) for c, t in moves[i].items()
                                                                  if t in live))), len(seen)) for i in live}
            stable = len(seen) == len(set(block.values()))
            block = refined
            if stable:
                break
        merged: list[dict[int, int]] = [{} for _ in range(len(seen))]
        ends = [False] * len(seen)
        for i in live:
            merged[block[i]] = {c: block[t] for c, t in moves[i].items() if t in live}
            ends[block[i]] = final[i]
        states = {k: (at if k == block[0] else b.state(structural=False)) for k in range(len(merged))}
        for k, row in enumerate(merged):
            for c, t in row.items():
                b.edge(states[k], [c], states[t])
            # a state every character leaves where it was (the ".*" of an unanchored pattern): the mask kernel
            # takes every plain token there at once instead of walking each (grammar_kernels.allowed)
            b.loop[states[k]] = _takes_any_char(merged, k)
        return [states[k] for k in range(len(merged)) if ends[k]]


# UTF-8's multi-byte sequences by first byte: the bytes that may follow, one range per byte (as Python decodes)
UTF8_SEQUENCES = ((range(0xC2, 0xE0), (range(0x80, 0xC0),)),
                  ((0xE0,), (range(0xA0, 0xC0), range(0x80, 0xC0))),
                  ((*range(0xE1, 0xED), 0xEE, 0xEF), (range(0x80, 0xC0),) * 2),
                  ((0xED,), (range(0x80, 0xA0), range(0x80, 0xC0))),
                  ((0xF0,), (range(0x90, 0xC0), *(range(0x80, 0xC0),) * 2)),
                  (range(0xF1, 0xF4), (range(0x80, 0xC0),) * 3),
                  ((0xF4,), (range(0x80, 0x90), *(range(0x80, 0xC0),) * 2)))


def utf8_sequences(state, edge, s: int, t: int) -> None:
    """Every well-formed multi-byte UTF-8 sequence from s to t, through states made by state() and moves made by
    edge(from, bytes, to) (an Nfa's or a grammar Builder's). Sequences that end alike share their states: seven
    in all."""
    made: dict[tuple, int] = {}

    def before(follows: tuple) -> int:
        """The state from which the bytes `follows` lead to t."""
        if not follows:
            return t
        key = tuple((r.start, r.stop) for r in follows)
        if key not in made:
            made[key] = state()
            edge(made[key], follows[0], before(follows[1:]))
        return made[key]

    for firsts, follows in UTF8_SEQUENCES:
        edge(s, firsts, before(follows))


def _takes_any_char(moves: list[dict[int, int]], i: int) -> bool:
    """Whether every character a JSON string holds as it is leads deterministic state i back to itself."""
    if any(moves[i].get(byte) != i for byte in PLAIN):
        return False
    for firsts, follows in UTF8_SEQUENCES:
        at = {moves[i].get(byte) for byte in firsts}
        for allowed in follows:
            if None in at:
                return False
            at = {moves[s].get(byte) for s in at for byte in allowed}
        if at != {i}:
            return False
    return True


# --- integer ranges ---------------------------------------------------------------------------------------------

def integer_range(nfa: Nfa, start: int, accept: int, lo: int | None, hi: int | None, max_digits: int) -> None:
    """The decimal integers in lo..hi (None: no bound, up to max_digits digits), written as JSON writes them (no
    leading zeros, no "-0"), from start to accept."""
    top = 10 ** max_digits - 1
    if lo is None or lo < -top:
        lo = -top
    if hi is None or hi > top:
        hi = top
    if lo > hi:
        raise GrammarError("no integer is within the bounds")
    if hi >= 0:
        _naturals(nfa, start, accept, max(lo, 0), hi)
    if lo < 0:
        minus = nfa.state()
        nfa.edge(start, b"-", minus)
        _naturals(nfa, minus, accept, max(-hi, 1), -lo)


def _naturals(nfa: Nfa, start: int, accept: int, lo: int, hi: int) -> None:
    """lo..hi (0 <= lo <= hi), one length of digits at a time."""
    for length in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (length - 1) if length > 1 else 0)
        z = min(hi, 10 ** length - 1)
        if a <= z:
            nfa.link(start, _same_length(nfa, accept, str(a), str(z)))


def _same_length(nfa: Nfa, accept: int, low: str, high: str) -> int:
    """The numbers low..high, both of the same number of digits: at each digit, the machine knows whether it is
    still at the lower and at the upper bound's digits so far (then the next digit is bounded by theirs)."""
    memo: dict[tuple[int, bool, bool], int] = {}

    def at(pos: int, tight_low: bool, tight_high: bool) -> int:
        if pos == len(low):
            return accept
        key = (pos, tight_low, tight_high)
        if key not in memo:
            s = memo[key] = nfa.state()
            for d in range(int(low[pos]) if tight_low else 0, (int(high[pos]) if tight_high else 9) + 1):
                nfa.edge(s, [48 + d], at(pos + 1, tight_low and d == int(low[pos]), tight_high and d == int(high[pos])))
        return memo[key]

    return at(0, True, True)


# --- patterns -----------------------------------------------------------------------------------------------------

class CharSet:
    """The characters one step of a pattern may take: ASCII bytes, any non-ASCII character, or some of them."""

    def __init__(self, ascii_=frozenset(), any_other: bool = False, others=()):
        self.ascii, self.any_other, self.others = frozenset(ascii_) & PLAIN, any_other, tuple(others)

    def add(self, nfa: Nfa, s: int, t: int) -> None:
        nfa.edge(s, self.ascii, t)
        if self.any_other:
            nfa.any_char(s, t, ascii_=False)
        for ch in self.others:
            data = ch.encode()
            at = s
            for byte in data[:-1]:
                nxt = nfa.state()
                nfa.edge(at, [byte], nxt)
                at = nxt
            nfa.edge(at, [data[-1]], t)


ANY = CharSet(PLAIN, any_other=True)
CLASSES = {"d": CharSet(DIGIT), "w": CharSet(WORD), "s": CharSet(SPACE),
           # the complements: ASCII only, since \\D, \\W and \\S match some non-ASCII characters and not others
           "D": CharSet(PLAIN - DIGIT), "W": CharSet(PLAIN - WORD), "S": CharSet(PLAIN - SPACE)}
CONTROL_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def pattern(nfa: Nfa, start: int, accept: int, regex: str) -> None:
    """The strings `regex` (JSON Schema's `pattern`, ECMA 262 / Python syntax, searched: unanchored ends match
    anything) matches, from start to accept. GrammarError names what is not supported."""
    parser = _Parser(regex)
    alternatives = []
    while True:  # ^ and $ bind to the alternative they begin or end
        anchored_start = parser.take("^")
        parts = [parser.sequence(top=True)]
        if not anchored_start:
            parts.insert(0, ("rep", ("set", ANY), 0, None))
        if not parser.take("$"):
            parts.append(("rep", ("set", ANY), 0, None))
        alternatives.append(("cat", parts))
        if not parser.take("|"):
            break
    if parser.i < len(regex):
        raise GrammarError(f"'pattern' {regex!r}: {parser.what()} at {parser.i} is not supported")
    s, t = _build(nfa, ("alt", alternatives))
    nfa.link(start, s)
    nfa.link(t, accept)


def _build(nfa: Nfa, node) -> tuple[int, int]:
    kind = node[0]
    s, t = nfa.state(), nfa.state()
    if kind == "set":
        node[1].add(nfa, s, t)
    elif kind == "cat":
        at = s
        for part in node[1]:
            a, z = _build(nfa, part)
            nfa.link(at, a)
            at = z
        nfa.link(at, t)
    elif kind == "alt":
        for part in node[1]:
            a, z = _build(nfa, part)
            nfa.link(s, a)
            nfa.link(z, t)
    else:  # ("rep", part, lo, hi)
        _, part, lo, hi = node
        at = s
        for _ in range(lo):
            a, z = _build(nfa, part)
            nfa.link(at, a)
            at = z
        if hi is None:
            a, z = _build(nfa, part)
            nfa.link(at, a)
            nfa.link(z, a)
            nfa.link(z, t)
        else:
            for _ in range(hi - lo):
                a, z = _build(nfa, part)
                nfa.link(at, a)
                nfa.link(at, t)
                at = z
        nfa.link(at, t)
    return s, t


class _Parser:
    """A regular expression -> a tree of ("set", CharSet), ("cat", parts), ("alt", parts), ("rep", part, lo, hi)."""

    def __init__(self, regex: str):
        self.re, self.i = regex, 0

    def what(self) -> str:
        return repr(self.re[self.i]) if self.i < len(self.re) else "its end"

    def refuse(self, why: str) -> GrammarError:
        return GrammarError(f"'pattern' {self.re!r}: {why} is not supported")

    def peek(self) -> str:
        return self.re[self.i] if self.i < len(self.re) else ""

    def take(self, text: str) -> bool:
        if self.re.startswith(text, self.i):
            self.i += len(text)
            return True
        return False

    def alternation(self):
        parts = [self.sequence()]
        while self.take("|"):
            parts.append(self.sequence())
        return parts[0] if len(parts) == 1 else ("alt", parts)

    def sequence(self, top: bool = False):
        """Items up to "|" or ")" (at the top, or a "$" that ends an alternative)."""
        parts = []
        while self.peek() not in ("", "|", ")"):
            if top and self.peek() == "$" and self.re[self.i + 1:self.i + 2] in ("", "|"):
                break
            parts.append(self.repeated(self.atom()))
        return ("cat", parts)

    def repeated(self, atom):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (counts := self.counts()) is not None:
                lo, hi = counts
            else:
                return atom
            self.take("?")  # lazy or greedy: the same strings
            if self.peek() in ("*", "+", "?", "{") and not (self.peek() == "{" and self.counts(look=True) is None):
                raise self.refuse("a repetition of a repetition")
            atom = ("rep", atom, lo, hi)

    def counts_at(self, i: int) -> bool:
        """Whether a count ({n}, {n,m}, ...) is written at i."""
        here, self.i = self.i, i
        try:
            return self.counts(look=True) is not None
        finally:
            self.i = here

    def counts(self, look: bool = False):
        """{n}, {n,}, {n,m} at the cursor -> (n, m or None), moving past it; None (not moving) where "{" is a
        character, as it is when no count follows."""
        j = self.re.find("}", self.i)
        if j < 0:
            return None
        body = self.re[self.i + 1:j]
        lo_text, comma, hi_text = body.partition(",")
        if comma and not lo_text and hi_text.isdigit():
            lo_text = "0"  # {,m}: Python's (and so the validators') {0,m}
        if not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
            return None
        lo, hi = int(lo_text), (int(hi_text) if hi_text else None) if comma else int(lo_text)
        if look:
            return lo, hi
        if lo > MAX_REPEAT or (hi is not None and (hi > MAX_REPEAT or hi < lo)):
            raise self.refuse(f"the count {{{body}}} (at most {MAX_REPEAT}, the first not over the second)")
        self.i = j + 1
        return lo, hi

    def atom(self):
        c = self.peek()
        self.i += 1
        if c == "(":
            if self.take("?"):
                if not (self.take(":") or self.take("P<") or self.take("<")):
                    raise self.refuse("a group (?" + self.peek() + "...)")
                if self.re[self.i - 1] == "<":  # a named group: its name, then a group like any other
                    j = self.re.find(">", self.i)
                    if j < 0 or not self.re[self.i:j].isidentifier():
                        raise self.refuse("a named group without a name")
                    self.i = j + 1
            inner = self.alternation()
            if not self.take(")"):
                raise self.refuse("an unclosed group")
            return inner
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", ANY)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in ("^", "$"):
            raise self.refuse(f"the anchor {c!r} inside the pattern (anchors begin or end an alternative)")
        if c in ("*", "+", "?", ")") or (c == "{" and self.counts_at(self.i - 1)):
            raise self.refuse(f"{c!r} with nothing before it")
        return ("set", _char(c))

    def escape(self, in_class: bool) -> CharSet:
        c = self.peek()
        if not c:
            raise self.refuse("a backslash at the end")
        self.i += 1
        if c in CLASSES:
            return CLASSES[c]
        if c in CONTROL_ESCAPES:
            return CharSet()  # a control character: a JSON string holds it only escaped
        if c in ("u", "x"):
            n = 4 if c == "u" else 2
            digits = self.re[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.refuse(f"\\{c} without {n} hex digits")
            self.i += n
            code = int(digits, 16)
            if 0xD800 <= code < 0xE000:
                raise self.refuse("a surrogate character")
            return _char(chr(code))
        if c.isalnum():
            raise self.refuse(f"the escape \\{c}")
        return _char(c)  # an escaped punctuation character stands for itself

    def char_class(self) -> CharSet:
        negate = self.take("^")
        ascii_, others = set(), []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.refuse("an unclosed [")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                self.i += 1
                item = self.escape(in_class=True)
                if item.any_other:
                    raise self.refuse("a class of non-ASCII characters inside [...]")
                ascii_ |= item.ascii
                others += item.others
                lo_char = None if len(item.ascii) + len(item.others) != 1 or item in CLASSES.values() else (
                    chr(next(iter(item.ascii))) if item.ascii else item.others[0])
            else:
                self.i += 1
                lo_char = c
                if ord(c) < 0x80:
                    ascii_.add(ord(c))
                else:
                    others.append(c)
            if self.peek() == "-" and self.re[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi_char = self.peek()
                self.i += 1
                if hi_char == "\\":
                    item = self.escape(in_class=True)
                    hi_char = chr(next(iter(item.ascii))) if len(item.ascii) == 1 and not item.others else (
                        item.others[0] if len(item.others) == 1 and not item.ascii else None)
                if lo_char is None or hi_char is None:
                    raise self.refuse("a range with a class at one end")
                if ord(lo_char) > ord(hi_char):
                    raise self.refuse(f"the range {lo_char}-{hi_char}, backwards")
                if ord(hi_char) >= 0x80:
                    raise self.refuse("a range of non-ASCII characters")
                ascii_ |= set(range(ord(lo_char), ord(hi_char) + 1))
        if negate:
            if others:
                raise self.refuse("a negated class with non-ASCII characters")
            return CharSet(PLAIN - ascii_, any_other=True)
        return CharSet(ascii_, others=others)


def _char(c: str) -> CharSet:
    return CharSet({ord(c)}) if ord(c) < 0x80 else CharSet(others=[c])
