"""Pure-Python twin of the compiled LogEntry path (ext/logentry.pxi): Docker's plugin FIFO frames.

The daemon writes ``[uint32 big-endian length][LogEntry]`` frames (docs/docker-logging.md §4):

    LogEntry: source (1, string), time_nano (2, int64), line (3, bytes), partial (4, bool),
              partial_log_metadata (5, message), attrs (6, repeated LogAttr; never sent to plugins)
    PartialLogEntryMetadata: last (1, bool), id (2, string), ordinal (3, int32)

proto3 leaves defaults out, so a missing field is its zero value; unknown fields are skipped by
their wire type. ``partial = true`` means "has metadata" (not "has no newline"); the metadata
itself decides what we forward.
"""

import struct

from ._core_py import Message, Partial, Stream, check_limits
from .errors import ProtocolError

#: Longest entry accepted from the FIFO; Docker's own readers (the local driver, the test
#: plugin) refuse more than this. Copier entries stay under ~16.5 KB.
MAX_ENTRY_BYTES = 1_000_000

#: Partial groups left open are tracked for at most this many sources per stream (Docker has two:
#: stdout and stderr), with sources up to MAX_GROUP_SOURCE_BYTES and ids up to MAX_GROUP_ID_BYTES
#: (Docker's are 64); anything beyond is forwarded as it came and not closed at EOF.
MAX_OPEN_GROUPS = 4
MAX_GROUP_SOURCE_BYTES = 32
MAX_GROUP_ID_BYTES = 64

_LEN = struct.Struct(">I")
_MASK64 = (1 << 64) - 1

# Why an entry is malformed; the compiled decoder reports the same texts.
BAD_VARINT = "varint runs past the end of the entry or is longer than 10 bytes"
BAD_LENGTH = "a field runs past the end of the entry"
BAD_WIRE = "unsupported wire type"
FIELD_ZERO = "field number 0"


def _varint(data, pos, end):
    result = shift = 0
    while True:
        if pos >= end:
            raise ProtocolError(BAD_VARINT)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise ProtocolError(BAD_VARINT)


