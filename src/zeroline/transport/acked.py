"""``zmq-socket=acked``: batches with sequence numbers, kept until the collector says they are written.

The forwarder's half of docs/acked-protocol.md. One DEALER socket carries every stream of the
process. A copier's read becomes one or more batches (``Stream.take_batch``: the records the core
framed, copied into one body without the GIL); each batch gets the next sequence number of its
stream and stays in the *window* until a cumulative ack covers it. With a spool, every batch is
written to disk first and sent from there, so a collector that is away costs disk, not the
program's progress, and a later process replays what this one could not deliver.

Python runs once per batch (hundreds of lines), never once per line.
"""

import time

import zmq

from .._core_py import ACK_KIND, decode_ack, encode_batch_message, tune_allocator
from ..errors import ProtocolError
from .sink import BATCH_MAX_BYTES, MONITOR_EVENTS, Sink, _StreamState

#: Without an ack for this long while batches are unacknowledged, every one is sent again.
ACK_TIMEOUT_S = 5.0
#: After a gap ack (one that does not advance), a stream's window is resent at most this often.
GAP_RESEND_S = 0.5


class _Batch:
    __slots__ = ("state", "seq", "frames", "lines")

    def __init__(self, state, seq, frames, lines):
        self.state = state
        self.seq = seq
        self.frames = frames
        self.lines = lines


