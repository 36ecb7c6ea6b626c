"""CI runs exactly the README's set-up commands for the test suite, in a virtual environment it makes itself."""

from __future__ import annotations

import re

from conftest import REPO


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(c.strip() for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    # the environment is created by the script itself, before the install: nothing installed by hand counts
    assert ci.index("python3 -m venv") < ci.index("activate") < ci.index(test_cmd)
