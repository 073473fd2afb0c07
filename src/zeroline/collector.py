"""The log processing center: binds PULL/SUB/ROUTER sockets, receives batches, writes tenant/service files."""

import base64
import collections
import fcntl
import hashlib
import itertools
import json
import os
import re
import sys
import threading
import time
import zlib

import zmq
from zmq.utils import z85

from . import core
from ._core_py import (
    ACK_KIND,
    MALFORMED_REASONS,
    decode_batch_message,
    decode_payload,
    encode_ack,
    tune_allocator,
)
from .errors import ConfigError, ProtocolError, TransportError
from .transport.sink import exposed_tcp_host
from .transport.spool import BackgroundSync

#: bytes.count(b"\n") goes byte by byte: 12% of the acked path's time on 100-byte lines.
_count_newlines = getattr(core._impl, "count_newlines", None) or (lambda data: data.count(b"\n"))

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
#: Socket kinds of :meth:`Collector.bind`.
KINDS = ("pull", "sub", "acked")
#: Acked batches taken from one ROUTER socket per receive round, and their body bytes at most:
#: a round ends with one fsync (``--fsync batch``), one journal append and the acks.
ACKED_ROUND_BATCHES = 1024
ACKED_ROUND_BYTES = 16 * 1024 * 1024
#: ``--fsync``: ``batch`` before every ack, ``interval`` at most every FSYNC_INTERVAL_S, ``never``.
FSYNC_MODES = ("batch", "interval", "never")
FSYNC_INTERVAL_S = 1.0
#: After a failed write (full disk...): retry this often, and repeat the report this often.
WRITE_RETRY_S = 0.5
WRITE_REPORT_S = 10.0
#: At stop (SIGTERM): keep taking what libzmq already holds for this long at most (or until a
#: round finds nothing), and wait this long at most for a failing write to succeed.
STOP_DRAIN_S = 1.0
STOP_WRITE_WAIT_S = 10.0
#: A drain round ends when nothing arrived for this long (what the kernel still buffers for the
#: socket reaches libzmq's queue within it); and the last acks get this long to leave at close.
STOP_DRAIN_POLL_MS = 20
ACK_LINGER_MS = 500
#: The acked transport's journal of written sequence numbers, in OUT/.zeroline/.
STATE_DIR = ".zeroline"
JOURNAL_NAME = "acked-streams"
#: The journal is rewritten compactly (one entry per stream) past this size, or twice its
#: compacted size when that is larger.
JOURNAL_COMPACT_BYTES = 1024 * 1024
#: Distinct tenant/service destinations at most (``--max-streams``); lines for further ones go to
#: OUT/_overflow/_overflow.log and are counted in ``overflow_total``.
DEFAULT_MAX_STREAMS = 10000
OVERFLOW_NAME = "_overflow"
#: Acked stream ids (instance/container/source of a forwarder) whose de-duplication state is kept
#: (about 300 bytes each in memory and 60 in the journal). Past it, the least recently active
#: settled streams are forgotten, oldest first: memory stays bounded whatever peers send, and a
#: forgotten stream that resends an old batch gets it written again (a duplicate, never a loss).
MAX_ACKED_STREAMS = 100_000
#: Largest message part libzmq accepts (ZMQ_MAXMSGSIZE; a peer sending more is disconnected) and
#: largest frame the receiver takes: a 16 MiB line (the largest zmq-line-buffer) plus room for
#: its record, attrs and the acked batch around it.
MAX_MESSAGE_BYTES = 17 * 1024 * 1024
#: Receive high-water mark of the acked ROUTER socket, in messages per connected peer. Measured
#: with libzmq 4.3.5 (200,000 messages, the sender closing while the receiver sat at RCVHWM 1000):
#: PULL over ipc:// lost 431 of them, ROUTER lost none over tcp and ipc (PULL over tcp: none).
#: So PULL and SUB keep an unlimited HWM (0), bounded by MAXMSGSIZE and by the collector reading
#: faster than it is sent; the ROUTER's acked peers resend whatever is lost anyway.
ACKED_RCVHWM_MSGS = 1000
#: Received-but-unwritten bytes one receive call may take: the next call takes fewer messages
#: when the last ones were large, so a round holds about this much whatever the peers send.
RECEIVE_BUDGET_BYTES = 64 * 1024 * 1024
#: Each partial group held for reassembly counts this much besides its chunk bytes, so a flood of
#: empty chunks with distinct ids is bounded by MAX_REASSEMBLY_BYTES too.
GROUP_OVERHEAD_BYTES = 512
#: Mode of ipc:// socket files made by bind (``--ipc-mode``).
DEFAULT_IPC_MODE = 0o660
#: How often the --curve-allow directory is looked at for changes.
CURVE_ALLOW_POLL_S = 1.0
#: Reasons counted by the collector itself besides the receiver's: a malformed acked batch, and an
#: acknowledgement sent to the collector (a peer wired the wrong way round).
_REASONS = MALFORMED_REASONS + tuple(r for r in ("batch", "ack") if r not in MALFORMED_REASONS)

# Bytes that stand for themselves in a file name; every other byte becomes %XX.
_PLAIN = re.compile(rb"[A-Za-z0-9._-]+")
#: Longest escaped name part: room for ".log.<n>" under the usual 255-byte name limit.
MAX_NAME_BYTES = 200
#: Destinations counted one by one in ``written_by_destination`` (metrics labels); the rest
#: share the key ``("other", "other")``.
MAX_COUNTED_DESTINATIONS = 100


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


def _ipc_path(endpoint):
    # The socket file of an ipc:// endpoint (None: another transport, or Linux's abstract
    # namespace "ipc://@name", which has no file).
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc" or not path or path.startswith("@") or path == "*":
        return None
    return path


