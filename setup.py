"""Build the C extensions (Cython) optimised; everything else is in pyproject.toml."""
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

# OCTO_DEBUG_BUILD=1 builds without optimisation and with C asserts, for gdb/valgrind.
debug = os.environ.get("OCTO_DEBUG_BUILD") == "1"
# -fconserve-stack: the decoder recurses once per nesting level, so the compiler must
# not inline its way to big frames: MAX_DEPTH_CAP (1000) levels have to fit a 512 KiB
# thread stack (macOS threads get no more); tests/test_codec_errors.py checks it.
compile_args = ["-O0", "-g"] if debug else ["-O3", "-fno-strict-aliasing", "-fconserve-stack"]
macros = [] if debug else [("NDEBUG", "1")]
# Release builds on Linux drop the DWARF that Python's own CFLAGS (-g) put in: it made
# up most of each .so. The symbol table stays, so perf and callgrind still name the
# functions; OCTO_DEBUG_BUILD=1 keeps everything.
link_args = ["-Wl,--strip-debug"] if not debug and sys.platform.startswith("linux") else []


def extension(name: str) -> Extension:
    return Extension(
        f"octo_core.{name}",
        [f"src/octo_core/{name}.pyx"],
        include_dirs=["src/octo_core"],
        extra_compile_args=compile_args,
        define_macros=macros,
        extra_link_args=link_args,
    )


setup(
    ext_modules=cythonize(
        [extension("_codec"), extension("_lb")],
        language_level=3,
        annotate=os.environ.get("OCTO_CYTHON_ANNOTATE") == "1",
        compiler_directives={"embedsignature": True},
    ),
)
