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


# ---------------------------------------------------------------------------------------------
# Issue 3 rows (benchmarks/bench_supervisor.py)

from benchmarks import bench_supervisor  # noqa: E402


def _records(stream, first, count):
    return [bench_supervisor.stream_prefix(stream) + b"%010d " % i + b"x" * 88 + b"\n"
            for i in range(first, first + count)]


def test_stream_tally_splits_by_stream_in_arrival_order():
    expected = {bench_supervisor.stream_key(i): 6 for i in range(3)}
    tally = bench_supervisor.StreamTally(expected, chatty=list(expected))
    a, b, c = (_records(i, 0, 6) for i in range(3))
    # Runs of one stream, then message-by-message interleaving (several sockets), then the end.
    tally.add(b"".join(a[:3] + b[:1] + c[:1] + b[1:2] + c[1:2]), now=1.0)
    tally.add(b"".join(a[3:] + b[2:4]), now=2.0)           # a completes here: window closes
    tally.add(b"".join(b[4:] + c[2:] + _records(7, 0, 2)), now=3.0)
    for i, records in enumerate((a, b, c)):
        key = bench_supervisor.stream_key(i)
        assert tally.counts[key] == 6
        assert tally.crcs[key] == zlib.crc32(b"".join(records))
    assert tally.window == {expected_key: n for expected_key, n in
                            zip(expected, (6, 2, 2))}            # exactly when a completed
    assert tally.fairness() == 3.0 and tally.unknown == 2
    assert tally.done_at == dict(zip(expected, (2.0, 3.0, 3.0)))


def test_stream_tally_names_a_starved_stream():
    expected = {bench_supervisor.stream_key(i): 2 for i in range(2)}
    tally = bench_supervisor.StreamTally(expected, chatty=list(expected))
    tally.add(b"".join(_records(0, 0, 2)), now=1.0)
    assert tally.window[bench_supervisor.stream_key(1)] == 0
    assert tally.fairness() == float("inf")


@pytest.mark.parametrize("mode, threads", [("loop", 0), ("threads", 2)])
def test_supervisor_row_checks_every_stream(tmp, mode, threads):
    # In-process: the receiver in a thread, the supervisor side here (it forks its writer).
    wl = workloads.generate("W1", 400, os.path.join(tmp, "w1"), seed=1)
    n_chatty, n_idle, lines = 6, 3, 300
    nbytes = bench_supervisor.prefix_bytes(wl.path, lines)
    first = bench_supervisor.prefix_bytes(wl.path, 1)
    want = {bench_supervisor.stream_key(i): workloads.expected_digest(
        wl.path, nbytes if i < n_chatty else first, bench_supervisor.stream_prefix(i))
        for i in range(n_chatty + n_idle)}
    expected = {k: m for k, (m, _) in want.items()}
    endpoint = "ipc://%s/sup.ipc" % tmp
    ready, done = threading.Event(), threading.Event()
    box = {}

    def receive():
        box["r"] = bench_supervisor._demux_receiver(
            endpoint, expected, list(expected)[:n_chatty], ready, done, deadline_s=30.0,
            impl=IMPLS[0])

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        assert ready.wait(10.0)
        sres = bench_supervisor._sup_sender(mode, threads, endpoint, n_chatty, n_idle, wl.path,
                                            nbytes, deadline_s=30.0, impl=IMPLS[0])
    finally:
        done.set()
        thread.join(35.0)
    assert not thread.is_alive()
    res = bench_supervisor.check_supervisor(sres, box["r"], want, n_chatty * lines + n_idle,
                                            n_chatty, n_idle, lines, nbytes * n_chatty,
                                            mode, threads)
    assert "error" not in res, res.get("error")
    assert res["verified"] == "per-stream count+crc" and res["messages"] == sum(expected.values())
    assert res["wall_s"] > 0 and res["fairness"] >= 1.0 and res["writer_status"] == 0
    assert res["kib_per_stream"] is not None
    # A lost message is caught per stream.
    key = bench_supervisor.stream_key(1)
    box["r"]["counts"][key] -= 1
    bad = bench_supervisor.check_supervisor(sres, box["r"], want, n_chatty * lines + n_idle,
                                            n_chatty, n_idle, lines, nbytes * n_chatty,
                                            mode, threads)
    assert bad["verified"] == "FAIL" and "stream 001" in bad["error"]