class CurveAllowList:
    """CURVE for the collector's sockets: its key pair, and the ZAP handler of ``--curve-allow``.

    The allow-list is a directory of public certificates (``*.key``, as ``zeroline keygen``
    writes them), enforced by pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator` (ZAP, RFC 27,
    domain ``*``). It is read again on :meth:`reload` (SIGHUP) and when the directory or one of
    its ``.key`` files changes (looked at every :data:`CURVE_ALLOW_POLL_S`). A list that cannot be
    read keeps the one loaded before, and says why. A refused key is counted
    (``refused_total``) and reported once per key.

    Args:
        context: the collector's pyzmq context (the ZAP handler must live in it).
        secret_key: ``(public, secret)`` Z85 keys of the collector
            (:func:`zeroline.keys.load_secret_key`).
        allow_dir: the allow-list directory, or None: any client with a valid handshake is
            accepted (said in a warning).
        warn: a callable taking one line.

    Raises:
        ConfigError: ``allow_dir`` cannot be read, or holds a certificate that is not one.
    """

    def __init__(self, context, secret_key, allow_dir=None, warn=None):
        self.public_key, self.secret_key = secret_key
        self.allow_dir = allow_dir
        self.warn = warn or _warn_stderr
        self.refused_total = 0
        self.keys_total = 0
        self._refused_keys = set()
        self._lock = threading.Lock()
        self._auth = None
        self._watcher = None
        self._wake = threading.Event()
        self._closed = False
        self._signature = None
        if allow_dir is None:
            self.warn("warning: CURVE without --curve-allow: any client with a valid handshake "
                      "is accepted (only the traffic is encrypted)")
            return
        certs = self._load()            # raises ConfigError at start: fail before binding
        from zmq.auth.thread import ThreadAuthenticator

        owner = self

        class _Authenticator(ThreadAuthenticator):
            async def _authenticate_curve(self, domain, client_key):
                allowed, reason = await super()._authenticate_curve(domain, client_key)
                if not allowed:
                    owner._refused(client_key)
                return allowed, reason

        self._auth = _Authenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=allow_dir)
        self._auth.certs["*"] = certs   # the list checked above, even if the dir changed since
        self._watcher = threading.Thread(target=self._watch, name="zeroline-curve-allow",
                                         daemon=True)
        self._watcher.start()

    def setup(self, sock):
        """Make ``sock`` a CURVE server (before bind)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)

    def _refused(self, client_key):
        # On the ZAP thread: count, and say it once per key (a refused client keeps retrying).
        key = z85.encode(client_key).decode("ascii")
        with self._lock:
            self.refused_total += 1
            if key in self._refused_keys or len(self._refused_keys) >= 10000:
                return
            self._refused_keys.add(key)
        self.warn("refused a CURVE client: key %s is not in %s" % (key, self.allow_dir))

    def _state(self):
        # What a change of the allow-list changes: the directory, and each .key file.
        entries = [str(os.stat(self.allow_dir).st_mtime_ns)]
        with os.scandir(self.allow_dir) as it:
            for entry in it:
                if entry.name.endswith(".key"):
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    entries.append("%s %d %d %d" % (entry.name, st.st_mtime_ns, st.st_size,
                                                    st.st_ino))
        return sorted(entries)

    def _load(self):
        from zmq.auth.certs import load_certificates

        try:
            signature = self._state()
            certs = load_certificates(self.allow_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError("cannot read --curve-allow %s: %s"
                              % (self.allow_dir, getattr(exc, "strerror", None) or exc)) from None
        self._signature = signature
        self.keys_total = len(certs)
        return certs

    def reload(self):
        """Read the allow-list again now (safe in a signal handler: it only wakes the watcher)."""
        self._wake.set()

    def _watch(self):
        while True:
            woken = self._wake.wait(CURVE_ALLOW_POLL_S)
            self._wake.clear()
            if self._closed:
                return
            try:
                changed = woken or self._state() != self._signature
            except OSError:
                changed = True
            if not changed:
                continue
            try:
                certs = self._load()
            except ConfigError as exc:
                self.warn("error: %s; keeping the %d keys loaded before" % (exc, self.keys_total))
                try:
                    self._signature = self._state()     # said once per change, not every second
                except OSError:
                    pass
                continue
            self._auth.certs["*"] = certs
            with self._lock:
                self._refused_keys.clear()      # a key refused again after a change is said again
            self.warn("CURVE allow-list %s: %d keys" % (self.allow_dir, len(certs)))

    def close(self):
        self._closed = True
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


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
        sync_on_close: fsync a file written since its last :meth:`sync` before closing it (at
            rotation too), so that a later fsync of the live file covers every line.

    Raises:
        OSError: the file cannot be opened, written or renamed. A failed :meth:`write` sets
            ``written`` on the exception: how many bytes of ``data`` are in the file (the caller
            continues from there, so no line is written twice or torn), and ``filename``.
    """

    def __init__(self, path, max_size=None, max_files=DEFAULT_MAX_FILES, sync_on_close=False):
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self.sync_on_close = sync_on_close
        self.rotations_total = 0
        self.torn_bytes = 0     # bytes of a broken last line cut away at open (a crash)
        self.dirty = False          # written since the last sync()
        self._fd = -1
        self._done = 0
        self._open()

    def _open(self):
        # O_NOFOLLOW: a symlink put where a log file goes is not followed out of OUT.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self._fd).st_size
        if self.size:
            self._cut_torn_tail()

    def _cut_torn_tail(self):
        # Every write ends with "\n": a file that does not was cut by a crash (a write that a
        # SIGKILL or power cut stopped halfway). The broken line is removed, so the next line
        # does not glue onto it; an acked batch it belonged to was not recorded as written and
        # is written again when its forwarder resends it.
        with open(self.path, "rb") as f:
            end = self.size
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            start = end
            while start > 0:
                step = min(start, 65536)
                f.seek(start - step)
                block = f.read(step)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    start = start - step + nl + 1
                    break
                start -= step
        os.truncate(self.path, start)
        self.torn_bytes = end - start
        self.size = start

    def write(self, data):
        """Append whole lines (``data``: bytes ending with ``"\\n"``), rotating between lines as
        needed."""
        size = len(data)
        view = memoryview(data)
        self._done = 0
        try:
            if self._fd < 0:            # a rotation that could not open the new file
                self._open()
            if self.max_size is None:
                self._write_all(view, size)
                return
            while self._done < size:
                if self.size >= self.max_size:
                    self.rotate()
                # Lines starting before the limit go in this file: up to the end of the line that
                # holds the file's max_size-th byte.
                end = data.find(b"\n", self._done + self.max_size - self.size - 1) + 1
                if end == 0:
                    end = size
                self._write_all(view, end)
        except OSError as exc:
            exc.written = self._done
            if exc.filename is None:
                exc.filename = self.path
            raise

    def _write_all(self, view, end):
        # os.write may write less than asked (a disk filling up): continue from where it stopped.
        while self._done < end:
            count = os.write(self._fd, view[self._done:end])
            self._done += count
            self.size += count
            self.dirty = True

    def sync(self):
        """fsync what was written (nothing to do when the file is clean or closed)."""
        if self.dirty and self._fd >= 0:
            os.fsync(self._fd)
        self.dirty = False

    def take_for_sync(self):
        """A duplicate of the descriptor when written since the last sync (None otherwise), for
        a background fsync: it syncs the same file even if this one is closed or rotated
        meanwhile. Counts as synced from here on (the caller restores ``dirty`` on failure)."""
        if not self.dirty or self._fd < 0:
            return None
        self.dirty = False
        return os.dup(self._fd)

    def rotate(self):
        """Start a new file now (see the class description)."""
        self._close()
        if self.max_files < 2:
            os.truncate(self.path, 0)
        else:
            for n in range(self.max_files - 2, 0, -1):
                older = "%s.%d" % (self.path, n)
                if os.path.lexists(older):
                    os.replace(older, "%s.%d" % (self.path, n + 1))
            if os.path.lexists(self.path):
                os.replace(self.path, self.path + ".1")
        self.size = 0           # a failed open below is retried by the next write, not rotated again
        self.rotations_total += 1
        self._open()

    def _close(self):
        if self._fd >= 0:
            if self.sync_on_close and self.dirty:
                try:
                    os.fsync(self._fd)
                except OSError:         # the lines were written; fsync errors are the kernel's to log
                    pass
            self.dirty = False
            os.close(self._fd)
            self._fd = -1

    def close(self):
        self._close()


