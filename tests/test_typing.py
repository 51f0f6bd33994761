"""The wheel ships ``py.typed``: the package's annotations must hold. mypy checks
``src/octo_core`` with pyproject's ``[tool.mypy]`` settings (skipped without mypy)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # a checkout or an sdist
PACKAGE = os.path.join(ROOT, "src", "octo_core")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed")


def test_mypy_finds_no_errors_in_the_package(tmp_path) -> None:
    if not os.path.isdir(PACKAGE):
        pytest.skip("no src/octo_core here (tests run against an installed package)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache"),   # a cold run, and nothing in the checkout
         PACKAGE],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout, proc.stdout
