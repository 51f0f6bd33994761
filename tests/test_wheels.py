"""scripts/wheels.sh, the release build, for the interpreter running the tests: the
sdist, a manylinux wheel built from it, installed into a fresh venv and answering
calls (the script's own check), and what the wheel holds."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _venv_works(tmp_path: pathlib.Path) -> bool:
    """Whether this interpreter can make a venv with pip (Debian's needs python3-venv)."""
    made = subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "probe")],
                          capture_output=True)
    return made.returncode == 0


def test_release_build_gives_a_working_manylinux_wheel_and_an_sdist(tmp_path):
    if not _venv_works(tmp_path):
        pytest.skip(f"{sys.executable} cannot make a venv (python3-venv missing)")
    dist = tmp_path / "dist"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "wheels.sh"), sys.executable],
                          env={**os.environ, "OCTO_DIST": str(dist)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # the script's check: a call answered through the installed wheel
    assert any(line.startswith("octo ") and " 10B " in line for line in done.stdout.splitlines())

    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    wheels = list(dist.glob(f"octo_core-*-{tag}-{tag}-*manylinux_2_*_x86_64*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    assert len(list(dist.glob("octo_core-*.tar.gz"))) == 1

    names = zipfile.ZipFile(wheels[0]).namelist()
    for extension in ("_codec", "_lb"):
        assert any(n.startswith(f"octo_core/{extension}.cpython-") and n.endswith(".so")
                   for n in names), extension
    for shipped in ("octo_core/py.typed", "octo_core/_codec.pyi", "octo_core/_lb.pxd",
                    "octo_core/octo.thrift", "octo_core/bench/payload.thrift"):
        assert shipped in names
    assert any(n.endswith("/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    # sources and generated C stay out of the wheel (the sdist has them)
    assert not [n for n in names if n.endswith((".pyx", ".pxi", ".c", ".h"))]
