"""Builds zeroline's compiled data plane (ext/_core.pyx); everything declarative is in pyproject.toml.

Switches (environment):
  ZEROLINE_NO_EXTENSIONS=1   skip the build: the pure-Python twin is used.
  ZEROLINE_DEBUG=1           annotate, line tracing and bounds checks, for profiling and debugging.

No libzmq is linked and no zmq.h is needed: the extension finds pyzmq's own libzmq at import.
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1"
DEBUG = os.environ.get("ZEROLINE_DEBUG") == "1"


def extensions():
    if NO_EXTENSIONS:
        print("zeroline: ZEROLINE_NO_EXTENSIONS=1, building the pure-Python package", file=sys.stderr)
        return []
    from Cython.Build import cythonize

    directives = {"language_level": 3, "embedsignature": True}
    macros = []
    if DEBUG:
        directives.update(linetrace=True, boundscheck=True, wraparound=True)
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    ext = Extension(
        "zeroline._core",
        ["ext/_core.pyx"],
        extra_compile_args=["-O3", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"],
        define_macros=macros,
        libraries=["dl"],
    )
    print("zeroline: building the compiled core (Cython)", file=sys.stderr)
    return cythonize([ext], include_path=["src"], compiler_directives=directives,
                     annotate=DEBUG)


setup(ext_modules=extensions())