@pytest.mark.parametrize("impl", ["cython", "pyzmq"])
def test_receive_rows_drain_a_filled_queue(tmp, impl):
    if impl == "cython" and "cython" not in IMPLS:
        pytest.skip("compiled core not built")
    wl = workloads.generate("W1", 3000, os.path.join(tmp, "w1"), seed=1)
    endpoint = "ipc://%s/rx.ipc" % tmp
    messages, crc = workloads.expected_digest(wl.path, wl.nbytes, PREFIX)
    ready, done = threading.Event(), threading.Event()
    box = {}

    def receive():
        box["r"] = bench_supervisor._prefilled_receiver(endpoint, impl, messages, ready, done,
                                                        deadline_s=20.0)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        assert ready.wait(10.0)
        bench_e2e._stream_sender(IMPLS[0], wl.path, wl.nbytes, endpoint, 1000)
    finally:
        done.set()
        thread.join(25.0)
    assert not thread.is_alive()
    got = box["r"]
    assert (got["messages"], got["crc"], got["malformed"]) == (messages, crc, 0)
    assert got["t_last"] > got["t0"]


def test_quick_runs_leave_the_design_rows_out():
    quick = bench_main.parse_args(["--quick"])
    full = bench_main.parse_args([])
    assert set(bench_main.SERVICE_ROWS) <= set(quick.rows)
    assert not set(bench_main.DESIGN_ROWS) & set(quick.rows)
    assert set(full.rows) == set(bench_main.ROWS)
    assert bench_main.parse_args(["--quick", "--rows", "sup_t2"]).rows == ["sup_t2"]
    floors, _, targets = bench_main.load_gates()
    assert floors["sup_over_b"] == 0.8 and "fwd_col_over_b" in floors
    assert "rx_over_rx_py" in floors and targets["sup_fairness"] == 2.0


@pytest.mark.parametrize("sup_rate, fails", [(9e5, False), (7e5, True)])
def test_supervisor_gate_and_fairness_target(sup_rate, fails, capsys):
    floors, per_workload, targets = bench_main.load_gates()
    sess = _fake_session({"b": [1e6] * 3, "sup": [sup_rate] * 3})
    for res in sess.results[("W1", "sup")]:
        res["fairness"] = float("inf")
    sess.results[("W1", "sup")][0]["streams"] = 100
    summary = bench_main.summarize(sess, floors, per_workload, targets)
    assert summary["ratios"][("W1", "sup_over_b")]["ok"] is not fails
    assert summary["targets"][("W1", "sup_fairness")]["ok"] is False     # reported, not gated
    args = types.SimpleNamespace(check=True, quick=True)
    assert bench_main.verdict(sess, summary, targets, args) == (1 if fails else 0)
    assert bench_main._finite({"x": [float("inf"), 1.5]}) == {"x": [None, 1.5]}
    bench_main.sup_table(sess, summary["rows"], "W1")
    assert "inf" in capsys.readouterr().out


def test_service_rows_run_from_the_command_line(capsys):
    # The real harness (forkserver children, CLI processes), tiny sizes; W1 only.
    if "cython" not in IMPLS:
        pytest.skip("the rows' receivers use the compiled core")
    rows = "sup,rx,rx_py" + (",fwd_col" if shutil.which("zeroline") else "")
    status = bench_main.main(["--quick", "--reps", "1", "--rows", rows, "--workloads", "W1",
                              "--lines", "20000", "--slow-lines", "4000", "--stream-lines", "300",
                              "--no-save"])
    out = capsys.readouterr().out
    # Tiny timings are too noisy for floors (not --check): every check must pass, though.
    assert status == 0 and "FAIL" not in out and "ERROR" not in out, out[-3000:]
    assert "per-stream count+crc" in out and "rx_over_rx_py" in out


def test_acked_rows_run_from_the_command_line(capsys):
    # Issue 7 rows through the real CLIs, tiny sizes; spool_r runs first in round 2 (reversed
    # order), so it must fill a spool of its own; every file, spool and stream is checked.
    if "cython" not in IMPLS or not shutil.which("zeroline"):
        pytest.skip("the rows run the zeroline CLI with the compiled core")
    status = bench_main.main(["--quick", "--reps", "2", "--rows",
                              "fwd_acked,spool_w,spool_r,sup_acked", "--workloads", "W1",
                              "--lines", "20000", "--stream-lines", "300", "--no-save"])
    out = capsys.readouterr().out
    assert status == 0 and "FAIL" not in out and "ERROR" not in out, out[-3000:]
    for text in ("spool lines+crc", "file lines+crc", "per-stream count+crc",
                 "sup_acked_over_fwd_acked", "spool_w_peak_rss_mb"):
        assert text in out, text


