# Public C API of zeroline's compiled data plane (ext/_core.pyx). Shipped in the wheel:
# embedders write `from zeroline cimport Stream` (or `from zeroline._core cimport Stream`).
#
# Versioned API: a changed struct or signature here is a breaking change.
# Contracts, unless a declaration says otherwise:
#   * `nogil` methods may be called without the GIL, but one object must be used by one thread at
#     a time (as a ZeroMQ socket must).
#   * `except -1` methods return -1 only on allocation failure (a MemoryError is set when the GIL
#     is taken again); they never fail for any input bytes.
#   * pointers passed in are borrowed for the duration of the call only; nothing is kept.

from libc.stdint cimport int64_t, uint32_t, uint64_t


# A growable byte buffer; records are appended at `length`, consumed from `head`.
ctypedef struct zl_buffer:
    char *data
    size_t head
    size_t length
    size_t capacity


# Docker's copier state for one source (moby daemon/logger/copier.go, with close() closing the
# partial group). `held` has room for exactly `limit` bytes.
ctypedef struct zl_cutter:
    char *held
    size_t held_len
    size_t limit
    bint group_open
    char group_id[64]
    int group_ordinal
    int64_t group_time
    bint random_ids
    uint64_t id_state
    bint closed
    uint64_t lines_total
    uint64_t bytes_total
    uint64_t partial_groups_total


# Framing and the pending batch of one stream. Records in `pending`:
# [u32 payload_len][u32 line_len][payload]. `prefix`/`attrs_tail` borrow the owning Stream's bytes.
ctypedef struct zl_framer:
    int framing                  # FRAMING_SEED or FRAMING_MSGPACK
    const char *prefix           # seed: b"<cid>: "; msgpack: the container_id/_name keys
    size_t prefix_len
    const char *source           # source of the cut messages (entries carry their own)
    size_t source_len
    const char *attrs_tail       # msgpack: encoded "attrs" key and map, or empty
    size_t attrs_len
    zl_buffer pending
    int64_t max_pending_bytes    # -1: no limit; else Docker's ring buffer size in line bytes
    int64_t pending_line_bytes
    uint64_t pending_count
    uint64_t messages_total
    uint64_t dropped_total
    uint64_t dropped_bytes_total


cdef enum:
    FRAMING_SEED = 0
    FRAMING_MSGPACK = 1


cdef class Stream:
    cdef zl_cutter _cut
    cdef zl_framer _fr
    cdef int _source
    cdef bytes _tenant
    cdef bytes _service
    cdef bytes _prefix
    cdef bytes _attrs_tail
    cdef object _attrs
    cdef object _container_id
    cdef object _container_name
    cdef long _pid
    cdef volatile int _cancel
    cdef readonly uint64_t sent_total

    # Cut and frame `size` bytes read at `time_nano` (-1: now) into the pending batch.
    # Returns the number of messages queued, or -1 on allocation failure.
    cdef Py_ssize_t feed_raw(self, const char *data, size_t size, int64_t time_nano) except -1 nogil
    # EOF: flush unterminated text and close an open partial group. Same return as feed_raw.
    cdef Py_ssize_t close_raw(self, int64_t time_nano) except -1 nogil
    # Messages framed and not yet sent.
    cdef uint64_t pending_count(self) noexcept nogil


cdef class Receiver:
    cdef zl_buffer _batch
    cdef size_t _max_frame_bytes
    cdef uint64_t _count
    cdef long _pid
    cdef void *_render                  # take_rendered's scratch, private to ext/_core.pyx; owned
    cdef uint64_t _malformed[5]         # malformed_total by reason, as _core_py.MALFORMED_REASONS
    cdef readonly uint64_t messages_total
    cdef readonly uint64_t bytes_total
    cdef readonly uint64_t malformed_total
