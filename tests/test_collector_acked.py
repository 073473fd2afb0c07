"""The collector's side of the acked transport (docs/acked-protocol.md): accept, duplicate, gap and
malformed rules driven by a hand-held DEALER, acks only after the lines are in the file, the
journal across restarts (torn tail, SIGKILL), long lines holding back the ack, --fsync modes,
SIGTERM, and write errors (a full tmpfs) that never stop the collector."""

import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import msgpack
import pytest
import zmq

from zeroline import collector as collector_mod
from zeroline.collector import Collector, load_journal

from conftest import finish, start_collect

TIMEOUT_S = 60
POLL_ROUNDS = TIMEOUT_S * 10     # 100 ms polls: a bound on every wait, never asserted as a duration


# ---------------------------------------------------------------------------------------------
# the wire, built by hand from the spec (not from the codec under test)

def record(line, cid="c1", partial=None, **fields):
    """One msgpack record, keys in the spec's order."""
    rec = {"container_id": cid, "container_name": "/web", "source": "stdout",
           "time_nano": 1_700_000_000_000_000_000, "line": line}
    if partial is not None:
        rec["partial"] = partial
    rec.update(fields)
    return msgpack.packb(rec, use_bin_type=True)


def chunk(line, ordinal, last, group="a"):
    return record(line, partial={"id": group * 64, "ordinal": ordinal, "last": last})


def body(*records):
    return b"".join(len(r).to_bytes(4, "big") + r for r in records)


def batch(stream, seq, *records, tenant=b"t", service=b"s", raw_body=None):
    return [b"zlb1", tenant, service, stream, seq.to_bytes(8, "big"),
            body(*records) if raw_body is None else raw_body]


def lines_batch(stream, seq, count=3, tenant=b"t", pad=0):
    """A batch of ``count`` numbered lines, and the text the collector writes for them."""
    lines = [b"%s-%d-%d%s" % (stream, seq, i, b"." * pad) for i in range(count)]
    return (batch(stream, seq, *[record(x) for x in lines], tenant=tenant),
            b"".join(b"c1 stdout: " + x + b"\n" for x in lines))


def decode_ack(frames):
    assert len(frames) == 3 and frames[0] == b"zla1", frames
    assert len(frames[2]) == 8
    return frames[1], int.from_bytes(frames[2], "big")


def wait_ack(dealer, stream, seq):
    """Receive acks until one for ``stream`` says at least ``seq``; return every ack seen."""
    seen = []
    for _ in range(POLL_ROUNDS):
        if dealer.poll(100):
            ack = decode_ack(dealer.recv_multipart())
            seen.append(ack)
            if ack[0] == stream and ack[1] >= seq:
                # Take whatever else arrived with it.
                while dealer.poll(0):
                    seen.append(decode_ack(dealer.recv_multipart()))
                return seen
    raise AssertionError("no ack %r >= %d; saw %r" % (stream, seq, seen))


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="zl")        # ipc:// paths must fit in sun_path
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Running:
    """A Collector with one acked endpoint, run in a thread of this process."""

    def __init__(self, directory, **options):
        self.out = os.path.join(directory, "out")
        self.endpoint = "ipc://%s/acked.ipc" % directory
        self.log = os.path.join(self.out, "t", "s.log")
        self.warnings = []
        self.col = Collector(out_dir=self.out, warn=self.warnings.append, **options)
        self.col.bind(self.endpoint, "acked")
        self.thread = threading.Thread(target=self.col.run, daemon=True)
        self.thread.start()

    def close(self):
        self.col.stop()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()
        self.col.close()


@pytest.fixture
def running(short_dir):
    made = []

    def start(**options):
        made.append(Running(short_dir, **options))
        return made[-1]

    yield start
    for item in made:
        if item.col.sockets:
            item.close()


def dealer_for(sockets, endpoint):
    dealer = sockets.make(zmq.DEALER)
    dealer.connect(endpoint)
    return dealer


# ---------------------------------------------------------------------------------------------
# the collector rules

