"""The README's set-up and test commands are exactly what CI runs."""

from __future__ import annotations

import os
import re

from tests.conftest import REPO


def blocks(text: str) -> list[list[str]]:
    return [[line for line in b.strip().splitlines()] for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_commands():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = blocks(f.read())
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    install, test = readme[0], readme[1]
    main_job = install.pop()  # the third line runs the main job; CI runs the tests instead
    assert main_job.startswith("python -m training")
    assert ci == install + test
