"""LogEntry frames from the plugin FIFO: both decoders against the protobuf package (the reference
encoder, compiled from tests/data/entry.proto) and against each other, in random chunkings."""

import os
import random
import shutil
import struct
import sys
import tempfile

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroline import _logentry_py
from zeroline.errors import ProtocolError

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from zeroline import _core as compiled
except ImportError:
    compiled = None

IMPLS = [pytest.param(_logentry_py, id="python")]
if compiled is not None and os.environ.get("ZEROLINE_NO_EXTENSIONS") != "1":
    IMPLS.append(pytest.param(compiled, id="cython"))


@pytest.fixture(scope="module")
def pb2():
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tempfile.mkdtemp(prefix="zlpb")
    assert protoc.main(["protoc", "-I" + os.path.join(HERE, "data"), "--python_out=" + out,
                        os.path.join(HERE, "data", "entry.proto")]) == 0
    sys.path.insert(0, out)
    try:
        import entry_pb2
    finally:
        sys.path.remove(out)
    yield entry_pb2
    shutil.rmtree(out, ignore_errors=True)


def make_entry(pb2, source, time_nano, line, meta=None, attrs=()):
    e = pb2.LogEntry(source=source, time_nano=time_nano, line=line)
    if meta is not None:
        e.partial = True
        e.partial_log_metadata.last, e.partial_log_metadata.id, \
            e.partial_log_metadata.ordinal = meta
    for key, value in attrs:
        e.attrs.add(key=key, value=value)
    return e.SerializeToString()


def frame(entry):
    return struct.pack(">I", len(entry)) + entry


entries = st.tuples(
    st.sampled_from(["stdout", "stderr", "", "other-source"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=300),
    st.one_of(st.none(), st.tuples(st.booleans(), st.text(max_size=70),
                                   st.integers(min_value=-(2**31), max_value=2**31 - 1))),
    st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=2),
)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None)
@given(value=entries)
def test_decoder_matches_the_protobuf_package(pb2, impl, value):
    source, time_nano, line, meta, attrs = value
    message = impl.decode_entry(make_entry(pb2, source, time_nano, line, meta, attrs))
    assert (message.source, message.time_nano, message.line) == (source, time_nano, line)
    if meta is None:
        assert message.partial is None
    else:
        assert (message.partial.last, message.partial.id, message.partial.ordinal) == meta


