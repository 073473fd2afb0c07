"""Delivery under failure, with real processes: the collector killed and restarted under a running
program, absent at start, absent for good, out of disk; the forwarder killed while spooling.

These are issue 7's promises: the program is never stopped or hung by the collector, acked mode
loses nothing, duplicates only where the spec allows them, and every status and count is said.
Every load loop is bounded; every process is killed in a finally.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

NO_EXTENSIONS = os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1"
#: Numbered lines through the kill loops: the issue's 2,000,000 with the compiled core; the
#: pure-Python twin forwards ~10x slower, so its run checks the same promises on fewer lines.
KILL_LINES = 300_000 if NO_EXTENSIONS else 2_000_000
#: Collector restarts per kill test (the issue's figure).
RESTARTS = 10
#: A hang guard for each zeroline process, not a speed check.
HANG_S = 180
CID = "c0ffee"


def zl(*args):
    return [sys.executable, "-m", "zeroline", *args]


@pytest.fixture
def work():
    path = tempfile.mkdtemp(prefix="zld")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class CollectorProc:
    """A `zeroline collect --bind-acked` process that can be killed and started again."""

    def __init__(self, work, *extra):
        self.endpoint = "ipc://%s/acked.ipc" % work
        self.out = os.path.join(work, "out")
        self.err_path = os.path.join(work, "collect.err")
        self.extra = extra
        self.proc = None
        self.exits = []

    def start(self):
        ipc = self.endpoint[len("ipc://"):]
        if os.path.exists(ipc):
            os.unlink(ipc)      # a killed collector leaves it: wait for the new one's bind
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                zl("collect", "--bind-acked", self.endpoint, "--out", self.out, "--stats",
                   *self.extra), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while not os.path.exists(ipc) and self.proc.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, signum=signal.SIGTERM):
        if self.proc is None:
            return None
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self.exits.append(status)
        self.proc = None
        return status

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


def numbered_writer(count, chunks=200, pause_s=0.02):
    """A program that prints 1..count in chunks with short pauses, so kills land mid-run."""
    code = ("import sys, time\n"
            "n, chunks, pause = %d, %d, %r\n"
            "step = n // chunks\n"
            "out = sys.stdout.buffer\n"
            "for start in range(0, n, step):\n"
            "    out.write(b''.join(b'%%d\\n' %% i for i in range(start + 1, min(n, start + step) + 1)))\n"
            "    out.flush()\n"
            "    time.sleep(pause)\n" % (count, chunks, pause_s))
    return [sys.executable, "-c", code]


def numbers_in(out_dir, cid=CID):
    """(unique numbers, total lines) of the collector's text output for our container."""
    path = os.path.join(out_dir, "default", "default.log")
    seen, total = set(), 0
    prefix = ("%s stdout: " % cid).encode()
    with open(path, "rb") as f:
        for line in f:
            assert line.startswith(prefix), line[:80]
            seen.add(int(line[len(prefix):]))
            total += 1
    return seen, total


