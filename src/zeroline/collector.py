"""The log processing center: binds PULL/SUB sockets, receives batches, writes tenant/service files."""

import base64
import collections
import hashlib
import json
import os
import re
import threading
import time

import zmq

from . import core
from ._core_py import MALFORMED_REASONS, decode_payload
from .errors import ConfigError, ProtocolError, TransportError

FORMATS = ("text", "json")
#: How long the chunks of a long line wait for the rest of their group before they are written
#: one per line as they are (a forwarder that died mid-line never sends the last chunk).
REASSEMBLY_WAIT_S = 5.0
#: Chunk bytes held for reassembly at most; past it the oldest groups are written as they are.
MAX_REASSEMBLY_BYTES = 64 * 1024 * 1024
#: Log files kept open at once; the least recently written one is closed first.
MAX_OPEN_FILES = 256
#: Files per destination with --max-size: the live .log and .log.1 ... .log.4 (Docker's ``local``
#: driver keeps 5 too; its json-file counts max-file the same way).
DEFAULT_MAX_FILES = 5
#: Messages taken from a socket in one receive call (one render and one write per destination).
BATCH_MESSAGES = 16384
#: Poll timeout of the receive loop: how late a stop(), a signal or a stats tick can be noticed.
POLL_MS = 100

# Bytes that stand for themselves in a file name; every other byte becomes %XX.
_PLAIN = re.compile(rb"[A-Za-z0-9._-]+")
#: Longest escaped name part: room for ".log.<n>" under the usual 255-byte name limit.
MAX_NAME_BYTES = 200


def safe_path_part(value):
    """A tenant or service value as one harmless file name: it cannot leave the directory.

    Bytes other than ASCII letters, digits, ``.``, ``_`` and ``-`` become ``%XX`` (``/``, ``\\``,
    NUL, control characters, ``%`` itself, non-ASCII), ``.`` and ``..`` become ``%2E`` and
    ``%2E%2E``, the empty value becomes ``%``. Distinct values give distinct names; a name longer
    than :data:`MAX_NAME_BYTES` is cut and ends with ``%%`` and a hash of the whole value.

    Args:
        value: ``bytes`` (as received) or ``str`` (encoded as UTF-8).
    """
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if raw in (b"", b".", b".."):
        return "%2E" * len(raw) if raw else "%"
    if _PLAIN.fullmatch(raw):
        text = raw.decode("ascii")
    else:
        parts = []
        pos = 0
        for match in _PLAIN.finditer(raw):
            parts.extend("%%%02X" % b for b in raw[pos:match.start()])
            parts.append(match.group().decode("ascii"))
            pos = match.end()
        parts.extend("%%%02X" % b for b in raw[pos:])
        text = "".join(parts)
    if len(text) > MAX_NAME_BYTES:
        text = text[:MAX_NAME_BYTES - 34] + "%%" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return text


def _text_prefix(record):
    # As _core_py.render_text: "<container_id> <source>: ".
    return ("%s %s: " % (record["container_id"], record.get("source", ""))).encode("utf-8")


def render_json(tenant, service, payload):
    """One message as a JSON object line with every field the framing carries, and ``"\\n"``.

    Keys: ``tenant``, ``service``, ``framing`` (``seed``/``msgpack``), then the record's fields
    (seed: ``container_id``, ``line``). The line is UTF-8 text when it is valid, else it is given
    base64-encoded under ``line_base64``.

    Raises:
        ProtocolError: with ``reason`` (see :data:`zeroline._core_py.MALFORMED_REASONS`).
    """
    framing, record = decode_payload(payload)
    out = {"tenant": tenant.decode("utf-8", "replace"),
           "service": service.decode("utf-8", "replace"), "framing": framing}
    out.update(record)
    line = out.pop("line")
    try:
        out["line"] = line.decode("utf-8")
    except UnicodeDecodeError:
        out["line_base64"] = base64.b64encode(line).decode("ascii")
    try:
        text = json.dumps(out, ensure_ascii=False)
    except (TypeError, ValueError):     # e.g. binary values a zeroline record never carries
        exc = ProtocolError("record has values JSON cannot carry")
        exc.reason = "record"
        raise exc from None
    return text.encode("utf-8") + b"\n"


