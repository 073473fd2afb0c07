"""Docker logging-plugin benchmarks (issue 4): FIFO → LogEntry decode → zmq for 100 streams, and
LogEntry decoding alone, compiled vs the pure-Python twin vs the ``protobuf`` package.

Rows, on workload W1 only (100-byte lines, as the issue's targets):

  plug     100 FIFOs → zeroline.supervisor.Supervisor (uvloop, 64 KiB reads, one compiled
           ``core.EntryStream`` per FIFO, one PUSH socket, default options, as the plugin sets it
           up) → receiver process (compiled Receiver, RCVHWM 0) checking count and CRC-32 per
           stream; the writer writes whole 64 KiB blocks of frames (see "Writer")
  plug_py  the same with the pure-Python twin ``zeroline._logentry_py.EntryStream`` (fewer entries)
  plug_1w  design row (full runs or --rows): ``plug`` with one write() per entry, as dockerd writes
  dec      compiled ``EntryStream.feed`` on 64 KiB buffers (the supervisor's read size) + clear(),
           in memory: decoding and framing, no socket
  dec_py   the same with the pure-Python twin
  dec_pb   the ``protobuf`` package: length prefix by struct + ``LogEntry.FromString`` per entry,
           and the same seed payload built in Python as a 3-frame list (no zmq); it reads only
           ``line`` (the seed payload needs nothing else), so it is the cheapest protobuf path

Entries. The first lines of W1 are encoded ONCE per run, before any timing, with the ``protobuf``
package from tests/data/entry.proto (compiled with grpc_tools.protoc): the reference encoder, not
zeroline's own. Each line becomes one ``[uint32 BE length][LogEntry]`` frame with source "stdout",
a nanosecond timestamp and the line without its newline (123 bytes a frame for W1); a line of 16 KiB
or more (W2 only) becomes 16 KiB chunks with partial metadata, as Docker's copier cuts it. Without
grpc_tools or protobuf the rows are skipped with a note.

FIFOs. The plugin process (a forkserver child) makes 100 FIFOs (os.mkfifo 0700) and forks the
writer before it creates any zmq context; the writer opens every FIFO read-write (O_RDWR), as
dockerd does before StartLogging, and only then does the plugin side open them read-only and
non-blocking (as ``docker_plugin.Plugin.start_logging``) and add one copier per FIFO. Stream i's
container id is ``bench%07d`` (as the sup rows): the receiver tells streams apart by their payloads.

Writer. One thread-free process, epoll over the 100 non-blocking FIFOs, every stream writing the
same first L entries, all released at once by one "go" byte. ``plug`` and ``plug_py`` write up to
64 KiB of frames per write() (a frame may straddle two writes, as it may straddle two reads
anyway): the throughput of the plugin, not of a Python writer. ``plug_1w`` writes one frame per
write(), dockerd's way; its Python writer then costs about as much CPU as the plugin (reported as
``writer CPU``), which on 2 cores is part of what it measures.

Timing and costs as the sup rows: entries (all streams) over go → the later of the supervisor's
end and the receiver's last message; CPU is the plugin process (libzmq's I/O thread included,
the writer apart); RSS is its VmHWM; MB/s counts FIFO bytes (frames). Decode rows time whole passes
over the frames held in memory, repeated until ``min_time_s``; an untimed first pass takes every
message and checks count and CRC-32 of the payloads against the text the entries were made from.
"""

from __future__ import annotations

import os
import resource
import select
import shutil
import struct
import sys
import tempfile
import time
import zlib

from .bench_core import (CONTAINER_ID, PREFIX, SERVICE, TENANT, Child, child_timeout_s,
                         vmhwm_mb)
from .bench_e2e import CHILD_READY_S, LINGER_MS, run_pair
from .bench_supervisor import (CHATTY_STREAMS, _demux_receiver, _reap_writer, _run_loop,
                               check_supervisor, prefix_bytes, stream_id, stream_key,
                               stream_prefix)
