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

Errors are answered in the protocol's ``Err`` field with status 200 (the daemon shows the text);
a body that is not JSON gets status 400. One container's trouble never stops the others.
"""

import asyncio
import collections
import gzip
import json
import os
import shutil
import stat
import struct
import sys
import time
from datetime import datetime

from aiohttp import web

from . import core
from .config import (ContainerInfo, extra_attributes, parse_bool, parse_decimal_size,
                     tenant_service, validate_log_opts)
from .errors import ConfigError, ZerolineError
from .output import Sink
from .supervisor import Supervisor

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
    """``container.log`` plus rotated ``.1`` … ``.N-1`` (gzip-compressed when ``compress``)."""

    def __init__(self, directory, max_size=LOCAL_MAX_SIZE, max_file=LOCAL_MAX_FILE, compress=True):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, "container.log")
        self.max_size = max_size
        self.max_file = max_file
        self.compress = compress and max_file > 1
        self._file = open(self.path, "ab")
        os.chmod(self.path, 0o640)
        self._size = self._file.tell()

    def write(self, records):
        """Append whole ``[len][entry][len]`` records. As Docker's rotation, the size is checked
        before each record, so a file can go over max_size by one record."""
        pos, size = 0, len(records)
        while pos < size:
            if self.max_size > 0 and self._size >= self.max_size:
                self.rotate()
            # Take every record that starts while the file is still under max_size.
            end = pos
            room = self.max_size - self._size if self.max_size > 0 else size
            while end < size and (end - pos) < room:
                (length,) = _LEN.unpack_from(records, end)
                end += length + 8
            self._file.write(records[pos:end])
            self._size += end - pos
            pos = end
        self._file.flush()

    def rotate(self):
        self._file.close()
        if self.max_file <= 1:
            os.unlink(self.path)
        else:
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
                # Compressed before the next write: the file stays readable as .1 until the .gz
                # is complete, as Docker's own rotation does.
                with open(self.path + ".1", "rb") as src, gzip.open(self.path + ".1.gz.tmp",
                                                                     "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.rename(self.path + ".1.gz.tmp", self.path + ".1.gz")
                os.unlink(self.path + ".1")
        self._file = open(self.path, "ab")
        os.chmod(self.path, 0o640)
        self._size = 0

    def close(self):
        self._file.close()


def local_files(directory):
    """The copy's files, oldest first."""
    base = os.path.join(directory, "container.log")
    rotated = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.startswith("container.log."):
            index = name[len("container.log."):].split(".")[0]
            if index.isdigit() and not name.endswith(".tmp"):
                rotated.append((int(index), os.path.join(directory, name)))
    files = [path for _, path in sorted(rotated, reverse=True)]
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

    def __init__(self, plugin, path, fd, info, options, sink_entry, local):
        self.plugin = plugin
        self.path = path
        self.fd = fd
        self.info = info
        self.options = options
        self.sink, self.supervisor = sink_entry
        self.local = local
        self.copier = None
        self.stopping = False
        self.done = asyncio.get_running_loop().create_future()
        tenant, service = tenant_service(info.env)
        cid = info.short_id if options.container_id_format == "short" else info.container_id
        self.stream = core.EntryStream(
            framing=options.framing, tenant=tenant, service=service, container_id=cid,
            container_name=info.container_name, attrs=extra_attributes(info, options),
            max_pending_bytes=options.max_buffer_size if options.mode == "non-blocking" else -1,
            keep_local=local is not None)
        self._errors_logged = 0

    @property
    def name(self):
        return "%s (%s)" % (self.info.short_id or "?", os.path.basename(self.path)[:12])

    def start(self):
        # Reading starts at once; the supervisor holds the sends until the sink has a peer.
        self.copier = self.supervisor.add(self.fd, self.stream, self.name,
                                          blocking=self.options.mode == "blocking",
                                          on_feed=self._on_feed, on_finish=self._on_finish)

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


def _sink_key(options):
    return (options.address, options.socket, options.hwm, options.linger_s)


