"""CURVE's cost: ``zeroline forward`` → ``zeroline collect`` over tcp://127.0.0.1, push and acked,
with CurveZMQ and in plaintext, interleaved in the same run; ratios CURVE / plaintext.

``python -m benchmarks.bench_curve [--lines N] [--rounds R] [--check]``

Each measurement is the collector's own receive rate (``--stats``: messages_received_total over
receive_seconds, the first to the last received batch), so process start-up and key loading are
not timed. The file written is checked for its line count. ``--check`` exits 1 when a median ratio
is under its floor in benchmarks/gates.toml ``[curve]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
GATES = os.path.join(HERE, "gates.toml")
LINE_BYTES = 100
TIMEOUT_S = 300


def _zeroline(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "zeroline", *args], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("collector exited: %s" % proc.stderr.read().decode())
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit("collector did not bind")


def measure(work, keys, path, lines, mode, curve):
    """Lines per second received by the collector for one forward of ``path``."""
    port = _port()
    address = "tcp://127.0.0.1:%d" % port
    out = os.path.join(work, "out-%s-%d" % (mode, curve))
    shutil.rmtree(out, ignore_errors=True)
    col_args = ["collect", "--bind-acked" if mode == "acked" else "--bind", address,
                "--out", out, "--count", str(lines), "--stats", "--fsync", "never"]
    fwd_args = ["forward", path, "--log-opt", "zmq-address=" + address,
                "--log-opt", "zmq-socket=" + mode]
    if curve:
        col_args += ["--curve-secret-key", os.path.join(keys, "collector.key_secret"),
                     "--curve-allow", os.path.join(keys, "allow")]
        fwd_args += ["--log-opt", "zmq-curve-server-key=" + os.path.join(keys, "collector.key"),
                     "--log-opt", "zmq-curve-key=" + os.path.join(keys, "client.key_secret")]
    col = subprocess.Popen([sys.executable, "-m", "zeroline", *col_args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, col)
        _zeroline(*fwd_args, timeout=TIMEOUT_S)
        _, err = col.communicate(timeout=TIMEOUT_S)
    finally:
        if col.poll() is None:
            col.kill()
            col.wait()
    err = err.decode("utf-8", "replace")
    got = int(re.search(r"messages_received_total=(\d+)", err).group(1))
    seconds = float(re.search(r"receive_seconds=([0-9.]+)", err).group(1))
    with open(os.path.join(out, "default", "default.log"), "rb") as f:
        written = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    if got != lines or written != lines:
        raise SystemExit("%s curve=%s: %d received, %d written of %d" % (mode, curve, got,
                                                                         written, lines))
    return lines / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="zlcurve")
    try:
        keys = os.path.join(work, "keys")
        _zeroline("keygen", "collector", "--dir", keys)
        _zeroline("keygen", "client", "--dir", keys)
        os.mkdir(os.path.join(keys, "allow"))
        shutil.copy(os.path.join(keys, "client.key"), os.path.join(keys, "allow"))
        path = os.path.join(work, "input")
        with open(path, "wb") as f:
            line = b"x" * (LINE_BYTES - 1) + b"\n"
            f.write(line * args.lines)
        rates = {}
        ratios = {"push": [], "acked": []}
        for _ in range(args.rounds):
            for mode in ("push", "acked"):
                # Interleaved: plaintext and CURVE back to back, alternating which goes first.
                order = (False, True) if len(ratios[mode]) % 2 == 0 else (True, False)
                got = {curve: measure(work, keys, path, args.lines, mode, curve)
                       for curve in order}
                for curve, rate in got.items():
                    rates.setdefault((mode, curve), []).append(rate)
                ratios[mode].append(got[True] / got[False])
        for (mode, curve), values in sorted(rates.items()):
            print("%-5s %-9s median %.2f M lines/s  (rounds: %s)" % (
                mode, "curve" if curve else "plaintext", statistics.median(values) / 1e6,
                " ".join("%.2f" % (v / 1e6) for v in values)))
        with open(GATES, "rb") as f:
            floors = tomllib.load(f).get("curve", {})
        failed = False
        for mode, values in ratios.items():
            name = "%s_curve_over_plain" % mode
            median = statistics.median(values)
            floor = floors.get(name)
            verdict = "" if floor is None else ("ok" if median >= floor else "UNDER FLOOR")
            failed |= verdict == "UNDER FLOOR"
            print("%s = %.2f (rounds: %s) floor %s %s" % (
                name, median, " ".join("%.2f" % v for v in values), floor, verdict))
        return 1 if args.check and failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
