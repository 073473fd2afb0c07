"""Tests of the disk spool: round trips, restarts, the lock, torn and corrupt records, full disk."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroline.errors import ZerolineError
from zeroline.transport.spool import Spool, SpoolError, SpoolFull, SpoolRecord

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def body_for(stream_id, seq, size=100):
    """A body that says which batch it is, so replayed garbage cannot pass for a record."""
    unit = b"%s:%d;" % (stream_id, seq)
    return (unit * (size // len(unit) + 1))[:size]


def append_n(spool, stream_id, n, size=100):
    for _ in range(n):
        seq = spool.next_seq(stream_id)
        spool.append(stream_id, seq, b"tenant", b"svc", body_for(stream_id, seq, size), seq)


def drain(spool):
    out = []
    while True:
        record = spool.next_unsent()
        if record is None:
            return out
        out.append(record)


def seg_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def disk_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in seg_files(path))


def run_child(code, *args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)] + [str(a) for a in args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


# -- round trips --------------------------------------------------------------------------------

def test_append_next_unsent_release_round_trip(tmp_path):
    with Spool(tmp_path / "sp") as spool:
        assert len(spool.instance_id) == 16 and int(spool.instance_id, 16) >= 0
        spool.append(b"a", 1, b"t1", b"s1", b"body-a1", 3)
        spool.append(b"b", 1, b"", b"s2", b"body-b1", 1)
        spool.append(b"a", 2, b"t1", b"s1", b"", 0)
        assert spool.records == 3 and spool.unsent_count() == 3 and spool.appended_total == 3
        assert spool.next_unsent() == SpoolRecord(b"a", 1, b"t1", b"s1", b"body-a1", 3)
        assert spool.unsent_count() == 2
        assert spool.next_unsent() == SpoolRecord(b"b", 1, b"", b"s2", b"body-b1", 1)
        assert spool.release(b"a", 2) == 2
        assert spool.unsent_count() == 0 and spool.records == 1
        assert spool.next_unsent() is None
        assert spool.release(b"a", 2) == 0  # an ack below or at what was acked is ignored
        assert spool.release(b"b", 5) == 1
        assert spool.records == 0 and spool.released_total == 3


def test_next_unsent_keeps_append_order_across_streams(tmp_path):
    order = [b"x", b"y", b"x", b"z", b"y", b"x"]
    with Spool(tmp_path, segment_bytes=300) as spool:
        for stream_id in order:
            seq = spool.next_seq(stream_id)
            spool.append(stream_id, seq, b"", b"", body_for(stream_id, seq), 1)
        got = [(r.stream_id, r.seq) for r in drain(spool)]
    assert got == [(b"x", 1), (b"y", 1), (b"x", 2), (b"z", 1), (b"y", 2), (b"x", 3)]


def test_release_of_unsent_records_skips_them_in_next_unsent(tmp_path):
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 3)
        append_n(spool, b"b", 2)
        spool.release(b"a", 2)
        assert spool.unsent_count() == 3
        assert [(r.stream_id, r.seq) for r in drain(spool)] == [(b"a", 3), (b"b", 1), (b"b", 2)]


def test_append_refuses_a_seq_that_does_not_move_forward(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(b"a", 5, b"", b"", b"x", 1)
        with pytest.raises(ValueError):
            spool.append(b"a", 5, b"", b"", b"x", 1)
        spool.release(b"b", 7)
        with pytest.raises(ValueError):
            spool.append(b"b", 7, b"", b"", b"x", 1)
        with pytest.raises(ValueError):
            spool.append(b"", 1, b"", b"", b"x", 1)
        assert spool.records == 1


def test_next_seq_survives_restart_with_remaining_records(tmp_path):
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 5)
        spool.release(b"a", 3)
        assert spool.next_seq(b"a") == 6 and spool.next_seq(b"new") == 1
    with Spool(tmp_path) as spool:
        assert spool.next_seq(b"a") == 6
        assert [r.seq for r in drain(spool)] == [4, 5]


def test_next_seq_survives_restart_when_everything_was_released(tmp_path):
    with Spool(tmp_path, segment_bytes=250) as spool:
        append_n(spool, b"a", 5)
        spool.release(b"a", 5)
        spool.release(b"never-appended", 41)
        assert seg_files(tmp_path) == []
    with Spool(tmp_path) as spool:
        assert spool.records == 0 and spool.segments == 0 and spool.bytes_used == 0
        assert spool.next_seq(b"a") == 6
        assert spool.next_seq(b"never-appended") == 42


def test_instance_id_is_kept_in_the_spool_dir(tmp_path):
    with Spool(tmp_path) as spool:
        first = spool.instance_id
    with Spool(tmp_path) as spool:
        assert spool.instance_id == first
    assert (tmp_path / "instance").read_text().strip() == first


def test_new_spool_dir_is_private(tmp_path):
    with Spool(tmp_path / "new" / "dir"):
        pass
    assert os.stat(tmp_path / "new" / "dir").st_mode & 0o777 == 0o700


# -- restarts and segments ----------------------------------------------------------------------

def test_reopen_replays_exactly_the_unreleased_records(tmp_path):
    with Spool(tmp_path, segment_bytes=400) as spool:
        append_n(spool, b"a", 10)
        append_n(spool, b"b", 10)
        spool.release(b"a", 7)
        spool.release(b"b", 2)
        handed = drain(spool)
        assert len(handed) == 11
    with Spool(tmp_path, segment_bytes=400) as spool:
        assert spool.records == 11 and spool.unsent_count() == 11
        replayed = drain(spool)
        assert replayed == handed
        for record in replayed:
            assert record.body == body_for(record.stream_id, record.seq)
        spool.release(b"a", 10)
    with Spool(tmp_path, segment_bytes=400) as spool:
        assert [(r.stream_id, r.seq) for r in drain(spool)] == [(b"b", s) for s in range(3, 11)]


def test_fully_released_segments_are_deleted(tmp_path):
    with Spool(tmp_path, segment_bytes=500) as spool:
        append_n(spool, b"a", 20)  # ~ 150 bytes a record: 3 a segment
        before = spool.segments
        assert before == len(seg_files(tmp_path)) >= 6
        assert spool.bytes_used == disk_bytes(tmp_path)
        spool.release(b"a", 9)
        assert spool.segments == len(seg_files(tmp_path)) == before - 3
        assert spool.bytes_used == disk_bytes(tmp_path)
        spool.release(b"a", 20)  # the live segment too
        assert seg_files(tmp_path) == [] and spool.bytes_used == 0
        append_n(spool, b"a", 1)  # a fresh segment, numbered after the deleted ones
        assert spool.segments == 1
        assert int(seg_files(tmp_path)[0][:16]) == before + 1
    with Spool(tmp_path) as spool:
        assert [r.seq for r in drain(spool)] == [21]


def test_appends_continue_in_the_last_segment_after_reopen(tmp_path):
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 2)
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 2)
        assert spool.segments == 1
        assert [r.seq for r in drain(spool)] == [1, 2, 3, 4]


def test_large_body_is_one_record(tmp_path):
    body = os.urandom(3 << 20)
    with Spool(tmp_path, segment_bytes=1 << 20) as spool:
        spool.append(b"a", 1, b"", b"", body, 9)
        spool.append(b"a", 2, b"", b"", b"small", 1)
        assert spool.segments == 2
    with Spool(tmp_path, segment_bytes=1 << 20) as spool:
        assert drain(spool) == [SpoolRecord(b"a", 1, b"", b"", body, 9),
                                SpoolRecord(b"a", 2, b"", b"", b"small", 1)]


def test_compacted_journal_keeps_release_state(tmp_path, monkeypatch):
    from zeroline.transport import spool as spool_module
    monkeypatch.setattr(spool_module, "JOURNAL_COMPACT_BYTES", 200)
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 50, size=10)
        for seq in range(1, 41):
            spool.release(b"a", seq)
        assert os.path.getsize(tmp_path / "released") <= 200 + 30
    with Spool(tmp_path) as spool:
        assert [r.seq for r in drain(spool)] == list(range(41, 51))
        assert spool.journal_corrupt_total == 0


def test_torn_journal_entry_is_ignored(tmp_path):
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 5)
        spool.release(b"a", 2)
        spool.release(b"a", 4)
    journal = tmp_path / "released"
    data = journal.read_bytes()
    journal.write_bytes(data[:-3])  # tear the entry "a: 4", appended after "a: 2"
    with Spool(tmp_path) as spool:
        # The torn release is lost (at-least-once: its records come back), the one before stays.
        assert spool.journal_corrupt_total == 1
        assert [r.seq for r in drain(spool)] == [3, 4, 5]


# -- the lock -----------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from zeroline.transport.spool import Spool
spool = Spool(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
spool.close()
"""


