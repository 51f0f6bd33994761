"""Shared fixtures for the codec tests.

* ``idl``: the thriftpy2 module of ``tests/idl/everything.thrift`` (through
  ``octo_core.load_idl``);
* ``apache``: the same IDL compiled by Apache's ``thrift --gen py`` into a
  temporary directory and imported (skipped, with the reason printed, when the
  compiler is not installed; CI installs it).
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
IDL_PATH = os.path.join(HERE, "idl", "everything.thrift")
# The `namespace py` of everything.thrift: the package `thrift --gen py` writes.
APACHE_PACKAGE = "octo_everything_apache"
THRIFT_COMPILER = "/usr/bin/thrift"


@pytest.fixture(scope="session")
def idl_path() -> str:
    return IDL_PATH


@pytest.fixture(scope="session")
def idl() -> types.ModuleType:
    """everything.thrift loaded by thriftpy2."""
    import octo_core   # here, not at the top: a broken build fails tests, not collection
    return octo_core.load_idl(IDL_PATH)


def _thrift_compiler() -> str | None:
    if os.access(THRIFT_COMPILER, os.X_OK):
        return THRIFT_COMPILER
    return shutil.which("thrift")


def pytest_report_header(config):
    compiler = _thrift_compiler()
    if compiler is None:
        return ("thrift compiler: MISSING - the differential tests against Apache Thrift "
                "will be skipped")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"version unknown: {exc}"
    return f"thrift compiler: {compiler} ({version})"


def thrift_compiler_or_skip() -> str:
    """The path of Apache's ``thrift`` compiler; skips the test (reason printed) when
    it is not installed (CI installs it)."""
    compiler = _thrift_compiler()
    if compiler is None:
        reason = (f"Apache Thrift compiler not found ({THRIFT_COMPILER} or `thrift` on PATH); "
                  "install it (Debian: apt-get install thrift-compiler) to run the "
                  "tests against Apache Thrift")
        skip(reason)
    return compiler


def skip(reason: str) -> None:
    """Skip the test, the reason printed (pytest -q shows none otherwise)."""
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def apache_generate(idl_path: str, out: str, *modules: str) -> list:
    """``idl_path`` compiled by Apache's ``thrift --gen py`` into ``out``; returns the
    named generated ``modules``, imported. Skips the test when the compiler is not
    installed."""
    compiler = thrift_compiler_or_skip()
    # --allow-neg-keys: keep explicit negative field ids (everything.thrift has some);
    # -r: the included files too.
    proc = subprocess.run([compiler, "--allow-neg-keys", "-r", "--gen", "py", "-out", out, idl_path],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"thrift --gen py failed:\n{proc.stdout}\n{proc.stderr}"
    sys.path.insert(0, out)
    try:
        return [importlib.import_module(name) for name in modules]
    finally:
        sys.path.remove(out)


@pytest.fixture(scope="session")
def apache(tmp_path_factory) -> types.SimpleNamespace:
    """everything.thrift compiled by Apache Thrift's Python generator.

    ``ttypes`` holds the structs, ``service`` the ``EverythingService`` module
    (``<method>_args``/``<method>_result``), ``modules`` both for name lookups.
    """
    ttypes, service = apache_generate(IDL_PATH, str(tmp_path_factory.mktemp("apache_gen_py")),
                                      f"{APACHE_PACKAGE}.ttypes", f"{APACHE_PACKAGE}.EverythingService")
    return types.SimpleNamespace(ttypes=ttypes, service=service, modules=(ttypes, service))
