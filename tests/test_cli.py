"""zeroline forward / collect as a user runs them: real processes, real sockets on ipc://."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from zeroline import core

TIMEOUT_S = 60


def zeroline(*args, input=None, cwd=None, timeout=TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "zeroline", *args], input=input, cwd=cwd,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def short_dir():
    # ipc:// paths must fit in sun_path (107 bytes): pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="zl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class PullReceiver:
    """A PULL socket drained by the core Receiver in a thread until `expected` messages."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(endpoint)
        self.messages = []
        self.receiver = core.Receiver()

    def collect(self, expected, timeout_s=TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < expected and time.monotonic() < deadline:
            self.receiver.recv(self.sock, 65536, 100)
            self.messages.extend(self.receiver.take())
        return self.messages

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


def one_line_error(proc):
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("zeroline: error: "), err
    return err


def test_embedded_default_writes_every_line(short_dir):
    proc = zeroline("forward", "--container-id", "c0ffee", input=b"hello\nworld\nno newline",
                    cwd=short_dir)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(short_dir, "zeroline-logs", "default", "default.log"), "rb") as f:
        assert f.read() == b"c0ffee: hello\nc0ffee: world\nc0ffee: no newline\n"
    assert b"3 messages -> embedded collector" in proc.stderr


def test_tenant_and_service_come_from_the_environment(short_dir):
    env = dict(os.environ, TENANT_ID="acme", SERVICE_ID="billing")
    proc = subprocess.run([sys.executable, "-m", "zeroline", "forward", "--container-id", "x"],
                          input=b"a\n", cwd=short_dir, env=env, capture_output=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(short_dir, "zeroline-logs", "acme", "billing.log"), "rb") as f:
        assert f.read() == b"x: a\n"


def test_forward_push_delivers_seed_frames_byte_for_byte(short_dir):
    endpoint = "ipc://%s/c.ipc" % short_dir
    receiver = PullReceiver(endpoint)
    lines = [b"plain", b"", b"tab\there", b"cr\r", b"\x00nul", b"\xff\xfeinvalid utf-8"]
    try:
        proc = zeroline("forward", "--log-opt", "zmq-address=" + endpoint,
                        "--log-opt", "zmq-socket=push", "--container-id", "0123456789abcdef",
                        "--stats", input=b"\n".join(lines) + b"\n")
        assert proc.returncode == 0, proc.stderr
        got = receiver.collect(len(lines))
    finally:
        receiver.close()
    # The short id is 12 characters, as Docker's {{.ID}}.
    assert got == [[b"default", b"default", b"0123456789ab: " + line] for line in lines]
    assert b"lines_read_total=6 " in proc.stderr and b"messages_dropped_total=0 " in proc.stderr


