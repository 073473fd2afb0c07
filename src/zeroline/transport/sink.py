"""The ZeroMQ end of a forwarder: socket, options, peer state, linger; pub/push delivery.

A sink never makes the program wait for a collector that is not there: it connects (ZeroMQ
connects in the background and reconnects by itself), reports a missing or lost peer on stderr,
and refuses messages only when its queues are full, which the supervisor turns into the mode's
backpressure (blocking: stop reading; non-blocking: queue, then drop and count).
"""

import sys
import time

import zmq

from .. import core
from ..config import ContainerInfo, ZmqOptions, extra_attributes, tenant_service
from ..errors import TransportError

#: How often a waiting loop wakes to look at signals and deadlines.
_WAKE_S = 0.1


def _log(text):
    sys.stderr.write("zeroline: %s\n" % text)
    sys.stderr.flush()


def _zmq_failure(what, exc, endpoint):
    return TransportError("%s %s: %s" % (what, endpoint, exc.strerror), exc.errno, endpoint)


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
        try:
            self._setup()
            self.socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._abort()
            raise _zmq_failure("cannot connect to zmq-address", exc, self.endpoint) from None
        self.fd = self.socket.getsockopt(zmq.FD)

    def _setup(self):
        self.socket.setsockopt(zmq.LINGER, int(self.options.linger_s * 1000))
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)

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

    def _register(self, stream, info, source):
        pass

    def forget(self, stream):
        """The stream ended and everything it had left the sink's hands (or was counted)."""

    # -- peers --------------------------------------------------------------------------------
    def _peer_events(self):
        # Monitor events say when a connection is made or lost; they are only signals.
        monitor = self._monitor
        if monitor is None:
            return
        while monitor.poll(0, zmq.POLLIN):
            event = monitor.recv_multipart()
            what = int.from_bytes(event[0][:2], "little")
            if what == zmq.EVENT_HANDSHAKE_SUCCEEDED:
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

    def progress_mark(self):
        """A value that changes whenever the collector confirmed something (acked sinks)."""
        return 0

    def stats(self):
        return {"disconnects_total": self.disconnects_total}

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

    Delivery is at-most-once across collector restarts: ZeroMQ has no receipts, so messages in
    flight when a collector dies are lost. Use ``zmq-socket=acked`` when every line matters.
    """

    def __init__(self, options: ZmqOptions, context=None, report=None):
        self.kind = zmq.XPUB if options.socket == "pub" else zmq.PUSH
        super().__init__(options, context, report)

    def _setup(self):
        self.socket.setsockopt(zmq.SNDHWM, self.options.hwm)
        if self.kind == zmq.XPUB:
            self.socket.setsockopt(zmq.LINGER, int(self.options.linger_s * 1000))
            self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        else:
            super()._setup()

    @property
    def holding(self):
        # XPUB drops what matches no subscriber: hold everything until the first subscription.
        return self.kind == zmq.XPUB and not self.poll_peer(0)

    def poll_peer(self, timeout_ms=0):
        if self.kind != zmq.XPUB:
            return super().poll_peer(timeout_ms)
        if not self.peer_seen and self.socket.poll(timeout_ms, zmq.POLLIN):
            # The subscription message is only a signal.
            self.socket.recv_multipart()
            self.peer_seen = True
        return self.peer_seen

    def offer(self, stream):
        stream.send(self.socket, block=False)
        return not stream.pending_messages

    def undelivered(self):
        return 0, 0



class SocketSink:
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

    def on_event(self):
        return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def tick(self):
        return False

    def forget(self, stream):
        pass

    def idle(self):
        return True

    def undelivered(self):
        return 0, 0

    def progress_mark(self):
        return 0

    def stats(self):
        return {}
