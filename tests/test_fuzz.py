"""The seeded quick set of the hostile-file fuzzer (tests/fuzz_gguf.py) on both CPU backends: every case must
load, generate and render, or fail with one LlmError line; never a traceback, a crash, a hang or a memory
blow-up. benchmarks/fuzz_gguf.py runs the long set (10,000 cases and more)."""

from __future__ import annotations

import pytest
from fuzz_gguf import FAILURES, fuzz

QUICK_CASES = 1000


@pytest.mark.slow
@pytest.mark.parametrize("backend,seed", [("numpy", 101), ("numba", 202)])
def test_quick_fuzz_set(tmp_path, backend, seed):
    counts, failures = fuzz(QUICK_CASES, backend, seed, tmp_path)
    assert sum(counts.values()) == QUICK_CASES
    assert not failures, failures[:5]
    assert all(counts[o] == 0 for o in FAILURES)
    # the mutations reach past the reader: some cases load and generate, most fail in many different checks
    assert counts["ok"] >= 20 and counts["error"] >= QUICK_CASES // 2
