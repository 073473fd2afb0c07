"""Property tests: compiled core and twin agree byte for byte; chunking never matters."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import available_implementations

IMPLS = available_implementations()
COMPILED = IMPLS.get("cython")
TWIN = IMPLS["python"]

needs_compiled = pytest.mark.skipif(
    COMPILED is None, reason="the compiled core is not built (or ZEROLINE_NO_EXTENSIONS=1)")
each_impl = pytest.mark.parametrize("name", sorted(IMPLS))

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Byte soup biased toward what makes cutting interesting: many newlines, \r, NUL, long runs.
pieces = st.one_of(
    st.sampled_from([b"\n", b"\n", b"\n\n", b"\r", b"\r\n", b"\x00", b"a", b"\xff\xfe"]),
    st.builds(lambda c, n: c * n, st.sampled_from([b"x", b"\x00", b"\r", b"\n"]),
              st.integers(1, 150)),
    st.binary(max_size=40),
)
payload_bytes = st.lists(pieces, max_size=40).map(b"".join)
limits = st.integers(1, 64)
seeds = st.integers(0, 2**64 - 1)
times = st.one_of(st.integers(0, 300), st.integers(0, 2**63 - 1))


@st.composite
def feeds(draw, constant_time=False):
    """(data, [(piece, time_nano), ...], close_time): data cut at random points."""
    data = draw(payload_bytes)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0] + cuts + [len(data)]
    t = draw(times)
    out = []
    for start, end in zip(bounds, bounds[1:]):
        out.append((data[start:end], t if constant_time else draw(times)))
    return data, out, (t if constant_time else draw(times))


def run_cutter(module, chunks, close_time, limit, seed, source="stdout"):
    cutter = module.LineCutter(source, limit, seed)
    fed = []
    for piece, t in chunks:
        fed += cutter.feed(piece, t)
    closed = cutter.close(close_time)
    return fed, closed, (cutter.lines_total, cutter.bytes_total, cutter.partial_groups_total,
                         cutter.held_bytes)


def run_stream(module, chunks, close_time, limit, seed, framing, max_pending=-1):
    stream = module.Stream("stderr", framing=framing, tenant="t", service="s",
                           container_id="c0ffee", container_name="/app",
                           attrs={"k": "v"} if seed % 2 else None, max_line_bytes=limit,
                           id_seed=seed, max_pending_bytes=max_pending)
    queued = [stream.feed(piece, t) for piece, t in chunks]
    middle = stream.take()
    queued.append(stream.close(close_time))
    return queued, middle, stream.take(), stream.stats()


def reassemble(fed, closed):
    """The input back from cut messages: chunks of a group joined, "\\n" after complete lines.

    The close() rule: what close() emits was never followed by a newline in the input.
    """
    out = []
    for m in fed:
        out.append(m.line)
        if m.partial is None or m.partial.last:
            out.append(b"\n")
    out.extend(m.line for m in closed)
    return b"".join(out)


# --- compiled == twin --------------------------------------------------------------------------


@needs_compiled
@SETTINGS
@given(feeds(), limits, seeds)
def test_cutter_compiled_equals_twin(case, limit, seed):
    _, chunks, close_time = case
    assert run_cutter(COMPILED, chunks, close_time, limit, seed) == \
        run_cutter(TWIN, chunks, close_time, limit, seed)


@needs_compiled
@SETTINGS
@given(feeds(), limits, seeds, st.sampled_from(["seed", "msgpack"]),
       st.one_of(st.just(-1), st.integers(0, 100)))
def test_stream_compiled_equals_twin(case, limit, seed, framing, max_pending):
    _, chunks, close_time = case
    assert run_stream(COMPILED, chunks, close_time, limit, seed, framing, max_pending) == \
        run_stream(TWIN, chunks, close_time, limit, seed, framing, max_pending)


# --- properties of each implementation ---------------------------------------------------------


@each_impl
@SETTINGS
@given(case=feeds(constant_time=True), limit=limits, seed=seeds)
def test_chunking_never_changes_the_messages(name, case, limit, seed):
    data, chunks, close_time = case
    t = chunks[0][1]
    whole = run_cutter(IMPLS[name], [(data, t)], close_time, limit, seed)
    assert run_cutter(IMPLS[name], chunks, close_time, limit, seed) == whole


@each_impl
@SETTINGS
@given(case=feeds(constant_time=True), limit=limits, seed=seeds,
       framing=st.sampled_from(["seed", "msgpack"]))
def test_chunking_never_changes_the_frames(name, case, limit, seed, framing):
    data, chunks, close_time = case
    t = chunks[0][1]
    _, middle, tail, stats = run_stream(IMPLS[name], chunks, close_time, limit, seed, framing)
    _, whole_middle, whole_tail, whole_stats = run_stream(
        IMPLS[name], [(data, t)], close_time, limit, seed, framing)
    assert (middle + tail, stats) == (whole_middle + whole_tail, whole_stats)


@each_impl
@SETTINGS
@given(case=feeds(), limit=limits, seed=seeds)
def test_reassembled_messages_give_back_the_input(name, case, limit, seed):
    data, chunks, close_time = case
    fed, closed, (lines, size, groups, held) = run_cutter(IMPLS[name], chunks, close_time,
                                                          limit, seed)
    assert reassemble(fed, closed) == data
    assert (size, held) == (len(data), 0)
    assert lines == data.count(b"\n") + (1 if closed else 0)
    assert len(closed) <= 1 and all(m.partial.last for m in closed)
    # Group structure: a chunk that is not last is exactly one full buffer; ordinals count up
    # from 1 inside one id; a group keeps its first chunk's time.
    open_group = None
    seen_ids = set()
    expected_ordinal = 1
    for m in fed + closed:
        assert len(m.line) <= limit
        if m.partial is None:
            assert open_group is None and b"\n" not in m.line
            continue
        if open_group is None:
            assert m.partial.ordinal == 1 and m.partial.id not in seen_ids
            open_group = m
            seen_ids.add(m.partial.id)
        else:
            assert m.partial.id == open_group.partial.id
            assert m.partial.ordinal == expected_ordinal
            assert m.time_nano == open_group.time_nano
        expected_ordinal = m.partial.ordinal + 1
        if m.partial.last:
            open_group = None
        else:
            assert len(m.line) == limit
    assert open_group is None
    assert groups == len(seen_ids)
