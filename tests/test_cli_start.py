"""What `llm run` pays for at start-up (issue #3: warm start <= 1.0 s): only the modules it needs, numba's start
without scipy or cffi, and the garbage collector back on after loading. Timings themselves are in
benchmarks/bench_start.py; these checks hold on any machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# `llm run` in this process, then what it left behind; then numba code that needs BLAS, compiled afterwards.
_RUN_THEN_REPORT = r"""
import gc, json, sys
from llmcli.cli import main
sys.argv = ["llm", "run", sys.argv[1], "Hi", "-n", "1", "--backend", "numba", "--temperature", "0"]
try:
    main()
except SystemExit as e:
    code = e.code
loaded = {m: m in sys.modules for m in ("scipy", "cffi", "gguf", "huggingface_hub", "rich", "torch", "transformers",
                                        "pydantic", "psutil", "llmcli.chat", "llmcli.hub")}
report = {"code": code, "loaded": loaded, "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
import numpy as np
from numba import njit

@njit
def dot(a, b):
    return np.dot(a, b)

report["dot"] = float(dot(np.arange(3.0), np.arange(3.0)))
report["scipy_after_dot"] = "scipy.linalg" in sys.modules
print(json.dumps(report))
"""


@pytest.mark.slow
def test_run_loads_only_what_it_needs(smollm2_path):
    r = subprocess.run([sys.executable, "-c", _RUN_THEN_REPORT, str(smollm2_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, r.stderr
    assert not any(report["loaded"].values()), report["loaded"]
    # the collector was paused while loading, then turned back on with the start-up's objects frozen
    assert report["gc_enabled"] and report["frozen"] > 10_000
    # numba's own BLAS-backed functions still work: they import scipy when compiled, as usual
    assert report["dot"] == 5.0 and report["scipy_after_dot"]


def test_each_command_is_registered_by_its_module():
    """`llm CMD` registers only CMD's module: the table that says which one must name every command rightly."""
    import importlib

    import typer

    from llmcli import cli

    every = []
    for module in cli._MODULES:
        app = typer.Typer()
        importlib.import_module(f"llmcli.{module}").register(app)
        names = [cli._command_name(info) for info in app.registered_commands]
        assert all(cli._COMMAND_MODULE[n] == module for n in names), (module, names)
        every += names
    assert sorted(every) == sorted(cli._COMMAND_MODULE)
