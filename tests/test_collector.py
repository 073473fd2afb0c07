"""The collector: the batched text render path on both implementations, log files (rotation, safe
names, bounded handles), reassembly, and `zeroline collect` as a user runs it over ipc://."""

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroline import _core_py, collector as collector_mod
from zeroline.collector import Collector, LogFile, safe_path_part

from conftest import available_implementations, finish, start_collect

TIMEOUT_S = 60
ROUNDS = 300            # receive rounds of at most 100 ms: a bound, never asserted as a duration


# ---------------------------------------------------------------------------------------------
# helpers

def record(**fields):
    """A msgpack record as zeroline frames it (key order of the framing), fields overridable."""
    base = {"container_id": "c1", "container_name": "/web", "source": "stdout",
            "time_nano": 1_700_000_000_000_000_000, "line": b"hello"}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


def raw_str(data):
    """A msgpack str header over arbitrary bytes (valid UTF-8 or not)."""
    n = len(data)
    if n < 32:
        return bytes([0xa0 | n]) + data
    if n < 256:
        return b"\xd9" + bytes([n]) + data
    return b"\xda" + n.to_bytes(2, "big") + data


def raw_record(cid, source=b"stdout", attrs=None):
    """A record with only zeroline's keys and types, its str values given as raw bytes."""
    body = (raw_str(b"container_id") + raw_str(cid) + raw_str(b"container_name") + raw_str(b"n")
            + raw_str(b"source") + raw_str(source) + raw_str(b"time_nano") + b"\xcd\x01\x00"
            + raw_str(b"line") + b"\xc4\x01L")
    if attrs is not None:
        body += raw_str(b"attrs") + attrs
    return bytes([0x85 + (attrs is not None)]) + body


def chunks(text, **config):
    """Real partial chunks (msgpack framing) from a Stream with a tiny line buffer."""
    options = dict(framing="msgpack", tenant="t", service="s", container_id="c1",
                   max_line_bytes=8, id_seed=7)
    options.update(config)
    stream = _core_py.Stream("stdout", **options)
    stream.feed(text, 1000)
    return [frames[2] for frames in stream.take()]


def receive(receiver, sockets, endpoint, messages):
    """Send ``messages`` (lists of frames) over PUSH/PULL and receive them all into ``receiver``."""
    pull = sockets.make(zmq.PULL, RCVHWM=0)
    pull.bind(endpoint)
    push = sockets.make(zmq.PUSH, SNDHWM=0)
    push.connect(endpoint)
    for frames in messages:
        push.send_multipart(frames)
    for _ in range(ROUNDS):
        if receiver.messages_total + receiver.malformed_total >= len(messages):
            break
        receiver.recv(pull, 100000, 100)
    assert receiver.messages_total + receiver.malformed_total == len(messages)
    return receiver


def rendered(impl, sockets, endpoint, messages, **config):
    receiver = receive(impl.Receiver(**config), sockets, endpoint, messages)
    return receiver.take_rendered(), receiver


# ---------------------------------------------------------------------------------------------
# take_rendered: the same bytes from the compiled core and the twin

def test_seed_and_msgpack_records_render_as_text_lines(impl, sockets, ipc_endpoint):
    messages = [
        [b"acme", b"web", b"0123456789ab: seed line"],
        [b"acme", b"web", record()],
        [b"acme", b"web", record(source="stderr", line=b"with attrs", attrs={"tag": "v1"})],
        [b"acme", b"web", record(container_id="c2", line=b"", container_name="")],
        [b"acme", b"web", b"x: \xff\x00 raw bytes pass"],
    ]
    out, receiver = rendered(impl, sockets, ipc_endpoint, messages)
    assert out == [(b"acme", b"web",
                    b"0123456789ab: seed line\n"
                    b"c1 stdout: hello\n"
                    b"c1 stderr: with attrs\n"
                    b"c2 stdout: \n"
                    b"x: \xff\x00 raw bytes pass\n", None)]
    assert receiver.malformed_total == 0
    assert receiver.pending_messages == 0 and receiver.take_rendered() == []


