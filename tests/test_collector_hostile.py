"""A real `zeroline collect` under a hostile peer: random multipart messages at full speed for a
bounded few seconds, then good lines. The good lines are written, the collector's memory stays
bounded, the malformed messages are counted by reason, and --max-streams sends the lines of
further tenant/service pairs to one overflow file."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import zmq

#: How long the flood lasts (messages are sent as fast as the collector takes them).
FLOOD_S = 3.0
#: ... and at most this many messages. The pure-Python twin receives about 5x slower while a
#: full-speed peer sends as fast as ever, and PULL's queue in libzmq is unlimited (README,
#: "zeroline collect"): on a busy CI machine 302,000 messages in 3 s took the twin collector to
#: 301 MB. So its run checks the same promises on fewer messages, as test_delivery.py's
#: KILL_LINES does; the compiled collector gets the full 3 s (about 400,000 here).
FLOOD_MESSAGES = 60_000 if os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1" else 10_000_000
#: The bound on the collector's RSS. A collector idles at about 40-60 MB (Python, pyzmq, the
#: compiled core); the issue's bound after 60 s of random messages is 200 MB. Random messages
#: here are at most 4 KiB, so what libzmq queues (PULL keeps an unlimited HWM, see
#: collector.ACKED_RCVHWM_MSGS) and one receive round (RECEIVE_BUDGET_BYTES) stay far below it
#: unless something keeps what it was sent.
RSS_BOUND_BYTES = 200 * 1024 * 1024
MAX_STREAMS = 20
GOOD_LINES = 200


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def place():
    root = tempfile.mkdtemp(prefix="zlh", dir="/tmp")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _random_message(rng):
    kind = rng.random()
    if kind < 0.3:          # any frame count, any bytes
        return [rng.randbytes(rng.randrange(0, 4096)) for _ in range(rng.randrange(1, 6))]
    tenant = rng.randbytes(rng.randrange(0, 12))
    service = rng.randbytes(rng.randrange(0, 12))
    if kind < 0.6:          # three frames, a random payload (seed without ": ", msgpack, ...)
        return [tenant, service, rng.randbytes(rng.randrange(0, 2048))]
    # a valid seed line to a random destination: --max-streams decides where it goes
    return [tenant, service, b"abcdef123456: " + rng.randbytes(rng.randrange(0, 200))
            .replace(b"\n", b" ")]


def test_random_flood_then_good_lines(place):
    out = os.path.join(place, "out")
    address = "ipc://%s/c.ipc" % place
    collector = subprocess.Popen(
        [sys.executable, "-m", "zeroline", "collect", "--bind", address, "--out", out,
         "--max-streams", str(MAX_STREAMS), "--stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    context = zmq.Context()
    peer = context.socket(zmq.PUSH)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.SNDTIMEO, 5000)
    try:
        for _ in range(400):            # a hang guard of 20 s, bounded by count
            if os.path.exists(address[6:]) or collector.poll() is not None:
                break
            time.sleep(0.05)
        assert collector.poll() is None and os.path.exists(address[6:]), "collector not bound"
        peer.connect(address)
        # The good destination is one of the first MAX_STREAMS, so it keeps its own file.
        peer.send_multipart([b"good", b"svc", b"0123456789ab: first"])
        rng = random.Random(8)
        pool = [_random_message(rng) for _ in range(4000)]
        sent = 0
        peak = 0
        start = time.monotonic()
        end = start + FLOOD_S
        while time.monotonic() < end and sent < FLOOD_MESSAGES:
            for message in pool[sent % 4000: sent % 4000 + 500]:
                peer.send_multipart(message)
                sent += 1
            peak = max(peak, rss_bytes(collector.pid))
        flood_s = time.monotonic() - start
        for n in range(GOOD_LINES):
            peer.send_multipart([b"good", b"svc", b"0123456789ab: good line %d" % n])
        good = os.path.join(out, "good", "svc.log")
        written = 0
        for _ in range(1200):           # a hang guard of 60 s, bounded by count
            peak = max(peak, rss_bytes(collector.pid))
            try:
                with open(good, "rb") as f:
                    written = f.read().count(b"\n")
            except FileNotFoundError:
                pass
            if written >= GOOD_LINES + 1 or collector.poll() is not None:
                break
            time.sleep(0.05)
        assert collector.poll() is None, "the collector exited"
        assert written >= GOOD_LINES + 1, "good lines not written"
        after = rss_bytes(collector.pid)
    finally:
        peer.close()
        context.term()
        collector.send_signal(signal.SIGTERM)
        _, err = collector.communicate(timeout=60)
    err = err.decode("utf-8", "replace")
    assert collector.returncode == 0, err
    assert "Traceback" not in err
    with open(good, "rb") as f:
        assert f.read().splitlines() == [b"0123456789ab: first"] + [
            b"0123456789ab: good line %d" % n for n in range(GOOD_LINES)]
    assert peak < RSS_BOUND_BYTES, (peak, sent)
    assert after < RSS_BOUND_BYTES
    # Counted by reason: wrong frame counts, seed payloads without ": ".
    reasons = {name: int(count) for name, count in
               re.findall(r"malformed_total\{reason=(\w+)\}=(\d+)", err)}
    assert reasons.get("frames", 0) > 0 and reasons.get("seed", 0) > 0, err
    # --max-streams: the good destination plus MAX_STREAMS - 1 random ones got files; the rest
    # went to _overflow.
    tenants = [t for t in os.listdir(out) if t != ".zeroline"]
    files = sum(len(os.listdir(os.path.join(out, t))) for t in tenants)
    assert files <= MAX_STREAMS + 1
    with open(os.path.join(out, "_overflow", "_overflow.log"), "rb") as f:
        overflowed = f.read().count(b"\n")
    assert overflowed > 0
    # ... and every one of them is counted where an operator looks (--stats, /metrics).
    assert "overflow_lines_total=%d " % overflowed in err, err
    print("sent %d random messages in %.1f s; collector RSS peak %.1f MB, after %.1f MB"
          % (sent, flood_s, peak / 1e6, after / 1e6))