class Plugin:
    """State of the plugin process: logging instances by FIFO path, sinks by endpoint."""

    def __init__(self, state_dir, retention_s=DEFAULT_RETENTION_S):
        self.state_dir = state_dir
        self.retention_s = retention_s
        self.instances = {}                 # FIFO path -> LoggingInstance
        self.sinks = {}                     # sink key -> (Sink, Supervisor)
        self.by_container = collections.defaultdict(set)

    # -- handlers ----------------------------------------------------------------------------
    async def start_logging(self, body):
        path = body.get("File")
        info_json = body.get("Info") or {}
        if not isinstance(path, str) or not path:
            return "StartLogging: missing File"
        if not isinstance(info_json, dict):
            return "StartLogging: Info must be an object"
        if path in self.instances:
            return "StartLogging: already logging to %s" % path
        try:
            info = ContainerInfo.from_docker(info_json)
            config = info_json.get("Config") or {}
            if not isinstance(config, dict):
                return "StartLogging: Info.Config must be an object"
            options = validate_log_opts({str(k): str(v) for k, v in config.items()})
            local = self._local_copy(info, config)
        except ZerolineError as exc:
            return str(exc)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if local is not None:
                local.close()
            return "cannot open the log FIFO %s: %s" % (path, exc.strerror)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            if local is not None:
                local.close()
            return "%s is not a FIFO" % path
        try:
            sink_entry = self._sink(options)
        except ZerolineError as exc:
            os.close(fd)
            if local is not None:
                local.close()
            return str(exc)
        instance = LoggingInstance(self, path, fd, info, options, sink_entry, local)
        self.instances[path] = instance
        self.by_container[info.container_id].add(instance)
        instance.start()
        return ""

    async def stop_logging(self, body):
        path = body.get("File")
        instance = self.instances.get(path) if isinstance(path, str) else None
        if instance is None:
            return "StopLogging: no logging instance for %s" % (path,)
        instance.stop()
        return ""

    def _local_copy(self, info, config):
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
        return LocalLog(self._copy_dir(info.container_id), max_size, max_file, compress)

    def _copy_dir(self, container_id):
        safe = "".join(c for c in container_id if c.isalnum()) or "unknown"
        return os.path.join(self.state_dir, safe, "local-logs")

    def _sink(self, options):
        key = _sink_key(options)
        entry = self.sinks.get(key)
        if entry is None:
            sink = Sink(options)
            supervisor = Supervisor(sink.socket, asyncio.get_running_loop())
            entry = self.sinks[key] = (sink, supervisor)
            if not sink.poll_peer(0):
                # A pub socket drops what it sends before a first subscriber: hold the sends (in
                # blocking mode the containers then wait, as with a full pipe).
                supervisor.hold()
                asyncio.get_running_loop().create_task(self._release_on_peer(sink, supervisor))
        return entry

    async def _release_on_peer(self, sink, supervisor):
        started, warned = time.monotonic(), False
        while not sink.poll_peer(0):
            if sink.closed:
                return
            if not warned and time.monotonic() - started > sink.options.peer_wait_s > 0:
                warned = True
                _log("no peer at %s yet; holding logs until one connects" % sink.endpoint)
            await asyncio.sleep(0.05)
        supervisor.release()

    def _instance_done(self, instance):
        self.instances.pop(instance.path, None)
        self.by_container[instance.info.container_id].discard(instance)
        if not self.by_container[instance.info.container_id]:
            del self.by_container[instance.info.container_id]
        st = instance.stream.stats()
        if st["dropped_total"] or instance.stream.errors_total:
            instance._report("closed: %d entries, %d dropped, %d malformed"
                             % (instance.stream.entries_total, st["dropped_total"],
                                instance.stream.errors_total))

    # -- ReadLogs ----------------------------------------------------------------------------
    async def read_logs(self, request, body):
        info_json = body.get("Info") or {}
        config = body.get("Config") or {}
        if not isinstance(info_json, dict) or not isinstance(config, dict):
            return web.json_response({"Err": "ReadLogs: Info and Config must be objects"})
        try:
            info = ContainerInfo.from_docker(info_json)
            since = parse_docker_time(config.get("Since"))
            until = parse_docker_time(config.get("Until"))
            tail = int(config.get("Tail", -1))
        except (ValueError, TypeError, ZerolineError) as exc:
            return web.json_response({"Err": "ReadLogs: bad Config: %s" % exc})
        follow = bool(config.get("Follow"))
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
        for instance in list(self.instances.values()):
            instance.copier.finish()
        for sink, supervisor in self.sinks.values():
            await supervisor.drain(sink.options.linger_s)
            supervisor.close()
            sink.close()


# ---------------------------------------------------------------------------------------------
# HTTP

def _err(text):
    return web.json_response({"Err": text})


async def _json_body(request, required=True):
    raw = await request.read()
    if not raw.strip():
        if required:
            raise web.HTTPBadRequest(text=json.dumps({"Err": "empty request body"}),
                                     content_type="application/json")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"Err": "cannot parse request: %s" % exc}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"Err": "request body must be a JSON object"}),
                                 content_type="application/json")
    return body


def make_app(plugin):
    """The aiohttp application answering the daemon's plugin requests."""

    async def activate(request):
        await request.read()
        return web.json_response({"Implements": ["LogDriver"]})

    async def capabilities(request):
        await request.read()
        return web.json_response({"Cap": {"ReadLogs": True}, "Err": ""})

    async def start_logging(request):
        return _err(await plugin.start_logging(await _json_body(request)))

    async def stop_logging(request):
        return _err(await plugin.stop_logging(await _json_body(request)))

    async def read_logs(request):
        return await plugin.read_logs(request, await _json_body(request))

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/Plugin.Activate", activate)
    app.router.add_post("/LogDriver.Capabilities", capabilities)
    app.router.add_post("/LogDriver.StartLogging", start_logging)
    app.router.add_post("/LogDriver.StopLogging", stop_logging)
    app.router.add_post("/LogDriver.ReadLogs", read_logs)
    return app


async def serve(socket_path, state_dir, retention_s=DEFAULT_RETENTION_S, ready=None, stop=None,
                plugin=None):
    """Serve the plugin until ``stop`` (an asyncio.Event) is set; ``ready`` is set when listening.
    ``plugin`` may be given (a :class:`Plugin` on ``state_dir``) to look at its state."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)      # a stale socket of a previous run
    if plugin is None:
        plugin = Plugin(state_dir, retention_s)
    plugin.clean_old_copies()
    runner = web.AppRunner(make_app(plugin), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, socket_path)
    await site.start()
    loop = asyncio.get_running_loop()

    def hourly():
        plugin.clean_old_copies()
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
        await runner.cleanup()
    return plugin
