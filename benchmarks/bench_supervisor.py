"""Service-level benchmarks (issue 3): many streams through the supervisor, forward → collect →
files, the collector's receive path alone, and prototypes of the designs not taken.

Rows, on workload W1 only (100-byte lines, as the issue's targets):

  sup         100 chatty streams → zeroline.supervisor.Supervisor (uvloop; copiers are loop
              readers, 64 KiB reads, one core Stream per fd, one PUSH socket, default options) →
              receiver process (compiled Receiver, RCVHWM 0) checking count and CRC-32 per stream
  sup_t2/_t4  prototype: the same streams on K worker threads, each with epoll over its share of
              the fds, its own Streams and its own PUSH socket: read → feed → send(block=True)
  sup500*     the same three with 400 idle streams more (one line each, written at the end)
  sup_fdspin  the Supervisor with its old ZMQ_FD handler (retry on every wake-up)
  fwd_col     ``zeroline forward < file`` → ipc → ``zeroline collect --out DIR --count N`` →
              file, timed at the file from its first line to its last
  rx, rx_py   receive path alone on a queue filled beforehand: compiled Receiver.recv +
              take_payloads vs a Python recv_multipart loop

Streams. A writer process (forked by the supervisor process before it makes any zmq context) runs
one thread per chatty pipe; each writes the same first L lines of W1 in 64 KiB writes, all released
at once by one "go" byte. Stream i's container id is ``bench%07d`` so its payloads start with
``bench0000042: ``; the receiver tells streams apart by the id's last three digits.

Fairness (issue 3: "under equal load the fastest stream's rate is at most 2× the slowest's"):
at the moment the first chatty stream has all L lines at the receiver, the receiver counts every
chatty stream's lines; fairness = max count / min count. Over that window every stream was being
written at full speed, so the counts are the streams' rates over one interval: 1.0 is perfectly
fair. ``spread`` is the end-of-run view: max/min over chatty streams of L / (its last line's
arrival − go).

Throughput is lines (all streams) over go → the later of the supervisor's end and the receiver's
last message, as row b (sender start → last message). CPU is the supervisor process (libzmq's I/O
thread included; the writer process is reported apart as ``cpu_writer_s``); RSS is its VmHWM.
``kib_per_stream`` is VmRSS growth while the streams were created and registered, over their
number: what an idle stream costs before any data (it holds no buffer until its first read).
"""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import subprocess
import threading
import time
import zlib
from collections import Counter, defaultdict

from .bench_core import (CONTAINER_ID, PREFIX, SERVICE, TENANT, Child, child_timeout_s,
                         core_module, cpu_s, vmhwm_mb)
from .bench_e2e import CHILD_READY_S, LINGER_MS, RECV_IDLE_S, _stream_sender, run_pair

#: Chatty streams of the sup* rows, and idle ones added by the sup500* rows.
CHATTY_STREAMS = 100
IDLE_STREAMS = 400
#: Each writer thread's write size: a buffered program flushing big blocks, so the writer process
#: costs little CPU next to the supervisor (the pipe holds 64 KiB either way).
WRITE_BYTES = 64 * 1024
#: Container id of stream i (12 characters, a short Docker id's length); its last three characters
#: (``KEY_AT``) name the stream in the receiver.
STREAM_ID = "bench%07d"
KEY_AT = 9
KEY_LEN = 3
MAX_STREAMS = 10 ** KEY_LEN
#: Worker threads wake this often to look at their deadline.
POLL_S = 0.1
#: The launcher's poll of the collector's output file (the fwd_col timing resolution).
FILE_POLL_S = 0.001
#: After the sender of a rx row finished, the receiver lets libzmq's I/O thread settle this long.
RX_SETTLE_S = 0.05

SUP_ROWS = {
    # row: (mode, worker threads, idle streams, ZMQ_FD handler)
    "sup": ("loop", 0, 0, "events"),
    "sup_t2": ("threads", 2, 0, None),
    "sup_t4": ("threads", 4, 0, None),
    "sup500": ("loop", 0, IDLE_STREAMS, "events"),
    "sup500_t2": ("threads", 2, IDLE_STREAMS, None),
    "sup500_t4": ("threads", 4, IDLE_STREAMS, None),
    "sup_fdspin": ("loop", 0, 0, "every"),
}


