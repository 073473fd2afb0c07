"""Picks the data plane: the compiled zeroline._core, or its pure-Python twin zeroline._core_py.

Environment:
  ZEROLINE_NO_EXTENSIONS=1       use the pure-Python twin even when the extension is built.
  ZEROLINE_REQUIRE_EXTENSIONS=1  fail (ImportError) instead of falling back to the twin (CI).

Both implementations export the same names and produce the same bytes; ``IMPLEMENTATION`` says
which one is in use (``"cython"`` or ``"python"``).
"""

import os

from . import _core_py, _logentry_py
from .errors import ProtocolError

if os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1":
    _impl = _core_py
else:
    try:
        from . import _core as _impl
    except ImportError:
        if os.environ.get("ZEROLINE_REQUIRE_EXTENSIONS") == "1":
            raise
        _impl = _core_py

IMPLEMENTATION = _impl.IMPLEMENTATION
LineCutter = _impl.LineCutter
Stream = _impl.Stream
Receiver = _impl.Receiver

# The LogEntry path of the Docker plugin (ext/logentry.pxi and its twin _logentry_py).
EntryStream = getattr(_impl, "EntryStream", _logentry_py.EntryStream)
decode_entry = getattr(_impl, "decode_entry", _logentry_py.decode_entry)
encode_entry = _logentry_py.encode_entry
MAX_ENTRY_BYTES = _logentry_py.MAX_ENTRY_BYTES

Message = _core_py.Message
Partial = _core_py.Partial
Framer = _core_py.Framer
DEFAULT_LINE_BUFFER = _core_py.DEFAULT_LINE_BUFFER

# The acked transport (docs/acked-protocol.md): Stream.take_batch / Receiver.add_batch handle the
# batch body in either implementation; the messages around it are plain Python, shared by both.
BATCH_MAX_BYTES = _impl.BATCH_MAX_BYTES
BATCH_KIND = _core_py.BATCH_KIND
ACK_KIND = _core_py.ACK_KIND
STREAM_ID_MAX_BYTES = _core_py.STREAM_ID_MAX_BYTES
split_batch = _core_py.split_batch
encode_batch_message = _core_py.encode_batch_message
decode_batch_message = _core_py.decode_batch_message
encode_ack = _core_py.encode_ack
decode_ack = _core_py.decode_ack
# A pub/push sink sends its spooled batches record by record without the GIL.
send_body = _impl.send_body


def implementations():
    """The importable implementations as ``{name: module}`` (tests compare them)."""
    found = {"python": _core_py}
    try:
        from . import _core
    except ImportError:
        pass
    else:
        found["cython"] = _core
    return found


def decode(frames):
    """Decode one received 3-frame message of either framing into a dict.

    Seed framing gives ``framing``, ``tenant``, ``service``, ``container_id`` and ``line`` (bytes);
    msgpack framing gives those plus every field of the record: ``container_name``, ``source``,
    ``time_nano``, ``partial`` (dict, only on partial chunks) and ``attrs`` (only when set).

    Raises:
        ProtocolError: wrong frame count, or a payload that is neither framing.
    """
    import msgpack

    if len(frames) != 3:
        raise ProtocolError("expected 3 frames, got %d" % len(frames))
    tenant, service, payload = (bytes(f) for f in frames)
    out = {"tenant": tenant.decode("utf-8", "replace"),
           "service": service.decode("utf-8", "replace")}
    # A zeroline msgpack record opens with a fixmap of 5-7 entries whose first key is
    # "container_id"; a seed payload opens with the container id itself (hex, or a user's id).
    if payload[:1] in (b"\x85", b"\x86", b"\x87") and payload[1:14] == b"\xaccontainer_id":
        try:
            record = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            raise ProtocolError("bad msgpack record: %s" % exc) from None
        if not isinstance(record, dict) or not isinstance(record.get("line"), bytes):
            raise ProtocolError("msgpack record has no binary 'line'")
        out["framing"] = "msgpack"
        out.update(record)
        return out
    cid, sep, line = payload.partition(b": ")
    if not sep:
        raise ProtocolError("seed payload has no '<container_id>: ' prefix")
    out["framing"] = "seed"
    out["container_id"] = cid.decode("utf-8", "replace")
    out["line"] = line
    return out