def test_second_spool_in_another_process_names_the_pid(tmp_path):
    child = run_child(HOLD_LOCK, tmp_path)
    try:
        assert child.stdout.readline() == b"ready\n"
        with pytest.raises(SpoolError) as raised:
            Spool(tmp_path)
        message = str(raised.value)
        assert "process %d" % child.pid in message and str(tmp_path) in message
        assert isinstance(raised.value, ZerolineError)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Spool(tmp_path) as spool:
        assert spool.records == 0


def test_lock_is_free_after_the_holder_is_killed(tmp_path):
    child = run_child(HOLD_LOCK, tmp_path)
    try:
        assert child.stdout.readline() == b"ready\n"
        with pytest.raises(SpoolError):
            Spool(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with Spool(tmp_path) as spool:
        assert spool.next_unsent() is None


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first = Spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by process %d" % os.getpid()):
        Spool(tmp_path)
    first.close()
    first.close()  # twice is harmless
    with pytest.raises(SpoolError):
        first.append(b"a", 1, b"", b"", b"", 0)
    Spool(tmp_path).close()


# -- torn and corrupt records -------------------------------------------------------------------

def _three_records(path):
    with Spool(path) as spool:
        append_n(spool, b"a", 3, size=64)
        offsets = [e.offset for e in spool._unsent]
        size = spool.bytes_used
    (segment,) = seg_files(path)
    return os.path.join(path, segment), offsets, size


def test_torn_tail_is_truncated_counted_and_appends_continue(tmp_path):
    master = tmp_path / "master"
    segment, offsets, size = _three_records(master)
    last = offsets[2]
    cuts = sorted(set(range(last + 1, size, 7)) | {last + 1, last + 33, size - 1})
    for cut in cuts:
        work = tmp_path / ("cut%d" % cut)
        shutil.copytree(master, work)
        with open(os.path.join(work, os.path.basename(segment)), "r+b") as f:
            f.truncate(cut)
        with Spool(work) as spool:
            assert spool.corrupt_total == 1 and spool.corrupt_bytes_total == cut - last, cut
            assert spool.records == 2 and spool.bytes_used == last == disk_bytes(work)
            assert spool.next_seq(b"a") == 3
            append_n(spool, b"a", 1, size=64)
        with Spool(work) as spool:
            assert spool.corrupt_total == 0
            replay = drain(spool)
            assert [r.seq for r in replay] == [1, 2, 3]
            assert all(r.body == body_for(b"a", r.seq, 64) for r in replay)


def test_torn_tail_of_a_rotated_segment_is_skipped(tmp_path):
    # A power cut can tear a segment rotated since the last sync, not only the live one.
    with Spool(tmp_path, segment_bytes=400) as spool:
        append_n(spool, b"a", 6)
        first = [e for e in spool._unsent if e.segment == spool._unsent[0].segment]
    names = seg_files(tmp_path)
    assert len(names) >= 2 and len(first) >= 2
    with open(tmp_path / names[0], "r+b") as f:
        f.truncate(first[-1].offset + 20)
    with Spool(tmp_path, segment_bytes=400) as spool:
        assert spool.corrupt_total == 1 and spool.corrupt_bytes_total == 20
        assert spool.bytes_used == disk_bytes(tmp_path)
        append_n(spool, b"a", 1)
        torn = first[-1].seq
        assert [r.seq for r in drain(spool)] == [q for q in range(1, 8) if q != torn]


def test_corrupt_middle_record_is_skipped_and_counted(tmp_path):
    master = tmp_path / "master"
    segment, offsets, size = _three_records(master)
    middle, after = offsets[1], offsets[2]
    for at in range(middle, after, 5):
        work = tmp_path / ("flip%d" % at)
        shutil.copytree(master, work)
        path = os.path.join(work, os.path.basename(segment))
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x41]))
        with Spool(work) as spool:
            assert spool.corrupt_total == 1, at
            assert spool.corrupt_bytes_total == after - middle
            replay = drain(spool)
            assert [r.seq for r in replay] == [1, 3]
            assert all(r.body == body_for(b"a", r.seq, 64) for r in replay)


