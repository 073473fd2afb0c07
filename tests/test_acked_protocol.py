"""The acked transport's codec: batch bodies (Stream.take_batch, Receiver.add_batch) on both
implementations, the batch and ack frames, and the test vectors of docs/acked-protocol.md."""

import os
import random
import re
import struct

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroline import _core_py, _logentry_py, core
from zeroline.errors import ConfigError, ProtocolError

from conftest import available_implementations

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, os.pardir, "docs", "acked-protocol.md")

IMPLS = available_implementations()
COMPILED = IMPLS.get("cython")
TWIN = _core_py
needs_both = pytest.mark.skipif(COMPILED is None, reason="the compiled core is not in this run")

T0 = 1700000000000000000
STREAM_ID = b"0011223344556677/0123456789ab/stdout"


def make_stream(module, **extra):
    config = dict(framing="msgpack", tenant="acme", service="api", container_id="0123456789ab",
                  container_name="/web", id_seed=1)
    config.update(extra)
    return module.Stream(**config)


def entry_stream(module, **extra):
    # The compiled EntryStream lives in _core; the twin's in _logentry_py (a _core_py.Stream).
    cls = _logentry_py.EntryStream if module is TWIN else module.EntryStream
    config = dict(framing="msgpack", tenant="acme", service="api", container_id="0123456789ab",
                  container_name="/web")
    config.update(extra)
    return cls(**config)


def drain(stream, max_bytes):
    """Every take_batch result until the queue is empty, with the counters after each."""
    out = []
    for _ in range(100000):
        body, records, line_bytes = stream.take_batch(max_bytes)
        out.append((body, records, line_bytes, stream.pending_messages, stream.pending_bytes))
        if not records:
            return out
    raise AssertionError("take_batch never emptied the queue")


