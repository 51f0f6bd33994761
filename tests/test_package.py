"""The package surface: public names, error classes, and the import failure
when the compiled codec is missing."""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import octo_core
from octo_core import codec, errors

IDL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idl", "everything.thrift")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # a checkout or an sdist


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_import_without_compiled_codec_says_how_to_build():
    proc = run_python("""
        import sys
        sys.modules["octo_core._codec"] = None      # as if the extension were not built
        try:
            import octo_core
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("IMPORTED")
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "IMPORT-ERROR:" in out, out
    assert "pip install" in out
    assert "octo_core._codec" in out


def test_import_error_is_an_import_error_subclass_with_cause():
    proc = run_python("""
        import sys
        sys.modules["octo_core._codec"] = None
        try:
            import octo_core
        except ImportError as exc:
            assert isinstance(exc.__cause__, ImportError), repr(exc.__cause__)
            print("ok")
    """)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_public_names():
    assert callable(octo_core.load_idl)
    for name in ("encode", "decode", "encode_message", "decode_message", "Limits"):
        assert callable(getattr(codec, name)), name
    for name in ("load_idl", "codec", "errors"):
        assert name in octo_core.__all__
    for name in ("encode", "decode", "encode_message", "decode_message", "Limits"):
        assert name in codec.__all__
    assert isinstance(octo_core.__version__, str)


def test_the_version_is_written_in_one_place():
    """pyproject.toml reads the distribution's version from octo_core.__version__."""
    tomllib = pytest.importorskip("tomllib")   # (Python 3.11+)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "octo_core.__version__"}


def test_error_hierarchy_and_statuses():
    assert issubclass(errors.ProtocolError, errors.OctoError)
    assert issubclass(errors.EncodeError, errors.ProtocolError)
    assert issubclass(errors.DecodeError, errors.ProtocolError)
    assert issubclass(errors.OctoError, Exception)
    assert errors.ProtocolError.status == errors.EncodeError.status == errors.DecodeError.status == 5
    assert errors.Status.PROTOCOL_EXCEPTION == 5
    assert isinstance(errors.OctoError("x").status, int)

    e = errors.DecodeError("bad byte", offset=12)
    assert e.offset == 12 and e.status == 5 and str(e) == "bad byte"
    assert errors.DecodeError("no offset").offset is None
    enc = errors.EncodeError("S.x: expected int for i32, got str")
    assert enc.status == 5 and enc.message == "S.x: expected int for i32, got str"
    where = errors.DecodeError("bad", offset=0, method="echo", node="10.0.0.1:9000")
    assert "echo" in str(where) and "10.0.0.1:9000" in str(where)


def test_load_idl(tmp_path, idl, idl_path):
    module = octo_core.load_idl(idl_path)
    assert module is idl                      # same path and name: the same module
    assert module.__name__ == "everything_thrift"
    assert octo_core.load_idl(IDL_PATH).Everything is module.Everything
    assert hasattr(module, "EverythingService") and "echo" in module.EverythingService.thrift_services
    named = octo_core.load_idl(IDL_PATH, "other_everything_thrift")
    assert named.__name__ == "other_everything_thrift"
    # Round trip through the public API with a freshly loaded module.
    obj = named.Inner(name="n", count=3)
    assert codec.decode(named.Inner, codec.encode(obj)) == obj
    odd = tmp_path / "my-service.v2.thrift"
    odd.write_text("struct A { 1: i32 a }\n")
    assert octo_core.load_idl(str(odd)).__name__.endswith("_thrift")


def test_codec_errors_are_protocol_errors():
    module = octo_core.load_idl(IDL_PATH)
    with pytest.raises(errors.ProtocolError):
        codec.encode(module.Scalars(medium="x"))
    with pytest.raises(errors.ProtocolError):
        codec.decode(module.Scalars, b"\x08")


# What the README's commands (scripts/test.sh, .ci/run, the examples, the benchmarks)
# and the tests need from an sdist, beyond the package itself.
SDIST_NEEDS = [
    "LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
    "scripts/test.sh", ".ci/run",
    "python/echo.thrift", "python/echo_server.py", "python/call_modes.py",
    "python/cluster.py", "python/workers.py",
    "benchmarks/RESULTS.md", "benchmarks/conftest.py", "benchmarks/bench_rpc.py",
    "tests/conftest.py", "tests/wire_helpers.py", "tests/cluster_helpers.py",
    "tests/strategies.py", "tests/lb_reference.py", "tests/naming_provider.py", "tests/zk.py",
    "tests/idl/everything.thrift", "tests/idl/echo.thrift", "tests/idl/clash.thrift",
    "src/octo_core/_codec.pyx", "src/octo_core/_frame.pxi", "src/octo_core/_lb.pyx",
    "src/octo_core/_lb.pxd", "src/octo_core/_codec.pyi", "src/octo_core/_lb.pyi",
    "src/octo_core/_sha256.h",
    "src/octo_core/octo.thrift",
    "src/octo_core/bench/payload.thrift", "src/octo_core/py.typed",
]
# Build output and caches: never in an sdist (the Cython .c included, see MANIFEST.in).
SDIST_JUNK = ["*.so", "*.c", "*.pyc", "*.html", "*/__pycache__/*", "build/*", "dist/*",
              "*.egg-info/*", ".hypothesis/*", ".benchmarks/*", "tests/_generated/*", ".git/*"]


def _manifest_files(monkeypatch) -> set:
    """The files of this tree that MANIFEST.in selects for an sdist, read by setuptools'
    own template reader (no build, no Cython: milliseconds)."""
    egg_info = pytest.importorskip("setuptools.command.egg_info")
    if not os.path.isfile(os.path.join(ROOT, "MANIFEST.in")):
        pytest.skip("no MANIFEST.in: the tests are not in a checkout or an sdist")
    monkeypatch.chdir(ROOT)                 # setuptools globs relative to the working dir
    files = egg_info.FileList()
    # Before the template, setuptools adds the extensions' sources: Cython's .c output.
    files.extend(["src/octo_core/_codec.c", "src/octo_core/_lb.c"])
    with open("MANIFEST.in", encoding="utf-8") as template:
        for line in template:
            line = line.strip()
            if line and not line.startswith("#"):
                files.process_template_line(line)
    return {f.replace(os.sep, "/") for f in files.files}


def test_sdist_manifest_ships_what_tests_and_readme_need(monkeypatch):
    shipped = _manifest_files(monkeypatch)
    assert not [f for f in SDIST_NEEDS if f not in shipped]
    junk = [f for f in shipped if any(fnmatch.fnmatch(f, p) for p in SDIST_JUNK)]
    assert not junk
    # In a git checkout: every tracked file goes (but .gitignore), so a new helper or
    # data file cannot be left out of the sdist unnoticed.
    git = shutil.which("git")
    if git and os.path.isdir(os.path.join(ROOT, ".git")):
        tracked = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                 check=True, timeout=60).stdout.decode().split("\0")
        missing = [f for f in tracked if f and f != ".gitignore" and os.path.isfile(os.path.join(ROOT, f))
                   and f not in shipped]
        assert not missing, "tracked but not in MANIFEST.in: " + ", ".join(missing)


def test_installed_package_holds_no_sources_and_carries_the_license():
    pkg = os.path.dirname(os.path.abspath(octo_core.__file__))
    src = os.path.join(ROOT, "src")
    if os.path.isdir(src) and os.path.samefile(os.path.dirname(pkg), src):
        pytest.skip("octo_core is imported from the source tree, not from a wheel")
    names = {os.path.relpath(os.path.join(d, f), pkg).replace(os.sep, "/")
             for d, _, fs in os.walk(pkg) for f in fs}
    for needed in ("_lb.pxd", "_codec.pyi", "_lb.pyi", "octo.thrift", "bench/payload.thrift",
                   "py.typed"):
        assert needed in names, needed
    sources = [n for n in names if n.endswith((".c", ".pyx", ".pxi", ".h"))]
    assert not sources, sources
    meta = metadata.metadata("octo_core")
    assert meta["License-Expression"] == "Apache-2.0"
    license_files = [f for f in metadata.files("octo_core") or () if f.name == "LICENSE"]
    assert license_files and "Apache License" in license_files[0].read_text()
