"""The uvloop supervisor: many copiers on one socket, Docker's backpressure modes, shutdown flush."""

import asyncio
import os
import resource
import shutil
import tempfile
import threading
import time

import msgpack
import pytest
import uvloop
import zmq

from zeroline import core
from zeroline.supervisor import READ_BYTES, Supervisor

TIMEOUT_S = 60


@pytest.fixture
def endpoint():
    path = tempfile.mkdtemp(prefix="zl")
    yield "ipc://%s/s.ipc" % path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)      # closes whatever a failed test left open


def push_socket(ctx, endpoint, hwm=1000):
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


class Pull:
    """A PULL socket drained on demand by the core Receiver."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.receiver = core.Receiver()
        self.messages = []

    def drain(self, expected, timeout_s=TIMEOUT_S, batch=65536, pause_s=0.0):
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < expected and time.monotonic() < deadline:
            self.receiver.recv(self.sock, batch, 50)
            self.messages.extend(self.receiver.take())
            if pause_s:
                time.sleep(pause_s)
        return self.messages

    def close(self):
        self.sock.close(linger=0)


def writer_thread(fd, chunks):
    """Writes every chunk to fd (blocking), then closes it: the container side of a pipe."""
    def run():
        with os.fdopen(fd, "wb", buffering=0) as f:
            for chunk in chunks:
                f.write(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def supervise(sock, pipes, make_stream, blocking=True, until_done=True, timeout=TIMEOUT_S):
    """Adds one copier per read fd and waits for all of them to finish and be sent."""
    loop = asyncio.get_running_loop()
    sup = Supervisor(sock, loop)
    for i, fd in enumerate(pipes):
        sup.add(fd, make_stream(i), "s%d" % i, blocking=blocking)
    if until_done:
        assert await sup.wait(timeout), "supervisor did not finish: %s" % sup.stats_line()
    return sup


def lines_of(messages):
    return sorted(m[2] for m in messages)


def test_many_streams_deliver_every_line_in_order_per_stream(ctx, endpoint):
    pull = Pull(ctx, endpoint)
    sock = push_socket(ctx, endpoint)
    n_streams, n_lines = 50, 200
    reads, threads = [], []
    for i in range(n_streams):
        r, w = os.pipe()
        reads.append(r)
        threads.append(writer_thread(w, [b"s%d-%d\n" % (i, k) for k in range(n_lines)]))
    sup = uvloop.run(supervise(sock, reads, lambda i: core.Stream(container_id="c%d" % i)))
    got = pull.drain(n_streams * n_lines)
    sock.close()
    pull.close()
    assert len(got) == n_streams * n_lines
    for i in range(n_streams):
        mine = [m[2] for m in got if m[2].startswith(b"c%d: " % i)]
        assert mine == [b"c%d: s%d-%d" % (i, i, k) for k in range(n_lines)]
    assert sup.stats()["sent_total"] == n_streams * n_lines


def test_500_idle_streams_cost_under_64_kib_each(ctx, endpoint):
    sock = push_socket(ctx, endpoint)
    pipes = [os.pipe() for _ in range(500)]

    async def main():
        loop = asyncio.get_running_loop()
        sup = Supervisor(sock, loop)
        before = _rss_kib()
        for i, (r, _) in enumerate(pipes):
            sup.add(r, core.Stream(container_id="%012d" % i), "s%d" % i)
        await asyncio.sleep(0.1)
        after = _rss_kib()
        assert all(c.reading for c in sup.copiers)
        for _, w in pipes:
            os.close(w)
        assert await sup.wait(TIMEOUT_S)
        return (after - before) / 500.0

    per_stream_kib = uvloop.run(main())
    sock.close()
    assert per_stream_kib < 64


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def test_blocking_mode_loses_nothing_to_a_late_collector(ctx, endpoint):
    sock = push_socket(ctx, endpoint, hwm=10)
    n_lines = 20000
    r, w = os.pipe()
    thread = writer_thread(w, [b"line-%06d\n" % k for k in range(n_lines)])

    async def main():
        sup = await supervise(sock, [r], lambda i: core.Stream(container_id="x"), until_done=False)
        # No collector yet: the copier must stop reading, so the writer blocks on its full pipe.
        await asyncio.sleep(0.3)
        assert thread.is_alive(), "writer was not blocked: lines were taken without a collector"
        # Memory is bounded by one read buffer (plus the socket's high-water mark).
        assert sup.copiers[0].stream.pending_bytes <= READ_BYTES
        pull = Pull(ctx, endpoint)
        got = await asyncio.get_running_loop().run_in_executor(None, pull.drain, n_lines)
        assert await sup.wait(TIMEOUT_S)
        pull.close()
        return got

    got = uvloop.run(main())
    sock.close()
    assert [m[2] for m in got] == [b"x: line-%06d" % k for k in range(n_lines)]


def test_blocking_mode_slow_collector_gets_everything(ctx, endpoint):
    sock = push_socket(ctx, endpoint, hwm=5)
    pull = Pull(ctx, endpoint)
    n_streams, n_lines = 4, 3000
    reads = []
    for i in range(n_streams):
        r, w = os.pipe()
        reads.append(r)
        writer_thread(w, [b"%d:%05d\n" % (i, k) for k in range(n_lines)])

    async def main():
        sup = await supervise(sock, reads, lambda i: core.Stream(container_id="c"),
                              until_done=False)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, lambda: pull.drain(n_streams * n_lines,
                                                                  batch=100, pause_s=0.001))
        assert await sup.wait(TIMEOUT_S)
        return got, sup

    got, sup = uvloop.run(main())
    sock.close()
    pull.close()
    assert len(got) == n_streams * n_lines
    assert lines_of(got) == sorted(b"c: %d:%05d" % (i, k) for i in range(n_streams)
                                   for k in range(n_lines))
    assert sup.stats()["dropped_total"] == 0
    assert sup.blocked_total > 0      # the collector really was the bottleneck


def test_non_blocking_mode_never_blocks_the_writer_and_counts_drops_exactly(ctx, endpoint):
    # No collector at all: everything beyond the ring is dropped, and the writer finishes anyway.
    sock = push_socket(ctx, endpoint, hwm=1)
    n_lines, line_bytes, ring = 5000, 99, 10_000
    r, w = os.pipe()
    thread = writer_thread(w, [b"y" * line_bytes + b"\n" for _ in range(n_lines)])

    async def main():
        sup = await supervise(sock, [r], lambda i: core.Stream(container_id="n",
                                                               max_pending_bytes=ring),
                              blocking=False, until_done=False)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, thread.join, TIMEOUT_S)
        assert not thread.is_alive(), "the writer was blocked in non-blocking mode"
        deadline = time.monotonic() + TIMEOUT_S
        while not sup.copiers[0].eof and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        st = sup.stats()
        # Memory stays bounded by the ring, whatever the input size.
        assert sup.copiers[0].stream.pending_bytes <= ring
        pull = Pull(ctx, endpoint)
        got = await loop.run_in_executor(None, pull.drain, n_lines - st["dropped_total"], 5)
        assert await sup.wait(TIMEOUT_S)
        pull.close()
        return got, sup.stats()

    got, st = uvloop.run(main())
    sock.close()
    assert st["dropped_total"] > 0
    assert len(got) + st["dropped_total"] == n_lines
    assert st["sent_total"] == len(got)
    assert st["dropped_by_stream"] == {"s0": st["dropped_total"]}


def test_stop_reading_flushes_unterminated_text_and_closes_its_group(ctx, endpoint):
    pull = Pull(ctx, endpoint)
    sock = push_socket(ctx, endpoint)
    r, w = os.pipe()
    os.write(w, b"complete\nunterminated")

    async def main():
        sup = await supervise(sock, [r], lambda i: core.Stream(container_id="z",
                                                               framing="msgpack"),
                              until_done=False)
        deadline = time.monotonic() + TIMEOUT_S
        while sup.copiers[0].stream.bytes_total < 21 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sup.stop_reading()          # shutdown while the writer still holds the pipe open
        assert await sup.wait(TIMEOUT_S)

    uvloop.run(main())
    got = pull.drain(2)
    os.close(w)
    sock.close()
    pull.close()
    records = [msgpack.unpackb(m[2]) for m in got]
    assert [r["line"] for r in records] == [b"complete", b"unterminated"]
    assert "partial" not in records[0]
    assert records[1]["partial"]["last"] is True and records[1]["partial"]["ordinal"] == 1


def test_reads_are_sized_by_the_sink_and_run_grows_its_pipes(ctx, endpoint):
    # The read size belongs to the sink (acked batches want 1 MiB reads, pub/push 64 KiB); the
    # pipe size to whoever owns the pipe (supervisor.grow_pipe, as `zeroline run` does).
    import fcntl

    from zeroline.supervisor import PIPE_BYTES, grow_pipe
    from zeroline.transport.acked import AckedSink
    from zeroline.transport.sink import SocketSink

    r, w = os.pipe()
    try:
        assert grow_pipe(r) == PIPE_BYTES
        assert fcntl.fcntl(r, getattr(fcntl, "F_GETPIPE_SZ", 1032)) == PIPE_BYTES
        with tempfile.TemporaryFile() as f:
            assert grow_pipe(f.fileno()) == READ_BYTES      # not a pipe: refused, default size
    finally:
        os.close(w)
    sock = push_socket(ctx, endpoint)

    async def main():
        sup = Supervisor(sock, asyncio.get_running_loop())
        assert SocketSink.read_bytes == READ_BYTES and AckedSink.read_bytes == PIPE_BYTES
        copier = sup.add(r, core.Stream("stdout"), "r")
        assert copier.read_bytes == READ_BYTES
        sup.sink.read_bytes = AckedSink.read_bytes          # what an acked sink asks for
        r2, w2 = os.pipe()
        os.close(w2)
        assert sup.add(r2, core.Stream("stdout"), "r2").read_bytes == PIPE_BYTES
        await sup.wait(timeout=5)
        sup.close()

    uvloop.run(main())
    sock.close(0)
