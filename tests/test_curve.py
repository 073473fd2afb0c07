"""CurveZMQ between real `zeroline forward` and `zeroline collect` processes, keys from `zeroline
keygen`: allowed keys deliver (push, acked, pub), refused ones deliver nothing and the forwarder
says why in one line, both sides keep running, and the allow-list is reloaded without a restart."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from zeroline.config import validate_log_opts
from zeroline.errors import ConfigError

WAIT_S = 20.0


def zeroline(*args):
    return subprocess.run([sys.executable, "-m", "zeroline", *args], capture_output=True,
                          timeout=60, check=True)


class Proc:
    """A zeroline process whose stderr is read on a thread (so it never fills the pipe)."""

    def __init__(self, *args, stdin=False):
        self.proc = subprocess.Popen([sys.executable, "-m", "zeroline", *args],
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_line(self, text, timeout_s=WAIT_S):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError("no stderr line with %r within %gs; got %r"
                             % (text, timeout_s, self.lines))

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()
        self._thread.join(5)


@pytest.fixture
def world():
    """Keys of a collector and two clients (one allowed), an allow-list dir, an out dir."""
    root = tempfile.mkdtemp(prefix="zlc", dir="/tmp")
    keys = os.path.join(root, "keys")
    for name in ("collector", "good", "stranger"):
        zeroline("keygen", name, "--dir", keys)
    allow = os.path.join(root, "allow")
    os.mkdir(allow)
    shutil.copy(os.path.join(keys, "good.key"), allow)
    procs = []
    try:
        yield {"root": root, "keys": keys, "allow": allow, "out": os.path.join(root, "out"),
               "procs": procs}
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(world, transport):
    if transport == "ipc":
        return "ipc://%s/c.ipc" % world["root"]
    return "tcp://127.0.0.1:%d" % free_port()


def collect(world, bind_option, address, *extra, curve=True, allow=True):
    args = ["collect", bind_option, address, "--out", world["out"], "--stats-interval", "1"]
    if curve:
        args += ["--curve-secret-key", os.path.join(world["keys"], "collector.key_secret")]
        if allow:
            args += ["--curve-allow", world["allow"]]
    proc = Proc(*args, *extra)
    world["procs"].append(proc)
    return proc


def forward(world, address, socket_kind="push", client="good", server_key=None, curve=True):
    args = ["forward", "--log-opt", "zmq-address=" + address,
            "--log-opt", "zmq-socket=" + socket_kind]
    if curve:
        args += ["--log-opt", "zmq-curve-server-key="
                 + (server_key or os.path.join(world["keys"], "collector.key")),
                 "--log-opt", "zmq-curve-key=" + os.path.join(world["keys"],
                                                              client + ".key_secret")]
    proc = Proc(*args, stdin=True)
    world["procs"].append(proc)
    return proc


def written(world):
    path = os.path.join(world["out"], "default", "default.log")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def wait_written(world, count, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = written(world)
        if data.count(b"\n") >= count:
            return data
        time.sleep(0.05)
    raise AssertionError("only %r written" % written(world))


def wait_bound(proc, address):
    # The collector is listening once its ipc file exists / its port takes connections.
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.alive(), proc.lines
        if address.startswith("ipc://"):
            if os.path.exists(address[6:]):
                return
        else:
            host, port = address[6:].rsplit(":", 1)
            with socket.socket() as s:
                if s.connect_ex((host, int(port))) == 0:
                    return
        time.sleep(0.05)
    raise AssertionError("collector never bound %s: %r" % (address, proc.lines))


BIND = {"push": "--bind", "acked": "--bind-acked", "pub": "--bind-sub"}


@pytest.mark.parametrize("socket_kind,transport", [("push", "ipc"), ("push", "tcp"),
                                                   ("acked", "tcp"), ("acked", "ipc"),
                                                   ("pub", "tcp")])
def test_allowed_key_delivers(world, socket_kind, transport):
    address = endpoint(world, transport)
    col = collect(world, BIND[socket_kind], address)
    wait_bound(col, address)
    fwd = forward(world, address, socket_kind)
    fwd.send(b"secret password=hunter2\nsecond\n")
    data = wait_written(world, 2)
    assert b"secret password=hunter2" in data and b"second" in data
    fwd.proc.stdin.close()
    assert fwd.proc.wait(30) == 0, fwd.lines
    assert not any("refused" in line or "handshake" in line for line in fwd.lines)


def _refused(world, fwd, col, text):
    fwd.send(b"must not arrive\n")
    line = fwd.wait_line(text)
    assert "Traceback" not in "\n".join(fwd.lines + col.lines)
    assert line.startswith("zeroline: ") and "\n" not in line
    time.sleep(0.5)
    assert written(world) == b""
    assert fwd.alive() and col.alive()
    return line


@pytest.mark.parametrize("socket_kind", ["push", "acked"])
def test_unknown_client_key_delivers_nothing_and_is_said(world, socket_kind):
    address = endpoint(world, "tcp")
    col = collect(world, BIND[socket_kind], address)
    wait_bound(col, address)
    fwd = forward(world, address, socket_kind, client="stranger")
    _refused(world, fwd, col, "refused our CURVE key")
    col.wait_line("refused a CURVE client")
    col.wait_line("curve_refused_total")


def test_wrong_server_key_delivers_nothing_and_is_said(world):
    address = endpoint(world, "ipc")
    col = collect(world, "--bind", address)
    wait_bound(col, address)
    with open(os.path.join(world["keys"], "stranger.key")) as f:
        wrong = next(line.split('"')[1] for line in f if "public-key" in line)
    fwd = forward(world, address, server_key=wrong)
    _refused(world, fwd, col, "is CURVE on at both ends and the server key right?")


def test_plaintext_client_to_curve_collector_delivers_nothing_and_is_said(world):
    address = endpoint(world, "tcp")
    col = collect(world, "--bind", address)
    wait_bound(col, address)
    fwd = forward(world, address, curve=False)
    _refused(world, fwd, col, "CURVE is on at one end only")


def test_curve_client_to_plaintext_collector_delivers_nothing_and_is_said(world):
    address = endpoint(world, "ipc")
    col = collect(world, "--bind", address, curve=False)
    wait_bound(col, address)
    fwd = forward(world, address)
    _refused(world, fwd, col, "CURVE is on at one end only")


@pytest.mark.parametrize("how,socket_kind", [("mtime", "push"), ("sighup", "push"),
                                             ("mtime", "acked")])
def test_allow_list_is_reloaded_without_restart(world, how, socket_kind):
    address = endpoint(world, "tcp")
    col = collect(world, BIND[socket_kind], address)
    wait_bound(col, address)
    fwd = forward(world, address, socket_kind, client="stranger")
    _refused(world, fwd, col, "refused our CURVE key")
    key = os.path.join(world["keys"], "stranger.key")
    if how == "mtime":
        shutil.copy(key, world["allow"])
    else:
        # Written behind the watcher's back (same directory mtime as before), then SIGHUP.
        stat = os.stat(world["allow"])
        shutil.copy(key, world["allow"])
        os.utime(world["allow"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
        col.proc.send_signal(signal.SIGHUP)
    col.wait_line("2 keys")
    fwd.send(b"allowed now\n")
    # The line sent while refused may be lost with libzmq's pipe (push has no resend).
    data = wait_written(world, 2 if socket_kind == "acked" else 1, timeout_s=30)
    assert b"allowed now" in data
    if socket_kind == "acked":
        assert b"must not arrive" in data       # kept in the window, resent once allowed
    assert col.alive()


def test_collector_without_allow_list_warns_and_accepts_any_key(world):
    address = endpoint(world, "ipc")
    col = collect(world, "--bind", address, allow=False)
    wait_bound(col, address)
    col.wait_line("any client with a valid handshake is accepted")
    fwd = forward(world, address, client="stranger")
    fwd.send(b"hello\n")
    assert b"hello" in wait_written(world, 1)


def test_plaintext_tcp_to_a_remote_address_is_warned(world):
    col = collect(world, "--bind", "tcp://0.0.0.0:%d" % free_port(), curve=False)
    col.wait_line("without CURVE")
    fwd = forward(world, "tcp://192.0.2.1:9", curve=False)
    fwd.wait_line("go unencrypted")


def test_ipc_socket_file_gets_mode_0660_or_ipc_mode(world):
    address = endpoint(world, "ipc")
    old = os.umask(0)
    try:
        col = collect(world, "--bind", address, curve=False)
    finally:
        os.umask(old)
    wait_bound(col, address)
    assert os.stat(address[6:]).st_mode & 0o777 == 0o660
    col.stop()
    other = "ipc://%s/d.ipc" % world["root"]
    col = collect(world, "--bind", other, "--ipc-mode", "600", curve=False)
    wait_bound(col, other)
    assert os.stat(other[6:]).st_mode & 0o777 == 0o600


# -- log-opt validation -----------------------------------------------------------------------

def test_curve_log_opts_are_validated(world):
    secret = os.path.join(world["keys"], "good.key_secret")
    public = os.path.join(world["keys"], "collector.key")
    opts = validate_log_opts({"zmq-address": "tcp://h:1", "zmq-curve-server-key": public,
                              "zmq-curve-key": secret})
    assert len(opts.curve_server_key) == 40 and len(opts.curve_key[1]) == 40
    bad = [({"zmq-curve-server-key": "not a key"}, "zmq-curve-server-key"),
           ({"zmq-curve-server-key": public, "zmq-curve-key": public}, "zmq-curve-key"),
           ({"zmq-curve-server-key": public, "zmq-curve-key": "/nonexistent"}, "zmq-curve-key"),
           ({"zmq-curve-server-key": public}, "zmq-curve-key is missing"),
           ({"zmq-curve-key": secret}, "zmq-curve-server-key is missing")]
    for extra, named in bad:
        with pytest.raises(ConfigError, match=named):
            validate_log_opts({"zmq-address": "tcp://h:1", **extra})
