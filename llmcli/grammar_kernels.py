"""The byte walk of a grammar machine (llmcli/grammar.py), compiled: which tokens of a vocabulary may come next.

A machine is a recursive transition network over bytes. For state s and byte b (of class c = classes[b]):
trans[s, c] >= 0 is the next state, and push[s, c] >= 0 a state to return to when the value entered here ends;
trans[s, c] < 0 in a final state returns (pops) and tries b again in the caller's state. Whitespace outside
strings (structural[s]) counts towards a cap, so that a model cannot loop on blanks.

Tables, all read-only: trans, push (n_states, n_classes) int32; final, structural, loop (n_states,) bool;
classes (256,) int32. A walk never writes the stack it starts from (stack[:depth] int32); what it pushes goes
to `pushed`, so one stack serves every token of a mask.
"""

from __future__ import annotations

import numpy as np

from quant.jit import njit

MAX_DEPTH = 64  # nesting the machine may reach: a generation cannot grow its stack without bound
MAX_BLANKS = 21  # whitespace bytes in a row between a value's tokens (a newline and 20 spaces or tabs)


@njit(cache=True, nogil=True)
def walk(trans, push, final, structural, classes, stack, depth, state, blanks, data, lo, hi, pushed):
    """Run bytes data[lo:hi] from `state`: -> (state, blanks, pops from stack, entries of pushed); state -1
    when a byte is refused."""
    popped = 0
    n = 0
    for i in range(lo, hi):
        b = data[i]
        c = classes[b]
        t = trans[state, c]
        while t < 0:
            if not final[state]:
                return -1, blanks, popped, n
            if n > 0:
                n -= 1
                state = pushed[n]
            elif popped < depth:
                popped += 1
                state = stack[depth - popped]
            else:
                return -1, blanks, popped, n
            t = trans[state, c]
        if structural[state] and (b == 32 or b == 10 or b == 9 or b == 13):
            # a run of blanks is [\n][ \t]*, as llama.cpp's JSON grammars have it: a model cannot pad with empty lines
            if b == 13 or (b == 10 and blanks > 0) or blanks >= MAX_BLANKS:
                return -1, blanks, popped, n
            blanks += 1
        else:
            blanks = 0
        r = push[state, c]
        if r >= 0:
            if depth - popped + n >= MAX_DEPTH:
                return -1, blanks, popped, n
            pushed[n] = r
            n += 1
        state = t
    return state, blanks, popped, n


# How a token begins (VocabularyBytes.key // 256; the byte is key % 256): a byte, or blanks then a byte, or blanks only
BEGINS_BYTE, BEGINS_BLANKS, BEGINS_NEWLINE, BEGINS_OTHER, ALL_BLANKS, ALL_NEWLINE, EMPTY = range(7)


@njit(cache=True, nogil=True)
def allowed(trans, push, final, structural, classes, loop, stack, depth, state, blanks, data, offsets, plain, odd,
            key, out):
    """out[t] = whether token t (bytes data[offsets[t]:offsets[t + 1]]) can come next. Most tokens are decided by
    how they begin (key[t]: BEGINS_* * 256 + their first byte after any leading blanks), through a table made
    for this state; the rest are walked. Inside a string's plain run (loop[state]) a token of plain string
    bytes (plain[t]) stays there: only the others (the ids in `odd`) are looked at."""
    pushed = np.empty(MAX_DEPTH, dtype=np.int32)
    two = np.zeros(2, dtype=np.uint8)
    # blanks lead to one state that loops on them (the same moves after it): a token's leading blanks only count
    one_state = -2
    for w, w2 in ((32, 32), (32, 9), (9, 9), (9, 32), (10, 32), (10, 9)):
        if w == 10 and blanks > 0:
            continue
        two[0] = w
        two[1] = w2
        s1, _, p1, n1 = walk(trans, push, final, structural, classes, stack, depth, state, blanks, two, 0, 1, pushed)
        s2, _, p2, n2 = walk(trans, push, final, structural, classes, stack, depth, state, blanks, two, 0, 2, pushed)
        if s1 < 0 or s2 != s1 or p2 != p1 or n2 != n1 or not structural[s1] or (one_state != -2 and s1 != one_state):
            one_state = -1
        elif one_state == -2:
            one_state = s1
    skip = one_state >= 0
    may = np.ones(7 * 256, dtype=np.bool_)  # by how a token begins: False, refused; True, walk it to know
    for b in range(256):
        two[0] = b
        first = walk(trans, push, final, structural, classes, stack, depth, state, blanks, two, 0, 1, pushed)[0] >= 0
        two[0] = 32
        two[1] = b
        after_blank = walk(trans, push, final, structural, classes, stack, depth, state, blanks, two, 0, 2,
                           pushed)[0] >= 0
        if not first:
            may[BEGINS_BYTE * 256 + b] = False
        if skip:
            if not after_blank:
                may[BEGINS_BLANKS * 256 + b] = False
            if not after_blank or blanks > 0:  # a newline only starts a run of blanks
                may[BEGINS_NEWLINE * 256 + b] = False
            may[BEGINS_OTHER * 256 + b] = False  # "\n\n", "\r", " \n": never, where blanks are between tokens
        may[EMPTY * 256 + b] = False
    if not skip:  # a token that begins with a blank needs that blank to be allowed here
        space_or_tab = may[BEGINS_BYTE * 256 + 32] or may[BEGINS_BYTE * 256 + 9]
        newline = may[BEGINS_BYTE * 256 + 10]
        for kind, ok in ((BEGINS_BLANKS, space_or_tab), (ALL_BLANKS, space_or_tab), (BEGINS_NEWLINE, newline),
                         (ALL_NEWLINE, newline),
                         (BEGINS_OTHER, space_or_tab or newline or may[BEGINS_BYTE * 256 + 13])):
            if not ok:
                may[kind * 256:(kind + 1) * 256] = False
    if loop[state]:
        out[:] = plain
        for t in odd:
            out[t] = may[key[t]] and walk(trans, push, final, structural, classes, stack, depth, state, blanks,
                                          data, offsets[t], offsets[t + 1], pushed)[0] >= 0
        return
    for t in range(out.size):
        out[t] = may[key[t]] and walk(trans, push, final, structural, classes, stack, depth, state, blanks, data,
                                      offsets[t], offsets[t + 1], pushed)[0] >= 0