def test_forward_msgpack_carries_partial_metadata_and_reassembles(short_dir):
    endpoint = "ipc://%s/c.ipc" % short_dir
    receiver = PullReceiver(endpoint)
    # Lines around the 64-byte buffer: shorter, exactly, longer, much longer, unterminated tail.
    lines = [b"a" * 10, b"b" * 64, b"c" * 65, b"d" * 300]
    data = b"\n".join(lines) + b"\n" + b"tail-without-newline"
    try:
        proc = zeroline("forward", "--log-opt", "zmq-address=" + endpoint,
                        "--log-opt", "zmq-socket=push", "--log-opt", "zmq-framing=msgpack",
                        "--log-opt", "zmq-line-buffer=64", "--container-id", "abc",
                        "--container-name", "/web", "--source", "stderr", input=data)
        assert proc.returncode == 0, proc.stderr
        # 1 + (64 + empty last) + (64 + 1) + (4*64 + 44) + 1 tail chunk closed at EOF
        got = receiver.collect(11)
    finally:
        receiver.close()
    records = [msgpack.unpackb(m[2]) for m in got]
    assert len(records) == 11
    assert {r["source"] for r in records} == {"stderr"}
    assert {r["container_name"] for r in records} == {"/web"}
    rebuilt, current = [], b""
    for r in records:
        current += r["line"]
        partial = r.get("partial")
        if partial is None or partial["last"]:
            rebuilt.append(current)
            current = b""
    assert rebuilt == lines + [b"tail-without-newline"]
    assert records[-1]["partial"]["last"] is True and records[-1]["partial"]["ordinal"] == 1
    groups = {}
    for r in records:
        if "partial" in r:
            groups.setdefault(r["partial"]["id"], []).append(r)
    for chunks in groups.values():
        assert [c["partial"]["ordinal"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert len({c["time_nano"] for c in chunks}) == 1


def test_forward_reads_a_fifo(short_dir):
    endpoint = "ipc://%s/c.ipc" % short_dir
    fifo = os.path.join(short_dir, "in.fifo")
    os.mkfifo(fifo)
    receiver = PullReceiver(endpoint)

    def writer():
        with open(fifo, "wb") as f:
            f.write(b"one\ntwo\n")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        proc = zeroline("forward", fifo, "--log-opt", "zmq-address=" + endpoint,
                        "--log-opt", "zmq-socket=push", "--container-id", "f")
        got = receiver.collect(2)
    finally:
        thread.join(TIMEOUT_S)
        receiver.close()
    assert proc.returncode == 0, proc.stderr
    assert [m[2] for m in got] == [b"f: one", b"f: two"]


def test_pub_waits_for_the_subscriber_so_first_lines_are_kept(short_dir):
    endpoint = "ipc://%s/sub.ipc" % short_dir
    proc = subprocess.Popen([sys.executable, "-m", "zeroline", "forward", "--log-opt",
                             "zmq-address=" + endpoint, "--container-id", "p"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"first\nsecond\n")
        proc.stdin.close()
        time.sleep(0.3)   # the forwarder is up before any subscriber exists
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(endpoint)
        got = []
        for _ in range(2):
            if sub.poll(TIMEOUT_S * 1000):
                got.append(sub.recv_multipart())
        sub.close(linger=0)
        ctx.term()
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        proc.kill()
    assert [m[2] for m in got] == [b"p: first", b"p: second"]


def test_unknown_log_opt_is_one_clear_line():
    proc = zeroline("forward", "--log-opt", "zmq-adress=tcp://x:1", input=b"")
    assert proc.returncode == 2
    assert "unknown log opt 'zmq-adress' for zmq log driver" in one_line_error(proc)


@pytest.mark.parametrize("value", ["tcp://nohost", "http://x:1", "ipc://", "tcp://h:99999"])
def test_malformed_endpoint_is_one_clear_line(value):
    proc = zeroline("forward", "--log-opt", "zmq-address=" + value, input=b"")
    assert proc.returncode == 2
    assert "zmq-address" in one_line_error(proc)


def test_log_opt_without_equals_is_a_usage_error():
    proc = zeroline("forward", "--log-opt", "zmq-address", input=b"")
    assert proc.returncode == 2
    assert "KEY=VALUE" in one_line_error(proc)


def test_missing_collector_is_reported_and_never_fatal_before_the_end(short_dir):
    # No puller: the input is read to its end, the missing collector is said once, and at the
    # end (zmq-linger without progress) the unconfirmed lines make the exit status 1.
    proc = zeroline("forward", "--log-opt", "zmq-address=ipc://%s/nobody.ipc" % short_dir,
                    "--log-opt", "zmq-socket=push", "--log-opt", "zmq-peer-wait=100ms",
                    "--log-opt", "zmq-linger=300ms", input=b"x\n" * 10)
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    assert b"10 messages not delivered" in proc.stderr


def test_missing_input_file_is_a_usage_error(short_dir):
    proc = zeroline("forward", os.path.join(short_dir, "missing.log"))
    assert proc.returncode == 2
    assert "cannot read input" in one_line_error(proc)


def test_bad_argument_is_one_line_with_status_2():
    proc = zeroline("forward", "--source", "stdin")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr.decode()
    assert proc.stderr.decode().count("\n") == 1


def test_help_lists_every_log_opt():
    proc = zeroline("forward", "--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    for name in ("zmq-address", "zmq-socket", "zmq-hwm", "zmq-framing", "mode",
                 "max-buffer-size", "labels", "env-regex", "tag", "zmq-linger"):
        assert name in out


def test_version_names_the_core():
    proc = zeroline("--version")
    assert proc.returncode == 0
    assert ("core: %s" % core.IMPLEMENTATION).encode() in proc.stdout


def test_sigterm_while_waiting_for_a_peer_flushes_and_exits(short_dir):
    endpoint = "ipc://%s/late.ipc" % short_dir
    proc = subprocess.Popen([sys.executable, "-m", "zeroline", "forward", "--log-opt",
                             "zmq-address=" + endpoint, "--log-opt", "zmq-socket=push",
                             "--log-opt", "zmq-peer-wait=0", "--log-opt", "zmq-linger=200ms"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2.0)     # past the interpreter's start-up, when the handler is in place
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()


def test_collect_prints_to_stdout_and_stops_after_count(short_dir):
    endpoint = "ipc://%s/col.ipc" % short_dir
    collector = subprocess.Popen([sys.executable, "-m", "zeroline", "collect", "--bind", endpoint,
                                  "--stdout", "--count", "2"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    try:
        proc = zeroline("forward", "--log-opt", "zmq-address=" + endpoint,
                        "--log-opt", "zmq-socket=push", "--container-id", "k", input=b"1\n2\n")
        assert proc.returncode == 0, proc.stderr
        out, err = collector.communicate(timeout=TIMEOUT_S)
    finally:
        collector.kill()
    assert collector.returncode == 0, err
    assert out == b"k: 1\nk: 2\n"


def test_collect_without_endpoints_is_a_usage_error(short_dir):
    proc = zeroline("collect", "--out", short_dir)
    assert proc.returncode == 2
    assert "--bind" in one_line_error(proc)
