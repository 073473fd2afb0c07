"""The disk spool: a durable, append-only store of acked-transport batches awaiting acknowledgement.

Layout of a spool directory ``PATH``:

``PATH/lock``
    Held with ``flock(LOCK_EX | LOCK_NB)`` while a process uses the spool; holds that process's pid.
``PATH/instance``
    16 lowercase hex characters, created once; the forwarder's instance id (part of its stream ids),
    so a forwarder that keeps its spool keeps its stream ids across restarts.
``PATH/NNNNNNNNNNNNNNNN.seg``
    Segment files, numbered monotonically (16 decimal digits), written append-only. Each record is
    written with one ``writev`` and is self-checking::

        magic "ZLS1" | header_crc u32 | body_crc u32 | record_len u32 | seq u64 | lines u32
        | stream_len u8 | tenant_len u16 | service_len u16 | stream_id | tenant | service | body

    (big-endian; ``header_crc`` is zlib.crc32 of everything from ``body_crc`` to the end of
    ``service``, so it covers the body too). A new segment is started when a record would take the
    live one past ``segment_bytes``; a segment is deleted when all its records are released.
``PATH/reserve``
    64 KiB kept free for the journal: given up when a full disk refuses a journal entry, so acks
    still free space; made again after the next segment deletion.
``PATH/released``
    The release journal: append-only entries ``crc u32 | stream_len u8 | stream_id | seq u64``,
    each "every record of this stream with seq <= seq is acknowledged". Compacted (temp file,
    fsync, rename, fsync of the directory) on open and when it grows past JOURNAL_COMPACT_BYTES.

Durability: records and journal entries reach the page cache in the call that makes them, so a
``kill -9`` loses nothing that was appended or released. ``fdatasync`` (of the live segment, of
segments rotated since, and of the journal) starts at most every ``sync_interval_s`` from within
append/release, on a background thread (0: on every call, in the call), and runs in the call on
flush/close, so a power cut can lose at most the last interval or two (one sync running, the next
waits for it). Torn or damaged records are detected by their checksums on the next open, counted in
``corrupt_total``/``corrupt_bytes_total`` and skipped (the scan resyncs on the next valid record);
a torn tail of the last segment is truncated away so appends continue after the last good record.
The journal is fdatasynced before any segment is deleted, so ``next_seq`` never goes back to a seq
that was released. Two limits the acked protocol has to live with: records lost to a power cut
free their seqs, which a later process uses again for new content (a collector that had received
the lost ones drops the new ones as duplicates); and a record skipped as corrupt in the middle of
a stream leaves a gap that the collector will not write past.

Seqs: per stream, each append must use a seq above every seq appended or released before (use
``next_seq``); release is cumulative. ``next_unsent`` hands out each unreleased record once per
process, in append order (records released before being handed out are skipped); resending what
was handed out and not acknowledged is the caller's business.

Accounting: ``bytes_used`` is the size of the segment files on disk. Released records in a segment
that also holds unreleased ones still count until the whole segment is deleted; ``SpoolFull`` is
about disk use. The small ``lock``, ``instance``, ``reserve`` and ``released`` files are not
counted.
"""

import collections
import errno
import fcntl
import os
import struct
import threading
import time

try:
    # The same CRC-32 as zlib.crc32 (the format's), from ISA-L: 12.7 GB/s against zlib's 3.7 on
    # 256 KiB batches here; the spool write path checksums every byte it writes.
    from isal.isal_zlib import crc32
except ImportError:             # no isal wheel for this platform
    from zlib import crc32

from zeroline.errors import ZerolineError