class LogFile:
    """One ``<service>.log``, appended to, rotated by size as Docker's json-file driver does.

    Before each line is written, a file already at ``max_size`` bytes or more is rotated:
    ``.log.(N-2)`` becomes ``.log.(N-1)`` (the oldest is dropped) ... ``.log`` becomes ``.log.1``,
    and a new ``.log`` starts. So a file may pass ``max_size`` by at most one line. With
    ``max_files`` 1 the file is truncated instead. Writes are unbuffered: what was written is in the
    file.

    Args:
        path: the ``.log`` file.
        max_size: bytes, or None for no rotation.
        max_files: files kept, the live one included (>= 1).

    Raises:
        OSError: the file cannot be opened, written or renamed.
    """

    def __init__(self, path, max_size=None, max_files=DEFAULT_MAX_FILES):
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self.rotations_total = 0
        self._fd = -1
        self._open()

    def _open(self):
        # O_NOFOLLOW: a symlink put where a log file goes is not followed out of OUT.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self._fd).st_size

    def write(self, data):
        """Append whole lines (``data`` ends with ``"\\n"``), rotating between lines as needed."""
        size = len(data)
        if self.max_size is None:
            self._write_all(data)
            self.size += size
            return
        view = memoryview(data)
        pos = 0
        while pos < size:
            if self.size >= self.max_size:
                self.rotate()
            # Lines starting before the limit go in this file: up to the end of the line that
            # holds the file's max_size-th byte.
            end = data.find(b"\n", pos + self.max_size - self.size - 1) + 1
            if end == 0:
                end = size
            self._write_all(view[pos:end])
            self.size += end - pos
            pos = end

    def _write_all(self, data):
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def rotate(self):
        """Start a new file now (see the class description)."""
        os.close(self._fd)
        self._fd = -1
        if self.max_files < 2:
            os.truncate(self.path, 0)
        else:
            for n in range(self.max_files - 2, 0, -1):
                older = "%s.%d" % (self.path, n)
                if os.path.lexists(older):
                    os.replace(older, "%s.%d" % (self.path, n + 1))
            if os.path.lexists(self.path):
                os.replace(self.path, self.path + ".1")
        self.rotations_total += 1
        self._open()

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Group:
    """The chunks of one long line waiting for their last chunk."""

    __slots__ = ("since", "tenant", "service", "prefix", "chunks", "size")

    def __init__(self, since, tenant, service, prefix):
        self.since = since
        self.tenant = tenant
        self.service = service
        self.prefix = prefix
        self.chunks = []
        self.size = 0