def test_record_damaged_after_open_is_skipped_by_next_unsent(tmp_path):
    with Spool(tmp_path) as spool:
        append_n(spool, b"a", 3, size=64)
        second = spool._unsent[1]
        (segment,) = seg_files(tmp_path)
        with open(tmp_path / segment, "r+b") as f:
            f.seek(second.offset + second.size - 1)
            f.write(b"\xff")
        assert [r.seq for r in drain(spool)] == [1, 3]
        assert spool.corrupt_total == 1


def test_garbage_segment_replays_nothing(tmp_path):
    with open(tmp_path / "0000000000000001.seg", "wb") as f:
        f.write(os.urandom(5000) + b"ZLS1" + os.urandom(100))
    with Spool(tmp_path) as spool:
        assert spool.records == 0 and spool.corrupt_total == 1
        assert spool.next_unsent() is None
        append_n(spool, b"a", 1)
    with Spool(tmp_path) as spool:
        assert [r.seq for r in drain(spool)] == [1]


KILLED_WRITER = """
import sys
from zeroline.transport.spool import Spool
spool = Spool(sys.argv[1], segment_bytes=1 << 20, sync_interval_s=0.05)
for seq in range(1, 5001):
    unit = b"a:%d;" % seq
    size = 1000 + (seq * 7919) % 60000
    spool.append(b"a", seq, b"t", b"s", (unit * (size // len(unit) + 1))[:size], seq)
    if seq == 200:
        print("going", flush=True)
print("done", flush=True)
"""