def test_batches_in_order_are_written_and_a_resend_is_dropped_but_acked(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    first, text1 = lines_batch(b"s1", 1)
    second, text2 = lines_batch(b"s1", 2)
    dealer.send_multipart(first)
    wait_ack(dealer, b"s1", 1)
    dealer.send_multipart(second)
    wait_ack(dealer, b"s1", 2)
    dealer.send_multipart(first)                    # a resend: seq <= written
    assert wait_ack(dealer, b"s1", 2)[-1] == (b"s1", 2)
    run.close()
    assert read(run.log) == text1 + text2
    assert (run.col.acked_batches_total, run.col.acked_lines_total) == (2, 6)
    assert run.col.duplicate_batches_total == 1 and run.col.gap_batches_total == 0


def test_a_gap_is_not_written_and_the_ack_says_where_the_stream_stands(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    batches = [lines_batch(b"g", seq) for seq in (1, 2, 3)]
    dealer.send_multipart(batches[0][0])
    wait_ack(dealer, b"g", 1)
    dealer.send_multipart(batches[2][0])            # 2 was lost on the way
    dealer.send_multipart(lines_batch(b"probe", 1)[0])
    acks = wait_ack(dealer, b"probe", 1)
    assert (b"g", 1) in acks and not any(a[0] == b"g" and a[1] > 1 for a in acks)
    assert run.col.gap_batches_total == 1
    dealer.send_multipart(batches[1][0])            # the resend, in order
    dealer.send_multipart(batches[2][0])
    wait_ack(dealer, b"g", 3)
    run.close()
    assert read(run.log) == batches[0][1] + lines_batch(b"probe", 1)[1] + batches[1][1] \
        + batches[2][1]


def test_an_unknown_stream_is_taken_at_any_seq(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    first, text = lines_batch(b"late", 7)
    dealer.send_multipart(first)
    assert wait_ack(dealer, b"late", 7)[-1] == (b"late", 7)
    dealer.send_multipart(lines_batch(b"late", 9)[0])      # known now: 9 is a gap
    dealer.send_multipart(lines_batch(b"late", 6)[0])      # and 6 a duplicate
    second, text8 = lines_batch(b"late", 8)
    dealer.send_multipart(second)
    wait_ack(dealer, b"late", 8)
    run.close()
    assert read(run.log) == text + text8
    assert run.col.gap_batches_total == 1 and run.col.duplicate_batches_total == 1


def test_each_ack_comes_after_its_lines_are_in_the_file(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    expected = {}
    text = b""
    for seq in range(1, 201):
        frames, lines = lines_batch(b"w", seq, count=5)
        text += lines
        expected[seq] = text
        dealer.send_multipart(frames)
    highest = 0
    for _ in range(POLL_ROUNDS):
        if highest == 200:
            break
        if dealer.poll(100):
            stream, seq = decode_ack(dealer.recv_multipart())
            on_disk = read(run.log)             # read right after the ack arrived
            assert stream == b"w" and seq >= highest
            assert on_disk.startswith(expected[seq]), seq
            highest = seq
    assert highest == 200
    run.close()
    assert read(run.log) == expected[200]


def test_malformed_messages_are_counted_by_reason_and_never_acked(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    good = record(b"ok")
    bad = [
        [b"zlb1", b"t", b"s", b"m1", (1).to_bytes(8, "big")],              # 5 frames
        [b"zlb2", b"t", b"s", b"m2", (1).to_bytes(8, "big"), body(good)],  # unknown kind
        batch(b"", 1, good),                                             # empty stream id
        batch(b"x" * 256, 1, good),                                      # stream id too long
        [b"zlb1", b"t", b"s", b"m3", b"\x01" * 7, body(good)],            # seq of 7 bytes
        batch(b"m4", 0, good),                                           # seq 0
        batch(b"m5", 1, raw_body=body(good)[:-1]),                       # lengths do not add up
        batch(b"m6", 1, raw_body=body(good) + b"\x00"),                  # trailing bytes
        batch(b"m7", 1, raw_body=b""),                                   # empty body
        [b"zla1", b"m8", (1).to_bytes(8, "big")],                        # an ack, wrong way
        batch(b"m9", 1, good, good[:-3]),                                # a truncated record
    ]
    for frames in bad:
        dealer.send_multipart(frames)
    dealer.send_multipart(batch(b"fine", 1, good))
    acks = wait_ack(dealer, b"fine", 1)
    assert acks == [(b"fine", 1)]
    run.close()
    reasons = run.col.malformed_reasons
    assert reasons["batch"] == 9 and reasons["ack"] == 1 and reasons["msgpack"] == 1, reasons
    assert read(run.log) == b"c1 stdout: ok\n"
    assert run.col.written(b"m9") is None and run.col.acked_batches_total == 1
    assert b"9 malformed" not in run.col.stats_line().encode()
    assert "batch 9" in run.col.stats_line() and "ack 1" in run.col.stats_line()


def test_a_long_line_across_batches_holds_the_ack_until_it_is_joined(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(batch(b"p", 1, record(b"before"), chunk(b"AAAA", 1, False)))
    assert wait_ack(dealer, b"p", 0)[-1] == (b"p", 0)          # nothing of it counts yet
    assert read(run.log) == b"c1 stdout: before\n"             # though the whole line is written
    dealer.send_multipart(batch(b"p", 2, chunk(b"BBBB", 2, False)))
    assert wait_ack(dealer, b"p", 0)[-1] == (b"p", 0)
    dealer.send_multipart(batch(b"p", 2, chunk(b"BBBB", 2, False)))    # resent: a duplicate
    assert wait_ack(dealer, b"p", 0)[-1] == (b"p", 0)
    assert run.col.duplicate_batches_total == 1
    dealer.send_multipart(batch(b"p", 3, chunk(b"CC", 3, True), record(b"after")))
    assert wait_ack(dealer, b"p", 3)[-1] == (b"p", 3)
    run.close()
    assert read(run.log) == b"c1 stdout: before\nc1 stdout: AAAABBBBCC\nc1 stdout: after\n"
    assert load_journal(run.col.journal_path)[0] == {b"p": 3}


def test_json_output_of_acked_batches_carries_every_field(short_dir, sockets):
    import json

    out = os.path.join(short_dir, "out")
    col = Collector(out_dir=out, fmt="json")
    endpoint = "ipc://%s/j.ipc" % short_dir
    col.bind(endpoint, "acked")
    thread = threading.Thread(target=col.run, daemon=True)
    thread.start()
    try:
        dealer = dealer_for(sockets, endpoint)
        dealer.send_multipart(batch(b"j", 1, record(b"caf\xc3\xa9", attrs={"k": "v"}),
                                    chunk(b"\xff", 1, True)))
        wait_ack(dealer, b"j", 1)
    finally:
        col.stop()
        thread.join(TIMEOUT_S)
        col.close()
    first, second = [json.loads(x) for x in read(os.path.join(out, "t", "s.log")).splitlines()]
    assert first == {"tenant": "t", "service": "s", "framing": "msgpack", "container_id": "c1",
                     "container_name": "/web", "source": "stdout",
                     "time_nano": 1_700_000_000_000_000_000, "attrs": {"k": "v"},
                     "line": "café"}
    assert second["line_base64"] == "/w==" and second["partial"]["last"] is True


def test_a_line_that_never_ends_is_written_as_chunks_and_then_acked(running, sockets,
                                                                    monkeypatch):
    monkeypatch.setattr(collector_mod, "REASSEMBLY_WAIT_S", 0.0)
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(batch(b"e", 1, record(b"x"), chunk(b"AAAA", 1, False, group="b")))
    wait_ack(dealer, b"e", 1)
    run.close()
    assert read(run.log) == b"c1 stdout: x\nc1 stdout: AAAA\n"
    assert run.col.partial_expired_total == 1


def test_other_streams_are_acked_while_one_holds_a_long_line(running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(batch(b"held", 1, chunk(b"AAAA", 1, False, group="c")))
    frames, text = lines_batch(b"free", 1)
    dealer.send_multipart(frames)
    acks = wait_ack(dealer, b"free", 1)
    assert (b"held", 1) not in acks
    run.close()      # at close the open line is written as it is; then the stream counts as written
    assert load_journal(run.col.journal_path)[0] == {b"held": 1, b"free": 1}
    assert read(run.log) == text + b"c1 stdout: AAAA\n"


@pytest.mark.parametrize("mode", ["batch", "interval", "never"])
def test_every_fsync_mode_writes_and_acks(running, sockets, mode, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(collector_mod.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    run = running(fsync=mode)
    dealer = dealer_for(sockets, run.endpoint)
    text = b""
    for seq in range(1, 11):
        frames, lines = lines_batch(b"f", seq)
        text += lines
        dealer.send_multipart(frames)
    wait_ack(dealer, b"f", 10)
    if mode == "batch":
        assert synced                           # before the ack came
    run.close()
    assert read(run.log) == text
    assert load_journal(run.col.journal_path)[0] == {b"f": 10}
    if mode == "never":
        assert not synced


# ---------------------------------------------------------------------------------------------
# the journal

def test_the_journal_survives_a_restart_and_resends_stay_dropped(short_dir, running, sockets):
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    sent = [lines_batch(b"r", seq) for seq in range(1, 4)]
    for frames, _ in sent:
        dealer.send_multipart(frames)
    wait_ack(dealer, b"r", 3)
    run.close()
    run = running()                                   # same OUT: the journal is read again
    assert run.col.written(b"r") == 3
    dealer = dealer_for(sockets, run.endpoint)
    more = [lines_batch(b"r", seq) for seq in range(4, 6)]
    for frames, _ in sent + more:                     # a forwarder resending everything
        dealer.send_multipart(frames)
    wait_ack(dealer, b"r", 5)
    run.close()
    assert read(run.log) == b"".join(text for _, text in sent + more)
    assert run.col.duplicate_batches_total == 3


def test_acked_stream_state_is_bounded_and_the_least_recently_active_is_forgotten(running,
                                                                                   sockets):
    # A peer inventing stream ids cannot grow the collector's table: past max_acked_streams the
    # least recently active settled stream goes; an active one stays and keeps its de-dup.
    run = running(max_acked_streams=3)
    dealer = dealer_for(sockets, run.endpoint)
    for name in (b"old", b"busy", b"x1"):
        dealer.send_multipart(lines_batch(name, 1)[0])
        wait_ack(dealer, name, 1)
    dealer.send_multipart(lines_batch(b"busy", 2)[0])      # busy is now more recent than x1
    wait_ack(dealer, b"busy", 2)
    for name in (b"x2", b"x3"):
        dealer.send_multipart(lines_batch(name, 1)[0])
        wait_ack(dealer, name, 1)
        assert len(run.col._streams) <= 3
    assert run.col.written(b"old") is None and run.col.written(b"x1") is None
    assert run.col.written(b"busy") == 2
    assert run.col.acked_streams_forgotten_total == 2
    dealer.send_multipart(lines_batch(b"busy", 2)[0])      # still a duplicate: not written
    wait_ack(dealer, b"busy", 2)
    assert run.col.duplicate_batches_total == 1
    from zeroline.metrics import CollectorMetrics, summary_line

    line = summary_line(CollectorMetrics(run.col))
    assert "acked_streams=3 " in line and "acked_streams_forgotten_total=2" in line


def entry(stream_id, written):
    text = b"%s %d" % (stream_id.hex().encode(), written)
    return b"%s %08x\n" % (text, zlib.crc32(text))


def test_a_torn_or_garbled_journal_entry_is_ignored(short_dir, running, sockets):
    state = os.path.join(short_dir, "out", ".zeroline")
    os.makedirs(state)
    good = entry(b"A", 5)
    garbled = entry(b"B", 9).replace(b" 9 ", b" 8 ")       # the checksum no longer matches
    with open(os.path.join(state, "acked-streams"), "wb") as f:
        f.write(b"zeroline acked-streams 1\n" + good + garbled + entry(b"A", 4)
                + entry(b"C", 2)[:-5])                    # torn: a crash mid-append
    assert load_journal(os.path.join(state, "acked-streams")) == ({b"A": 5}, 2)
    run = running()
    assert run.col.written(b"A") == 5 and run.col.written(b"B") is None
    assert run.col.written(b"C") is None
    # Compacted at start: one clean entry per stream.
    assert read(run.col.journal_path) == b"zeroline acked-streams 1\n" + good
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(lines_batch(b"A", 5)[0])          # written before the restart
    dealer.send_multipart(lines_batch(b"B", 1)[0])          # unknown: taken
    dealer.send_multipart(lines_batch(b"A", 6)[0])
    wait_ack(dealer, b"A", 6)
    run.close()
    assert read(run.log) == lines_batch(b"B", 1)[1] + lines_batch(b"A", 6)[1]


def test_the_journal_is_compacted_once_it_grows(short_dir, running, sockets, monkeypatch):
    monkeypatch.setattr(collector_mod, "JOURNAL_COMPACT_BYTES", 300)
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    for seq in range(1, 41):
        dealer.send_multipart(lines_batch(b"k", seq, count=1)[0])
        wait_ack(dealer, b"k", seq)                  # one round, one entry each
    run.close()
    assert os.path.getsize(run.col.journal_path) < 400
    assert load_journal(run.col.journal_path)[0] == {b"k": 40}


def test_a_second_collector_on_the_same_out_is_refused(short_dir, running):
    run = running()
    other = Collector(out_dir=run.out)
    try:
        with pytest.raises(collector_mod.ConfigError, match="another collector"):
            other.bind("ipc://%s/other.ipc" % short_dir, "acked")
    finally:
        other.close()


def test_acked_needs_an_output_directory(sockets):
    import io

    col = Collector(out=io.BytesIO())
    try:
        with pytest.raises(collector_mod.ConfigError, match="--bind-acked needs --out"):
            col.bind("inproc://never", "acked")
    finally:
        col.close()


# ---------------------------------------------------------------------------------------------
# write errors

def test_a_failing_write_is_held_retried_and_continued_where_it_stopped(running, sockets,
                                                                        monkeypatch):
    monkeypatch.setattr(collector_mod, "WRITE_RETRY_S", 0.01)
    real_write = os.write
    failures = {"left": 6}

    def flaky_write(fd, data):
        # Half a buffer goes in, then ENOSPC, six times: a disk filling up and freed again.
        if failures["left"] > 0 and len(data) > 1:
            failures["left"] -= 1
            if failures["left"] % 2:
                return real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(lines_batch(b"d", 1)[0])
    wait_ack(dealer, b"d", 1)
    monkeypatch.setattr(collector_mod.os, "write", flaky_write)
    text = lines_batch(b"d", 1)[1]
    expected = {1: text}
    for seq in range(2, 8):
        frames, lines = lines_batch(b"d", seq, count=20)
        text += lines
        expected[seq] = text
        dealer.send_multipart(frames)
    highest = 1
    for _ in range(POLL_ROUNDS):
        if highest == 7:
            break
        if dealer.poll(100):
            _, seq = decode_ack(dealer.recv_multipart())
            assert read(run.log).startswith(expected[seq]), seq    # never acked before written
            highest = max(highest, seq)
    assert highest == 7
    run.close()
    assert read(run.log) == text                  # every line once, none torn
    assert any("cannot write %s: No space left on device" % run.log in w for w in run.warnings) \
        or any("cannot write %s" % run.col.journal_path in w for w in run.warnings), run.warnings
    assert run.col.write_errors_total >= 1


# ---------------------------------------------------------------------------------------------
# zeroline collect, as a user runs it

ACKED_PULL = (("--bind-acked", "acked"), ("--bind", "pull"))     # start_collect's endpoints here


@pytest.mark.parametrize("args, says", [
    (["--stdout"], "--bind-acked needs --out DIR"),
    (["--out", "o", "--fsync", "sometimes"], "invalid choice"),
])
def test_collect_acked_usage_errors(short_dir, args, says):
    proc = subprocess.run([sys.executable, "-m", "zeroline", "collect", "--bind-acked",
                           "ipc://%s/x.ipc" % short_dir, *args], capture_output=True,
                          timeout=TIMEOUT_S, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and says in err, err


def test_collect_sigterm_writes_what_it_received_and_exits_0(short_dir, sockets):
    out = os.path.join(short_dir, "out")
    proc, acked, pull = start_collect(short_dir, ACKED_PULL, "--out", out, "--stats", "--fsync", "batch")
    try:
        dealer = dealer_for(sockets, acked)
        sent = [lines_batch(b"z", seq, count=50) for seq in range(1, 101)]
        for frames, _ in sent:
            dealer.send_multipart(frames)
        wait_ack(dealer, b"z", 1)
        # Push lines too: whatever libzmq holds at SIGTERM is still written.
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(pull)
        for i in range(50000):
            push.send_multipart([b"t", b"p", b"c: %d" % i])
        push.close(linger=-1)
        ctx.term()                              # everything handed to the connection
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
        acks = []
        while dealer.poll(100):
            acks.append(decode_ack(dealer.recv_multipart()))
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    written = load_journal(os.path.join(out, ".zeroline", "acked-streams"))[0][b"z"]
    assert written >= 1
    assert read(os.path.join(out, "t", "s.log")) == b"".join(t for _, t in sent[:written])
    assert not acks or max(a[1] for a in acks) <= written
    pushed = read(os.path.join(out, "t", "p.log")).splitlines()
    assert pushed == [b"c: %d" % i for i in range(len(pushed))]     # in order, none twice
    assert b"acked_batches_total=%d " % written in err, err


def test_collect_sigkill_and_restart_loses_nothing_acked_and_writes_nothing_twice(short_dir,
                                                                                sockets):
    out = os.path.join(short_dir, "out")
    sent = [lines_batch(b"k", seq, count=20) for seq in range(1, 61)]
    proc, acked, _ = start_collect(short_dir, ACKED_PULL, "--out", out, "--fsync", "interval")
    try:
        dealer = dealer_for(sockets, acked)
        for frames, _ in sent[:30]:
            dealer.send_multipart(frames)
        wait_ack(dealer, b"k", 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT_S)
    finally:
        proc.kill()
    proc, acked, _ = start_collect(short_dir, ACKED_PULL, "--out", out)
    try:
        dealer = dealer_for(sockets, acked)
        for frames, _ in sent:                  # the forwarder resends from its oldest unacked
            dealer.send_multipart(frames)
        wait_ack(dealer, b"k", 60)
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert read(os.path.join(out, "t", "s.log")) == b"".join(t for _, t in sent)


@pytest.fixture
def small_tmpfs(short_dir):
    mount_point = os.path.join(short_dir, "out")
    os.makedirs(mount_point)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount_point],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % done.stderr.decode().strip())
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)


def test_collect_on_a_full_disk_reports_the_path_holds_and_resumes(short_dir, small_tmpfs,
                                                                   sockets):
    out = small_tmpfs
    proc, acked, _ = start_collect(short_dir, ACKED_PULL, "--out", out, "--fsync", "batch")
    log = os.path.join(out, "t", "s.log")
    stderr = b""
    try:
        dealer = dealer_for(sockets, acked)
        sent = [lines_batch(b"full", seq, count=1000, pad=80) for seq in range(1, 61)]  # 6 MB
        for frames, _ in sent:
            dealer.send_multipart(frames)
        for _ in range(POLL_ROUNDS):
            ready, _, _ = select.select([proc.stderr], [], [], 0.1)
            if ready:
                stderr += os.read(proc.stderr.fileno(), 65536)
            if b"No space left on device" in stderr:
                break
        assert b"cannot write %s: No space left on device" % log.encode() in stderr, stderr
        assert proc.poll() is None                              # still up
        subprocess.run(["mount", "-o", "remount,size=16m", out], check=True)
        wait_ack(dealer, b"full", 60)
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr + err
    assert read(log) == b"".join(t for _, t in sent)            # every line once, in order
    assert b"writing again" in stderr + err


def test_at_close_a_write_that_keeps_failing_is_given_up_and_counted(running, sockets,
                                                                     monkeypatch):
    monkeypatch.setattr(collector_mod, "WRITE_RETRY_S", 0.01)
    monkeypatch.setattr(collector_mod, "STOP_WRITE_WAIT_S", 0.05)
    run = running()
    dealer = dealer_for(sockets, run.endpoint)
    dealer.send_multipart(lines_batch(b"x", 1)[0])
    wait_ack(dealer, b"x", 1)

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(collector_mod.os, "write", no_space)
    frames, lines = lines_batch(b"x", 2)
    dealer.send_multipart(frames)
    for _ in range(POLL_ROUNDS):
        if run.col.write_errors_total:
            break
        time.sleep(0.1)
    run.close()
    while dealer.poll(0):
        assert decode_ack(dealer.recv_multipart()) == (b"x", 1)    # batch 2 is never acknowledged
    assert run.col.unwritten_bytes == len(lines)
    assert run.col.written(b"x") == 1               # the journal never claimed batch 2
    assert any("could not be written" in w for w in run.warnings), run.warnings


def test_out_of_descriptors_in_a_background_sync_names_the_directory_and_retries(short_dir,
                                                                                 monkeypatch):
    # --fsync interval: a directory sync that cannot get a descriptor is reported with its path
    # and stays due (it raised NameError before: the report named a variable out of scope).
    warnings = []
    col = Collector(out_dir=os.path.join(short_dir, "out"), fsync="interval",
                    warn=warnings.append)
    try:
        directory = os.path.join(short_dir, "out", "t")
        os.makedirs(directory)
        col._unsynced_dirs.add(directory)
        real_open = os.open

        def no_descriptors(path, flags, *args):
            if flags & os.O_DIRECTORY:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real_open(path, flags, *args)

        monkeypatch.setattr(collector_mod.os, "open", no_descriptors)
        col._sync_background()
        monkeypatch.setattr(collector_mod.os, "open", real_open)
        assert warnings and directory in warnings[0] and "Too many open files" in warnings[0]
        assert directory in col._unsynced_dirs
        assert col.write_error is not None
    finally:
        col.close()
