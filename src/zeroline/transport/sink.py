"""The ZeroMQ end of a forwarder: socket, options, peer state, linger; pub/push delivery.

A sink never makes the program wait for a collector that is not there: it connects (ZeroMQ
connects in the background and reconnects by itself), reports a missing or lost peer on stderr,
and refuses messages only when its queues are full, which the supervisor turns into the mode's
backpressure (blocking: stop reading; non-blocking: queue, then drop and count).
"""

import collections
import ipaddress
import os
import sys
import time

import zmq

from .. import core
from ..config import ContainerInfo, ZmqOptions, extra_attributes, tenant_service
from ..errors import TransportError

#: How often a waiting loop wakes to look at signals and deadlines.
_WAKE_S = 0.1
#: Largest batch body taken from a stream at once (docs/acked-protocol.md's BATCH_MAX_BYTES).
BATCH_MAX_BYTES = getattr(core._impl, "BATCH_MAX_BYTES", 256 * 1024)
#: Stream ids are at most this long (the spec's limit).
MAX_STREAM_ID = 255
#: With a spool, refused messages wait in memory, up to this many line bytes for all streams of
#: the sink together (and half of a non-blocking stream's buffer, so it never drops first),
#: before they go to disk: a collector that is only briefly slower costs no disk write. With
#: 1 MiB, a plugin under `docker run ... yes` still spooled most of its lines on a busy 2-core
#: machine (2.4-2.5 CPU s per 2 M lines against 2.0-2.1 s without a spool); 8 MiB: 2.1-2.2 s.
MEMORY_TIER_BYTES = 8 << 20
#: ... and for at most this long: a refusal that lasts is an outage, and what a kill -9 of this
#: process would lose stays small.
MEMORY_TIER_S = 0.5
#: Monitor events of a failed ZMTP handshake. Measured with libzmq 4.3.5: a CURVE client with the
#: wrong server key gets NO_DETAIL (the server cannot decrypt our HELLO and hangs up), a key the
#: collector's ZAP handler refuses gets AUTH (status 400), CURVE on one side only gets PROTOCOL
#: (mechanism mismatch) on both sides. libzmq reconnects by itself only after NO_DETAIL (see
#: RECONNECT_AFTER_REFUSAL_S for the others).
HANDSHAKE_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
#: After a handshake the collector refused (AUTH) or could not speak (PROTOCOL), libzmq does not
#: connect again by itself; the sink does, this long after, so a key added to the collector's
#: allow-list later (or CURVE turned on there) starts the delivery without a restart.
RECONNECT_AFTER_REFUSAL_S = 2.0
#: What a sink's monitor watches: a peer came or went, or a handshake failed.
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | HANDSHAKE_FAILED_EVENTS)


def _log(text):
    sys.stderr.write("zeroline: %s\n" % text)
    sys.stderr.flush()


def _zmq_failure(what, exc, endpoint):
    return TransportError("%s %s: %s" % (what, endpoint, exc.strerror), exc.errno, endpoint)