from .workloads import LINE_LIMIT_BYTES, _pieces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = os.path.join(ROOT, "tests", "data", "entry.proto")

PLUG_ROWS = {
    # row: (EntryStream implementation, writes)
    "plug": ("cython", "blocks"),
    "plug_py": ("python", "blocks"),
    "plug_1w": ("cython", "entry"),
}
DECODE_ROWS = {"dec": "cython", "dec_py": "python", "dec_pb": "protobuf"}

#: The writer's write size in "blocks" mode (whole frames and the start of the next).
WRITE_BYTES = 64 * 1024
#: Decode rows feed buffers of the supervisor's read size (zeroline.supervisor.READ_BYTES).
DECODE_CHUNK_BYTES = 64 * 1024
#: Entry timestamps: a fixed base (late 2026) plus one microsecond per line (9-byte varints).
TIME_BASE_NS = 1_795_000_000_000_000_000
TIME_STEP_NS = 1_000
SOURCE = "stdout"
#: The writer polls for writable FIFOs this often (to look at its deadline).
WRITER_POLL_S = 0.1
_LEN = struct.Struct(">I")


# ---------------------------------------------------------------------------------------------
# Entries, encoded once per run with the protobuf package


class EntryFile:
    """Frames of the first ``lines`` lines of a workload, written to ``path``.

    ``ends[k]`` is the byte offset after the frames of the first k lines; ``entries[k]`` how many
    frames they are (more than k only for lines cut into 16 KiB chunks).
    """

    def __init__(self, path, pb_dir, lines, ends, entries, note):
        self.path = path
        self.pb_dir = pb_dir
        self.lines = lines
        self.ends = ends
        self.entries = entries
        self.note = note

    def nbytes(self, lines):
        return self.ends[lines]


def load_pb2(pb_dir):
    """The ``entry_pb2`` module compiled into ``pb_dir``."""
    if "entry_pb2" in sys.modules:
        # Already imported (the same .proto; a second registration would clash).
        return sys.modules["entry_pb2"]
    sys.path.insert(0, pb_dir)
    try:
        import entry_pb2
    finally:
        sys.path.remove(pb_dir)
    return entry_pb2


