"""Pure-Python twin of zeroline._core: the readable specification of the data plane.

The compiled module (ext/_core.pyx) must produce byte-for-byte the same output for the same
input, chunking, timestamps and id seed; tests/test_differential.py holds the two to that.

Data plane, per source of one container:

    bytes read ──► cut into lines (Docker's copier rules) ──► frame ──► pending batch ──► zmq send

Cutting follows moby's daemon/logger/copier.go (see docs/docker-logging.md §1) with one deliberate
improvement: at close, text without a trailing newline is flushed with partial metadata and its group
is closed with ``last=True`` (Docker leaves such a group open forever).
"""

import os
import time
from collections import namedtuple

import msgpack
import zmq

from .errors import ConfigError, ProtocolError, TransportError

IMPLEMENTATION = "python"

#: Docker's copier buffer: the longest single message; longer lines become partial chunks.
DEFAULT_LINE_BUFFER = 16384

SOURCES = ("stdout", "stderr")
FRAMINGS = ("seed", "msgpack")

Partial = namedtuple("Partial", "id ordinal last")
Partial.__doc__ = "Partial-line metadata: 64-hex group id, ordinal from 1, last chunk of the group."

Message = namedtuple("Message", "line source time_nano partial")
Message.__doc__ = "One cut message: line bytes without the newline, source, UTC ns, Partial or None."

#: The acked transport's largest batch body (docs/acked-protocol.md): ``Stream.take_batch``'s default.
BATCH_MAX_BYTES = 262144

_MASK64 = (1 << 64) - 1
_POLL_SLICE_MS = 100


def _splitmix64(state):
    # Deterministic ids for tests and reproducible benchmarks; the C side runs the same recurrence.
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def _now_ns():
    return time.time_ns()


class _IdSource:
    """Partial group ids: 32 random bytes as 64 lowercase hex, drawn again when the first 12
    characters are all digits (Docker does the same so a short id never looks like a number)."""

    def __init__(self, seed):
        self._seed = seed
        self._state = (seed or 0) & _MASK64

    def next(self):
        while True:
            if self._seed is None:
                raw = os.urandom(32)
            else:
                words = []
                for _ in range(4):
                    self._state, out = _splitmix64(self._state)
                    words.append(out.to_bytes(8, "little"))
                raw = b"".join(words)
            text = raw.hex()
            if not text[:12].isdigit():
                return text


#: Largest accepted values of the size limits (both implementations keep them in C integers).
_LIMITS = {
    "max_line_bytes": (1, 1 << 31),
    "max_pending_bytes": (-1, 1 << 62),
    "max_frame_bytes": (0, 1 << 62),
    "max_bytes": (0, 1 << 62),
}


def check_limits(**limits):
    """Raise ConfigError unless every given limit is an int within its range (shared by both)."""
    for name, value in limits.items():
        low, high = _LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError("%s must be an integer from %d to %d, got %r" % (name, low, high, value))


def check_time(time_nano):
    """A timestamp argument: -1 (or any negative) means now; it must fit in int64."""
    if not isinstance(time_nano, int):
        raise TypeError("time_nano must be an int, got %s" % type(time_nano).__name__)
    if time_nano >= 1 << 63:
        raise OverflowError("time_nano %d does not fit in 64 signed bits" % time_nano)
    return time_nano


def _check_source(source):
    if source not in SOURCES:
        raise ConfigError("source must be 'stdout' or 'stderr', got %r" % (source,))


def _as_bytes(value, what):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ConfigError("%s must be str or bytes, got %s" % (what, type(value).__name__))


