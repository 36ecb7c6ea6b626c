"""The decode's thread count on a shared machine: all the threads, or one when another process takes a core.

A decoded token runs ~150 short parallel regions, each ending when its slowest thread ends. When another process
keeps a core busy, the thread that shares it is descheduled for whole time slices (milliseconds) while the others
wait at the region's end: at 2 threads decode fell to half the speed of 1 thread. So the decode is timed per
token at both counts, and runs at the faster one. The other is tried again now and then, as often as keeps the
trials' cost at TRIAL_BUDGET of the time: a load that comes is followed within a token or a few, one that goes
within (k - 1) / TRIAL_BUDGET tokens.
"""

from __future__ import annotations

import time

import numba

PROBE_MIN, PROBE_MAX = 8, 512  # tokens between trials of the slower count: at least, at most
TRIAL_BUDGET = 0.01  # of the decode's time that trials of the slower count may cost: a trial of a count k times
# slower comes every (k - 1) / TRIAL_BUDGET tokens (one thread on a quiet 2-core machine, k ~ 1.6: every 60;
# two threads beside a busy core, k ~ 19 when the machine is loaded: every 512)
WEIGHT = 0.3  # of a new token time in its count's running estimate (a trial's time replaces it: the estimate
# is old, and a lucky trial costs only the few tokens until the count it chose has shown its real speed)


class ThreadGovernor:
    """Times each decode step at the count it ran with; `run` picks the count for the next step."""

    def __init__(self, threads: int):
        self.counts = (threads, 1) if threads > 1 else (threads,)
        self.seconds: dict[int, float] = {}  # running estimate of a token's time per count
        self.since_trial = 0
        self.trial = False  # the count last picked is a trial of the other one
        self.steps = 0

    def pick(self) -> int:
        if len(self.counts) == 1:
            return self.counts[0]
        untried = [c for c in self.counts if c not in self.seconds]
        self.trial = bool(untried)
        if untried and self.seconds:  # the full count first, then one trial of one thread
            return untried[0]
        best = min(self.counts, key=lambda c: self.seconds.get(c, 0.0))
        other = self.counts[1] if best == self.counts[0] else self.counts[0]
        gap = self.seconds.get(other, 0.0) / max(self.seconds.get(best, 0.0), 1e-9)
        self.since_trial += 1
        if self.since_trial >= min(PROBE_MAX, max(PROBE_MIN, (gap - 1) / TRIAL_BUDGET)):
            self.since_trial, self.trial = 0, True
            return other
        return best

    def record(self, count: int, seconds: float) -> None:
        self.steps += 1
        if self.steps == 1:  # the first step may load machine code: not a speed
            return
        old = self.seconds.get(count)
        self.seconds[count] = seconds if old is None or self.trial else (1 - WEIGHT) * old + WEIGHT * seconds

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
