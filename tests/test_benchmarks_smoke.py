"""Smoke tests of the benchmark harness: inputs, digests, tiny measurements; behaviour, not speed.

No timing is asserted: speed is gated by `python -m benchmarks --check`, in one run, on ratios.
"""

import os
import shutil
import sys
import tempfile
import threading
import types
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import bench_core, bench_e2e, workloads  # noqa: E402
from benchmarks.bench_core import PREFIX  # noqa: E402

NO_EXTENSIONS = os.environ.get("ZEROLINE_NO_EXTENSIONS") == "1"
REQUIRE_EXTENSIONS = os.environ.get("ZEROLINE_REQUIRE_EXTENSIONS") == "1"
LIMIT = workloads.LINE_LIMIT_BYTES


def _impls():
    # As zeroline.core: the twin always; the compiled core unless ZEROLINE_NO_EXTENSIONS=1, and
    # a failed import is an error (not a skip) when ZEROLINE_REQUIRE_EXTENSIONS=1.
    names = ["python"]
    if not NO_EXTENSIONS:
        try:
            import zeroline._core  # noqa: F401
        except ImportError:
            if REQUIRE_EXTENSIONS:
                raise
        else:
            names.insert(0, "cython")
    return names


IMPLS = _impls()


@pytest.fixture
def tmp():
    # Short: ipc:// paths must fit in sun_path (107 bytes).
    path = tempfile.mkdtemp(prefix="zlbt", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _payload_digest(frames_list):
    crc = 0
    for frames in frames_list:
        assert len(frames) == 3
        crc = zlib.crc32(bytes(frames[2]) + b"\n", crc)
    return len(frames_list), crc


def test_workloads_are_seeded_and_shaped(tmp):
    a = workloads.generate("W1", 3000, os.path.join(tmp, "a"), seed=7, small_lines=1000)
    b = workloads.generate("W1", 3000, os.path.join(tmp, "b"), seed=7, small_lines=1000)
    data = open(a.path, "rb").read()
    assert data == open(b.path, "rb").read()
    assert a.nbytes == len(data) == 3000 * 100 and a.small_nbytes == 1000 * 100
    assert {len(line) for line in data.split(b"\n")[:-1]} == {99}
    assert data.startswith(b"0000000000 ") and b"\n0000002999 " in data

    w2 = workloads.generate("W2", 4000, os.path.join(tmp, "w2"), seed=1, small_lines=1500)
    longer = workloads.generate("W2", 5000, os.path.join(tmp, "w2b"), seed=1)
    body = open(w2.path, "rb").read()
    assert open(longer.path, "rb").read().startswith(body)       # shorter input = a prefix
    lines = body.split(b"\n")[:-1]
    assert len(lines) == 4000 and w2.nbytes == len(body)
    assert body[:w2.small_nbytes].count(b"\n") == 1500 and body[w2.small_nbytes - 1] == ord("\n")
    sizes = sorted(len(line) for line in lines)
    assert 90 <= sizes[len(sizes) // 2] <= 150                     # median ~120
    assert w2.long_lines == sum(1 for n in sizes if n >= LIMIT) >= 1
    assert sizes[-1] <= workloads.W2_LONG_MAX_BYTES


@pytest.mark.parametrize("impl", IMPLS)
def test_expected_digest_matches_the_stream_output(tmp, impl):
    # Edge lengths around the 16 KiB cut, then a W2 sample; the digest must equal what a Stream
    # of either implementation emits, and its fast path the per-line reference.
    edge = b"".join(b"x" * n + b"\n" for n in (0, 1, 99, LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT,
                                                40000, 5))
    w2 = workloads.generate("W2", 4000, os.path.join(tmp, "w2"), seed=1)
    core = bench_core.core_module(impl)
    for data in (edge, open(w2.path, "rb").read()):
        path = os.path.join(tmp, "in")
        with open(path, "wb") as f:
            f.write(data)
        expected = workloads.expected_digest(path, len(data), PREFIX)
        assert expected == workloads.expected_digest_slow(data, PREFIX)
        stream = core.Stream("stdout", container_id=bench_core.CONTAINER_ID, id_seed=1)
        for i in range(0, len(data), 65536):
            stream.feed(data[i:i + 65536], time_nano=1)
        stream.close(time_nano=1)
        assert _payload_digest(stream.take()) == expected
    assert workloads.expected_digest(path, len(data), b"other: ") != expected


@pytest.mark.parametrize("impl", IMPLS)
def test_cut_frame_row_counts_every_line(tmp, impl):
    wl = workloads.generate("W2", 3000, os.path.join(tmp, "w2"), seed=1)
    res = bench_core._cut_frame(wl.path, wl.nbytes, min_time_s=0.0, max_passes=2, impl=impl)
    messages, _ = workloads.expected_digest(wl.path, wl.nbytes, PREFIX)
    assert res["passes"] == 1                          # min_time_s=0: one pass is enough
    assert res["lines_total"] == wl.lines and res["messages"] == messages > wl.lines
    assert res["wall_s"] > 0


def _deliver(tmp, wl, sender, **kwargs):
    """Receiver thread + sender in this thread, as the e2e rows do across processes."""
    endpoint = "ipc://%s/e2e.ipc" % tmp
    messages, crc = workloads.expected_digest(wl.path, wl.nbytes, PREFIX)
    ready, done = threading.Event(), threading.Event()
    box = {}

    def receive():
        box["r"] = bench_e2e._receiver(endpoint, messages, ready, done, deadline_s=20.0,
                                       impl=IMPLS[0])

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        assert ready.wait(10.0)
        sent = sender(path=wl.path, nbytes=wl.nbytes, endpoint=endpoint, hwm=100, **kwargs)
    finally:
        done.set()
        thread.join(25.0)
    assert not thread.is_alive()
    got = box["r"]
    assert sent["messages"] == messages
    assert (got["messages"], got["crc"], got["malformed"]) == (messages, crc, 0)
    assert bench_e2e.prefix_of(got["head"]) == PREFIX
    return sent, got


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_row_delivers_every_message(tmp, impl):
    wl = workloads.generate("W2", 3000, os.path.join(tmp, "w2"), seed=1)
    assert wl.long_lines >= 1
    sent, got = _deliver(tmp, wl, bench_e2e._stream_sender, impl=impl)
    assert sent["lines_total"] == wl.lines and sent["sent"] == sent["messages"]
    assert sent["t1"] >= sent["t0"] and got["t_last"] >= got["t_first"]


def test_naive_row_sends_the_same_messages(tmp):
    wl = workloads.generate("W2", 3000, os.path.join(tmp, "w2"), seed=1)
    _deliver(tmp, wl, bench_e2e._naive_sender, limit=LIMIT)


def _fake_session(rates):
    results = {("W1", row): [{"lines_per_s": r} for r in rs] for row, rs in rates.items()}
    return types.SimpleNamespace(workloads={"W1": None}, results=results, skipped={})


@pytest.mark.parametrize("b_rate, fails", [(6.5e5, False), (5.5e5, True)])
def test_check_fails_below_a_floor(b_rate, fails, capsys):
    floors, per_workload, targets = bench_main.load_gates()
    assert floors["b_over_d"] == 6.0
    sess = _fake_session({"a": [1e9] * 3, "b": [b_rate, 1e6, b_rate], "c": [1e4] * 3,
                          "d": [1e5] * 3, "e": [1e9] * 3})
    summary = bench_main.summarize(sess, floors, per_workload, targets)
    assert summary["ratios"][("W1", "b_over_d")]["ok"] is not fails
    args = types.SimpleNamespace(check=True, quick=True)
    assert bench_main.verdict(sess, summary, targets, args) == (1 if fails else 0)
    assert ("CHECK FAILED" in capsys.readouterr().out) is fails
