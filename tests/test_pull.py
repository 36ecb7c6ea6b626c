"""`llm pull` against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), driven through the
real CLI in a subprocess, so that the real huggingface_hub client reads HF_ENDPOINT / HF_HOME /
HF_TOKEN / HF_HUB_OFFLINE from its environment exactly as it does for a user."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import sigint_default
from hub_server import HubServer

from llmcli.hub import (
    GGUFChoice,
    RemoteFile,
    choose_gguf,
    conversion_files,
    gguf_choices,
    parse_ref,
    quant_tag,
)
from quant.errors import LlmError, ModelNotFoundError

GGUF_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
ST_REPO = "test-org/SmolLM2-135M-Instruct"
TINY_REPO = "test-org/tiny-GGUF"
GATED_REPO = "test-org/gated-GGUF"
TWINS_REPO = "test-org/twins-GGUF"
TOKEN = "hf_test_token_0123456789"
Q4KM = "SmolLM2-135M-Instruct-Q4_K_M.gguf"
Q8 = "SmolLM2-135M-Instruct-Q8_0.gguf"
SPLIT = ("SmolLM2-135M-Instruct-Q4_1-00001-of-00002.gguf", "SmolLM2-135M-Instruct-Q4_1-00002-of-00002.gguf")
ST_NEEDED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja"}


# ---------------------------------------------------------------- choosing files (no network)


def _files(*names: str, size: int = 100) -> list[RemoteFile]:
    return [RemoteFile(n, size) for n in names]


def test_quant_tag_from_names():
    assert quant_tag("SmolLM2-135M-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_tag("smollm2.q8_0.gguf") == "Q8_0"
    assert quant_tag("ggml-model_iq2_xxs.gguf") == "IQ2_XXS"
    assert quant_tag("Qwen2.5-0.5B-Instruct-BF16-00001-of-00002.gguf") == "BF16"
    assert quant_tag("model.gguf") is None


def test_choose_prefers_q4_k_m_then_q4_0_then_smallest():
    files = _files("m-Q8_0.gguf", "m-Q4_0.gguf", "m-Q4_K_M.gguf", "README.md")
    assert choose_gguf("r", gguf_choices(files), None, None).tag == "Q4_K_M"
    assert choose_gguf("r", gguf_choices(files[:2]), None, None).tag == "Q4_0"
    sized = [RemoteFile("m-Q8_0.gguf", 300), RemoteFile("m-Q6_K.gguf", 200), RemoteFile("m-F16.gguf", 900)]
    assert choose_gguf("r", gguf_choices(sized), None, None).tag == "Q6_K"


def test_choose_by_tag_is_case_insensitive_and_lists_what_exists():
    choices = gguf_choices(_files("m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-UD-Q4_K_XL.gguf"))
    assert choose_gguf("r", choices, "q8_0", None).files[0].path == "m-Q8_0.gguf"
    assert choose_gguf("r", choices, "ud-q4_k_xl", None).files[0].path == "m-UD-Q4_K_XL.gguf"
    with pytest.raises(ModelNotFoundError, match=r"tag 'Q5_K_M'.*Q4_K_M, Q4_K_XL, Q8_0"):
        choose_gguf("r", choices, "Q5_K_M", None)


def test_choose_ambiguous_lists_the_choices():
    choices = gguf_choices(_files("a-Q4_K_M.gguf", "b-Q4_K_M.gguf"))
    with pytest.raises(LlmError, match=r"a-Q4_K_M.gguf, b-Q4_K_M.gguf.*--file"):
        choose_gguf("r", choices, None, None)
    assert choose_gguf("r", choices, None, "b-Q4_K_M.gguf").files[0].path == "b-Q4_K_M.gguf"
    with pytest.raises(ModelNotFoundError, match=r"'c.gguf' not found.*a-Q4_K_M.gguf, b-Q4_K_M.gguf"):
        choose_gguf("r", choices, None, "c.gguf")


def test_split_sets_are_one_choice_and_only_when_complete():
    files = _files("m-Q8_0-00002-of-00003.gguf", "m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00003-of-00003.gguf",
                   "m-F16-00001-of-00002.gguf")
    (choice,) = gguf_choices(files)
    assert choice == GGUFChoice("m-Q8_0-*-of-00003.gguf", "Q8_0",
                                tuple(RemoteFile(f"m-Q8_0-0000{i}-of-00003.gguf", 100) for i in (1, 2, 3)))
    assert choice.size == 300


def test_conversion_needs_no_pickles_or_onnx():
    files = _files("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "pytorch_model.bin", "model.pt", "consolidated.pth", "model.onnx",
                   "onnx/model.safetensors", "original/params.json", "README.md", ".gitattributes")
    assert [f.path for f in conversion_files(files)] == [
        "config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]


def test_parse_ref():
    assert parse_ref("org/name:Q4_K_M") == ("org/name", "Q4_K_M")
    assert parse_ref("hf.co/org/name") == ("org/name", None)
    assert parse_ref("https://huggingface.co/org/name:q8_0") == ("org/name", "q8_0")
    with pytest.raises(ModelNotFoundError, match="ORG/NAME"):
        parse_ref("just-a-name")


# ---------------------------------------------------------------- the test Hub


def write_split(src: Path, out: Path, n_parts: int = 2) -> list[Path]:
    """A real llama.cpp split set of `src`, written by gguf-py's GGUFWriter (split_max_tensors)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader = GGUFReader(src)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    per_part = -(-len(reader.tensors) // n_parts)
    writer = GGUFWriter(None, arch, split_max_tensors=per_part)
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return writer.format_shard_names(out)