def stream_id(i):
    return STREAM_ID % i


def stream_prefix(i):
    return stream_id(i).encode() + b": "


def stream_key(i):
    return stream_id(i)[KEY_AT:KEY_AT + KEY_LEN].encode()


def vmrss_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def prefix_bytes(path, lines):
    """Byte length of the first ``lines`` lines of ``path``."""
    left = lines
    pos = 0
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(1 << 20)
            if not block:
                raise ValueError("%s has fewer than %d lines" % (path, lines))
            n = block.count(b"\n")
            if n < left:
                left -= n
                pos += len(block)
                continue
            cut = -1
            for _ in range(left):
                cut = block.index(b"\n", cut + 1)
            return pos + cut + 1
    return pos


# ---------------------------------------------------------------------------------------------
# Receiver side: per-stream count and CRC


class StreamTally:
    """Per-stream message counts and CRC-32s over ``take_payloads()`` batches, in arrival order.

    Args:
        expected: ``{key: messages}`` for every stream (key: :func:`stream_key`).
        chatty: keys whose first completion freezes the fairness window.
    """

    def __init__(self, expected, chatty):
        self.expected = dict(expected)
        self.chatty = frozenset(chatty)
        self.counts = dict.fromkeys(self.expected, 0)
        self.crcs = dict.fromkeys(self.expected, 0)
        self.done_at = {}
        self.window = None          # chatty counts when the first chatty stream completed
        self.unknown = 0            # messages of no expected stream

    def add(self, data, now):
        """One batch (payloads, each followed by a newline) received at ``now``."""
        records = data.split(b"\n")
        records.pop()
        keys = [r[KEY_AT:KEY_AT + KEY_LEN] for r in records]
        if self.window is None:
            counts, expected, chatty = self.counts, self.expected, self.chatty
            if any(counts.get(k, 0) + n >= expected[k] for k, n in Counter(keys).items()
                   if k in chatty):
                # The first completion is in this batch: one message at a time, so the window
                # closes exactly at the message that completed it.
                for key, record in zip(keys, records):
                    self._account(key, [record], now)
                return
        groups = defaultdict(list)
        for key, record in zip(keys, records):
            groups[key].append(record)
        for key, group in groups.items():
            self._account(key, group, now)

    def _account(self, key, records, now):
        if key not in self.expected:
            self.unknown += len(records)
            return
        crc = zlib.crc32(b"\n".join(records), self.crcs[key])
        self.crcs[key] = zlib.crc32(b"\n", crc)
        count = self.counts[key] = self.counts[key] + len(records)
        if count >= self.expected[key] and key not in self.done_at:
            self.done_at[key] = now
            if self.window is None and key in self.chatty:
                self.window = {k: self.counts[k] for k in self.chatty}

    def fairness(self):
        """max/min lines over chatty streams at the first completion, or None."""
        if not self.window:
            return None
        low = min(self.window.values())
        return max(self.window.values()) / low if low else float("inf")


def _demux_receiver(endpoint, expected, chatty, ready, sender_done, deadline_s, impl="cython"):
    import zmq

    core = core_module(impl)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RCVHWM, 0)      # as bench_e2e._receiver and zeroline collect
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        rx = core.Receiver()
        recv, take = rx.recv, rx.take_payloads
        batches = []
        keep = batches.append
        total = sum(expected.values())
        t_first = t_last = None
        ready.set()
        c0 = cpu_s()
        now = time.monotonic()
        deadline = now + deadline_s
        idle_since = now
        # Timed: receive and keep each batch with its arrival time, no more (row b's receiver
        # CRCs instead; splitting by stream costs ~10x that and would make this receiver, not
        # the supervisor, the bottleneck on 2 cores). The check runs afterwards, untimed.
        while rx.messages_total < total:
            n = recv(sock, 4096, 100)
            now = time.monotonic()
            if n:
                if t_first is None:
                    t_first = now
                t_last = idle_since = now
                keep((now, take()))
            elif now > deadline or (sender_done.is_set() and now - idle_since > RECV_IDLE_S):
                break
        c1 = cpu_s()
        rss = vmhwm_mb()
        for _ in range(3):          # untimed: anything more is a duplicate or an extra message
            if recv(sock, 4096, 30):
                keep((time.monotonic(), take()))
        tally = StreamTally(expected, chatty)
        for at, data in batches:
            tally.add(data, at)
        return {"messages": rx.messages_total, "malformed": rx.malformed_total,
                "counts": tally.counts, "crcs": tally.crcs, "done_at": tally.done_at,
                "window": tally.window, "fairness": tally.fairness(), "unknown": tally.unknown,
                "t_first": t_first, "t_last": t_last, "cpu_recv_s": c1 - c0,
                "recv_rss_mb": rss}
    finally:
        sock.close(0)
        zctx.term()