@pytest.mark.parametrize("acked_rate, fails", [(3.5e6, False), (1.2e6, True)])
def test_acked_gates(acked_rate, fails):
    floors, per_workload, targets = bench_main.load_gates()
    assert {"fwd_acked_over_f", "sup_acked_over_fwd_acked"} <= set(floors)
    assert targets["fwd_acked_lines_per_s"] == 4.0e6 and targets["spool_w_peak_rss_mb"] == 64.0
    sess = _fake_session({"f": [1e6] * 3, "fwd_acked": [acked_rate] * 3,
                          "sup_acked": [acked_rate] * 3})
    summary = bench_main.summarize(sess, floors, per_workload, targets)
    assert summary["ratios"][("W1", "fwd_acked_over_f")]["ok"] is not fails
    assert summary["ratios"][("W1", "sup_acked_over_fwd_acked")]["value"] == 1.0
    args = types.SimpleNamespace(check=True, quick=True)
    assert bench_main.verdict(sess, summary, targets, args) == (1 if fails else 0)


# ---------------------------------------------------------------------------------------------
# Issue 4 rows (benchmarks/bench_plugin.py): LogEntry frames from the protobuf package

from benchmarks import bench_plugin  # noqa: E402


@pytest.fixture
def entry_file(tmp):
    """Frames of a small W2 sample (with lines cut into 16 KiB partial chunks), encoded as a run
    encodes them; skipped without grpc_tools/protobuf, as the rows are."""
    pytest.importorskip("grpc_tools.protoc")
    pytest.importorskip("google.protobuf")
    wl = workloads.generate("W2", 4000, os.path.join(tmp, "w2"), seed=1)
    assert wl.long_lines >= 1
    ef, why = bench_plugin.prepare(tmp, wl, 3000)
    assert why is None and ef.lines == 3000
    return wl, ef


def _entry_impls():
    return [i for i in IMPLS if i in ("cython", "python")]


@pytest.mark.parametrize("impl", _entry_impls())
def test_entry_frames_decode_to_the_text_digest(entry_file, impl):
    wl, ef = entry_file
    data = open(ef.path, "rb").read()
    assert len(data) == ef.nbytes(ef.lines) and ef.ends == sorted(ef.ends)
    lines = 2000
    messages, crc = workloads.expected_digest(wl.path, bench_plugin.prefix_bytes(wl.path, lines),
                                              PREFIX)
    assert ef.entries[lines] == messages > lines        # long lines became several entries
    stream = bench_plugin._entry_stream_class(impl)(container_id=bench_core.CONTAINER_ID)
    got = []
    view = data[:ef.nbytes(lines)]
    for i in range(0, len(view), 65536):
        stream.feed(view[i:i + 65536])
        got += stream.take()
    stream.close()
    assert stream.errors_total == 0 and stream.partial_entries_total > 0
    assert _payload_digest(got) == (messages, crc)


@pytest.mark.parametrize("impl", ["cython", "python", "protobuf"])
def test_decode_rows_check_every_payload(entry_file, impl):
    if impl == "cython" and "cython" not in IMPLS:
        pytest.skip("compiled core not built")
    wl, ef = entry_file
    lines = 1500
    res = bench_plugin._decode(impl, ef.path, ef.nbytes(lines), min_time_s=0.0, max_passes=3,
                               pb_dir=ef.pb_dir, chunk_bytes=4096)
    messages, crc = workloads.expected_digest(wl.path, bench_plugin.prefix_bytes(wl.path, lines),
                                              PREFIX)
    assert (res["check_messages"], res["check_crc"], res["check_errors"]) == (messages, crc, 0)
    assert res["passes"] == 1 and res["decoded"] == messages and res["wall_s"] > 0


@pytest.mark.parametrize("write_mode", ["blocks", "entry"])
def test_plugin_row_checks_every_stream(tmp, entry_file, write_mode):
    # In-process: the receiver in a thread, the plugin side here (it forks its FIFO writer).
    wl, ef = entry_file
    n, lines = 6, 400
    want = {bench_supervisor.stream_key(i): workloads.expected_digest(
        wl.path, bench_plugin.prefix_bytes(wl.path, lines), bench_supervisor.stream_prefix(i))
        for i in range(n)}
    expected = {k: m for k, (m, _) in want.items()}
    per_stream, nbytes = ef.entries[lines], ef.nbytes(lines)
    endpoint = "ipc://%s/plug.ipc" % tmp
    fifo_dir = os.path.join(tmp, "fifos")
    ready, done = threading.Event(), threading.Event()
    box = {}

    def receive():
        box["r"] = bench_supervisor._demux_receiver(endpoint, expected, list(expected), ready,
                                                    done, deadline_s=30.0, impl=IMPLS[0])

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        assert ready.wait(10.0)
        sres = bench_plugin._plug_sender(IMPLS[0], write_mode, endpoint, fifo_dir, n, ef.path,
                                         nbytes, deadline_s=30.0)
    finally:
        done.set()
        thread.join(35.0)
    assert not thread.is_alive()
    assert not os.path.exists(fifo_dir)                 # FIFOs and their directory removed
    res = bench_plugin.check_plugin(sres, box["r"], want, per_stream, nbytes, IMPLS[0],
                                    write_mode)
    assert "error" not in res, res.get("error")
    assert res["verified"] == "per-stream count+crc" and res["messages"] == n * per_stream
    assert res["writer_status"] == 0 and res["nbytes"] == n * nbytes
    # A bad entry or a lost message fails the row.
    bad = bench_plugin.check_plugin(dict(sres, entry_errors=1), box["r"], want, per_stream,
                                    nbytes, IMPLS[0], write_mode)
    assert bad["verified"] == "FAIL" and "malformed" in bad["error"]
    box["r"]["counts"][bench_supervisor.stream_key(2)] -= 1
    bad = bench_plugin.check_plugin(sres, box["r"], want, per_stream, nbytes, IMPLS[0],
                                    write_mode)
    assert bad["verified"] == "FAIL" and "stream 002" in bad["error"]