class LineCutter:
    """Cuts a byte stream of one source into messages exactly as Docker's log copier does.

    Args:
        source: ``"stdout"`` or ``"stderr"``, stamped on every message.
        max_line_bytes: the copier buffer size; a longer line is cut into chunks of exactly this
            size, each carrying partial metadata.
        id_seed: ``None`` for random partial ids; an int for a deterministic sequence (tests).

    ``feed()`` and ``close()`` return lists of :class:`Message`. Chunk boundaries of the input never
    change the output (for the same timestamps).
    """

    def __init__(self, source="stdout", max_line_bytes=DEFAULT_LINE_BUFFER, id_seed=None):
        _check_source(source)
        check_limits(max_line_bytes=max_line_bytes)
        self.source = source
        self.max_line_bytes = max_line_bytes
        self._ids = _IdSource(id_seed)
        self._held = bytearray()
        self._group_id = None
        self._ordinal = 0
        self._group_time = 0
        self._closed = False
        self.lines_total = 0
        self.bytes_total = 0
        self.partial_groups_total = 0

    @property
    def held_bytes(self):
        """Bytes of an unterminated line waiting for its newline."""
        return len(self._held)

    def feed(self, data, time_nano=-1):
        """Cut ``data``; return the messages it completes. ``time_nano`` -1 means now."""
        if self._closed:
            raise ValueError("feed() after close()")
        if data is None:
            raise TypeError("feed() needs a bytes-like object, not None")
        if check_time(time_nano) < 0:
            time_nano = _now_ns()
        out = []
        data = memoryview(data).cast("B")
        size = len(data)
        self.bytes_total += size
        limit = self.max_line_bytes
        pos = 0
        while pos < size:
            # At most limit - held bytes fit before the buffer is full: look no further for "\n".
            window = min(size - pos, limit - len(self._held))
            nl = bytes(data[pos:pos + window]).find(b"\n")
            if nl >= 0:
                self._held += data[pos:pos + nl]
                self._emit_line(out, time_nano)
                pos += nl + 1
            elif len(self._held) + window == limit:
                self._held += data[pos:pos + window]
                self._emit_chunk(out, time_nano, False)
                pos += window
            else:
                self._held += data[pos:]
                pos = size
        return out

    def close(self, time_nano=-1):
        """Flush at EOF: unterminated text goes out and its partial group is closed (last=True)."""
        out = []
        if self._closed:
            return out
        self._closed = True
        if check_time(time_nano) < 0:
            time_nano = _now_ns()
        if self._held or self._group_id is not None:
            self._emit_chunk(out, time_nano, True)
        return out

    def _emit_line(self, out, time_nano):
        line = bytes(self._held)
        self._held.clear()
        self.lines_total += 1
        if self._group_id is None:
            out.append(Message(line, self.source, time_nano, None))
            return
        self._ordinal += 1
        out.append(Message(line, self.source, self._group_time,
                           Partial(self._group_id, self._ordinal, True)))
        self._group_id = None

    def _emit_chunk(self, out, time_nano, last):
        line = bytes(self._held)
        self._held.clear()
        if self._group_id is None:
            self._group_id = self._ids.next()
            self._ordinal = 0
            self._group_time = time_nano
            self.partial_groups_total += 1
        self._ordinal += 1
        out.append(Message(line, self.source, self._group_time,
                           Partial(self._group_id, self._ordinal, last)))
        if last:
            self.lines_total += 1
            self._group_id = None


class Framer:
    """Turns messages into 3-frame ZeroMQ messages ``[tenant, service, payload]``.

    ``seed`` framing (default; the wire format of the original ZeroMQ log driver):
    payload = ``b"<container_id>: " + line``. ``msgpack`` framing: payload = a msgpack map with
    ``container_id``, ``container_name``, ``source``, ``time_nano``, ``line`` (bin), ``partial``
    (only on chunks with metadata) and ``attrs`` (only when not empty), in that key order.
    """

    def __init__(self, framing="seed", tenant="default", service="default", container_id="",
                 container_name="", attrs=None):
        if framing not in FRAMINGS:
            raise ConfigError("framing must be 'seed' or 'msgpack', got %r" % (framing,))
        self.framing = framing
        self.tenant = _as_bytes(tenant, "tenant")
        self.service = _as_bytes(service, "service")
        self.container_id = _as_bytes(container_id, "container_id").decode("utf-8", "replace")
        self.container_name = _as_bytes(container_name, "container_name").decode("utf-8", "replace")
        self.attrs = {str(k): str(v) for k, v in (attrs or {}).items()}
        self._prefix = self.container_id.encode("utf-8") + b": "

    def payload(self, msg):
        """The third frame for one :class:`Message`."""
        if self.framing == "seed":
            return self._prefix + msg.line
        record = {
            "container_id": self.container_id,
            "container_name": self.container_name,
            "source": msg.source,
            "time_nano": msg.time_nano,
            "line": msg.line,
        }
        if msg.partial is not None:
            record["partial"] = {"id": msg.partial.id, "ordinal": msg.partial.ordinal,
                                 "last": msg.partial.last}
        if self.attrs:
            record["attrs"] = self.attrs
        return msgpack.packb(record, use_bin_type=True)

    def frames(self, msg):
        return [self.tenant, self.service, self.payload(msg)]