SEGMENT_SUFFIX = ".seg"
JOURNAL_NAME = "released"
LOCK_NAME = "lock"
INSTANCE_NAME = "instance"
JOURNAL_COMPACT_BYTES = 1 << 20
RESERVE_NAME = "reserve"
# Kept on disk and given up when the journal cannot be written for lack of space, so that acks
# can still be recorded and the segments they empty deleted (records are only deleted after the
# journal entry that releases them is durable).
RESERVE_BYTES = 64 << 10
MAX_SEQ = (1 << 64) - 1
MAX_STREAM_ID_BYTES = 255
# Read fds kept open for replay from closed segments (the live one reuses its write fd).
_READ_FDS_MAX = 8

_MAGIC = b"ZLS1"
# magic, header_crc, body_crc, record_len, seq, lines, stream_len, tenant_len, service_len
_HEAD = struct.Struct(">4sIIIQIBHH")
_HEAD_SIZE = _HEAD.size
_CRC_U32 = struct.Struct(">I")
_MAX_RECORD_BYTES = 0xFFFFFFFF
# Journal entry: crc (of the rest), stream_len, then stream_id and seq u64.
_JOURNAL_HEAD = struct.Struct(">IB")
_SEQ = struct.Struct(">Q")

SpoolRecord = collections.namedtuple("SpoolRecord", "stream_id seq tenant service body lines")


class SpoolError(ZerolineError):
    """The spool cannot be used: locked by another process, unreadable, or a write failed."""


class SpoolFull(SpoolError):
    """An append would take the spool past max_bytes, or the disk holding it is full."""


class _Entry:
    # One unreleased record of the in-memory index; the record itself stays on disk.
    __slots__ = ("segment", "offset", "head_size", "size", "stream_id", "seq",
                 "released", "handed_out")

    def __init__(self, segment, offset, head_size, size, stream_id, seq):
        self.segment = segment
        self.offset = offset
        self.head_size = head_size
        self.size = size
        self.stream_id = stream_id
        self.seq = seq
        self.released = False
        self.handed_out = False


def _encode_head(stream_id, seq, tenant, service, body, lines):
    ids_size = len(stream_id) + len(tenant) + len(service)
    record_len = _HEAD_SIZE + ids_size + len(body)
    head = bytearray(_HEAD.pack(_MAGIC, 0, crc32(body), record_len, seq, lines,
                                len(stream_id), len(tenant), len(service)))
    head += stream_id
    head += tenant
    head += service
    _CRC_U32.pack_into(head, 4, crc32(memoryview(head)[8:]))
    return head


def _parse_at(view, pos, end):
    """The fields of the valid record at view[pos:], or None when none starts there.

    The header crc is checked before the body crc, so a stray magic inside a body costs a few
    dozen bytes of crc, not the length it claims.
    """
    if end - pos < _HEAD_SIZE:
        return None
    magic, head_crc, body_crc, record_len, seq, lines, s_len, t_len, v_len = \
        _HEAD.unpack_from(view, pos)
    if magic != _MAGIC:
        return None
    head_end = pos + _HEAD_SIZE + s_len + t_len + v_len
    if s_len == 0 or seq == 0 or head_end > pos + record_len or pos + record_len > end:
        return None
    if crc32(view[pos + 8:head_end]) != head_crc:
        return None
    if crc32(view[head_end:pos + record_len]) != body_crc:
        return None
    return record_len, head_end - pos, seq, lines, s_len, t_len, v_len


def _check_stream_seq(stream_id, seq):
    if not isinstance(stream_id, bytes) or not 1 <= len(stream_id) <= MAX_STREAM_ID_BYTES:
        raise ValueError("stream_id must be 1 to 255 bytes, got %r" % (stream_id,))
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq must be an unsigned 64-bit integer, got %r" % (seq,))