def test_kill_9_during_appends_leaves_only_intact_records_in_order(tmp_path):
    child = run_child(KILLED_WRITER, tmp_path)
    try:
        assert child.stdout.readline() == b"going\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with Spool(tmp_path, segment_bytes=1 << 20) as spool:
        replay = drain(spool)
        assert len(replay) >= 200
        assert [r.seq for r in replay] == list(range(1, len(replay) + 1))
        for record in replay:
            size = 1000 + (record.seq * 7919) % 60000
            assert record.body == body_for(b"a", record.seq, size)
            assert (record.tenant, record.service, record.lines) == (b"t", b"s", record.seq)
        assert spool.next_seq(b"a") == len(replay) + 1
        append_n(spool, b"a", 1)


# -- full spools and full disks -----------------------------------------------------------------

def test_spool_full_when_max_bytes_would_be_passed(tmp_path):
    with Spool(tmp_path, max_bytes=1000, segment_bytes=400) as spool:
        append_n(spool, b"a", 6)
        used = spool.bytes_used
        with pytest.raises(SpoolFull, match=str(tmp_path)):
            append_n(spool, b"a", 1)
        assert spool.bytes_used == used == disk_bytes(tmp_path)
        assert spool.records == 6 and spool.next_seq(b"a") == 7
        spool.release(b"a", 3)  # frees a segment
        append_n(spool, b"a", 1)
    with Spool(tmp_path, max_bytes=1000, segment_bytes=400) as spool:
        assert [r.seq for r in drain(spool)] == [4, 5, 6, 7]