# ---------------------------------------------------------------------------------------------
# Writer process (forked by the supervisor process; never returns)


def _fork_writer(n_chatty, n_idle, path, nbytes, deadline):
    """Pipes for every stream and a forked writer; returns (pid, read fds, go fd, cpu fd)."""
    need = 2 * (n_chatty + n_idle) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    pipes = [os.pipe() for _ in range(n_chatty + n_idle)]
    go_r, go_w = os.pipe()
    cpu_r, cpu_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(cpu_r)
            for r, _ in pipes:
                os.close(r)
            writes = [w for _, w in pipes]
            _writer_main(writes[:n_chatty], writes[n_chatty:], path, nbytes, go_r, cpu_w,
                         deadline)
        finally:
            os._exit(6)
    os.close(go_r)
    os.close(cpu_w)
    for _, w in pipes:
        os.close(w)
    return pid, [r for r, _ in pipes], go_w, cpu_r


def _writer_main(chatty_fds, idle_fds, path, nbytes, go_fd, cpu_fd, deadline):
    status = 0
    try:
        with open(path, "rb") as f:
            data = f.read(nbytes)
        first = data[:data.index(b"\n") + 1]
        go = threading.Event()
        failed = []

        def write_all(fd):
            try:
                if go.wait(max(0.0, deadline - time.monotonic())):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view[:WRITE_BYTES]):]
            except OSError as exc:
                failed.append(exc)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=write_all, args=(fd,), daemon=True)
                   for fd in chatty_fds]
        for t in threads:
            t.start()
        ready, _, _ = select.select([go_fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready and os.read(go_fd, 1):
            go.set()
        else:
            status = 3
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # Idle streams: silent while the chatty ones ran, then one line each and EOF.
        for fd in idle_fds:
            try:
                if status == 0:
                    os.write(fd, first)
            except OSError as exc:
                failed.append(exc)
            finally:
                os.close(fd)
        if failed or any(t.is_alive() for t in threads):
            status = status or 4
        ru = resource.getrusage(resource.RUSAGE_SELF)
        os.write(cpu_fd, b"%.6f" % (ru.ru_utime + ru.ru_stime))
    except BaseException:
        status = 5
    finally:
        os._exit(status)


def _reap_writer(pid, cpu_fd, timeout_s):
    """Wait for the writer (SIGKILL after ``timeout_s``); returns (exit status, its CPU s)."""
    deadline = time.monotonic() + timeout_s
    status = None
    while status is None:
        got, raw = os.waitpid(pid, os.WNOHANG)
        if got:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -signal.SIGKILL
        else:
            time.sleep(0.005)
    cpu = None
    try:
        text = os.read(cpu_fd, 64)
        cpu = float(text) if text else None
    except (OSError, ValueError):
        pass
    finally:
        os.close(cpu_fd)
    return status, cpu


# ---------------------------------------------------------------------------------------------
# Supervisor process: the real Supervisor, or the worker-thread prototype


def _sup_sender(mode, threads, endpoint, n_chatty, n_idle, path, nbytes, deadline_s,
                zmq_fd="events", impl="cython"):
    import zmq

    core = core_module(impl)
    deadline = time.monotonic() + deadline_s
    # Fork first: no zmq context, event loop or thread exists yet in this process.
    pid, rfds, go_fd, cpu_fd = _fork_writer(n_chatty, n_idle, path, nbytes, deadline + 5.0)
    zctx = None
    sockets = []
    res = {}
    try:
        zctx = zmq.Context()

        def make_streams():
            return [core.Stream("stdout", framing="seed", tenant=TENANT, service=SERVICE,
                                container_id=stream_id(i)) for i in range(len(rfds))]

        if mode == "loop":
            sockets.append(zctx.socket(zmq.PUSH))      # default options
            sockets[0].connect(endpoint)
            res = _run_loop(sockets[0], rfds, make_streams, go_fd, deadline, zmq_fd)
        else:
            res = _run_threads(zctx, endpoint, threads, rfds, make_streams, go_fd, deadline,
                               sockets)
        streams = res.pop("streams")
        res["lines_total"] = sum(s.lines_total for s in streams)
        res["sent"] = sum(s.sent_total for s in streams)
        res["pending"] = sum(s.pending_messages for s in streams)
        res["peak_rss_mb"] = vmhwm_mb()
        return res
    finally:
        try:
            os.close(go_fd)
        except OSError:
            pass
        for s in sockets:
            if s is not None and not s.closed:
                s.close(linger=LINGER_MS)
        if zctx is not None:
            zctx.term()
        status, cpu = _reap_writer(pid, cpu_fd, max(1.0, deadline + 5.0 - time.monotonic()))
        res["writer_status"] = status
        res["cpu_writer_s"] = cpu


def _run_loop(sock, rfds, make_streams, go_fd, deadline, zmq_fd):
    import asyncio

    import uvloop

    from zeroline.supervisor import Supervisor, grow_pipe

    wakeups = [0]

    async def main():
        sup = Supervisor(sock, asyncio.get_running_loop())
        # Count ZMQ_FD wake-ups (the instance attribute is what add_reader picks up). "every" is
        # the supervisor before b028d6d: retry on each wake-up without reading ZMQ_EVENTS first.
        handler = sup._retry if zmq_fd == "every" else sup._on_zmq_fd

        def counted():
            wakeups[0] += 1
            handler()

        sup._on_zmq_fd = counted
        rss0 = vmrss_kb()
        streams = make_streams()
        for i, (fd, stream) in enumerate(zip(rfds, streams)):
            grow_pipe(fd)       # as zeroline run grows its pipes (reads: the sink's size)
            sup.add(fd, stream, stream_id(i))
        rss1 = vmrss_kb()
        c0 = cpu_s()
        t0 = time.monotonic()
        os.write(go_fd, b"g")
        done = await sup.wait(timeout=max(0.0, deadline - time.monotonic()))
        t1 = time.monotonic()
        c1 = cpu_s()
        if not done:
            sup.stop_reading()
        unsent = await sup.drain(1.0)
        st = sup.stats()
        sup.close()
        res = {"t0": t0, "t1": t1, "cpu_send_s": c1 - c0, "blocked": st["blocked_total"],
               "zmq_fd_wakeups": wakeups[0], "unsent": unsent,
               "read_errors": st["read_errors_total"], "streams": streams,
               "kib_per_stream": (rss1 - rss0) / len(streams) if rss0 and rss1 else None}
        if not done:
            res["error"] = "supervisor not done before the deadline (%s)" % sup.stats_line()
        return res

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _worker(zctx, endpoint, poller, owned, deadline, sockets, slot, failed):
    import zmq

    from zeroline.supervisor import READ_BYTES      # the supervisor's read size, 64 KiB

    sock = zctx.socket(zmq.PUSH)        # this thread's own socket, default options
    sockets[slot] = sock
    try:
        sock.connect(endpoint)
        while owned and time.monotonic() < deadline:
            for fd, _ in poller.poll(POLL_S):
                stream = owned[fd]
                try:
                    data = os.read(fd, READ_BYTES)
                except BlockingIOError:
                    continue
                if data:
                    stream.feed(data)
                else:
                    stream.close()
                    poller.unregister(fd)
                    os.close(fd)
                    del owned[fd]
                stream.send(sock, block=True)     # backpressure: this thread stops reading
        if owned:
            failed.append("worker %d: %d streams open at the deadline" % (slot, len(owned)))
    except BaseException as exc:
        failed.append("worker %d: %s: %s" % (slot, type(exc).__name__, exc))
    finally:
        poller.close()
        sock.close(linger=LINGER_MS)


def _run_threads(zctx, endpoint, k, rfds, make_streams, go_fd, deadline, sockets):
    pollers = [select.epoll() for _ in range(k)]
    owned = [{} for _ in range(k)]
    rss0 = vmrss_kb()
    streams = make_streams()
    for i, (fd, stream) in enumerate(zip(rfds, streams)):
        os.set_blocking(fd, False)
        pollers[i % k].register(fd, select.EPOLLIN)
        owned[i % k][fd] = stream
    rss1 = vmrss_kb()
    sockets[:] = [None] * k
    failed = []
    workers = [threading.Thread(target=_worker, name="bench-worker-%d" % n, daemon=True,
                                args=(zctx, endpoint, pollers[n], owned[n], deadline, sockets, n,
                                      failed)) for n in range(k)]
    c0 = cpu_s()
    t0 = time.monotonic()
    os.write(go_fd, b"g")
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()) + 1.0)
    t1 = time.monotonic()
    c1 = cpu_s()
    if any(w.is_alive() for w in workers):
        for s in streams:
            s.cancel()              # a blocked send returns within 100 ms
        for w in workers:
            w.join(5.0)
        failed.append("worker threads still running at the deadline")
    for own in owned:
        for fd in own:
            try:
                os.close(fd)
            except OSError:
                pass
    res = {"t0": t0, "t1": t1, "cpu_send_s": c1 - c0, "streams": streams,
           "kib_per_stream": (rss1 - rss0) / len(streams) if rss0 and rss1 else None}
    if failed:
        res["error"] = "; ".join(failed[:3])
    return res


