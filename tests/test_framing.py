"""Stream framing on both implementations: seed and msgpack payloads, ring buffer, decode."""

import time

import msgpack
import pytest

from zeroline import core
from zeroline.core import Framer, Message, Partial
from zeroline.errors import ConfigError, ProtocolError

from conftest import available_implementations

CID = "4f2a9c0d1e3b" + "0" * 52
KEYS = ["container_id", "container_name", "source", "time_nano", "line"]


def record(line, time_nano, partial=None, attrs=None, container_id=CID, container_name="/web",
           source="stdout"):
    """The msgpack record, built independently of both implementations (key order matters)."""
    out = {"container_id": container_id, "container_name": container_name, "source": source,
           "time_nano": time_nano, "line": line}
    if partial is not None:
        out["partial"] = {"id": partial[0], "ordinal": partial[1], "last": partial[2]}
    if attrs:
        out["attrs"] = attrs
    return msgpack.packb(out, use_bin_type=True)


def payloads(stream):
    return [frames[2] for frames in stream.take()]


def compiled_and_twin():
    found = available_implementations()
    if "cython" not in found:
        pytest.skip("the compiled core is not built (or ZEROLINE_NO_EXTENSIONS=1)")
    return found["cython"], found["python"]


# --- seed framing ------------------------------------------------------------------------------


def test_seed_framing_is_tenant_service_and_prefixed_line(impl):
    stream = impl.Stream(tenant="acme", service="web", container_id="abc123")
    assert stream.feed(b"hello\n\nwor", 1) == 2
    assert stream.feed(b"ld: x\n", 2) == 1
    assert stream.take() == [[b"acme", b"web", b"abc123: hello"],
                             [b"acme", b"web", b"abc123: "],
                             [b"acme", b"web", b"abc123: world: x"]]
    assert stream.take() == []


def test_seed_framing_is_the_default_and_keeps_bytes(impl):
    stream = impl.Stream(tenant=b"t\xc3\xa9", service="s\u00e9", container_id=b"c")
    assert stream.framing == "seed"
    stream.feed(b"\x00\xff\r\n", 1)
    assert stream.take() == [[b"t\xc3\xa9", b"s\xc3\xa9", b"c: \x00\xff\r"]]


def test_seed_framing_of_chunks_carries_no_metadata(impl):
    stream = impl.Stream(container_id="c", max_line_bytes=3, id_seed=1)
    stream.feed(b"abcdefg\n", 1)
    stream.close(2)
    assert payloads(stream) == [b"c: abc", b"c: def", b"c: g"]


# --- msgpack framing ---------------------------------------------------------------------------


def test_msgpack_record_fields_and_key_order(impl):
    stream = impl.Stream(framing="msgpack", tenant="t", service="s", container_id=CID,
                         container_name="/web", source="stderr", max_line_bytes=4, id_seed=3)
    stream.feed(b"hi\nabcdef\n", 1234)
    stream.feed(b"xy", 5678)
    stream.close(9999)
    frames = stream.take()
    records = [msgpack.unpackb(f[2], raw=False) for f in frames]
    assert [list(r) for r in records] == [KEYS, KEYS + ["partial"], KEYS + ["partial"],
                                          KEYS + ["partial"]]
    first, chunk1, chunk2, tail = records
    assert first == {"container_id": CID, "container_name": "/web", "source": "stderr",
                     "time_nano": 1234, "line": b"hi"}
    assert isinstance(first["line"], bytes)
    assert chunk1["line"] == b"abcd" and chunk2["line"] == b"ef"
    assert chunk1["partial"]["id"] == chunk2["partial"]["id"] != tail["partial"]["id"]
    assert [list(r["partial"]) for r in (chunk1, chunk2, tail)] == [["id", "ordinal", "last"]] * 3
    assert [(r["partial"]["ordinal"], r["partial"]["last"]) for r in (chunk1, chunk2, tail)] == [
        (1, False), (2, True), (1, True)]
    assert [r["time_nano"] for r in (chunk1, chunk2, tail)] == [1234, 1234, 9999]
    assert tail["line"] == b"xy"


