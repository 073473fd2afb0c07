"""The ZeroMQ end of a forwarder: socket type and options, waiting for a first peer, linger, close."""

import time

import zmq

from . import core
from .config import ContainerInfo, ZmqOptions, extra_attributes, tenant_service
from .errors import TransportError

#: How often a waiting loop wakes to look at signals and deadlines.
_WAKE_S = 0.1


def _zmq_failure(what, exc, endpoint):
    return TransportError("%s %s: %s" % (what, endpoint, exc.strerror), exc.errno, endpoint)


class Sink:
    """One connected ZeroMQ socket that forwarders' streams send on.

    ``zmq-socket=pub`` gives an XPUB socket with ZMQ_XPUB_NODROP: wire-compatible with the SUB
    collectors of the original driver, but a slow subscriber makes sends wait (blocking mode) instead
    of dropping. ``push`` gives a PUSH socket, lossless toward one PULL collector at a time.

    Args:
        options: validated log-opts (:func:`zeroline.config.validate_log_opts`).
        context: a pyzmq context to use; by default the sink owns a new one and terminates it at
            :meth:`close`, which is how it waits for queued messages to leave.

    Raises:
        TransportError: the endpoint cannot be used.
    """

    def __init__(self, options: ZmqOptions, context=None):
        self.options = options
        self.endpoint = options.address
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        kind = zmq.XPUB if options.socket == "pub" else zmq.PUSH
        self.socket = self.context.socket(kind)
        self.closed = False
        self.peer_seen = False
        try:
            self.socket.setsockopt(zmq.SNDHWM, options.hwm)
            self.socket.setsockopt(zmq.LINGER, int(options.linger_s * 1000))
            if kind == zmq.XPUB:
                self.socket.setsockopt(zmq.XPUB_NODROP, 1)
            else:
                # Only to learn that a puller is there (wait_for_peer); outgoing pipes are created
                # at connect, so messages queue (up to the HWM) while a late collector starts.
                self._monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._abort()
            raise _zmq_failure("cannot connect to zmq-address", exc, self.endpoint) from None

    def stream(self, info: ContainerInfo, source="stdout", id_seed=None):
        """A :class:`zeroline.core.Stream` for one source of a container, set up from the options:
        tenant/service from the container's env, short or full id, attrs, line buffer, ring size."""
        opts = self.options
        tenant, service = tenant_service(info.env)
        cid = info.short_id if opts.container_id_format == "short" else info.container_id
        return core.Stream(
            source,
            framing=opts.framing,
            tenant=tenant,
            service=service,
            container_id=cid,
            container_name=info.container_name,
            attrs=extra_attributes(info, opts),
            max_line_bytes=opts.line_buffer,
            id_seed=id_seed,
            max_pending_bytes=opts.max_buffer_size if opts.mode == "non-blocking" else -1,
        )

    def wait_for_peer(self, timeout_s=None):
        """Wait until a peer is there: the first subscription (pub) or a completed handshake with a
        puller (push). ``timeout_s`` defaults to the ``zmq-peer-wait`` option; 0 waits forever.

        Without this, a pub socket drops the first lines (no subscriber matches them yet).

        Raises:
            TransportError: no peer within the timeout.
        """
        if self.peer_seen:
            return
        if timeout_s is None:
            timeout_s = self.options.peer_wait_s
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        while True:
            wait = _WAKE_S if deadline is None else min(_WAKE_S, deadline - time.monotonic())
            if wait > 0 and self.poll_peer(int(wait * 1000) or 1):
                return
            if deadline is not None and time.monotonic() >= deadline:
                what = "subscriber" if self.options.socket == "pub" else "puller"
                raise TransportError(
                    "no %s at zmq-address %s after %gs (is the collector running? "
                    "raise zmq-peer-wait, or 0 to wait forever)" % (what, self.endpoint, timeout_s),
                    0, self.endpoint)

    def poll_peer(self, timeout_ms=0):
        """True once a first peer was seen; waits at most ``timeout_ms`` (0: just look)."""
        if not self.peer_seen:
            watched = self.socket if self.options.socket == "pub" else self._monitor
            if watched.poll(timeout_ms, zmq.POLLIN):
                # The subscription message (pub) or the monitor event (push) is only a signal.
                watched.recv_multipart()
                self.peer_seen = True
        return self.peer_seen

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
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self.socket.disable_monitor()
            monitor.close(linger=0)
        self.socket.close()
        if not self._own_context:
            return True
        started = time.monotonic()
        self.context.term()
        # term() returns early only when every queue drained; waiting the whole linger means
        # something may still have been queued when libzmq gave up.
        return linger_ms == 0 or time.monotonic() - started < linger_s * 0.95

    def _abort(self):
        self.closed = True
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.close(linger=0)
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()


def create_sink(info, options):
    """The ``zmq`` driver's creator (see :func:`zeroline.config.register_driver`)."""
    return Sink(options)