def test_encoder_round_trips_through_the_protobuf_package(pb2):
    message = _logentry_py.decode_entry(make_entry(pb2, "stderr", 5, b"x", (True, "id", 3)))
    parsed = pb2.LogEntry()
    parsed.ParseFromString(_logentry_py.encode_entry(message))
    assert (parsed.source, parsed.time_nano, parsed.line, parsed.partial) == ("stderr", 5, b"x",
                                                                             True)
    assert parsed.partial_log_metadata.id == "id" and parsed.partial_log_metadata.ordinal == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_defaults_left_out_by_proto3_are_filled_in(impl):
    message = impl.decode_entry(b"")
    assert (message.line, message.source, message.time_nano, message.partial) == (b"", "", 0,
                                                                                   None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("raw", [b"\x0a\x05abc", b"\x10", b"\x0b", b"\x00\x01",
                                 b"\x10" + b"\xff" * 11])
def test_malformed_entries_raise_protocol_error(impl, raw):
    with pytest.raises(ProtocolError):
        impl.decode_entry(raw)


def stream_output(impl, chunks, **kw):
    s = impl.EntryStream(keep_local=True, **kw)
    frames, local = [], b""
    for chunk in chunks:
        s.feed(chunk)
        frames += s.take()
        local += s.take_local()
    s.close()
    frames += s.take()
    counters = {k: getattr(s, k) for k in ("entries_total", "malformed_total", "oversized_total",
                                           "truncated_total", "discarded_bytes_total",
                                           "partial_entries_total", "errors_total")}
    return frames, local, counters, s.last_error


def random_chunks(data, rng):
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
@pytest.mark.parametrize("framing", ["seed", "msgpack"])
@settings(max_examples=120, deadline=None)
@given(values=st.lists(entries, max_size=8), seed=st.integers(0, 2**32),
       damage=st.sampled_from(["none", "malformed", "oversized", "truncated"]))
def test_compiled_and_twin_streams_agree_in_any_chunking(pb2, framing, values, seed, damage):
    rng = random.Random(seed)
    data = b"".join(frame(make_entry(pb2, *v)) for v in values)
    if damage == "malformed":
        data += frame(b"\x0a\x09short") + frame(make_entry(pb2, "stdout", 1, b"after"))
    elif damage == "oversized":
        data += struct.pack(">I", 5000) + b"x" * 100
    elif damage == "truncated":
        data += frame(make_entry(pb2, "stdout", 1, b"cut"))[:-2]
    chunks = random_chunks(data, rng) if data else [b""]
    kw = dict(framing=framing, container_id="cid", container_name="/n", attrs={"a": "b"},
              max_entry_bytes=4096)
    twin = stream_output(_logentry_py, chunks, **kw)
    fast = stream_output(compiled, chunks, **kw)
    assert fast == twin
    assert twin == stream_output(_logentry_py, [data], **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_frames_entries_with_their_own_source_and_metadata(pb2, impl):
    s = impl.EntryStream(framing="msgpack", container_id="c", keep_local=True)
    e1 = make_entry(pb2, "stderr", 7, b"a" * 10, (False, "g" * 64, 1))
    e2 = make_entry(pb2, "stderr", 7, b"b", (True, "g" * 64, 2))
    assert s.feed(frame(e1) + frame(e2)[:3]) == 1
    assert s.feed(frame(e2)[3:]) == 1
    records = [msgpack.unpackb(m[2]) for m in s.take()]
    assert [(r["source"], r["time_nano"], r["line"], r["partial"]) for r in records] == [
        ("stderr", 7, b"a" * 10, {"id": "g" * 64, "ordinal": 1, "last": False}),
        ("stderr", 7, b"b", {"id": "g" * 64, "ordinal": 2, "last": True})]
    assert s.take_local() == b"".join(frame(e) + struct.pack(">I", len(e)) for e in (e1, e2))


@pytest.mark.parametrize("impl", IMPLS)
def test_oversized_length_discards_the_rest_but_keeps_what_came_before(pb2, impl):
    s = impl.EntryStream(max_entry_bytes=100)
    good = frame(make_entry(pb2, "stdout", 1, b"kept"))
    s.feed(good + struct.pack(">I", 101) + b"junk")
    s.feed(frame(make_entry(pb2, "stdout", 1, b"unreachable")))
    assert [m[2] for m in s.take()] == [b": kept"]
    assert s.corrupt and s.oversized_total == 1
    assert s.discarded_bytes_total == 8 + len(frame(make_entry(pb2, "stdout", 1, b"unreachable")))
    assert "over the 100-byte limit" in s.last_error


@pytest.mark.parametrize("impl", IMPLS)
def test_truncated_frame_at_eof_is_counted(pb2, impl):
    s = impl.EntryStream()
    s.feed(frame(make_entry(pb2, "stdout", 1, b"whole")) + b"\x00\x00\x00\x09abc")
    s.close()
    assert [m[2] for m in s.take()] == [b": whole"]
    assert s.truncated_total == 1 and "ended inside an entry" in s.last_error
    with pytest.raises(ValueError):
        s.feed(b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_blocking_ring_drops_entries_exactly(pb2, impl):
    s = impl.EntryStream(max_pending_bytes=10)
    data = b"".join(frame(make_entry(pb2, "stdout", 1, b"x" * 4)) for _ in range(5))
    s.feed(data)
    assert (s.pending_messages, s.dropped_total, s.dropped_bytes_total) == (2, 3, 12)


# -- closing the partial groups Docker leaves open (an unterminated last line: last=false) -----

GID = "f" * 64


def records(s):
    return [msgpack.unpackb(m[2]) for m in s.take()]


@pytest.mark.parametrize("impl", IMPLS)
def test_close_marks_a_still_pending_final_chunk_last(pb2, impl):
    s = impl.EntryStream(framing="msgpack", container_id="c", attrs={"k": "v"}, keep_local=True)
    entry = make_entry(pb2, "stdout", 9, b"abc", (False, GID, 1))
    assert s.feed(frame(entry)) == 1
    assert s.close() == 0
    assert [(r["line"], r["time_nano"], r["partial"], r["attrs"]) for r in records(s)] == [
        (b"abc", 9, {"id": GID, "ordinal": 1, "last": True}, {"k": "v"})]
    # The local copy (docker logs) keeps the engine's bytes.
    assert s.take_local() == frame(entry) + struct.pack(">I", len(entry))


@pytest.mark.parametrize("impl", IMPLS)
def test_close_follows_a_sent_final_chunk_with_an_empty_last_one(pb2, impl):
    s = impl.EntryStream(framing="msgpack", container_id="c")
    s.feed(frame(make_entry(pb2, "stderr", 9, b"x" * 16384, (False, GID, 1)))
           + frame(make_entry(pb2, "stderr", 9, b"tail", (False, GID, 2))))
    assert [r["partial"]["last"] for r in records(s)] == [False, False]
    assert s.close() == 1
    assert [(r["source"], r["line"], r["time_nano"], r["partial"]) for r in records(s)] == [
        ("stderr", b"", 9, {"id": GID, "ordinal": 3, "last": True})]
    assert s.close() == 0               # once only


@pytest.mark.parametrize("impl", IMPLS)
def test_close_ends_each_sources_group_and_leaves_finished_ones_alone(pb2, impl):
    s = impl.EntryStream(framing="msgpack", container_id="c")
    other = "e" * 64
    s.feed(frame(make_entry(pb2, "stderr", 1, b"err", (False, other, 1)))
           + frame(make_entry(pb2, "stdout", 2, b"a", (False, GID, 1)))
           + frame(make_entry(pb2, "stdout", 2, b"b", (True, GID, 2)))      # closed by Docker
           + frame(make_entry(pb2, "stdout", 3, b"c", (False, "d" * 64, 1))))
    s.take()
    assert s.close() == 2
    assert [(r["source"], r["partial"]) for r in records(s)] == [
        ("stderr", {"id": other, "ordinal": 2, "last": True}),
        ("stdout", {"id": "d" * 64, "ordinal": 2, "last": True})]


@pytest.mark.parametrize("impl", IMPLS)
def test_close_after_a_dropped_final_chunk_sends_the_closing_chunk(pb2, impl):
    s = impl.EntryStream(framing="msgpack", container_id="c", max_pending_bytes=4)
    s.feed(frame(make_entry(pb2, "stdout", 1, b"full"))
           + frame(make_entry(pb2, "stdout", 5, b"dropped", (False, GID, 1))))
    assert s.dropped_total == 1
    s.take()
    assert s.close() == 1
    assert [(r["line"], r["partial"]) for r in records(s)] == [
        (b"", {"id": GID, "ordinal": 2, "last": True})]


@pytest.mark.parametrize("impl", IMPLS)
def test_close_changes_nothing_with_seed_framing(pb2, impl):
    s = impl.EntryStream(container_id="c")
    s.feed(frame(make_entry(pb2, "stdout", 1, b"abc", (False, GID, 1))))
    assert s.close() == 0
    assert [m[2] for m in s.take()] == [b"c: abc"]


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
@settings(max_examples=150, deadline=None)
@given(values=st.lists(entries, max_size=10), seed=st.integers(0, 2**32),
       ring=st.sampled_from([-1, 200]))
def test_compiled_and_twin_close_groups_identically(pb2, values, seed, ring):
    # Takes at random points (or never), so a group's final chunk may be pending or gone at close.
    rng = random.Random(seed)
    data = b"".join(frame(make_entry(pb2, *v)) for v in values)
    chunks = random_chunks(data, rng) if len(data) > 1 else [data]
    takes = [rng.random() < 0.5 for _ in chunks]

    def run(impl):
        s = impl.EntryStream(framing="msgpack", container_id="cid", container_name="/n",
                             attrs={"a": "b"}, max_pending_bytes=ring)
        out = []
        for chunk, take in zip(chunks, takes):
            s.feed(chunk)
            if take:
                out += s.take()
        out.append(s.close())
        return out + s.take()

    assert run(compiled) == run(_logentry_py)
