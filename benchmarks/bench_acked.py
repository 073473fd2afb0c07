"""Acked-transport benchmarks (issue 7 §5): forward → collect, the spool, the supervisor.

Rows, on workload W1 only (100-byte lines, as the issue's targets):

  fwd_acked  ``zeroline forward --log-opt zmq-socket=acked < W1`` → ipc → ``zeroline collect
             --bind-acked EP --out DIR --count N`` → file; timed at the file from its first line
             to its last, as fwd_col. The file must hold ``<container_id> stdout: <line>`` for
             every line (lines + CRC-32 + size checked).
  spool_w    the spool write path with the collector down: ``zeroline forward`` acked with
             ``spool-dir=D`` and ``zmq-linger=0s`` and no collector, timed from the first spool
             byte to the process's exit; it must say the batches are kept in the spool, and the
             spool must hold every line (read back untimed: count + CRC of the rendered lines).
  spool_r    replay: ``zeroline forward`` acked with ``spool-dir=D`` (D as spool_w left it) and
             ``/dev/null`` as input → ``zeroline collect`` → file; timed at the file, first line
             to last, checked as fwd_acked. When it runs before spool_w in a round (odd rounds
             run the rows in reverse), it spools its own input first, untimed.
  sup_acked  100 chatty streams (pipes, as row sup) → zeroline's Supervisor with an AckedSink
             (``open_sink`` on ``validate_log_opts({"zmq-address": EP, "zmq-socket": "acked"})``)
             → ``zeroline collect --bind-acked`` → file, run until the supervisor's drain returns
             (every batch acknowledged, i.e. written); count + CRC per stream. Timed at the file,
             first line to last, by a forked poller (as fwd_acked).

CPU: forward (or the supervisor process) as "send", the collector as "recv", both from wait4
(start-up included for the CLIs). Peak RSS (VmHWM, polled): forward's, or the supervisor's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import zlib

from .bench_core import CONTAINER_ID, SERVICE, TENANT, Child, child_timeout_s, cpu_s, vmhwm_mb
from .bench_supervisor import check_file, file_timing

#: What the collector's text output puts before each line of an acked (msgpack) record.
ACKED_PREFIX = CONTAINER_ID.encode() + b" stdout: "
#: The launcher's poll of the output file / spool (timing resolution).
POLL_S = 0.001
#: forward's own words when batches are left in the spool (cli.py).
SPOOLED_RE = re.compile(r"(\d+) batches not yet acknowledged .*kept in spool")
#: How long the supervisor's drain waits for acknowledgements without progress.
DRAIN_S = 10.0


def acked_prefix(i=None):
    """``<container id> stdout: `` of the CLI rows (i None) or of supervisor stream i."""
    if i is None:
        return ACKED_PREFIX
    from .bench_supervisor import stream_id

    return stream_id(i).encode() + b" stdout: "


def _env():
    return dict(os.environ, TENANT_ID=TENANT.decode(), SERVICE_ID=SERVICE.decode())


def _forward_argv(exe, endpoint, *opts):
    argv = [exe, "forward", "--log-opt", "zmq-address=" + endpoint, "--log-opt",
            "zmq-socket=acked", "--container-id", CONTAINER_ID]
    for opt in opts:
        argv += ["--log-opt", opt]
    return argv


def _spool_bytes(path):
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.name.endswith(".seg"))
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The launcher (a child process): starts the CLIs, polls the file or the spool, reaps them


def _launcher(exe, kind, endpoint, in_path, out_dir, log_path, messages, expected_bytes,
              spool_dir, timeout_s):
    """kind "fwd" (fwd_acked), "spool_w" or "spool_r"; see the module docstring."""
    env = _env()
    deadline = time.monotonic() + timeout_s
    procs, ended, peak, errs = {}, {}, {}, {}

    def reap(name, flags, now):
        pid, status, ru = os.wait4(procs[name].pid, flags)
        if pid:
            ended[name] = (os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, now)
            procs[name].returncode = ended[name][0]

    def start(name, argv, stdin_path):
        errs[name] = open(os.path.join(out_dir, name + ".stderr"), "wb")
        with open(stdin_path, "rb") as stdin:
            procs[name] = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                           stderr=errs[name], env=env)
        peak[name] = 0.0
        return time.monotonic()

    t_first = t_full = t_fwd = None
    try:
        if kind != "spool_w":
            ipc_path = endpoint[len("ipc://"):]
            start("collect", [exe, "collect", "--bind-acked", endpoint, "--out",
                              os.path.join(out_dir, "logs"), "--count", str(messages)],
                  os.devnull)
            while not os.path.exists(ipc_path) and time.monotonic() < deadline \
                    and procs["collect"].poll() is None:
                time.sleep(0.005)
        if kind == "fwd":
            t_fwd = start("forward", _forward_argv(exe, endpoint), in_path)
        elif kind == "spool_r":
            t_fwd = start("forward", _forward_argv(exe, endpoint, "spool-dir=" + spool_dir),
                          os.devnull)
        else:
            t_fwd = start("forward", _forward_argv(exe, endpoint, "spool-dir=" + spool_dir,
                                                   "zmq-linger=0s"), in_path)
        tick = 0
        while len(ended) < len(procs) and time.monotonic() < deadline:
            now = time.monotonic()
            if kind == "spool_w":
                if t_first is None and _spool_bytes(spool_dir):
                    t_first = now
            else:
                try:
                    size = os.stat(log_path).st_size
                except OSError:
                    size = 0
                if size and t_first is None:
                    t_first = now
                if size >= expected_bytes and t_full is None:
                    t_full = now
            tick += 1
            for name in procs:
                if name not in ended:
                    if tick % 10 == 1:
                        peak[name] = max(peak[name], vmhwm_mb(procs[name].pid) or 0.0)
                    reap(name, os.WNOHANG, now)
            time.sleep(POLL_S)
    finally:
        for name, proc in procs.items():
            if name not in ended:
                proc.kill()
                reap(name, 0, time.monotonic())
            errs[name].close()
    res = {"t_fwd": t_fwd, "t_first": t_first, "t_full": t_full,
           "timed_out": time.monotonic() > deadline}
    for name in procs:
        rc, cpu, at = ended[name]
        with open(os.path.join(out_dir, name + ".stderr"), "rb") as f:
            res[name + "_stderr"] = f.read().decode("utf-8", "replace")[-800:]
        res["rc_" + name] = rc
        res["cpu_" + name] = cpu
        res["exit_" + name] = at
        res["rss_" + name] = peak[name] or None
    if kind == "spool_w":
        res["t_full"] = res["exit_forward"]      # spooled everything once it exits
    return res


def spool_digest(spool_dir):
    """``(lines, crc, bytes)`` of the spool's records rendered as the collector's text output
    (what spool_r must then deliver), read back through the spool's own reader; untimed."""
    from zeroline import core
    from zeroline.transport.spool import Spool

    rx = core.Receiver()
    crc = lines = size = 0
    spool = Spool(spool_dir)
    try:
        while True:
            record = spool.next_unsent()
            if record is None:
                break
            for _, _, data, held in rx.render_batch(record.tenant, record.service, record.body):
                crc = zlib.crc32(data, crc)
                lines += data.count(b"\n")
                size += len(data)
        corrupt = spool.corrupt_total
    finally:
        spool.close()
    return lines, crc, size, corrupt


