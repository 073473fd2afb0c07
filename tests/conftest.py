"""Shared fixtures: the implementation under test (compiled and twin) and short ipc:// endpoints."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

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


# -- a real Docker engine (tests marked docker_engine) -------------------------------------------

ENGINE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "scripts", "docker-engine.sh")
ENGINE_IMAGE = "zl-busybox"


def _engine_answers():
    import subprocess
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, check=False,
                              stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine():
    """A running Docker engine with the ``zl-busybox`` image, set up by scripts/docker-engine.sh.

    Skips with the script's reason where no engine can be started; with ``CI=true`` that is a
    failure instead, so CI can never pass without running these tests. An engine this fixture
    started itself is stopped at the end of the session (one that already ran is left alone).
    """
    import subprocess
    was_up = _engine_answers()
    try:
        done = subprocess.run(["bash", ENGINE_SCRIPT, "start"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=900, check=False)
        ok, output = done.returncode == 0, done.stdout.decode("utf-8", "replace").strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, output = False, "%s: %s" % (type(exc).__name__, exc)
    if not ok:
        reason = "no Docker engine could be started by scripts/docker-engine.sh: %s" % (
            output.splitlines()[-1] if output else "no output")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: engine tests must run, not skip)", pytrace=False)
        pytest.skip(reason)
    try:
        yield ENGINE_IMAGE
    finally:
        if not was_up and os.environ.get("ZL_ENGINE_KEEP") != "1":
            subprocess.run(["bash", ENGINE_SCRIPT, "stop"], stdout=subprocess.DEVNULL, timeout=120,
                           check=False)


#: A hang guard for the `zeroline collect` processes the tests start, not a speed check.
COLLECT_TIMEOUT_S = 60


def start_collect(directory, binds, *args):
    """`zeroline collect` with one ipc:// endpoint in ``directory`` per ``(option, name)`` of
    ``binds`` (``("--bind", "pull")``: ``--bind ipc://DIR/pull.ipc``), then ``args``.

    Returns ``(process, endpoint, ...)`` once every endpoint is bound, or the process exited.
    """
    endpoints = ["ipc://%s/%s.ipc" % (directory, name) for _, name in binds]
    argv = [sys.executable, "-m", "zeroline", "collect"]
    for (option, _), endpoint in zip(binds, endpoints):
        argv += [option, endpoint]
    proc = subprocess.Popen(argv + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(COLLECT_TIMEOUT_S * 100):
        if all(os.path.exists(e[len("ipc://"):]) for e in endpoints) or proc.poll() is not None:
            break
        time.sleep(0.01)
    return (proc, *endpoints)


def finish(proc, sig=None):
    """Send ``sig`` (if any) to a zeroline process and wait for it: (stdout, stderr), which must
    hold no traceback."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=COLLECT_TIMEOUT_S)
    finally:
        proc.kill()
    assert b"Traceback" not in err, err
    return out, err
