"""`llm bench` as a user runs it: real processes, the real model on the numpy backend, small sizes."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmcli.bench import SCHEMA, BenchConfig, BenchError, machine_key, measure_read_bandwidth, parse_int_list

# the numpy backend does not pass --threads on to OpenBLAS, whose spinning threads are slow on a busy machine;
# bench and `llm run` both get the same single BLAS thread, so their comparison stays fair
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
N_GEN = 16
TYPES = {"backend": str, "threads": int, "model": str, "quant": str, "n_prompt": int, "n_gen": int,
         "depth": int, "load_s": float, "peak_rss_mb": float}
OPTIONAL_FLOATS = ("pp_tok_s", "pp_tok_s_std", "tg_tok_s", "tg_tok_s_std", "ttft_s", "decode_gbps", "bw_util")


def llm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def check_row(row: dict) -> None:
    assert tuple(row) == SCHEMA
    for key, kind in TYPES.items():
        assert isinstance(row[key], kind), (key, row[key])
    for key in OPTIONAL_FLOATS:
        assert row[key] is None or isinstance(row[key], float), (key, row[key])


@pytest.fixture(scope="module")
def bench_run(smollm2_path, tmp_path_factory):
    """One JSON run sweeping the depth, with a plot: -> (rows, plot path)."""
    plot = tmp_path_factory.mktemp("bench") / "tok_s.png"
    r = llm("bench", str(smollm2_path), "-p", "8", "-n", str(N_GEN), "-r", "2", "--backend", "numpy",
            "--threads", "1", "--depth", "0,8", "-o", "json", "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), plot


@pytest.mark.slow
def test_json_matches_the_schema_one_row_per_combination(bench_run, smollm2_gguf):
    rows, _ = bench_run
    assert isinstance(rows, list) and [(r["depth"], r["n_prompt"], r["n_gen"]) for r in rows] == \
        [(0, 8, N_GEN), (8, 8, N_GEN)]
    for row in rows:
        check_row(row)
        assert row["backend"] == "numpy" and row["threads"] == 1 and row["quant"] == "Q4_1"
        assert row["model"] == smollm2_gguf.get("general.name")
        assert row["pp_tok_s"] > 0 and row["tg_tok_s"] > 0 and row["pp_tok_s_std"] >= 0
        assert 0 < row["ttft_s"] < 60 and 0 < row["load_s"] < 60
        # the numpy backend keeps float32 copies of the weights: far more than the 90 MB file
        assert 300 < row["peak_rss_mb"] < 8000


@pytest.mark.slow
def test_decode_bandwidth_is_weight_bytes_times_tok_s(bench_run, smollm2_path):
    from llmcli import engine
    from llmcli.store import store_root

    rows, _ = bench_run
    weight_bytes = engine.load(smollm2_path, "numpy", 1).model.weight_bytes_per_token()
    cached = json.loads((store_root() / "bandwidth.json").read_text())[machine_key()]["gbps"]
    for row in rows:
        assert row["decode_gbps"] == pytest.approx(weight_bytes * row["tg_tok_s"] / 1e9, rel=1e-9)
        assert row["bw_util"] == pytest.approx(row["decode_gbps"] / cached, rel=1e-9)


@pytest.mark.slow
def test_plot_is_a_png(bench_run):
    _, plot = bench_run
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.slow
def test_tg_agrees_with_an_independent_timing_of_llm_run(bench_run, smollm2_path):
    """`llm run` times decode its own way (sampling, detokenizing included); the two must agree within 1.5×.
    The machine is shared, so one disagreement is retried once before it counts."""
    rows, _ = bench_run
    bench_tg = rows[0]["tg_tok_s"]
    ratios = []
    for _ in range(2):
        r = llm("run", str(smollm2_path), "Once upon a time, in a small village by the sea,", "--raw",
                "--temperature", "0", "--max-tokens", str(N_GEN), "--verbose", "--backend", "numpy",
                "--threads", "1")
        assert r.returncode == 0, r.stderr
        m = re.search(r"^decode: (\d+) tokens, ([\d.]+) tok/s", r.stderr, re.M)
        assert m, r.stderr
        assert int(m.group(1)) >= 4  # enough decode steps for a rate
        ratios.append(bench_tg / float(m.group(2)))
        if 1 / 1.5 <= ratios[-1] <= 1.5:
            break
    assert 1 / 1.5 <= ratios[-1] <= 1.5, ratios


@pytest.mark.slow
def test_csv_matches_the_schema_and_skips_a_zero_test(smollm2_path):
    r = llm("bench", str(smollm2_path), "-p", "4", "-n", "0", "-r", "1", "--backend", "numpy",
            "--threads", "1", "-o", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 1 and tuple(rows[0]) == SCHEMA
    row = rows[0]
    assert row["backend"] == "numpy" and row["n_prompt"] == "4" and row["n_gen"] == "0"
    assert float(row["pp_tok_s"]) > 0 and float(row["ttft_s"]) > 0
    assert row["tg_tok_s"] == row["decode_gbps"] == row["bw_util"] == ""  # -n 0: no decode test


@pytest.mark.slow
def test_markdown_is_the_default(smollm2_path):
    # -p 0 -n 1 -r 1: the cheapest row; the table's header and the footnote must be there
    r = llm("bench", str(smollm2_path), "-p", "0", "-n", "1", "-r", "1", "--backend", "numpy",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| model | quant | backend | threads |") and lines[1].startswith("|---")
    assert lines[2].startswith("| ") and "| numpy | 1 | 0 | tg1 |" in lines[2]
    assert "read bandwidth" in lines[-1]


@pytest.mark.parametrize("args, words", [
    (["-r", "0"], ["-r/--repetitions", "at least 1"]),
    (["-p", "12,x"], ["-p/--n-prompt", "12,x"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--backend", "cuda"], ["unknown backend 'cuda'"]),
    (["-p", "0", "-n", "0"], ["nothing to measure"]),
    (["-o", "xml"], ["-o/--output", "xml"]),
    (["--plot", "chart.svg"], ["--plot", ".png"]),
    (["--depth", "9000"], ["trained for 8192"]),
    (["no-such-model.gguf"], ["no-such-model.gguf"]),
])
def test_bad_options_give_one_clear_error(args, words, smollm2_path, tmp_path):
    model = [] if args[0].endswith(".gguf") else [str(smollm2_path)]
    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", *model, *args], capture_output=True,
                       text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == ""


def test_config_validation_in_the_library():
    assert parse_int_list("1, 2,4", "--threads") == (1, 2, 4)
    with pytest.raises(BenchError, match="--depth must be at least 0"):
        BenchConfig(depth=(0, -1))
    with pytest.raises(BenchError, match="--threads needs at least one value"):
        BenchConfig(threads=())


def test_read_bandwidth_is_plausible():
    gbps = measure_read_bandwidth(n_bytes=64 << 20, repeats=2, threads=2)
    assert 0.2 < gbps < 5000  # a memory system, not a clock glitch


@pytest.mark.slow
def test_a_stale_bandwidth_figure_is_measured_again(smollm2_path, tmp_path):
    """A cached read bandwidth below what decoding itself read (a figure taken while the machine was busy) is
    measured again and replaced, so that BW use is not over 100 %; the stderr says so."""
    home = tmp_path / "home"
    home.mkdir()
    stale = {machine_key(): {"gbps": 0.001, "measured": "2026-01-01T00:00:00Z"}}
    (home / "bandwidth.json").write_text(json.dumps(stale))
    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", str(smollm2_path), "-p", "0", "-n", "4", "-r", "1",
                        "--backend", "numba", "--threads", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=300, env={**ENV, "LLMCLI_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    fresh = json.loads((home / "bandwidth.json").read_text())[machine_key()]["gbps"]
    (row,) = json.loads(r.stdout)
    assert fresh > 0.2 and row["bw_util"] == pytest.approx(row["decode_gbps"] / fresh, rel=1e-9)
    assert 0 < row["bw_util"] < 1
    assert "measured again" in r.stderr


def test_bench_is_not_imported_by_help():
    code = "import sys; from llmcli.cli import _register_commands; _register_commands(); " \
           "print('llmcli.bench' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_plot_without_matplotlib_is_a_clear_error(smollm2_path, tmp_path):
    env = fake_missing_package(tmp_path, "matplotlib")  # as on a machine without the [plot] extra
    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", str(smollm2_path), "--plot", "x.png"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: --plot needs matplotlib: pip install 'llmcli[plot]'"


def fake_missing_package(tmp_path: Path, name: str) -> dict:
    """An environment where `import name` fails, as on a machine without that package."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} on this machine')\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parent.parent)])}


def test_a_backend_that_fails_to_load_gives_an_error_line_and_the_others_still_run(smollm2_path, tmp_path):
    env = fake_missing_package(tmp_path, "mlx")
    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", str(smollm2_path), "--backend", "mlx,numpy",
                        "-p", "0", "-n", "1", "-r", "1", "--threads", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["backend"] for row in json.loads(r.stdout)] == ["numpy"]
    assert r.stderr.strip() == "error: backend mlx (1 threads): no mlx on this machine"
    r = subprocess.run([sys.executable, "-m", "llmcli", "bench", str(smollm2_path), "--backend", "mlx",
                        "--threads", "1"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "error: nothing was measured: backend mlx (1 threads): no mlx on this machine"