def write_tiny_gguf(path: Path, value: float) -> Path:
    from gguf import GGUFWriter, LlamaFileType

    writer = GGUFWriter(path, "llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.full((4, 32), value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, smollm2_path, smollm2_hf_dir):
    root = tmp_path_factory.mktemp("hub-repos")
    parts = write_split(smollm2_path, root / "SmolLM2-135M-Instruct-Q4_1.gguf")
    assert [p.name for p in parts] == list(SPLIT)
    readme = root / "README.md"
    readme.write_text("# test repository\n")
    decoys = {}
    for name in ("pytorch_model.bin", "model.onnx", "consolidated.00.pth", "training_args.pt"):
        decoys[name] = root / name
        decoys[name].write_bytes(b"not for conversion" * 100)
    tiny = {v: write_tiny_gguf(root / f"tiny-{v}.gguf", v) for v in (1.0, 2.0)}
    with HubServer() as server:
        server.add_repo(GGUF_REPO, {Q4KM: smollm2_path, Q8: smollm2_path, SPLIT[0]: parts[0],
                                    SPLIT[1]: parts[1], "README.md": readme})
        st_files = {p.name: p for p in smollm2_hf_dir.iterdir() if p.is_file()}
        assert set(st_files) == ST_NEEDED
        server.add_repo(ST_REPO, {**st_files, **decoys, "onnx/model.onnx": decoys["model.onnx"],
                                  "original/consolidated.00.pth": decoys["consolidated.00.pth"],
                                  "README.md": readme})
        server.add_repo(TINY_REPO, {"tiny-Q4_0.gguf": tiny[2.0], "README.md": readme},
                        revisions={"v1": {"tiny-Q4_0.gguf": tiny[1.0]}})
        server.add_repo(GATED_REPO, {"tiny-Q4_0.gguf": tiny[1.0]}, token=TOKEN)
        server.add_repo(TWINS_REPO, {"a-Q4_0.gguf": tiny[1.0], "b-Q4_0.gguf": tiny[2.0]})
        server.smollm2 = smollm2_path
        yield server


@pytest.fixture
def env(hub, tmp_path):
    """A fresh Hugging Face cache and model store for each test, pointed at the test Hub."""
    hub.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), LLMCLI_HOME=str(tmp_path / "store"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return env


def llm(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcli", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def ok(env: dict, *args: str) -> subprocess.CompletedProcess:
    r = llm(env, *args)
    assert r.returncode == 0, r.stderr
    return r


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed with exit 1 and said so in exactly one line."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def listed(env: dict) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(ok(env, "list", "--json").stdout)}


def blobs(env: dict, repo_id: str) -> list[Path]:
    folder = Path(env["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--")) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- pull -> list -> run


@pytest.mark.slow
def test_gguf_pull_list_run_cache_offline_rm(hub, env):
    size = hub.smollm2.stat().st_size
    r = ok(env, "pull", GGUF_REPO)  # no tag: Q4_K_M wins
    assert hub.bytes_sent(GGUF_REPO) == size and hub.bytes_sent(GGUF_REPO, Q4KM) == size
    assert f"{GGUF_REPO}:Q4_K_M" in r.stdout
    models = listed(env)
    entry = models[f"{GGUF_REPO}:Q4_K_M"]
    # the store points into the standard HF cache, no copy; the type comes from the file's metadata
    assert entry["type"] == "Q4_1" and entry["size"] == size and entry["source"] == f"hf:{GGUF_REPO}@main"
    assert Path(entry["path"]).name == Q4KM and "/hub/models--test-org--" in entry["path"]
    assert sha256(Path(entry["path"])) == sha256(hub.smollm2)
    assert set(entry) == {"name", "source", "type", "size", "modified", "path"}

    r = ok(env, "run", GGUF_REPO, "Say hi", "--max-tokens", "8", "--backend", "numpy", "--temperature", "0")
    assert r.stdout.strip()

    hub.reset()
    ok(env, "pull", f"{GGUF_REPO}:Q4_K_M")  # cached: nothing is fetched again
    ok(env, "pull", f"{GGUF_REPO}:q8_0")  # same bytes under another name: the cached blob is reused
    assert hub.bytes_sent(GGUF_REPO) == 0
    assert len(blobs(env, GGUF_REPO)) == 1

    hub.down = True  # the Hub is gone: offline mode serves from the cache
    n_requests = len(hub.requests)
    ok({**env, "HF_HUB_OFFLINE": "1"}, "pull", f"{GGUF_REPO}:Q4_K_M")
    assert len(hub.requests) == n_requests
    hub.down = False

    assert "ambiguous" in one_error_line(llm(env, "rm", GGUF_REPO, "--yes"))
    assert "--yes" in one_error_line(llm(env, "rm", f"{GGUF_REPO}:Q8_0", stdin=subprocess.DEVNULL))
    r = ok(env, "rm", f"{GGUF_REPO}:Q8_0", "--yes")
    assert "freed 0 B" in r.stdout  # the blob is still used by Q4_K_M
    assert len(blobs(env, GGUF_REPO)) == 1 and Path(entry["path"]).is_file()
    r = ok(env, "rm", f"{GGUF_REPO}:Q4_K_M", "--yes")
    assert "freed 98.4 MB" in r.stdout
    assert listed(env) == {}
    assert not (Path(env["HF_HOME"]) / "hub" / "models--test-org--SmolLM2-135M-Instruct-GGUF").exists()


@pytest.mark.slow
def test_split_gguf_comes_whole(hub, env, smollm2_gguf):
    from quant.gguf_file import read_gguf

    ok(env, "pull", GGUF_REPO, "--file", SPLIT[1])  # naming any part takes the whole set
    assert {p for (_, p) in hub.sent} == set(SPLIT)
    entry = listed(env)[f"{GGUF_REPO}:Q4_1"]
    merged = read_gguf(entry["path"])
    assert {k: v for k, v in merged.metadata.items() if not k.startswith("split.")} == smollm2_gguf.metadata
    assert list(merged.tensors) == list(smollm2_gguf.tensors)
    for name, t in smollm2_gguf.tensors.items():
        assert merged.tensors[name].qtype == t.qtype
        assert np.array_equal(merged.tensors[name].data, t.data), name
    # the entry owns the merged file and the parts: its size counts both, rm frees both
    assert entry["size"] == merged.file_size + sum(hub.bytes_sent(GGUF_REPO, p) for p in SPLIT)
    r = ok(env, "rm", f"{GGUF_REPO}:Q4_1", "--yes")
    assert blobs(env, GGUF_REPO) == [] and "freed" in r.stdout


@pytest.mark.slow
def test_safetensors_pull_fetches_only_what_conversion_needs(hub, env):
    ok(env, "pull", ST_REPO)
    assert {p for (_, p) in hub.sent} == ST_NEEDED
    entry = listed(env)[f"{ST_REPO}:safetensors"]
    assert entry["type"] == "safetensors"
    snapshot = Path(entry["path"])
    assert {p.name for p in snapshot.iterdir()} == ST_NEEDED
    assert "llm quantize" in one_error_line(llm(env, "run", ST_REPO, "hi", "--max-tokens", "1"))


@pytest.mark.slow
def test_pull_q_converts_from_the_cache_and_runs(hub, env):
    pytest.importorskip("llmcli.quantize")
    ok(env, "pull", ST_REPO, "-q", "q4_0")
    sent = hub.bytes_sent(ST_REPO)
    hub.reset()
    ok(env, "quantize", ST_REPO, "-t", "q8_0")  # from the cache, no network
    assert hub.bytes_sent(ST_REPO) == 0 and sent > 0
    models = listed(env)
    assert {f"{ST_REPO}:safetensors", f"{ST_REPO}:q4_0", f"{ST_REPO}:q8_0"} <= set(models)
    r = ok(env, "run", f"{ST_REPO}:q4_0", "Say hi", "--max-tokens", "8", "--backend", "numpy")
    assert r.stdout.strip()


# ---------------------------------------------------------------- interrupted downloads


def _partial(env: dict, repo_id: str) -> list[Path]:
    return [p for p in blobs(env, repo_id) if p.name.endswith(".incomplete")]


@pytest.mark.slow
def test_download_cut_off_resumes_on_next_pull(hub, env):
    size, cut = hub.smollm2.stat().st_size, 30_000_000
    hub.cut_after(GGUF_REPO, Q4KM, cut)  # the connection drops, then the Hub stops answering
    line = one_error_line(llm(env, "pull", f"{GGUF_REPO}:Q4_K_M"))
    assert "again to resume" in line and "30.0 MB of 98.4 MB kept" in line
    (part,) = _partial(env, GGUF_REPO)
    assert part.stat().st_size == cut

    hub.reset()
    ok(env, "pull", f"{GGUF_REPO}:Q4_K_M")
    assert hub.bytes_sent(GGUF_REPO, Q4KM) == size - cut  # no byte twice
    assert _partial(env, GGUF_REPO) == []
    assert sha256(Path(listed(env)[f"{GGUF_REPO}:Q4_K_M"]["path"])) == sha256(hub.smollm2)


@pytest.mark.slow
def test_a_dropped_connection_is_resumed_within_the_pull(hub, env):
    tiny = hub.repos[TINY_REPO].revisions["main"]["tiny-Q4_0.gguf"]
    hub.cut_after(TINY_REPO, "tiny-Q4_0.gguf", 300, then_down=False)
    ok(env, "pull", TINY_REPO)
    assert hub.bytes_sent(TINY_REPO) == tiny.stat().st_size  # the retry asked for the rest only
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/tiny-Q4_0.gguf")]
    assert len(gets) == 2
    assert sha256(Path(listed(env)[f"{TINY_REPO}:Q4_0"]["path"])) == sha256(tiny)


@pytest.mark.slow
def test_ctrl_c_keeps_the_partial_download(hub, env):
    size, stall = hub.smollm2.stat().st_size, 20_000_000
    hub.stall_after(GGUF_REPO, Q4KM, stall)
    # The stall must outlast any wait of the test under load: a read timeout would retry and finish the download.
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "pull", GGUF_REPO],
                            env={**env, "HF_HUB_DOWNLOAD_TIMEOUT": "600"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    try:
        assert hub.stalled.wait(120), "the pull never started downloading"
        deadline = time.time() + 300  # ready: every byte sent before the stall is on disk
        while not (_partial(env, GGUF_REPO) and _partial(env, GGUF_REPO)[0].stat().st_size == stall):
            assert time.time() < deadline and proc.poll() is None, "the client did not write what it received"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        hub.reset()  # before the stalled transfer is released: it must not count
    assert proc.returncode == 130, err
    assert "interrupted: 20.0 MB" in err and "again to resume" in err and "Traceback" not in err
    (part,) = _partial(env, GGUF_REPO)
    assert part.stat().st_size == stall

    ok(env, "pull", GGUF_REPO)
    assert hub.bytes_sent(GGUF_REPO, Q4KM) == size - stall


# ---------------------------------------------------------------- small repositories: revisions, errors


@pytest.mark.slow
def test_revision_and_offline(hub, env):
    from quant.gguf_file import read_gguf

    def value() -> float:
        path = listed(env)[f"{TINY_REPO}:Q4_0"]["path"]
        return float(read_gguf(path).tensors["token_embd.weight"].data[0, 0])

    ok(env, "pull", TINY_REPO, "--revision", "v1")
    assert value() == 1.0 and listed(env)[f"{TINY_REPO}:Q4_0"]["source"] == f"hf:{TINY_REPO}@v1"
    ok(env, "pull", TINY_REPO)
    assert value() == 2.0
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    ok(offline, "pull", f"{TINY_REPO}:Q4_0", "--revision", "v1")
    assert value() == 1.0
    line = one_error_line(llm(offline, "pull", GGUF_REPO))
    assert "offline" in line and "HF_HUB_OFFLINE" in line
    assert "revision 'v9' not found" in one_error_line(llm(env, "pull", TINY_REPO, "--revision", "v9"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_error_lines(hub, env):
    assert f"repository {GGUF_REPO}-nope not found" in one_error_line(llm(env, "pull", f"{GGUF_REPO}-nope"))
    line = one_error_line(llm(env, "pull", TINY_REPO, "--file", "nope.gguf"))
    assert "'nope.gguf' not found" in line and "tiny-Q4_0.gguf" in line
    line = one_error_line(llm(env, "pull", f"{TINY_REPO}:Q5_K_M"))
    assert "tag 'Q5_K_M'" in line and "Q4_0" in line
    line = one_error_line(llm(env, "pull", TWINS_REPO))
    assert "a-Q4_0.gguf, b-Q4_0.gguf" in line and "--file" in line
    line = one_error_line(llm(env, "pull", TINY_REPO, "--file", "README.md"))
    assert "not found" in line and "tiny-Q4_0.gguf" in line
    assert "-q converts safetensors" in one_error_line(llm(env, "pull", TINY_REPO, "-q", "q4_0"))

    dead = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    line = one_error_line(llm(dead, "pull", TINY_REPO))
    assert "cannot reach the Hub" in line and "retry" in line

    line = one_error_line(llm(env, "pull", GATED_REPO))
    assert "authentication required" in line and "HF_TOKEN" in line
    ok({**env, "HF_TOKEN": TOKEN}, "pull", GATED_REPO)  # the token goes to the Hub, never to its CDN
    assert f"{GATED_REPO}:Q4_0" in listed(env)
    assert ("GET", f"/cdn/{GATED_REPO}/{hub.repos[GATED_REPO].commit('main')}/tiny-Q4_0.gguf") in hub.requests
    assert hub.bytes_sent(TINY_REPO) == 0


@pytest.mark.slow
def test_disk_full(hub, env):
    hub.repos[TINY_REPO].sizes["tiny-Q4_0.gguf"] = 10**15  # a petabyte file: refused before any transfer
    try:
        line = one_error_line(llm(env, "pull", TINY_REPO))
    finally:
        hub.repos[TINY_REPO].sizes.clear()
    assert "not enough disk space" in line and "HF_HOME" in line
    assert hub.bytes_sent(TINY_REPO) == 0

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to make writes fail with ENOSPC")
    tiny = hub.repos[TINY_REPO].revisions["main"]["tiny-Q4_0.gguf"]
    folder = Path(env["HF_HOME"]) / "hub" / "models--test-org--tiny-GGUF" / "blobs"
    folder.mkdir(parents=True)
    (folder / f"{hub.etag(tiny)}.incomplete").symlink_to("/dev/full")  # every write: ENOSPC
    line = one_error_line(llm(env, "pull", TINY_REPO))
    assert "disk full" in line and "pull again" in line