class _Group:
    """The chunks of one long line waiting for their last chunk.

    ``origin`` is ``(stream, seq)`` when the group's first chunk came in acked batch ``seq`` of
    ``stream`` (an :class:`_AckedStream`), else None.
    """

    __slots__ = ("since", "tenant", "service", "prefix", "chunks", "size", "origin")

    def __init__(self, since, tenant, service, prefix, origin=None):
        self.since = since
        self.tenant = tenant
        self.service = service
        self.prefix = prefix
        self.chunks = []
        self.size = 0
        self.origin = origin


class _AckedStream:
    """What the collector knows of one acked stream (docs/acked-protocol.md, "Collector rules").

    - ``accepted``: the highest seq taken in order; its lines were handed to the writers. A batch
      with ``seq <= accepted`` is a duplicate, ``seq > accepted + 1`` a gap.
    - ``written``: the highest seq whose lines are all in the files. It trails ``accepted`` while
      a batch's lines are not in the files yet: a long line still waiting for its last chunk
      (``holds``: group key -> seq of the batch where the group started), or rendered lines held
      in memory because a write failed (``io_hold``: the first such batch's seq). It is then one
      below the lowest of those seqs, and catches up when they are written.
    - ``journaled``: ``written`` as last appended to the journal; acknowledgements carry it, so
      an ack never says more than a restarted collector would know.
    """

    __slots__ = ("stream_id", "accepted", "written", "journaled", "holds", "io_hold", "peer")

    def __init__(self, stream_id, written, journaled=None):
        self.stream_id = stream_id
        self.accepted = written
        self.written = written
        self.journaled = journaled
        self.holds = {}
        self.io_hold = None
        self.peer = None        # (socket, routing id) of the last batch: where a later ack goes

    def update(self):
        """Recompute ``written``; True when it moved."""
        low = self.accepted
        if self.holds:
            low = min(low, min(self.holds.values()) - 1)
        if self.io_hold is not None:
            low = min(low, self.io_hold - 1)
        if low > self.written:
            self.written = low
            return True
        return False


_JOURNAL_HEADER = b"zeroline acked-streams 1\n"


def _journal_entry(stream_id, written):
    # "<stream id hex> <written> <crc32 of the two, 8 hex>\n": a torn or garbled entry fails
    # the check and is ignored when the journal is loaded.
    text = b"%s %d" % (stream_id.hex().encode("ascii"), written)
    return b"%s %08x\n" % (text, zlib.crc32(text))