def _fields(data, pos, end):
    """Yields (field number, wire type, value) where value is an int (varint, fixed) or a
    (start, stop) slice for length-delimited fields."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtocolError(FIELD_ZERO)
        if wire == 0:
            value, pos = _varint(data, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise ProtocolError(BAD_LENGTH)
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos, end)
            if size > end - pos:
                raise ProtocolError(BAD_LENGTH)
            value, pos = (pos, pos + size), pos + size
        elif wire == 5:
            if pos + 4 > end:
                raise ProtocolError(BAD_LENGTH)
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ProtocolError(BAD_WIRE)
        yield number, wire, value


def _signed64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def decode_entry(data):
    """One LogEntry (without its length prefix) as a :class:`Message`.

    Raises:
        ProtocolError: the bytes are not a LogEntry.
    """
    data = bytes(data)
    source, time_nano, line, meta = "", 0, b"", None
    for number, wire, value in _fields(data, 0, len(data)):
        if number == 1 and wire == 2:
            source = data[value[0]:value[1]].decode("utf-8", "replace")
        elif number == 2 and wire == 0:
            time_nano = _signed64(value)
        elif number == 3 and wire == 2:
            line = data[value[0]:value[1]]
        elif number == 5 and wire == 2:
            last, pid, ordinal = (meta if meta is not None else (False, "", 0))
            for sub, sub_wire, sub_value in _fields(data, value[0], value[1]):
                if sub == 1 and sub_wire == 0:
                    last = bool(sub_value)
                elif sub == 2 and sub_wire == 2:
                    pid = data[sub_value[0]:sub_value[1]].decode("utf-8", "replace")
                elif sub == 3 and sub_wire == 0:
                    ordinal = _signed32(sub_value)
            meta = (last, pid, ordinal)
        # partial (4), attrs (6), unknown fields and known numbers with another wire type: skipped
    partial = Partial(meta[1], meta[2], meta[0]) if meta is not None else None
    return Message(line, source, time_nano, partial)


def _put_varint(out, value):
    value &= _MASK64
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_bytes(out, key, value):
    out.append(key)
    _put_varint(out, len(value))
    out += value


def encode_entry(message):
    """A :class:`Message` as LogEntry bytes, defaults left out as proto3 does."""
    out = bytearray()
    if message.source:
        _put_bytes(out, 0x0A, message.source.encode("utf-8"))
    if message.time_nano:
        out.append(0x10)
        _put_varint(out, message.time_nano)
    if message.line:
        _put_bytes(out, 0x1A, message.line)
    if message.partial is not None:
        out += b"\x20\x01"
        meta = bytearray()
        if message.partial.last:
            meta += b"\x08\x01"
        if message.partial.id:
            _put_bytes(meta, 0x12, message.partial.id.encode("utf-8"))
        if message.partial.ordinal:
            meta.append(0x18)
            _put_varint(meta, message.partial.ordinal)
        _put_bytes(out, 0x2A, meta)
    return bytes(out)


class EntryStream(Stream):
    """The data plane of one Docker plugin FIFO: LogEntry frames in, framed messages out.

    Each entry keeps its own source, timestamp and partial metadata (the daemon's copier already
    cut the lines). A malformed entry is counted and skipped; a length prefix over
    ``max_entry_bytes`` makes the rest of the stream unreadable (no way to find the next frame), so
    everything after it is counted in ``discarded_bytes_total`` and dropped until EOF, while what
    was accepted before is kept. Text cut short at EOF counts as one truncated entry.

    Docker never closes the partial group of an unterminated last line (its final chunk says
    ``last=false``). :meth:`close` closes every group still open, in what is forwarded only (the
    local copy keeps the engine's bytes): a final chunk still pending gets ``last=true``; one that
    already went out (or was dropped) is followed by an empty chunk of the group with the next
    ordinal and ``last=true``. With seed framing, which does not carry the metadata, nothing is
    changed or added.

    Args:
        framing, tenant, service, container_id, container_name, attrs, max_pending_bytes:
            as :class:`zeroline.core.Stream`.
        max_entry_bytes: longest entry accepted.
        keep_local: also collect the accepted entries as ``[len][entry][len]`` records (the format
            of Docker's ``local`` driver), taken with :meth:`take_local`.
    """

    def __init__(self, *, framing="seed", tenant="default", service="default", container_id="",
                 container_name="", attrs=None, max_pending_bytes=-1,
                 max_entry_bytes=MAX_ENTRY_BYTES, keep_local=False):
        super().__init__("stdout", framing=framing, tenant=tenant, service=service,
                         container_id=container_id, container_name=container_name, attrs=attrs,
                         max_pending_bytes=max_pending_bytes)
        check_limits(max_frame_bytes=max_entry_bytes)
        self.max_entry_bytes = max_entry_bytes
        self.keep_local = keep_local
        self._buf = bytearray()
        self._local = bytearray()
        self._entry_closed = False
        self.entries_total = 0
        self.entry_bytes_total = 0
        self.line_bytes_total = 0
        self.partial_entries_total = 0
        self.malformed_total = 0
        self.oversized_total = 0
        self.truncated_total = 0
        self.discarded_bytes_total = 0
        self.corrupt = False
        self.last_error = ""
        # source -> [message, index in messages_total order or None when dropped, entry number]
        self._open_groups = {}

    lines_total = property(lambda self: self.entries_total)
    bytes_total = property(lambda self: self.entry_bytes_total)
    partial_groups_total = property(lambda self: self.partial_entries_total)
    held_bytes = property(lambda self: len(self._buf))

    @property
    def errors_total(self):
        return self.malformed_total + self.oversized_total + self.truncated_total

    def feed(self, data, time_nano=-1):
        """Decode the complete frames in ``data`` (a frame may span feeds); returns messages queued.
        ``time_nano`` is ignored: entries carry their own."""
        if self._entry_closed:
            raise ValueError("feed() after close()")
        if data is None:
            raise TypeError("feed() needs a bytes-like object, not None")
        data = memoryview(data).cast("B")
        self.entry_bytes_total += len(data)
        if self.corrupt:
            self.discarded_bytes_total += len(data)
            return 0
        self._buf += data
        buf = self._buf
        queued_total = 0
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self.max_entry_bytes:
                self.oversized_total += 1
                self.corrupt = True
                self.last_error = ("entry length %d over the %d-byte limit: the rest of this "
                                   "stream cannot be framed and is discarded"
                                   % (size, self.max_entry_bytes))
                self.discarded_bytes_total += len(buf) - pos
                pos = len(buf)
                break
            if len(buf) - pos - 4 < size:
                break
            entry = bytes(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            try:
                message = decode_entry(entry)
            except ProtocolError as exc:
                self.malformed_total += 1
                self.last_error = "malformed entry skipped: %s" % exc
                continue
            self.entries_total += 1
            self.line_bytes_total += len(message.line)
            if message.partial is not None:
                self.partial_entries_total += 1
            # Queued one by one: whether the ring buffer dropped a group's chunk decides how
            # close() ends that group.
            queued = self._queue([message])
            queued_total += queued
            self._track_group(message, self.messages_total - 1 if queued else None)
            if self.keep_local:
                self._local += _LEN.pack(size) + entry + _LEN.pack(size)
        del buf[:pos]
        return queued_total

    def _track_group(self, message, index):
        groups = self._open_groups
        key = message.source
        if len(key.encode("utf-8")) > MAX_GROUP_SOURCE_BYTES:
            return
        partial = message.partial
        if partial is None or partial.last or len(partial.id.encode("utf-8")) > MAX_GROUP_ID_BYTES:
            groups.pop(key, None)       # a complete line: no group of this source is open
            return
        if key not in groups and len(groups) >= MAX_OPEN_GROUPS:
            return
        groups[key] = [message, index, self.entries_total]

    def _close_groups(self):
        queued = 0
        groups = sorted(self._open_groups.values(), key=lambda group: group[2])
        self._open_groups = {}
        if self._framer.framing == "seed":
            return 0                    # seed payloads carry no metadata: nothing to close
        for message, index, _ in groups:
            first_pending = self.messages_total - len(self._pending)
            partial = message.partial
            if index is not None and index >= first_pending:
                closed = message._replace(partial=partial._replace(last=True))
                self._pending[index - first_pending] = (self._framer.payload(closed),
                                                        len(message.line))
            else:
                queued += self._queue([Message(b"", message.source, message.time_nano,
                                               Partial(partial.id, _signed32(partial.ordinal + 1),
                                                       True))])
        return queued

    def close(self, time_nano=-1):
        """EOF: a frame cut short is counted as truncated; partial groups still open are closed
        (see the class). Returns how many messages were queued. ``time_nano`` is ignored."""
        if self._entry_closed:
            return 0
        self._entry_closed = True
        if self._buf and not self.corrupt:
            self.truncated_total += 1
            self.last_error = "stream ended inside an entry (%d bytes dropped)" % len(self._buf)
        self._buf.clear()
        return self._close_groups()

    def take_local(self):
        """Remove and return the accepted entries as local-format records."""
        out = bytes(self._local)
        self._local.clear()
        return out

    def stats(self):
        out = super().stats()
        out.update(entries_total=self.entries_total, malformed_total=self.malformed_total,
                   oversized_total=self.oversized_total, truncated_total=self.truncated_total,
                   discarded_bytes_total=self.discarded_bytes_total)
        return out
