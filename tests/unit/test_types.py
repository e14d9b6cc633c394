"""The package type-checks: mypy on alfk_cli/ with the settings in pyproject.toml ([tool.mypy]).

mypy is a dev dependency (``pip install -e '.[dev]'``), so its absence is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_is_clean():
    assert importlib.util.find_spec("mypy") is not None, (
        "mypy is not installed: pip install -e '.[dev]'"
    )
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "alfk_cli"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"mypy found problems:\n{r.stdout}{r.stderr}"
