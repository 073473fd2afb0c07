"""The control plane: a uvloop event loop running per-source copiers that feed one sink.

Each copier owns a non-blocking file descriptor (a container's stdout or stderr, a FIFO) and a
:class:`zeroline.core.Stream`. When the fd is readable the copier reads one buffer and hands it to the
compiled core in a single call (cut + frame, GIL released), then the supervisor offers the batch
to the sink (:mod:`zeroline.transport`) without blocking. All sends happen on the loop thread, so
the one ZeroMQ socket is only ever used by one thread. See docs/design.md for why copiers are loop
readers and not worker threads.

Backpressure follows Docker's modes (docs/docker-logging.md §3):

* blocking (default): when the sink refuses (PUSH at its high-water mark, XPUB with a slow or no
  subscriber, an acked window full and no spool room), every blocking copier stops reading, so
  writers block on their full pipes; reading resumes once the backlog is sent. Nothing is lost and
  memory is bounded by one read buffer per stream. A parked copier is served within one retry
  even while non-blocking streams keep the backlog busy.
* non-blocking: a copier never stops reading; its Stream queues up to ``max-buffer-size`` line bytes
  and drops the incoming message beyond that (counted per stream, first drop logged once).
"""

import asyncio
import collections
import fcntl
import os
import sys
import time

import zmq

#: Bytes one copier reads per readiness event: one crossing into the core per read.
READ_BYTES = 64 * 1024
#: Pipe size zeroline asks for on the pipes it reads (`run`; the plugin its FIFOs): a writer
#: blocks later, and a sink that wants big reads (acked: ``Sink.read_bytes``) gets them. 1 MiB is
#: Linux's default pipe-max-size, so an unprivileged process gets it too (until the user's
#: pipe-user-pages-soft is used up).
PIPE_BYTES = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def grow_pipe(fd, size=PIPE_BYTES):
    """Ask for a pipe of ``size`` bytes on the pipe or FIFO ``fd``; returns what the kernel
    granted, or READ_BYTES when it refused (not a pipe, a limit)."""
    try:
        return max(READ_BYTES, fcntl.fcntl(fd, F_SETPIPE_SZ, size))
    except OSError:
        return READ_BYTES
#: While the sink refuses messages, retry at least this often (the zmq FD is edge-triggered).
RETRY_S = 0.005
#: The sink's timers (peer reports, ack time-outs, holding until a first subscriber).
TICK_S = 0.1


def _log(text):
    sys.stderr.write("zeroline: %s\n" % text)
    sys.stderr.flush()