def test_runs_are_per_destination_in_arrival_order(impl, sockets, ipc_endpoint):
    messages = [[b"a", b"x", b"c: 1"], [b"b", b"x", b"c: 2"], [b"a", b"x", record(line=b"3")],
                [b"a", b"y", b"c: 4"], [b"b", b"x", b"c: 5"], [b"a", b"x", b"c: 6"]]
    out, _ = rendered(impl, sockets, ipc_endpoint, messages)
    assert out == [(b"a", b"x", b"c: 1\nc1 stdout: 3\nc: 6\n", None),
                   (b"b", b"x", b"c: 2\nc: 5\n", None),
                   (b"a", b"y", b"c: 4\n", None)]


def test_partial_chunks_are_handed_back_and_end_their_run(impl, sockets, ipc_endpoint):
    parts = chunks(b"0123456789abcdefXY\n")         # 8 + 8 + 2 bytes: three chunks
    assert len(parts) == 3
    messages = ([[b"t", b"s", b"c: before"], [b"t", b"s", parts[0]], [b"u", b"s", b"c: other"],
                 [b"t", b"s", parts[1]], [b"t", b"s", parts[2]], [b"t", b"s", b"c: after"]])
    out, receiver = rendered(impl, sockets, ipc_endpoint, messages)
    assert out == [(b"t", b"s", b"c: before\n", parts[0]),
                   (b"u", b"s", b"c: other\n", None),
                   (b"t", b"s", b"", parts[1]),
                   (b"t", b"s", b"", parts[2]),
                   (b"t", b"s", b"c: after\n", None)]
    assert receiver.malformed_total == 0


def test_malformed_messages_are_counted_by_reason_and_skipped(impl, sockets, ipc_endpoint):
    good = [b"t", b"s", b"c: ok"]
    messages = [
        [b"t", b"s"],                                            # frames: 2
        [b"t", b"s", b"c: x", b"extra"],                          # frames: 4
        [b"t", b"s", b"c: " + b"y" * 200],                       # frame_size: over 128
        [b"t", b"s", record()[:-2]],                             # msgpack: truncated
        [b"t", b"s", record() + b"\x00"],                        # msgpack: trailing bytes
        [b"t", b"s", b"\x85" + record(attrs={"a": "b"})[1:]],  # msgpack: 6 pairs, says 5
        [b"t", b"s", msgpack.packb([1, 2, 3])],                  # seed: not a map, no "<id>: "
        [b"t", b"s", b"no separator at all"],                    # seed
        [b"t", b"s", b"\x85" + raw_str(b"container_id") + b"\xa1x" * 4 + b"\xa1y" * 5],  # record
        [b"t", b"s", record(line="text, not bin")],              # record: line is str
        [b"t", b"s", record(partial={"id": 5})],                 # record: bad partial
        [b"t", b"s", record(container_id="ñ")],                 # fine: any UTF-8 text
        good,
    ]
    out, receiver = rendered(impl, sockets, ipc_endpoint, messages, max_frame_bytes=128)
    assert out == [(b"t", b"s", "ñ stdout: hello\nc: ok\n".encode("utf-8"), None)]
    assert receiver.malformed_reasons == {"frames": 2, "frame_size": 1, "seed": 2, "msgpack": 3,
                                          "record": 3}
    assert receiver.malformed_total == 11
    assert receiver.messages_total == 10        # payload-level ones were received whole