def records_of(body):
    """The records of a body, parsed here independently of split_batch."""
    out, pos = [], 0
    while pos < len(body):
        (n,) = struct.unpack_from(">I", body, pos)
        out.append(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(body)
    return out


def random_input(rng, size, long_every=20, long_size=200):
    parts = []
    while sum(map(len, parts)) < size:
        if rng.randrange(long_every) == 0:
            n = rng.randrange(long_size, 3 * long_size)
        else:
            n = rng.randrange(0, 40)
        parts.append(bytes(rng.randrange(32, 127) for _ in range(n)) + b"\n")
    parts.append(b"tail without newline")
    return b"".join(parts)


# -- the test vectors in docs/acked-protocol.md -------------------------------------------------

def doc_vectors():
    """``{name: bytes}`` from the hex blocks of the doc's "Test vectors" section."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Test vectors\n", 1)[1]
    vectors, key = {}, None
    for block in re.findall(r"```text\n(.*?)```", section, re.S):
        for line in block.splitlines():
            m = re.fullmatch(r"([a-z][a-z0-9 -]*):(?: ([0-9a-f]*))?", line)
            if m:
                key = m.group(1)
                assert key not in vectors, key
                vectors[key] = m.group(2) or ""
            else:
                assert re.fullmatch(r"    [0-9a-f]+", line) and key, line
                vectors[key] += line.strip()
    return {k: bytes.fromhex(v) for k, v in vectors.items()}


VECTORS = doc_vectors()


def test_doc_has_every_vector():
    names = {"body-lines", "body-partial"} | {"batch frame %d" % i for i in range(6)} \
        | {"ack frame %d" % i for i in range(3)}
    assert set(VECTORS) == names


def test_vector_bodies(impl):
    s = make_stream(impl)
    s.feed(b"hello\nworld\n", time_nano=T0)
    assert s.take_batch() == (VECTORS["body-lines"], 2, 10)
    s = make_stream(impl, max_line_bytes=4)
    s.feed(b"hello\n", time_nano=T0)
    assert s.take_batch() == (VECTORS["body-partial"], 2, 5)


def test_vector_partial_records_say_what_the_doc_says():
    first, second = (msgpack.unpackb(r) for r in records_of(VECTORS["body-partial"]))
    group = "c15c0289ec2d0a9167ec8e65a18debbe5e5532fbeea293f80bc942ee9086c171"
    assert first["line"] == b"hell" and first["partial"] == {"id": group, "ordinal": 1,
                                                              "last": False}
    assert second["line"] == b"o" and second["partial"] == {"id": group, "ordinal": 2,
                                                             "last": True}
    assert first["time_nano"] == second["time_nano"] == T0


def test_vector_batch_message():
    frames = [VECTORS["batch frame %d" % i] for i in range(6)]
    assert core.encode_batch_message(b"acme", b"api", STREAM_ID, 1, VECTORS["body-lines"]) == frames
    assert core.decode_batch_message(frames) == (b"acme", b"api", STREAM_ID, 1,
                                                 VECTORS["body-lines"])


def test_vector_ack():
    frames = [VECTORS["ack frame %d" % i] for i in range(3)]
    assert core.encode_ack(STREAM_ID, 1) == frames
    assert core.decode_ack(frames) == (STREAM_ID, 1)


def test_vector_body_renders(impl):
    r = impl.Receiver()
    assert r.add_batch(b"acme", b"api", VECTORS["body-lines"]) == 2
    assert r.take_rendered() == [(b"acme", b"api",
                                  b"0123456789ab stdout: hello\n0123456789ab stdout: world\n", None)]


# -- take_batch ---------------------------------------------------------------------------------

def test_batch_max_bytes_constant(impl):
    assert impl.BATCH_MAX_BYTES == 262144
    assert core.BATCH_MAX_BYTES == 262144


def test_take_batch_empty(impl):
    s = make_stream(impl)
    assert s.take_batch() == (b"", 0, 0)
    s.feed(b"partial line without newline", time_nano=T0)
    assert s.take_batch() == (b"", 0, 0)
    assert s.held_bytes > 0


@pytest.mark.parametrize("bad", [-1, "1", 1.5, None, 1 << 63])
def test_take_batch_rejects_bad_max_bytes(impl, bad):
    s = make_stream(impl)
    s.feed(b"x\n", time_nano=T0)
    with pytest.raises(ConfigError):
        s.take_batch(bad)
    assert s.pending_messages == 1


@pytest.mark.parametrize("framing", ["seed", "msgpack"])
def test_take_batch_is_take_with_length_prefixes(impl, framing):
    data = random_input(random.Random(3), 5000)
    a = make_stream(impl, framing=framing, max_line_bytes=64)
    b = make_stream(impl, framing=framing, max_line_bytes=64)
    for s in (a, b):
        s.feed(data, time_nano=T0)
        s.close(time_nano=T0 + 1)
    payloads = [frames[2] for frames in a.take()]
    queued_bytes = b.pending_bytes
    body, records, line_bytes = b.take_batch(1 << 40)
    assert records_of(body) == payloads
    assert records == len(payloads)
    assert line_bytes == queued_bytes > 0
    assert b.pending_messages == 0 and b.pending_bytes == 0
    assert b.sent_total == 0


@pytest.mark.parametrize("max_bytes", [0, 1, 50, 97, 200, 1000, 4096])
def test_take_batch_respects_max_bytes(impl, max_bytes):
    data = random_input(random.Random(max_bytes), 8000)
    s = make_stream(impl, max_line_bytes=100)
    s.feed(data, time_nano=T0)
    queued, queued_bytes = s.pending_messages, s.pending_bytes
    all_records, total_lines = [], 0
    for body, records, line_bytes, left, left_bytes in drain(s, max_bytes)[:-1]:
        assert records >= 1
        assert len(body) <= max_bytes or records == 1
        got = records_of(body)
        assert len(got) == records
        all_records += got
        total_lines += line_bytes
        assert left_bytes == queued_bytes - total_lines
        assert left == queued - len(all_records)
    assert len(all_records) == queued and total_lines == queued_bytes
    again = make_stream(impl, max_line_bytes=100)
    again.feed(data, time_nano=T0)
    assert all_records == [frames[2] for frames in again.take()]


def test_take_batch_boundary_is_exact(impl):
    s = make_stream(impl, framing="seed", container_id="c")
    s.feed(b"aaaa\nbbbb\ncccc\n", time_nano=T0)       # payloads "c: aaaa": 7 bytes, 11 framed
    body, records, _ = s.take_batch(22)
    assert records == 2 and len(body) == 22
    body, records, _ = s.take_batch(21)
    assert records == 1 and len(body) == 11


def test_take_batch_oversized_record_goes_alone(impl):
    s = make_stream(impl, framing="seed", container_id="c")
    s.feed(b"x" * 500 + b"\nshort\n", time_nano=T0)
    body, records, line_bytes = s.take_batch(100)
    assert (records, line_bytes, len(body)) == (1, 500, 4 + 503)
    body, records, line_bytes = s.take_batch(100)
    assert (records, line_bytes) == (1, 5)


def test_take_batch_leaves_the_rest_for_send(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    s = make_stream(impl, framing="seed", container_id="c")
    s.feed(b"one\ntwo\nthree\n", time_nano=T0)
    body, records, _ = s.take_batch(10)
    assert records == 1 and records_of(body) == [b"c: one"]
    assert s.send(push) == 2
    assert s.sent_total == 2
    got = [pull.recv_multipart()[2] for _ in range(2)]
    assert got == [b"c: two", b"c: three"]


def test_take_batch_big_buffer_drained_and_reused(impl):
    # Past the 64 KiB the compiled stream keeps: the buffer is freed, then grown again.
    data = random_input(random.Random(9), 300000)
    s = make_stream(impl, max_line_bytes=1000)
    for round_ in range(3):
        s.feed(data, time_nano=T0 + round_)
        expected = s.pending_messages
        got = 0
        for body, records, *_ in drain(s, 100000)[:-1]:
            got += len(records_of(body))
        assert got == expected


@needs_both
@pytest.mark.parametrize("framing", ["seed", "msgpack"])
@pytest.mark.parametrize("limit", [7, 64, 16384])
@pytest.mark.parametrize("max_pending", [-1, 300])
@pytest.mark.parametrize("seed", range(3))
def test_take_batch_compiled_equals_twin(framing, limit, max_pending, seed):
    """Interleaved feeds and batches, with ring drops: the same bodies and counters."""
    rng = random.Random(seed)
    data = random_input(rng, 6000, long_every=10, long_size=50)
    cuts = sorted(rng.sample(range(len(data)), 30))
    steps = []
    for i, (a, b) in enumerate(zip([0] + cuts, cuts + [len(data)])):
        steps.append((data[a:b], T0 + i, rng.choice([0, 1, 64, 300, 5000, 1 << 20])))

    def run(module):
        s = make_stream(module, framing=framing, max_line_bytes=limit, id_seed=seed,
                        max_pending_bytes=max_pending, attrs={"env": "prod"})
        out = []
        for chunk, t, max_bytes in steps:
            s.feed(chunk, time_nano=t)
            out.append(s.take_batch(max_bytes))
            out.append((s.pending_messages, s.pending_bytes, s.dropped_total, s.sent_total))
        s.close(time_nano=T0 + 1000)
        out += drain(s, 128)
        out.append(s.stats())
        return out

    assert run(COMPILED) == run(TWIN)


def entries(rng, count):
    frames = []
    for i in range(count):
        n = rng.randrange(0, 80)
        partial = None
        if i % 7 == 3:
            partial = _core_py.Partial("ab" * 32, 1 + i % 3, i % 2 == 0)
        msg = _core_py.Message(bytes(rng.randrange(256) for _ in range(n)),
                               rng.choice(["stdout", "stderr"]), T0 + i, partial)
        entry = _logentry_py.encode_entry(msg)
        frames.append(struct.pack(">I", len(entry)) + entry)
    return b"".join(frames)


def test_entry_stream_take_batch(impl):
    data = entries(random.Random(5), 200)
    a, b = entry_stream(impl), entry_stream(impl)
    a.feed(data)
    b.feed(data)
    payloads = [frames[2] for frames in a.take()]
    got = []
    for body, records, *_ in drain(b, 700)[:-1]:
        got += records_of(body)
    assert got == payloads and len(got) == 200


@needs_both
def test_entry_stream_compiled_equals_twin():
    data = entries(random.Random(6), 300)

    def run(module):
        s = entry_stream(module, max_pending_bytes=2000)
        out = []
        for i in range(0, len(data), 997):
            s.feed(data[i:i + 997])
            out.append(s.take_batch(1500))
            out.append((s.pending_messages, s.pending_bytes, s.dropped_total))
        return out + drain(s, 1 << 20)

    assert run(COMPILED) == run(TWIN)


# -- add_batch ----------------------------------------------------------------------------------

def mixed_payloads(rng):
    """Records of every kind take_rendered meets: lines, partial chunks, seed payloads, junk."""
    s = make_stream(_core_py, max_line_bytes=16, id_seed=2)
    s.feed(random_input(rng, 1500, long_every=8, long_size=20), time_nano=T0)
    s.close(time_nano=T0 + 1)
    out = [frames[2] for frames in s.take()]
    for junk in (b"c: seed line", b"", b"\x85\xaccontainer_idXX", b"no separator", b"\x81\xa1a\x01"):
        out.insert(rng.randrange(len(out) + 1), junk)
    return out


def body_of(payloads):
    return b"".join(struct.pack(">I", len(p)) + p for p in payloads)


def test_add_batch_renders_like_recv(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    rng = random.Random(11)
    batches = [(b"acme", b"api", mixed_payloads(rng)), (b"other", b"db", mixed_payloads(rng)),
               (b"acme", b"api", mixed_payloads(rng))]
    received = impl.Receiver()
    count = 0
    for tenant, service, payloads in batches:
        for p in payloads:
            push.send_multipart([tenant, service, p])
            count += 1
    for _ in range(1000):
        if received.messages_total >= count:
            break
        received.recv(pull, timeout_ms=100)
    assert received.messages_total == count
    added = impl.Receiver()
    for tenant, service, payloads in batches:
        assert added.add_batch(tenant, service, body_of(payloads)) == len(payloads)
    assert (added.messages_total, added.bytes_total, added.pending_messages) == \
        (received.messages_total, received.bytes_total, received.pending_messages)
    assert added.take_rendered() == received.take_rendered()
    assert added.malformed_reasons == received.malformed_reasons
    assert added.malformed_total == received.malformed_total > 0


def test_round_trip_take_batch_add_batch_take(impl):
    data = random_input(random.Random(12), 20000)
    s = make_stream(impl, max_line_bytes=50, attrs={"a": "b"})
    ref = make_stream(impl, max_line_bytes=50, attrs={"a": "b"})
    for stream in (s, ref):
        stream.feed(data, time_nano=T0)
        stream.close(time_nano=T0)
    r = impl.Receiver()
    total = 0
    for body, records, *_ in drain(s, 3000)[:-1]:
        assert r.add_batch(s.tenant, s.service, body) == records
        total += records
    expected = ref.take()
    assert total == len(expected)
    assert r.take() == expected
    assert r.pending_messages == 0


def test_add_batch_take_payloads(impl):
    r = impl.Receiver()
    r.add_batch(b"t", b"s", body_of([b"a", b"", b"ccc"]))
    r.add_batch(bytearray(b"t"), memoryview(b"s"), bytearray(body_of([b"d"])))
    assert r.take_payloads() == b"a\n\nccc\nd\n"
    assert r.messages_total == 4 and r.bytes_total == 5


GOOD = body_of([b"abc", b"de"])
BAD_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00\x00\x00", id="short-length"),
    pytest.param(b"\x00\x00\x00\x05abc", id="past-end"),
    pytest.param(GOOD + b"\x00", id="trailing-byte"),
    pytest.param(GOOD + b"\x00\x00\x00\x01", id="trailing-length"),
    pytest.param(b"\xff\xff\xff\xff" + b"x" * 10, id="huge-length"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_add_batch_malformed_adds_nothing(impl, body):
    r = impl.Receiver()
    r.add_batch(b"t", b"s", GOOD)
    before = (r.messages_total, r.bytes_total, r.pending_messages, r.malformed_total,
              r.malformed_reasons)
    with pytest.raises(ProtocolError) as info:
        r.add_batch(b"t", b"s", body)
    assert info.value.reason == "batch"
    assert (r.messages_total, r.bytes_total, r.pending_messages, r.malformed_total,
            r.malformed_reasons) == before
    assert "batch" not in r.malformed_reasons
    assert r.take() == [[b"t", b"s", b"abc"], [b"t", b"s", b"de"]]
    with pytest.raises(ProtocolError) as info:
        _core_py.split_batch(body)
    assert info.value.reason == "batch"


def test_add_batch_record_over_max_frame_bytes(impl):
    r = impl.Receiver(max_frame_bytes=3)
    assert r.add_batch(b"t", b"s", GOOD) == 2          # 3 bytes is still allowed
    with pytest.raises(ProtocolError) as info:
        r.add_batch(b"t", b"s", body_of([b"ok", b"four"]))
    assert info.value.reason == "batch"
    with pytest.raises(ProtocolError) as info:
        r.add_batch(b"tenant", b"s", GOOD)              # as recv: no frame over the limit
    assert info.value.reason == "batch"
    assert r.messages_total == 2 and len(r.take()) == 2


def outcome(module, max_frame_bytes, body):
    r = module.Receiver(max_frame_bytes=max_frame_bytes)
    try:
        n = r.add_batch(b"t", b"s", body)
    except ProtocolError as exc:
        assert exc.reason == "batch"
        assert r.messages_total == 0 and r.pending_messages == 0
        return ("rejected", str(exc))
    return (n, r.messages_total, r.bytes_total, r.take())


def bodies():
    records = st.lists(st.binary(max_size=40), min_size=0, max_size=6)
    well_formed = records.map(body_of)
    corrupted = st.tuples(well_formed, st.integers(0, 200), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    return st.one_of(st.binary(max_size=200), well_formed, corrupted,
                     well_formed.map(lambda b: b[:-1]))


@settings(max_examples=300, deadline=None)
@given(body=bodies(), max_frame_bytes=st.sampled_from([0, 5, 40, 64 * 1024 * 1024]))
def test_add_batch_random_bodies_never_crash_and_agree(body, max_frame_bytes):
    results = {name: outcome(module, max_frame_bytes, body) for name, module in IMPLS.items()}
    twin = results["python"]
    assert all(result == twin for result in results.values())
    try:
        split = _core_py.split_batch(body, max_frame_bytes)
    except ProtocolError:
        assert twin[0] == "rejected"
    else:
        if max_frame_bytes == 0:
            assert twin[0] == "rejected"      # the tenant itself is over the limit
        else:
            assert twin[3] == [[b"t", b"s", record] for record in split]


# -- batch and ack frames -----------------------------------------------------------------------

def test_batch_message_round_trip():
    for sid, seq in [(b"s", 1), (b"x" * 255, (1 << 64) - 1), (STREAM_ID, 12345)]:
        frames = core.encode_batch_message("t", b"", sid, seq, b"body")
        assert len(frames) == 6 and frames[0] == core.BATCH_KIND == b"zlb1"
        assert frames[4] == seq.to_bytes(8, "big")
        assert core.decode_batch_message(frames) == (b"t", b"", sid, seq, b"body")
        # pyzmq hands frames over as Frame objects or memoryviews as well as bytes
        assert core.decode_batch_message([memoryview(f) for f in frames])[3] == seq


def test_ack_round_trip():
    for sid, seq in [(b"s", 0), (b"x" * 255, (1 << 64) - 1), (STREAM_ID, 7)]:
        frames = core.encode_ack(sid, seq)
        assert frames == [core.ACK_KIND, sid, seq.to_bytes(8, "big")]
        assert core.decode_ack(frames) == (sid, seq)


GOOD_BATCH = [b"zlb1", b"t", b"s", b"sid", (1).to_bytes(8, "big"), b"body"]


@pytest.mark.parametrize("frames", [
    pytest.param(GOOD_BATCH[:5], id="5-frames"),
    pytest.param(GOOD_BATCH + [b""], id="7-frames"),
    pytest.param([b"zlb2"] + GOOD_BATCH[1:], id="kind-version"),
    pytest.param([b"zla1"] + GOOD_BATCH[1:], id="kind-ack"),
    pytest.param(GOOD_BATCH[:3] + [b""] + GOOD_BATCH[4:], id="empty-stream-id"),
    pytest.param(GOOD_BATCH[:3] + [b"x" * 256] + GOOD_BATCH[4:], id="long-stream-id"),
    pytest.param(GOOD_BATCH[:4] + [b"\x01" * 7] + GOOD_BATCH[5:], id="seq-7-bytes"),
    pytest.param(GOOD_BATCH[:4] + [b"\x00" * 9] + GOOD_BATCH[5:], id="seq-9-bytes"),
    pytest.param(GOOD_BATCH[:4] + [b"\x00" * 8] + GOOD_BATCH[5:], id="seq-0"),
])
def test_decode_batch_message_rejects(frames):
    with pytest.raises(ProtocolError) as info:
        core.decode_batch_message(frames)
    assert info.value.reason == "batch"


GOOD_ACK = [b"zla1", b"sid", (3).to_bytes(8, "big")]


@pytest.mark.parametrize("frames", [
    pytest.param(GOOD_ACK[:2], id="2-frames"),
    pytest.param(GOOD_ACK + [b""], id="4-frames"),
    pytest.param([b"zlb1"] + GOOD_ACK[1:], id="kind-batch"),
    pytest.param([b"zla1", b"", GOOD_ACK[2]], id="empty-stream-id"),
    pytest.param([b"zla1", b"x" * 256, GOOD_ACK[2]], id="long-stream-id"),
    pytest.param([b"zla1", b"sid", b"\x00" * 7], id="seq-7-bytes"),
])
def test_decode_ack_rejects(frames):
    with pytest.raises(ProtocolError) as info:
        core.decode_ack(frames)
    assert info.value.reason == "ack"


@pytest.mark.parametrize("sid, seq", [(b"", 1), (b"x" * 256, 1), (b"s", 0), (b"s", 1 << 64),
                                      (b"s", True), (b"s", 1.0), ("str-id", 1), (5, 1)])
def test_encode_batch_message_refuses_what_decode_rejects(sid, seq):
    with pytest.raises((ProtocolError, TypeError)) as info:
        core.encode_batch_message(b"t", b"s", sid, seq, b"body")
    if info.type is ProtocolError:
        assert info.value.reason == "batch"


@pytest.mark.parametrize("sid, seq", [(b"", 0), (b"x" * 256, 0), (b"s", -1), (b"s", 1 << 64)])
def test_encode_ack_refuses_what_decode_rejects(sid, seq):
    with pytest.raises(ProtocolError) as info:
        core.encode_ack(sid, seq)
    assert info.value.reason == "ack"


def test_full_path_take_batch_to_collector_side(impl):
    """Forwarder side to collector side through the frames, as the transport will run it."""
    s = make_stream(impl)
    s.feed(b"alpha\nbeta\n", time_nano=T0)
    body, records, _ = s.take_batch()
    frames = core.encode_batch_message(s.tenant, s.service, STREAM_ID, 1, body)
    tenant, service, sid, seq, got = core.decode_batch_message(frames)
    r = impl.Receiver()
    assert r.add_batch(tenant, service, got) == records == 2
    assert (sid, seq) == (STREAM_ID, 1)
    assert [msgpack.unpackb(f[2])["line"] for f in r.take()] == [b"alpha", b"beta"]
