"""Sender-side benchmarks without delivery, rows (a) and (e), and the harness every row runs in.

(a) cuts and frames in memory; (e) sends into an XPUB socket that has no subscriber.

Each measurement runs in its own child process (forked from a forkserver that imported zmq and
zeroline but never made a zmq context), times only its loop, and reports wall time, CPU time
(getrusage) and its own peak RSS.
"""

from __future__ import annotations

import resource
import time
import traceback

#: Read size of every sender: one crossing into the core per MiB (style.md, "Data plane").
READ_BYTES = 1 << 20

TENANT = b"bench"
SERVICE = b"zeroline"
CONTAINER_ID = "bench0000000"           # 12 characters like a short Docker id
PREFIX = CONTAINER_ID.encode() + b": "  # seed framing: payload = prefix + line

#: Parent-side guard for one child: setup allowance plus a rate no row is ever slower than.
CHILD_SETUP_S = 30.0
SLOWEST_LINES_PER_S = 20_000


def child_timeout_s(lines):
    return CHILD_SETUP_S + lines / SLOWEST_LINES_PER_S


# ---------------------------------------------------------------------------------------------
# Helpers used inside children


def cpu_s():
    """User + system CPU seconds of this process, all threads (libzmq's I/O thread included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def vmhwm_mb(pid="self"):
    """Peak RSS in MB from /proc/<pid>/status VmHWM, or None.

    ru_maxrss is not used for children: after exec it also counts the parent's peak at fork
    (Linux exec_mmap keeps the larger), and a forked child starts with its parent's pages.
    VmHWM belongs to the current image only.
    """
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def child_main(conn, fn, kwargs):
    """Run ``fn(**kwargs)`` in a child and send its result dict (or the error) to the parent."""
    try:
        result = fn(**kwargs)
    except BaseException as exc:  # report everything; the parent decides
        result = {"error": "%s: %s" % (type(exc).__name__, exc),
                  "traceback": traceback.format_exc()}
    try:
        conn.send(result)
    finally:
        conn.close()


def core_module(impl):
    """zeroline._core for ``"cython"``, zeroline._core_py for ``"python"`` (tests use the twin)."""
    import importlib

    return importlib.import_module("zeroline._core" if impl == "cython" else "zeroline._core_py")


def read_chunks(path, nbytes, buf):
    """Yield memoryviews of ``buf`` filled from ``path`` until ``nbytes`` bytes were read."""
    view = memoryview(buf)
    left = nbytes
    with open(path, "rb", buffering=0) as f:
        while left > 0:
            n = f.readinto(view[:min(len(view), left)])
            if not n:
                break
            left -= n
            yield view[:n]


# ---------------------------------------------------------------------------------------------
# Parent-side harness


class Child:
    """One benchmark child process with a result pipe; always joined or killed."""

    def __init__(self, ctx, fn, kwargs, name):
        self.recv_conn, send_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=child_main, args=(send_conn, fn, kwargs), name=name,
                                daemon=True)
        self.proc.start()
        send_conn.close()
        self.result = None

    def wait(self, timeout_s):
        """The child's result dict; an ``error`` entry when it failed or overran ``timeout_s``."""
        if self.result is None:
            if self.recv_conn.poll(timeout_s):
                try:
                    self.result = self.recv_conn.recv()
                except EOFError:
                    self.result = {"error": "child exited without a result (exit code %s)"
                                   % self.proc.exitcode}
            else:
                self.result = {"error": "no result within %.0f s" % timeout_s}
                self.stop(grace_s=0.0)
            self.stop()
        return self.result

    def stop(self, grace_s=10.0):
        if grace_s:
            self.proc.join(grace_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self.recv_conn.close()


def run_one(ctx, fn, kwargs, name, lines):
    child = Child(ctx, fn, kwargs, name)
    try:
        return child.wait(child_timeout_s(lines))
    finally:
        child.stop()


# ---------------------------------------------------------------------------------------------
# (a) cut + frame only


def _cut_frame(path, nbytes, min_time_s, max_passes, impl="cython"):
    core = core_module(impl)
    stream = core.Stream("stdout", framing="seed", tenant=TENANT, service=SERVICE,
                          container_id=CONTAINER_ID)
    buf = bytearray(READ_BYTES)
    feed, clear = stream.feed, stream.clear
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    wall_ns = cpu_ns = 0
    messages = 0
    passes = 0
    # The file is read outside the timed region; each feed+clear of a 1 MiB buffer is timed.
    # One pass over W1 takes ~50 ms here: repeat passes until the timed total is long enough.
    while passes < max_passes and (passes == 0 or wall_ns < min_time_s * 1e9):
        for chunk in read_chunks(path, nbytes, buf):
            c0 = cpu_clock()
            t0 = clock()
            messages += feed(chunk)
            clear()
            t1 = clock()
            c1 = cpu_clock()
            wall_ns += t1 - t0
            cpu_ns += c1 - c0
        passes += 1
    return {"passes": passes, "messages": messages, "wall_s": wall_ns / 1e9,
            "cpu_send_s": cpu_ns / 1e9, "peak_rss_mb": vmhwm_mb(),
            "lines_total": stream.lines_total}


def measure_cut_frame(ctx, wl, min_time_s, max_passes=1000):
    """(a) compiled Stream.feed on 1 MiB buffers + clear(): cutting and framing, no socket."""
    res = run_one(ctx, _cut_frame, dict(path=wl.path, nbytes=wl.nbytes, min_time_s=min_time_s,
                                         max_passes=max_passes), "bench-cut-frame", wl.lines)
    if "error" in res:
        return res
    passes = res["passes"]
    res.update(lines=wl.lines * passes, nbytes=wl.nbytes * passes, cpu_recv_s=0.0)
    if res["lines_total"] != wl.lines * passes:
        res["error"] = "cut %d lines, expected %d" % (res["lines_total"], wl.lines * passes)
    res["verified"] = "lines" if "error" not in res else "FAIL"
    return res


# ---------------------------------------------------------------------------------------------
# (e) sender cost without delivery


def _xpub_sender(path, nbytes, endpoint, min_time_s, max_passes):
    import zmq

    from zeroline import _core

    zctx = zmq.Context()
    sock = zctx.socket(zmq.XPUB)
    try:
        # NODROP: at the high-water mark a send would fail with EAGAIN instead of dropping, so
        # the count proves nothing was refused. With no subscriber nothing matches: every
        # message is accepted and discarded at once, i.e. the whole sender path minus delivery.
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        stream = _core.Stream("stdout", framing="seed", tenant=TENANT, service=SERVICE,
                              container_id=CONTAINER_ID)
        buf = bytearray(READ_BYTES)
        feed, send = stream.feed, stream.send
        queued = sent = passes = 0
        c0 = cpu_s()
        t0 = time.monotonic()
        while passes < max_passes and (passes == 0 or time.monotonic() - t0 < min_time_s):
            for chunk in read_chunks(path, nbytes, buf):
                queued += feed(chunk)
                sent += send(sock, block=False)
            passes += 1
        queued += stream.close()
        sent += send(sock, block=False)
        t1 = time.monotonic()
        c1 = cpu_s()
        return {"passes": passes, "messages": queued, "sent": sent, "wall_s": t1 - t0,
                "cpu_send_s": c1 - c0, "peak_rss_mb": vmhwm_mb(),
                "lines_total": stream.lines_total}
    finally:
        sock.close(0)
        zctx.term()


def measure_xpub(ctx, wl, endpoint, min_time_s, max_passes=1000):
    """(e) compiled Stream.send(block=False) into a bound XPUB (XPUB_NODROP=1), no subscriber."""
    res = run_one(ctx, _xpub_sender, dict(path=wl.path, nbytes=wl.nbytes, endpoint=endpoint,
                                           min_time_s=min_time_s, max_passes=max_passes),
                  "bench-xpub", wl.lines)
    if "error" in res:
        return res
    passes = res["passes"]
    res.update(lines=wl.lines * passes, nbytes=wl.nbytes * passes, cpu_recv_s=0.0)
    if res["sent"] != res["messages"] or res["lines_total"] != wl.lines * passes:
        res["error"] = "queued %d, sent %d, lines %d (expected %d)" % (
            res["messages"], res["sent"], res["lines_total"], wl.lines * passes)
    res["verified"] = "sent=queued" if "error" not in res else "FAIL"
    return res