def test_records_the_core_does_not_parse_render_like_the_twin(impl, sockets, ipc_endpoint):
    # Everything here leaves the compiled fast path; the twin's render_text is the specification.
    payloads = [
        record(container_id="é" * 40, source="stdout"),                 # str8, non-ASCII
        record(container_name="n" * 300),                                # str16
        record(attrs={"k%d" % i: "v" * i for i in range(20)}),           # map16 attrs
        record(attrs={"ключ": "значение"}),                              # UTF-8 attrs
        record(time_nano=2 ** 64 - 1),                                   # uint64
        record(time_nano=-5),                                            # negative fixint
        record(time_nano=1.5),                                           # a float: twin renders
        record(source=None),                                             # nil source
        record(container_name=b"bin name"),                              # bin where str is usual
        record(extra="unknown key"),                                     # a key we do not know
        b"\x85" + raw_str(b"container_id") + raw_str(b"c9") + raw_str(b"line") + b"\xc4\x01L"
        + raw_str(b"source") + raw_str(b"a") + raw_str(b"source") + raw_str(b"b")
        + raw_str(b"time_nano") + b"\x01",                               # duplicate key
        raw_record(b"c\xc3"),                                             # cut UTF-8
        raw_record(b"c", source=b"\xed\xa0\x80"),                         # a surrogate
        raw_record(b"c", source=b"\xf4\x90\x80\x80"),                     # past U+10FFFF
        raw_record(b"c", source=b"\xe0\x80\xaf"),                         # overlong
        raw_record(b"c", attrs=b"\x81\xa1k\xa2\xc3("),                    # attrs value
        raw_record(b"\xf0\x9f\x98\x80", source=b"\xed\x9f\xbf"),            # valid: fast path
        b"\x85" + raw_str(b"container_id") + raw_str(b"c") + raw_str(b"line") + b"\xc4\x00"
        + raw_str(b"source") + raw_str(b"a") + raw_str(b"x") + b"\x01" + raw_str(b"y") + b"\x02",
        record(line=b"x" * 70000),                                       # bin32
    ]
    expected = b""
    for payload in payloads:
        try:
            expected += _core_py.render_text(payload)
        except _core_py.ProtocolError:
            pass
    out, receiver = rendered(impl, sockets, ipc_endpoint, [[b"t", b"s", p] for p in payloads])
    assert out == [(b"t", b"s", expected, None)]
    assert b"c9 b: L\n" in expected and b"c1 None: hello\n" in expected
    assert "\U0001f600 \ud7ff: L\n".encode() in expected
    assert receiver.malformed_reasons["msgpack"] == 5 and receiver.malformed_total == 5


def test_render_text_spec_examples():
    assert _core_py.render_text(b"abc: x") == b"abc: x\n"
    assert _core_py.render_text(record(source="stderr", line=b"l")) == b"c1 stderr: l\n"
    assert _core_py.render_text(chunks(b"0123456789\n")[0]) is None
    with pytest.raises(_core_py.ProtocolError) as caught:
        _core_py.render_text(b"abc")
    assert caught.value.reason == "seed"


# Payload material for the differential test: zeroline-looking records with mutations.
_STR_BYTES = st.one_of(st.text(max_size=40).map(lambda t: t.encode("utf-8")),
                       st.binary(max_size=40))
_FIELD = st.sampled_from(["container_id", "container_name", "source", "time_nano", "line",
                          "attrs", "partial", "other"])
_VALUE = st.one_of(
    _STR_BYTES.map(raw_str),
    st.binary(max_size=300).map(lambda b: msgpack.packb(b, use_bin_type=True)),
    st.integers(-2 ** 63, 2 ** 64 - 1).map(msgpack.packb),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=20).map(msgpack.packb),
    st.sampled_from([msgpack.packb(None), msgpack.packb(True), msgpack.packb(1.25),
                     msgpack.packb([1, "a"]),
                     msgpack.packb({"id": "i" * 64, "ordinal": 1, "last": True})]),
)