class Stream:
    """The data plane of one source of one container: cut, frame, queue, send.

    ``feed()`` cuts a whole read buffer and appends the framed messages to a pending batch;
    ``send()`` hands the batch to a ZeroMQ socket. In blocking use call ``send()`` after every
    ``feed()``; pending memory is then bounded by one read buffer. With ``max_pending_bytes`` >= 0
    the stream behaves like Docker's non-blocking ring buffer: a message that would take the pending
    line bytes over the limit is dropped (and counted in ``dropped_total``) unless nothing is
    pending.

    Args:
        source, max_line_bytes, id_seed: as :class:`LineCutter`.
        framing, tenant, service, container_id, container_name, attrs: as :class:`Framer`.
        max_pending_bytes: -1 (default) for no limit, else the ring buffer size in line bytes.
    """

    def __init__(self, source="stdout", *, framing="seed", tenant="default", service="default",
                 container_id="", container_name="", attrs=None,
                 max_line_bytes=DEFAULT_LINE_BUFFER, id_seed=None, max_pending_bytes=-1):
        self._cutter = LineCutter(source, max_line_bytes, id_seed)
        check_limits(max_pending_bytes=max_pending_bytes)
        self._framer = Framer(framing, tenant, service, container_id, container_name, attrs)
        self.max_pending_bytes = max_pending_bytes
        self._pending = []          # [payload, line_len]
        self._pending_line_bytes = 0
        self._pid = os.getpid()
        self._cancel = False
        self.messages_total = 0
        self.sent_total = 0
        self.dropped_total = 0
        self.dropped_bytes_total = 0

    # -- counters -----------------------------------------------------------------------------
    source = property(lambda self: self._cutter.source)
    framing = property(lambda self: self._framer.framing)
    tenant = property(lambda self: self._framer.tenant)
    service = property(lambda self: self._framer.service)
    lines_total = property(lambda self: self._cutter.lines_total)
    bytes_total = property(lambda self: self._cutter.bytes_total)
    partial_groups_total = property(lambda self: self._cutter.partial_groups_total)
    held_bytes = property(lambda self: self._cutter.held_bytes)

    @property
    def pending_messages(self):
        return len(self._pending)

    @property
    def pending_bytes(self):
        """Line bytes queued and not yet sent (the ring-buffer accounting unit, as Docker)."""
        return self._pending_line_bytes

    def stats(self):
        """Counters as a dict (names follow ``<thing>_<event>_total``)."""
        return {
            "lines_total": self.lines_total,
            "bytes_total": self.bytes_total,
            "partial_groups_total": self.partial_groups_total,
            "messages_total": self.messages_total,
            "sent_total": self.sent_total,
            "dropped_total": self.dropped_total,
            "dropped_bytes_total": self.dropped_bytes_total,
            "pending_messages": self.pending_messages,
        }

    # -- data plane ---------------------------------------------------------------------------
    def feed(self, data, time_nano=-1):
        """Cut and frame one read buffer. Returns how many messages were queued."""
        return self._queue(self._cutter.feed(data, time_nano))

    def close(self, time_nano=-1):
        """Flush unterminated text at EOF. Returns how many messages were queued."""
        return self._queue(self._cutter.close(time_nano))

    def _queue(self, messages):
        queued = 0
        limit = self.max_pending_bytes
        for msg in messages:
            size = len(msg.line)
            if limit >= 0 and self._pending and self._pending_line_bytes + size > limit:
                self.dropped_total += 1
                self.dropped_bytes_total += size
                continue
            self._pending.append((self._framer.payload(msg), size))
            self._pending_line_bytes += size
            self.messages_total += 1
            queued += 1
        return queued

    def take(self):
        """Remove and return the pending messages as lists of three frames (embedding, tests)."""
        out = [[self._framer.tenant, self._framer.service, p] for p, _ in self._pending]
        self.clear()
        return out

    def take_batch(self, max_bytes=BATCH_MAX_BYTES):
        """Remove pending messages from the head of the queue as one acked-transport batch body.

        The body is each payload as a 4-byte big-endian length and its bytes
        (docs/acked-protocol.md). Messages are taken while the body stays within ``max_bytes``,
        but always at least one when any is pending: a larger one goes alone. They leave the
        pending queue as if sent, but ``sent_total`` is not changed: the transport counts them
        when the collector acknowledges them.

        Args:
            max_bytes: the largest body, an int >= 0 (default :data:`BATCH_MAX_BYTES`).

        Returns:
            ``(body, records, line_bytes)``: ``(b"", 0, 0)`` when nothing is pending.

        Raises:
            ConfigError: ``max_bytes`` is not an int from 0 to 2**62.
        """
        check_limits(max_bytes=max_bytes)
        pending = self._pending
        parts = []
        size = line_bytes = taken = 0
        for payload, line_len in pending:
            if taken and size + 4 + len(payload) > max_bytes:
                break
            parts.append(len(payload).to_bytes(4, "big"))
            parts.append(payload)
            size += 4 + len(payload)
            line_bytes += line_len
            taken += 1
        del pending[:taken]
        self._pending_line_bytes -= line_bytes
        return b"".join(parts), taken, line_bytes

    def clear(self):
        """Forget the pending messages (they are not counted as sent)."""
        self._pending = []
        self._pending_line_bytes = 0

    def cancel(self):
        """Make a blocking ``send()`` in another thread return at its next wake-up (<= 100 ms)."""
        self._cancel = True

    def send(self, socket, block=True):
        """Send pending messages on a pyzmq socket; return how many went out.

        With ``block=False`` it stops at the first message the socket will not take (high-water
        mark, no peer) and keeps the rest pending. With ``block=True`` it waits for the socket,
        waking every 100 ms so Ctrl-C, signals and ``cancel()`` are noticed.

        Raises:
            TransportError: closed socket, use from a forked child, or a send error.
        """
        if socket.closed:
            raise TransportError("cannot send: the zmq socket is closed")
        if os.getpid() != self._pid:
            raise TransportError("cannot send: this socket belongs to the parent process (fork)")
        tenant, service = self._framer.tenant, self._framer.service
        sent = 0
        pending = self._pending
        try:
            while sent < len(pending):
                payload, size = pending[sent]
                try:
                    # EAGAIN can only come on the first frame; after it the message is committed.
                    socket.send(tenant, zmq.SNDMORE | zmq.DONTWAIT, copy=True)
                except zmq.Again:
                    if not block:
                        break
                    if self._cancel:
                        self._cancel = False    # consumed: the next send() blocks again
                        break
                    socket.poll(_POLL_SLICE_MS, zmq.POLLOUT)
                    continue
                socket.send(service, zmq.SNDMORE, copy=True)
                socket.send(payload, 0, copy=True)
                self._pending_line_bytes -= size
                sent += 1
        except zmq.ZMQError as exc:
            raise TransportError("zmq send failed: %s" % exc.strerror, exc.errno) from None
        finally:
            if sent:
                del pending[:sent]
                self.sent_total += sent
        return sent