class AckedSink(Sink):
    """The acked transport over one DEALER socket; see the module docstring.

    Args:
        options: validated log-opts with ``socket == "acked"``; ``window`` bounds the batches in
            flight, ``spool_dir``/``spool_max_size`` configure the spool.
        context, report: as :class:`zeroline.transport.Sink`.
        spool: a :class:`zeroline.transport.spool.Spool` to use instead of opening
            ``spool_dir``.

    Raises:
        TransportError: the endpoint cannot be used.
        SpoolError: the spool directory cannot be used.
    """

    kind = zmq.DEALER
    watch_always = True
    framing = "msgpack"
    #: A read makes up to four batches of BATCH_MAX_BYTES (one message each): 100 streams from
    #: 1 MiB pipes gave 3.6-3.8 M lines/s against 2.7 M with 64 KiB reads (benchmarks, sup_acked).
    read_bytes = 1 << 20

    def __init__(self, options, context=None, report=None, spool=None):
        tune_allocator()        # 256 KiB batches from the heap, not fresh pages each: see there
        spool = self._open_spool(options, spool)
        self.window = options.window
        self._inflight = 0              # batches sent and not acknowledged, all streams
        self._inflight_lines = 0
        self._last_progress = time.monotonic()
        self._timeout_reported = False
        self.batches_sent_total = 0
        self.lines_sent_total = 0       # records of first sends (not resends), per batch
        self.batches_resent_total = 0
        self.batches_acked_total = 0
        self.lines_acked_total = 0
        self.acks_total = 0
        self.bad_acks_total = 0
        self.gap_resends_total = 0
        self._gaps = False
        self.replayed_batches_total = 0
        self._start_spooled(options, context, report)

    def _setup(self):
        sock = self.socket
        # The window bounds what is queued; the socket itself must never refuse or drop.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # Unacknowledged batches are resent or kept in the spool: waiting at close adds nothing.
        sock.setsockopt(zmq.LINGER, 0)
        self._monitor = sock.get_monitor_socket(MONITOR_EVENTS)

    # -- sending ------------------------------------------------------------------------------
    def offer(self, stream):
        if self.spool is not None:
            if not self._spool_stream(stream):
                return False
            self._pump_spool()
            return True
        state = self._streams[stream]
        while stream.pending_messages:
            if self._inflight >= self.window:
                # ZMQ_FD is edge-triggered and a send may have taken the edge of an ack that is
                # already here: look before refusing (a getsockopt, cheap).
                self._take_acks()
                if self._inflight >= self.window:
                    return False
            body, lines, _ = stream.take_batch(BATCH_MAX_BYTES)
            seq = state.next_seq
            state.next_seq += 1
            self._send(_Batch(state, seq, encode_batch_message(
                state.tenant, state.service, state.stream_id, seq, body), lines))
        return True

    def _pump_spool(self):
        spool = self.spool
        while True:
            if self._inflight >= self.window:
                self._take_acks(pump=False)
                if self._inflight >= self.window:
                    return
            record = spool.next_unsent()
            if record is None:
                return
            state = self._by_id.get(record.stream_id)
            if state is None:       # left by an earlier process: its stream goes on here
                state = self._by_id[record.stream_id] = _StreamState(
                    record.stream_id, record.tenant, record.service, record.seq)
                self.replayed_batches_total += 1
            self._send(_Batch(state, record.seq, encode_batch_message(
                record.tenant, record.service, record.stream_id, record.seq, record.body),
                record.lines))

    def _send(self, batch):
        state = batch.state
        if not state.inflight and not self._inflight:
            self._last_progress = time.monotonic()
        state.inflight.append(batch)
        self._inflight += 1
        self._inflight_lines += batch.lines
        self._send_frames(batch.frames)
        self.batches_sent_total += 1
        self.lines_sent_total += batch.lines

    def _send_frames(self, frames):
        # Never wait in libzmq: a DEALER without a connection (a CURVE handshake the collector
        # refused leaves none, and libzmq does not reconnect after it) would block the process
        # for good. The batch is in the window either way and goes out with the resends.
        try:
            self.socket.send_multipart(frames, zmq.DONTWAIT, copy=False)
        except zmq.Again:
            pass

    def _resend_all(self, why):
        count = 0
        for state in self._by_id.values():
            for batch in state.inflight:
                self._send_frames(batch.frames)
                count += 1
        self.batches_resent_total += count
        self._last_progress = time.monotonic()
        return count

    # -- acknowledgements ----------------------------------------------------------------------
    def on_event(self):
        self._take_acks()
        return self._inflight < self.window

    def _take_acks(self, pump=True):
        sock = self.socket
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.DONTWAIT)
            try:
                stream_id, seq = decode_ack(frames)
            except ProtocolError:
                self.bad_acks_total += 1
                continue
            self.acks_total += 1
            state = self._by_id.get(stream_id)
            if state is None:
                continue
            if seq <= state.acked:
                # An ack that does not advance answers a batch the collector did not write: a
                # gap (a batch lost on a broken connection). The stream's window is sent again
                # (_resend_gaps), at most once per GAP_RESEND_S rather than once per batch that
                # came after the gap; one seen during that pause is served when it ends.
                if state.inflight and seq == state.acked:
                    state.gap_seen = True
                    self._gaps = True
                continue
            state.gap_seen = False
            state.acked = seq
            freed = 0
            while state.inflight and state.inflight[0].seq <= seq:
                batch = state.inflight.popleft()
                self._inflight -= 1
                self._inflight_lines -= batch.lines
                state.lines_acked += batch.lines
                self.lines_acked_total += batch.lines
                freed += 1
            self.batches_acked_total += freed
            if self.spool is not None:
                self.spool.release(stream_id, seq)
            self._last_progress = time.monotonic()
        if self._gaps:
            self._resend_gaps()
        if pump and self.spool is not None:
            self._pump_spool()

    def _resend_gaps(self):
        now = time.monotonic()
        waiting = False
        for state in self._by_id.values():
            if not state.gap_seen:
                continue
            if now - state.gap_resent_at < GAP_RESEND_S:
                waiting = True
                continue
            state.gap_seen = False
            state.gap_resent_at = now
            self.gap_resends_total += 1
            for batch in state.inflight:
                self.socket.send_multipart(batch.frames, copy=False)
                self.batches_resent_total += 1
        self._gaps = waiting

    def _on_connected(self):
        reconnect = self.peer_seen
        self.peer_seen = True
        if reconnect and self._inflight:
            # What was in flight on the broken connection may be gone: send it all again (the
            # collector drops what it already wrote).
            self._resend_all("reconnect")

    def tick(self):
        super().tick()
        self._take_acks()
        if self._gaps:
            self._resend_gaps()
        if self._inflight and time.monotonic() - self._last_progress > ACK_TIMEOUT_S:
            if not self._timeout_reported:
                self._timeout_reported = True
                self.report("no acknowledgement from %s for %gs; resending %d batches (and every "
                            "%gs while it lasts)" % (self.endpoint, ACK_TIMEOUT_S,
                                                     self._inflight, ACK_TIMEOUT_S))
            self._resend_all("timeout")
        return self._inflight < self.window

    # -- state --------------------------------------------------------------------------------
    def idle(self):
        return not self._inflight and self._spool_idle()

    def undelivered(self):
        """``(batches, lines)`` not acknowledged: in flight, refused by a full spool, or in the
        spool and not sent yet (counted as batches; their lines are on disk)."""
        batches, lines = self._inflight, self._inflight_lines
        for state in self._by_id.values():
            if state.overflow is not None:
                batches += 1
                lines += state.overflow[2]
        if self.spool is not None:
            batches += self.spool.unsent_count()
        return batches, lines

    def progress_mark(self):
        """Changes whenever a batch was acknowledged (drain waits while it keeps changing)."""
        return self.batches_acked_total

    def stats(self):
        out = super().stats()
        out.update(batches_sent_total=self.batches_sent_total,
                   lines_sent_total=self.lines_sent_total,
                   batches_resent_total=self.batches_resent_total,
                   batches_acked_total=self.batches_acked_total,
                   lines_acked_total=self.lines_acked_total,
                   acks_total=self.acks_total, bad_acks_total=self.bad_acks_total,
                   window_batches=self._inflight, window_lines=self._inflight_lines)
        if self.spool is not None:
            out.update(spool_bytes=self.spool.bytes_used, spool_records=self.spool.records,
                       spool_segments=self.spool.segments)
        return out

    def close(self, linger_s=None):
        idle = self.idle()
        try:
            super().close(0)
        finally:
            if self.spool is not None:
                self.spool.close()
        return idle


__all__ = ["ACK_KIND", "ACK_TIMEOUT_S", "AckedSink", "BATCH_MAX_BYTES"]