@st.composite
def payloads(draw):
    kind = draw(st.sampled_from(["record", "record", "raw", "mutant", "seed"]))
    if kind == "raw":
        attrs = draw(st.one_of(st.none(), st.lists(st.tuples(_STR_BYTES, _STR_BYTES), max_size=3)))
        if attrs is not None:
            attrs = bytes([0x80 | len(attrs)]) + b"".join(raw_str(k) + raw_str(v) for k, v in attrs)
        return raw_record(draw(_STR_BYTES), draw(_STR_BYTES), attrs)
    if kind == "seed":
        return draw(st.binary(max_size=60)) + draw(st.sampled_from([b"", b": ", b":"])) \
            + draw(st.binary(max_size=20))
    if kind == "record":
        line = draw(st.binary(max_size=300))
        cid = draw(st.text(max_size=70))
        return record(container_id=cid, line=line, source=draw(st.sampled_from(["stdout", "é"])))
    pairs = [(b"container_id", draw(_VALUE))]
    pairs += draw(st.lists(st.tuples(_FIELD.map(str.encode), _VALUE), min_size=4, max_size=6))
    body = b"".join(raw_str(k) + v for k, v in pairs)
    payload = bytes([0x80 | len(pairs)]) + body
    cut = draw(st.integers(0, 3))
    if cut == 1:
        payload = payload[:draw(st.integers(14, len(payload)))]
    elif cut == 2:
        payload += draw(st.binary(min_size=1, max_size=3))
    return payload


needs_both = pytest.mark.skipif(len(available_implementations()) < 2,
                                reason="needs the compiled core and the twin")


_ENDPOINTS = itertools.count()


@needs_both
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(st.sampled_from([b"a", b"b", b""]), payloads()), max_size=12))
def test_both_implementations_render_the_same_bytes(batch, sockets):
    impls = available_implementations()
    messages = [[tenant, b"s", payload] for tenant, payload in batch]
    results = []
    for name in ("cython", "python"):
        endpoint = "inproc://render-%d" % next(_ENDPOINTS)
        receiver = impls[name].Receiver()
        pull = sockets.context.socket(zmq.PULL)
        push = sockets.context.socket(zmq.PUSH)
        try:
            pull.bind(endpoint)
            push.connect(endpoint)
            for frames in messages:
                push.send_multipart(frames)
            for _ in range(ROUNDS):
                if receiver.messages_total >= len(messages):
                    break
                receiver.recv(pull, 1000, 100)
            results.append((receiver.take_rendered(), receiver.malformed_reasons,
                            receiver.messages_total))
        finally:
            push.close(linger=0)
            pull.close(linger=0)
    assert results[0] == results[1]
    assert results[0][2] == len(messages)


# ---------------------------------------------------------------------------------------------
# files

@pytest.fixture
def short_dir():
    # ipc:// paths must fit in sun_path (107 bytes): pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="zl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_log_file_rotates_before_the_line_that_finds_it_full(short_dir):
    path = os.path.join(short_dir, "s.log")
    log = LogFile(path, max_size=10, max_files=3)
    log.write(b"aaaa\nbbbb\n")          # 10 bytes: full only once written
    log.write(b"cc\n")                  # finds it full: rotate, then write
    log.write(b"dddddddddddd\nee\nf\n")  # a line may pass the limit; the next one rotates
    log.close()
    assert read(path) == b"ee\nf\n"
    assert read(path + ".1") == b"cc\ndddddddddddd\n"
    assert read(path + ".2") == b"aaaa\nbbbb\n"
    assert not os.path.exists(path + ".3")
    log = LogFile(path, max_size=10, max_files=3)       # reopened: the size on disk counts
    log.write(b"g\nhhhhhh\n")
    assert read(path) == b"ee\nf\ng\nhhhhhh\n"
    log.write(b"i\n")
    log.close()
    assert read(path) == b"i\n"
    assert read(path + ".1") == b"ee\nf\ng\nhhhhhh\n"
    assert read(path + ".2") == b"cc\ndddddddddddd\n"   # the oldest was dropped
    assert sorted(os.listdir(short_dir)) == ["s.log", "s.log.1", "s.log.2"]