# ---------------------------------------------------------------------------------------------
# Parent side: one supervisor measurement


def measure_supervisor(ctx, row, wl, endpoint, lines_per_stream, digest, impl="cython"):
    """One sup* row: ``digest(nbytes, prefix) -> (messages, crc)`` gives each stream's check."""
    mode, k, n_idle, zmq_fd = SUP_ROWS[row]
    n_chatty = CHATTY_STREAMS
    n = n_chatty + n_idle
    if n > MAX_STREAMS:
        raise ValueError("at most %d streams" % MAX_STREAMS)
    nbytes = prefix_bytes(wl.path, lines_per_stream)
    first_bytes = prefix_bytes(wl.path, 1)
    want = {}
    for i in range(n):
        want[stream_key(i)] = digest(nbytes if i < n_chatty else first_bytes, stream_prefix(i))
    expected = {key: m for key, (m, _) in want.items()}
    chatty = [stream_key(i) for i in range(n_chatty)]
    lines = n_chatty * lines_per_stream + n_idle
    limit_s = child_timeout_s(lines)
    sres, rres, error = run_pair(
        ctx, _demux_receiver, dict(endpoint=endpoint, expected=expected, chatty=chatty, impl=impl),
        "bench-demux-receiver", _sup_sender,
        dict(mode=mode, threads=k, endpoint=endpoint, n_chatty=n_chatty, n_idle=n_idle,
             path=wl.path, nbytes=nbytes, deadline_s=limit_s - 15.0, zmq_fd=zmq_fd or "events",
             impl=impl),
        "bench-supervisor", limit_s)
    if error:
        return {"error": error}
    return check_supervisor(sres, rres, want, lines, n_chatty, n_idle, lines_per_stream,
                            nbytes * n_chatty + first_bytes * n_idle, mode, k)