#: Why a received message was skipped: wrong frame count, a frame over ``max_frame_bytes``, a seed
#: payload without ``"<container_id>: "``, msgpack that does not decode, or msgpack that is not a
#: zeroline record. ``Receiver.malformed_reasons`` counts each.
MALFORMED_REASONS = ("frames", "frame_size", "seed", "msgpack", "record")

_RECORD_HEAD = b"\xaccontainer_id"      # fixstr(12) "container_id": the first key of a record


def _malformed(reason, text):
    exc = ProtocolError(text)
    exc.reason = reason
    return exc


def decode_payload(payload):
    """Decode the third frame of a message of either framing.

    Returns:
        ``("seed", {"container_id": str, "line": bytes})`` or ``("msgpack", record)`` with the
        record's dict as msgpack-python unpacks it (``str`` keys and values, ``line`` bytes).

    Raises:
        ProtocolError: with ``reason`` set to ``"seed"``, ``"msgpack"`` or ``"record"`` (see
            :data:`MALFORMED_REASONS`).
    """
    # A zeroline msgpack record opens with a fixmap of 5-7 entries whose first key is
    # "container_id"; a seed payload opens with the container id itself (hex, or a user's id).
    if payload[:1] in (b"\x85", b"\x86", b"\x87") and payload[1:14] == _RECORD_HEAD:
        try:
            record = msgpack.unpackb(payload, raw=False)
        except Exception as exc:   # ExtraData, FormatError, UnicodeDecodeError, unhashable keys...
            raise _malformed("msgpack", "bad msgpack record: %s" % exc) from None
        if not isinstance(record, dict) or not isinstance(record.get("line"), bytes):
            raise _malformed("record", "msgpack record has no binary 'line'")
        if "partial" in record:
            partial = record["partial"]
            if not (isinstance(partial, dict) and isinstance(partial.get("id"), str)
                    and isinstance(partial.get("ordinal"), int)
                    and isinstance(partial.get("last"), bool)):
                raise _malformed("record", "msgpack record has a bad 'partial' map")
        return "msgpack", record
    cid, sep, line = payload.partition(b": ")
    if not sep:
        raise _malformed("seed", "seed payload has no '<container_id>: ' prefix")
    return "seed", {"container_id": cid.decode("utf-8", "replace"), "line": line}