def test_log_file_matches_a_line_by_line_model(short_dir):
    lines = [b"%d%s\n" % (i, b"x" * (i * 7 % 13)) for i in range(60)]
    path = os.path.join(short_dir, "m.log")
    log = LogFile(path, max_size=40, max_files=4)
    for i in range(0, len(lines), 7):           # batches as take_rendered gives them
        log.write(b"".join(lines[i:i + 7]))
    log.close()
    files = [b""]                               # Docker's rule, one line at a time
    for line in lines:
        if len(files[-1]) >= 40:
            files.append(b"")
        files[-1] += line
    assert read(path) == files[-1]
    assert [read("%s.%d" % (path, n)) for n in (1, 2, 3)] == files[-2:-5:-1]
    assert not os.path.exists(path + ".4")


def test_log_file_with_one_file_truncates(short_dir):
    path = os.path.join(short_dir, "t.log")
    log = LogFile(path, max_size=4, max_files=1)
    log.write(b"1234\n56\n")
    log.close()
    assert read(path) == b"56\n" and os.listdir(short_dir) == ["t.log"]


@pytest.mark.parametrize("value, name", [
    (b"acme", "acme"), (b"web-1.prod_x", "web-1.prod_x"), (b"..", "%2E%2E"), (b".", "%2E"),
    (b"", "%"), (b"../x", "..%2Fx"), (b"a/b", "a%2Fb"), (b"a\\b", "a%5Cb"), (b"\0", "%00"),
    (b"50%", "50%25"), ("é", "%C3%A9"), (b"a b\n", "a%20b%0A"),
])
def test_safe_path_part_escapes(value, name):
    assert safe_path_part(value) == name


def test_safe_path_part_keeps_values_apart_and_names_short():
    values = [b"a/b", b"a_b", b"a%2Fb", b"a%b", b"", b"%", b".", b"..", b"...", b"x" * 300,
              b"x" * 299 + b"y"]
    names = [safe_path_part(v) for v in values]
    assert len(set(names)) == len(values)
    assert all(0 < len(n) <= collector_mod.MAX_NAME_BYTES and "/" not in n and "\0" not in n
               and n not in (".", "..") for n in names)


def run_collector(col, sockets, messages, expected=None):
    """Bind ``col`` to a fresh ipc endpoint, send ``messages`` from this process, run until all
    ``expected`` (default: all) messages arrived."""
    directory = tempfile.mkdtemp(prefix="zl")
    try:
        endpoint = "ipc://%s/c.ipc" % directory
        col.bind(endpoint)
        push = sockets.make(zmq.PUSH, SNDHWM=0)
        push.connect(endpoint)
        for frames in messages:
            push.send_multipart(frames)
        col.run(until_messages=len(messages) if expected is None else expected)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_open_log_files_stay_bounded_and_lose_nothing(short_dir, sockets):
    out = os.path.join(short_dir, "out")
    col = Collector(out_dir=out, max_open_files=2, batch_messages=3)
    try:
        messages = [[b"t%d" % (i % 5), b"s", b"c: %d" % i] for i in range(40)]
        run_collector(col, sockets, messages)
        assert len(col._files) <= 2
    finally:
        col.close()
    for t in range(5):
        assert read(os.path.join(out, "t%d" % t, "s.log")) == \
            b"".join(b"c: %d\n" % i for i in range(t, 40, 5))


def test_long_line_is_joined_and_an_incomplete_one_written_at_close(short_dir, sockets):
    out = os.path.join(short_dir, "out")
    whole = chunks(b"0123456789abcdefXY\n", container_id="c7")
    open_group = chunks(b"ABCDEFGHIJKLMNOPQR", id_seed=9)[:2]      # never gets its last chunk
    col = Collector(out_dir=out, batch_messages=2)
    try:
        messages = [[b"t", b"s", p] for p in whole[:2]] + [[b"t", b"s", b"c: mid"]] + \
            [[b"t", b"s", open_group[0]], [b"t", b"s", whole[2]], [b"t", b"s", open_group[1]]]
        run_collector(col, sockets, messages)
        assert read(os.path.join(out, "t", "s.log")) == \
            b"c: mid\nc7 stdout: 0123456789abcdefXY\n"
    finally:
        col.close()
    assert read(os.path.join(out, "t", "s.log")) == \
        b"c: mid\nc7 stdout: 0123456789abcdefXY\nc1 stdout: ABCDEFGH\nc1 stdout: IJKLMNOP\n"
    assert col.partial_expired_total == 1