def load_journal(path):
    """Read an acked-streams journal.

    Returns:
        ``(streams, bad)``: ``{stream_id: written}`` (the highest value recorded per stream), and
        the number of entries ignored (a torn last entry, garbled ones). A missing file is empty.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, 0
    streams = {}
    bad = 0
    lines = data.split(b"\n")
    if lines[-1]:           # no newline at the end: torn by a crash mid-append
        bad += 1
    for line in lines[:-1]:
        if not line or line == _JOURNAL_HEADER[:-1]:
            continue
        try:
            hex_id, written, crc = line.split(b" ")
            if int(crc, 16) != zlib.crc32(hex_id + b" " + written) or len(crc) != 8:
                raise ValueError(line)
            stream_id = bytes.fromhex(hex_id.decode("ascii"))
            value = int(written)
        except (ValueError, UnicodeDecodeError):
            bad += 1
            continue
        if value >= streams.get(stream_id, -1):
            streams[stream_id] = value
    return streams, bad


class AckJournal:
    """The collector's record of ``written`` per acked stream: ``OUT/.zeroline/acked-streams``.

    Append-only: an entry per stream whose ``written`` moved, after each batch (after each receive
    round's fsync under ``--fsync batch``; see :func:`_journal_entry`); the highest value per
    stream counts. It is rewritten compactly (a
    temporary file renamed over it) when opened and when it grows past
    :data:`JOURNAL_COMPACT_BYTES`. A second collector on the same OUT is refused (a lock).

    Args:
        out_dir: the collector's OUT.
        fsync: fsync the compacted file and its directory (False under ``--fsync never``).

    Raises:
        ConfigError: another collector holds the lock.
        OSError: the directory or the journal cannot be created or read.
    """

    def __init__(self, out_dir, fsync=True):
        self.directory = os.path.join(out_dir, STATE_DIR)
        self.path = os.path.join(self.directory, JOURNAL_NAME)
        self.fsync = fsync
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._lock = os.open(os.path.join(self.directory, "lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ConfigError("another collector uses %s (its acked journal is locked)"
                              % out_dir) from None
        self.streams, self.bad_entries_total = load_journal(self.path)
        self._fd = -1
        self._tail = b""        # appended but not written yet (a write failed part-way)
        self.dirty = False
        self.size = 0
        self._compacted_size = 0
        self.compact(self.streams)
        if self._fd < 0:        # compaction failed (full disk): append to the file as it is
            self._open()

    def _open(self):
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self.size = os.fstat(self._fd).st_size

    @property
    def pending(self):
        """True while entries wait for a failed write to be retried."""
        return bool(self._tail)

    def append(self, data=b""):
        """Append entries (and what a failed write left); True once all of it is in the file.

        Raises:
            OSError: the write failed (what was not written is kept and retried next time;
                ``filename`` is the journal).
        """
        self._tail += data
        try:
            while self._tail:
                count = os.write(self._fd, self._tail)
                self._tail = self._tail[count:]
                self.size += count
                self.dirty = True
        except OSError as exc:
            exc.filename = self.path
            raise
        return True

    def sync(self):
        if self.dirty and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                exc.filename = self.path
                raise
        self.dirty = False

    def needs_compaction(self):
        return not self._tail and self.size > max(JOURNAL_COMPACT_BYTES, 2 * self._compacted_size)

    def compact(self, streams):
        """Rewrite the journal as one entry per stream of ``{stream_id: written}``.

        A failure (full disk) leaves the journal as it was: it keeps growing until a later try
        succeeds. Returns True when it was rewritten.
        """
        temp = self.path + ".tmp"
        data = _JOURNAL_HEADER + b"".join(_journal_entry(sid, value)
                                          for sid, value in streams.items())
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
            return False
        if self.fsync:
            self._sync_directory()
        if self._fd >= 0:
            os.close(self._fd)
        self._open()
        self._compacted_size = self.size
        self.dirty = False
        return True

    def _sync_directory(self):
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self):
        for fd in (self._fd, self._lock):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock = -1


def path_of(owner):
    # A sync job's owner: a LogFile, the AckJournal or a directory path.
    return owner if isinstance(owner, str) else owner.path


class Collector:
    """Receives 3-frame messages of either framing, and acked batches, and writes them out.

    Text format goes through the compiled, batched ``Receiver.take_rendered``; the chunks of a
    long line (msgpack framing) are joined back into one line when the last arrives, or written one
    per line after :data:`REASSEMBLY_WAIT_S` (or when :data:`MAX_REASSEMBLY_BYTES` are held, or at
    close). JSON format decodes every message in Python.

    Acked batches (docs/acked-protocol.md) go through ``Receiver.add_batch`` and the same writers,
    so they give the same lines as the msgpack framing. Each batch's new ``written`` is appended
    to the journal once its lines are written; each receive round ends in :meth:`_commit`: fsync
    (``fsync="batch"``, and only then the journal), then one ack per (peer, stream).

    A write that fails (full disk, ...) never stops the collector: the rendered bytes not written
    are kept in memory and retried every :data:`WRITE_RETRY_S`; meanwhile nothing more is
    received (libzmq queues; acked peers get no acks, so their window fills) and ``warn`` is
    called with ``cannot write PATH: REASON`` once and every :data:`WRITE_REPORT_S`.

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
        fsync: ``"batch"`` (written files and the journal are fsynced before acks are sent),
            ``"interval"`` (at most every :data:`FSYNC_INTERVAL_S`; acks do not wait) or
            ``"never"``.
        warn: a callable taking one line of text, for write errors (default: stderr).
        max_streams: distinct tenant/service files at most; lines for others go to
            ``OUT/_overflow/_overflow.log`` (counted in ``overflow_total``).
        max_acked_streams: acked stream ids whose state is kept (:data:`MAX_ACKED_STREAMS`);
            past it the least recently active settled ones are forgotten
            (``acked_streams_forgotten_total``).
        curve_secret_key: ``(public, secret)`` Z85 keys: CURVE on every bind (None: off).
        curve_allow: directory of allowed client public keys (:class:`CurveAllowList`).
        ipc_mode: mode of ``ipc://`` socket files.

    Raises:
        ConfigError: a bad argument; an unreadable ``curve_allow``.

    Counters: ``messages_total``, ``bytes_total`` (payload bytes), ``malformed_total`` and
    ``malformed_reasons``, ``partial_expired_total`` (groups written without their last chunk),
    ``acked_batches_total``, ``acked_lines_total`` (records of accepted batches),
    ``duplicate_batches_total``, ``gap_batches_total``, ``acks_sent_total``,
    ``acked_streams_forgotten_total``, ``overflow_total``, ``write_errors_total`` (error episodes), ``unwritten_bytes`` (given up at close).
    """

    def __init__(self, out_dir=None, out=None, fmt="text", context=None, max_size=None,
                 max_files=DEFAULT_MAX_FILES, max_open_files=MAX_OPEN_FILES,
                 batch_messages=BATCH_MESSAGES, fsync="interval", warn=None,
                 max_streams=DEFAULT_MAX_STREAMS, curve_secret_key=None, curve_allow=None,
                 ipc_mode=DEFAULT_IPC_MODE, max_acked_streams=MAX_ACKED_STREAMS):
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
        if fsync not in FSYNC_MODES:
            raise ConfigError("--fsync must be one of %s, got %r" % (", ".join(FSYNC_MODES), fsync))
        if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConfigError("--out %s is not a directory" % out_dir)
        if max_streams < 1:
            raise ConfigError("--max-streams must be at least 1, got %d" % max_streams)
        if max_acked_streams < 1:
            raise ConfigError("max_acked_streams must be at least 1, got %d" % max_acked_streams)
        if not 0 <= ipc_mode <= 0o777:
            raise ConfigError("--ipc-mode must be an octal mode from 0 to 777, got %o" % ipc_mode)
        if curve_allow is not None and curve_secret_key is None:
            raise ConfigError("--curve-allow needs --curve-secret-key (CURVE on)")
        self.out_dir = out_dir
        self.out = out
        self.fmt = fmt
        self.max_size = max_size
        self.max_files = max_files
        self.max_open_files = max_open_files
        self.batch_messages = batch_messages
        self.fsync = fsync
        self.warn = warn if warn is not None else _warn_stderr
        self.max_streams = max_streams
        self.ipc_mode = ipc_mode
        self.overflow_total = 0         # lines written to _overflow (past max_streams)
        self.max_acked_streams = max_acked_streams
        self.acked_streams_forgotten_total = 0
        self._dests = set()             # (tenant, service) given their own file so far
        self._recv_limit = batch_messages   # messages per receive call (RECEIVE_BUDGET_BYTES)
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        self.curve = None
        if curve_secret_key is not None:
            try:
                self.curve = CurveAllowList(self.context, curve_secret_key, curve_allow,
                                            self.warn)
            except BaseException:
                if self._own_context:
                    self.context.term()
                raise
        self.sockets = []
        self.endpoints = []
        self._acked_sockets = set()
        self._receiver = core.Receiver(max_frame_bytes=MAX_MESSAGE_BYTES)
        self._files = collections.OrderedDict()     # (tenant, service) -> LogFile, LRU first
        self._paths = set()
        self._stop = threading.Event()
        self._groups = {}       # (tenant, service, partial id) -> _Group, oldest first
        self._held_bytes = 0
        self._malformed = dict.fromkeys(_REASONS, 0)    # found here (JSON, reassembly, batches)
        self.partial_expired_total = 0
        self.first_message_at = None     # time.monotonic() of the first and last non-empty batch
        self.last_message_at = None
        self._tick = (time.monotonic(), 0)   # time and messages_total at the last interval line
        # Durability.
        self._unsynced = set()          # LogFiles written since the last fsync
        self._unsynced_dirs = set()     # directories that got a new file since then
        self._synced_at = time.monotonic()
        # --fsync interval: the fsyncs on their own thread. Acknowledgements under interval never
        # wait for one, so nothing needs them on the receive thread, where they held it for the
        # disk's time (~0.25 s of every 2 M lines of 100 bytes, a third of the collector's time).
        self._syncer = BackgroundSync("zeroline-fsync") if fsync == "interval" else None
        # Write errors: rendered bytes not written yet, in order, as (tenant, service, bytes).
        self._pending = collections.deque()
        self._retry_at = 0.0
        self._error_since = None        # monotonic time the current error episode began
        self._error_reported_at = 0.0
        self.write_errors_total = 0
        self.unwritten_bytes = 0
        # The acked transport.
        self._journal = None
        self._streams = {}              # stream id -> _AckedStream
        self._origin = None             # (stream, seq) of the batch being written
        self._moved = set()             # streams whose `written` may have moved this round
        self._unjournaled = set()       # streams whose `written` is not in the journal yet
        self._acks_due = {}             # (socket, routing id, stream id) -> _AckedStream
        self._io_held = set()           # streams with an io_hold
        self.acked_batches_total = 0
        self.acked_lines_total = 0
        self.duplicate_batches_total = 0
        self.gap_batches_total = 0
        self.acks_sent_total = 0
        # (tenant, service) -> [lines, bytes] written; counted once per destination run of a
        # batch, never per line (read by zeroline.metrics).
        self.written_by_destination = {}
        self.write_error = None         # "PATH: REASON" while writes fail (/healthz)

    messages_total = property(lambda self: self._receiver.messages_total)
    curve_refused_total = property(
        lambda self: 0 if self.curve is None else self.curve.refused_total)
    bytes_total = property(lambda self: self._receiver.bytes_total)

    @property
    def malformed_total(self):
        return self._receiver.malformed_total + sum(self._malformed.values())

    @property
    def malformed_reasons(self):
        """``{reason: count}`` over :data:`zeroline._core_py.MALFORMED_REASONS` and the acked
        transport's ``batch`` and ``ack``."""
        counts = self._receiver.malformed_reasons
        for reason, count in self._malformed.items():
            counts[reason] = counts.get(reason, 0) + count
        return counts

    @property
    def journal_path(self):
        """The acked journal's path (None until an acked endpoint is bound)."""
        return None if self._journal is None else self._journal.path

    def written(self, stream_id):
        """The highest seq of ``stream_id`` whose lines are all written (None: unknown stream)."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.written

    def bind(self, endpoint, kind="pull"):
        """Bind a PULL (``kind="pull"``, for push forwarders), SUB (``"sub"``, subscribed to
        everything, for pub forwarders) or ROUTER (``"acked"``, for acked forwarders) socket. The
        receive high-water mark of PULL and SUB is unlimited: libzmq (4.3.5, measured) loses
        queued messages when a sender disconnects while the receiver is at its HWM; the ROUTER's
        is :data:`ACKED_RCVHWM_MSGS` (its peers resend). Message parts over
        :data:`MAX_MESSAGE_BYTES` make libzmq drop the connection. With CURVE (``curve_secret_key``)
        every socket is a CURVE server; an ``ipc://`` socket file gets mode ``ipc_mode``; a
        ``tcp://`` bind without CURVE on a non-loopback address is warned about. The first acked
        endpoint opens the journal in ``OUT/.zeroline/``.

        Raises:
            ConfigError: an unknown kind; ``"acked"`` without ``out_dir``; the journal is locked
                by another collector.
            TransportError: the endpoint cannot be bound.
        """
        if kind not in KINDS:
            raise ConfigError("socket kind must be one of %s, got %r" % (", ".join(KINDS), kind))
        if kind == "acked" and self._journal is None:
            if self.out_dir is None:
                raise ConfigError("--bind-acked needs --out DIR (its journal lives there), "
                                  "not --stdout")
            self._journal = AckJournal(self.out_dir, fsync=self.fsync != "never")
            tune_allocator()        # 256 KiB batches: see there
            for stream_id, written in self._journal.streams.items():
                self._streams[stream_id] = _AckedStream(stream_id, written, written)
        sock = self.context.socket({"pull": zmq.PULL, "sub": zmq.SUB, "acked": zmq.ROUTER}[kind])
        # Memory: a largest message part, and a finite receive HWM where that loses nothing
        # (see ACKED_RCVHWM_MSGS for the measurement, and MAX_MESSAGE_BYTES).
        sock.setsockopt(zmq.RCVHWM, ACKED_RCVHWM_MSGS if kind == "acked" else 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.setup(sock)
        elif exposed_tcp_host(endpoint) is not None:
            self.warn("warning: %s takes lines without CURVE: anyone who reaches it can write "
                      "into any tenant's files (--curve-secret-key, --curve-allow)" % endpoint)
        if kind == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        elif kind == "acked":
            # An ack to a peer that is gone (or whose queue is full) is dropped, never raised.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        ipc_path = _ipc_path(endpoint)
        # An ipc socket file is created with 0777 minus the umask: with a umask at least as
        # narrow as --ipc-mode during the bind (libzmq binds in this thread), the file is never
        # wider than asked, even before the chmod that sets it exactly. (The umask is the
        # process's: a file another thread creates meanwhile gets the narrower mode too.)
        old_umask = os.umask(0o777) if ipc_path else None
        try:
            if old_umask is not None:
                os.umask(old_umask | (0o777 & ~self.ipc_mode))
            sock.bind(endpoint)
            if ipc_path:
                os.chmod(ipc_path, self.ipc_mode)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError("cannot bind %s: %s" % (endpoint, exc.strerror), exc.errno,
                                 endpoint) from None
        except OSError as exc:
            sock.close(linger=0)
            raise TransportError("cannot set the mode of %s: %s" % (ipc_path, exc.strerror),
                                 exc.errno, endpoint) from None
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        self.sockets.append(sock)
        self.endpoints.append(endpoint)
        if kind == "acked":
            self._acked_sockets.add(sock)
        return sock

    def stop(self):
        """Ask :meth:`run` to return after its current batch (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, until_messages=None, stats_interval_s=0, report=None):
        """Receive and write until :meth:`stop`, or until ``until_messages`` were received.

        After :meth:`stop`, what libzmq already holds is still taken and written, for at most
        :data:`STOP_DRAIN_S` (until a round finds nothing), and acknowledged.

        Args:
            until_messages: return once this many messages were received (None: no limit).
            stats_interval_s: when > 0, call ``report(line)`` with :meth:`interval_line` this often.
            report: a callable taking one line of text.
        """
        if not self.sockets:
            raise ConfigError("bind at least one endpoint before run()")
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        next_tick = None
        if stats_interval_s > 0 and report is not None:
            self._tick = (time.monotonic(), self.messages_total)
            next_tick = self._tick[0] + stats_interval_s
        while not self._stop.is_set():
            if until_messages is not None and self.messages_total >= until_messages:
                break
            if self._pending:
                # A write failed: receive nothing until it succeeds.
                self._retry_pending()
                if self._pending:
                    self._stop.wait(min(POLL_MS / 1000, max(0.0, self._retry_at
                                                             - time.monotonic())))
            else:
                self._round(poller, POLL_MS)
            now = time.monotonic()
            if self._groups:
                self._expire_groups(now - REASSEMBLY_WAIT_S)
            self._commit(now)
            if next_tick is not None and now >= next_tick:
                report(self.interval_line(now))
                next_tick = now + stats_interval_s
        if self._stop.is_set():
            # SIGTERM: what libzmq already received is written too, not dropped with the socket.
            deadline = time.monotonic() + STOP_DRAIN_S
            while not self._pending and time.monotonic() < deadline:
                got = self._round(poller, STOP_DRAIN_POLL_MS)
                self._commit(time.monotonic())
                if not got:
                    break
        self.flush()

    def _round(self, poller, timeout_ms):
        # One receive round: PULL/SUB messages first (the receiver's batch must be empty before
        # an acked batch is added to it), then acked batches one at a time.
        recv = self._receiver.recv
        got = 0
        acked = []
        for sock, _ in poller.poll(timeout_ms):
            if sock in self._acked_sockets:
                acked.append(sock)
            else:
                before = self._receiver.bytes_total
                count = recv(sock, self._recv_limit, 0)
                got += count
                if count:
                    # RECEIVE_BUDGET_BYTES: as many messages of the last ones' size as fit.
                    size = self._receiver.bytes_total - before
                    self._recv_limit = max(16, min(self.batch_messages,
                                                   RECEIVE_BUDGET_BYTES * count // max(size, 1)))
        if got:
            self._write_entries(self._render())
        for sock in acked:
            got += self._take_batches(sock)
        if got:
            now = time.monotonic()
            if self.first_message_at is None:
                self.first_message_at = now
            self.last_message_at = now
            if self.out is not None:
                self.out.flush()
        return got

    # -- the acked transport ----------------------------------------------------------------------
    def _take_batches(self, sock):
        # One Python call per batch (hundreds of lines), bounded per round so that acks go out.
        taken = size = 0
        while taken < ACKED_ROUND_BATCHES and size < ACKED_ROUND_BYTES and not self._pending:
            try:
                # copy=False: the body is rendered from libzmq's own buffer (render_batch), not
                # copied into a bytes object first (~0.1 s of page faults and memcpy per 2 M
                # lines of 100 bytes).
                frames = sock.recv_multipart(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                break
            taken += 1
            size += len(frames[-1])
            self._batch(sock, frames)
            if self.fsync != "batch":
                # Record `written` right after each batch's lines, not at the end of the round:
                # a collector killed in between writes at most that one batch again when it is
                # resent. (Under --fsync batch the journal must wait for the round's fsync.)
                self._update_streams()
                self._record(False)
        return taken

    def _batch(self, sock, frames):
        # docs/acked-protocol.md, "Collector rules", for one message [routing id, 6 frames].
        routing_id = frames[0].bytes
        if len(frames) > 1 and frames[1].bytes == ACK_KIND:
            self._malformed["ack"] += 1
            return
        try:
            # Frames 1-5 are small (copied); the body stays libzmq's buffer.
            tenant, service, stream_id, seq, _ = decode_batch_message(
                [f.bytes for f in frames[1:6]] + [b""] * max(0, len(frames) - 6))
        except ProtocolError as exc:
            self._malformed[exc.reason] += 1
            return
        body = frames[6].buffer
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._streams[stream_id] = stream   # the most recently active last (see _forget)
        if stream is not None and seq != stream.accepted + 1:
            # Rule 2 (seq <= accepted: a resend of a batch taken already, written or held) or
            # rule 4 (a gap): not written; the ack says where the stream stands.
            if seq <= stream.accepted:
                self.duplicate_batches_total += 1
            else:
                self.gap_batches_total += 1
            stream.peer = (sock, routing_id)
            self._acks_due[(sock, routing_id, stream_id)] = stream
            return
        # Rule 3: an unknown stream, or the next batch.
        malformed = self.malformed_total
        messages = self._receiver.messages_total
        try:
            if self.fmt == "text":
                entries = self._receiver.render_batch(tenant, service, body)
            else:
                self._receiver.add_batch(tenant, service, body)
                entries = self._render()
        except ProtocolError as exc:
            self._malformed[exc.reason] += 1
            return
        records = self._receiver.messages_total - messages
        if self.malformed_total != malformed:
            return          # a record that is not a zeroline record (counted): rule 1
        if stream is None:
            stream = self._streams[stream_id] = _AckedStream(stream_id, seq - 1)
        stream.accepted = seq
        stream.peer = (sock, routing_id)
        self._origin = (stream, seq)
        try:
            self._write_entries(entries)
        finally:
            self._origin = None
        self.acked_batches_total += 1
        self.acked_lines_total += records
        self._moved.add(stream)
        self._acks_due[(sock, routing_id, stream_id)] = stream

    def _commit(self, now, final=False):
        # The end of a round: fsync -> journal -> acks, in that order (docs/acked-protocol.md).
        self._update_streams()
        if self.fsync == "batch" or final:
            if not self._sync(final):
                return              # files not on disk: recording or acking them would lie
        elif self._syncer is not None:
            self._sync_failed(self._syncer.result())
            if now - self._synced_at >= FSYNC_INTERVAL_S and not self._syncer.busy:
                self._sync_background()
        if self._journal is None or not self._record(self.fsync == "batch" or final):
            return                  # the entries wait in the journal's tail; acks wait too
        if len(self._streams) > self.max_acked_streams:
            # Before the acks: a peer that sees an ack sees the table as it is after the round.
            self._forget()
        if self._acks_due:
            for (sock, routing_id, stream_id), stream in self._acks_due.items():
                if sock.closed:
                    continue
                try:
                    sock.send_multipart([routing_id] + encode_ack(stream_id, stream.journaled or 0),
                                        zmq.DONTWAIT)
                    self.acks_sent_total += 1
                except zmq.ZMQError:        # the peer's queue is full: a later ack covers it
                    pass
            self._acks_due.clear()

    def _forget(self):
        # Past max_acked_streams: drop the least recently active streams that are settled
        # (everything accepted is written, journaled and acked); a busy one is kept for later.
        excess = len(self._streams) - self.max_acked_streams
        for stream_id in list(itertools.islice(self._streams, 2 * excess)):
            stream = self._streams[stream_id]
            if stream.holds or stream.io_hold is not None or stream in self._moved \
                    or stream in self._unjournaled \
                    or not stream.accepted == stream.written == stream.journaled:
                continue
            del self._streams[stream_id]
            self.acked_streams_forgotten_total += 1
            excess -= 1
            if not excess:
                return

    def _update_streams(self):
        for stream in self._moved:
            if stream.update() or stream.journaled is None:
                self._unjournaled.add(stream)
                if stream.peer is not None:
                    self._acks_due[(stream.peer[0], stream.peer[1], stream.stream_id)] = stream
        self._moved.clear()

    def _record(self, sync):
        # Append the streams' new `written` to the journal; False (reported) when it failed.
        journal = self._journal
        if self._unjournaled or journal.pending:
            entries = b"".join(_journal_entry(s.stream_id, s.written) for s in self._unjournaled)
            try:
                journal.append(entries)
                if sync:
                    journal.sync()
            except OSError as exc:
                self._write_failed(exc.filename, exc)
                return False
            for stream in self._unjournaled:
                stream.journaled = stream.written
            self._unjournaled.clear()
            self._write_ok()
            if journal.needs_compaction() and not journal.compact(
                    {sid: s.journaled for sid, s in self._streams.items()
                     if s.journaled is not None}):
                self.warn("warning: cannot compact %s; it keeps growing" % journal.path)
        return True

    def _sync_background(self):
        # --fsync interval: hand what was written since the last sync to the syncer thread.
        job = []
        current = None                  # the owner being handled, named in an error
        try:
            for current in self._unsynced:
                fd = current.take_for_sync()
                if fd is not None:
                    job.append((fd, current))
            for current in self._unsynced_dirs:
                job.append((os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
                            current))
            current = journal = self._journal
            if journal is not None and journal.dirty and journal._fd >= 0:
                job.append((os.dup(journal._fd), journal))
                journal.dirty = False
        except OSError as exc:         # out of descriptors: what is not in the job stays due
            self._sync_failed(([owner for _, owner in job], current, exc))
            for fd, _ in job:
                os.close(fd)
            return
        self._unsynced.clear()
        self._unsynced_dirs.clear()
        self._synced_at = time.monotonic()
        if job:
            self._syncer.submit(job)

    def _sync_failed(self, error):
        # A failed background sync: its files are synced again next time, and it is reported.
        if error is None:
            return
        owners, failed, exc = error
        path = path_of(failed)
        for owner in owners:
            if isinstance(owner, str):
                self._unsynced_dirs.add(owner)
            else:
                owner.dirty = True
                if isinstance(owner, LogFile):
                    self._unsynced.add(owner)
        self._write_failed(path, exc)

    def _sync(self, final):
        # fsync every file written since the last sync; False (reported) when one failed.
        if self.fsync == "never":
            return True
        if self._syncer is not None:
            # What the syncer holds is not synced yet: wait for it (and take back a failure).
            self._sync_failed(self._syncer.result(wait=True))
        current = self.out_dir or "output"     # fsync errors carry no file name: say which
        try:
            for handle in list(self._unsynced):
                current = handle.path
                handle.sync()
                self._unsynced.discard(handle)
            for directory in list(self._unsynced_dirs):
                current = directory
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._unsynced_dirs.discard(directory)
            if self._journal is not None:
                current = self._journal.path
                self._journal.sync()
        except OSError as exc:
            self._write_failed(exc.filename or current, exc)
            return False
        self._synced_at = time.monotonic()
        self._write_ok()
        return True

    # -- writing ----------------------------------------------------------------------------------
    def _render(self):
        # The received messages as (tenant, service, lines, held partial chunk) runs.
        if self.fmt == "text":
            return self._receiver.take_rendered()
        runs = {}       # per destination, in arrival order
        for tenant, service, payload in self._receiver.take():
            try:
                line = render_json(tenant, service, payload)
            except ProtocolError as exc:
                self._malformed[exc.reason] += 1
                continue
            runs.setdefault((tenant, service), []).append(line)
        return [(tenant, service, b"".join(lines), None)
                for (tenant, service), lines in runs.items()]

    def _write_entries(self, entries):
        for tenant, service, data, held in entries:
            if data:
                self._emit(tenant, service, data)
            if held is not None:
                self._reassemble(tenant, service, held)

    def _write_text(self):
        self._write_entries(self._receiver.take_rendered())

    def _write_json(self):
        self._write_entries(self._render())

    def _emit(self, tenant, service, data, origin=None):
        if self.out is not None:
            self.out.write(data)
            self._count_written(tenant, service, data)
            return
        if (tenant, service) not in self._dests:
            if len(self._dests) < self.max_streams:
                self._dests.add((tenant, service))
            else:
                # --max-streams: one file for every destination past the limit.
                self.overflow_total += _count_newlines(data)
                tenant = service = OVERFLOW_NAME.encode("ascii")
        if not self._pending:
            try:
                handle = self._file(tenant, service)
                self._unsynced.add(handle)
                handle.write(data)
                self._count_written(tenant, service, data)
            except OSError as exc:
                data = data[getattr(exc, "written", 0):]
                self._pending.append((tenant, service, data))
                self._write_failed(exc.filename or self._dest_path(tenant, service), exc)
        else:
            self._pending.append((tenant, service, data))
        if self._pending:
            # The lines of this batch (or of the batch a joined line started in) are not in the
            # file: the stream's `written` stays below it until they are.
            origin = origin or self._origin
            if origin is not None:
                stream, seq = origin
                if stream.io_hold is None or seq < stream.io_hold:
                    stream.io_hold = seq
                self._io_held.add(stream)

    def _retry_pending(self, force=False):
        # Write what a failed write left, in order; True when nothing is left.
        now = time.monotonic()
        if not force and now < self._retry_at:
            return False
        while self._pending:
            tenant, service, data = self._pending[0]
            try:
                handle = self._file(tenant, service)
                self._unsynced.add(handle)
                handle.write(data)
                self._count_written(tenant, service, data)
            except OSError as exc:
                done = getattr(exc, "written", 0)
                if done:
                    self._pending[0] = (tenant, service, data[done:])
                self._write_failed(exc.filename or self._dest_path(tenant, service), exc)
                return False
            self._pending.popleft()
        self._write_ok()
        for stream in self._io_held:
            stream.io_hold = None
            self._moved.add(stream)
        self._io_held.clear()
        return True

    def _count_written(self, tenant, service, data):
        counts = self.written_by_destination.get((tenant, service))
        if counts is None:
            key = (tenant, service)
            if len(self.written_by_destination) >= MAX_COUNTED_DESTINATIONS:
                key = ("other", "other")
            counts = self.written_by_destination.setdefault(key, [0, 0])
        counts[0] += _count_newlines(data)
        counts[1] += len(data)

    def _write_ok(self):
        # The end of an error episode (nothing is held any more).
        if (self._error_since is not None and not self._pending
                and not (self._journal is not None and self._journal.pending)):
            self.warn("writing again after %.1f s" % (time.monotonic() - self._error_since))
            self._error_since = None
            self.write_error = None

    def _write_failed(self, path, exc):
        now = time.monotonic()
        self._retry_at = now + WRITE_RETRY_S
        self.write_error = "%s: %s" % (path, exc.strerror or exc)
        if self._error_since is None:
            self._error_since = now
            self.write_errors_total += 1
        elif now - self._error_reported_at < WRITE_REPORT_S:
            return
        self._error_reported_at = now
        held = sum(len(item[2]) for item in self._pending)
        self.warn("error: cannot write %s: %s (holding %d bytes, retrying)"
                  % (path, exc.strerror or exc, held))

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
                                               _text_prefix(record), self._origin)
            group.size = GROUP_OVERHEAD_BYTES     # counted in _held_bytes with the chunks
            self._held_bytes += GROUP_OVERHEAD_BYTES
            if self._origin is not None:
                # The batch this line started in is not written until the line is.
                self._origin[0].holds[key] = self._origin[1]
        line = record["line"]
        group.chunks.append(line)
        group.size += len(line)
        self._held_bytes += len(line)
        if partial["last"]:
            del self._groups[key]
            self._held_bytes -= group.size
            self._emit(tenant, service, group.prefix + b"".join(group.chunks) + b"\n",
                       group.origin)
            self._release(key, group)
        elif self._held_bytes > MAX_REASSEMBLY_BYTES:
            self._expire_groups(float("inf"), until_bytes=MAX_REASSEMBLY_BYTES)

    def _release(self, key, group):
        if group.origin is not None:
            stream = group.origin[0]
            stream.holds.pop(key, None)
            self._moved.add(stream)

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
                       b"".join(group.prefix + chunk + b"\n" for chunk in group.chunks),
                       group.origin)
            self._release(key, group)

    def _dest_path(self, tenant, service):
        return os.path.join(self.out_dir, safe_path_part(tenant), safe_path_part(service) + ".log")

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
        sync = self.fsync != "never"
        if sync and not os.path.lexists(path):
            self._unsynced_dirs.add(folder)         # a new name: fsync its directory too
        try:
            handle = LogFile(path, self.max_size, self.max_files, sync_on_close=sync)
        except FileNotFoundError:
            # First file of this tenant. (Trying the open first saves a mkdir and a stat on
            # every reopen when more destinations are written than files may stay open.)
            os.makedirs(folder, exist_ok=True)
            if sync:
                self._unsynced_dirs.add(self.out_dir)
            handle = LogFile(path, self.max_size, self.max_files, sync_on_close=sync)
        if handle.torn_bytes:
            self.warn("warning: %s ended in a broken line (%d bytes, an interrupted write); "
                      "cut it away" % (handle.path, handle.torn_bytes))
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
        """Write incomplete partial groups as they are and what a failed write left (retried for
        up to :data:`STOP_WRITE_WAIT_S`), fsync, record and acknowledge, then close files, the
        journal, sockets and an own context."""
        try:
            if self._groups:
                self._expire_groups(float("inf"))
            if self._pending:
                deadline = time.monotonic() + STOP_WRITE_WAIT_S
                while not self._retry_pending(force=True) and time.monotonic() < deadline:
                    time.sleep(WRITE_RETRY_S)
                if self._pending:
                    self.unwritten_bytes = sum(len(item[2]) for item in self._pending)
                    self.warn("error: %d bytes could not be written and are lost"
                              % self.unwritten_bytes)
                    self._pending.clear()
            self.flush()
            if self.out_dir is not None:
                self._commit(time.monotonic(), final=True)
        finally:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
            for sock in self.sockets:
                sock.close(linger=ACK_LINGER_MS if sock in self._acked_sockets else 0)
            self.sockets = []
            self._acked_sockets.clear()
            if self._syncer is not None:
                self._syncer.close()
            if self._journal is not None:
                self._journal.close()
            if self.curve is not None:
                self.curve.close()
            if self._own_context:
                self.context.term()
                self._own_context = False

    # -- counters ---------------------------------------------------------------------------------
    def _malformed_text(self):
        reasons = ", ".join("%s %d" % kv for kv in self.malformed_reasons.items() if kv[1])
        return "%d malformed%s" % (self.malformed_total, " (%s)" % reasons if reasons else "")

    def _acked_text(self):
        if self._journal is None:
            return ""
        return ", acked: %d batches (%d lines), %d duplicate, %d gap, %d acks sent" % (
            self.acked_batches_total, self.acked_lines_total, self.duplicate_batches_total,
            self.gap_batches_total, self.acks_sent_total)

    def interval_line(self, now=None):
        """One line for ``--stats-interval``: totals and the message rate since the last line."""
        now = time.monotonic() if now is None else now
        since, seen = self._tick
        rate = (self.messages_total - seen) / (now - since) if now > since else 0.0
        self._tick = (now, self.messages_total)
        return "%d messages, %d bytes, %s%s%s, %.0f messages/s" % (
            self.messages_total, self.bytes_total, self._malformed_text(), self._acked_text(),
            self._guard_text(), rate)

    def _guard_text(self):
        # The bounds that refused or redirected something: --max-streams, the CURVE allow-list.
        text = ""
        if self.overflow_total:
            text += ", %d lines over --max-streams (%d) in %s" % (
                self.overflow_total, self.max_streams, OVERFLOW_NAME)
        if self.curve is not None:
            text += ", curve_refused_total %d" % self.curve_refused_total
        return text

    def stats_line(self):
        """One line for ``--stats``: totals, and the rate from the first to the last batch."""
        line = "received %d messages (%d payload bytes), %s, %d partial groups incomplete%s" % (
            self.messages_total, self.bytes_total, self._malformed_text(),
            self.partial_expired_total, self._acked_text())
        if self.write_errors_total:
            line += ", %d write error episodes" % self.write_errors_total
        line += self._guard_text()
        if self.first_message_at is not None and self.last_message_at > self.first_message_at:
            span = self.last_message_at - self.first_message_at
            line += "; %.3f s first to last batch, %.0f messages/s" % (
                span, self.messages_total / span)
        return line


def _warn_stderr(text):
    sys.stderr.write("zeroline: %s\n" % text)
    sys.stderr.flush()