def exposed_tcp_host(endpoint):
    """The host of a ``tcp://`` endpoint that is not a loopback address (``*`` and ``0.0.0.0``
    included: a bind there listens on every interface), or None: plaintext there is readable by
    others. Host names other than ``localhost`` count as exposed (no DNS lookup here)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return None
    host = rest.rpartition(":")[0]
    if ";" in host:         # tcp://SOURCE;HOST:PORT
        host = host.rpartition(";")[2]
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "localhost":
        return None
    try:
        if ipaddress.ip_address(bare).is_loopback:
            return None
    except ValueError:
        pass
    return host


def _handshake_failure_text(what, value, endpoint):
    # One line per kind of failure (see HANDSHAKE_FAILED_EVENTS for what each means).
    if what == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("collector at %s refused our CURVE key (not on its allow-list? status %d); "
                "nothing is delivered" % (endpoint, value))
    if (what == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1)):
        return ("handshake with %s failed: CURVE is on at one end only (set zmq-curve-server-key "
                "and zmq-curve-key here, and --curve-secret-key on the collector, or neither); "
                "nothing is delivered" % endpoint)
    return ("handshake with %s failed: is CURVE on at both ends and the server key right? "
            "nothing is delivered" % endpoint)


class _StreamState:
    """A stream id's sequence numbers (spool and acked protocol) and, for an acked sink, its
    unacknowledged batches."""

    __slots__ = ("stream_id", "tenant", "service", "next_seq", "acked", "inflight",
                 "overflow", "lines_acked", "gap_resent_at", "gap_seen")

    def __init__(self, stream_id, tenant, service, next_seq):
        self.stream_id = stream_id
        self.tenant = tenant
        self.service = service
        self.next_seq = next_seq
        self.acked = next_seq - 1
        self.inflight = collections.deque()     # _Batch, in seq order
        self.overflow = None                    # a batch the full spool refused: (seq, body, n)
        self.lines_acked = 0
        self.gap_resent_at = 0.0
        self.gap_seen = False


class Sink:
    """What every sink shares: the context, one connected socket, its monitor, peer reporting.

    Args:
        options: validated log-opts (:func:`zeroline.config.validate_log_opts`).
        context: a pyzmq context to use; by default the sink owns a new one and terminates it at
            :meth:`close`, which is how it waits for queued messages to leave.
        report: a callable taking one line for stderr (default: ``zeroline: ...`` on stderr).

    Raises:
        TransportError: the endpoint cannot be used.
    """

    #: The socket type; subclasses set it.
    kind = zmq.PUSH
    #: Whether the supervisor must watch :attr:`fd` all the time (a sink that receives acks), or
    #: only while the sink refuses messages.
    watch_always = False
    #: Framing forced by the transport (None: the zmq-framing option).
    framing = None
    #: Bytes a copier reads per read for this sink (Supervisor.add's default): pub/push take one
    #: message per line up to zmq-hwm (1000), so a read of about that many lines keeps every
    #: stream's turn short; 1 MiB reads there cost the 100-stream row (sup) 40% of its rate.
    read_bytes = 64 * 1024

    def __init__(self, options: ZmqOptions, context=None, report=None):
        self.options = options
        self.endpoint = options.address
        self.report = report or _log
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        self.socket = self.context.socket(self.kind)
        self._monitor = None
        self.closed = False
        self.peer_seen = False
        self.connected = False
        self.disconnects_total = 0
        self._started = time.monotonic()
        # When `connected` last changed (read by /healthz: how long the collector has been away).
        self.peer_changed_at = self._started
        self._missing_reported = False
        self._failures_reported = set()     # kinds of handshake failure said already
        self._reconnect_at = None           # see RECONNECT_AFTER_REFUSAL_S
        self.handshake_failures_total = 0
        try:
            self._setup()
            self._setup_curve()
            self.socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._abort()
            raise _zmq_failure("cannot connect to zmq-address", exc, self.endpoint) from None
        self.fd = self.socket.getsockopt(zmq.FD)

    def _setup(self):
        self.socket.setsockopt(zmq.LINGER, int(self.options.linger_s * 1000))
        self._monitor = self.socket.get_monitor_socket(MONITOR_EVENTS)

    def _setup_curve(self):
        # After the subclass's options and before connect: CURVE keys (zmq-curve-server-key and
        # zmq-curve-key), or a warning when lines would cross a network in plaintext. A socket
        # without a monitor (XPUB: its subscriptions are the peer signal) gets one that watches
        # handshake failures only, so a refused key is still said.
        opts = self.options
        sock = self.socket
        if opts.curve_server_key is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, opts.curve_server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, opts.curve_key[0])
            sock.setsockopt(zmq.CURVE_SECRETKEY, opts.curve_key[1])
        else:
            host = exposed_tcp_host(self.endpoint)
            if host is not None:
                self.report("warning: lines to %s go unencrypted and the collector is not "
                            "authenticated (set zmq-curve-server-key and zmq-curve-key for CURVE)"
                            % self.endpoint)
        if self._monitor is None:
            self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)

    # -- streams ----------------------------------------------------------------------------
    def stream(self, info: ContainerInfo, source="stdout", id_seed=None, entries=False,
               keep_local=False):
        """A Stream for one source of a container, set up from the options: tenant/service from
        the container's env, short or full id, attrs, line buffer, ring size. ``entries=True``
        gives a :class:`zeroline.core.EntryStream` (a Docker plugin FIFO, whose entries carry
        their own source; ``source`` then only names the stream) instead."""
        opts = self.options
        tenant, service = tenant_service(info.env)
        cid = info.short_id if opts.container_id_format == "short" else info.container_id
        common = dict(
            framing=self.framing or opts.framing, tenant=tenant, service=service,
            container_id=cid, container_name=info.container_name,
            attrs=extra_attributes(info, opts),
            max_pending_bytes=opts.max_buffer_size if opts.mode == "non-blocking" else -1)
        if entries:
            stream = core.EntryStream(**common, keep_local=keep_local)
        else:
            stream = core.Stream(source, max_line_bytes=opts.line_buffer, id_seed=id_seed,
                                 **common)
        self._register(stream, info, source)
        return stream

    # -- stream ids and the spool (pub/push with spool-dir, and acked) ----------------------
    spool = None
    _streams = None

    def _open_spool(self, options, spool=None):
        """Before the socket: the spool of ``spool-dir`` (or the one given), the instance id
        that stream ids start with (kept in the spool, so a later process goes on with the same
        streams and sequence numbers), and the stream tables."""
        if spool is None and options.spool_dir:
            from .spool import Spool

            spool = Spool(options.spool_dir, max_bytes=options.spool_max_size)
        self.spool = spool
        self.instance = spool.instance_id if spool is not None else os.urandom(8).hex()
        self._streams = {}              # Stream -> _StreamState
        self._by_id = {}                # stream id -> _StreamState (replayed ones too)
        self._spool_full_reported = False
        return spool

    def _register(self, stream, info, source):
        if self._streams is None:
            return
        cid = info.container_id or "-"
        sid = ("%s/%s/%s" % (self.instance, cid, source)).encode("utf-8", "surrogateescape")
        sid = sid[:MAX_STREAM_ID]
        state = self._by_id.get(sid)
        if state is None:
            first = self.spool.next_seq(sid) if self.spool is not None else 1
            state = self._by_id[sid] = _StreamState(sid, stream.tenant, stream.service, first)
        self._streams[stream] = state

    def forget(self, stream):
        """The stream ended and everything it had left the sink's hands (or was counted)."""
        if self._streams is not None:
            self._streams.pop(stream, None)

    def stream_id(self, stream):
        return self._streams[stream].stream_id

    def _spool_stream(self, stream):
        """Move ``stream``'s pending messages into the spool as batches; False when the spool
        is full (the batch in hand waits in ``state.overflow``, in order, for room)."""
        state = self._streams[stream]
        if state.overflow is not None and not self._spool_overflow(state):
            return False
        while stream.pending_messages:
            body, lines, _ = stream.take_batch(BATCH_MAX_BYTES)
            state.overflow = (state.next_seq, body, lines)
            state.next_seq += 1
            if not self._spool_overflow(state):
                return False
        return True

    def _spool_overflow(self, state):
        from .spool import SpoolFull

        seq, body, lines = state.overflow
        try:
            self.spool.append(state.stream_id, seq, state.tenant, state.service, body, lines)
        except SpoolFull as exc:
            if not self._spool_full_reported:
                self._spool_full_reported = True
                self.report("%s: %s" % (exc, self.hold_text()))
            return False
        self._spool_full_reported = False
        state.overflow = None
        self._pump_spool()
        return True

    def _start_spooled(self, options, context, report):
        # Sink.__init__ for a sink that may have opened a spool: closed again when the socket
        # cannot be set up; what an earlier process left in it goes first.
        try:
            Sink.__init__(self, options, context, report)
        except BaseException:
            if self.spool is not None:
                self.spool.close()
            raise
        if self.spool is not None and self.spool.unsent_count():
            self.report("spool %s: %d batches left by an earlier run; sending them first"
                        % (options.spool_dir, self.spool.unsent_count()))
            self._pump_spool()

    def _spool_idle(self):
        if self.spool is None:
            return True
        if any(state.overflow is not None for state in self._by_id.values()):
            return False
        return not self.spool.unsent_count()

    @property
    def spool_full(self):
        """True while the spool refuses batches for lack of room."""
        return self._spool_full_reported

    # -- peers --------------------------------------------------------------------------------
    def _peer_events(self):
        # Monitor events say when a connection is made or lost; they are only signals.
        monitor = self._monitor
        if monitor is None:
            return
        while monitor.poll(0, zmq.POLLIN):
            event = monitor.recv_multipart()
            what = int.from_bytes(event[0][:2], "little")
            if what & HANDSHAKE_FAILED_EVENTS:
                # libzmq retries by itself; say it once per kind, never raise.
                self.handshake_failures_total += 1
                value = int.from_bytes(event[0][2:6], "little")
                kind = (what, value if what == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else 0)
                if kind not in self._failures_reported:
                    self._failures_reported.add(kind)
                    self.report(_handshake_failure_text(what, value, self.endpoint))
                if what != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._reconnect_at is None:
                    self._reconnect_at = time.monotonic() + RECONNECT_AFTER_REFUSAL_S
            elif what == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.disconnects_total and not self.connected:
                    self.report("collector at %s is back" % self.endpoint)
                self.connected = True
                self.peer_changed_at = time.monotonic()
                self._on_connected()
            elif what == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self.peer_changed_at = time.monotonic()
                self.disconnects_total += 1
                self.report("lost the collector at %s; holding lines until it is back (%s)"
                            % (self.endpoint, self.hold_text()))

    def _on_connected(self):
        self.peer_seen = True

    def hold_text(self):
        if self.options.mode == "non-blocking":
            return "non-blocking: up to max-buffer-size, then dropped and counted"
        return "blocking: the program waits once the buffers are full"

    def poll_peer(self, timeout_ms=0):
        """True once a first peer was seen; waits at most ``timeout_ms`` (0: just look)."""
        if not self.peer_seen and timeout_ms:
            self._monitor.poll(timeout_ms, zmq.POLLIN)
        self._peer_events()
        return self.peer_seen

    def wait_for_peer(self, timeout_s=None):
        """Wait until a first peer is there, at most ``timeout_s`` (default ``zmq-peer-wait``;
        0 waits forever). For embedders and benchmarks: zeroline's own commands never wait.

        Raises:
            TransportError: no peer within the timeout.
        """
        if timeout_s is None:
            timeout_s = self.options.peer_wait_s
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        while not self.poll_peer(int(_WAKE_S * 1000)):
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportError("no peer at zmq-address %s after %gs (is the collector "
                                     "running?)" % (self.endpoint, timeout_s), 0, self.endpoint)

    def tick(self):
        """Timers, called by the supervisor a few times a second: peer state and reporting.
        Returns True when the sink may take messages it refused before."""
        self._peer_events()
        if self._reconnect_at is not None and time.monotonic() >= self._reconnect_at:
            self._reconnect_at = None
            try:
                self.socket.disconnect(self.endpoint)
            except zmq.ZMQError:        # libzmq ended that connection already
                pass
            try:
                self.socket.connect(self.endpoint)
            except zmq.ZMQError as exc:
                self.report("cannot connect to %s again: %s" % (self.endpoint, exc.strerror))
        if (not self.peer_seen and not self._missing_reported and self.options.peer_wait_s > 0
                and time.monotonic() - self._started > self.options.peer_wait_s):
            self._missing_reported = True
            self.report("no collector at %s after %gs; holding lines until one connects (%s)"
                        % (self.endpoint, self.options.peer_wait_s, self.hold_text()))
        return False

    # -- delivery (subclasses) ------------------------------------------------------------------
    holding = False

    def offer(self, stream):
        """Move what ``stream`` has pending into the transport without waiting; True when
        nothing is left pending in it."""
        raise NotImplementedError

    def on_event(self):
        """The socket's fd woke up: True when the sink may take more now."""
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def idle(self):
        """True when nothing handed to the sink waits for the collector (sent or acknowledged)."""
        return True

    def undelivered(self):
        """``(messages, lines)`` handed to the sink and not known to be delivered."""
        return 0, 0

    def settle(self):
        """At the end, before the counts: move what the sink holds in memory to its spool."""

    def progress_mark(self):
        """A value that changes whenever the collector confirmed something (acked sinks)."""
        return 0

    def stats(self):
        return {"disconnects_total": self.disconnects_total,
                "handshake_failures_total": self.handshake_failures_total}

    # -- closing ----------------------------------------------------------------------------------
    def close(self, linger_s=None):
        """Close the socket and wait up to ``linger_s`` (default: the ``zmq-linger`` option) for
        queued messages to be written to the peer's connection.

        Returns:
            True when libzmq's queues emptied before the linger ran out. That means handed to the
            operating system, not processed by the collector: ZeroMQ has no delivery receipts.
        """
        if self.closed:
            return True
        self.closed = True
        if linger_s is None:
            linger_s = self.options.linger_s
        linger_ms = max(0, int(linger_s * 1000))
        self.socket.setsockopt(zmq.LINGER, linger_ms)
        self._close_monitor()
        self.socket.close()
        if not self._own_context:
            return True
        started = time.monotonic()
        self.context.term()
        # term() returns early only when every queue drained; waiting the whole linger means
        # something may still have been queued when libzmq gave up.
        return linger_ms == 0 or time.monotonic() - started < linger_s * 0.95

    def _close_monitor(self):
        if self._monitor is not None:
            try:
                self.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None

    def _abort(self):
        self.closed = True
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()