def test_chunks_are_written_as_they_are_once_the_wait_is_over(short_dir, sockets, monkeypatch):
    monkeypatch.setattr(collector_mod, "REASSEMBLY_WAIT_S", 0.0)
    out = os.path.join(short_dir, "out")
    parts = chunks(b"0123456789abcdefXY\n")
    col = Collector(out_dir=out)
    try:
        run_collector(col, sockets, [[b"t", b"s", parts[0]]])
        assert read(os.path.join(out, "t", "s.log")) == b"c1 stdout: 01234567\n"
        assert col.partial_expired_total == 1
    finally:
        col.close()


def test_json_lines_carry_every_field(sockets):
    import io

    buf = io.BytesIO()
    col = Collector(out=buf, fmt="json")
    part = chunks(b"0123456789\n")[0]
    try:
        run_collector(col, sockets, [[b"t", b"s", b"abc: \xff"], [b"t", b"s", b"bad"],
                                     [b"u", b"v", record(attrs={"k": "v"})],
                                     [b"t", b"s", part]])
    finally:
        col.close()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0] == {"tenant": "t", "service": "s", "framing": "seed", "container_id": "abc",
                        "line_base64": "/w=="}
    assert lines[1]["partial"]["ordinal"] == 1 and lines[1]["line"] == "01234567"
    assert lines[2] == {"tenant": "u", "service": "v", "framing": "msgpack", "container_id": "c1",
                        "container_name": "/web", "source": "stdout",
                        "time_nano": 1_700_000_000_000_000_000, "attrs": {"k": "v"},
                        "line": "hello"}
    assert col.malformed_reasons["seed"] == 1 and col.malformed_total == 1


# ---------------------------------------------------------------------------------------------
# zeroline collect, as a user runs it

def zeroline(*args, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "zeroline", *args], input=input, env=env,
                          capture_output=True, timeout=TIMEOUT_S)


PULL_SUB = (("--bind", "pull"), ("--bind-sub", "sub"))     # start_collect's endpoints here


def env_with(**values):
    env = dict(os.environ)
    env.update(values)
    return env


def test_collect_takes_push_and_pub_forwarders_of_both_framings_at_once(short_dir):
    out = os.path.join(short_dir, "out")
    proc, pull, sub = start_collect(short_dir, PULL_SUB, "--out", out, "--count", "5", "--stats")
    try:
        fwd = zeroline("forward", "--log-opt", "zmq-address=" + pull, "--log-opt",
                       "zmq-socket=push", "--container-id", "0123456789abcdef",
                       env=env_with(TENANT_ID="acme", SERVICE_ID="web"), input=b"one\ntwo\n")
        assert fwd.returncode == 0, fwd.stderr
        fwd = zeroline("forward", "--log-opt", "zmq-address=" + sub, "--log-opt",
                       "zmq-socket=pub", "--log-opt", "zmq-framing=msgpack", "--source", "stderr",
                       "--container-id", "fedcba987654", env=env_with(TENANT_ID="beta"),
                       input=b"three\nfour\nfive")
        assert fwd.returncode == 0, fwd.stderr
    finally:
        _, err = finish(proc)
    assert proc.returncode == 0, err
    assert read(os.path.join(out, "acme", "web.log")) == b"0123456789ab: one\n0123456789ab: two\n"
    assert read(os.path.join(out, "beta", "default.log")) == \
        b"fedcba987654 stderr: three\nfedcba987654 stderr: four\nfedcba987654 stderr: five\n"
    assert b"messages_received_total=5 " in err and b" malformed_total=0 " in err