@pytest.fixture
def small_tmpfs():
    """A 2 MiB tmpfs mounted in a temp dir; skipped when mounting is not permitted."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tempfile.mkdtemp(prefix="zlspool")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mountpoint],
                          capture_output=True)
    if done.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip("mount -t tmpfs not permitted: %s" % done.stderr.decode(errors="replace"))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], check=False)
        os.rmdir(mountpoint)


def test_full_disk_gives_spool_full_and_stays_consistent(small_tmpfs):
    path = os.path.join(small_tmpfs, "spool")
    with Spool(path, segment_bytes=256 << 10) as spool:
        appended = 0
        with pytest.raises(SpoolFull, match=small_tmpfs):
            for _ in range(1000):
                append_n(spool, b"a", 1, size=50000)
                appended += 1
        assert appended > 10
        assert spool.records == appended and spool.bytes_used == disk_bytes(path)
        # Fill what is left, so only the spool's reserve lets the release be recorded.
        filler = os.open(os.path.join(small_tmpfs, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError):
                for _ in range(1000):
                    os.write(filler, b"\0" * 4096)
        finally:
            os.close(filler)
        segments = spool.segments
        assert spool.release(b"a", 10) == 10
        assert spool.segments < segments and spool.bytes_used == disk_bytes(path)
        append_n(spool, b"a", 1, size=50000)
    with Spool(path, segment_bytes=256 << 10) as spool:
        assert spool.corrupt_total == 0
        replay = drain(spool)
        assert [r.seq for r in replay] == list(range(11, appended + 2))
        assert all(r.body == body_for(b"a", r.seq, 50000) for r in replay)


# -- against a model ----------------------------------------------------------------------------

STREAMS = [b"a", b"b", b"c"]
operations = st.lists(st.one_of(
    st.tuples(st.just("append"), st.sampled_from(STREAMS), st.integers(0, 300)),
    st.tuples(st.just("release"), st.sampled_from(STREAMS), st.integers(-2, 4)),
    st.tuples(st.just("next"), st.just(None), st.just(0)),
    st.tuples(st.just("reopen"), st.just(None), st.just(0)),
), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_random_operations_match_a_model(ops):
    path = tempfile.mkdtemp(prefix="zlspool")
    try:
        spool = Spool(path, segment_bytes=700, sync_interval_s=0)
        appended = []        # (stream, seq, body) in append order
        released = {}        # stream -> highest released seq
        highest = {}         # stream -> highest seq appended or released
        handed = set()
        try:
            for op, stream_id, n in ops:
                if op == "append":
                    seq = highest.get(stream_id, 0) + 1
                    assert spool.next_seq(stream_id) == seq
                    body = body_for(stream_id, seq, n)
                    spool.append(stream_id, seq, b"t", stream_id, body, n)
                    appended.append((stream_id, seq, body))
                    highest[stream_id] = seq
                elif op == "release":
                    seq = max(0, released.get(stream_id, 0) + n)
                    expect = sum(1 for s, q, _ in appended
                                 if s == stream_id and released.get(s, 0) < q <= seq)
                    assert spool.release(stream_id, seq) == expect
                    if seq > released.get(stream_id, 0):
                        released[stream_id] = seq
                        highest[stream_id] = max(highest.get(stream_id, 0), seq)
                elif op == "next":
                    live = [(s, q, b) for s, q, b in appended if q > released.get(s, 0)]
                    want = next(((s, q, b) for s, q, b in live if (s, q) not in handed), None)
                    got = spool.next_unsent()
                    if want is None:
                        assert got is None
                    else:
                        assert got == SpoolRecord(want[0], want[1], b"t", want[0], want[2],
                                                  len(want[2]))
                        handed.add((want[0], want[1]))
                else:
                    spool.close()
                    spool = Spool(path, segment_bytes=700, sync_interval_s=0)
                    handed = set()
                live = [(s, q) for s, q, _ in appended if q > released.get(s, 0)]
                assert spool.records == len(live)
                assert spool.unsent_count() == len([k for k in live if k not in handed])
                assert spool.bytes_used == disk_bytes(path)
                assert spool.segments == len(seg_files(path))
                assert spool.corrupt_total == 0
            for stream_id in STREAMS:
                assert spool.next_seq(stream_id) == highest.get(stream_id, 0) + 1
        finally:
            spool.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- durability off the caller's thread -----------------------------------------------------------

def test_completed_segments_are_synced_at_once_on_the_sync_thread(tmp_path, monkeypatch):
    from zeroline.transport import spool as spool_module

    synced = []

    def recording(real):
        def call(fd):
            synced.append(threading.current_thread().name)
            return real(fd)
        return call

    monkeypatch.setattr(spool_module.os, "fsync", recording(os.fsync))
    monkeypatch.setattr(spool_module.os, "fdatasync", recording(os.fdatasync))
    with Spool(tmp_path / "s", segment_bytes=4096, sync_interval_s=3600) as spool:
        del synced[:]                               # opening syncs what it compacts
        append_n(spool, b"a", 200, size=200)        # about 10 segments, the interval never ends
        spool._syncer.result(wait=True)
        assert len(seg_files(tmp_path / "s")) >= 8
        assert "zeroline-spool-sync" in synced      # completed segments, while appends went on
        assert "MainThread" not in synced
        syncer_thread = spool._syncer._thread
    assert not syncer_thread.is_alive()             # close() waited for it and stopped it


def test_a_failed_background_sync_is_raised_by_the_next_call(tmp_path, monkeypatch):
    from zeroline.transport import spool as spool_module

    spool = Spool(tmp_path / "s", segment_bytes=4096, sync_interval_s=3600)
    try:
        def failing(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(spool_module.os, "fsync", failing)
        with pytest.raises(SpoolError, match=r"cannot sync spool-dir .*: Input/output error"):
            for _ in range(100):
                append_n(spool, b"a", 1, size=500)
                if spool._syncer is not None:
                    while spool._syncer.busy:
                        threading.Event().wait(0.01)
    finally:
        monkeypatch.undo()
        spool.close()


# -- the spool behind a pub/push sink: memory first, disk for an outage ---------------------------

import zmq  # noqa: E402

from zeroline.config import ContainerInfo, validate_log_opts  # noqa: E402
from zeroline.transport import open_sink  # noqa: E402
from zeroline.transport import sink as sink_module  # noqa: E402


@pytest.fixture
def push_sink(tmp_path):
    """A push sink with a spool on ipc://, its endpoint, and a function to bind a PULL there."""
    endpoint = "ipc://%s/c.ipc" % tmp_path
    ctx = zmq.Context()
    opts = validate_log_opts({"zmq-address": endpoint, "zmq-socket": "push",
                              "spool-dir": str(tmp_path / "spool")})
    sink = open_sink(opts, context=ctx, report=lambda text: None)
    pulls = []

    def bind():
        pull = ctx.socket(zmq.PULL)
        pull.bind(endpoint)
        pulls.append(pull)
        return pull

    try:
        yield sink, bind
    finally:
        sink.close(0)
        for pull in pulls:
            pull.close(0)
        ctx.term()