def run_acked(collector, argv, *opts, stdin=None, env=None):
    return subprocess.Popen(
        zl("run", "--container-id", CID, "--log-opt", "zmq-address=" + collector.endpoint,
           "--log-opt", "zmq-socket=acked", "--stats", *opts, "--", *argv),
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_collector_restarted_under_a_running_program_loses_nothing(work, signum):
    collector = CollectorProc(work)
    collector.start()
    rng = random.Random(7)
    proc = run_acked(collector, numbered_writer(KILL_LINES))
    try:
        for _ in range(RESTARTS):
            time.sleep(rng.uniform(0.2, 1.0))
            collector.stop(signum)
            collector.start()
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.stop()
    assert proc.returncode == 0, err.decode()
    seen, total = numbers_in(collector.out)
    assert seen == set(range(1, KILL_LINES + 1)), "lost %d lines" % (KILL_LINES - len(seen))
    duplicates = total - len(seen)
    print("%s x%d: %d lines, 0 lost, %d duplicates" % (signal.Signals(signum).name, RESTARTS,
                                                       KILL_LINES, duplicates))
    if signum == signal.SIGTERM:
        assert duplicates == 0
    # A SIGKILL can only repeat the batch being written when it landed (the collector records
    # each batch right after writing it): at most one batch (<= 256 KiB of records) per kill.
    assert duplicates <= RESTARTS * 256 * 1024 // 10
    assert all(status in (0, -signal.SIGKILL) for status in collector.exits), \
        "collector exits %s; %s" % (collector.exits, [line for line in collector.stderr().splitlines()
                                                  if "error" in line or "Trace" in line][-5:])


def test_collector_absent_at_start_then_present_loses_nothing(work):
    collector = CollectorProc(work)
    marker = os.path.join(work, "started")
    lines = 50_000
    absent_s = 3.0 if NO_EXTENSIONS else 10.0
    # Half the lines before the collector exists, half after it came (the program is still
    # running then: zeroline waits zmq-linger only once the program ended).
    writer = ["sh", "-c", "touch %s; seq 1 %d; sleep %g; seq %d %d"
              % (marker, lines // 2, absent_s + 2, lines // 2 + 1, lines)]
    proc = run_acked(collector, writer, "--log-opt", "zmq-peer-wait=1s")
    try:
        # The program runs before any collector exists: zeroline does not wait for one.
        deadline = time.monotonic() + HANG_S
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(marker), "the program was not started"
        time.sleep(absent_s)
        assert proc.poll() is None
        collector.start()
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.stop()
    assert proc.returncode == 0, err.decode()
    seen, total = numbers_in(collector.out)
    assert seen == set(range(1, lines + 1)) and total == lines
    assert b"no collector at" in err


@pytest.mark.parametrize("socket_kind", ["pub", "push", "acked"])
@pytest.mark.parametrize("mode", ["blocking", "non-blocking"])
def test_no_collector_at_all_never_stops_the_program(work, socket_kind, mode):
    endpoint = "ipc://%s/nobody.ipc" % work
    opts = ["--log-opt", "zmq-address=" + endpoint, "--log-opt", "zmq-socket=" + socket_kind,
            "--log-opt", "mode=" + mode, "--log-opt", "zmq-linger=500ms",
            "--log-opt", "zmq-peer-wait=200ms"]
    marker = os.path.join(work, "done")
    # 100 lines fit in the buffers of every mode: the program runs to its end either way.
    run = subprocess.run(zl("run", *opts, "--", "sh", "-c",
                            "seq 1 100; touch %s; exit 3" % marker),
                         capture_output=True, timeout=HANG_S)
    assert os.path.exists(marker)
    assert run.returncode == 3, run.stderr          # CMD's status, whatever the collector
    assert b"Traceback" not in run.stderr
    assert b"no collector at " + endpoint.encode() in run.stderr
    counted = re.search(rb"(\d+) (lines|messages) not delivered", run.stderr)
    assert counted and int(counted.group(1)) == 100, run.stderr
    fwd = subprocess.run(zl("forward", *opts), input=b"x\n" * 100, capture_output=True,
                         timeout=HANG_S)
    assert fwd.returncode == 1, fwd.stderr          # lines were lost: non-zero
    assert re.search(rb"100 (lines|messages) not delivered", fwd.stderr), fwd.stderr


@pytest.mark.parametrize("socket_kind", ["push", "acked"])
def test_non_blocking_without_collector_reads_everything_and_counts_drops(work, socket_kind):
    endpoint = "ipc://%s/nobody.ipc" % work
    lines = 200_000     # 20 MB: far more than any buffer
    fwd = subprocess.run(
        zl("forward", "--log-opt", "zmq-address=" + endpoint, "--log-opt",
           "zmq-socket=" + socket_kind, "--log-opt", "mode=non-blocking", "--log-opt",
           "zmq-linger=300ms", "--stats"),
        input=(b"y" * 99 + b"\n") * lines,
        capture_output=True, timeout=HANG_S)
    # The whole input was read (no broken pipe for the writer) and every loss is counted.
    assert fwd.returncode == 1, fwd.stderr
    read = re.search(rb"lines_read_total=(\d+)", fwd.stderr)
    assert read and int(read.group(1)) == lines, fwd.stderr
    dropped = int(re.search(rb"messages_dropped_total=(\d+)", fwd.stderr).group(1))
    undelivered = re.search(rb"(\d+) (?:lines|messages) not delivered", fwd.stderr)
    assert dropped > 0
    assert dropped + int(undelivered.group(1)) == lines, fwd.stderr


def _mount_tmpfs(path, size):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path],
                          capture_output=True).returncode == 0


def test_collector_on_a_full_disk_loses_nothing_once_space_is_freed(work):
    out = os.path.join(work, "out")
    os.makedirs(out)
    if os.geteuid() != 0 or not _mount_tmpfs(out, "20m"):
        pytest.skip("needs root to mount a 20 MB tmpfs")
    try:
        collector = CollectorProc(work)
        collector.start()
        lines = 1_000_000       # 100 MB of 100-byte lines
        writer = [sys.executable, "-c",
                  "import sys\n"
                  "out = sys.stdout.buffer\n"
                  "for start in range(0, %d, 10000):\n"
                  "    out.write(b''.join(b'%%099d\\n' %% i for i in range(start, start + 10000)))\n"
                  % lines]
        proc = run_acked(collector, writer)
        try:
            deadline = time.monotonic() + HANG_S
            while "No space left on device" not in collector.stderr() and \
                    time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert "No space left on device" in collector.stderr()
            assert collector.proc.poll() is None, "the collector exited on a full disk"
            time.sleep(1.0)
            subprocess.run(["mount", "-o", "remount,size=400m", out], check=True)
            _, err = proc.communicate(timeout=HANG_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            status = collector.stop()
        assert proc.returncode == 0, err.decode()
        assert status == 0
        assert re.search(r"cannot write \S+default\.log: No space left on device",
                         collector.stderr())
        path = os.path.join(out, "default", "default.log")
        prefix = ("%s stdout: " % CID).encode()
        count, previous = 0, -1
        with open(path, "rb") as f:
            for line in f:
                number = int(line[len(prefix):])
                assert number == previous + 1, "line %d after %d" % (number, previous)
                previous = number
                count += 1
        assert count == lines
    finally:
        subprocess.run(["umount", "-l", out], capture_output=True)


def test_spool_survives_a_killed_forwarder_and_a_torn_record(work):
    from zeroline.transport.spool import Spool

    spool_dir = os.path.join(work, "spool")
    endpoint = "ipc://%s/later.ipc" % work
    lines = 400_000
    fwd = subprocess.Popen(
        zl("forward", "--container-id", CID, "--log-opt", "zmq-address=" + endpoint,
           "--log-opt", "zmq-socket=acked", "--log-opt", "spool-dir=" + spool_dir),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Feed numbered lines until the spool holds a few segments' worth, then kill -9.
        number = 0
        deadline = time.monotonic() + HANG_S
        while number < lines and time.monotonic() < deadline:
            fwd.stdin.write(b"".join(b"%d\n" % i for i in range(number + 1, number + 10_001)))
            number += 10_000
            if number == lines // 2:
                time.sleep(0.5)     # let it spool what it read so far
        fwd.stdin.flush()
        time.sleep(0.5)
        fwd.kill()
        fwd.wait(30)
    finally:
        if fwd.poll() is None:
            fwd.kill()
    # A power cut could leave the last record torn: cut a few bytes off the newest segment.
    segments = sorted(name for name in os.listdir(spool_dir) if name.endswith(".seg"))
    assert segments, "nothing was spooled"
    newest = os.path.join(spool_dir, segments[-1])
    os.truncate(newest, max(0, os.path.getsize(newest) - 7))

    # What reached the spool, read back through the spool itself.
    expected = set()
    spool = Spool(spool_dir)
    try:
        assert spool.corrupt_total >= 1
        while True:
            record = spool.next_unsent()
            if record is None:
                break
            expected.update(int(line) for line in _records(record.body))
    finally:
        spool.close()
    assert len(expected) > 10_000

    collector = CollectorProc(work)
    collector.endpoint = endpoint
    collector.start()
    try:
        replay = subprocess.run(
            zl("forward", "--container-id", CID, "--log-opt", "zmq-address=" + endpoint,
               "--log-opt", "zmq-socket=acked", "--log-opt", "spool-dir=" + spool_dir,
               "--stats"),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=HANG_S)
    finally:
        collector.stop()
    assert replay.returncode == 0, replay.stderr
    assert b"left by an earlier run" in replay.stderr
    seen, total = numbers_in(collector.out)
    assert seen == expected and total == len(expected)


def _records(body):
    """The line of every record of a batch body (msgpack records)."""
    import msgpack

    from zeroline.core import split_batch

    return [msgpack.unpackb(record, raw=False)["line"] for record in split_batch(body)]


@pytest.mark.parametrize("socket_kind", ["push", "pub"])
def test_pub_and_push_spool_hold_an_outage_and_a_later_run_sends_it(work, socket_kind):
    # The spool as an outage buffer for the original wire: the program runs to its end with no
    # collector, everything waits on disk, and the next forward with the spool delivers it.
    spool_dir = os.path.join(work, "spool")
    endpoint = "ipc://%s/later.ipc" % work
    opts = ["--container-id", CID, "--log-opt", "zmq-address=" + endpoint, "--log-opt",
            "zmq-socket=" + socket_kind, "--log-opt", "spool-dir=" + spool_dir]
    lines = 100_000
    first = subprocess.run(zl("forward", *opts, "--log-opt", "zmq-linger=300ms"),
                           input=b"".join(b"%d\n" % i for i in range(1, lines + 1)),
                           capture_output=True, timeout=HANG_S)
    assert first.returncode == 0, first.stderr
    assert b"kept in spool" in first.stderr
    out = os.path.join(work, "out")
    bind = "--bind" if socket_kind == "push" else "--bind-sub"
    collector = subprocess.Popen(zl("collect", bind, endpoint, "--out", out),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ipc = endpoint[len("ipc://"):]
        deadline = time.monotonic() + 30
        while not os.path.exists(ipc) and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(zl("forward", *opts), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=HANG_S)
        assert second.returncode == 0, second.stderr
        assert b"left by an earlier run" in second.stderr
        deadline = time.monotonic() + HANG_S
        path = os.path.join(out, "default", "default.log")
        while time.monotonic() < deadline:
            if os.path.exists(path) and os.path.getsize(path) >= lines * len("c0ffee: 1\n"):
                break
            time.sleep(0.05)
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    with open(path, "rb") as f:
        got = [int(line.split(b": ", 1)[1]) for line in f]
    assert got == list(range(1, lines + 1))
    from zeroline.transport.spool import Spool

    with Spool(spool_dir) as spool:
        assert spool.unsent_count() == 0       # each batch left the spool once libzmq took it


def test_a_signal_ends_the_final_wait_and_run_keeps_the_programs_status(work):
    # CMD is done, the collector is gone, zmq-linger is long: the first SIGTERM ends the wait
    # (the issue saw it ignored), the count of what was not delivered is said, CMD's status kept.
    endpoint = "ipc://%s/nobody.ipc" % work
    proc = subprocess.Popen(
        zl("run", "--log-opt", "zmq-address=" + endpoint, "--log-opt", "zmq-socket=acked",
           "--log-opt", "mode=non-blocking", "--log-opt", "zmq-linger=600s", "--", "sh", "-c",
           "seq 1 1000; exit 7"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(2.0)
        assert proc.poll() is None          # waiting for the collector (zmq-linger is 600 s)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)   # a hang guard far below zmq-linger
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert b"1000 lines not delivered" in err, err
