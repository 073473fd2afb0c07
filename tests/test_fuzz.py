"""Property-based fuzzing of everything that takes bytes or JSON from outside: the FIFO's LogEntry
frames, received payloads, the collector's render path, the log-opt validator and the plugin's
request bodies. Random input may be refused, counted or skipped, never crash or traceback; where two
implementations exist they must agree."""

import asyncio
import json
import os
import shutil
import struct
import tempfile

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroline import _core_py, _logentry_py, core, docker_plugin
from zeroline.config import OPTIONS, validate_log_opts
from zeroline.errors import ConfigError, ProtocolError

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def entry_stream_class(impl):
    # The twin's EntryStream lives beside the LogEntry decoder, in _logentry_py.
    return getattr(impl, "EntryStream", _logentry_py.EntryStream)


# ---------------------------------------------------------------------------------------------
# LogEntry frames from the daemon's FIFO

def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(tag, payload):
    return _varint(tag) + _varint(len(payload)) + payload


# proto3 strings (source, partial id) should be UTF-8; a peer may still send any bytes.
_STRING_BYTES = st.one_of(st.text(max_size=4).map(str.encode), st.binary(max_size=6))

_FIELDS = st.one_of(
    _STRING_BYTES.map(lambda b: _field(0x0A, b)),                             # source
    st.integers(0, 2**64 - 1).map(lambda v: b"\x10" + _varint(v)),            # time_nano
    st.binary(max_size=40).map(lambda b: _field(0x1A, b)),                    # line
    st.integers(0, 3).map(lambda v: b"\x20" + _varint(v)),                    # partial
    st.tuples(st.booleans(), st.one_of(st.text(max_size=70).map(str.encode), _STRING_BYTES),
              st.integers(0, 2**32)).map(
        lambda m: _field(0x2A, b"\x08" + _varint(m[0]) + _field(0x12, m[1])
                         + b"\x18" + _varint(m[2]))),                          # metadata
    st.binary(max_size=6),                                                     # anything
)
_ENTRIES = st.lists(_FIELDS, max_size=6).map(b"".join)


