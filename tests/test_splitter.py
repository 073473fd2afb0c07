"""LineCutter on both implementations: Docker's copier table, partial ids, counters, errors."""

import re

import pytest

from zeroline import core
from zeroline.errors import ConfigError

from conftest import NO_EXTENSIONS, REQUIRE_EXTENSIONS, available_implementations

B = 16384
ID_RE = re.compile(r"[0-9a-f]{64}\Z")
MASK64 = (1 << 64) - 1


def cut(impl, pieces, close=True, **kwargs):
    """Feeds ``pieces`` (bytes, or (bytes, time_nano)) and optionally closes; returns messages."""
    kwargs.setdefault("id_seed", 7)
    cutter = impl.LineCutter(**kwargs)
    out = []
    for i, piece in enumerate(pieces):
        data, t = piece if isinstance(piece, tuple) else (piece, 1000 + i)
        out += cutter.feed(data, t)
    if close:
        out += cutter.close(9999)
    return out


def shape(messages):
    """(line, ordinal, last) per message; ordinal/last are None without partial metadata."""
    return [(m.line, *((m.partial.ordinal, m.partial.last) if m.partial else (None, None)))
            for m in messages]


def splitmix_ids(seed):
    """Reference seeded ids: splitmix64 words, little-endian, hex, all-digit short ids skipped."""
    state = seed & MASK64
    while True:
        raw = b""
        for _ in range(4):
            state = (state + 0x9E3779B97F4A7C15) & MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            raw += (z ^ (z >> 31)).to_bytes(8, "little")
        text = raw.hex()
        if not text[:12].isdigit():
            yield text


# --- the dispatcher ---------------------------------------------------------------------------


def test_dispatcher_picks_the_expected_implementation():
    if NO_EXTENSIONS:
        expected = "python"
    elif REQUIRE_EXTENSIONS:
        expected = "cython"      # CI: a missing extension must be an error, never the twin
    else:
        expected = "cython" if "cython" in core.implementations() else "python"
    assert core.IMPLEMENTATION == expected


# --- Docker's table (docs/docker-logging.md §1), B = 16384 ------------------------------------


def test_short_line_has_no_metadata(impl):
    assert shape(cut(impl, [b"abc\n"])) == [(b"abc", None, None)]


def test_empty_line_is_a_message_without_metadata(impl):
    assert shape(cut(impl, [b"\n"])) == [(b"", None, None)]


def test_long_line_becomes_partials(impl):
    messages = cut(impl, [b"a" * (3 * B) + b"tail\n"])
    assert shape(messages) == [(b"a" * B, 1, False), (b"a" * B, 2, False), (b"a" * B, 3, False),
                               (b"tail", 4, True)]


def test_line_of_exactly_the_buffer_size_ends_with_an_empty_last_chunk(impl):
    messages = cut(impl, [b"a" * B + b"\n"])
    assert shape(messages) == [(b"a" * B, 1, False), (b"", 2, True)]


def test_unterminated_text_at_close_is_one_closed_group(impl):
    # Docker sends Last=false and leaves the group open; zeroline closes it (our improvement).
    messages = cut(impl, [b"abc"])
    assert shape(messages) == [(b"abc", 1, True)]
    assert messages[0].time_nano == 9999          # the group opened at close


def test_long_unterminated_text_at_close(impl):
    messages = cut(impl, [b"a" * 20000])
    assert shape(messages) == [(b"a" * B, 1, False), (b"a" * (20000 - B), 2, True)]


def test_full_buffer_at_close_adds_an_empty_last_chunk(impl):
    messages = cut(impl, [b"a" * B])
    assert shape(messages) == [(b"a" * B, 1, False), (b"", 2, True)]


def test_buffer_fills_across_feeds(impl):
    # The copier buffer counts held bytes: 10000 + 6384 fill it, whatever the read sizes were.
    messages = cut(impl, [(b"a" * 10000, 1), (b"b" * 10000 + b"\n", 2)])
    assert shape(messages) == [(b"a" * 10000 + b"b" * 6384, 1, False), (b"b" * 3616, 2, True)]
    assert [m.time_nano for m in messages] == [2, 2]