def compile_proto(out_dir):
    """``(pb_dir, None)`` with entry_pb2.py compiled from tests/data/entry.proto, or
    ``(None, why)`` when grpc_tools or protobuf is missing or protoc fails."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        return None, "grpc_tools not installed (%s): pip install grpcio-tools" % exc
    try:
        import google.protobuf  # noqa: F401
    except ImportError as exc:
        return None, "protobuf not installed (%s): pip install protobuf" % exc
    if not os.path.exists(PROTO):
        return None, "no %s" % os.path.relpath(PROTO, ROOT)
    pb_dir = os.path.join(out_dir, "pb")
    os.makedirs(pb_dir, exist_ok=True)
    rc = protoc.main(["protoc", "-I" + os.path.dirname(PROTO), "--python_out=" + pb_dir, PROTO])
    if rc != 0:
        return None, "grpc_tools.protoc failed on %s (exit %s)" % (os.path.relpath(PROTO, ROOT),
                                                                   rc)
    return pb_dir, None


def protobuf_note():
    from google.protobuf import __version__
    try:
        from google.protobuf.internal import api_implementation
        kind = api_implementation.Type()
    except ImportError:
        kind = "?"
    return "protobuf %s (%s backend)" % (__version__, kind)


def encode_entries(pb2, text_path, lines, out_path, limit=LINE_LIMIT_BYTES):
    """Encode the first ``lines`` lines of ``text_path`` as frames; returns (ends, entries)."""
    LogEntry = pb2.LogEntry
    ends = [0]
    entries = [0]
    count = size = 0
    with open(text_path, "rb") as src, open(out_path, "wb") as out:
        block = []
        for i in range(lines):
            line = src.readline()
            if not line.endswith(b"\n"):
                raise ValueError("%s has fewer than %d lines" % (text_path, lines))
            line = line[:-1]
            t = TIME_BASE_NS + i * TIME_STEP_NS
            if len(line) < limit:
                data = LogEntry(source=SOURCE, time_nano=t, line=line).SerializeToString()
                block.append(_LEN.pack(len(data)) + data)
                size += 4 + len(data)
                count += 1
            else:
                # Docker's copier: 16 KiB chunks with partial metadata, the last one last=true.
                pieces = list(_pieces(line, limit))
                for ordinal, piece in enumerate(pieces, 1):
                    e = LogEntry(source=SOURCE, time_nano=t, line=piece, partial=True)
                    e.partial_log_metadata.id = "%064x" % (i + 1)
                    e.partial_log_metadata.ordinal = ordinal
                    e.partial_log_metadata.last = ordinal == len(pieces)
                    data = e.SerializeToString()
                    block.append(_LEN.pack(len(data)) + data)
                    size += 4 + len(data)
                    count += 1
            ends.append(size)
            entries.append(count)
            if len(block) >= 16384:
                out.write(b"".join(block))
                block.clear()
        out.write(b"".join(block))
    return ends, entries


def prepare(work_dir, wl, lines):
    """``(EntryFile, None)`` for the first ``lines`` lines of ``wl``, or ``(None, why)``."""
    pb_dir, why = compile_proto(work_dir)
    if why:
        return None, why
    pb2 = load_pb2(pb_dir)
    lines = min(lines, wl.lines)
    path = os.path.join(work_dir, "%s.entries" % wl.name)
    ends, entries = encode_entries(pb2, wl.path, lines, path)
    return EntryFile(path, pb_dir, lines, ends, entries, protobuf_note()), None


# ---------------------------------------------------------------------------------------------
# Writer process: dockerd's side of 100 FIFOs (forked by the plugin process; never returns)


def _frame_ends(data):
    ends = []
    pos = 0
    while pos + 4 <= len(data):
        pos += 4 + _LEN.unpack_from(data, pos)[0]
        ends.append(pos)
    if pos != len(data):
        raise ValueError("the entries do not end at a frame boundary")
    return ends


def _fork_fifo_writer(paths, data, write_mode, deadline):
    """Fork the writer; returns (pid, ready fd, go fd, cpu fd)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    cpu_r, cpu_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            os.close(cpu_r)
            _fifo_writer_main(paths, data, write_mode, ready_w, go_r, cpu_w, deadline)
        finally:
            os._exit(6)
    os.close(ready_w)
    os.close(go_r)
    os.close(cpu_w)
    return pid, ready_r, go_w, cpu_r