def test_plugin_rows_in_quick_runs_and_gates():
    quick = bench_main.parse_args(["--quick"])
    full = bench_main.parse_args([])
    assert set(bench_main.PLUGIN_ROWS) <= set(quick.rows) and "plug_1w" not in quick.rows
    assert "plug_1w" in full.rows
    floors, _, targets = bench_main.load_gates()
    assert floors["dec_over_dec_pb"] == 10.0 and 0 < floors["plug_over_b"] <= 1.0
    assert targets["plug_entries_per_s"] == 0.8e6


@pytest.mark.parametrize("plug_rate, dec_pb_rate, fails", [(9e5, 1e6, False), (3e5, 1e6, True),
                                                           (9e5, 3e6, True)])
def test_plugin_gates(plug_rate, dec_pb_rate, fails, capsys):
    floors, per_workload, targets = bench_main.load_gates()
    sess = _fake_session({"b": [1e6] * 3, "plug": [plug_rate] * 3, "dec": [2e7] * 3,
                          "dec_pb": [dec_pb_rate] * 3})
    summary = bench_main.summarize(sess, floors, per_workload, targets)
    assert summary["targets"][("W1", "plug_entries_per_s")]["ok"] is (plug_rate >= 8e5)
    args = types.SimpleNamespace(check=True, quick=True)
    assert bench_main.verdict(sess, summary, targets, args) == (1 if fails else 0)


def _check_without_protobuf(monkeypatch, capsys, *options):
    """``--quick --check`` on the plugin rows with protobuf missing: (status, output)."""
    if "cython" not in IMPLS:
        pytest.skip("the harness needs the compiled core")
    monkeypatch.setattr(bench_plugin, "compile_proto",
                        lambda out_dir: (None, "grpc_tools not installed (test)"))
    status = bench_main.main(["--quick", "--check", *options, "--reps", "1", "--workloads", "W1",
                              "--lines", "2000", "--no-save"])
    return status, capsys.readouterr().out


def test_plugin_rows_are_skipped_without_protobuf(monkeypatch, capsys):
    status, out = _check_without_protobuf(monkeypatch, capsys, "--rows", "plug,dec,dec_pb")
    assert status == 0, out[-2000:]
    skipped = [line.split()[0] for line in out.splitlines()
               if line.endswith("skipped: grpc_tools not installed (test)")]
    assert skipped == ["plugin", "plug", "dec", "dec_pb"]    # the note, then each row


def test_require_rows_fails_the_check_when_an_asked_for_row_is_skipped(monkeypatch, capsys):
    # What .ci/run's engine gate relies on: no engine (here: no protobuf) must not pass on nothing.
    status, out = _check_without_protobuf(monkeypatch, capsys, "--require-rows", "--rows",
                                          "dec,dec_pb")
    assert status == 1, out[-2000:]
    assert "row dec was asked for and skipped: grpc_tools not installed (test)" in out


def test_plugin_rows_run_from_the_command_line(capsys):
    if "cython" not in IMPLS:
        pytest.skip("the rows' receivers use the compiled core")
    pytest.importorskip("grpc_tools.protoc")
    pytest.importorskip("google.protobuf")
    status = bench_main.main(["--quick", "--reps", "1", "--rows",
                              "b,plug,plug_py,plug_1w,dec,dec_py,dec_pb", "--workloads", "W1",
                              "--lines", "20000", "--slow-lines", "4000", "--stream-lines", "300",
                              "--no-save"])
    out = capsys.readouterr().out
    # Tiny timings are too noisy for floors (not --check): every check must pass, though.
    assert status == 0 and "FAIL" not in out and "ERROR" not in out, out[-3000:]
    assert out.count("per-stream count+crc") == 3 and "dec_over_dec_pb" in out
    assert "plug_over_b" in out and "plug_entries_per_s" in out