def numbered(stream, first, last):
    stream.feed(b"".join(b"%d\n" % i for i in range(first, last + 1)))


def receive_numbers(pull, count, timeout_ms=5000):
    got = []
    while len(got) < count and pull.poll(timeout_ms):
        frames = pull.recv_multipart()
        got.append(int(frames[2].split(b": ", 1)[1]))
    return got


def spooled(sink):
    return sink.stats()["spool_records"]


def test_with_a_peer_lines_go_straight_to_libzmq_and_never_to_disk(push_sink):
    sink, bind = push_sink
    pull = bind()
    stream = sink.stream(ContainerInfo(container_id="c0ffee"), "stdout")
    assert sink.poll_peer(2000)
    numbered(stream, 1, 500)
    assert sink.offer(stream)
    assert stream.pending_messages == 0 and spooled(sink) == 0
    assert receive_numbers(pull, 500) == list(range(1, 501))
    assert sink.stats()["lines_sent_total"] == 0       # none of them left through the spool


def test_refused_lines_wait_in_memory_then_go_to_the_spool_when_the_refusal_lasts(
        push_sink, monkeypatch):
    sink, bind = push_sink
    stream = sink.stream(ContainerInfo(container_id="c0ffee"), "stdout")
    numbered(stream, 1, 300)
    assert sink.offer(stream)                   # no peer: taken, held in memory
    assert stream.pending_messages == 300 and spooled(sink) == 0
    assert not sink.idle()
    sink.tick()                                 # a moment later: still in memory
    assert stream.pending_messages == 300 and spooled(sink) == 0
    monkeypatch.setattr(sink_module, "MEMORY_TIER_S", 0.0)
    sink.tick()                                 # the refusal lasted: to disk, in order
    assert stream.pending_messages == 0 and spooled(sink) >= 1
    numbered(stream, 301, 400)
    assert sink.offer(stream)                   # the spool is not empty: behind it, on disk
    assert stream.pending_messages == 0
    pull = bind()
    got = []
    for _ in range(200):
        sink.tick()
        got += receive_numbers(pull, 400 - len(got), timeout_ms=50)
        if len(got) == 400:
            break
    assert got == list(range(1, 401))
    assert sink.idle() and spooled(sink) == 0


