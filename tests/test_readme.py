"""The README's tour runs as written: its code block is a whole program."""
from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tour_code() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    opening = "## A short tour\n\n```python\n"
    start = readme.index(opening) + len(opening)
    return readme[start:readme.index("```\n", start)]


def test_the_readme_tour_runs_as_written():
    run = subprocess.run([sys.executable, "-c", tour_code()], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # the async call and the blocking client's sync call, then its future, callback,
    # oneway (the handler prints) and by-name calls: the callback's answer and the
    # oneway handler's print come from other threads, so they may interleave
    assert run.stdout.startswith("hi\nhi\n")
    assert run.stdout.count("hi") == 5 and run.stdout.count("written") == 1
