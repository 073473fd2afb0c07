"""The transport: how batches leave a forwarder (ZeroMQ sinks, the acked protocol, the disk spool).

The data path reads as sources → core → transport → collector. A *sink* is one connected socket
that the copiers of a :class:`zeroline.supervisor.Supervisor` hand their streams to; ``run``,
``forward`` and the Docker plugin all go through one, so acknowledgements, the window and the
spool live in one place:

* :class:`ZmqSink` (``zmq-socket=pub`` / ``push``): the original driver's wire, one 3-frame message
  per line, at-most-once across collector restarts.
* :class:`AckedSink` (``zmq-socket=acked``): batches with sequence numbers, acknowledged by the
  collector once written, resent after a reconnect or a time-out (docs/acked-protocol.md), with an
  optional disk spool (:class:`Spool`).

Every sink offers the same small interface to the supervisor: ``stream(info, source)`` makes a
Stream set up for it, ``offer(stream)`` moves what the stream has pending into the transport and
says whether all of it went, ``fd``/``on_event()`` tell when it may take more, ``tick()`` runs
its timers, ``idle()`` says nothing is left in flight, ``close()`` ends it.
"""

from ..config import register_driver, validate_log_opts
from .sink import Sink, ZmqSink


def open_sink(options, context=None, report=None):
    """The sink for validated log-opts: :class:`AckedSink` for ``zmq-socket=acked``, else
    :class:`ZmqSink`.

    Raises:
        TransportError: the endpoint cannot be used.
        SpoolError: the spool directory cannot be used (locked by another process, unwritable).
    """
    if options.socket == "acked":
        from .acked import AckedSink

        return AckedSink(options, context=context, report=report)
    return ZmqSink(options, context=context, report=report)


def _create_zmq(info, options):
    return open_sink(options)


register_driver("zmq", _create_zmq, validate_log_opts)

__all__ = ["Sink", "ZmqSink", "open_sink"]