def _fifo_writer_main(paths, data, write_mode, ready_fd, go_fd, cpu_fd, deadline):
    status = 0
    try:
        ends = _frame_ends(data) if write_mode == "entry" else None
        # As dockerd: every FIFO opened read-write (no blocking open, no EPIPE), before the
        # plugin hears of it.
        fds = [os.open(p, os.O_RDWR | os.O_NONBLOCK) for p in paths]
        os.write(ready_fd, b"r")
        ready, _, _ = select.select([go_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not (ready and os.read(go_fd, 1)):
            status = 3
        else:
            status = _write_all(fds, data, ends, deadline)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        ru = resource.getrusage(resource.RUSAGE_SELF)
        os.write(cpu_fd, b"%.6f" % (ru.ru_utime + ru.ru_stime))
    except BaseException:
        status = 5
    finally:
        os._exit(status)


def _write_all(fds, data, ends, deadline):
    """Write ``data`` to every fd (64 KiB blocks, or one frame per write when ``ends`` is given),
    closing each fd at its end (the plugin's EOF); 0, or 4 when the deadline came first."""
    view = memoryview(data)
    size = len(data)
    ep = select.epoll()
    pos = dict.fromkeys(fds, 0)
    frame = dict.fromkeys(fds, 0)       # index of the next frame end (entry mode)
    try:
        for fd in fds:
            ep.register(fd, select.EPOLLOUT)
        write = os.write
        while pos and time.monotonic() < deadline:
            for fd, _ in ep.poll(WRITER_POLL_S):
                p, k = pos[fd], frame[fd]
                try:
                    if ends is None:
                        # Up to 64 KiB per readiness event: a fair turn for every stream.
                        p += write(fd, view[p:min(p + WRITE_BYTES, size)])
                    else:
                        stop = min(p + WRITE_BYTES, size)
                        while p < stop:
                            # One write per entry; an entry over PIPE_BUF may go in parts.
                            p += write(fd, view[p:ends[k]])
                            if p == ends[k]:
                                k += 1
                except BlockingIOError:
                    pass
                pos[fd], frame[fd] = p, k
                if p >= size:
                    ep.unregister(fd)
                    os.close(fd)
                    del pos[fd]
        return 4 if pos else 0
    finally:
        ep.close()


# ---------------------------------------------------------------------------------------------
# Plugin process: the real Supervisor with one EntryStream per FIFO


def _entry_stream_class(impl):
    if impl == "python":
        from zeroline._logentry_py import EntryStream
    else:
        from zeroline._core import EntryStream
    return EntryStream


def _plug_sender(impl, write_mode, endpoint, fifo_dir, n_streams, entries_path, nbytes,
                 deadline_s):
    import zmq

    EntryStream = _entry_stream_class(impl)
    deadline = time.monotonic() + deadline_s
    with open(entries_path, "rb") as f:
        data = f.read(nbytes)
    need = 2 * n_streams + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    os.makedirs(fifo_dir, mode=0o700)
    paths = [os.path.join(fifo_dir, "%03d.fifo" % i) for i in range(n_streams)]
    for p in paths:
        os.mkfifo(p, 0o700)
    # Fork first: no zmq context, event loop or thread exists yet in this process.
    pid, ready_fd, go_fd, cpu_fd = _fork_fifo_writer(paths, data, write_mode, deadline + 5.0)
    zctx = sock = None
    rfds = []
    res = {}
    try:
        ready, _, _ = select.select([ready_fd], [], [], min(CHILD_READY_S, deadline_s))
        if not (ready and os.read(ready_fd, 1) == b"r"):
            raise RuntimeError("the FIFO writer did not open its FIFOs")
        # The plugin's open (docker_plugin.Plugin.start_logging): read-only, non-blocking.
        rfds = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in paths]
        zctx = zmq.Context()
        sock = zctx.socket(zmq.PUSH)        # default options, as the plugin's sink
        sock.connect(endpoint)

        def make_streams():
            return [EntryStream(framing="seed", tenant=TENANT, service=SERVICE,
                                container_id=stream_id(i)) for i in range(n_streams)]

        owned, rfds = rfds, []      # from here the copiers close them
        res = _run_loop(sock, owned, make_streams, go_fd, deadline, "events")
        streams = res.pop("streams")
        res["lines_total"] = sum(s.entries_total for s in streams)
        res["entry_errors"] = sum(s.errors_total for s in streams)
        res["entry_bytes"] = sum(s.entry_bytes_total for s in streams)
        res["sent"] = sum(s.sent_total for s in streams)
        res["pending"] = sum(s.pending_messages for s in streams)
        res["peak_rss_mb"] = vmhwm_mb()
        return res
    finally:
        for fd in rfds + [go_fd, ready_fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        if sock is not None:
            sock.close(linger=LINGER_MS)
        if zctx is not None:
            zctx.term()
        status, cpu = _reap_writer(pid, cpu_fd, max(1.0, deadline + 5.0 - time.monotonic()))
        res["writer_status"] = status
        res["cpu_writer_s"] = cpu
        shutil.rmtree(fifo_dir, ignore_errors=True)


def measure_plugin(ctx, row, wl, entry_file, endpoint, work_dir, lines_per_stream, digest):
    """One plug* row: ``digest(nbytes, prefix) -> (messages, crc)`` of the text lines gives each
    stream's check (seed payload = ``<container id>: `` + line)."""
    impl, write_mode = PLUG_ROWS[row]
    n = CHATTY_STREAMS
    lines_per_stream = min(lines_per_stream, entry_file.lines)
    text_bytes = prefix_bytes(wl.path, lines_per_stream)
    want = {stream_key(i): digest(text_bytes, stream_prefix(i)) for i in range(n)}
    expected = {key: m for key, (m, _) in want.items()}
    entries = sum(expected.values())
    per_stream = entry_file.entries[lines_per_stream]
    if entries != n * per_stream:
        raise ValueError("entries (%d) and digests (%d) disagree" % (n * per_stream, entries))
    nbytes = entry_file.nbytes(lines_per_stream)
    limit_s = child_timeout_s(entries)
    fifo_dir = tempfile.mkdtemp(prefix="fifos-%s-" % row, dir=work_dir)
    os.rmdir(fifo_dir)      # the plugin process makes it (and removes it)
    try:
        sres, rres, error = run_pair(
            ctx, _demux_receiver, dict(endpoint=endpoint, expected=expected, chatty=list(expected)),
            "bench-plug-receiver", _plug_sender,
            dict(impl=impl, write_mode=write_mode, endpoint=endpoint, fifo_dir=fifo_dir,
                 n_streams=n, entries_path=entry_file.path, nbytes=nbytes,
                 deadline_s=limit_s - 15.0),
            "bench-plugin", limit_s)
    finally:
        shutil.rmtree(fifo_dir, ignore_errors=True)
    if error:
        return {"error": error}
    return check_plugin(sres, rres, want, per_stream, nbytes, impl, write_mode)


def check_plugin(sres, rres, want, per_stream, nbytes, impl, write_mode):
    """The row's numbers and checks: every stream's count and CRC at the receiver (as the sup
    rows), no malformed or truncated entry, and every FIFO byte read. ``per_stream``/``nbytes``:
    entries and frame bytes written to each FIFO."""
    n = len(want)
    res = check_supervisor(sres, rres, want, n * per_stream, n, 0, per_stream, nbytes * n,
                           "loop", 0)
    res["mode"] = "%s, %s writes" % (impl, write_mode)
    extra = []
    if "error" not in res:
        if sres.get("entry_errors"):
            extra.append("%d malformed/truncated entries" % sres["entry_errors"])
        if sres.get("entry_bytes") != nbytes * n:
            extra.append("read %s FIFO bytes, wrote %d" % (sres.get("entry_bytes"), nbytes * n))
    if extra:
        res["error"] = "; ".join(extra)
        res["verified"] = "FAIL"
    return res


# ---------------------------------------------------------------------------------------------
# Decoding alone, in memory


def _stream_pass(impl):
    EntryStream = _entry_stream_class(impl)

    def make():
        return EntryStream(framing="seed", tenant=TENANT, service=SERVICE,
                           container_id=CONTAINER_ID)

    def timed(stream, chunks):
        feed, clear = stream.feed, stream.clear
        n = 0
        for chunk in chunks:
            n += feed(chunk)
            clear()
        return n

    def checked(stream, chunks):
        n = crc = 0
        for chunk in chunks:
            n += stream.feed(chunk)
            for frames in stream.take():
                crc = zlib.crc32(bytes(frames[2]) + b"\n", crc)
        stream.close()
        return n, crc, stream.errors_total

    return make, timed, checked


def _pb_pass(pb_dir):
    """The protobuf package's path: frame by struct, LogEntry.FromString, the seed payload."""
    from_string = load_pb2(pb_dir).LogEntry.FromString
    unpack_from = _LEN.unpack_from
    tenant, service, prefix = TENANT, SERVICE, PREFIX

    def run(chunks, out):
        carry = b""
        for chunk in chunks:
            buf = carry + chunk if carry else chunk
            size = len(buf)
            pos = 0
            while size - pos >= 4:
                (length,) = unpack_from(buf, pos)
                if size - pos - 4 < length:
                    break
                entry = from_string(buf[pos + 4:pos + 4 + length])
                out.append([tenant, service, prefix + entry.line])
                pos += 4 + length
            carry = buf[pos:]
            yield out
            out.clear()
        if carry:
            raise ValueError("input ends inside a frame")

    def make():
        return []

    def timed(out, chunks):
        n = 0
        for batch in run(chunks, out):
            n += len(batch)
        return n

    def checked(out, chunks):
        n = crc = 0
        for batch in run(chunks, out):
            n += len(batch)
            for frames in batch:
                crc = zlib.crc32(frames[2] + b"\n", crc)
        return n, crc, 0

    return make, timed, checked


def _decode(impl, entries_path, nbytes, min_time_s, max_passes, pb_dir,
            chunk_bytes=DECODE_CHUNK_BYTES):
    with open(entries_path, "rb") as f:
        data = f.read(nbytes)
    chunks = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    del data
    make, timed, checked = _pb_pass(pb_dir) if impl == "protobuf" else _stream_pass(impl)
    # Untimed first pass (also the warm-up): every payload checked by the parent.
    messages, crc, errors = checked(make(), chunks)
    target = make()
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    wall_ns = cpu_ns = 0
    decoded = passes = 0
    while passes < max_passes and (passes == 0 or wall_ns < min_time_s * 1e9):
        c0 = cpu_clock()
        t0 = clock()
        decoded += timed(target, chunks)
        t1 = clock()
        c1 = cpu_clock()
        wall_ns += t1 - t0
        cpu_ns += c1 - c0
        passes += 1
    return {"passes": passes, "decoded": decoded, "check_messages": messages, "check_crc": crc,
            "check_errors": errors, "wall_s": wall_ns / 1e9, "cpu_send_s": cpu_ns / 1e9,
            "peak_rss_mb": vmhwm_mb()}


def measure_decode(ctx, row, wl, entry_file, lines, min_time_s, digest, max_passes=1000):
    """One dec* row over the frames of the first ``lines`` lines: ``digest(nbytes, prefix)``."""
    impl = DECODE_ROWS[row]
    lines = min(lines, entry_file.lines)
    entries = entry_file.entries[lines]
    nbytes = entry_file.nbytes(lines)
    messages, crc = digest(prefix_bytes(wl.path, lines), PREFIX)
    child = Child(ctx, _decode, dict(impl=impl, entries_path=entry_file.path, nbytes=nbytes,
                                     min_time_s=min_time_s, max_passes=max_passes,
                                     pb_dir=entry_file.pb_dir), "bench-decode")
    try:
        res = child.wait(child_timeout_s(entries * 4))
    finally:
        child.stop()
    if "error" in res:
        res["verified"] = "FAIL"
        return res
    passes = res["passes"]
    res.update(lines=entries * passes, nbytes=nbytes * passes, cpu_recv_s=0.0,
               messages=res["decoded"])
    errors = []
    if (res["check_messages"], res["check_errors"]) != (messages, 0):
        errors.append("check pass: %d of %d messages, %d bad entries"
                      % (res["check_messages"], messages, res["check_errors"]))
    elif res["check_crc"] != crc:
        errors.append("check pass: payload checksum differs")
    if res["decoded"] != entries * passes:
        errors.append("decoded %d messages, expected %d" % (res["decoded"], entries * passes))
    if not res["wall_s"] > 0:
        errors.append("no usable timing")
    if errors:
        res["error"] = "; ".join(errors)
    res["verified"] = "count+crc" if not errors else "FAIL"
    return res