def test_msgpack_attrs_only_when_not_empty(impl):
    with_attrs = impl.Stream(framing="msgpack", container_id=CID, container_name="/web",
                             attrs={"env": "prod", "k": 1}, max_line_bytes=2, id_seed=1)
    without = impl.Stream(framing="msgpack", container_id=CID, container_name="/web", attrs={})
    with_attrs.feed(b"a\nbcd\n", 7)
    without.feed(b"a\n", 7)
    full = [msgpack.unpackb(p, raw=False) for p in payloads(with_attrs)]
    assert [list(r) for r in full] == [KEYS + ["attrs"], KEYS + ["partial", "attrs"],
                                       KEYS + ["partial", "attrs"]]
    assert full[0]["attrs"] == {"env": "prod", "k": "1"}
    assert list(msgpack.unpackb(payloads(without)[0], raw=False)) == KEYS


def test_core_decode_of_msgpack_frames(impl):
    stream = impl.Stream(framing="msgpack", tenant="acme", service="api", container_id=CID,
                         container_name="/web", attrs={"a": "b"}, max_line_bytes=3, id_seed=5)
    stream.feed(b"hello\n", 42)
    frames = stream.take()
    decoded = [core.decode(f) for f in frames]
    pid = decoded[0]["partial"]["id"]
    assert decoded[1] == {"tenant": "acme", "service": "api", "framing": "msgpack",
                          "container_id": CID, "container_name": "/web", "source": "stdout",
                          "time_nano": 42, "line": b"lo",
                          "partial": {"id": pid, "ordinal": 2, "last": True},
                          "attrs": {"a": "b"}}
    assert decoded[0]["line"] == b"hel" and decoded[0]["partial"]["last"] is False


def test_msgpack_with_long_and_non_ascii_names_and_many_attrs(impl):
    attrs = {"key%02d" % i: "v" * i for i in range(20)}       # map16, str8 values
    name = "/" + "n\u00e9" * 30                                # str8 name
    stream = impl.Stream(framing="msgpack", container_id=CID, container_name=name, attrs=attrs,
                         max_line_bytes=5, id_seed=9)
    stream.feed(b"0123456789ab\n", 77)
    got = payloads(stream)
    ids = [msgpack.unpackb(p, raw=False)["partial"]["id"] for p in got]
    expected = [record(line, 77, (ids[0], i + 1, i == 2), attrs, container_name=name)
                for i, line in enumerate([b"01234", b"56789", b"ab"])]
    assert got == expected


TIMES = [0, 1, 31, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**53 + 1, 2**62, 2**63 - 1, 1_764_201_600_123_456_789]
NOT_NL = bytes(b for b in range(256) if b != 0x0A)      # every byte value but "\n"
LENGTHS = [0, 1, 31, 32, 255, 256, 65535, 65536, 70000]


@pytest.mark.parametrize("time_nano", TIMES)
def test_msgpack_time_widths_match_packb(impl, time_nano):
    stream = impl.Stream(framing="msgpack", container_id=CID, container_name="/web")
    stream.feed(b"x\n", time_nano)
    assert payloads(stream) == [record(b"x", time_nano)]


