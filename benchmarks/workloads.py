"""Seeded benchmark inputs and the digest a receiver must see for them, computed without zeroline.

W1: 100-byte lines. W2: lognormal lengths (median ~120 bytes), 1 line in ~2000 over 16 KiB.

Every line starts with its zero-padded index, so a lost, duplicated or reordered message changes
the checksum, not only the count. Inputs are written to a file once per run and every sender reads
that file: the compiled and pure-Python streams, the naive loop, the C reference and the CLI all cut
exactly the same bytes.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import asdict, dataclass

#: Docker's copier buffer, the default ``max_line_bytes``: longer lines become 16 KiB chunks.
LINE_LIMIT_BYTES = 16384

#: Lines per write() while generating: bounds the generator's memory, not the output.
_WRITE_BLOCK_LINES = 16384
#: Read size of the digest pass (whole lines are carried over between reads).
_DIGEST_READ_BYTES = 1 << 20

W2_MEDIAN_BYTES = 120
W2_SIGMA = 0.8              # lognormal shape: mean ~165 bytes, p99 ~770 bytes
W2_CLAMP_BYTES = 8192       # the lognormal body stays well under the 16 KiB cut
W2_LONG_EVERY = 2000        # about 1 line in 2000 is over 16 KiB ...
W2_LONG_MAX_BYTES = 100 * 1024  # ... and up to 100 KiB (2-7 chunks)

WORKLOADS = ("W1", "W2")
DESCRIPTIONS = {
    "W1": "100-byte lines (99 bytes + newline)",
    "W2": "lognormal lengths (median %d B), 1 in %d lines 16-100 KiB"
          % (W2_MEDIAN_BYTES, W2_LONG_EVERY),
}


@dataclass
class Workload:
    """One generated input file and the prefix of it that the slow rows use."""

    name: str
    path: str
    seed: int
    lines: int
    nbytes: int
    long_lines: int          # lines of LINE_LIMIT_BYTES or more (sent as 2+ messages)
    small_lines: int         # the first small_lines lines ...
    small_nbytes: int        # ... end at this byte offset (a newline boundary)

    def as_dict(self):
        return asdict(self)


def _pool(rng, size):
    # Printable ASCII without newline: a log line's alphabet; slices of it make line bodies.
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 =:,.-_/[]{}\"'"
    return bytes(rng.choices(alphabet, k=size))


def line_lengths(name, lines, seed):
    """Return the content length (without newline) of each line of workload ``name``, a list."""
    rng = random.Random("%s:%s:lengths" % (seed, name))
    if name == "W1":
        return [99] * lines
    if name != "W2":
        raise ValueError("unknown workload %r (have %s)" % (name, ", ".join(WORKLOADS)))
    mu = math.log(W2_MEDIAN_BYTES)
    gauss, exp, rand, randint = rng.gauss, math.exp, rng.random, rng.randint
    cap, every, low, high = W2_CLAMP_BYTES, W2_LONG_EVERY, LINE_LIMIT_BYTES + 1, W2_LONG_MAX_BYTES
    # Draws go line by line, so a shorter input is a prefix of a longer one with the same seed.
    return [randint(low, high) if rand() * every < 1.0
            else min(int(exp(mu + W2_SIGMA * gauss())), cap)
            for _ in range(lines)]


def generate(name, lines, path, seed=1, small_lines=None):
    """Write workload ``name`` with ``lines`` lines to ``path``; return its :class:`Workload`.

    The same (name, lines, seed) always gives the same bytes. ``small_lines`` (default: all)
    marks a prefix for the slow rows (pure-Python twin, naive loop).
    """
    rng = random.Random("%s:%s:body" % (seed, name))
    pool = _pool(rng, 2 * W2_LONG_MAX_BYTES)
    # A moving window over the pool: lines differ without per-byte randomness.
    span = len(pool) - W2_LONG_MAX_BYTES
    sizes = line_lengths(name, lines, seed)
    if small_lines is None or small_lines > lines:
        small_lines = lines
    small_nbytes = sum(sizes[:small_lines]) + small_lines
    nbytes = 0
    with open(path, "wb") as out:
        for start in range(0, lines, _WRITE_BLOCK_LINES):
            end = min(start + _WRITE_BLOCK_LINES, lines)
            # "%010d " is 11 bytes; the rare shorter line is a bare pool slice.
            block = [b"%010d " % i + pool[(off := i * 7919 % span):off + size - 11]
                     if size >= 11 else pool[:size]
                     for i, size in zip(range(start, end), sizes[start:end])]
            block.append(b"")
            data = b"\n".join(block)
            out.write(data)
            nbytes += len(data)
    long_lines = sum(1 for size in sizes if size >= LINE_LIMIT_BYTES)
    return Workload(name, path, seed, lines, nbytes, long_lines, small_lines, small_nbytes)


def _pieces(line, limit):
    # Docker's copier: chunks of exactly ``limit`` bytes while no newline fits, then the rest
    # (possibly empty) ends the group. A line of n bytes gives n // limit + 1 messages.
    k = len(line) // limit
    for j in range(k):
        yield line[j * limit:(j + 1) * limit]
    yield line[k * limit:]


def _digest_lines(lines, prefix, sep, limit, crc):
    # Runs of ordinary lines are joined with "\n" + prefix at C speed; only lines of ``limit``
    # bytes or more are cut one by one.
    messages = 0
    start = 0
    long_at = []
    if max(map(len, lines)) >= limit:
        long_at = [i for i, line in enumerate(lines) if len(line) >= limit]
    for stop in long_at + [len(lines)]:
        if stop > start:
            run = sep.join(lines[start:stop])
            crc = zlib.crc32(prefix, crc)
            crc = zlib.crc32(run, crc)
            crc = zlib.crc32(b"\n", crc)
            messages += stop - start
        if stop < len(lines):
            for piece in _pieces(lines[stop], limit):
                crc = zlib.crc32(prefix + piece + b"\n", crc)
                messages += 1
        start = stop + 1
    return crc, messages


def expected_digest(path, nbytes, prefix, limit=LINE_LIMIT_BYTES):
    """Messages and CRC-32 a receiver must see for the first ``nbytes`` of ``path`` (seed framing).

    The digest covers the concatenated payloads each followed by ``b"\\n"`` (what
    ``Receiver.take_payloads()`` returns), payload = ``prefix + piece``. Computed from the raw file
    with bytes.split/join, independently of zeroline. The input must end with a newline.

    Returns:
        ``(messages, crc32)``
    """
    crc = 0
    messages = 0
    carry = b""
    left = nbytes
    sep = b"\n" + prefix
    with open(path, "rb") as f:
        while left > 0:
            data = f.read(min(_DIGEST_READ_BYTES, left))
            if not data:
                break
            left -= len(data)
            data = carry + data
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if not cut:
                continue
            data = data[:cut]
            lines = data.split(b"\n")
            lines.pop()                       # the empty tail after the last newline
            crc, n = _digest_lines(lines, prefix, sep, limit, crc)
            messages += n
    if carry:
        raise ValueError("%s: the first %d bytes do not end with a newline" % (path, nbytes))
    return messages, crc


def expected_digest_slow(data, prefix, limit=LINE_LIMIT_BYTES):
    """Per-line reference of :func:`expected_digest` for small in-memory inputs (tests)."""
    crc = 0
    messages = 0
    for line in data.split(b"\n")[:-1]:
        for piece in _pieces(line, limit):
            crc = zlib.crc32(prefix + piece + b"\n", crc)
            messages += 1
    return messages, crc
