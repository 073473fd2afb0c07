"""Issue 10: does scraping /metrics slow the data path? ``zeroline forward`` → ``zeroline collect``.

Rows (W1 only): ``met`` runs both with ``--metrics-address`` and a scraper thread reading each
one's ``/metrics`` every 100 ms for the whole transfer; ``met0`` is the same transfer without
metrics. Timed at the collector's file (its first bytes to the moment it holds every line), as
``fwd_col``; the file is checked for its line count and size. Gated: ``met_over_met0`` (the
metrics are read from counters at scrape time, so the ratio should stay near 1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request

from .bench_core import CONTAINER_ID, PREFIX, SERVICE, TENANT, child_timeout_s

ROWS = ("met", "met0")
SCRAPE_INTERVAL_S = 0.1
FILE_POLL_S = 0.005


def _address(err_path, proc, deadline):
    """The address a command announced on stderr, or None."""
    while time.monotonic() < deadline and proc.poll() is None:
        with open(err_path, "rb") as f:
            found = re.search(rb"metrics on http://([^/]+)/metrics", f.read())
        if found:
            return found.group(1).decode()
        time.sleep(0.01)
    return None


def _scraper(addresses, stop, counts, interval_s):
    while True:             # a first scrape at once, then every interval_s until stopped
        for address in addresses:
            try:
                with urllib.request.urlopen("http://%s/metrics" % address, timeout=5) as resp:
                    resp.read()
                counts["scrapes"] += 1
            except OSError:
                counts["failed"] += 1
        if stop.wait(interval_s):
            return


def measure(exe, row, wl, endpoint, work_dir, scrape_interval_s=SCRAPE_INTERVAL_S):
    """One transfer of the whole W1 file; ``row`` is ``met`` (scraped) or ``met0``; ``met_idle``
    (not a gated row) serves metrics without a scraper."""
    scraped = row in ("met", "met_idle")
    messages = wl.lines
    expected_bytes = wl.nbytes + messages * len(PREFIX)
    out_dir = os.path.join(work_dir, "met-%d" % time.monotonic_ns())
    os.makedirs(out_dir)
    log_path = os.path.join(out_dir, "logs", TENANT.decode(), SERVICE.decode() + ".log")
    env = dict(os.environ, TENANT_ID=TENANT.decode(), SERVICE_ID=SERVICE.decode())
    metrics = ["--metrics-address", "127.0.0.1:0"] if scraped else []
    deadline = time.monotonic() + child_timeout_s(wl.lines)
    res = {"lines": wl.lines, "nbytes": wl.nbytes}
    procs, stop, counts = [], threading.Event(), {"scrapes": 0, "failed": 0}
    errors = []
    err_col, err_fwd = os.path.join(out_dir, "collect.err"), os.path.join(out_dir, "fwd.err")
    try:
        with open(err_col, "wb") as ecol, open(err_fwd, "wb") as efwd, \
                open(wl.path, "rb") as stdin:
            col = subprocess.Popen([exe, "collect", "--bind", endpoint, "--out",
                                    os.path.join(out_dir, "logs"), "--count", str(messages),
                                    *metrics], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=ecol, env=env)
            procs.append(col)
            addresses = []
            if scraped:
                addresses.append(_address(err_col, col, deadline))
            else:
                while not os.path.exists(endpoint[len("ipc://"):]) and \
                        time.monotonic() < deadline and col.poll() is None:
                    time.sleep(0.005)
            fwd = subprocess.Popen([exe, "forward", "--log-opt", "zmq-address=" + endpoint,
                                    "--log-opt", "zmq-socket=push", "--container-id",
                                    CONTAINER_ID, *metrics], stdin=stdin,
                                   stdout=subprocess.DEVNULL, stderr=efwd, env=env)
            procs.append(fwd)
            if scraped and row == "met":
                addresses.append(_address(err_fwd, fwd, deadline))
                if None in addresses:
                    errors.append("no metrics address announced")
                thread = threading.Thread(target=_scraper,
                                          args=([a for a in addresses if a], stop, counts,
                                                scrape_interval_s),
                                          daemon=True)
                thread.start()
            t_first = t_full = None
            while time.monotonic() < deadline and t_full is None:
                try:
                    size = os.stat(log_path).st_size
                except OSError:
                    size = 0
                now = time.monotonic()
                if size and t_first is None:
                    t_first = now
                if size >= expected_bytes:
                    t_full = now
                elif col.poll() is not None and fwd.poll() is not None:
                    break
                time.sleep(FILE_POLL_S)
            stop.set()
            for proc in procs:
                try:
                    proc.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    errors.append("%s did not exit" % proc.args[1])
        for proc, err in ((col, err_col), (fwd, err_fwd)):
            if proc.returncode:
                with open(err, "rb") as f:
                    errors.append("%s exited %s: %s" % (proc.args[1], proc.returncode,
                                                        f.read().decode()[-300:]))
        if t_first is None or t_full is None or t_full <= t_first:
            errors.append("no usable timing (file %s)" % ("incomplete" if t_first else "empty"))
        else:
            res["wall_s"] = t_full - t_first
        if os.path.exists(log_path):
            size = os.path.getsize(log_path)
            with open(log_path, "rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            res["messages"] = lines
            if (lines, size) != (messages, expected_bytes):
                errors.append("file has %d lines, %d bytes; expected %d, %d"
                              % (lines, size, messages, expected_bytes))
        if row == "met" and counts["scrapes"] == 0:
            errors.append("no scrape succeeded (%d failed)" % counts["failed"])
        res["scrapes"] = counts["scrapes"]
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
    if errors:
        res["error"] = "; ".join(errors)
    res["verified"] = "FAIL" if errors else "file lines+size"
    return res