def _encode_journal(stream_id, seq):
    rest = bytes((len(stream_id),)) + stream_id + _SEQ.pack(seq)
    return _CRC_U32.pack(crc32(rest)) + rest


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundSync:
    """fsyncs on a thread of their own, one job at a time.

    The caller hands over descriptors it duplicated or no longer needs, with their owners:
    ``submit([(fd, owner), ...])`` while not :attr:`busy`; the thread fsyncs and closes each.
    The first failure of a job comes back once through :meth:`result` as ``(owners of the job,
    the owner that failed, OSError)``, so the caller can mark them dirty again and say which file
    it was. Used by the spool (completed segments, the live one and the journal: appends go on
    while the disk writes) and by the collector's ``--fsync interval``.
    """

    def __init__(self, name):
        self.name = name
        self._cond = threading.Condition()
        self._job = None            # [(fd, owner)] handed over, not started
        self._running = None        # the job being synced
        self._error = None          # (owners of the failed job, owner, OSError)
        self._closed = False
        self._thread = None

    @property
    def busy(self):
        return self._job is not None or self._running is not None

    def submit(self, job):
        with self._cond:
            self._job = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def result(self, wait=False):
        """``(owners, owner, OSError)`` of a failed job, once (None: none failed); with
        ``wait``, after the job in hand is done."""
        with self._cond:
            while wait and self.busy:
                self._cond.wait()
            error, self._error = self._error, None
            return error

    def _main(self):
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job = self._running = self._job
                self._job = None
            error = None
            for fd, owner in job:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    if error is None:
                        error = (owner, exc)
                finally:
                    os.close(fd)
            with self._cond:
                self._running = None
                if error is not None:
                    self._error = ([owner for _, owner in job],) + error
                self._cond.notify_all()

    def close(self):
        """Finish the job in hand and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for fd, _ in self._job or ():      # never started (only when the thread could not)
            os.close(fd)
        self._job = None


class Spool:
    """A durable, append-only disk spool of acked-transport batches (see the module docstring).

    Not thread-safe: one owner calls it (the forwarder's transport).

    Args:
        path: the spool directory; created with mode 0700 when missing.
        max_bytes: the most bytes of segment files the spool may hold (``SpoolFull`` beyond).
        segment_bytes: a new segment file is started when a record would take the live one
            past this (a record larger than it gets a segment of its own).
        sync_interval_s: fdatasync the live segment and the journal at most this often from
            within append/release; 0 syncs on every call.

    Raises:
        SpoolError: the directory is in use by another process (the message names its pid and
            the path) or cannot be created or read.
    """

    def __init__(self, path, max_bytes=1 << 30, segment_bytes=8 << 20, sync_interval_s=1.0):
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.sync_interval_s = sync_interval_s
        self.bytes_used = 0
        self.records = 0
        self.appended_total = 0
        self.released_total = 0
        self.corrupt_total = 0
        self.corrupt_bytes_total = 0
        self.journal_corrupt_total = 0
        self._lock_fd = -1
        self._live_fd = -1
        self._live_segment = None
        self._journal_fd = -1
        self._journal_size = 0
        self._journal_backlog = bytearray()
        self._read_fds = {}
        self._retired_fds = {}     # segment -> write fd of a rotated segment awaiting fdatasync
        self._seg_size = {}        # segment number -> bytes on disk
        self._seg_live = {}        # segment number -> unreleased records in it
        self._next_segment = 1
        self._unsent = collections.deque()
        self._unsent_n = 0
        self._pending = {}         # stream_id -> deque of unreleased _Entry, in seq order
        self._high = {}            # stream_id -> highest seq appended (seen in a segment)
        self._released = {}        # stream_id -> highest seq released
        self._live_dirty = False
        self._journal_dirty = False
        self._dir_dirty = False
        self._last_sync = time.monotonic()
        self._syncer = None        # the background fdatasync thread, started on first use
        self._closed = False
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SpoolError("cannot create spool-dir %s: %s" % (self.path, exc.strerror)) from exc
        self._lock()
        try:
            self.instance_id = self._load_instance()
            self._load_journal()
            self._load_segments()
            self._compact_journal()
            self._delete_empty_segments()
            self._make_reserve()
        except BaseException:
            self._close_fds()
            raise

    # -- public API ---------------------------------------------------------------------------

    @property
    def segments(self):
        """Segment files on disk."""
        return len(self._seg_size)

    def append(self, stream_id, seq, tenant, service, body, lines):
        """Write one batch to the spool (page cache now; disk within ``sync_interval_s``).

        Args:
            stream_id: 1 to 255 bytes.
            seq: above every seq appended or released for this stream (see ``next_seq``).
            tenant, service: bytes of at most 65535 bytes each.
            body: the batch body (bytes-like).
            lines: the batch's line count (u32).

        Raises:
            SpoolFull: ``bytes_used`` plus this record would pass ``max_bytes`` (nothing is
                written then), or the disk is full (the partial record is truncated away).
            SpoolError: another write error (the partial record is truncated away).
            ValueError: a malformed argument, or a seq that does not move the stream forward.
        """
        self._check_open()
        _check_stream_seq(stream_id, seq)
        if len(tenant) > 0xFFFF or len(service) > 0xFFFF:
            raise ValueError("tenant and service must be at most 65535 bytes")
        if not 0 <= lines <= 0xFFFFFFFF:
            raise ValueError("lines must be an unsigned 32-bit integer, got %r" % (lines,))
        floor = max(self._high.get(stream_id, 0), self._released.get(stream_id, 0))
        if seq <= floor:
            raise ValueError("seq %d of stream %r is not above %d, already appended or released"
                             % (seq, stream_id, floor))
        head = _encode_head(stream_id, seq, tenant, service, body, lines)
        size = len(head) + len(body)
        if size > _MAX_RECORD_BYTES:
            raise ValueError("a spool record is at most 4 GiB, this one is %d bytes" % size)
        if self.bytes_used + size > self.max_bytes:
            raise SpoolFull("spool-dir %s is full: %d of %d bytes used, the batch needs %d"
                            % (self.path, self.bytes_used, self.max_bytes, size))
        segment = self._live_for(size)
        offset = self._seg_size[segment]
        try:
            written = os.pwritev(self._live_fd, [head, body], offset)
            while written < size:
                # A short write (disk nearly full): finish it, or get the errno that explains it.
                rest = (bytes(head) + bytes(body))[written:]
                n = os.pwrite(self._live_fd, rest, offset + written)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
        except OSError as exc:
            self._truncate_live(offset)
            name = self._segment_path(segment)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("spool-dir %s is full: no space left on the device writing %s"
                                % (self.path, name)) from exc
            raise SpoolError("cannot write spool segment %s: %s" % (name, exc.strerror)) from exc
        self._seg_size[segment] = offset + size
        self._seg_live[segment] += 1
        self.bytes_used += size
        self._live_dirty = True
        entry = _Entry(segment, offset, len(head), size, stream_id, seq)
        self._unsent.append(entry)
        self._unsent_n += 1
        pending = self._pending.get(stream_id)
        if pending is None:
            pending = self._pending[stream_id] = collections.deque()
        pending.append(entry)
        self._high[stream_id] = seq
        self.records += 1
        self.appended_total += 1
        self._maybe_sync()

    def next_unsent(self):
        """The oldest unreleased record not handed out yet by this object, read back from disk.

        Returns:
            A ``SpoolRecord`` in append order, or None when every unreleased record was handed
            out. A record that no longer reads back intact is counted in ``corrupt_total`` and
            skipped. After a restart every unreleased record is unsent again.
        """
        self._check_open()
        unsent = self._unsent
        while unsent:
            entry = unsent.popleft()
            if entry.released:
                continue
            entry.handed_out = True
            self._unsent_n -= 1
            record = self._read(entry)
            if record is not None:
                return record
            self.corrupt_total += 1
            self.corrupt_bytes_total += entry.size
        return None

    def unsent_count(self):
        """Unreleased records that ``next_unsent`` has not handed out yet."""
        return self._unsent_n

    def release(self, stream_id, seq):
        """Release every record of ``stream_id`` with seq <= ``seq`` (a cumulative ack).

        Persisted in the journal, so a later process does not replay them. A segment whose records
        are all released is deleted (the journal is fdatasynced first). A seq at or below what was
        already released is ignored.

        Returns:
            The number of records released by this call.
        """
        self._check_open()
        _check_stream_seq(stream_id, seq)
        if seq <= self._released.get(stream_id, 0):
            return 0
        self._released[stream_id] = seq
        had_backlog = bool(self._journal_backlog)
        self._journal_backlog += _encode_journal(stream_id, seq)
        self._write_journal_backlog()
        released = 0
        emptied = False
        pending = self._pending.get(stream_id)
        while pending and pending[0].seq <= seq:
            entry = pending.popleft()
            entry.released = True
            released += 1
            if not entry.handed_out:
                self._unsent_n -= 1
            left = self._seg_live[entry.segment] - 1
            self._seg_live[entry.segment] = left
            if left == 0:
                emptied = True
        if pending is not None and not pending:
            del self._pending[stream_id]
        unsent = self._unsent
        while unsent and unsent[0].released:
            unsent.popleft()
        self.records -= released
        self.released_total += released
        if emptied or had_backlog:
            self._delete_empty_segments()
        if self._journal_size > JOURNAL_COMPACT_BYTES and not self._journal_backlog:
            self._compact_journal()
        self._maybe_sync()
        return released

    def next_seq(self, stream_id):
        """1 + the highest seq ever appended or released for ``stream_id`` (1 for a new stream)."""
        return max(self._high.get(stream_id, 0), self._released.get(stream_id, 0)) + 1

    def flush(self):
        """fdatasync the live segment and the journal now."""
        self._check_open()
        self._write_journal_backlog()
        self._sync()
        if not self._journal_backlog:
            self._delete_empty_segments()

    def close(self):
        """Flush, close every file and release the lock. Calling it again does nothing."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._close_fds()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return ("<Spool %s records=%d unsent=%d bytes_used=%d segments=%d>"
                % (self.path, self.records, self._unsent_n, self.bytes_used, self.segments))

    # -- opening ------------------------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise SpoolError("spool-dir %s is closed" % self.path)

    def _lock(self):
        lock_path = os.path.join(self.path, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError("cannot open %s: %s" % (lock_path, exc.strerror)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolError("spool-dir %s is in use by process %s" % (self.path, holder)) \
                    from exc
            raise SpoolError("cannot lock %s: %s" % (lock_path, exc.strerror)) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self._lock_fd = fd

    def _load_instance(self):
        instance_path = os.path.join(self.path, INSTANCE_NAME)
        try:
            with open(instance_path, "rb") as f:
                text = f.read(64).strip().decode("ascii", "replace")
            if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
                return text
        except FileNotFoundError:
            pass
        # Missing or damaged: make one, atomically, so a reader never sees half of it.
        text = os.urandom(8).hex()
        tmp = instance_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, instance_path)
        _fsync_dir(self.path)
        return text

    def _load_journal(self):
        journal_path = os.path.join(self.path, JOURNAL_NAME)
        try:
            with open(journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        view = memoryview(data)
        released = self._released
        pos, end = 0, len(data)
        while pos < end:
            ok = False
            if end - pos >= _JOURNAL_HEAD.size:
                crc, s_len = _JOURNAL_HEAD.unpack_from(data, pos)
                entry_end = pos + _JOURNAL_HEAD.size + s_len + 8
                if s_len and entry_end <= end and crc32(view[pos + 4:entry_end]) == crc:
                    stream_id = data[pos + 5:pos + 5 + s_len]
                    (seq,) = _SEQ.unpack_from(data, entry_end - 8)
                    if seq > released.get(stream_id, 0):
                        released[stream_id] = seq
                    pos = entry_end
                    ok = True
            if not ok:
                # A torn last entry, or damage: try every next offset (the journal is small).
                self.journal_corrupt_total += 1
                pos += 1
                while pos < end:
                    crc_ok = False
                    if end - pos >= _JOURNAL_HEAD.size:
                        crc, s_len = _JOURNAL_HEAD.unpack_from(data, pos)
                        entry_end = pos + _JOURNAL_HEAD.size + s_len + 8
                        crc_ok = (s_len and entry_end <= end
                                  and crc32(view[pos + 4:entry_end]) == crc)
                    if crc_ok:
                        break
                    pos += 1

    def _segment_numbers(self):
        numbers = []
        for name in os.listdir(self.path):
            if name.endswith(SEGMENT_SUFFIX):
                stem = name[:-len(SEGMENT_SUFFIX)]
                if len(stem) == 16 and stem.isdigit():
                    numbers.append(int(stem))
        numbers.sort()
        return numbers

    def _segment_path(self, number):
        return os.path.join(self.path, "%016d%s" % (number, SEGMENT_SUFFIX))

    def _load_segments(self):
        numbers = self._segment_numbers()
        released = self._released
        for i, number in enumerate(numbers):
            last = i == len(numbers) - 1
            seg_path = self._segment_path(number)
            with open(seg_path, "rb") as f:
                data = f.read()
            view = memoryview(data)
            live = 0
            valid_end = 0
            pos, end = 0, len(data)
            while pos < end:
                parsed = _parse_at(view, pos, end)
                if parsed is None:
                    # Torn or corrupt: resync on the next magic that starts a valid record.
                    skip_to = pos + 1
                    while True:
                        skip_to = data.find(_MAGIC, skip_to)
                        if skip_to < 0:
                            skip_to = end
                            break
                        if _parse_at(view, skip_to, end) is not None:
                            break
                        skip_to += 1
                    self.corrupt_total += 1
                    self.corrupt_bytes_total += skip_to - pos
                    pos = skip_to
                    continue
                record_len, head_size, seq, _lines, s_len, _t, _v = parsed
                stream_id = data[pos + _HEAD_SIZE:pos + _HEAD_SIZE + s_len]
                if seq > self._high.get(stream_id, 0):
                    self._high[stream_id] = seq
                if seq > released.get(stream_id, 0):
                    entry = _Entry(number, pos, head_size, record_len, stream_id, seq)
                    self._unsent.append(entry)
                    pending = self._pending.get(stream_id)
                    if pending is None:
                        pending = self._pending[stream_id] = collections.deque()
                    pending.append(entry)
                    live += 1
                pos += record_len
                valid_end = pos
            size = end
            if last and valid_end < end:
                # The torn tail of the segment a killed process was writing: cut it off so
                # appends continue right after the last good record.
                fd = os.open(seg_path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, valid_end)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                size = valid_end
            self._seg_size[number] = size
            self._seg_live[number] = live
            self.bytes_used += size
            self.records += live
            if last and live and size < self.segment_bytes:
                self._live_fd = os.open(seg_path, os.O_RDWR | os.O_CLOEXEC)
                self._live_segment = number
        self._unsent_n = len(self._unsent)
        if numbers:
            self._next_segment = numbers[-1] + 1

    def _compact_journal(self):
        """Rewrite the journal as one entry per stream: temp file, fsync, rename, fsync dir."""
        journal_path = os.path.join(self.path, JOURNAL_NAME)
        tmp = journal_path + ".tmp"
        data = b"".join(_encode_journal(s, q) for s, q in self._released.items())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Keep appending to the old journal; compaction is retried when it grows.
                if self._journal_fd < 0:
                    self._journal_fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND
                                               | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    self._journal_size = os.fstat(self._journal_fd).st_size
                return
            raise SpoolError("cannot write %s: %s" % (tmp, exc.strerror)) from exc
        os.close(fd)
        os.replace(tmp, journal_path)
        _fsync_dir(self.path)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._journal_size = len(data)
        self._journal_dirty = False

    # -- writing ------------------------------------------------------------------------------

    def _live_for(self, size):
        """The live segment's number, after rotating when ``size`` more bytes would overfill it."""
        segment = self._live_segment
        if segment is not None:
            used = self._seg_size[segment]
            if used == 0 or used + size <= self.segment_bytes:
                return segment
            self._retire_live()
        segment = self._next_segment
        seg_path = self._segment_path(segment)
        try:
            fd = os.open(seg_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("spool-dir %s is full: cannot create %s" % (self.path, seg_path)) \
                    from exc
            raise SpoolError("cannot create %s: %s" % (seg_path, exc.strerror)) from exc
        self._next_segment = segment + 1
        self._live_fd = fd
        self._live_segment = segment
        self._seg_size[segment] = 0
        self._seg_live[segment] = 0
        self._dir_dirty = True
        return segment

    def _retire_live(self):
        # The segment is complete. Its fdatasync runs on the syncer thread (see _maybe_sync):
        # syncing here cost 14 ms every 8 MiB, two thirds of the append time with 256 KiB
        # bodies. A power cut can then tear a retired segment's tail too; the scan on open
        # skips that like any corrupt record.
        if self._live_dirty:
            self._retired_fds[self._live_segment] = self._live_fd
            self._live_dirty = False
        else:
            os.close(self._live_fd)
        self._live_fd = -1
        self._live_segment = None

    def _truncate_live(self, offset):
        try:
            os.ftruncate(self._live_fd, offset)
        except OSError:
            # Cannot happen on a regular file we own; the checksums still reject the fragment.
            pass

    def _write_journal_backlog(self):
        backlog = self._journal_backlog
        if not backlog:
            return True
        for attempt in (1, 2):
            try:
                done = 0
                while done < len(backlog):
                    done += os.write(self._journal_fd, backlog[done:])
                break
            except OSError as exc:
                try:
                    os.ftruncate(self._journal_fd, self._journal_size)
                except OSError:
                    pass
                if attempt == 1 and exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                        and self._drop_reserve():
                    continue
                # Keep the entries in memory and retry on the next release or flush. Segments
                # are not deleted meanwhile (the seqs in them are not recorded elsewhere).
                return False
        self._journal_size += len(backlog)
        self._journal_dirty = True
        backlog.clear()
        return True

    def _make_reserve(self):
        reserve_path = os.path.join(self.path, RESERVE_NAME)
        try:
            if os.path.getsize(reserve_path) >= RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        try:
            fd = os.open(reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            # No room yet: try again after the next segment deletion frees some.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _drop_reserve(self):
        try:
            os.unlink(os.path.join(self.path, RESERVE_NAME))
            return True
        except OSError:
            return False

    def _delete_empty_segments(self):
        empty = [n for n, live in self._seg_live.items() if live == 0]
        if not empty or self._journal_backlog:
            return
        deleted = False
        # The releases that emptied these segments must be durable before the records go, or a
        # power cut could make next_seq hand out a seq again.
        if self._journal_dirty:
            os.fdatasync(self._journal_fd)
            self._journal_dirty = False
        for number in empty:
            if number == self._live_segment:
                if self._seg_size[number] == 0:
                    continue  # just created, about to be written
                os.close(self._live_fd)
                self._live_fd = -1
                self._live_segment = None
                self._live_dirty = False
            # Close every fd of it: an unlinked file's space is freed only when the last closes.
            for fds in (self._read_fds, self._retired_fds):
                fd = fds.pop(number, None)
                if fd is not None:
                    os.close(fd)
            try:
                os.unlink(self._segment_path(number))
            except FileNotFoundError:
                pass
            self.bytes_used -= self._seg_size.pop(number)
            del self._seg_live[number]
            deleted = True
        if deleted:
            self._make_reserve()

    def _maybe_sync(self):
        interval = self.sync_interval_s
        if interval <= 0:
            self._sync()
        elif self._retired_fds or time.monotonic() - self._last_sync >= interval:
            # A completed segment is synced at once (in the background): the disk writes it
            # while appends go on, and close() is left with the last segment only. Waiting for
            # the interval left 45 segments of a 2 M-line run to close(): 0.5 s of its 1.1 s.
            self._sync_background()

    def _sync_background(self):
        # What _sync does, on the syncer thread: the descriptors are handed over (retired
        # segments) or duplicated (live segment, directory, journal), the dirty flags cleared
        # now. A sync still running means the disk is behind: this one waits for the next call.
        syncer = self._syncer
        if syncer is not None:
            self._take_sync_error(syncer.result())
            if syncer.busy:
                return
        job = []
        try:
            if self._live_dirty:
                job.append((os.dup(self._live_fd), "live segment"))
            if self._dir_dirty:
                job.append((os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
                            "directory"))
            if self._journal_dirty:
                job.append((os.dup(self._journal_fd), "journal"))
        except OSError:                 # out of descriptors: sync here instead
            for fd, _ in job:
                os.close(fd)
            self._sync()
            return
        retired = self._retired_fds
        while retired:
            segment, fd = retired.popitem()
            job.append((fd, self._segment_path(segment)))
        self._live_dirty = self._dir_dirty = self._journal_dirty = False
        self._last_sync = time.monotonic()
        if job:
            if syncer is None:
                syncer = self._syncer = BackgroundSync("zeroline-spool-sync")
            syncer.submit(job)

    def _take_sync_error(self, error):
        if error is not None:
            # EIO and the like: the kernel may have dropped the dirty pages, nothing to retry.
            _, owner, exc = error
            raise SpoolError("cannot sync spool-dir %s (%s): %s"
                             % (self.path, owner, exc.strerror))

    def _sync(self):
        if self._syncer is not None:
            self._take_sync_error(self._syncer.result(wait=True))
        try:
            retired = self._retired_fds
            while retired:
                _, fd = retired.popitem()
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if self._live_dirty:
                os.fdatasync(self._live_fd)
                self._live_dirty = False
            if self._dir_dirty:
                _fsync_dir(self.path)
                self._dir_dirty = False
            if self._journal_dirty:
                os.fdatasync(self._journal_fd)
                self._journal_dirty = False
        except OSError as exc:
            # EIO and the like: the kernel may have dropped the dirty pages, nothing to retry.
            raise SpoolError("cannot sync spool-dir %s: %s" % (self.path, exc.strerror)) from exc
        self._last_sync = time.monotonic()

    # -- reading ------------------------------------------------------------------------------

    def _read(self, entry):
        segment = entry.segment
        if segment == self._live_segment:
            fd = self._live_fd
        else:
            fd = self._read_fds.get(segment)
            if fd is None:
                if len(self._read_fds) >= _READ_FDS_MAX:
                    oldest = next(iter(self._read_fds))
                    os.close(self._read_fds.pop(oldest))
                try:
                    fd = os.open(self._segment_path(segment), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                self._read_fds[segment] = fd
        head = os.pread(fd, entry.head_size, entry.offset)
        body_size = entry.size - entry.head_size
        body = os.pread(fd, body_size, entry.offset + entry.head_size)
        if len(head) != entry.head_size or len(body) != body_size:
            return None
        magic, head_crc, body_crc, record_len, seq, lines, s_len, t_len, v_len = \
            _HEAD.unpack_from(head)
        if (magic != _MAGIC or record_len != entry.size or seq != entry.seq
                or crc32(memoryview(head)[8:]) != head_crc or crc32(body) != body_crc):
            return None
        tenant_at = _HEAD_SIZE + s_len
        service_at = tenant_at + t_len
        return SpoolRecord(head[_HEAD_SIZE:tenant_at], seq, head[tenant_at:service_at],
                           head[service_at:service_at + v_len], body, lines)

    def _close_fds(self):
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        while self._retired_fds:
            os.close(self._retired_fds.popitem()[1])
        for name in ("_live_fd", "_journal_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, -1)
        self._live_segment = None