# ---------------------------------------------------------------------------------------------
# Parent side: the CLI rows


def measure_cli_row(ctx, exe, row, wl, endpoint, work_dir, digest, spools):
    """One of fwd_acked, spool_w, spool_r. ``spools``: a list the session keeps between rows (a
    spool spool_w filled, for spool_r to replay)."""
    messages, crc = digest(ACKED_PREFIX)
    expected_bytes = wl.nbytes + messages * len(ACKED_PREFIX)
    out_dir = os.path.join(work_dir, "%s-%d" % (row, time.monotonic_ns()))
    os.makedirs(out_dir)
    log_path = os.path.join(out_dir, "logs", TENANT.decode(), SERVICE.decode() + ".log")
    limit_s = child_timeout_s(wl.lines)
    res = {"lines": wl.lines, "nbytes": wl.nbytes}
    keep_dir = False
    try:
        spool_dir = None
        if row == "spool_w":
            spool_dir = os.path.join(out_dir, "spool")
        elif row == "spool_r":
            if spools:
                spool_dir = spools.pop()
            else:       # this round runs spool_r first: fill a spool untimed
                pre = measure_cli_row(ctx, exe, "spool_w", wl, endpoint + "-pre", work_dir,
                                      digest, spools)
                if "error" in pre:
                    return dict(res, error="filling the spool: " + pre["error"],
                                verified="FAIL")
                spool_dir = spools.pop()
        kind = "fwd" if row == "fwd_acked" else row
        child = Child(ctx, _launcher, dict(
            exe=exe, kind=kind, endpoint=endpoint, in_path=wl.path, out_dir=out_dir,
            log_path=log_path, messages=messages, expected_bytes=expected_bytes,
            spool_dir=spool_dir, timeout_s=limit_s - 10.0), "bench-" + row)
        try:
            lres = child.wait(limit_s)
        finally:
            child.stop()
        if "error" in lres:
            return dict(res, error="launcher: " + lres["error"], verified="FAIL")
        res["cpu_send_s"] = lres.get("cpu_forward")
        res["cpu_recv_s"] = lres.get("cpu_collect", 0.0)
        res["peak_rss_mb"] = lres.get("rss_forward")
        res["recv_rss_mb"] = lres.get("rss_collect")
        errors = ["timed out"] if lres["timed_out"] else []
        for name in ("collect", "forward"):
            if lres.get("rc_" + name):
                errors.append("%s exited %s: %s" % (name, lres["rc_" + name],
                                                    lres[name + "_stderr"].strip()[-300:]))
        if not errors:
            if row == "spool_w":
                said = SPOOLED_RE.search(lres["forward_stderr"])
                got_lines, got_crc, size, corrupt = spool_digest(spool_dir)
                res["messages"] = got_lines
                if said is None:
                    errors.append("forward did not say it kept batches in the spool: %s"
                                  % lres["forward_stderr"].strip()[-200:])
                elif (got_lines, size, corrupt) != (messages, expected_bytes, 0):
                    errors.append("spool holds %d lines, %d bytes (%d corrupt records); "
                                  "expected %d, %d" % (got_lines, size, corrupt, messages,
                                                       expected_bytes))
                elif got_crc != crc:
                    errors.append("spool checksum differs")
                else:
                    while spools:       # one spool kept at a time (a full run's is ~0.5 GB)
                        shutil.rmtree(os.path.dirname(spools.pop()), ignore_errors=True)
                    spools.append(spool_dir)
                    keep_dir = True
            elif not os.path.exists(log_path):
                errors.append("no %s" % os.path.relpath(log_path, out_dir))
            else:
                check_file(res, errors, log_path, messages, expected_bytes, crc)
            file_timing(res, errors, lres, lres["exit_forward"])
        if errors:
            res["error"] = "; ".join(errors)
        res["verified"] = ("spool lines+crc" if row == "spool_w" else "file lines+crc") \
            if not errors else "FAIL"
        return res
    finally:
        if keep_dir:
            # Only the spool stays (for spool_r); the rest of the row's directory goes.
            for entry in os.scandir(out_dir):
                if entry.path != spool_dir:
                    shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir() \
                        else os.unlink(entry.path)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# sup_acked: the supervisor process (a child), with the collector as its subprocess


