"""End-to-end benchmarks: sender process → ipc:// PUSH/PULL → receiver process that checks all.

Senders: (b) compiled Stream, (b') the ``zeroline forward`` CLI, (c) the pure-Python twin, (d) a
naive readline + send_multipart loop, (f) a plain C reference sender.

The receiver (compiled Receiver, RCVHWM 0) binds first and signals readiness; the sender's timer
starts after its own setup and the clock stops at the later of its last send and the receiver's last
message (CLOCK_MONOTONIC is shared by all processes). The receiver CRC-32s ``take_payloads()`` and
the parent compares count and CRC with :func:`workloads.expected_digest` of the input.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import threading
import time
import zlib

from .bench_core import (CONTAINER_ID, PREFIX, READ_BYTES, SERVICE, TENANT, Child,
                         child_timeout_s, core_module, cpu_s, read_chunks, vmhwm_mb)
from .workloads import LINE_LIMIT_BYTES

#: Default send high-water mark of the senders (libzmq's and the CLI's default zmq-hwm).
SNDHWM_MSGS = 1000
#: Sender linger at close: long enough to deliver the last queued messages.
LINGER_MS = 30_000
#: After the sender is done, the receiver gives up once no message came for this long.
RECV_IDLE_S = 3.0
#: How long the parent waits for the receiver to bind (child start-up included).
CHILD_READY_S = 60.0
#: The first bytes of the first payload go back to the parent: the CLI's prefix is learned there.
HEAD_BYTES = 160


# ---------------------------------------------------------------------------------------------
# Receiver


def _receiver(endpoint, expected_messages, ready, sender_done, deadline_s, impl="cython"):
    import zmq

    core = core_module(impl)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.PULL)
    try:
        # Unlimited: libzmq was seen to lose messages queued for a receiver sitting at its receive
        # HWM when the sender disconnects; with no limit a disconnect loses nothing.
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        rx = core.Receiver()
        recv, take = rx.recv, rx.take_payloads
        crc = 0
        head = None
        t_first = t_last = None
        ready.set()
        c0 = cpu_s()
        now = time.monotonic()
        deadline = now + deadline_s
        idle_since = now
        while rx.messages_total < expected_messages:
            n = recv(sock, 4096, 100)
            now = time.monotonic()
            if n:
                if t_first is None:
                    t_first = now
                t_last = idle_since = now
                data = take()
                if head is None:
                    head = data[:HEAD_BYTES]
                crc = zlib.crc32(data, crc)
            elif now > deadline or (sender_done.is_set() and now - idle_since > RECV_IDLE_S):
                break
        c1 = cpu_s()
        # Untimed: anything still arriving is a duplicate or an extra message.
        for _ in range(3):
            if recv(sock, 4096, 30):
                crc = zlib.crc32(take(), crc)
        return {"messages": rx.messages_total, "crc": crc, "head": head, "t_first": t_first,
                "t_last": t_last, "cpu_recv_s": c1 - c0, "recv_rss_mb": vmhwm_mb(),
                "malformed": rx.malformed_total}
    finally:
        sock.close(0)
        zctx.term()


# ---------------------------------------------------------------------------------------------
# Python senders


def _push_socket(zmq, zctx, endpoint, hwm):
    sock = zctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.connect(endpoint)
    return sock


def _stream_sender(impl, path, nbytes, endpoint, hwm):
    import zmq

    core = core_module(impl)
    zctx = zmq.Context()
    sock = _push_socket(zmq, zctx, endpoint, hwm)
    try:
        stream = core.Stream("stdout", framing="seed", tenant=TENANT, service=SERVICE,
                             container_id=CONTAINER_ID)
        buf = bytearray(READ_BYTES)
        feed, send = stream.feed, stream.send
        queued = sent = 0
        c0 = cpu_s()
        t0 = time.monotonic()
        for chunk in read_chunks(path, nbytes, buf):
            queued += feed(chunk)
            sent += send(sock)
        queued += stream.close()
        sent += send(sock)
        t1 = time.monotonic()
        c1 = cpu_s()
        return {"t0": t0, "t1": t1, "messages": queued, "sent": sent, "cpu_send_s": c1 - c0,
                "lines_total": stream.lines_total, "peak_rss_mb": vmhwm_mb()}
    finally:
        sock.close()
        zctx.term()


def _naive_sender(path, nbytes, endpoint, hwm, limit):
    import zmq

    zctx = zmq.Context()
    sock = _push_socket(zmq, zctx, endpoint, hwm)
    try:
        send = sock.send_multipart
        tenant, service, prefix = TENANT, SERVICE, PREFIX
        messages = pos = 0
        with open(path, "rb") as f:
            readline = f.readline
            c0 = cpu_s()
            t0 = time.monotonic()
            # What one would write first: a line at a time, three frames per message.
            # readline(limit) also cuts like Docker: a line of `limit` bytes or more comes back
            # as limit-byte chunks, then the rest, so the messages equal zeroline's.
            while pos < nbytes:
                line = readline(limit)
                if not line:
                    break
                pos += len(line)
                if line.endswith(b"\n"):
                    line = line[:-1]
                send([tenant, service, prefix + line])
                messages += 1
            t1 = time.monotonic()
            c1 = cpu_s()
        return {"t0": t0, "t1": t1, "messages": messages, "sent": messages,
                "cpu_send_s": c1 - c0, "peak_rss_mb": vmhwm_mb()}
    finally:
        sock.close()
        zctx.term()


# ---------------------------------------------------------------------------------------------
# External senders: the C reference and the CLI, launched and reaped by a small child


def _pump_file(path, fd):
    # Feeds the CLI's stdin pipe in the launcher (pipe mode); its CPU is not the CLI's.
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                chunk = f.read(READ_BYTES)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)


def _external_sender(argv, stdin_path, stdin_mode, out_dir, timeout_s):
    out_path = os.path.join(out_dir, "stdout-%d.txt" % os.getpid())
    err_path = os.path.join(out_dir, "stderr-%d.txt" % os.getpid())
    pump = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        if stdin_mode == "pipe":
            rfd, wfd = os.pipe()
            proc = subprocess.Popen(argv, stdin=rfd, stdout=out, stderr=err)
            os.close(rfd)
            pump = threading.Thread(target=_pump_file, args=(stdin_path, wfd), daemon=True)
            pump.start()
        else:
            with open(stdin_path, "rb") if stdin_path else open(os.devnull, "rb") as stdin:
                proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err)
        t_start = time.monotonic()
        peak = 0.0
        status = rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            # ru_maxrss from wait4 would also count this launcher's own peak (exec keeps the
            # larger), so sample the child's VmHWM; it only grows, the last sample is ~exact.
            peak = max(peak, vmhwm_mb(proc.pid) or 0.0)
            if time.monotonic() - t_start > timeout_s:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        t_end = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if pump is not None:
        pump.join(5.0)
    with open(out_path, "rb") as f:
        stdout = f.read().decode("utf-8", "replace")
    with open(err_path, "rb") as f:
        stderr = f.read().decode("utf-8", "replace")
    return {"rc": proc.returncode, "stdout": stdout[-4000:], "stderr": stderr[-2000:],
            "t_start": t_start, "t_end": t_end, "cpu_process_s": rusage.ru_utime + rusage.ru_stime,
            "ru_maxrss_mb": rusage.ru_maxrss / 1024.0, "peak_rss_mb": peak or None}


# ---------------------------------------------------------------------------------------------
# C reference sender build, CLI detection


def pyzmq_libzmq():
    """Path of the libzmq shared object inside the pyzmq wheel (``pyzmq.libs``), or None."""
    import zmq

    site = os.path.dirname(os.path.dirname(os.path.abspath(zmq.__file__)))
    found = sorted(glob.glob(os.path.join(site, "pyzmq.libs", "libzmq-*.so.5*")))
    return found[0] if found else None


def build_ref_sender(out_dir):
    """Compile ref_sender.c against pyzmq's libzmq; return ``(path, None)`` or ``(None, why)``."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None, "no C compiler (gcc/cc) on PATH"
    lib = pyzmq_libzmq()
    if lib is None:
        return None, "no libzmq-*.so.5* in site-packages/pyzmq.libs (pyzmq not from a wheel?)"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref_sender.c")
    exe = os.path.join(out_dir, "ref_sender")
    cmd = [cc, "-O2", "-Wall", "-o", exe, src, lib, "-Wl,-rpath," + os.path.dirname(lib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, "compiling ref_sender.c failed: %s" % exc
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip()[-500:] or "no output"
        return None, "compiling ref_sender.c failed (exit %d): %s" % (proc.returncode, why)
    return exe, None


def find_cli():
    """``(path, None)`` when ``zeroline forward --help`` works, else ``(None, why)``."""
    exe = shutil.which("zeroline")
    if exe is None:
        return None, "no 'zeroline' on PATH"
    try:
        proc = subprocess.run([exe, "forward", "--help"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, "'zeroline forward --help' failed: %s" % exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, "'zeroline forward --help' exits %d: %s" % (proc.returncode, last[:200])
    return exe, None


def cli_version(exe):
    """First line of ``zeroline --version`` (it names the implementation in use), or None."""
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0][:200] if proc.returncode == 0 and text else None


# ---------------------------------------------------------------------------------------------
# One end-to-end measurement


def prefix_of(head):
    """The seed-framing prefix ``b"<container_id>: "`` at the start of a payload, or None."""
    if not head:
        return None
    cut = head.find(b": ")
    return head[:cut + 2] if cut >= 0 else None


def run_pair(ctx, receiver_fn, receiver_kwargs, receiver_name, sender_fn, sender_kwargs,
             sender_name, limit_s):
    """Start a receiver child (given ``ready``/``sender_done`` events and ``deadline_s``), then
    the sender once the receiver is ready; wait for both, stop both whatever happens.

    Returns ``(sender result, receiver result, None)``, or ``(None, None, error)`` when the
    receiver never got ready."""
    ready, sender_done = ctx.Event(), ctx.Event()
    receiver = Child(ctx, receiver_fn, dict(receiver_kwargs, ready=ready, sender_done=sender_done,
                                            deadline_s=limit_s), receiver_name)
    sender = None
    try:
        if not ready.wait(CHILD_READY_S):
            return None, None, "receiver not ready: %s" % receiver.wait(1.0).get("error", "?")
        sender = Child(ctx, sender_fn, sender_kwargs, sender_name)
        sres = sender.wait(limit_s)
        sender_done.set()
        rres = receiver.wait(limit_s)
    finally:
        sender_done.set()
        if sender is not None:
            sender.stop()
        receiver.stop()
    return sres, rres, None


def measure(ctx, sender_fn, sender_kwargs, *, endpoint, lines, nbytes, expected_messages,
            digest, timing="sender"):
    """Run one sender against a fresh receiver; return the row's numbers.

    Args:
        sender_fn, sender_kwargs: the child that sends (must return t0/t1 unless
            ``timing="receiver"``).
        expected_messages: what the receiver waits for.
        digest: ``digest(prefix) -> (messages, crc)`` of the input, for the check.
        timing: ``"sender"``: from the sender's t0 to the later of its t1 and the last receipt;
            ``"receiver"``: first to last receipt (for a sender whose loop cannot be timed).
    """
    limit_s = child_timeout_s(lines)
    sres, rres, error = run_pair(
        ctx, _receiver, dict(endpoint=endpoint, expected_messages=expected_messages),
        "bench-receiver", sender_fn, sender_kwargs, "bench-sender", limit_s)
    if error:
        return {"error": error}
    res = {"lines": lines, "nbytes": nbytes, "recv_rss_mb": rres.get("recv_rss_mb"),
           "cpu_send_s": sres.get("cpu_send_s"), "cpu_recv_s": rres.get("cpu_recv_s"),
           "peak_rss_mb": sres.get("peak_rss_mb"), "messages": rres.get("messages")}
    for k in ("rc", "stderr", "ru_maxrss_mb", "lines_total"):
        if k in sres:
            res[k] = sres[k]
    errors = [("sender: " + sres["error"]) if "error" in sres else None,
              ("receiver: " + rres["error"]) if "error" in rres else None]
    if sres.get("rc"):
        errors.append("sender exited %s: %s" % (sres["rc"], sres.get("stderr", "").strip()[-300:]))
    errors = [e for e in errors if e]
    if not errors:
        prefix = prefix_of(rres.get("head"))
        want_messages, want_crc = digest(prefix) if prefix else (expected_messages, None)
        if rres["messages"] != want_messages:
            errors.append("received %d of %d messages" % (rres["messages"], want_messages))
        elif rres["malformed"]:
            errors.append("%d malformed messages" % rres["malformed"])
        elif want_crc is None or rres["crc"] != want_crc:
            errors.append("payload checksum differs (prefix %r)" % (prefix,))
        if timing == "sender":
            t0 = sres["t0"]
            t1 = max(sres["t1"], rres["t_last"] or sres["t1"])
        else:
            t0, t1 = rres["t_first"], rres["t_last"]
            res["wall_launch_s"] = sres["t_end"] - sres["t_start"]
        if rres["t_first"] is not None and rres["t_last"] is not None:
            res["wall_recv_s"] = rres["t_last"] - rres["t_first"]
        if t0 is None or t1 is None or t1 <= t0:
            errors.append("no usable timing")
        else:
            res["wall_s"] = t1 - t0
    if errors:
        res["error"] = "; ".join(errors)
    res["verified"] = "count+crc" if not errors else "FAIL"
    return res


def measure_stream(ctx, impl, wl, endpoint, nbytes, lines, digest, expected_messages,
                   hwm=SNDHWM_MSGS):
    """(b) compiled or (c) pure-Python Stream: feed 1 MiB reads, send() after each."""
    return measure(ctx, _stream_sender,
                   dict(impl=impl, path=wl.path, nbytes=nbytes, endpoint=endpoint, hwm=hwm),
                   endpoint=endpoint, lines=lines, nbytes=nbytes,
                   expected_messages=expected_messages, digest=digest)


def measure_naive(ctx, wl, endpoint, nbytes, lines, digest, expected_messages, hwm=SNDHWM_MSGS):
    """(d) readline loop + pyzmq send_multipart per line."""
    return measure(ctx, _naive_sender,
                   dict(path=wl.path, nbytes=nbytes, endpoint=endpoint, hwm=hwm,
                        limit=LINE_LIMIT_BYTES),
                   endpoint=endpoint, lines=lines, nbytes=nbytes,
                   expected_messages=expected_messages, digest=digest)


def measure_c_ref(ctx, exe, wl, endpoint, out_dir, digest, expected_messages, hwm=SNDHWM_MSGS):
    """(f) the C reference sender; it times its own loop and reports its own VmHWM."""
    argv = [exe, endpoint, wl.path, str(wl.nbytes), PREFIX.decode(), TENANT.decode(),
            SERVICE.decode(), str(LINE_LIMIT_BYTES), str(hwm)]
    res = measure(ctx, _c_sender, dict(argv=argv, out_dir=out_dir,
                                       timeout_s=_launcher_timeout_s(wl.lines)),
                  endpoint=endpoint, lines=wl.lines, nbytes=wl.nbytes,
                  expected_messages=expected_messages, digest=digest)
    return res


def _launcher_timeout_s(lines):
    # The launcher kills its process before the parent gives up on the launcher: no orphans.
    return child_timeout_s(lines) - 10.0


def _c_sender(argv, out_dir, timeout_s):
    res = _external_sender(argv, None, "file", out_dir, timeout_s)
    if res["rc"] == 0:
        try:
            own = json.loads(res["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            res["error"] = "ref_sender printed no result: %r" % res["stdout"][-200:]
            return res
        res.update(t0=own["t0"], t1=own["t1"], cpu_send_s=own["cpu_s"],
                   peak_rss_mb=own["vmhwm_kb"] / 1024.0 if own["vmhwm_kb"] > 0 else None)
    return res


def measure_cli(ctx, exe, wl, endpoint, out_dir, digest, expected_messages, stdin_mode="file"):
    """(b') ``zeroline forward --log-opt zmq-address=... --log-opt zmq-socket=push < file``.

    Timed at the receiver, first to last message, so interpreter start-up is left out; its CPU
    (from wait4) is the whole process, start-up included.
    """
    argv = [exe, "forward", "--log-opt", "zmq-address=" + endpoint,
            "--log-opt", "zmq-socket=push"]
    res = measure(ctx, _cli_sender, dict(argv=argv, stdin_path=wl.path, stdin_mode=stdin_mode,
                                         out_dir=out_dir, timeout_s=_launcher_timeout_s(wl.lines)),
                  endpoint=endpoint, lines=wl.lines, nbytes=wl.nbytes,
                  expected_messages=expected_messages, digest=digest, timing="receiver")
    return res


def _cli_sender(argv, stdin_path, stdin_mode, out_dir, timeout_s):
    res = _external_sender(argv, stdin_path, stdin_mode, out_dir, timeout_s)
    res["cpu_send_s"] = res["cpu_process_s"]
    return res
