"""Build cfmlib's optional C extension, the exact assignment solver of chapter 8.

The package's metadata lives in pyproject.toml; this file only adds the extension
``cfmlib._assign`` (cfmlib/_assign.c, a plain shared library that cfmlib/assignment.py loads
with ctypes). It is optional: where it cannot be built (no C compiler, a compiler that is not
GCC or Clang, Windows) the install still succeeds and cfmlib uses POT's exact solver instead,
with a warning at the first use. The C code picks its vector instructions at run time, so a
wheel built here runs on any processor of the same architecture.
"""
import hashlib
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# hashed in this order by cfmlib/assignment.py too, to notice a library built from older sources
SOURCES = ("cfmlib/_assign.c", "cfmlib/_assign_kernels.h")


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


class optional_build_ext(build_ext):
    """Build the solver where possible; otherwise report why and install without it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # e.g. no compiler configured at all
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing or failing
            self._skip(exc)

    def _skip(self, exc):
        print(f"cfmlib: the compiled assignment solver was not built ({exc}); cfmlib will use POT's exact solver "
              f"instead (same plans, slower). Install a C compiler (gcc or clang) and reinstall to build it.",
              file=sys.stderr)


extension = Extension(
    "cfmlib._assign",
    sources=[SOURCES[0]],
    depends=list(SOURCES[1:]),
    define_macros=[("CFM_SOURCE_HASH", f'"{source_hash()}"')],
    # no -march: the code chooses its instruction set at run time; no FP contraction (exact sums)
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
    optional=True,
)

setup(ext_modules=[] if os.name == "nt" else [extension], cmdclass={"build_ext": optional_build_ext})