class Collector:
    """Receives 3-frame messages of either framing and writes them out.

    Text format goes through the compiled, batched ``Receiver.take_rendered``; the chunks of a
    long line (msgpack framing) are joined back into one line when the last arrives, or written one
    per line after :data:`REASSEMBLY_WAIT_S` (or when :data:`MAX_REASSEMBLY_BYTES` are held, or at
    close). JSON format decodes every message in Python.

    Args:
        out_dir: write ``OUT/<tenant>/<service>.log`` (names made safe by :func:`safe_path_part`);
            or None with ``out`` set.
        out: a binary file object to write every line to instead (``--stdout``).
        fmt: ``"text"`` or ``"json"``.
        context: a pyzmq context (default: a new one, terminated by :meth:`close`).
        max_size: rotate a file that reached this many bytes (None: never); ``out_dir`` only.
        max_files: files kept per destination when rotating, the live one included.
        max_open_files: log files kept open at once (least recently written closed first).
        batch_messages: most messages taken from a socket per receive call.

    Raises:
        ConfigError: a bad argument.

    Counters: ``messages_total``, ``bytes_total`` (payload bytes), ``malformed_total`` and
    ``malformed_reasons``, ``partial_expired_total`` (groups written without their last chunk).
    """

    def __init__(self, out_dir=None, out=None, fmt="text", context=None, max_size=None,
                 max_files=DEFAULT_MAX_FILES, max_open_files=MAX_OPEN_FILES,
                 batch_messages=BATCH_MESSAGES):
        if fmt not in FORMATS:
            raise ConfigError("--format must be text or json, got %r" % (fmt,))
        if (out_dir is None) == (out is None):
            raise ConfigError("give exactly one of --out DIR or --stdout")
        if max_size is not None and (out_dir is None or max_size <= 0):
            raise ConfigError("--max-size must be positive and needs --out DIR")
        if max_files < 1:
            raise ConfigError("--max-files must be at least 1, got %d" % max_files)
        if max_open_files < 1 or batch_messages < 1:
            raise ConfigError("max_open_files and batch_messages must be at least 1")
        if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConfigError("--out %s is not a directory" % out_dir)
        self.out_dir = out_dir
        self.out = out
        self.fmt = fmt
        self.max_size = max_size
        self.max_files = max_files
        self.max_open_files = max_open_files
        self.batch_messages = batch_messages
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        self.sockets = []
        self.endpoints = []
        self._receiver = core.Receiver()
        self._files = collections.OrderedDict()     # (tenant, service) -> LogFile, LRU first
        self._paths = set()
        self._stop = threading.Event()
        self._groups = {}       # (tenant, service, partial id) -> _Group, oldest first
        self._held_bytes = 0
        self._malformed = dict.fromkeys(MALFORMED_REASONS, 0)    # found here (JSON, reassembly)
        self.partial_expired_total = 0
        self.first_message_at = None     # time.monotonic() of the first and last non-empty batch
        self.last_message_at = None
        self._tick = (time.monotonic(), 0)   # time and messages_total at the last interval line

    messages_total = property(lambda self: self._receiver.messages_total)
    bytes_total = property(lambda self: self._receiver.bytes_total)

    @property
    def malformed_total(self):
        return self._receiver.malformed_total + sum(self._malformed.values())

    @property
    def malformed_reasons(self):
        """``{reason: count}`` over :data:`zeroline._core_py.MALFORMED_REASONS`."""
        counts = self._receiver.malformed_reasons
        for reason, count in self._malformed.items():
            counts[reason] += count
        return counts

    def bind(self, endpoint, kind="pull"):
        """Bind a PULL (``kind="pull"``, for push forwarders) or SUB (``"sub"``, subscribed to
        everything, for pub forwarders) socket. The receive high-water mark is unlimited: libzmq was
        seen to lose queued messages when a sender disconnects while the receiver is at its HWM.

        Raises:
            TransportError: the endpoint cannot be bound.
        """
        sock = self.context.socket(zmq.PULL if kind == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError("cannot bind %s: %s" % (endpoint, exc.strerror), exc.errno,
                                 endpoint) from None
        self.sockets.append(sock)
        self.endpoints.append(endpoint)
        return sock

    def stop(self):
        """Ask :meth:`run` to return after its current batch (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, until_messages=None, stats_interval_s=0, report=None):
        """Receive and write until :meth:`stop`, or until ``until_messages`` were received.

        Args:
            until_messages: return once this many messages were received (None: no limit).
            stats_interval_s: when > 0, call ``report(line)`` with :meth:`interval_line` this often.
            report: a callable taking one line of text.
        """
        if not self.sockets:
            raise ConfigError("bind at least one endpoint before run()")
        recv = self._receiver.recv
        write = self._write_text if self.fmt == "text" else self._write_json
        sockets = list(self.sockets)
        poller = None
        if len(sockets) > 1:
            poller = zmq.Poller()
            for sock in sockets:
                poller.register(sock, zmq.POLLIN)
        batch = self.batch_messages
        next_tick = None
        if stats_interval_s > 0 and report is not None:
            self._tick = (time.monotonic(), self.messages_total)
            next_tick = self._tick[0] + stats_interval_s
        while not self._stop.is_set():
            if until_messages is not None and self.messages_total >= until_messages:
                break
            if poller is None:
                got = recv(sockets[0], batch, POLL_MS)
            else:
                got = 0
                for sock, _ in poller.poll(POLL_MS):
                    got += recv(sock, batch, 0)
            now = time.monotonic()
            if got:
                if self.first_message_at is None:
                    self.first_message_at = now
                self.last_message_at = now
                write()
                if self.out is not None:
                    self.out.flush()
            if self._groups:
                self._expire_groups(time.monotonic() - REASSEMBLY_WAIT_S)
            if next_tick is not None and now >= next_tick:
                report(self.interval_line(now))
                next_tick = now + stats_interval_s
        self.flush()

    # -- writing ----------------------------------------------------------------------------------
    def _write_text(self):
        for tenant, service, data, held in self._receiver.take_rendered():
            if data:
                self._emit(tenant, service, data)
            if held is not None:
                self._reassemble(tenant, service, held)

    def _write_json(self):
        runs = {}       # per destination, in arrival order
        for tenant, service, payload in self._receiver.take():
            try:
                line = render_json(tenant, service, payload)
            except ProtocolError as exc:
                self._malformed[exc.reason] += 1
                continue
            runs.setdefault((tenant, service), []).append(line)
        for (tenant, service), lines in runs.items():
            self._emit(tenant, service, b"".join(lines))

    def _emit(self, tenant, service, data):
        if self.out is not None:
            self.out.write(data)
        else:
            self._file(tenant, service).write(data)

    def _reassemble(self, tenant, service, payload):
        # Text output shows a long line as one line once all its chunks are here.
        try:
            _, record = decode_payload(payload)
            partial = record["partial"]
        except (ProtocolError, KeyError):       # take_rendered only hands over valid chunks
            self._malformed["record"] += 1
            return
        key = (tenant, service, partial["id"])
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(time.monotonic(), tenant, service,
                                               _text_prefix(record))
        line = record["line"]
        group.chunks.append(line)
        group.size += len(line)
        self._held_bytes += len(line)
        if partial["last"]:
            del self._groups[key]
            self._held_bytes -= group.size
            self._emit(tenant, service, group.prefix + b"".join(group.chunks) + b"\n")
        elif self._held_bytes > MAX_REASSEMBLY_BYTES:
            self._expire_groups(float("inf"), until_bytes=MAX_REASSEMBLY_BYTES)

    def _expire_groups(self, older_than, until_bytes=-1):
        # Oldest first (dicts keep insertion order): write each group's chunks as they are.
        while self._groups and self._held_bytes > until_bytes:
            key = next(iter(self._groups))
            group = self._groups[key]
            if group.since > older_than:
                break
            del self._groups[key]
            self._held_bytes -= group.size
            self.partial_expired_total += 1
            self._emit(group.tenant, group.service,
                       b"".join(group.prefix + chunk + b"\n" for chunk in group.chunks))

    def _file(self, tenant, service):
        key = (tenant, service)
        handle = self._files.get(key)
        if handle is not None:
            self._files.move_to_end(key)
            return handle
        if len(self._files) >= self.max_open_files:
            self._files.popitem(last=False)[1].close()
        folder = os.path.join(self.out_dir, safe_path_part(tenant))
        path = os.path.join(folder, safe_path_part(service) + ".log")
        try:
            handle = LogFile(path, self.max_size, self.max_files)
        except FileNotFoundError:
            # First file of this tenant. (Trying the open first saves a mkdir and a stat on
            # every reopen when more destinations are written than files may stay open.)
            os.makedirs(folder, exist_ok=True)
            handle = LogFile(path, self.max_size, self.max_files)
        self._files[key] = handle
        self._paths.add(handle.path)
        return handle

    def paths(self):
        """Files written so far."""
        return sorted(self._paths)

    def flush(self):
        """Push buffered stdout output out (log files are written unbuffered)."""
        if self.out is not None:
            self.out.flush()

    def close(self):
        """Write incomplete partial groups as they are, close files, sockets and an own context."""
        try:
            if self._groups:
                self._expire_groups(float("inf"))
            self.flush()
        finally:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
            for sock in self.sockets:
                sock.close(linger=0)
            self.sockets = []
            if self._own_context:
                self.context.term()
                self._own_context = False

    # -- counters ---------------------------------------------------------------------------------
    def _malformed_text(self):
        reasons = ", ".join("%s %d" % kv for kv in self.malformed_reasons.items() if kv[1])
        return "%d malformed%s" % (self.malformed_total, " (%s)" % reasons if reasons else "")

    def interval_line(self, now=None):
        """One line for ``--stats-interval``: totals and the message rate since the last line."""
        now = time.monotonic() if now is None else now
        since, seen = self._tick
        rate = (self.messages_total - seen) / (now - since) if now > since else 0.0
        self._tick = (now, self.messages_total)
        return "%d messages, %d bytes, %s, %.0f messages/s" % (
            self.messages_total, self.bytes_total, self._malformed_text(), rate)

    def stats_line(self):
        """One line for ``--stats``: totals, and the rate from the first to the last batch."""
        line = "received %d messages (%d payload bytes), %s, %d partial groups incomplete" % (
            self.messages_total, self.bytes_total, self._malformed_text(),
            self.partial_expired_total)
        if self.first_message_at is not None and self.last_message_at > self.first_message_at:
            span = self.last_message_at - self.first_message_at
            line += "; %.3f s first to last batch, %.0f messages/s" % (
                span, self.messages_total / span)
        return line
