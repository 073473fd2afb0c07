"""The Docker logging-plugin backend: HTTP over a unix socket, FIFO copiers, local copies, ReadLogs.

Protocol as read from the engine's code (docs/docker-logging.md §4-§5):

* ``/LogDriver.StartLogging`` gets ``{"File": FIFO, "Info": {...}}``. The daemon opened the FIFO
  read-write before calling, so opening it read-only does not block and we see EOF only after the
  daemon closed its end, which it does right after our answer to StopLogging.
* FIFO content: ``[uint32 big-endian length][LogEntry protobuf]`` frames, decoded by the compiled
  :class:`zeroline.core.EntryStream` and sent on the container's ZeroMQ sink.
* ``/LogDriver.StopLogging`` is answered at once; the copier keeps reading until EOF, so nothing still
  in the pipe is lost.
* Every entry is also kept in a local copy in the format of Docker's ``local`` driver
  (``[len][entry][len]``), rotated by ``cache-max-size``/``cache-max-file``, gzip-compressed when
  ``cache-compress`` (defaults 20 MiB, 5 files, compressed, as the daemon's own cache), which serves
  ``/LogDriver.ReadLogs`` (``docker logs``).

* The engine never calls StartLogging again for a running container, so each instance is recorded
  in ``STATE/instances`` and a restarted plugin re-opens the FIFOs that still exist
  (:meth:`Plugin.reattach`); SIGTERM leaves every FIFO at an entry boundary, and after a kill the
  next process skips to the first one (:func:`entry_boundary`).
* Every sink gets a spool under ``STATE/spool`` unless ``spool-dir`` names one or
  ``ZEROLINE_SPOOL=off``, so a missing collector never stops the reading (the daemon's copier
  would block with the container's logger lock held).

Errors are answered in the protocol's ``Err`` field with status 200 (the daemon shows the text);
a body that is not JSON gets status 400. Every field of a request is type-checked against what the
daemon sends (docs/docker-logging.md §2, §4) and bounded in size before anything is done with it,
so a malformed request gets an ``Err``, never a 500. ReadLogs answers its errors with status 400:
a 200 body is read by the daemon as LogEntry frames, where ``{"Er`` would be a 2 GB length prefix.
One container's trouble never stops the others.

The unix socket is bound, given mode 0660 and only then listened on (a connect before ``listen()``
is refused, so the umask never leaves a window); an existing non-socket at its path is refused, a
stale socket replaced, a live one refused, and the socket file is removed at exit.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import struct
import sys
import time
from datetime import datetime

from aiohttp import web

from . import core
from .config import ContainerInfo, parse_bool, parse_decimal_size, validate_log_opts
from .errors import ConfigError, ProtocolError, TransportError, ZerolineError
from .supervisor import READ_BYTES, Supervisor, grow_pipe
from .transport import open_sink

DEFAULT_SOCKET = "/run/docker/plugins/zeroline.sock"
DEFAULT_STATE_DIR = "/var/lib/zeroline"
#: Local copy defaults: those of Docker's ``local`` driver and dual-logging cache.
LOCAL_MAX_SIZE = 20 * 1024 * 1024
LOCAL_MAX_FILE = 5
#: A ReadLogs for a container whose previous instance still drains waits at most this long.
DRAIN_WAIT_S = 10.0
#: After StopLogging, the FIFO should reach EOF at once; a daemon that died never closes it.
STOP_EOF_WAIT_S = 60.0
#: Local copies of containers not logged to for this long are removed (checked hourly).
DEFAULT_RETENTION_S = 7 * 24 * 3600
FOLLOW_POLL_S = 0.1
#: At shutdown, how long to wait for the rest of a half-read entry (it is in the pipe or being
#: written by the daemon's single write()); and for a stopping FIFO's EOF.
DETACH_WAIT_S = 2.0
#: A reattached FIFO whose previous reader did not detach cleanly: how long to wait for data
#: before taking the pipe as starting at an entry boundary.
RESYNC_WAIT_S = 0.2
#: Pipe size asked for each FIFO (F_SETPIPE_SZ; the default is 64 KiB), read per read, and the
#: pause after a short read. 2 M entries from `yes`: 2.3 us of plugin CPU per line without the
#: pause, see README "Docker logging plugin" for the figures with it.
FIFO_PIPE_BYTES = 1 << 20
FIFO_COALESCE_S = 0.002
#: Reattach records (one JSON file per logging instance) under the state directory.
INSTANCES_DIR = "instances"
#: Default spools of the sinks (one directory per sink) under the state directory.
SPOOL_DIR = "spool"
#: Mode of the plugin's unix socket: the daemon runs as root; nobody else may talk to the plugin.
SOCKET_MODE = 0o660
#: Request limits, far above anything the daemon sends (a few KiB) and far below what would hurt.
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STRING_CHARS = 1024 * 1024
MAX_ITEMS = 10_000
MAX_DEPTH = 8
_ZERO_TIME = "0001-01-01T00:00:00Z"
_LEN = struct.Struct(">I")


def _log(text):
    sys.stderr.write("zeroline plugin: %s\n" % text)
    sys.stderr.flush()


def parse_docker_time(text):
    """RFC 3339 (nanoseconds allowed) to ns since the epoch; the zero time means no bound (None)."""
    if not text or text == _ZERO_TIME:
        return None
    if not isinstance(text, str):
        raise ValueError("time must be a string")
    main, frac = text, ""
    zone = "Z"
    if text.endswith("Z"):
        main = text[:-1]
    else:
        zone = text[-6:]
        main = text[:-6]
    if "." in main:
        main, frac = main.split(".", 1)
    base = datetime.fromisoformat(main + ("+00:00" if zone == "Z" else zone))
    if base.year <= 1:
        return None
    nanos = int((frac + "000000000")[:9]) if frac else 0
    return int(base.timestamp()) * 1_000_000_000 + nanos


# ---------------------------------------------------------------------------------------------
# Local copy in the format of Docker's `local` driver

class LocalLog:
    """``container.log`` plus rotated ``.1`` … ``.N-1`` (gzip-compressed when ``compress``).

    A batch of records goes to the file in one ``write()``; records are only walked one by one
    in the batch that crosses ``max_size``. Compression of a rotated file runs on a worker
    thread (zlib releases the GIL), so the event loop keeps reading FIFOs meanwhile."""

    def __init__(self, directory, max_size=LOCAL_MAX_SIZE, max_file=LOCAL_MAX_FILE, compress=True):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, "container.log")
        self.max_size = max_size
        self.max_file = max_file
        self.compress = compress and max_file > 1
        self._compressing = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        os.fchmod(self._fd, 0o640)
        self._size = os.fstat(self._fd).st_size
        if self.compress and os.path.exists(self.path + ".1"):
            # A previous process stopped before compressing it (killed, or it reattaches).
            self._compressing = _GZIP_POOL.submit(_compress_rotated, self.path + ".1")

    def write(self, records):
        """Append whole ``[len][entry][len]`` records. As Docker's rotation, the size is checked
        before each record, so a file can go over max_size by one record."""
        size = len(records)
        if not size:
            return
        if self.max_size <= 0 or self._size + size <= self.max_size:
            _write_all(self._fd, records)       # the usual case: the whole batch at once
            self._size += size
            return
        view = memoryview(records)
        pos = 0
        while pos < size:
            if self._size >= self.max_size:
                self.rotate()
            # Take every record that starts while the file is still under max_size.
            end = pos
            room = self.max_size - self._size
            while end < size and (end - pos) < room:
                (length,) = _LEN.unpack_from(records, end)
                end += length + 8
            _write_all(self._fd, view[pos:end])
            self._size += end - pos
            pos = end

    def rotate(self):
        os.close(self._fd)
        self._fd = -1
        if self.max_file <= 1:
            os.unlink(self.path)
        else:
            if self._compressing is not None:
                # The previous .1 must be .1.gz before the names shift (only waits when rotations
                # come faster than gzip, about 100 MB/s here).
                self._wait_compression()
            ext = ".gz" if self.compress else ""
            oldest = "%s.%d%s" % (self.path, self.max_file - 1, ext)
            if os.path.exists(oldest):
                os.unlink(oldest)
            for i in range(self.max_file - 1, 1, -1):
                src = "%s.%d%s" % (self.path, i - 1, ext)
                if os.path.exists(src):
                    os.rename(src, "%s.%d%s" % (self.path, i, ext))
            os.rename(self.path, self.path + ".1")
            if self.compress:
                # The file stays readable as .1 until the .gz is complete, as Docker's own
                # rotation does; meanwhile the loop goes on.
                self._compressing = _GZIP_POOL.submit(_compress_rotated, self.path + ".1")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        os.fchmod(self._fd, 0o640)
        self._size = 0

    def _wait_compression(self):
        future, self._compressing = self._compressing, None
        try:
            future.result()
        except OSError as exc:
            _log("local copy: cannot compress %s.1: %s" % (self.path, exc.strerror or exc))

    def close(self, wait=False):
        """Close the file; ``wait``: also wait for a compression still running."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if wait and self._compressing is not None:
            self._wait_compression()


