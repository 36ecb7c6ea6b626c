"""The decode's thread count on a shared machine: all the threads, or one when another process takes a core.

A decoded token runs ~150 short parallel regions, each ending when its slowest thread ends. When another process
keeps a core busy, the thread that shares it is descheduled for whole time slices (milliseconds) while the others
wait at the region's end: at 2 threads decode fell to half the speed of 1 thread. So the decode is timed per
token at both counts, and runs at the faster one. The other is tried again now and then, as often as keeps the
trials' cost at TRIAL_BUDGET of the time: a load that comes is followed within a token or a few, one that goes
within (k - 1) / TRIAL_BUDGET tokens.

Beside a server's event loop and its clients, a token or two now and then take up to 10x their usual time. A
count's estimate is therefore the median of its last WINDOW tokens, so that one slow token does not move it; and
after a switch, which may rest on a disturbed token or trial, the count left is tried again after PROBE_MIN
tokens, not after a budget's worth reckoned from those tokens. A running average of each count took one such
token for a load, and decode stayed at one thread, 0.6x as fast, until the next trial (RESULTS.md).
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import numba

PROBE_MIN, PROBE_MAX = 8, 512  # tokens between trials of the slower count: at least, at most
TRIAL_BUDGET = 0.01  # of the decode's time that trials of the slower count may cost: a trial of a count k times
# slower comes every (k - 1) / TRIAL_BUDGET tokens (one thread on a quiet 2-core machine, k ~ 1.6: every 60;
# two threads beside a busy core, k ~ 19 when the machine is loaded: every 512)
WINDOW = 3  # tokens per count whose median is its estimate (a trial's time replaces them: they are old, and a
# lucky trial costs only the few tokens until the count it chose has shown its real speed)


class ThreadGovernor:
    """Times each decode step at the count it ran with; `run` picks the count for the next step."""

    def __init__(self, threads: int):
        self.counts = (threads, 1) if threads > 1 else (threads,)
        self.recent: dict[int, deque[float]] = {}  # each count's last token times
        self.since_trial = 0
        self.trial = False  # the count last picked is a trial of the other one
        self.steps = 0
        self.running = threads  # the count picked as the faster one last time
        self.recheck = False  # the next trial comes after PROBE_MIN tokens

    def pick(self) -> int:
        if len(self.counts) == 1:
            return self.counts[0]
        untried = [c for c in self.counts if c not in self.recent]
        self.trial = bool(untried)
        if untried and self.recent:  # the full count first, then one trial of one thread
            return untried[0]
        best = min(self.counts, key=self.estimate)
        other = self.counts[1] if best == self.counts[0] else self.counts[0]
        if best != self.running:  # a switch rests on a few tokens: the count left is tried again soon, once
            self.recheck, self.running, self.since_trial = True, best, 0
        gap = self.estimate(other) / max(self.estimate(best), 1e-9)
        self.since_trial += 1
        wait = PROBE_MIN if self.recheck else min(PROBE_MAX, max(PROBE_MIN, (gap - 1) / TRIAL_BUDGET))
        if self.since_trial >= wait:
            self.since_trial, self.trial, self.recheck = 0, True, False
            return other
        return best

    def record(self, count: int, seconds: float) -> None:
        self.steps += 1
        if self.steps == 1:  # the first step may load machine code: not a speed
            return
        if self.trial or count not in self.recent:
            self.recent[count] = deque(maxlen=WINDOW)
        self.recent[count].append(seconds)

    def estimate(self, count: int) -> float:
        """A token's time at `count` threads (0 before any)."""
        times = self.recent.get(count)
        return statistics.median(times) if times else 0.0

    def run(self, step):
        """step() at the picked thread count (numba's, for this calling thread), timed."""
        count = self.pick()
        numba.set_num_threads(count)
        t = time.perf_counter()
        try:
            return step()
        finally:
            self.record(count, time.perf_counter() - t)
            numba.set_num_threads(self.counts[0])