def test_collect_joins_the_chunks_of_a_long_line(short_dir):
    out = os.path.join(short_dir, "out")
    long_line = bytes(range(33, 127)) * 3
    # 282 bytes in 16-byte chunks: 17 full ones and a last one of 10; then "end".
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--out", out, "--count", "19")
    try:
        fwd = zeroline("forward", "--log-opt", "zmq-address=" + pull, "--log-opt",
                       "zmq-socket=push", "--log-opt", "zmq-framing=msgpack", "--log-opt",
                       "zmq-line-buffer=16", "--container-id", "c", input=long_line + b"\nend\n")
        assert fwd.returncode == 0, fwd.stderr
    finally:
        _, err = finish(proc)
    assert proc.returncode == 0, err
    assert read(os.path.join(out, "default", "default.log")) == \
        b"c stdout: " + long_line + b"\nc stdout: end\n"


def test_collect_rotates_by_size_with_exact_contents(short_dir):
    out = os.path.join(short_dir, "out")
    lines = [b"line %02d %s" % (i, b"#" * (i % 9)) for i in range(30)]
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--out", out, "--count", "30", "--max-size", "0.1k",
                                  "--max-files", "3")
    try:
        fwd = zeroline("forward", "--log-opt", "zmq-address=" + pull, "--log-opt",
                       "zmq-socket=push", "--container-id", "k", input=b"\n".join(lines) + b"\n")
        assert fwd.returncode == 0, fwd.stderr
    finally:
        _, err = finish(proc)
    assert proc.returncode == 0, err
    files = [b""]
    for line in lines:
        if len(files[-1]) >= 100:               # 0.1k is 100 bytes (decimal, as Docker)
            files.append(b"")
        files[-1] += b"k: " + line + b"\n"
    base = os.path.join(out, "default", "default.log")
    assert len(files) > 3
    assert [read(base), read(base + ".1"), read(base + ".2")] == files[-1:-4:-1]
    assert sorted(os.listdir(os.path.dirname(base))) == \
        ["default.log", "default.log.1", "default.log.2"]


def test_collect_keeps_tenant_and_service_inside_out(short_dir, sockets):
    box = os.path.join(short_dir, "box")        # OUT's parent holds nothing else
    out = os.path.join(box, "out")
    names = [(b"../x", b"s"), (b"a/b", b"../../evil"), (b"..", b".."), (b"\0", b"s\0t"),
             (b"/abs", b"."), (b"ok", b"/etc/passwd")]
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--out", out, "--count", str(len(names)))
    try:
        push = sockets.make(zmq.PUSH)
        push.connect(pull)
        for i, (tenant, service) in enumerate(names):
            push.send_multipart([tenant, service, b"c: %d" % i])
        _, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert os.listdir(box) == ["out"]                        # nothing next to OUT
    found = {}
    for root, _, files in os.walk(out):
        for name in files:
            path = os.path.join(root, name)
            assert os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
            found[os.path.relpath(path, out)] = read(path)
    assert found == {
        "..%2Fx/s.log": b"c: 0\n", "a%2Fb/..%2F..%2Fevil.log": b"c: 1\n",
        "%2E%2E/%2E%2E.log": b"c: 2\n", "%00/s%00t.log": b"c: 3\n", "%2Fabs/%2E.log": b"c: 4\n",
        "ok/%2Fetc%2Fpasswd.log": b"c: 5\n"}