def check_supervisor(sres, rres, want, lines, n_chatty, n_idle, lines_per_stream, total_bytes,
                     mode, k):
    """The row's numbers from both children's results, and every per-stream check."""
    res = {"lines": lines, "nbytes": total_bytes, "streams": n_chatty + n_idle,
           "chatty": n_chatty, "mode": "threads=%d" % k if mode == "threads" else mode,
           "messages": rres.get("messages")}
    for key in ("cpu_send_s", "peak_rss_mb", "kib_per_stream", "blocked", "zmq_fd_wakeups",
                "cpu_writer_s", "writer_status"):
        if sres.get(key) is not None:
            res[key] = sres[key]
    for key in ("cpu_recv_s", "recv_rss_mb", "fairness"):
        if rres.get(key) is not None:
            res[key] = rres[key]
    if rres.get("window"):
        res["window_min"] = min(rres["window"].values())
        res["window_max"] = max(rres["window"].values())
    errors = [("supervisor: " + sres["error"]) if "error" in sres else None,
              ("receiver: " + rres["error"]) if "error" in rres else None]
    if sres.get("writer_status"):
        errors.append("writer process exited %s" % sres["writer_status"])
    errors = [e for e in errors if e]
    if not errors:
        bad = []
        for key, (messages, crc) in want.items():
            got = (rres["counts"].get(key), rres["crcs"].get(key))
            if got != (messages, crc):
                bad.append("stream %s: %s of %d messages%s" % (
                    key.decode(), got[0], messages, "" if got[0] != messages else ", CRC differs"))
        if bad:
            errors.append("%d streams wrong (%s)" % (len(bad), "; ".join(bad[:3])))
        if rres["unknown"] or rres["malformed"]:
            errors.append("%d messages of no stream, %d malformed"
                          % (rres["unknown"], rres["malformed"]))
        if sres.get("lines_total") != lines or sres.get("pending"):
            errors.append("supervisor cut %s lines (expected %d), %s pending"
                          % (sres.get("lines_total"), lines, sres.get("pending")))
        t0 = sres["t0"]
        t1 = max(sres["t1"], rres["t_last"] or sres["t1"])
        if t1 > t0:
            res["wall_s"] = t1 - t0
        else:
            errors.append("no usable timing")
        if rres["t_first"] is not None:
            res["wall_recv_s"] = rres["t_last"] - rres["t_first"]
        done = [rres["done_at"].get(stream_key(i)) for i in range(n_chatty)]
        if all(d is not None and d > t0 for d in done):
            rates = [lines_per_stream / (d - t0) for d in done]
            res["spread"] = max(rates) / min(rates)
    if errors:
        res["error"] = "; ".join(errors)
    res["verified"] = "per-stream count+crc" if not errors else "FAIL"
    return res


