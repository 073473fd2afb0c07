"""zeroline run -- CMD: both streams forwarded, signals passed on, CMD's exit status returned."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
import zmq

from zeroline import core

TIMEOUT_S = 60


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="zl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def zeroline_cmd(*args):
    return [sys.executable, "-m", "zeroline", *args]


def receive(endpoint, expected, run_args, env=None):
    """Runs `zeroline run` toward a PULL socket and returns (process, messages)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    receiver = core.Receiver()
    got = []
    try:
        proc = subprocess.run(zeroline_cmd("run", "--log-opt", "zmq-address=" + endpoint,
                                           "--log-opt", "zmq-socket=push", *run_args),
                              capture_output=True, timeout=TIMEOUT_S, env=env)
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < expected and time.monotonic() < deadline:
            receiver.recv(sock, 4096, 50)
            got.extend(receiver.take())
    finally:
        sock.close(linger=0)
        ctx.term()
    return proc, got


def test_embedded_default_collects_stdout_and_stderr(short_dir):
    proc = subprocess.run(zeroline_cmd("run", "--container-id", "r1", "--", "sh", "-c",
                                       "echo out; echo err >&2; printf tail"),
                          cwd=short_dir, capture_output=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(short_dir, "zeroline-logs", "default", "default.log"), "rb") as f:
        lines = f.read().splitlines()
    # stdout and stderr are two streams: order between them is not kept (as in Docker).
    assert sorted(lines) == [b"r1: err", b"r1: out", b"r1: tail"]


def test_sources_and_partial_metadata_in_msgpack(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    proc, got = receive(endpoint, 3, ["--log-opt", "zmq-framing=msgpack", "--container-id", "r2",
                                      "--", "sh", "-c", "echo out; echo err >&2; printf tail"])
    assert proc.returncode == 0, proc.stderr
    records = sorted((msgpack.unpackb(m[2]) for m in got), key=lambda r: r["line"])
    assert [(r["source"], r["line"]) for r in records] == [
        ("stderr", b"err"), ("stdout", b"out"), ("stdout", b"tail")]
    assert records[2]["partial"]["last"] is True


def test_exit_status_is_the_commands(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    proc, got = receive(endpoint, 1, ["--", "sh", "-c", "echo bye; exit 7"])
    assert proc.returncode == 7
    assert len(got) == 1


def test_killed_command_gives_128_plus_signal(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    proc, _ = receive(endpoint, 0, ["--", "sh", "-c", "kill -9 $$"])
    assert proc.returncode == 128 + signal.SIGKILL


def test_tenant_and_service_from_the_commands_environment(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    env = dict(os.environ, TENANT_ID="acme", SERVICE_ID="api")
    proc, got = receive(endpoint, 1, ["--container-id", "e", "--", "echo", "hi"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert got == [[b"acme", b"api", b"e: hi"]]


def test_sigterm_is_passed_on_and_lines_after_it_are_kept(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    script = ("trap 'echo got-term; exit 5' TERM; echo ready; "
              "while :; do sleep 0.05; done")
    proc = subprocess.Popen(zeroline_cmd("run", "--log-opt", "zmq-address=" + endpoint,
                                         "--log-opt", "zmq-socket=push", "--container-id", "t",
                                         "--", "sh", "-c", script), stderr=subprocess.PIPE)
    try:
        got = []
        if sock.poll(TIMEOUT_S * 1000):
            got.append(sock.recv_multipart())
        assert got == [[b"default", b"default", b"t: ready"]]
        proc.send_signal(signal.SIGTERM)
        if sock.poll(TIMEOUT_S * 1000):
            got.append(sock.recv_multipart())
        assert proc.wait(TIMEOUT_S) == 5
    finally:
        proc.kill()
        sock.close(linger=0)
        ctx.term()
    assert got[1] == [b"default", b"default", b"t: got-term"]
    assert b"Traceback" not in proc.stderr.read()


def test_missing_command_is_127_with_one_line():
    proc = subprocess.run(zeroline_cmd("run", "--", "/nonexistent/zl-cmd"), capture_output=True,
                          timeout=TIMEOUT_S, cwd=tempfile.gettempdir())
    assert proc.returncode == 127
    err = proc.stderr.decode()
    assert "cannot run /nonexistent/zl-cmd" in err and "Traceback" not in err


def test_run_without_command_is_a_usage_error():
    proc = subprocess.run(zeroline_cmd("run"), capture_output=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert b"run needs a command" in proc.stderr


def test_stats_interval_prints_periodic_lines(short_dir):
    endpoint = "ipc://%s/r.ipc" % short_dir
    proc, _ = receive(endpoint, 1, ["--stats-interval", "0.1", "--", "sh", "-c",
                                    "echo a; sleep 0.5"])
    assert proc.returncode == 0
    assert proc.stderr.count(b"streams open") >= 2
