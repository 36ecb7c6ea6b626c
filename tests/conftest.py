"""Shared fixtures. Models are kept in <repo>/.test-models between runs (gitignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = REPO / ".test-models"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"

os.environ.setdefault("LLMCLI_HOME", str(TEST_HOME))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real model: SmolLM2-135M-Instruct Q4_1, fetched into the test store once."""
    from llmcli.store import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_path):
    from quant.gguf_file import read_gguf

    return read_gguf(smollm2_path)