# ---------------------------------------------------------------------------------------------
# forward → collect → file


def _fwd_col_launcher(exe, endpoint, in_path, out_dir, log_path, messages, expected_bytes,
                      timeout_s, env):
    ipc_path = endpoint[len("ipc://"):]
    err_col = os.path.join(out_dir, "collect.stderr")
    err_fwd = os.path.join(out_dir, "forward.stderr")
    data_dir = os.path.join(out_dir, "logs")
    started = time.monotonic()
    deadline = started + timeout_s
    procs = {}
    ended = {}

    def reap(name, proc, flags, now):
        pid, status, ru = os.wait4(proc.pid, flags)
        if pid:
            ended[name] = (os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, now)
            proc.returncode = ended[name][0]

    try:
        with open(err_col, "wb") as ecol, open(err_fwd, "wb") as efwd, \
                open(in_path, "rb") as stdin:
            procs["collect"] = subprocess.Popen(
                [exe, "collect", "--bind", endpoint, "--out", data_dir, "--count", str(messages),
                 "--stats"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=ecol,
                env=env)
            # The forwarder would wait for its puller anyway (zmq-peer-wait); starting it once
            # the collector is bound keeps both start-ups out of each other's way.
            while not os.path.exists(ipc_path) and time.monotonic() < deadline \
                    and procs["collect"].poll() is None:
                time.sleep(0.005)
            procs["forward"] = subprocess.Popen(
                [exe, "forward", "--log-opt", "zmq-address=" + endpoint, "--log-opt",
                 "zmq-socket=push", "--container-id", CONTAINER_ID], stdin=stdin,
                stdout=subprocess.DEVNULL, stderr=efwd, env=env)
            t_fwd = time.monotonic()
            t_first = t_full = None
            peak = {"collect": 0.0, "forward": 0.0}
            tick = 0
            # Timed at the file: its first bytes, then the moment it holds every line.
            while len(ended) < 2 and time.monotonic() < deadline:
                now = time.monotonic()
                try:
                    size = os.stat(log_path).st_size
                except OSError:
                    size = 0
                if size and t_first is None:
                    t_first = now
                if size >= expected_bytes and t_full is None:
                    t_full = now
                tick += 1
                for name, proc in procs.items():
                    if name not in ended:
                        if tick % 10 == 1:
                            peak[name] = max(peak[name], vmhwm_mb(proc.pid) or 0.0)
                        reap(name, proc, os.WNOHANG, now)
                time.sleep(FILE_POLL_S)
    finally:
        for name, proc in procs.items():
            if name not in ended:
                proc.kill()
                reap(name, proc, 0, time.monotonic())
    with open(err_col, "rb") as f:
        col_err = f.read().decode("utf-8", "replace")
    with open(err_fwd, "rb") as f:
        fwd_err = f.read().decode("utf-8", "replace")
    span = re.search(r"receive_seconds=([0-9.]+)", col_err)     # collect --stats
    return {"t_fwd": t_fwd, "t_first": t_first, "t_full": t_full,
            "rc_collect": ended["collect"][0], "rc_forward": ended["forward"][0],
            "cpu_recv_s": ended["collect"][1], "cpu_send_s": ended["forward"][1],
            "t_collect_exit": ended["collect"][2], "recv_rss_mb": peak["collect"] or None,
            "peak_rss_mb": peak["forward"] or None, "collect_stderr": col_err[-600:],
            "forward_stderr": fwd_err[-600:],
            "collector_span_s": float(span.group(1)) if span else None,
            "timed_out": time.monotonic() > deadline}


def check_file(res, errors, log_path, messages, expected_bytes, crc):
    """Lines, size and CRC of a collector's output file against what was sent."""
    got_lines, got_crc, size = file_digest(log_path)
    res["messages"] = got_lines
    if (got_lines, size) != (messages, expected_bytes):
        errors.append("file has %d lines, %d bytes; expected %d, %d"
                      % (got_lines, size, messages, expected_bytes))
    elif got_crc != crc:
        errors.append("file checksum differs")


def file_timing(res, errors, lres, t_end):
    """A CLI row's timing at the file: first bytes → every line, and launch → ``t_end``."""
    if lres["t_first"] is None or lres["t_full"] is None or lres["t_full"] <= lres["t_first"]:
        errors.append("no usable timing")
    else:
        res["wall_s"] = lres["t_full"] - lres["t_first"]
        res["wall_launch_s"] = t_end - lres["t_fwd"]


def file_digest(path):
    crc = 0
    lines = 0
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            lines += block.count(b"\n")
            size += len(block)
    return lines, crc, size


def measure_fwd_col(ctx, exe, wl, endpoint, work_dir, digest):
    """``zeroline forward < W`` → ``zeroline collect --out DIR --count N``; timed at the file."""
    import shutil

    messages, crc = digest(PREFIX)
    # Text output writes seed payloads as received: the file is prefix + line + "\n" per message.
    expected_bytes = wl.nbytes + messages * len(PREFIX)
    out_dir = os.path.join(work_dir, "fwdcol-%d" % time.monotonic_ns())
    os.makedirs(out_dir)
    log_path = os.path.join(out_dir, "logs", TENANT.decode(), SERVICE.decode() + ".log")
    env = dict(os.environ, TENANT_ID=TENANT.decode(), SERVICE_ID=SERVICE.decode())
    limit_s = child_timeout_s(wl.lines)
    try:
        child = Child(ctx, _fwd_col_launcher,
                      dict(exe=exe, endpoint=endpoint, in_path=wl.path, out_dir=out_dir,
                           log_path=log_path, messages=messages, expected_bytes=expected_bytes,
                           timeout_s=limit_s - 10.0, env=env), "bench-fwd-col")
        try:
            lres = child.wait(limit_s)
        finally:
            child.stop()
        res = {"lines": wl.lines, "nbytes": wl.nbytes}
        if "error" in lres:
            res["error"] = "launcher: " + lres["error"]
            res["verified"] = "FAIL"
            return res
        for key in ("cpu_send_s", "cpu_recv_s", "peak_rss_mb", "recv_rss_mb",
                    "collector_span_s"):
            res[key] = lres.get(key)
        errors = []
        if lres["timed_out"]:
            errors.append("timed out")
        for name in ("collect", "forward"):
            if lres["rc_" + name]:
                errors.append("%s exited %s: %s" % (name, lres["rc_" + name],
                                                    lres[name + "_stderr"].strip()[-300:]))
        if not errors:
            if not os.path.exists(log_path):
                errors.append("no %s" % os.path.relpath(log_path, out_dir))
            else:
                check_file(res, errors, log_path, messages, expected_bytes, crc)
            file_timing(res, errors, lres, lres["t_collect_exit"])
        if errors:
            res["error"] = "; ".join(errors)
        res["verified"] = "file lines+crc" if not errors else "FAIL"
        return res
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Receive path alone


def _prefilled_receiver(endpoint, impl, expected_messages, ready, sender_done, deadline_s):
    """Bind, wait until the sender is done (everything queued here, RCVHWM 0), then drain timed."""
    import zmq

    zctx = zmq.Context()
    sock = zctx.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        ready.set()
        deadline = time.monotonic() + deadline_s
        if not sender_done.wait(deadline_s):
            return {"error": "sender not done"}
        time.sleep(RX_SETTLE_S)
        crc = 0
        t_last = None
        if impl == "pyzmq":
            sock.setsockopt(zmq.RCVTIMEO, 100)
            recv_multipart = sock.recv_multipart
            batch = []
            append = batch.append
            count = 0
            c0 = cpu_s()
            t0 = time.monotonic()
            # The loop one writes first: one recv_multipart per message, payloads joined per
            # 4096 for the same CRC as take_payloads().
            while count < expected_messages:
                try:
                    frames = recv_multipart()
                except zmq.Again:
                    if time.monotonic() > deadline:
                        break
                    continue
                append(frames[2])
                count += 1
                if len(batch) == 4096:
                    batch.append(b"")
                    crc = zlib.crc32(b"\n".join(batch), crc)
                    batch.clear()
            t_last = time.monotonic()
            if batch:
                batch.append(b"")
                crc = zlib.crc32(b"\n".join(batch), crc)
            c1 = cpu_s()
            messages, malformed = count, 0
        else:
            rx = core_module("cython").Receiver()
            recv, take = rx.recv, rx.take_payloads
            c0 = cpu_s()
            t0 = time.monotonic()
            while rx.messages_total < expected_messages:
                if recv(sock, 4096, 100):
                    t_last = time.monotonic()
                    crc = zlib.crc32(take(), crc)
                elif time.monotonic() > deadline:
                    break
            c1 = cpu_s()
            messages, malformed = rx.messages_total, rx.malformed_total
        return {"messages": messages, "malformed": malformed, "crc": crc, "t0": t0,
                "t_last": t_last, "cpu_recv_s": c1 - c0, "recv_rss_mb": vmhwm_mb()}
    finally:
        sock.close(0)
        zctx.term()


def measure_receive(ctx, impl, wl, endpoint, nbytes, lines, digest):
    """rx (``impl="cython"``) or rx_py (``"pyzmq"``): drain ``lines`` queued messages."""
    messages, crc = digest(PREFIX)
    limit_s = child_timeout_s(lines)
    ready, sender_done = ctx.Event(), ctx.Event()
    receiver = Child(ctx, _prefilled_receiver,
                     dict(endpoint=endpoint, impl=impl, expected_messages=messages, ready=ready,
                          sender_done=sender_done, deadline_s=limit_s), "bench-rx")
    sres = {}
    try:
        if not ready.wait(CHILD_READY_S):
            return {"error": "receiver not ready: %s" % receiver.wait(1.0).get("error", "?")}
        sender = Child(ctx, _stream_sender, dict(impl="cython", path=wl.path, nbytes=nbytes,
                                                 endpoint=endpoint, hwm=1000), "bench-rx-sender")
        try:
            sres = sender.wait(limit_s)
        finally:
            sender.stop()
        sender_done.set()
        rres = receiver.wait(limit_s)
    finally:
        sender_done.set()
        receiver.stop()
    res = {"lines": lines, "nbytes": nbytes, "messages": rres.get("messages"),
           "cpu_recv_s": rres.get("cpu_recv_s"), "recv_rss_mb": rres.get("recv_rss_mb"),
           "cpu_send_s": 0.0}
    errors = [("sender: " + sres["error"]) if "error" in sres else None,
              ("receiver: " + rres["error"]) if "error" in rres else None]
    errors = [e for e in errors if e]
    if not errors:
        if (rres["messages"], rres["malformed"]) != (messages, 0):
            errors.append("received %d of %d messages (%d malformed)"
                          % (rres["messages"], messages, rres["malformed"]))
        elif rres["crc"] != crc:
            errors.append("payload checksum differs")
        if rres["t_last"] is None or rres["t_last"] <= rres["t0"]:
            errors.append("no usable timing")
        else:
            res["wall_s"] = rres["t_last"] - rres["t0"]
    if errors:
        res["error"] = "; ".join(errors)
    res["verified"] = "count+crc" if not errors else "FAIL"
    return res