@st.composite
def fifo_bytes(draw):
    """A FIFO's content: mostly length-prefixed entries (some a little wrong), now and then a
    length over the limit or raw garbage."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["entry", "entry", "entry", "badlen", "garbage"]))
        if kind == "entry":
            entry = draw(_ENTRIES)
            out += struct.pack(">I", len(entry)) + entry
        elif kind == "badlen":
            out += struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + draw(st.binary(max_size=8))
        else:
            out += draw(st.binary(max_size=12))
    return bytes(out)


def _splits(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def _run_entry_stream(cls, pieces):
    stream = cls(framing="msgpack", tenant="t", service="s", container_id="c" * 12,
                 max_entry_bytes=200, keep_local=True)
    local = b""
    for piece in pieces:
        stream.feed(piece)
        local += stream.take_local()
    stream.close()
    return stream.take(), local, stream.stats(), stream.corrupt


@FUZZ
@given(data=fifo_bytes(), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_entry_frames_never_crash_and_both_implementations_agree(impl, data, cuts):
    got = _run_entry_stream(entry_stream_class(impl), _splits(data, cuts))
    reference = _run_entry_stream(_logentry_py.EntryStream, [data])
    # Where the reads were cut never matters, and the compiled core is the twin, byte for byte.
    assert got == reference
    messages, _, stats, corrupt = got
    assert stats["entries_total"] == len(messages)
    if not corrupt:
        assert stats["oversized_total"] == 0 and stats["discarded_bytes_total"] == 0
    else:
        assert stats["oversized_total"] == 1


@pytest.mark.parametrize("entry", [_field(0x0A, b"\x80") + _field(0x1A, b"x"),
                                   _field(0x2A, b"\x08\x01" + _field(0x12, b"\xff") + b"\x18\x01")],
                         ids=["source", "partial id"])
def test_invalid_utf8_strings_are_framed_as_the_twin_frames_them(impl, entry):
    data = struct.pack(">I", len(entry)) + entry
    got = _run_entry_stream(entry_stream_class(impl), [data])
    assert got == _run_entry_stream(_logentry_py.EntryStream, [data])
    record = msgpack.unpackb(got[0][0][2], raw=False)     # a str every msgpack decoder takes
    assert "\ufffd" in record["source"] + record.get("partial", {}).get("id", "")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=12),
                     st.lists(st.sampled_from([b"\xe0", b"\xed", b"\xf0", b"\xf4", b"\xc2",
                                               b"\x80", b"\x9f", b"\xa0", b"\xbf", b"\x90",
                                               b"\x8f", b"\xc0", b"\xf5", b"a"]),
                              max_size=8).map(b"".join)))
def test_ill_formed_utf8_becomes_u_fffd_exactly_as_python_decodes_it(impl, raw):
    # Both a source and a partial id, framed, carry raw.decode("utf-8", "replace").
    entry = _field(0x0A, raw) + _field(0x1A, b"x") + \
        _field(0x2A, b"\x08\x01" + _field(0x12, raw) + b"\x18\x01")
    messages, _, _, _ = _run_entry_stream(entry_stream_class(impl),
                                          [struct.pack(">I", len(entry)) + entry])
    record = msgpack.unpackb(messages[0][2], raw=False)
    want = raw.decode("utf-8", "replace")
    assert record["source"] == want and record["partial"]["id"] == want


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1000), max_size=4))
def test_random_bytes_on_the_fifo_are_counted_not_raised(impl, data, cuts):
    messages, _, stats, _ = _run_entry_stream(entry_stream_class(impl), _splits(data, cuts))
    rejected = (stats["malformed_total"] + stats["oversized_total"] + stats["truncated_total"])
    assert stats["entries_total"] == len(messages)
    assert rejected > 0 or stats["entries_total"] > 0 or data == b""


# ---------------------------------------------------------------------------------------------
# Received payloads

_RECORD_HEAD = b"\xaccontainer_id"
_MSGPACK_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
              st.text(max_size=10), st.binary(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@st.composite
def payloads(draw):
    kind = draw(st.sampled_from(["raw", "seed", "record", "head"]))
    if kind == "raw":
        return draw(st.binary(max_size=80))
    if kind == "seed":
        return draw(st.binary(max_size=20)) + b": " + draw(st.binary(max_size=20))
    if kind == "head":
        # Past the framing check into the msgpack decoder with whatever follows.
        return draw(st.sampled_from([b"\x85", b"\x86", b"\x87"])) + _RECORD_HEAD \
            + draw(st.binary(max_size=60))
    keys = ["container_id"] + draw(st.lists(st.sampled_from(
        ["container_name", "source", "time_nano", "line", "partial", "attrs", "x"]),
        min_size=4, max_size=6, unique=True))
    record = {key: draw(_MSGPACK_VALUES) for key in keys}
    if draw(st.booleans()):
        record["line"] = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        record["partial"] = draw(st.fixed_dictionaries(
            {"id": st.one_of(st.text(max_size=4), st.integers(-2**63, 2**64 - 1)),
             "ordinal": st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=2)),
             "last": st.one_of(st.booleans(), st.integers(0, 1))}))
    packed = msgpack.packb(record)
    return packed[:draw(st.integers(14, len(packed)))] if draw(st.booleans()) else packed


@FUZZ
@given(payload=payloads(), tenant=st.binary(max_size=8))
def test_decoding_a_payload_raises_only_protocol_error(payload, tenant):
    try:
        framing, record = _core_py.decode_payload(payload)
    except ProtocolError as exc:
        assert exc.reason in _core_py.MALFORMED_REASONS
    else:
        assert framing in ("seed", "msgpack")
        if framing == "msgpack":
            assert isinstance(record["line"], bytes)
    try:
        decoded = core.decode([tenant, b"svc", payload])
    except ProtocolError:
        pass
    else:
        assert decoded["service"] == "svc" and isinstance(decoded["line"], bytes)


@FUZZ
@given(frames=st.lists(st.binary(max_size=20), max_size=5))
def test_decode_of_any_frame_count_raises_only_protocol_error(frames):
    try:
        core.decode(frames)
    except ProtocolError:
        pass


def _rendered(impl, batches):
    receiver = impl.Receiver(max_frame_bytes=1 << 16)
    for tenant, service, records in batches:
        body = b"".join(struct.pack(">I", len(r)) + r for r in records)
        receiver.add_batch(tenant, service, body)
    return receiver.take_rendered(), receiver.malformed_reasons, receiver.messages_total


@FUZZ
@given(batches=st.lists(st.tuples(st.sampled_from([b"a", b"b"]), st.sampled_from([b"s", b""]),
                                  st.lists(payloads(), min_size=1, max_size=5)), max_size=4))
def test_take_rendered_counts_what_it_cannot_render_and_both_agree(impl, batches):
    got = _rendered(impl, batches)
    assert got == _rendered(_core_py, batches)
    _, reasons, total = got
    payloads_in = [p for _, _, records in batches for p in records]
    assert total == len(payloads_in)
    bad = 0
    for payload in payloads_in:
        try:
            _core_py.decode_payload(payload)
        except ProtocolError:
            bad += 1
    assert sum(reasons.values()) == bad


# ---------------------------------------------------------------------------------------------
# The log-opt validator

_OPT_KEYS = st.one_of(st.sampled_from(sorted(OPTIONS)), st.text(max_size=12))
_OPT_VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e9", "16384", "1m", "5s", "nan", "inf", "true", "push",
                     "pub", "acked", "msgpack", "non-blocking", "tcp://h:1", "ipc://", "\0",
                     "tcp://[::1]:99999", "inproc://x", "9" * 30, "1.5k", "0x10"]),
)


@FUZZ
@given(opts=st.dictionaries(_OPT_KEYS, _OPT_VALUES, max_size=6), require=st.booleans())
def test_log_opt_validator_raises_only_config_error(opts, require):
    try:
        validate_log_opts(opts, require_address=require)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------
# The plugin's JSON bodies

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_STRINGS = st.lists(st.text(max_size=8), max_size=3)


def _info(endpoint):
    known = {
        "ContainerID": st.one_of(st.text(max_size=70), _JSON),
        "ContainerName": st.one_of(st.text(max_size=10), _JSON),
        "ContainerEnv": st.one_of(st.none(), _STRINGS, st.just(["TENANT_ID=\u00e9", "X"]), _JSON),
        "ContainerLabels": st.one_of(st.none(), st.dictionaries(st.text(max_size=4),
                                                                st.text(max_size=4)), _JSON),
        "ContainerArgs": st.one_of(st.none(), _STRINGS, _JSON),
        "ContainerCreated": st.one_of(st.text(max_size=30), _JSON),
        "Config": st.one_of(
            st.none(), _JSON,
            st.dictionaries(_OPT_KEYS, _OPT_VALUES, max_size=3),
            st.fixed_dictionaries({"zmq-address": st.just(endpoint),
                                   "zmq-socket": st.just("push")},
                                  optional={"cache-max-file": _OPT_VALUES,
                                            "cache-disabled": _OPT_VALUES})),
    }
    return st.one_of(_JSON, st.fixed_dictionaries({}, optional=known))


def _bodies(work, endpoint):
    missing = os.path.join(work, "no-such-fifo")
    files = st.one_of(st.just(missing), st.just(work), st.text(max_size=10), _JSON)
    read_config = st.one_of(_JSON, st.fixed_dictionaries({}, optional={
        "Since": st.one_of(st.text(max_size=30), st.just("2026-01-01T00:00:00.5+02:00"), _JSON),
        "Until": st.one_of(st.text(max_size=30), _JSON),
        "Tail": st.one_of(st.integers(-2**70, 2**70), _JSON),
        "Follow": st.one_of(st.booleans(), _JSON)}))
    return st.one_of(
        _JSON,
        st.fixed_dictionaries({}, optional={"File": files, "Info": _info(endpoint)}),
        st.fixed_dictionaries({}, optional={"Info": _info(endpoint), "Config": read_config}),
    )


def test_plugin_answers_random_bodies_without_a_500():
    work = tempfile.mkdtemp(prefix="zlf")
    loop = asyncio.new_event_loop()
    from aiohttp.test_utils import TestClient, TestServer

    plugin = docker_plugin.Plugin(os.path.join(work, "state"))
    app = docker_plugin.make_app(plugin)
    client = TestClient(TestServer(app), loop=loop)
    loop.run_until_complete(client.start_server())
    methods = ["/Plugin.Activate", "/LogDriver.Capabilities", "/LogDriver.StartLogging",
               "/LogDriver.StopLogging", "/LogDriver.ReadLogs"]

    async def post(method, data):
        response = await client.post(method, data=data)
        await response.read()
        return response.status

    @FUZZ
    @given(method=st.sampled_from(methods), body=_bodies(work, "ipc://%s/c.ipc" % work),
           raw=st.one_of(st.none(), st.binary(max_size=30)))
    def check(method, body, raw):
        data = raw if raw is not None else json.dumps(body).encode() + b"\n"
        status = loop.run_until_complete(asyncio.wait_for(post(method, data), 30))
        assert status in (200, 400), (status, method, data[:200])
        assert app[docker_plugin.INTERNAL_ERRORS] == []

    try:
        check()
        assert not plugin.instances
    finally:
        loop.run_until_complete(plugin.close())
        loop.run_until_complete(client.close())
        loop.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("depth", [9, 500, 100_000])
def test_deep_nesting_is_refused_by_the_checks(depth):
    body = {"File": "/x", "Info": {"ContainerID": "c", "Extra": []}}
    inner = body["Info"]["Extra"]
    for _ in range(min(depth, 900)):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ProtocolError, match="nested deeper than"):
        docker_plugin.check_start_logging(body)


# ---------------------------------------------------------------------------------------------
# The acked transport's batch codec: bodies, batch messages and acks from outside

def _body(records):
    return b"".join(struct.pack(">I", len(r)) + r for r in records)


_BODIES = st.one_of(
    st.binary(max_size=200),                                                   # anything
    st.lists(st.binary(max_size=40), min_size=1, max_size=6).map(_body),       # well formed
    st.tuples(st.lists(st.binary(max_size=40), min_size=1, max_size=6),
              st.binary(min_size=1, max_size=6)).map(lambda t: _body(t[0]) + t[1]),  # trailing
    st.tuples(st.lists(st.binary(max_size=40), min_size=1, max_size=6),
              st.integers(1, 20)).map(lambda t: _body(t[0])[:-t[1]]),          # cut short
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n) + b"x" * 8),  # huge length
)


def _add_batch(module, tenant, service, body, limit):
    receiver = module.Receiver(max_frame_bytes=limit)
    try:
        count = receiver.add_batch(tenant, service, body)
    except ProtocolError as exc:
        assert exc.reason == "batch" and str(exc) and receiver.pending_messages == 0
        return ("refused", str(exc), receiver.messages_total)
    return ("added", count, [list(map(bytes, m)) for m in receiver.take()],
            receiver.messages_total, receiver.bytes_total)


@FUZZ
@given(tenant=st.binary(max_size=12), service=st.binary(max_size=12), body=_BODIES,
       limit=st.sampled_from([0, 4, 16, 64 * 1024 * 1024]))
def test_add_batch_raises_only_protocol_error_and_both_agree(impl, tenant, service, body, limit):
    got = _add_batch(impl, tenant, service, body, limit)
    assert got == _add_batch(_core_py, tenant, service, body, limit)
    # The twin's add_batch is split_batch plus the destination check: the same verdict.
    try:
        records = _core_py.split_batch(body, limit)
        if len(tenant) > limit or len(service) > limit:
            records = None
    except ProtocolError as exc:
        assert exc.reason == "batch"
        records = None
    if records is None:
        assert got[0] == "refused"
    else:
        assert got[0] == "added" and got[2] == [[tenant, service, r] for r in records]


_FRAME = st.one_of(st.binary(max_size=20), st.sampled_from(
    [_core_py.BATCH_KIND, _core_py.ACK_KIND, b"", b"\0" * 8, b"\0" * 7 + b"\1", b"s" * 255,
     b"s" * 256]))


@FUZZ
@given(frames=st.lists(_FRAME, max_size=8))
def test_batch_and_ack_decoders_raise_only_protocol_error(frames):
    for decode, reason in ((_core_py.decode_batch_message, "batch"),
                           (_core_py.decode_ack, "ack")):
        try:
            decoded = decode(frames)
        except ProtocolError as exc:
            assert exc.reason == reason and str(exc) and "\n" not in str(exc)
            continue
        # What decodes encodes back to the same frames.
        if reason == "batch":
            assert _core_py.encode_batch_message(*decoded) == [bytes(f) for f in frames]
        else:
            assert _core_py.encode_ack(*decoded) == [bytes(f) for f in frames]


@FUZZ
@given(body=st.binary(max_size=300), limit=st.one_of(st.none(), st.integers(0, 64)))
def test_split_batch_on_random_bytes_raises_only_protocol_error(body, limit):
    try:
        records = _core_py.split_batch(body, limit)
    except ProtocolError as exc:
        assert exc.reason == "batch"
        return
    assert records and _body(records) == body
    assert limit is None or all(len(r) <= limit for r in records)