class ZmqSink(Sink):
    """``zmq-socket=pub`` or ``push``: one 3-frame message per line, the original driver's wire.

    ``pub`` gives an XPUB socket with ZMQ_XPUB_NODROP: wire-compatible with the SUB collectors of
    the original driver, but a slow subscriber makes sends wait (blocking mode) instead of
    dropping; until a first subscriber is there the sink *holds* (XPUB would drop every message),
    so nothing sent before the collector subscribed vanishes. ``push`` gives a PUSH socket: its
    messages queue (up to zmq-hwm) while no puller is connected.

    With ``spool-dir``, the spool is an outage buffer. While it is empty, messages go straight
    to libzmq; what libzmq refuses (no peer, high-water mark) waits in memory, up to
    MEMORY_TIER_BYTES for the sink and MEMORY_TIER_S, then goes to disk as batches, and so does
    everything after it while the spool is not empty. A batch leaves the spool once libzmq took
    all its messages (the wire stays one message per line). A
    collector that is away then costs disk, not the program's progress; a later process with
    the same spool sends what this one could not. Still at-most-once across a collector restart:
    what libzmq took and the collector did not write is gone, and a batch cut off halfway by an
    exit is sent again whole (its first part twice).

    Delivery is at-most-once across collector restarts: ZeroMQ has no receipts, so messages in
    flight when a collector dies are lost. Use ``zmq-socket=acked`` when every line matters.
    """

    def __init__(self, options: ZmqOptions, context=None, report=None, spool=None):
        self.kind = zmq.XPUB if options.socket == "pub" else zmq.PUSH
        spool = self._open_spool(options, spool) if (spool or options.spool_dir) else None
        self._current = None        # the spooled batch being sent, and how far it went
        self._offset = 0
        self._in_memory = {}        # streams whose refused messages wait in memory, in order
        self.spooled_messages_sent_total = 0
        self._start_spooled(options, context, report)

    def _setup(self):
        self.socket.setsockopt(zmq.SNDHWM, self.options.hwm)
        if self.kind == zmq.XPUB:
            self.socket.setsockopt(zmq.LINGER, int(self.options.linger_s * 1000))
            self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        else:
            super()._setup()
            if self.spool is not None:
                # Without a connected puller, refuse instead of queueing in libzmq, where an
                # exit would lose what the spool already let go.
                self.socket.setsockopt(zmq.IMMEDIATE, 1)

    @property
    def watch_always(self):
        # A spool drains as the socket takes more: its fd is watched all the time.
        return self.spool is not None

    @property
    def holding(self):
        # XPUB drops what matches no subscriber: hold everything until the first subscription
        # (with a spool, the spool holds it and reading goes on).
        return self.kind == zmq.XPUB and self.spool is None and not self.poll_peer(0)

    def poll_peer(self, timeout_ms=0):
        if self.kind != zmq.XPUB:
            return super().poll_peer(timeout_ms)
        if not self.peer_seen and self.socket.poll(timeout_ms, zmq.POLLIN):
            # The subscription message is only a signal.
            self.socket.recv_multipart()
            self.peer_seen = True
        self._peer_events()
        return self.peer_seen

    def offer(self, stream):
        if self.spool is None:
            stream.send(self.socket, block=False)
            return not stream.pending_messages
        if self._direct(stream):
            stream.send(self.socket, block=False)
            if not stream.pending_messages:
                self._in_memory.pop(stream, None)
                return True
            if self._memory_room(stream):
                # Refused: held in memory (the copier reads on), sent on the socket's next
                # events; only a refusal that lasts for a buffer's worth goes to disk.
                self._in_memory.setdefault(stream, time.monotonic())
                return True
        self._in_memory.pop(stream, None)
        if not self._spool_stream(stream):
            return False
        self._pump_spool()
        return True

    def _direct(self, stream):
        # Straight to libzmq while nothing waits in the spool (so a stream's messages never
        # overtake its own spooled ones) and, for XPUB, a subscriber is there to take them.
        return (self._current is None and not self.spool.unsent_count()
                and self._streams[stream].overflow is None
                and (self.kind != zmq.XPUB or self.poll_peer(0)))

    def _memory_room(self, stream):
        ring = stream.max_pending_bytes
        if ring >= 0 and stream.pending_bytes > ring // 2:
            return False
        held = stream.pending_bytes + sum(other.pending_bytes for other in self._in_memory
                                          if other is not stream)
        return held < MEMORY_TIER_BYTES

    def _send_in_memory(self):
        # The streams held in memory, oldest refusal first, until the socket refuses again;
        # once the spool has something, they follow it there (in order).
        while self._in_memory:
            stream = next(iter(self._in_memory))
            if self._direct(stream):
                stream.send(self.socket, block=False)
                if stream.pending_messages:
                    return
            elif not self._spool_stream(stream):
                return
            del self._in_memory[stream]

    def settle(self):
        """At the end: what waits in memory goes to the spool (a later process sends it)."""
        if self.spool is not None:
            self._spool_in_memory(time.monotonic())

    def _spool_in_memory(self, refused_before):
        # Streams held in memory since before ``refused_before`` go to the spool, in order,
        # until it is full.
        for stream, since in list(self._in_memory.items()):
            if since <= refused_before:
                if not self._spool_stream(stream):
                    return
                del self._in_memory[stream]

    def _pump_spool(self):
        # Oldest spooled batch first, record by record (compiled, no GIL), until the socket
        # refuses; a batch leaves the spool once libzmq took all its messages.
        if self.kind == zmq.XPUB and not self.poll_peer(0):
            return
        spool = self.spool
        while True:
            if self._current is None:
                self._current = spool.next_unsent()
                self._offset = 0
                if self._current is None:
                    return
            record = self._current
            start = self._offset
            self._offset = core.send_body(self.socket, record.tenant, record.service,
                                          record.body, start)
            if self._offset < len(record.body):
                return
            spool.release(record.stream_id, record.seq)
            self.spooled_messages_sent_total += record.lines
            self._current = None

    def on_event(self):
        if self.spool is None:
            return super().on_event()
        if self.socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            self._pump_spool()
            self._send_in_memory()
        return not self.spool_full

    def tick(self):
        super().tick()
        if self.spool is not None:
            self._pump_spool()
            self._send_in_memory()
            self._spool_in_memory(time.monotonic() - MEMORY_TIER_S)     # a lasting refusal
            return not self.spool_full
        return False

    def idle(self):
        return self._current is None and not self._in_memory and self._spool_idle()

    def stats(self):
        out = super().stats()
        if self.spool is not None:
            # Messages of spooled batches libzmq took (the streams' sent_total counts direct
            # sends only), and the spool's size.
            out.update(lines_sent_total=self.spooled_messages_sent_total,
                       spool_bytes=self.spool.bytes_used, spool_records=self.spool.records,
                       spool_segments=self.spool.segments)
        return out

    def undelivered(self):
        """With a spool: ``(batches, 0)`` still in it (their lines are on disk, not lost)."""
        if self.spool is None:
            return 0, 0
        return self.spool.unsent_count() + (self._current is not None), 0

    def close(self, linger_s=None):
        try:
            return super().close(linger_s)
        finally:
            if self.spool is not None:
                self.spool.close()


class SocketSink(Sink):
    """A sink over a pyzmq socket that the caller made and owns (embedders, tests, benchmarks):
    streams are sent on it as they are; no peer tracking, no acknowledgements."""

    watch_always = False
    holding = False

    def __init__(self, socket):
        self.socket = socket
        self.fd = socket.getsockopt(zmq.FD)

    def offer(self, stream):
        stream.send(self.socket, block=False)
        return not stream.pending_messages

    def tick(self):
        return False

    def stats(self):
        return {}