def test_memory_holds_a_bounded_amount_for_all_streams_together(push_sink, monkeypatch):
    sink, bind = push_sink
    monkeypatch.setattr(sink_module, "MEMORY_TIER_BYTES", 3000)
    a = sink.stream(ContainerInfo(container_id="aaaa"), "stdout")
    b = sink.stream(ContainerInfo(container_id="bbbb"), "stdout")
    a.feed(b"x" * 99 + b"\n" + b"y" * 99 + b"\n")      # 198 line bytes: room
    assert sink.offer(a) and a.pending_messages == 2 and spooled(sink) == 0
    b.feed((b"z" * 99 + b"\n") * 30)                    # 2970 more: over the budget with a's
    assert sink.offer(b)
    assert b.pending_messages == 0 and spooled(sink) == 1
    assert sink.offer(a) is True and a.pending_messages == 0   # a follows the spool: in order
    assert spooled(sink) == 2


def test_a_non_blocking_stream_goes_to_disk_before_its_buffer_would_drop(tmp_path):
    ctx = zmq.Context()
    opts = validate_log_opts({"zmq-address": "ipc://%s/none.ipc" % tmp_path,
                              "zmq-socket": "push", "mode": "non-blocking",
                              "max-buffer-size": "10000", "spool-dir": str(tmp_path / "s")})
    sink = open_sink(opts, context=ctx, report=lambda text: None)
    try:
        stream = sink.stream(ContainerInfo(container_id="c0ffee"), "stdout")
        for _ in range(20):                     # 20 x 1000 line bytes, twice the buffer
            stream.feed((b"q" * 99 + b"\n") * 10)
            assert sink.offer(stream)
        assert stream.dropped_total == 0
        assert stream.pending_bytes <= 5000 + 1000
        assert spooled(sink) >= 1
    finally:
        sink.close(0)
        ctx.term()


def test_settle_puts_what_memory_holds_into_the_spool(push_sink):
    sink, bind = push_sink
    stream = sink.stream(ContainerInfo(container_id="c0ffee"), "stdout")
    numbered(stream, 1, 50)
    assert sink.offer(stream) and stream.pending_messages == 50
    sink.settle()
    assert stream.pending_messages == 0 and spooled(sink) == 1
    assert sink.undelivered() == (1, 0)