def _fork_file_poller(log_path, expected_bytes, deadline):
    """A forked process that polls ``log_path`` as the CLI rows' launcher does and writes
    ``"t_first t_full"`` (CLOCK_MONOTONIC, as time.monotonic everywhere) to the returned fd."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(r)
            t_first = t_full = None
            while t_full is None and time.monotonic() < deadline:
                try:
                    size = os.stat(log_path).st_size
                except OSError:
                    size = 0
                now = time.monotonic()
                if size and t_first is None:
                    t_first = now
                if size >= expected_bytes:
                    t_full = now
                time.sleep(POLL_S)
            os.write(w, b"%r %r" % (t_first, t_full))
        except BaseException:
            status = 5
        finally:
            os._exit(status)
    os.close(w)
    return pid, r


def _reap_poller(pid, fd, timeout_s):
    end = time.monotonic() + timeout_s
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    try:
        first, full = os.read(fd, 128).split()
        return (None if first == b"None" else float(first),
                None if full == b"None" else float(full))
    except (OSError, ValueError):
        return None, None
    finally:
        os.close(fd)


def _sup_acked_child(exe, endpoint, n_chatty, path, nbytes, messages, expected_bytes, out_dir,
                     deadline_s):
    from .bench_supervisor import _fork_writer, _reap_writer

    deadline = time.monotonic() + deadline_s
    # Fork the writer and the file poller first: no zmq context, event loop or thread exists
    # yet in this process.
    pid, rfds, go_fd, cpu_fd = _fork_writer(n_chatty, 0, path, nbytes, deadline + 5.0)
    poller = _fork_file_poller(os.path.join(out_dir, "logs", TENANT.decode(),
                                            SERVICE.decode() + ".log"), expected_bytes, deadline)
    err_path = os.path.join(out_dir, "collect.stderr")
    collect = None
    res = {}
    try:
        with open(err_path, "wb") as err:
            collect = subprocess.Popen(
                [exe, "collect", "--bind-acked", endpoint, "--out", os.path.join(out_dir, "logs"),
                 "--count", str(messages)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, env=_env())
        ipc_path = endpoint[len("ipc://"):]
        while not os.path.exists(ipc_path) and time.monotonic() < deadline \
                and collect.poll() is None:
            time.sleep(0.005)
        res = _sup_acked_loop(endpoint, rfds, go_fd, deadline)
        res["peak_rss_mb"] = vmhwm_mb()
        return res
    finally:
        try:
            os.close(go_fd)
        except OSError:
            pass
        if collect is not None:
            try:
                _, status, ru = os.wait4(collect.pid, 0) if _wait(collect, 10.0) else \
                    _kill(collect)
                res["rc_collect"] = os.waitstatus_to_exitcode(status)
                res["cpu_recv_s"] = ru.ru_utime + ru.ru_stime
            except ChildProcessError:
                res["rc_collect"] = collect.returncode
            with open(err_path, "rb") as f:
                res["collect_stderr"] = f.read().decode("utf-8", "replace")[-600:]
        status, cpu = _reap_writer(pid, cpu_fd, max(1.0, deadline + 5.0 - time.monotonic()))
        res["writer_status"] = status
        res["cpu_writer_s"] = cpu
        res["t_first"], res["t_full"] = _reap_poller(*poller, timeout_s=5.0)


def _wait(proc, timeout_s):
    # Whether the process has exited within timeout_s (not reaped: wait4 reaps it).
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
        except ChildProcessError:
            return True
        time.sleep(0.01)
    return False


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    return os.wait4(proc.pid, 0)


def _sup_acked_loop(endpoint, rfds, go_fd, deadline):
    import asyncio

    import uvloop

    from zeroline.config import ContainerInfo
    from zeroline.supervisor import Supervisor, grow_pipe
    from zeroline.transport import open_sink, validate_log_opts

    from .bench_supervisor import stream_id

    async def main():
        sink = open_sink(validate_log_opts({"zmq-address": endpoint, "zmq-socket": "acked"}))
        sup = Supervisor(sink, asyncio.get_running_loop())
        env = ("TENANT_ID=" + TENANT.decode(), "SERVICE_ID=" + SERVICE.decode())
        streams = []
        for i, fd in enumerate(rfds):
            stream = sink.stream(ContainerInfo(container_id=stream_id(i), env=env), "stdout")
            streams.append(stream)
            grow_pipe(fd)       # as zeroline run grows its pipes (reads: the sink's size)
            sup.add(fd, stream, stream_id(i))
        c0 = cpu_s()
        t0 = time.monotonic()
        os.write(go_fd, b"g")
        done = await sup.wait(timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            sup.stop_reading()
        unsent = await sup.drain(DRAIN_S)
        t1 = time.monotonic()
        c1 = cpu_s()
        undelivered = sup.undelivered()
        stats = sink.stats()
        sup.close()
        sink.close()
        res = {"t0": t0, "t1": t1, "cpu_send_s": c1 - c0, "unsent": unsent,
               "undelivered": undelivered, "lines_total": sum(s.lines_total for s in streams),
               "batches_sent": stats.get("batches_sent_total"),
               "batches_resent": stats.get("batches_resent_total")}
        if not done:
            res["error"] = "supervisor not done before the deadline (%s)" % sup.stats_line()
        return res

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def measure_sup_acked(ctx, exe, wl, endpoint, work_dir, lines_per_stream, digest):
    """sup_acked: ``digest(nbytes, prefix) -> (messages, crc)`` gives each stream's check."""
    from .bench_supervisor import CHATTY_STREAMS, KEY_AT, KEY_LEN, prefix_bytes, stream_id

    n = CHATTY_STREAMS
    nbytes = prefix_bytes(wl.path, lines_per_stream)
    want = {stream_id(i)[KEY_AT:KEY_AT + KEY_LEN].encode(): digest(nbytes, acked_prefix(i))
            for i in range(n)}
    messages = sum(m for m, _ in want.values())
    lines = n * lines_per_stream
    expected_bytes = nbytes * n + sum(lines_per_stream * len(acked_prefix(i)) for i in range(n))
    out_dir = os.path.join(work_dir, "sup_acked-%d" % time.monotonic_ns())
    os.makedirs(out_dir)
    log_path = os.path.join(out_dir, "logs", TENANT.decode(), SERVICE.decode() + ".log")
    limit_s = child_timeout_s(lines)
    res = {"lines": lines, "nbytes": nbytes * n, "streams": n, "chatty": n}
    try:
        child = Child(ctx, _sup_acked_child, dict(
            exe=exe, endpoint=endpoint, n_chatty=n, path=wl.path, nbytes=nbytes,
            messages=messages, expected_bytes=expected_bytes, out_dir=out_dir,
            deadline_s=limit_s - 15.0), "bench-sup-acked")
        try:
            sres = child.wait(limit_s)
        finally:
            child.stop()
        for key in ("cpu_send_s", "cpu_recv_s", "peak_rss_mb", "cpu_writer_s"):
            if sres.get(key) is not None:
                res[key] = sres[key]
        errors = [sres["error"]] if "error" in sres else []
        if sres.get("writer_status"):
            errors.append("writer process exited %s" % sres["writer_status"])
        if sres.get("rc_collect"):
            errors.append("collect exited %s: %s" % (sres["rc_collect"],
                                                     sres.get("collect_stderr", "")[-300:]))
        if not errors:
            if sres["lines_total"] != lines or sres["unsent"] or sres["undelivered"] != (0, 0):
                errors.append("supervisor cut %s lines (expected %d), %s unsent, %s undelivered"
                              % (sres["lines_total"], lines, sres["unsent"],
                                 sres["undelivered"]))
            got = _per_stream(log_path)
            bad = ["stream %s: %s of %d lines%s" % (k.decode(), got.get(k, (0, 0))[0], m,
                                                     ", CRC differs" if got.get(k, (0,))[0] == m
                                                     else "")
                   for k, (m, crc) in want.items() if got.get(k) != (m, crc)]
            extra = set(got) - set(want)
            if bad or extra:
                errors.append("%d streams wrong (%s)%s" % (
                    len(bad), "; ".join(bad[:3]),
                    ", lines of unknown streams" if extra else ""))
            res["messages"] = sum(c for c, _ in got.values())
            # Timed at the file as fwd_acked (first line -> last); go -> every batch
            # acknowledged is kept as wall_launch_s.
            res["wall_launch_s"] = sres["t1"] - sres["t0"]
            if sres.get("t_first") is None or sres.get("t_full") is None or \
                    sres["t_full"] <= sres["t_first"]:
                errors.append("no usable timing")
            else:
                res["wall_s"] = sres["t_full"] - sres["t_first"]
        if errors:
            res["error"] = "; ".join(errors)
        res["verified"] = "per-stream count+crc" if not errors else "FAIL"
        return res
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _per_stream(log_path):
    """``{key: (lines, crc)}`` over the collector's file, lines grouped by their stream's key."""
    from .bench_supervisor import KEY_AT, KEY_LEN

    counts, crcs, parts = {}, {}, {}
    try:
        f = open(log_path, "rb")
    except OSError:
        return {}
    with f:
        rest = b""
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            for line in block[:cut].split(b"\n")[:-1]:
                parts.setdefault(line[KEY_AT:KEY_AT + KEY_LEN], []).append(line)
            for key, group in parts.items():
                group.append(b"")
                crcs[key] = zlib.crc32(b"\n".join(group), crcs.get(key, 0))
                counts[key] = counts.get(key, 0) + len(group) - 1
            parts.clear()
    return {key: (counts[key], crcs[key]) for key in counts}