class Copier:
    """Copies one fd into one Stream. Created by :meth:`Supervisor.add`."""

    def __init__(self, supervisor, fd, stream, name, blocking, on_feed=None, on_finish=None,
                 read_bytes=READ_BYTES, coalesce_s=0.0):
        self.supervisor = supervisor
        self.read_bytes = read_bytes
        self.coalesce_s = coalesce_s    # after a short read, wait this long before reading again
        self.on_feed = on_feed          # called after each feed (e.g. to write a local copy)
        self.on_finish = on_finish      # called once after EOF and the final flush
        self.fd = fd
        self.stream = stream
        self.name = name
        self.blocking = blocking
        self.reading = False
        self.pollable = True            # False for a regular file: epoll cannot watch it
        self._file_handle = None
        self.eof = False
        self.read_errors_total = 0
        self._drop_logged = False
        os.set_blocking(fd, False)

    def _start(self):
        if self.reading or self.eof:
            return
        loop = self.supervisor.loop
        if self.pollable:
            try:
                loop.add_reader(self.fd, self._on_readable)
            except PermissionError:
                self.pollable = False   # a regular file is always readable: read it in turns
        if not self.pollable:
            self._file_handle = loop.call_soon(self._on_file_turn)
        self.reading = True

    def _on_file_turn(self):
        self._file_handle = None
        self._on_readable()
        if self.reading and not self.eof and self._file_handle is None:
            self._file_handle = self.supervisor.loop.call_soon(self._on_file_turn)

    def _stop(self):
        if self.reading:
            if self.pollable:
                self.supervisor.loop.remove_reader(self.fd)
            elif self._file_handle is not None:
                self._file_handle.cancel()
                self._file_handle = None
            self.reading = False

    def _on_readable(self):
        sup = self.supervisor
        if self.blocking and sup._backlog:
            # The socket is refusing messages: stop reading (the writer blocks on its full pipe)
            # and wait in line; the supervisor reads parked copiers in arrival order once the
            # backlog is sent, so no stream is served before one that waited longer.
            self._stop()
            sup._parked.append(self)
            return
        self._read()

    def _read(self):
        try:
            data = os.read(self.fd, self.read_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # Docker's copier stops on a read error too; ours also flushes what it holds.
            self.read_errors_total += 1
            _log("%s: read error, closing the stream: %s" % (self.name, exc.strerror))
            data = b""
        if not data:
            self.finish()
            return
        self.feed(data)
        if self.coalesce_s and len(data) < self.read_bytes >> 2 and self.reading:
            # A short read: the writer trickles (dockerd writes each entry with its own
            # write()). Reading at every wake-up cost one read, feed and send per few entries;
            # a pause lets the pipe gather a batch. Measured in benchmarks/bench_engine.py.
            self._stop()
            self.supervisor.loop.call_later(self.coalesce_s, self._resume)

    def _resume(self):
        sup = self.supervisor
        if self.eof or self.reading:
            return
        if self.blocking and (self in sup._backlog or self in sup._parked):
            return          # the supervisor restarts it when it is its turn
        self._start()       # a non-blocking copier never stops reading for long

    def feed(self, data):
        """Feed bytes read elsewhere (e.g. a FIFO's first read, resynchronised by the Docker
        plugin) as if this copier had read them: local copy hook, then offered to the sink."""
        dropped = self.stream.dropped_total
        self.stream.feed(data)
        if self.stream.dropped_total != dropped and not self._drop_logged:
            self._drop_logged = True
            _log("%s: non-blocking buffer full, dropping lines (counted in the stats)" % self.name)
        if self.on_feed is not None:
            self.on_feed(self)
        self.supervisor._send(self)

    def detach(self):
        """Stop reading and close the fd, but do not close the stream: what it has pending is
        still sent, and the rest of the input belongs to someone else (a restarted Docker plugin
        reads on where this one stopped), so no end-of-input flush happens."""
        if self.eof:
            return
        self._stop()
        self.eof = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.supervisor._send(self)
        self.supervisor._copier_done(self)

    def finish(self):
        """EOF (or shutdown): stop reading, flush unterminated text, close the fd."""
        if self.eof:
            return
        self._stop()
        self.eof = True
        self.stream.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.on_feed is not None:
            self.on_feed(self)
        self.supervisor._send(self)
        self.supervisor._copier_done(self)
        if self.on_finish is not None:
            self.on_finish(self)


class Supervisor:
    """Runs copiers on an asyncio (uvloop) loop and offers their batches to one sink.

    Args:
        sink: a sink of :mod:`zeroline.transport` (``ZmqSink``, ``AckedSink``), or a connected
            pyzmq socket, which is wrapped in a :class:`zeroline.transport.sink.SocketSink`.
        loop: the running event loop.
    """

    def __init__(self, sink, loop):
        if isinstance(sink, zmq.Socket):
            from .transport.sink import SocketSink

            sink = SocketSink(sink)
        self.sink = sink
        self.socket = getattr(sink, "socket", None)
        self.loop = loop
        self.copiers = []
        self._backlog = []          # copiers with messages the socket refused, in arrival order
        self._parked = collections.deque()   # blocking copiers that wait to read, in arrival order
        self._retry_handle = None
        self._zmq_fd = sink.fd
        self._watching_fd = False
        self._open = 0
        self._all_done = loop.create_future()
        self._all_done.set_result(None)
        self._held = False
        self._final = False
        self.blocked_total = 0
        self.fair_turns_total = 0
        self._tick_handle = None
        if sink.watch_always:
            loop.add_reader(self._zmq_fd, self._on_zmq_fd)
            self._watching_fd = True
        if sink.holding:
            self._held = True
        self._tick_handle = loop.call_later(TICK_S, self._tick)

    # -- copiers --------------------------------------------------------------------------------
    def add(self, fd, stream, name, blocking=True, on_feed=None, on_finish=None,
            read_bytes=None, coalesce_s=0.0):
        """Start copying ``fd`` into ``stream``; returns the :class:`Copier`.

        ``on_feed(copier)`` runs after every read is fed (and after the final flush);
        ``on_finish(copier)`` once the fd reached EOF and the stream was flushed. ``fd`` may be
        a pipe, FIFO, socket or tty (watched by the loop) or a regular file (read in turns).
        ``coalesce_s``: after a read of under a quarter of ``read_bytes``, wait this long before
        the next (for inputs written in many small writes, into a pipe large enough to wait)."""
        if read_bytes is None:
            read_bytes = getattr(self.sink, "read_bytes", READ_BYTES)
        copier = Copier(self, fd, stream, name, blocking and not self._final, on_feed, on_finish,
                        read_bytes, coalesce_s)
        self.copiers.append(copier)
        self._open += 1
        if self._all_done.done():
            self._all_done = self.loop.create_future()
        if blocking and self._backlog:
            self._parked.append(copier)
        else:
            copier._start()
        return copier

    def _copier_done(self, copier):
        self._open -= 1
        self._check_done()

    def _check_done(self):
        if self._open == 0 and not self._backlog and not self._all_done.done():
            self._all_done.set_result(None)

    async def wait(self, timeout=None):
        """Wait until every copier reached EOF and everything was sent; False on timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(self._all_done), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def stop_reading(self):
        """Shutdown: stop every copier (flushing what it holds) without waiting for EOF."""
        for copier in self.copiers:
            copier.finish()

    def read_to_end(self):
        """The writers are gone (CMD exited): read every fd to its end whatever the sink does.

        What is left in a pipe is bounded (the pipe's capacity), so blocking copiers stop
        parking: their lines queue in their streams and the final drain sends them or counts
        them. Without this, a collector that is away would keep ``run`` waiting forever."""
        self._final = True
        self._parked.clear()
        for copier in self.copiers:
            copier.blocking = False
            if not copier.eof:
                copier._start()     # parked, or stopped while the sink held or refused

    # -- sending ----------------------------------------------------------------------------------
    def hold(self):
        """Send nothing until :meth:`release` (e.g. before a pub socket's first subscriber, which
        would drop everything): blocking copiers stop after one read, non-blocking ones go on
        reading into their rings and count what they drop."""
        self._held = True

    def release(self):
        self._held = False
        self._retry()

    def _send(self, copier):
        stream = copier.stream
        if not stream.pending_messages:
            self._check_done()
            return
        if self._held:
            if copier not in self._backlog:
                self._backlog.append(copier)
            if copier.blocking:
                copier._stop()
            return
        if not self._backlog:
            if self.sink.offer(stream):
                return
            self._block()
        if copier not in self._backlog:
            self._backlog.append(copier)
        if copier.blocking:
            copier._stop()

    def _block(self):
        # The socket refused a message. Nothing else changes here: every blocking copier parks
        # itself when it next becomes readable (O(1) per refusal; stopping and restarting all
        # readers on every refusal cost O(streams) and always served the first streams first).
        self.blocked_total += 1
        if not self._watching_fd:
            self.loop.add_reader(self._zmq_fd, self._on_zmq_fd)
            self._watching_fd = True
        self._schedule_retry()

    def _on_zmq_fd(self):
        # ZMQ_FD only says "look at ZMQ_EVENTS"; reading EVENTS also processes libzmq's pending
        # commands, which is what re-arms the fd. Retrying on every wake-up without that check
        # spun 514k times for 2 M lines (0.58 M lines/s); with it, 3.2k wake-ups (1.19 M lines/s).
        # An acked sink also takes its acknowledgements here.
        if self.sink.on_event() and (self._backlog or self._parked):
            self._retry()

    def _tick(self):
        self._tick_handle = self.loop.call_later(TICK_S, self._tick)
        more = self.sink.tick()
        if self._held and not self.sink.holding:
            self.release()
        elif more and (self._backlog or self._parked):
            self._retry()
        elif not self._backlog:
            self._check_done()

    def _schedule_retry(self):
        if self._retry_handle is None:
            self._retry_handle = self.loop.call_later(RETRY_S, self._retry)

    def _retry(self):
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._held:
            return
        # Round-robin: whoever is first in the backlog goes first; a partly sent one goes last.
        while self._backlog:
            copier = self._backlog[0]
            if not self.sink.offer(copier.stream):
                self._backlog.append(self._backlog.pop(0))
                self._schedule_retry()
                self._fair_turn()
                return
            self._backlog.pop(0)
            if copier.blocking and not copier.eof:
                self._parked.append(copier)     # sent: it queues behind those already waiting
        if self._watching_fd:
            self.loop.remove_reader(self._zmq_fd)
            self._watching_fd = False
        # Serve the parked copiers in order until the socket refuses again.
        while self._parked and not self._backlog:
            copier = self._parked.popleft()
            if copier.eof:
                continue
            copier._start()
            copier._read()      # it was readable when it parked (a spurious read is harmless)
        self._check_done()

    def _fair_turn(self):
        # The sink is still refusing. Non-blocking copiers never stop reading and can keep the
        # backlog busy for good; a parked blocking copier then gets one read per retry anyway
        # (its batch joins the round-robin backlog), so it is served within a bounded time.
        # Memory stays bounded: a copier in the backlog does not read again until it is sent.
        while self._parked:
            copier = self._parked.popleft()
            if copier.eof or copier in self._backlog:
                continue
            self.fair_turns_total += 1
            copier._start()
            copier._read()
            return

    # -- counters -------------------------------------------------------------------------------
    def stats(self):
        """Totals over every copier, plus per-copier drops (only those with drops)."""
        totals = {"streams": len(self.copiers), "open_streams": self._open,
                  "lines_total": 0, "bytes_total": 0, "partial_groups_total": 0,
                  "sent_total": 0, "dropped_total": 0, "pending_messages": 0,
                  "read_errors_total": 0, "blocked_total": self.blocked_total,
                  "fair_turns_total": self.fair_turns_total}
        drops = {}
        for copier in self.copiers:
            s = copier.stream
            totals["lines_total"] += s.lines_total
            totals["bytes_total"] += s.bytes_total
            totals["partial_groups_total"] += s.partial_groups_total
            totals["sent_total"] += s.sent_total
            totals["dropped_total"] += s.dropped_total
            totals["pending_messages"] += s.pending_messages
            totals["read_errors_total"] += copier.read_errors_total
            if s.dropped_total:
                drops[copier.name] = drops.get(copier.name, 0) + s.dropped_total
        totals["dropped_by_stream"] = drops
        return totals

    def stats_line(self):
        st = self.stats()
        line = ("%d lines, %d bytes, %d partial groups, %d sent, %d dropped, %d pending, "
                "%d/%d streams open" % (st["lines_total"], st["bytes_total"],
                                        st["partial_groups_total"], st["sent_total"],
                                        st["dropped_total"], st["pending_messages"],
                                        st["open_streams"], st["streams"]))
        if st["dropped_by_stream"]:
            line += " (drops: %s)" % ", ".join("%s=%d" % kv for kv in st["dropped_by_stream"].items())
        return line

    async def drain(self, timeout_s):
        """Send the backlog and wait for the sink to have nothing in flight (acknowledged, for
        an acked sink), giving up after ``timeout_s`` without progress. Returns the messages
        left unsent in the streams (the sink's own count is :meth:`undelivered`)."""
        def progress():
            return (self.sink.progress_mark(),
                    sum(c.stream.pending_messages for c in self.copiers))

        last, deadline = progress(), time.monotonic() + timeout_s
        while (self._backlog or not self.sink.idle()) and time.monotonic() < deadline:
            if self._backlog and not self._held:
                self._retry()
            self.sink.on_event()
            await asyncio.sleep(RETRY_S if self._backlog else 0.02)
            now = progress()
            if now != last:
                last, deadline = now, time.monotonic() + timeout_s
        return sum(c.stream.pending_messages for c in self.copiers)

    def undelivered(self):
        """``(messages, lines)`` not known to be delivered: still in the streams, plus what the
        sink holds unacknowledged (acked) or in its spool."""
        messages = sum(c.stream.pending_messages for c in self.copiers)
        batches, lines = self.sink.undelivered()
        return messages + batches, messages + lines

    def close(self):
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._watching_fd:
            self.loop.remove_reader(self._zmq_fd)
            self._watching_fd = False
        for copier in self.copiers:
            copier._stop()
        self.sink.settle()   # what it held in memory goes to its spool, if it has one