def render_text(payload):
    """The text output line of one payload, with its ``"\\n"``; None for a partial chunk.

    Seed payloads are written as received; msgpack records as ``<container_id> <source>: <line>``.
    A partial chunk (a record with ``partial``) is not rendered: the caller reassembles it.

    Raises:
        ProtocolError: as :func:`decode_payload`.
    """
    framing, record = decode_payload(payload)
    if framing == "seed":
        return bytes(payload) + b"\n"
    if "partial" in record:
        return None
    return (("%s %s: " % (record["container_id"], record.get("source", ""))).encode("utf-8")
            + record["line"] + b"\n")


class Receiver:
    """Receives 3-frame messages in batches (the collector's and benchmarks' receive path).

    ``recv()`` waits up to ``timeout_ms`` for the first message, then takes whatever else is queued,
    up to ``max_messages``. Messages whose frame count is not 3, or with a frame over
    ``max_frame_bytes``, are counted in ``malformed_total`` and skipped (never in
    ``messages_total``). :meth:`take_rendered` also counts payloads it cannot render there (those
    were counted in ``messages_total`` when received). ``malformed_reasons`` splits the count by
    :data:`MALFORMED_REASONS`.
    """

    def __init__(self, max_frame_bytes=64 * 1024 * 1024):
        check_limits(max_frame_bytes=max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self._pid = os.getpid()
        self._batch = []
        self._malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.messages_total = 0
        self.bytes_total = 0
        self.malformed_total = 0

    @property
    def pending_messages(self):
        return len(self._batch)

    @property
    def malformed_reasons(self):
        """``{reason: count}`` for every reason in :data:`MALFORMED_REASONS` (a copy)."""
        return dict(self._malformed)

    def _count_malformed(self, reason):
        self._malformed[reason] += 1
        self.malformed_total += 1

    def recv(self, socket, max_messages=4096, timeout_ms=100):
        """Receive up to ``max_messages``; return how many well-formed ones were added."""
        if socket.closed:
            raise TransportError("cannot receive: the zmq socket is closed")
        if os.getpid() != self._pid:
            raise TransportError("cannot receive: this socket belongs to the parent process (fork)")
        got = 0
        if not socket.poll(timeout_ms, zmq.POLLIN):
            return 0
        while got < max_messages:
            try:
                frames = socket.recv_multipart(zmq.DONTWAIT, copy=True)
            except zmq.Again:
                break
            if len(frames) != 3:
                self._count_malformed("frames")
                continue
            if any(len(f) > self.max_frame_bytes for f in frames):
                self._count_malformed("frame_size")
                continue
            self._batch.append(frames)
            self.messages_total += 1
            self.bytes_total += len(frames[2])
            got += 1
        return got

    def add_batch(self, tenant, service, body):
        """Add the records of an acked-transport batch body as received 3-frame messages.

        Each record becomes the message ``[tenant, service, record]``, exactly as if
        :meth:`recv` had received it: ``messages_total``, ``bytes_total`` and every ``take*``
        method see no difference. Record contents are not checked here (:meth:`take_rendered`
        counts bad ones, as for received messages).

        Returns:
            The number of records added (>= 1).

        Raises:
            ProtocolError: with ``reason`` ``"batch"``, and nothing added, when the body is
                malformed (see :func:`split_batch`), a record is over ``max_frame_bytes``, or
                ``tenant`` or ``service`` is.
        """
        tenant = bytes(tenant)
        service = bytes(service)
        records = split_batch(body, self.max_frame_bytes)
        if len(tenant) > self.max_frame_bytes or len(service) > self.max_frame_bytes:
            raise _malformed("batch", _BATCH_ERRORS[_BATCH_BAD_DEST])
        self._batch.extend([tenant, service, record] for record in records)
        self.messages_total += len(records)
        self.bytes_total += sum(len(record) for record in records)
        return len(records)

    def render_batch(self, tenant, service, body):
        """``add_batch(tenant, service, body)`` then ``take_rendered()``: the collector's acked
        path in one call (the compiled core renders the records where they are in ``body``).

        Returns and raises as those two (a malformed body adds and returns nothing).
        """
        self.add_batch(tenant, service, body)
        return self.take_rendered()

    def take(self):
        """Remove and return the received messages as lists of three frames."""
        out, self._batch = self._batch, []
        return out

    def take_payloads(self):
        """Remove the received messages and return their third frames, each followed by "\\n"."""
        out = b"".join(f[2] + b"\n" for f in self._batch)
        self._batch = []
        return out

    def take_rendered(self):
        """Remove the received messages and return them rendered as text, grouped by destination.

        Returns:
            A list of ``(tenant, service, data, held)`` tuples (``bytes``; ``held`` may be None).
            ``data`` is the :func:`render_text` lines of consecutive messages to one
            ``(tenant, service)``, in arrival order; ``held`` is the payload of a partial chunk
            that came after them, for the caller to reassemble, and ends that run: the
            destination's later messages start a new tuple. Tuples are in the order their first
            message arrived, so handling them in list order keeps every destination's order.
            Payloads that cannot be rendered are counted as malformed and left out.
        """
        entries = []
        open_runs = {}      # (tenant, service) -> index of its run still taking lines
        for tenant, service, payload in self._batch:
            try:
                line = render_text(payload)
            except ProtocolError as exc:
                self._count_malformed(exc.reason)
                continue
            key = (tenant, service)
            index = open_runs.get(key)
            if index is None:
                index = open_runs[key] = len(entries)
                entries.append([tenant, service, [], None])
            if line is None:
                entries[index][3] = payload
                del open_runs[key]
            else:
                entries[index][2].append(line)
        self._batch = []
        return [(tenant, service, b"".join(lines), held) for tenant, service, lines, held in entries]


def count_newlines(data):
    """How many ``\n`` bytes ``data`` (any buffer) holds (the compiled core counts 8 at a
    time)."""
    return bytes(data).count(b"\n")


# -- The acked transport's messages (docs/acked-protocol.md) -------------------------------------

#: tune_allocator(): glibc's mallopt parameters and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
ALLOCATOR_TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
_allocator_tuned = None


def tune_allocator():
    """Let glibc serve the acked transport's batch buffers from the heap and keep what is freed.

    Batches are 256 KiB bodies (the forwarder's take_batch, the window holding them, the
    collector's libzmq receive buffers and rendered lines): over glibc's default mmap threshold
    (128 KiB, raised only as far as the largest block freed so far), and the heap is trimmed
    back whenever 2x that is free at its top. So each batch came in freshly mapped pages,
    zero-filled by the kernel on first touch: ~0.1 s of page faults in each process per 2 M
    lines of 100 bytes. With blocks under 4 MiB from the heap and the heap trimmed only past
    32 MiB free, pages are reused; peak RSS does not grow (the peak is the same working set).

    Process-wide, once; a no-op where ``mallopt`` is missing (musl, macOS). Returns True when
    set.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        try:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_THRESHOLD_BYTES)
                                and mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_THRESHOLD_BYTES))
    return _allocator_tuned
# Plain Python in both implementations: one call per batch or ack, never per line.

#: Frame 0 of a batch message and of an acknowledgement: message kind and protocol version.
BATCH_KIND = b"zlb1"
ACK_KIND = b"zla1"
#: A stream id is 1 to this many bytes.
STREAM_ID_MAX_BYTES = 255
_SEQ_MAX = (1 << 64) - 1

# Why a batch body is malformed; the compiled Receiver.add_batch reports the same texts by index.
_BATCH_BAD_EMPTY, _BATCH_BAD_HEADER, _BATCH_BAD_LENGTH, _BATCH_BAD_SIZE, _BATCH_BAD_DEST = range(5)
_BATCH_ERRORS = (
    "batch body is empty",
    "batch body ends inside a record's 4-byte length",
    "batch record length runs past the end of the body",
    "batch record over max_frame_bytes",
    "batch tenant or service over max_frame_bytes",
)


def split_batch(body, max_record_bytes=None):
    """The records of a batch body (each a 4-byte big-endian length, then that many bytes).

    Args:
        body: bytes-like.
        max_record_bytes: None, or the largest record accepted.

    Returns:
        A non-empty list of ``bytes``, one per record.

    Raises:
        ProtocolError: with ``reason`` ``"batch"``: an empty body, a length running past the end
            (trailing bytes included), or a record over ``max_record_bytes``.
    """
    body = memoryview(body).cast("B")
    size = len(body)
    if not size:
        raise _malformed("batch", _BATCH_ERRORS[_BATCH_BAD_EMPTY])
    records = []
    pos = 0
    while pos < size:
        if size - pos < 4:
            raise _malformed("batch", _BATCH_ERRORS[_BATCH_BAD_HEADER])
        length = int.from_bytes(body[pos:pos + 4], "big")
        pos += 4
        if length > size - pos:
            raise _malformed("batch", _BATCH_ERRORS[_BATCH_BAD_LENGTH])
        if max_record_bytes is not None and length > max_record_bytes:
            raise _malformed("batch", _BATCH_ERRORS[_BATCH_BAD_SIZE])
        records.append(bytes(body[pos:pos + length]))
        pos += length
    return records


def _stream_id(stream_id, reason):
    stream_id = memoryview(stream_id).tobytes()     # bytes-like only: bytes(5) is five zeros
    if not 1 <= len(stream_id) <= STREAM_ID_MAX_BYTES:
        raise _malformed(reason, "stream id must be 1 to %d bytes, got %d"
                         % (STREAM_ID_MAX_BYTES, len(stream_id)))
    return stream_id


def _seq_bytes(seq, low, reason):
    if not isinstance(seq, int) or isinstance(seq, bool) or not low <= seq <= _SEQ_MAX:
        raise _malformed(reason, "seq must be an int from %d to 2**64-1, got %r" % (low, seq))
    return seq.to_bytes(8, "big")


def _seq_value(frame, low, reason):
    if len(frame) != 8:
        raise _malformed(reason, "seq must be 8 bytes, got %d" % len(frame))
    seq = int.from_bytes(frame, "big")
    if seq < low:
        raise _malformed(reason, "seq must be >= %d, got %d" % (low, seq))
    return seq


def encode_batch_message(tenant, service, stream_id, seq, body):
    """The 6 frames of a batch message: ``[b"zlb1", tenant, service, stream_id, seq, body]``.

    Args:
        tenant, service: bytes-like (or str, UTF-8 encoded).
        stream_id: 1 to 255 bytes.
        seq: the batch's sequence number, 1 to 2**64-1.
        body: a batch body as :meth:`Stream.take_batch` returns it (not checked here).

    Returns:
        A list of 6 ``bytes``.

    Raises:
        ProtocolError: with ``reason`` ``"batch"``: a bad stream id or seq.
    """
    return [BATCH_KIND, _as_bytes(tenant, "tenant"), _as_bytes(service, "service"),
            _stream_id(stream_id, "batch"), _seq_bytes(seq, 1, "batch"), bytes(body)]


def decode_batch_message(frames):
    """Check the frames of a batch message (without the ROUTER's routing id) and unpack them.

    Only the frame level is checked; the body's records are checked by
    :meth:`Receiver.add_batch` (or :func:`split_batch`).

    Returns:
        ``(tenant, service, stream_id, seq, body)``: bytes, seq an int.

    Raises:
        ProtocolError: with ``reason`` ``"batch"``: not 6 frames, kind not ``zlb1``, stream id
            empty or over 255 bytes, seq not 8 bytes or 0.
    """
    if len(frames) != 6:
        raise _malformed("batch", "a batch message has 6 frames, got %d" % len(frames))
    kind, tenant, service, stream_id, seq, body = (bytes(f) for f in frames)
    if kind != BATCH_KIND:
        raise _malformed("batch", "not a batch message: kind %r" % (kind[:16],))
    return tenant, service, _stream_id(stream_id, "batch"), _seq_value(seq, 1, "batch"), body


def encode_ack(stream_id, seq):
    """The 3 frames of a cumulative acknowledgement: ``[b"zla1", stream_id, seq]``.

    Args:
        stream_id: 1 to 255 bytes.
        seq: every batch of the stream up to this one is written; 0 means none is.

    Raises:
        ProtocolError: with ``reason`` ``"ack"``: a bad stream id or seq.
    """
    return [ACK_KIND, _stream_id(stream_id, "ack"), _seq_bytes(seq, 0, "ack")]


def decode_ack(frames):
    """Check and unpack an acknowledgement (without a routing id).

    Returns:
        ``(stream_id, seq)``: bytes and int.

    Raises:
        ProtocolError: with ``reason`` ``"ack"``: not 3 frames, kind not ``zla1``, stream id
            empty or over 255 bytes, seq not 8 bytes.
    """
    if len(frames) != 3:
        raise _malformed("ack", "an ack has 3 frames, got %d" % len(frames))
    kind, stream_id, seq = (bytes(f) for f in frames)
    if kind != ACK_KIND:
        raise _malformed("ack", "not an ack: kind %r" % (kind[:16],))
    return _stream_id(stream_id, "ack"), _seq_value(seq, 0, "ack")


def send_body(socket, tenant, service, body, offset=0):
    """Send a batch body's records, from byte ``offset``, as 3-frame messages
    ``[tenant, service, record]`` without waiting; returns the offset of the first record not
    sent (``len(body)`` when all went). A pub/push sink sends its spooled batches with it.

    Raises:
        ProtocolError: ``reason == "batch"``, a malformed body (nothing is sent).
        TransportError: a send error.
    """
    split_batch(body)
    tenant, service = _as_bytes(tenant, "tenant"), _as_bytes(service, "service")
    size = len(body)
    if not isinstance(offset, int) or not 0 <= offset <= size:
        raise ConfigError("offset %r is past the end of the body (%d bytes)" % (offset, size))
    view = memoryview(body).cast("B")
    try:
        while offset < size:
            length = int.from_bytes(view[offset:offset + 4], "big")
            try:
                socket.send(tenant, zmq.SNDMORE | zmq.DONTWAIT, copy=True)
            except zmq.Again:
                break
            socket.send(service, zmq.SNDMORE, copy=True)
            socket.send(view[offset + 4:offset + 4 + length], 0, copy=True)
            offset += 4 + length
    except zmq.ZMQError as exc:
        raise TransportError("zmq send failed: %s" % exc.strerror, exc.errno) from None
    return offset
