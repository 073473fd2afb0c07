"""Shared fixtures: the implementation under test (compiled and twin) and short ipc:// endpoints."""

import os
import shutil
import tempfile

import pytest
import zmq

from zeroline import core

NO_EXTENSIONS = os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1"
REQUIRE_EXTENSIONS = os.environ.get("ZEROLINE_REQUIRE_EXTENSIONS") == "1"


def available_implementations():
    """``{name: module}`` of the implementations this run tests, honouring the ZEROLINE_* switches.

    ZEROLINE_NO_EXTENSIONS=1 restricts the run to the twin even when the extension is built, as
    core.py does; otherwise the compiled module is included whenever it imports.
    """
    found = core.implementations()
    if NO_EXTENSIONS:
        return {"python": found["python"]}
    return found


def _impl_params():
    found = available_implementations()
    params = []
    if "cython" in found:
        params.append(pytest.param("cython", id="cython"))
    elif REQUIRE_EXTENSIONS and not NO_EXTENSIONS:
        # Keep the id so every test using it fails loudly instead of silently testing less.
        params.append(pytest.param("cython", id="cython"))
    params.append(pytest.param("python", id="python"))
    return params


@pytest.fixture(params=_impl_params())
def impl(request):
    """The implementation module (zeroline._core or zeroline._core_py) under test."""
    found = available_implementations()
    if request.param not in found:
        pytest.fail("ZEROLINE_REQUIRE_EXTENSIONS=1 but the compiled zeroline._core cannot be "
                    "imported; build it with `python setup.py build_ext --inplace`")
    module = found[request.param]
    assert module.IMPLEMENTATION == request.param
    return module


@pytest.fixture
def ipc_endpoint():
    """A fresh ``ipc://`` endpoint in a short temp dir (sun_path holds only 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="zl", dir="/tmp")
    try:
        yield "ipc://%s/s.ipc" % directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Sockets:
    """Makes sockets on one private context; closes each with linger 0, then the context."""

    def __init__(self):
        self.context = zmq.Context()
        self._sockets = []

    def make(self, kind, **options):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        self._sockets.append(sock)
        return sock

    def close(self):
        for sock in self._sockets:
            if not sock.closed:
                sock.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets():
    """A :class:`Sockets` factory torn down at the end of the test."""
    factory = Sockets()
    try:
        yield factory
    finally:
        factory.close()