#: One thread compresses rotated local copies, in order, off the event loop.
_GZIP_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="zeroline-gzip")
try:
    # python-isal (Intel ISA-L's deflate): standard gzip files, 2.9 GB/s at level 1 on a copy
    # of `yes` entries against 0.52 GB/s for zlib's level 1, with a better ratio (35.5 vs 33.9).
    # zlib's level 1 was a quarter of the plugin's CPU (0.24 us of ~1.05 us per entry).
    from isal import igzip as _gzip_out
except ImportError:             # a platform without an isal wheel: the standard library's
    _gzip_out = gzip
#: gzip level of rotated copies, the fastest of both (isal: 0-3; zlib: Docker's 6 cost 2.5x 1).
GZIP_LEVEL = 1


def _compress_rotated(path):
    with open(path, "rb") as src, _gzip_out.open(path + ".gz.tmp", "wb", GZIP_LEVEL) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.rename(path + ".gz.tmp", path + ".gz")
    os.unlink(path)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def local_files(directory):
    """The copy's files, oldest first."""
    base = os.path.join(directory, "container.log")
    rotated = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.startswith("container.log."):
            index = name[len("container.log."):].split(".")[0]
            if index.isdigit() and not name.endswith(".tmp"):
                rotated.append((int(index), os.path.join(directory, name)))
    # While .1 is being compressed, .1 and .1.gz can both exist for a moment: read one of them.
    by_index = {}
    for index, path in sorted(rotated, key=lambda item: item[1].endswith(".gz")):
        by_index.setdefault(index, path)
    files = [by_index[index] for index in sorted(by_index, reverse=True)]
    if os.path.exists(base):
        files.append(base)
    return files


def read_records(data):
    """Entries of a local-format buffer: yields (entry bytes, offset after the record).

    Stops at a record that is cut short; a record whose two lengths differ ends the read (Docker
    reports that as data loss)."""
    pos = 0
    size = len(data)
    while pos + 4 <= size:
        (length,) = _LEN.unpack_from(data, pos)
        end = pos + 4 + length + 4
        if end > size:
            return
        (trailer,) = _LEN.unpack_from(data, end - 4)
        if trailer != length:
            _log("local copy: record lengths differ at offset %d, stopping the read" % pos)
            return
        yield data[pos + 4:end - 4], end
        pos = end