@pytest.mark.parametrize("length", LENGTHS)
def test_msgpack_line_lengths_match_packb(impl, length):
    line = (NOT_NL * (length // len(NOT_NL) + 1))[:length]
    stream = impl.Stream(framing="msgpack", container_id=CID, container_name="/web",
                         max_line_bytes=100000)
    stream.feed(line + b"\n", 5)
    assert payloads(stream) == [record(line, 5)]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("time_nano", [0, 128, 65536, 2**32, 2**62])
def test_compiled_msgpack_bytes_equal_twin_bytes(time_nano, length):
    compiled, twin = compiled_and_twin()
    line = (NOT_NL * (length // len(NOT_NL) + 1))[:length]
    out = []
    for module in (compiled, twin):
        whole = module.Stream(framing="msgpack", container_id=CID, container_name="/web",
                              attrs={"a": "1"}, max_line_bytes=100000)
        whole.feed(line + b"\n", time_nano)
        chunked = module.Stream(framing="msgpack", container_id=CID, container_name="/web",
                                max_line_bytes=300, id_seed=11)
        chunked.feed(line, time_nano)
        chunked.close(time_nano + 1)
        out.append((payloads(whole), payloads(chunked)))
    assert out[0] == out[1]
    assert out[1][0] == [record(line, time_nano, attrs={"a": "1"})]


def test_msgpack_ordinal_widths_match_packb(impl):
    # Ordinals past 127 and 255 need uint8 and uint16.
    stream = impl.Stream(framing="msgpack", container_id=CID, container_name="/web",
                         max_line_bytes=1, id_seed=4)
    stream.feed(b"q" * 300 + b"\n", 8)
    got = payloads(stream)
    assert len(got) == 301
    gid = msgpack.unpackb(got[0], raw=False)["partial"]["id"]
    expected = [record(b"q", 8, (gid, i, False)) for i in range(1, 301)]
    expected.append(record(b"", 8, (gid, 301, True)))
    assert got == expected


@pytest.mark.parametrize("time_nano, encoded", [
    (-1, b"\xff"), (-32, b"\xe0"), (-33, b"\xd0\xdf"), (-128, b"\xd0\x80"),
    (-129, b"\xd1\xff\x7f"), (-32768, b"\xd1\x80\x00"), (-32769, b"\xd2\xff\xff\x7f\xff"),
    (-2**31, b"\xd2\x80\x00\x00\x00"), (-2**31 - 1, b"\xd3\xff\xff\xff\xff\x7f\xff\xff\xff"),
])
def test_framer_encodes_negative_times_as_signed_msgpack(time_nano, encoded):
    # Streams read a negative time as "now", so negatives only reach the framer directly.
    framer = Framer("msgpack", container_id=CID, container_name="/web")
    payload = framer.payload(Message(b"ab", "stdout", time_nano, None))
    assert payload == record(b"ab", time_nano)
    assert b"\xa9time_nano" + encoded + b"\xa4line" in payload


def test_framer_payload_with_partial(impl):
    framer = Framer("msgpack", container_id=CID, container_name="/web", attrs={"x": "y"})
    partial = Partial("f" * 64, 3, True)
    payload = framer.payload(Message(b"ab", "stderr", 5, partial))
    assert payload == record(b"ab", 5, ("f" * 64, 3, True), {"x": "y"}, source="stderr")
    assert framer.frames(Message(b"", "stdout", 0, None))[:2] == [b"default", b"default"]


@pytest.mark.parametrize("time_nano", [-1, -33, -2**31 - 1])
def test_negative_time_means_now(impl, time_nano):
    stream = impl.Stream(framing="msgpack", container_id=CID)
    before = time.time_ns()
    stream.feed(b"x\n", time_nano)
    after = time.time_ns()
    (payload,) = payloads(stream)
    assert before <= msgpack.unpackb(payload)["time_nano"] <= after


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"framing": "json"}, {"framing": None}, {"tenant": 1}, {"service": None},
    {"container_id": 5}, {"source": "stdin"}, {"max_line_bytes": 0},
])
def test_bad_stream_options_are_config_errors(impl, kwargs):
    with pytest.raises(ConfigError):
        impl.Stream(**kwargs)


def test_stream_counters_and_stats(impl):
    stream = impl.Stream(max_line_bytes=4, id_seed=1)
    stream.feed(b"ab\ncdefg", 1)
    assert stream.stats() == {"lines_total": 1, "bytes_total": 8, "partial_groups_total": 1,
                              "messages_total": 2, "sent_total": 0, "dropped_total": 0,
                              "dropped_bytes_total": 0, "pending_messages": 2}
    assert (stream.pending_bytes, stream.held_bytes) == (6, 1)
    stream.close(2)
    assert (stream.lines_total, stream.messages_total, stream.pending_messages) == (2, 3, 3)
    stream.clear()
    assert (stream.pending_messages, stream.pending_bytes, stream.take()) == (0, 0, [])
    assert stream.sent_total == 0


def test_reinit_forgets_pending_messages(impl):
    stream = impl.Stream(container_id="old")
    stream.feed(b"a\n", 1)
    stream.__init__(container_id="new")
    assert stream.pending_messages == 0
    assert stream.take() == []


@pytest.mark.parametrize("time_nano", [2**63, 2**64 - 1])
def test_times_past_int64_behave_the_same_in_both(time_nano):
    compiled, twin = compiled_and_twin()

    def outcome(module):
        stream = module.Stream(framing="msgpack")
        try:
            stream.feed(b"x\n", time_nano)
        except Exception as exc:            # noqa: BLE001 - the class is what is compared
            return type(exc)
        return payloads(stream)

    assert outcome(compiled) == outcome(twin)


def test_feed_after_close_raises(impl):
    stream = impl.Stream()
    stream.close(1)
    with pytest.raises(ValueError):
        stream.feed(b"x\n", 2)


# --- Docker's non-blocking ring buffer (max_pending_bytes) --------------------------------------


def test_ring_drops_the_incoming_message_when_full(impl):
    stream = impl.Stream(max_pending_bytes=10)
    assert stream.feed(b"aaaa\nbbbb\ncc\nd\n\neeeeeeeeeeee\n", 1) == 4
    assert [p[2:] for p in payloads(stream)] == [b"aaaa", b"bbbb", b"cc", b""]
    assert (stream.dropped_total, stream.dropped_bytes_total) == (2, 13)
    assert stream.messages_total == 4


def test_ring_accepts_an_oversized_message_when_empty(impl):
    stream = impl.Stream(max_pending_bytes=3)
    assert stream.feed(b"abcdefgh\n", 1) == 1
    assert stream.pending_bytes == 8
    assert stream.feed(b"x\n", 2) == 0
    assert (stream.dropped_total, stream.dropped_bytes_total) == (1, 1)
    assert [p[2:] for p in payloads(stream)] == [b"abcdefgh"]
    assert stream.feed(b"yz\nw\nuv\n", 3) == 2              # room again after take()
    assert [p[2:] for p in payloads(stream)] == [b"yz", b"w"]
    assert (stream.dropped_total, stream.dropped_bytes_total) == (2, 3)


def test_ring_of_zero_bytes_holds_one_message_at_a_time(impl):
    stream = impl.Stream(max_pending_bytes=0)
    assert stream.feed(b"a\nb\nc\n", 1) == 1
    assert (stream.dropped_total, stream.dropped_bytes_total, stream.pending_bytes) == (2, 2, 1)


def test_ring_counts_dropped_partial_chunks(impl):
    stream = impl.Stream(max_pending_bytes=5, max_line_bytes=4, id_seed=2)
    stream.feed(b"abcdefghij\n", 1)                         # chunks of 4, 4, 2
    assert stream.pending_messages == 1
    assert (stream.dropped_total, stream.dropped_bytes_total) == (2, 6)
    assert stream.partial_groups_total == 1 and stream.lines_total == 1


def test_no_limit_by_default(impl):
    stream = impl.Stream()
    assert stream.max_pending_bytes == -1
    assert stream.feed(b"x" * 1000 + b"\n" + b"y\n" * 5000, 1) == 5001
    assert stream.dropped_total == 0


# --- core.decode -------------------------------------------------------------------------------


def test_core_decode_of_seed_frames(impl):
    stream = impl.Stream(tenant="t", service="s", container_id="abc")
    stream.feed(b"k: v\n\n", 1)
    assert [core.decode(f) for f in stream.take()] == [
        {"tenant": "t", "service": "s", "framing": "seed", "container_id": "abc", "line": b"k: v"},
        {"tenant": "t", "service": "s", "framing": "seed", "container_id": "abc", "line": b""},
    ]


def test_core_decode_accepts_memoryview_frames():
    frames = [memoryview(b"t"), bytearray(b"s"), b"c: x"]
    assert core.decode(frames)["line"] == b"x"


@pytest.mark.parametrize("frames", [
    [b"t", b"s"],
    [b"t", b"s", b"c: x", b"extra"],
    [],
    [b"t", b"s", b"no separator"],
    [b"t", b"s", b"\x85\xaccontainer_id\xa1c\xae"],                        # truncated record
    [b"t", b"s", record(b"x", 1) + b"\x00"],                                # trailing bytes
    [b"t", b"s", b"\x85\xaccontainer_id\xa1c\xaecontainer_name\xa0\xa6source\xa6stdout"
                 b"\xa9time_nano\x00\xa4line\xa1x"],                         # line is str
])
def test_core_decode_rejects_malformed_messages(frames):
    with pytest.raises(ProtocolError):
        core.decode(frames)
