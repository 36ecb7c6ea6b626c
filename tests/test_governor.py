"""The decode's thread governor (backends/numba/governor.py) on scripted token times: it follows a load that
comes and goes, and a quiet machine spends few tokens on trials of one thread."""

from __future__ import annotations

from backends.numba.governor import PROBE_FAR, ThreadGovernor


def drive(governor: ThreadGovernor, seconds_of, n: int) -> list[int]:
    """n steps; seconds_of(step, count) is the time a token takes. Returns the counts used."""
    used = []
    for i in range(n):
        count = governor.pick()
        governor.record(count, seconds_of(i, count))
        used.append(count)
    return used


def test_governor_follows_a_load_that_comes_and_goes():
    def seconds(i, count):
        busy = 200 <= i < 400  # another process takes a core: 2 threads run at half the speed of 1
        return {2: 0.010 if not busy else 0.030, 1: 0.016}[count]

    used = drive(ThreadGovernor(2), seconds, 600)
    quiet, busy, after = used[20:200], used[210:400], used[400 + PROBE_FAR // 2 + 1:]
    assert quiet.count(1) <= len(quiet) // PROBE_FAR + 1  # trials only
    assert busy.count(2) <= len(busy) // (PROBE_FAR // 2) + 1  # one thread, but for the trials of two
    assert after.count(1) <= len(after) // PROBE_FAR + 1
    assert used[200:210].count(1) >= 5  # the load found within a few tokens


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