def _read_file(path):
    """(content, inode) of one file of a local copy."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read(), None
    with open(path, "rb") as f:
        return f.read(), os.fstat(f.fileno()).st_ino


def entry_for_reader(message):
    """A stored entry as Docker's ``local`` driver returns it on read: ``\\n`` put back unless the
    entry is a partial chunk with last=false; partial metadata is not read back."""
    line = message.line
    if message.partial is None or message.partial.last:
        line += b"\n"
    return core.encode_entry(core.Message(line, message.source, message.time_nano, None))


# ---------------------------------------------------------------------------------------------
# Logging instances

class LoggingInstance:
    """One StartLogging: one FIFO, one EntryStream, one local copy."""

    def __init__(self, plugin, path, fd, info, options, sink_entry, local, info_json=None):
        self.plugin = plugin
        self.path = path
        self.fd = fd
        self.info = info
        self.info_json = info_json      # StartLogging's Info, kept in the reattach record
        self.options = options
        self.sink, self.supervisor = sink_entry
        self.local = local
        self.copier = None
        self.stopping = False
        self.done = asyncio.get_running_loop().create_future()
        # Entries carry their own source: the stream is the container's FIFO.
        self.stream = self.sink.stream(info, "entries", entries=True,
                                       keep_local=local is not None)
        self._errors_logged = 0

    @property
    def name(self):
        return "%s (%s)" % (self.info.short_id or "?", os.path.basename(self.path)[:12])

    def start(self):
        # A pipe of FIFO_PIPE_BYTES holds more while the plugin restarts, and lets reads wait
        # for a batch (dockerd writes one entry per write()).
        read_bytes = grow_pipe(self.fd, FIFO_PIPE_BYTES)
        coalesce_s = FIFO_COALESCE_S if read_bytes > READ_BYTES else 0.0
        # Reading starts at once; the supervisor holds the sends until the sink has a peer.
        self.copier = self.supervisor.add(self.fd, self.stream, self.name,
                                          blocking=self.options.mode == "blocking",
                                          on_feed=self._on_feed, on_finish=self._on_finish,
                                          read_bytes=read_bytes, coalesce_s=coalesce_s)

    def _on_feed(self, copier):
        if self.local is not None:
            try:
                self.local.write(self.stream.take_local())
            except OSError as exc:
                self._report("cannot write the local copy: %s" % exc.strerror)
        errors = self.stream.errors_total
        if errors and errors != self._errors_logged:
            self._errors_logged = errors
            self._report(self.stream.last_error)

    def _report(self, text):
        _log("%s: %s" % (self.name, text))

    def _on_finish(self, copier):
        if self.local is not None:
            self.local.close()
        if not self.done.done():
            self.done.set_result(None)
        self.plugin._drop_record(self.path)     # its FIFO ended: nothing to reattach to
        self.plugin._instance_done(self)

    def stop(self):
        """StopLogging: keep reading until EOF (the daemon closes its end right after our answer);
        force the end if it never comes (a daemon that died)."""
        self.stopping = True
        asyncio.get_running_loop().call_later(STOP_EOF_WAIT_S, self._force_finish)

    def _force_finish(self):
        if self.done.done():
            return
        self._report("no EOF %gs after StopLogging; closing the FIFO" % STOP_EOF_WAIT_S)
        self.copier.finish()

    def detach(self):
        """Plugin shutdown: leave the FIFO to the next plugin process at an entry boundary.

        The daemon keeps its end open, so the pipe (and, once it is full, the engine's copier)
        holds what the container writes meanwhile. The entry this process has half read is
        completed from the FIFO first (the daemon writes each entry with one write(), so its
        rest is in the pipe or on its way), what the stream holds is still offered to the sink,
        and the record is marked clean: the next process reads on from the very next entry.
        An instance already told to stop is read to its EOF instead, as it would have been."""
        copier = self.copier
        if copier is None or copier.eof:
            return
        if self.stopping or not self._complete_entry():
            self._read_to_eof()
            copier.finish()         # its end: _on_finish drops the record
            return
        self._on_feed(copier)
        copier.detach()
        if self.local is not None:
            self.local.close()
        self.plugin._save_record(self, clean=True)
        if not self.done.done():
            self.done.set_result(None)
        self.plugin._instance_gone(self)

    def _complete_entry(self):
        """Reads the FIFO byte by byte until the stream holds no half entry (at most one entry,
        at most DETACH_WAIT_S). False when the FIFO reached EOF (the daemon closed it)."""
        stream, deadline = self.stream, time.monotonic() + DETACH_WAIT_S
        while stream.held_bytes and not stream.corrupt:
            try:
                data = os.read(self.fd, 1)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    self._report("the rest of a half-read entry did not come within %gs; the "
                                 "next plugin process skips it" % DETACH_WAIT_S)
                    return True
                select.select([self.fd], [], [], left)
                continue
            except OSError:
                return False
            if not data:
                return False
            stream.feed(data)
        return True

    def _read_to_eof(self):
        # Bounded: the daemon has closed (or is closing) its end.
        deadline = time.monotonic() + DETACH_WAIT_S
        while time.monotonic() < deadline:
            try:
                data = os.read(self.fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
                continue
            except OSError:
                return
            if not data:
                return
            self.stream.feed(data)
            self._on_feed(self.copier)

    def resync(self):
        """Reattached after a process that did not detach cleanly (SIGKILL, a crash): the pipe
        may start inside an entry that process had half read. Reads what the pipe holds, skips
        up to the first entry boundary (frames that chain, :func:`entry_boundary`) and feeds the
        rest. Returns the bytes skipped."""
        chunks, size = [], 0
        if select.select([self.fd], [], [], RESYNC_WAIT_S)[0]:
            while size < (1 << 20):
                try:
                    data = os.read(self.fd, READ_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
                size += len(data)
        data = b"".join(chunks)
        skip = entry_boundary(data, self.stream.max_entry_bytes)
        if skip:
            self._report("reattached inside an entry the previous process had half read: "
                         "skipped %d bytes" % skip)
        if len(data) > skip:
            self.copier.feed(data[skip:])
        return skip


_ENTRY_STARTS = (b"\x0a\x06stdout", b"\x0a\x06stderr")


def entry_boundary(data, max_entry=1_000_000):
    """The offset of the first entry boundary in ``data`` (a FIFO read from an unknown point):
    the first offset from which frames chain to the end of ``data`` — each a plausible length,
    an entry that starts as the daemon's always do (field 1, ``stdout``/``stderr``) and decodes,
    the last one possibly cut short. ``len(data)`` when there is none."""
    size = len(data)
    candidates = [0]
    for pattern in _ENTRY_STARTS:
        pos = data.find(pattern, 4)
        while pos >= 0:
            candidates.append(pos - 4)
            pos = data.find(pattern, pos + 1)
    for offset in sorted(set(candidates)):
        if _frames_chain(data, offset, size, max_entry):
            return offset
    return size


def _frames_chain(data, pos, size, max_entry):
    while pos + 4 <= size:
        (length,) = _LEN.unpack_from(data, pos)
        if length < 8 or length > max_entry:
            return False
        head = bytes(data[pos + 4:pos + 12])
        if not any(p.startswith(head) for p in _ENTRY_STARTS):
            return False
        end = pos + 4 + length
        if end > size:
            return True         # cut short by the end of what was read
        try:
            core.decode_entry(bytes(data[pos + 4:end]))
        except ZerolineError:
            return False
        pos = end
    return True


def _sink_key(options):
    return (options.address, options.socket, options.hwm, options.linger_s, options.window,
            options.spool_dir, options.spool_max_size)


class Plugin:
    """State of the plugin process: logging instances by FIFO path, sinks by endpoint."""

    def __init__(self, state_dir, retention_s=DEFAULT_RETENTION_S, spool=None):
        self.state_dir = state_dir
        self.retention_s = retention_s
        # Every sink gets a spool under the state dir unless a spool-dir log-opt names one, or
        # ZEROLINE_SPOOL=off: the plugin then keeps reading while the collector is away.
        if spool is None:
            spool = os.environ.get("ZEROLINE_SPOOL", "on").strip().lower() not in (
                "off", "false", "0", "no")
        self.spool = spool
        self.instances = {}                 # FIFO path -> LoggingInstance
        self.sinks = {}                     # sink key -> (Sink, Supervisor)
        self.by_container = collections.defaultdict(set)

    # -- handlers ----------------------------------------------------------------------------
    async def start_logging(self, body):
        """StartLogging for a body that passed :func:`check_start_logging`. On any failure
        nothing is left behind: no open FIFO, no copier, no state directory it created, and not
        the FIFO either (the daemon never removes the FIFO of a failed StartLogging)."""
        path = body["File"]
        if path in self.instances:
            return "StartLogging: already logging to %s" % path
        error = self._attach(path, body["Info"])
        if error:
            discard_fifo(path)
        return error

    def _attach(self, path, info_json, resync=False):
        """Opens the FIFO and starts its instance; the error text, or "" on success. Used by
        StartLogging and, with the recorded request, by :meth:`reattach`."""
        try:
            info = ContainerInfo.from_docker(info_json)
            config = info_json.get("Config") or {}
            options = validate_log_opts(dict(config))
            self._local_settings(config)        # checked before anything is created
        except ZerolineError as exc:
            return str(exc)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return "cannot open the log FIFO %s: %s" % (path, exc.strerror)
        local = instance = None
        container_dir = os.path.dirname(self._copy_dir(info.container_id))
        fresh_dir = not os.path.exists(container_dir)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return "%s is not a FIFO" % path
            sink_entry = self._sink(options)
            local = self._local_copy(info, config)
            instance = LoggingInstance(self, path, fd, info, options, sink_entry, local,
                                       info_json)
            instance.start()
        except ZerolineError as exc:
            return str(exc)
        except OSError as exc:
            return "StartLogging: cannot set up the local copy: %s" % (exc.strerror or exc)
        finally:
            if instance is None or instance.copier is None:
                os.close(fd)
                if local is not None:
                    local.close()
                if fresh_dir:
                    shutil.rmtree(container_dir, ignore_errors=True)
        self.instances[path] = instance
        self.by_container[info.container_id].add(instance)
        self._save_record(instance, clean=False)
        if resync:
            instance.resync()
        return ""

    # -- reattach records: what a restarted plugin needs to read on ----------------------------
    def _record_path(self, fifo_path):
        digest = hashlib.sha256(fifo_path.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return os.path.join(self.state_dir, INSTANCES_DIR, digest + ".json")

    def _save_record(self, instance, clean):
        """Records a logging instance (FIFO path, Info with its options; ``clean``: the FIFO was
        left at an entry boundary), written to a temp file and renamed into place."""
        path = self._record_path(instance.path)
        record = {"File": instance.path, "Info": instance.info_json, "Clean": clean}
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError as exc:
            instance._report("cannot record the instance for a plugin restart: %s"
                             % (exc.strerror or exc))

    def _drop_record(self, fifo_path):
        try:
            os.unlink(self._record_path(fifo_path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log("cannot remove the record of %s: %s" % (fifo_path, exc.strerror or exc))

    def reattach(self):
        """At start: re-open the FIFOs of the recorded instances that still exist (the engine
        never calls StartLogging again for a running container) and read on where the pipe is.
        Returns the number of instances reattached."""
        folder = os.path.join(self.state_dir, INSTANCES_DIR)
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return 0
        count = 0
        for name in names:
            record_path = os.path.join(folder, name)
            if name.endswith(".tmp"):
                os.unlink(record_path)          # a write the previous process did not finish
                continue
            try:
                with open(record_path) as f:
                    record = json.load(f)
                path, info_json = record["File"], record["Info"]
                check_start_logging({"File": path, "Info": info_json})
            except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
                _log("ignoring the unreadable reattach record %s: %s" % (name, exc))
                os.unlink(record_path)
                continue
            if path in self.instances:
                continue
            try:
                is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
            except OSError:
                is_fifo = False
            if not is_fifo:
                # The daemon closed and removed it while no plugin read it (the container
                # stopped): whatever the pipe still held went with it.
                _log("not reattaching %s: its FIFO %s is gone" % (
                    info_json.get("ContainerID", "?")[:12], path))
                os.unlink(record_path)
                continue
            error = self._attach(path, info_json, resync=not record.get("Clean"))
            if error:
                _log("cannot reattach %s (%s): %s" % (info_json.get("ContainerID", "?")[:12],
                                                      path, error))
                os.unlink(record_path)
                continue
            count += 1
        if count:
            _log("reattached %d logging instance(s) of a previous run" % count)
        return count

    async def stop_logging(self, body):
        path = body["File"]
        instance = self.instances.get(path)
        if instance is None:
            return "StopLogging: no logging instance for %s" % (path,)
        instance.stop()
        return ""

    def _local_copy(self, info, config):
        settings = self._local_settings(config)
        if settings is None:
            return None
        return LocalLog(self._copy_dir(info.container_id), *settings)

    @staticmethod
    def _local_settings(config):
        """(max_size, max_file, compress) of the local copy, None when disabled; ConfigError for
        bad cache-* values."""
        if parse_bool(str(config.get("cache-disabled", "false"))):
            return None
        max_size = LOCAL_MAX_SIZE
        if config.get("cache-max-size"):
            max_size = parse_decimal_size(str(config["cache-max-size"]))
        max_file = LOCAL_MAX_FILE
        if config.get("cache-max-file"):
            text = str(config["cache-max-file"])
            if not text.isdigit() or int(text) < 1:
                raise ConfigError("invalid cache-max-file %r: expected an integer >= 1" % text)
            max_file = int(text)
        compress = parse_bool(str(config.get("cache-compress", "true")))
        if compress and max_file <= 1:
            raise ConfigError("cache-compress needs cache-max-file >= 2")
        return max_size, max_file, compress

    def _copy_dir(self, container_id):
        safe = "".join(c for c in container_id if c.isalnum()) or "unknown"
        return os.path.join(self.state_dir, safe, "local-logs")

    def _sink(self, options):
        key = _sink_key(options)
        entry = self.sinks.get(key)
        if entry is None:
            if self.spool and options.spool_dir is None:
                # One per sink key, the same after a restart (the key comes from the recorded
                # options), so what a previous process spooled is sent first.
                digest = hashlib.sha256(repr(key).encode("utf-8", "surrogateescape"))
                options = dataclasses.replace(options, spool_dir=os.path.join(
                    self.state_dir, SPOOL_DIR, digest.hexdigest()[:32]))
            # The supervisor holds a pub sink's sends until a first subscriber (in blocking mode
            # the containers then wait, as with a full pipe) and reports a missing collector.
            sink = open_sink(options, report=_log)
            supervisor = Supervisor(sink, asyncio.get_running_loop())
            entry = self.sinks[key] = (sink, supervisor)
        return entry

    def _instance_gone(self, instance):
        self.instances.pop(instance.path, None)
        self.by_container[instance.info.container_id].discard(instance)
        if not self.by_container[instance.info.container_id]:
            del self.by_container[instance.info.container_id]

    def _instance_done(self, instance):
        self._instance_gone(instance)
        st = instance.stream.stats()
        if st["dropped_total"] or instance.stream.errors_total:
            instance._report("closed: %d entries, %d dropped, %d malformed"
                             % (instance.stream.entries_total, st["dropped_total"],
                                instance.stream.errors_total))

    # -- ReadLogs ----------------------------------------------------------------------------
    async def read_logs(self, request, body):
        """ReadLogs for a body that passed :func:`check_read_logs`; errors are answered with
        status 400, since the daemon reads a 200 body as LogEntry frames."""
        info_json = body["Info"]
        config = body.get("Config") or {}
        try:
            info = ContainerInfo.from_docker(info_json)
            since = parse_docker_time(config.get("Since"))
            until = parse_docker_time(config.get("Until"))
            tail = config.get("Tail", -1)
        except (ValueError, OverflowError, ZerolineError) as exc:
            return web.json_response({"Err": "ReadLogs: bad Config: %s" % exc}, status=400)
        follow = config.get("Follow", False)
        # `docker logs` right after a stop: wait (bounded) for the previous instance to drain.
        draining = [i.done for i in self.by_container.get(info.container_id, ())
                    if i.stopping and not i.done.done()]
        if draining:
            await asyncio.wait(draining, timeout=DRAIN_WAIT_S)
        response = web.StreamResponse(headers={"Content-Type": "application/x-json-stream"})
        await response.prepare(request)
        directory = self._copy_dir(info.container_id)
        try:
            position = await self._send_existing(response, directory, since, until, tail)
            if follow:
                await self._follow(response, directory, info.container_id, until, position)
        except ConnectionResetError:
            # The daemon hung up (docker logs -f ended): nothing to answer.
            return response
        except OSError as exc:
            # The copy went away under us (removed, rotated past): the status line is sent, so
            # ending the stream is the only answer left.
            _log("ReadLogs for %s: %s" % (info.short_id, exc.strerror or exc))
        await response.write_eof()
        return response

    async def _send_existing(self, response, directory, since, until, tail):
        """Sends what the copy holds; returns (inode, offset) of container.log where it stopped,
        so that following goes on from exactly there."""
        selected = collections.deque(maxlen=tail if tail > 0 else None)
        position = (None, 0)
        for path in local_files(directory):
            try:
                data, inode = await asyncio.get_running_loop().run_in_executor(None, _read_file,
                                                                               path)
            except OSError:
                continue        # rotated away while we looked
            end = 0
            for entry, end in read_records(data):
                try:
                    message = core.decode_entry(entry)
                except ZerolineError:
                    continue
                if since is not None and message.time_nano < since:
                    continue
                if until is not None and message.time_nano > until:
                    break
                selected.append(message)
            if inode is not None and os.path.basename(path) == "container.log":
                position = (inode, end)
        if tail != 0:
            await self._write(response, selected)
        return position

    async def _write(self, response, messages):
        out = bytearray()
        for message in messages:
            entry = entry_for_reader(message)
            out += _LEN.pack(len(entry)) + entry
            if len(out) >= 1 << 16:
                await response.write(bytes(out))
                out.clear()
        if out:
            await response.write(bytes(out))

    async def _follow(self, response, directory, container_id, until, position):
        path = os.path.join(directory, "container.log")
        handle, inode, pending, last_look = None, None, b"", False
        # Go on where _send_existing stopped (same file), or from the start of a newer file.
        if os.path.exists(path):
            handle = open(path, "rb")
            inode = os.fstat(handle.fileno()).st_ino
            if inode == position[0]:
                handle.seek(position[1])
        try:
            while True:
                if handle is None and os.path.exists(path):
                    handle = open(path, "rb")
                    inode = os.fstat(handle.fileno()).st_ino
                chunk = handle.read() if handle is not None else b""
                if chunk:
                    pending += chunk
                    messages, used = [], 0
                    for entry, end in read_records(pending):
                        used = end
                        try:
                            message = core.decode_entry(entry)
                        except ZerolineError:
                            continue
                        if until is not None and message.time_nano > until:
                            await self._write(response, messages)
                            return
                        messages.append(message)
                    pending = pending[used:]
                    await self._write(response, messages)
                    continue
                rotated = (handle is not None and os.path.exists(path)
                           and os.stat(path).st_ino != inode)
                if rotated:
                    handle.close()
                    handle, pending = None, b""
                    continue
                if last_look:
                    return      # the container stopped and everything it wrote was sent
                if container_id not in self.by_container:
                    last_look = True    # one more read: its last lines may have just landed
                    continue
                await asyncio.sleep(FOLLOW_POLL_S)
        finally:
            if handle is not None:
                handle.close()

    # -- housekeeping ------------------------------------------------------------------------
    def close_idle_sinks(self):
        """Close the sinks no container logs to any more and that have nothing left to send
        (streams sent, spool empty). Returns how many were closed."""
        used = {id(instance.sink) for instance in self.instances.values()}
        closed = 0
        for key, (sink, supervisor) in list(self.sinks.items()):
            if id(sink) in used or supervisor.undelivered() != (0, 0) or not sink.idle():
                continue
            del self.sinks[key]
            supervisor.close()
            sink.close()
            closed += 1
        return closed

    def clean_spools(self):
        """Remove the default spools (STATE/spool/*) of sinks not open now that hold nothing.

        One that still holds batches is kept and said: a container logging with the same
        options again opens the same spool and sends them first."""
        from .transport.spool import Spool, SpoolError

        root = os.path.join(self.state_dir, SPOOL_DIR)
        try:
            names = os.listdir(root)
        except OSError:
            return 0
        open_dirs = {os.path.abspath(sink.options.spool_dir) for sink, _ in self.sinks.values()
                     if sink.options.spool_dir}
        removed = 0
        for name in names:
            path = os.path.join(root, name)
            if os.path.abspath(path) in open_dirs or not os.path.isdir(path):
                continue
            try:
                with Spool(path) as spool:
                    left = spool.unsent_count()
            except (SpoolError, OSError) as exc:
                _log("spool %s: %s; left as it is" % (path, exc))
                continue
            if left:
                _log("spool %s holds %d batches of a sink no container uses now; a container "
                     "logging with the same options sends them first" % (path, left))
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def clean_old_copies(self, now=None):
        """Remove local copies of containers not logged to for ``retention_s``."""
        now = time.time() if now is None else now
        removed = 0
        if not os.path.isdir(self.state_dir):
            return 0
        active = {"".join(c for c in cid if c.isalnum()) for cid in self.by_container}
        for name in os.listdir(self.state_dir):
            folder = os.path.join(self.state_dir, name)
            if name in active or not os.path.isdir(os.path.join(folder, "local-logs")):
                continue
            newest = max((os.stat(p).st_mtime for p in local_files(os.path.join(folder,
                                                                                "local-logs"))),
                         default=0)
            if now - newest > self.retention_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    async def close(self):
        """Shutdown: every FIFO is left to the next plugin process (:meth:`LoggingInstance.detach`;
        its record stays), then what was read is sent (up to each sink's zmq-linger)."""
        for instance in list(self.instances.values()):
            instance.detach()
        for sink, supervisor in self.sinks.values():
            await supervisor.drain(sink.options.linger_s)
            supervisor.close()
            sink.close()
        self.sinks.clear()
        self.clean_spools()


def discard_fifo(path):
    """Unlinks ``path`` if it is a FIFO: the daemon leaves a failed StartLogging's FIFO behind in
    /run/docker/logging for good, one per rejected ``docker run``."""
    try:
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Request validation: every field as the daemon sends it (moby daemon/logger/loginfo.go, plugin.go)

_STR, _STR_LIST, _STR_MAP = "a string", "an array of strings or null", "an object of strings or null"
#: Info's fields and their types; unknown keys are allowed (newer engines), within the limits.
INFO_FIELDS = {
    "Config": _STR_MAP, "ContainerID": _STR, "ContainerName": _STR,
    "ContainerEntrypoint": _STR, "ContainerArgs": _STR_LIST, "ContainerImageID": _STR,
    "ContainerImageName": _STR, "ContainerCreated": _STR, "ContainerEnv": _STR_LIST,
    "ContainerLabels": _STR_MAP, "LogPath": _STR, "DaemonName": _STR, "Hostname": _STR,
}


def check_limits(body):
    """Bounds the whole body, unknown keys included: depth, items per array/object, string
    length, and text that cannot be encoded (a lone surrogate from a ``\\udXXX`` escape).

    Raises:
        ProtocolError: naming the first place over a limit.
    """
    stack = [(body, "body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise ProtocolError("%s: string longer than %d characters"
                                    % (where, MAX_STRING_CHARS))
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError("%s: not valid Unicode text" % where) from None
        elif isinstance(value, (list, dict)):
            if depth > MAX_DEPTH:
                raise ProtocolError("%s: nested deeper than %d levels" % (where, MAX_DEPTH))
            if len(value) > MAX_ITEMS:
                raise ProtocolError("%s: more than %d items" % (where, MAX_ITEMS))
            if isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, "%s key" % where, depth))
                    stack.append((item, "%s.%s" % (where, key[:64]), depth + 1))
            else:
                stack.extend((item, "%s[%d]" % (where, i), depth + 1)
                             for i, item in enumerate(value))


def _check_type(value, kind, where):
    if kind is _STR:
        ok = isinstance(value, str)
    elif value is None:
        ok = kind in (_STR_LIST, _STR_MAP)
    elif kind is _STR_LIST:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if not ok:
        raise ProtocolError("%s must be %s, got %s" % (where, kind, _json_type(value)))


def _json_type(value):
    if isinstance(value, (list, dict)):
        inner = value.values() if isinstance(value, dict) else value
        odd = next((v for v in inner if not isinstance(v, str)), None)
        outer = "an object" if isinstance(value, dict) else "an array"
        return outer if odd is None else "%s holding %s" % (outer, _json_type(odd))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string"


def check_info(info):
    """``Info`` of StartLogging and ReadLogs: an object, a non-empty ContainerID, each known field
    of its type (``ContainerEnv``, ``ContainerArgs``, ``ContainerLabels``, ``Config`` may be null,
    as Go sends nil slices and maps)."""
    if not isinstance(info, dict):
        raise ProtocolError("Info must be an object, got %s" % _json_type(info))
    if "ContainerID" not in info:
        raise ProtocolError("Info.ContainerID is missing")
    for key, kind in INFO_FIELDS.items():
        if key in info:
            _check_type(info[key], kind, "Info." + key)
    if not info["ContainerID"]:
        raise ProtocolError("Info.ContainerID is empty")


def _check_file(body):
    path = body.get("File")
    if path is None:
        raise ProtocolError("File is missing")
    _check_type(path, _STR, "File")
    if not path or "\0" in path:
        raise ProtocolError("File must be a path, got %r" % path[:200])


def check_start_logging(body):
    """StartLogging: ``{"File": path, "Info": {...}}``."""
    check_limits(body)
    _check_file(body)
    if "Info" not in body:
        raise ProtocolError("Info is missing")
    check_info(body["Info"])


def check_stop_logging(body):
    """StopLogging: ``{"File": path}``."""
    check_limits(body)
    _check_file(body)


def check_read_logs(body):
    """ReadLogs: ``{"Info": {...}, "Config": {"Since": T, "Until": T, "Tail": int,
    "Follow": bool}}`` (T: RFC 3339 text; every Config key optional, Config may be null)."""
    check_limits(body)
    if "Info" not in body:
        raise ProtocolError("Info is missing")
    check_info(body["Info"])
    config = body.get("Config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise ProtocolError("Config must be an object, got %s" % _json_type(config))
    for key in ("Since", "Until"):
        if key in config:
            _check_type(config[key], _STR, "Config." + key)
            if len(config[key]) > 64:
                raise ProtocolError("Config.%s is not an RFC 3339 time" % key)
    tail = config.get("Tail", -1)
    # Go's int: a bool is not one, and neither is a number past int64.
    if isinstance(tail, bool) or not isinstance(tail, int) or not -2**63 <= tail < 2**63:
        raise ProtocolError("Config.Tail must be an integer, got %s" % _json_type(tail))
    if not isinstance(config.get("Follow", False), bool):
        raise ProtocolError("Config.Follow must be a boolean, got %s"
                            % _json_type(config["Follow"]))


# ---------------------------------------------------------------------------------------------
# HTTP

def _err(text, status=200):
    return web.json_response({"Err": text}, status=status)


def _refuse(exc_class, text, **kwargs):
    return exc_class(text=json.dumps({"Err": text}), content_type="application/json", **kwargs)


async def _read_body(request):
    """The raw body, refused (413, with an Err) past MAX_BODY_BYTES before it is all read."""
    declared = request.content_length
    try:
        if declared is not None and declared > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, declared)
        return await request.read()         # the app's client_max_size stops a chunked body
    except web.HTTPRequestEntityTooLarge:
        raise _refuse(web.HTTPRequestEntityTooLarge,
                      "request body over %d bytes refused" % MAX_BODY_BYTES,
                      max_size=MAX_BODY_BYTES, actual_size=declared or MAX_BODY_BYTES + 1) \
            from None


async def _json_body(request, required=True):
    """The body as a JSON object. Not JSON (or empty, as a retried request can be): 400.
    Nesting too deep for the parser: ProtocolError, answered with an Err like other limits."""
    raw = await _read_body(request)
    if not raw.strip():
        if required:
            raise _refuse(web.HTTPBadRequest, "empty request body")
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ProtocolError("body: nested deeper than %d levels" % MAX_DEPTH) from None
    except ValueError as exc:
        raise _refuse(web.HTTPBadRequest, "cannot parse request: %s" % exc) from None
    if not isinstance(body, dict):
        raise _refuse(web.HTTPBadRequest, "request body must be a JSON object")
    return body


#: Requests a handler failed on unexpectedly (a bug): answered with an Err, counted, logged.
INTERNAL_ERRORS = web.AppKey("internal_errors", list)


def make_app(plugin):
    """The aiohttp application answering the daemon's plugin requests."""

    @web.middleware
    async def never_500(request, handler):
        # The checks above should leave nothing for this; if a bug slips through, the daemon
        # still gets an Err (not a 500 page) and the log gets one line, not a traceback.
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence, see above
            request.app[INTERNAL_ERRORS].append("%s: %s" % (type(exc).__name__, exc))
            _log("internal error answering %s: %s: %s" % (request.path, type(exc).__name__,
                                                          exc))
            status = 400 if request.path == "/LogDriver.ReadLogs" else 200
            return _err("zeroline plugin: internal error: %s" % exc, status)

    async def activate(request):
        await _read_body(request)
        return web.json_response({"Implements": ["LogDriver"]})

    async def capabilities(request):
        await _read_body(request)
        return web.json_response({"Cap": {"ReadLogs": True}, "Err": ""})

    async def start_logging(request):
        body = None
        try:
            body = await _json_body(request)
            check_start_logging(body)
        except ProtocolError as exc:
            path = body.get("File") if isinstance(body, dict) else None
            if isinstance(path, str) and path and "\0" not in path:
                discard_fifo(path)
            return _err("StartLogging: %s" % exc)
        return _err(await plugin.start_logging(body))

    async def stop_logging(request):
        try:
            body = await _json_body(request)
            check_stop_logging(body)
        except ProtocolError as exc:
            return _err("StopLogging: %s" % exc)
        return _err(await plugin.stop_logging(body))

    async def read_logs(request):
        try:
            body = await _json_body(request)
            check_read_logs(body)
        except ProtocolError as exc:
            return _err("ReadLogs: %s" % exc, status=400)
        return await plugin.read_logs(request, body)

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[never_500])
    app[INTERNAL_ERRORS] = []
    app.router.add_post("/Plugin.Activate", activate)
    app.router.add_post("/LogDriver.Capabilities", capabilities)
    app.router.add_post("/LogDriver.StartLogging", start_logging)
    app.router.add_post("/LogDriver.StopLogging", stop_logging)
    app.router.add_post("/LogDriver.ReadLogs", read_logs)
    return app


def prepare_socket_path(path):
    """Make way for the plugin's socket at ``path``: nothing there is fine; a stale socket (nobody
    accepts on it) is removed; anything else is refused and left untouched.

    Raises:
        ConfigError: ``path`` exists and is not a socket (a user mistake: a wrong ``--socket``).
        TransportError: another process listens on it, or it cannot be probed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TransportError("cannot use socket path %s: %s" % (path, exc.strerror),
                             exc.errno or 0, path) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("socket path %s exists and is not a socket; refusing to replace it"
                          % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)             # a socket nobody listens on: left by a run that died
        return
    except TimeoutError:
        pass                        # a full backlog: a live listener too
    except OSError as exc:
        # EACCES and the like: we cannot tell whether it is in use, so it is not ours to take.
        raise TransportError("cannot use socket path %s: %s" % (path, exc.strerror),
                             exc.errno or 0, path) from None
    finally:
        probe.close()
    raise TransportError("another process is listening on %s (a zeroline plugin already "
                         "running?); refusing to take its socket" % path, errno.EADDRINUSE, path)


def bind_socket(path, mode=SOCKET_MODE):
    """A unix socket bound at ``path`` with ``mode``, not yet listening.

    bind() creates the file with the umask's mode; the chmod comes before listen(), and until
    listen() every connect is refused, so there is no moment where the umask lets anyone in."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            os.chmod(path, mode)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(socket_path, state_dir, retention_s=DEFAULT_RETENTION_S, ready=None, stop=None,
                plugin=None):
    """Serve the plugin until ``stop`` (an asyncio.Event) is set; ``ready`` is set when listening.
    ``plugin`` may be given (a :class:`Plugin` on ``state_dir``) to look at its state.

    The socket gets mode 0660 (owned by the user the plugin runs as: root:root in a managed
    plugin) and is removed when serving ends.

    Raises:
        ConfigError: ``socket_path`` exists and is not a socket.
        TransportError: another process listens on ``socket_path``.
        OSError: the socket cannot be bound (e.g. its directory cannot be written).
    """
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    prepare_socket_path(socket_path)
    sock = bind_socket(socket_path)
    bound_inode = os.stat(socket_path).st_ino
    runner = None
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        if plugin is None:
            plugin = Plugin(state_dir, retention_s)
        plugin.clean_old_copies()
        # Before listening: a StopLogging the daemon retries must find the instance.
        plugin.reattach()
        plugin.clean_spools()
        runner = web.AppRunner(make_app(plugin), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        loop = asyncio.get_running_loop()

        def hourly():
            plugin.clean_old_copies()
            if plugin.close_idle_sinks():
                plugin.clean_spools()
            handle[0] = loop.call_later(3600, hourly)

        handle = [loop.call_later(3600, hourly)]
        if ready is not None:
            ready.set()
        try:
            if stop is None:
                stop = asyncio.Event()
            await stop.wait()
        finally:
            handle[0].cancel()
            await plugin.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        sock.close()
        try:
            # Only our own socket: a new plugin may already have replaced it.
            if os.stat(socket_path).st_ino == bound_inode:
                os.unlink(socket_path)
        except OSError:
            pass
    return plugin