def test_collect_counts_malformed_input_and_keeps_going(short_dir, sockets):
    out = os.path.join(short_dir, "out")
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--out", out, "--count", "4", "--stats")
    try:
        push = sockets.make(zmq.PUSH)
        push.connect(pull)
        push.send_multipart([b"t", b"s"])
        push.send_multipart([b"t", b"s", b"c: 1", b"d"])
        push.send_multipart([b"t", b"s", record()[:-1]])
        push.send_multipart([b"t", b"s", b"no prefix"])
        push.send_multipart([b"t", b"s", b"c: still here"])
        push.send_multipart([b"t", b"s", record(line=b"and this")])
        _, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert read(os.path.join(out, "t", "s.log")) == b"c: still here\nc1 stdout: and this\n"
    assert b" malformed_total=4 " in err
    for reason, count in (("frames", 2), ("seed", 1), ("msgpack", 1)):
        assert b"malformed_total{reason=%s}=%d" % (reason.encode(), count) in err, err


def test_collect_json_to_stdout_carries_every_field(short_dir):
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--stdout", "--format", "json", "--count", "2")
    try:
        fwd = zeroline("forward", "--log-opt", "zmq-address=" + pull, "--log-opt",
                       "zmq-socket=push", "--log-opt", "zmq-framing=msgpack", "--log-opt",
                       "env=APP", "--container-id", "0123456789abcdef", "--container-name",
                       "/api", env=env_with(APP="billing", SERVICE_ID="api"),
                       input=b"caf\xc3\xa9\n\xff\xfe\n")
        assert fwd.returncode == 0, fwd.stderr
        stdout, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    first, second = [json.loads(line) for line in stdout.splitlines()]
    assert set(first) == {"tenant", "service", "framing", "container_id", "container_name",
                          "source", "time_nano", "attrs", "line"}
    assert (first["tenant"], first["service"], first["framing"]) == ("default", "api", "msgpack")
    assert (first["container_id"], first["container_name"], first["source"]) == \
        ("0123456789ab", "/api", "stdout")
    assert first["attrs"] == {"APP": "billing"} and first["line"] == "café"
    assert isinstance(first["time_nano"], int) and first["time_nano"] > 0
    assert second["line_base64"] == "//4=" and "line" not in second


def test_collect_prints_interval_stats_and_flushes_held_chunks_on_sigterm(short_dir, sockets):
    out = os.path.join(short_dir, "out")
    proc, pull, _ = start_collect(short_dir, PULL_SUB, "--out", out, "--stats-interval", "0.05", "--stats")
    try:
        push = sockets.make(zmq.PUSH)
        push.connect(pull)
        push.send_multipart([b"t", b"s", chunks(b"0123456789abcdefXY\n")[0]])
        push.send_multipart([b"t", b"s", b"c: whole"])
        seen = b""
        for _ in range(TIMEOUT_S * 10):                   # until an interval line counts both
            ready, _, _ = select.select([proc.stderr], [], [], 0.1)
            if ready:
                seen += os.read(proc.stderr.fileno(), 4096)
            if b"2 messages, " in seen and b"messages/s" in seen:
                break
        assert b"2 messages, " in seen, seen
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"messages_received_total=2 " in err and b"partial_groups_expired_total=1 " in err
    assert read(os.path.join(out, "t", "s.log")) == b"c: whole\nc1 stdout: 01234567\n"


def test_collect_sigint_exits_130(short_dir):
    proc, _, _ = start_collect(short_dir, PULL_SUB, "--stdout")
    proc.send_signal(signal.SIGINT)
    finish(proc)
    assert proc.returncode == 130


@pytest.mark.parametrize("args, says", [
    (["--out", "o", "--max-files", "3"], "--max-files needs --max-size"),
    (["--stdout", "--max-size", "1m"], "--max-size"),
    (["--out", "o", "--max-size", "lots"], "invalid size"),
    (["--out", "o", "--max-size", "0"], "--max-size must be positive"),
    (["--out", "o", "--max-size", "1m", "--max-files", "0"], "--max-files must be at least 1"),
])
def test_collect_usage_errors_are_one_line(short_dir, args, says):
    proc = zeroline("collect", "--bind", "ipc://%s/x.ipc" % short_dir, *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("zeroline: error: ") and says in err, err