def test_nothing_held_means_nothing_at_close(impl):
    cutter = impl.LineCutter(id_seed=1)
    assert cutter.feed(b"abc\n", 5) != []
    assert cutter.close(6) == []
    assert impl.LineCutter().close(6) == []


def test_close_twice_returns_nothing_the_second_time(impl):
    cutter = impl.LineCutter(id_seed=1)
    cutter.feed(b"abc", 5)
    assert len(cutter.close(6)) == 1
    assert cutter.close(7) == []


# --- partial metadata ------------------------------------------------------------------------


def test_group_id_is_64_lowercase_hex_not_all_digit_prefix(impl):
    cutter = impl.LineCutter(max_line_bytes=2)          # random ids
    ids = set()
    for i in range(300):
        for m in cutter.feed(b"abcd\n", i + 1):
            assert m.partial is not None
            assert ID_RE.match(m.partial.id), m.partial.id
            assert not m.partial.id[:12].isdigit()
            ids.add(m.partial.id)
    assert len(ids) == 300                              # random ids differ between groups


def test_seeded_ids_follow_splitmix64_and_skip_all_digit_short_ids(impl):
    # With seed 84 the first 32 drawn bytes give "420326324762…": 12 digits, so it is drawn again.
    cutter = impl.LineCutter(max_line_bytes=1, id_seed=84)
    ids = [cutter.feed(b"xy\n", 1)[0].partial.id for _ in range(5)]
    reference = splitmix_ids(84)
    assert ids == [next(reference) for _ in range(5)]
    assert not ids[0].startswith("420326324762")


def test_seeded_ids_are_reproducible(impl):
    first = cut(impl, [b"a" * 40 + b"\n"] * 3, max_line_bytes=16, id_seed=123)
    again = cut(impl, [b"a" * 40 + b"\n"] * 3, max_line_bytes=16, id_seed=123)
    other = cut(impl, [b"a" * 40 + b"\n"] * 3, max_line_bytes=16, id_seed=124)
    assert [m.partial.id for m in first] == [m.partial.id for m in again]
    assert {m.partial.id for m in first}.isdisjoint({m.partial.id for m in other})


def test_seeded_ids_are_the_same_in_both_implementations():
    found = available_implementations()
    if "cython" not in found:
        pytest.skip("the compiled core is not built (or ZEROLINE_NO_EXTENSIONS=1)")
    data = [(b"b" * 50 + b"\nxyz" + b"c" * 7, 10), (b"\n" + b"d" * 33, 20)]
    compiled = cut(found["cython"], data, max_line_bytes=8, id_seed=2**64 - 5)
    twin = cut(found["python"], data, max_line_bytes=8, id_seed=2**64 - 5)
    assert compiled == twin
    assert len({m.partial.id for m in twin if m.partial}) == 3


def test_chunks_share_the_group_id_and_the_first_chunk_timestamp(impl):
    messages = cut(impl, [(b"a" * B, 100), (b"a" * B, 200), (b"tail\nnext\n", 300)])
    chunks, after = messages[:3], messages[3]
    assert shape(chunks) == [(b"a" * B, 1, False), (b"a" * B, 2, False), (b"tail", 3, True)]
    assert len({m.partial.id for m in chunks}) == 1
    assert [m.time_nano for m in chunks] == [100, 100, 100]
    assert (after.line, after.time_nano, after.partial) == (b"next", 300, None)


def test_a_new_group_gets_a_new_id_and_restarts_ordinals(impl):
    messages = cut(impl, [b"aaaaa\nbbbbbb\n"], max_line_bytes=4)
    assert shape(messages) == [(b"aaaa", 1, False), (b"a", 2, True),
                               (b"bbbb", 1, False), (b"bb", 2, True)]
    assert messages[0].partial.id == messages[1].partial.id != messages[2].partial.id


