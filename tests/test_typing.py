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


#: A user's program, as the README's tour writes it: IDL methods are attributes
#: made at run time, which a type checker must let through (typed Any).
USER_PROGRAM = '''
import asyncio
from typing import Any

import octo_core

echo_thrift: Any = octo_core.load_idl("echo.thrift")


async def main() -> None:
    async with octo_core.AsyncClient(echo_thrift.Echo, appkey="a", hosts=["127.0.0.1:1"],
                                     timeout=1.0) as client:
        answer: str = await client.echo("hi")
        print(answer, await client.call("echo", "hi"))


def blocking() -> None:
    with octo_core.Client(echo_thrift.Echo, appkey="a", hosts=["127.0.0.1:1"]) as client:
        print(client.echo("hi"), client.future.echo("hi").result())
        client.callback.echo("hi", callback=print)
        client.log("written")
        print(client.call("echo", "hi"), client.future.call("echo", "hi").result())
'''


def test_a_users_calls_of_idl_methods_type_check(tmp_path) -> None:
    """The package ships py.typed, so mypy checks the calls a user makes: every
    ``client.echo(...)`` was an error ("AsyncClient" has no attribute "echo")."""
    (tmp_path / "user_program.py").write_text(USER_PROGRAM)
    # octo_core as a user's mypy finds it, an installed package with py.typed: the
    # one these tests import (a relative PYTHONPATH=src would miss it from tmp_path)
    import octo_core
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(octo_core.__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy-cache"),
         "user_program.py"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
