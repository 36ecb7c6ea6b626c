"""Throw N hostile GGUF files (default 10,000) at load, one token and the chat template; print the outcome table.

    python benchmarks/fuzz_gguf.py --cases 10000 --backend numba --seed 1 [--keep DIR]

The fuzzer lives in tests/fuzz_gguf.py (the CI runs a seeded 1,000-case set of it); this is its long run.
Exit status 1 when any case crashed, hung, blew the memory cap, or failed without a clean LlmError line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz_gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