def test_every_message_carries_the_source(impl):
    messages = cut(impl, [b"x\n" + b"y" * 5], source="stderr", max_line_bytes=4)
    assert [m.source for m in messages] == ["stderr"] * 3


# --- bytes pass through ------------------------------------------------------------------------


def test_carriage_return_stays_in_the_line(impl):
    assert shape(cut(impl, [b"abc\r\n\r\n"])) == [(b"abc\r", None, None), (b"\r", None, None)]


def test_nul_and_invalid_utf8_pass_unchanged(impl):
    data = b"\x00a\x00\xff\xfe\xc3\x28\x80 \xed\xa0\x80"
    assert shape(cut(impl, [data + b"\n", data])) == [(data, None, None), (data, 1, True)]


def test_line_split_across_feeds_is_one_line(impl):
    messages = cut(impl, [(b"hel", 1), (b"", 2), (b"lo\nwor", 3), (b"ld\n", 4)])
    assert [(m.line, m.time_nano, m.partial) for m in messages] == [
        (b"hello", 3, None), (b"world", 4, None)]


def test_bytearray_and_memoryview_input(impl):
    cutter = impl.LineCutter()
    out = cutter.feed(bytearray(b"ab\n"), 1) + cutter.feed(memoryview(b"xcd\n")[1:], 2)
    assert [m.line for m in out] == [b"ab", b"cd"]


def test_default_time_is_now(impl):
    import time

    before = time.time_ns()
    (message,) = impl.LineCutter().feed(b"x\n")
    after = time.time_ns()
    assert before <= message.time_nano <= after


# --- counters --------------------------------------------------------------------------------


def test_counters(impl):
    cutter = impl.LineCutter(max_line_bytes=4, id_seed=1)
    assert (cutter.lines_total, cutter.bytes_total, cutter.partial_groups_total) == (0, 0, 0)
    cutter.feed(b"ab\ncdefgh", 1)        # "ab"; chunk "cdef" opens group 1, "gh" held
    assert (cutter.lines_total, cutter.bytes_total, cutter.partial_groups_total) == (1, 9, 1)
    assert cutter.held_bytes == 2
    cutter.feed(b"\n\nxyz", 2)           # "gh" closes group 1, "" line, "xyz" held
    assert (cutter.lines_total, cutter.bytes_total, cutter.partial_groups_total) == (3, 14, 1)
    cutter.close(3)                      # "xyz" is group 2, closed
    assert (cutter.lines_total, cutter.bytes_total, cutter.partial_groups_total) == (4, 14, 2)
    assert cutter.held_bytes == 0


# --- errors ----------------------------------------------------------------------------------


def test_feed_after_close_raises(impl):
    cutter = impl.LineCutter()
    cutter.close()
    with pytest.raises(ValueError):
        cutter.feed(b"abc\n", 1)


@pytest.mark.parametrize("source", ["stdin", "", None, b"stdout", "STDOUT"])
def test_bad_source_is_a_config_error(impl, source):
    with pytest.raises(ConfigError, match="source"):
        impl.LineCutter(source)


@pytest.mark.parametrize("limit", [0, -1, "16384", 1.5, None])
def test_bad_max_line_bytes_is_a_config_error(impl, limit):
    with pytest.raises(ConfigError, match="max_line_bytes"):
        impl.LineCutter("stdout", limit)


@pytest.mark.parametrize("kind", ["LineCutter", "Stream"])
def test_feed_of_none_is_a_type_error(impl, kind):
    # A non-blocking RawIOBase.read() returns None when no data is ready; that must not pass for
    # an empty read.
    with pytest.raises(TypeError):
        getattr(impl, kind)().feed(None, 1)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_tiny_limit_of_one_byte(impl):
    assert shape(cut(impl, [b"ab\n"], max_line_bytes=1)) == [
        (b"a", 1, False), (b"b", 2, False), (b"", 3, True)]
