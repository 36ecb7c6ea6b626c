"""The decode's thread governor (backends/numba/governor.py) on scripted token times: it follows a load that
comes and goes, and a quiet machine spends few tokens on trials of one thread."""

from __future__ import annotations

from backends.numba.governor import PROBE_MAX, PROBE_MIN, TRIAL_BUDGET, ThreadGovernor


def drive(governor: ThreadGovernor, seconds_of, n: int) -> list[int]:
    """n steps; seconds_of(step, count) is the time a token takes. Returns the counts used."""
    used = []
    for i in range(n):
        count = governor.pick()
        governor.record(count, seconds_of(i, count))
        used.append(count)
    return used


def test_governor_follows_a_load_that_comes_and_goes():
    """Quiet: 2 threads 1.6x faster than 1; a core busy (tokens 300-600): 2 threads 1.9x slower than 1; then
    quiet again. The governor runs at the faster count but for trials that cost about TRIAL_BUDGET of the time,
    finds the load within a few tokens and its end within (k - 1) / TRIAL_BUDGET tokens."""
    def seconds(i, count):
        return {2: 0.030 if 300 <= i < 600 else 0.010, 1: 0.016}[count]

    used = drive(ThreadGovernor(2), seconds, 900)

    def overhead(lo, hi):
        """Time lost against running tokens lo..hi at the faster count."""
        spent = sum(seconds(i, c) for i, c in zip(range(lo, hi), used[lo:hi], strict=True))
        ideal = sum(min(seconds(i, 1), seconds(i, 2)) for i in range(lo, hi))
        return spent / ideal - 1

    assert overhead(10, 300) < 1.5 * TRIAL_BUDGET
    assert used[300:306].count(1) >= 4  # the load found within a few tokens
    assert overhead(310, 600) < 1.5 * TRIAL_BUDGET
    back = used.index(2, 600 + used[600:].index(1))  # the first token back at two threads
    assert back - 600 <= (0.030 / 0.016 - 1) / TRIAL_BUDGET + 2
    assert overhead(back + 1, 900) < 1.5 * TRIAL_BUDGET


def test_one_slow_token_is_not_a_load():
    """Beside a server's event loop a token now and then takes several times its usual time (RESULTS.md: 46 ms
    among tokens of 5). The governor stays at the faster count, but for its scheduled trials."""
    def seconds(i, count):
        return 0.1 if i in (200, 300) else {2: 0.010, 1: 0.016}[count]

    used = drive(ThreadGovernor(2), seconds, 400)
    assert used[201:260].count(1) <= 1 and used[301:360].count(1) <= 1


def test_a_short_disturbance_is_left_behind_soon():
    """Two slow tokens in a row move the median: the governor goes to one thread, but tries two again after
    PROBE_MIN tokens, not after the (k - 1) / TRIAL_BUDGET that the slow tokens would ask for (and, back at two,
    one thread once more after PROBE_MIN)."""
    def seconds(i, count):
        return 0.1 if i in (200, 201) else {2: 0.010, 1: 0.016}[count]

    used = drive(ThreadGovernor(2), seconds, 400)
    assert used[202:206].count(1) >= 1  # it did leave two threads
    assert used[202 + PROBE_MIN + 3:300].count(1) <= 2


def test_trials_of_a_count_that_collapses_stay_cheap():
    """Two threads beside a busy core on a loaded machine ran 19x slower than one (bench_shared.py): their
    trials come every PROBE_MAX tokens and cost a few per cent."""
    used = drive(ThreadGovernor(2), lambda i, c: {2: 0.3, 1: 0.016}[c], 2000)
    assert used[100:].count(2) <= len(used[100:]) // PROBE_MAX + 1


def test_one_thread_needs_no_governing():
    assert set(drive(ThreadGovernor(1), lambda i, c: 0.01, 50)) == {1}


def test_default_threads_are_the_performance_cores(tmp_path):
    """On a hybrid CPU sysfs lists the performance cores' logical CPUs: 16 of them, two per core, are 8 cores;
    a machine without that file gives no such figure, and the default never exceeds the CPUs we may use."""
    import os

    from backends import _performance_cores, physical_cores

    (tmp_path / "cpu_core").mkdir()
    (tmp_path / "cpu_core" / "cpus").write_text("0-15\n")
    topology = tmp_path / "system" / "cpu" / "cpu0" / "topology"
    topology.mkdir(parents=True)
    (topology / "thread_siblings_list").write_text("0-1\n")
    assert _performance_cores(str(tmp_path)) == 8
    (topology / "thread_siblings_list").write_text("0\n")
    (tmp_path / "cpu_core" / "cpus").write_text("0-3,8,10\n")
    assert _performance_cores(str(tmp_path)) == 6
    assert _performance_cores(str(tmp_path / "none")) == 0
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
