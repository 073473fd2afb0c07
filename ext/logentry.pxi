# Included by _core.pyx. The Docker plugin's FIFO: [uint32 big-endian length][LogEntry] frames,
# decoded without the GIL and framed like cut lines (pure-Python twin: _logentry_py.py).
#
# LogEntry (proto3): source 1 (string), time_nano 2 (int64), line 3 (bytes), partial 4 (bool),
# partial_log_metadata 5 (message: last 1 bool, id 2 string, ordinal 3 int32), attrs 6 (skipped).
# Defaults are left out by the encoder; unknown fields are skipped by wire type.

from libc.string cimport memcmp, memset

ctypedef struct zl_entry:
    const char *source
    size_t source_len
    int64_t time_nano
    const char *line
    size_t line_len
    bint has_meta
    bint last
    const char *id
    size_t id_len
    int32_t ordinal

cdef enum:
    CARRY_KEEP_BYTES = 32 * 1024    # a copier entry is at most ~16.5 KB: keep room for one

# Partial groups Docker leaves open (an unterminated last line ends with last=false): tracked per
# source so close() can close them; limits as in _logentry_py (MAX_OPEN_GROUPS, ...).
cdef enum:
    OPEN_GROUPS = 4
    GROUP_SOURCE_BYTES = 32
    GROUP_ID_BYTES = 64

cdef enum:
    NOT_FRAMED = -1                 # zl_open_group.index: the ring buffer dropped that chunk

ctypedef struct zl_open_group:
    bint open
    char source[GROUP_SOURCE_BYTES]
    size_t source_len
    char id[GROUP_ID_BYTES]
    size_t id_len
    int64_t time_nano
    int32_t ordinal
    int64_t index                   # its place in messages_total order, or NOT_FRAMED
    uint64_t seq                    # entries_total when it arrived: close() goes in this order

# Protobuf strings (source, partial id) that are not valid UTF-8 are framed as the twin frames
# them after bytes.decode("utf-8", "replace"): each ill-formed part becomes U+FFFD. The parts are
# Unicode's "maximal subparts" (Table 3-7 of the standard), which is what CPython's decoder does.
cdef inline size_t _utf8_seq(const unsigned char *s, size_t n, size_t i, bint *ok) noexcept nogil:
    # The length of the well-formed sequence at s[i] (*ok = 1), or of the ill-formed part that
    # starts there (*ok = 0; at least 1 byte).
    cdef unsigned char c = s[i], lo = 0x80, hi = 0xBF
    cdef size_t need, k
    ok[0] = 1
    if c < 0x80:
        return 1
    if c < 0xC2 or c > 0xF4:
        ok[0] = 0
        return 1
    if c < 0xE0:
        need = 1
    elif c < 0xF0:
        need = 2
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F
    else:
        need = 3
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
    for k in range(1, need + 1):
        if i + k >= n or s[i + k] < lo or s[i + k] > hi:
            ok[0] = 0
            return k
        lo = 0x80
        hi = 0xBF
    return need + 1


cdef inline bint _utf8_valid(const char *src, size_t n) noexcept nogil:
    cdef const unsigned char *s = <const unsigned char *>src
    cdef size_t i = 0
    cdef uint64_t word, high = 0
    cdef bint ok
    # ASCII (every source Docker sends, every partial id): eight bytes per step, one branch.
    while i + 8 <= n:
        memcpy(&word, s + i, 8)
        high |= word
        i += 8
    while i < n:
        high |= s[i]
        i += 1
    if not (high & 0x8080808080808080ULL):
        return True
    i = 0
    while i < n:
        if s[i] < 0x80:
            i += 1
            continue
        i += _utf8_seq(s, n, i, &ok)
        if not ok:
            return False
    return True


cdef size_t _utf8_replace(const char *src, size_t n, char *out) noexcept nogil:
    # src into out with each ill-formed part replaced by U+FFFD; out has room for 3 * n bytes.
    cdef const unsigned char *s = <const unsigned char *>src
    cdef size_t i = 0, o = 0, k
    cdef bint ok
    while i < n:
        k = _utf8_seq(s, n, i, &ok)
        if ok:
            memcpy(out + o, src + i, k)
            o += k
        else:
            out[o] = <char>0xEF
            out[o + 1] = <char>0xBF
            out[o + 2] = <char>0xBD
            o += 3
        i += k
    return o


cdef enum:
    ENTRY_OK = 0
    ENTRY_BAD_VARINT = 1
    ENTRY_BAD_LENGTH = 2
    ENTRY_BAD_WIRE = 3
    ENTRY_FIELD_ZERO = 4

from zeroline._logentry_py import BAD_VARINT, BAD_LENGTH, BAD_WIRE, FIELD_ZERO

ENTRY_ERRORS = {ENTRY_BAD_VARINT: BAD_VARINT, ENTRY_BAD_LENGTH: BAD_LENGTH,
                ENTRY_BAD_WIRE: BAD_WIRE, ENTRY_FIELD_ZERO: FIELD_ZERO}


cdef inline int _read_varint(const unsigned char *p, size_t end, size_t *pos,
                             uint64_t *out) noexcept nogil:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        if pos[0] >= end or shift >= 70:
            return ENTRY_BAD_VARINT
        byte = p[pos[0]]
        pos[0] += 1
        if shift < 64:
            value |= (<uint64_t>(byte & 0x7F)) << shift
        if not (byte & 0x80):
            out[0] = value
            return ENTRY_OK
        shift += 7


cdef int _next_field(const unsigned char *p, size_t end, size_t *pos, uint64_t *number,
                     int *wire, uint64_t *value, size_t *start) noexcept nogil:
    # Reads one field; for wire type 2, *start/*value are the payload's offset and length.
    cdef uint64_t key
    cdef int rc = _read_varint(p, end, pos, &key)
    if rc:
        return rc
    number[0] = key >> 3
    wire[0] = <int>(key & 7)
    if number[0] == 0:
        return ENTRY_FIELD_ZERO
    if wire[0] == 0:
        return _read_varint(p, end, pos, value)
    if wire[0] == 1:
        if end - pos[0] < 8:
            return ENTRY_BAD_LENGTH
        memcpy(value, p + pos[0], 8)
        pos[0] += 8
        return ENTRY_OK
    if wire[0] == 2:
        rc = _read_varint(p, end, pos, value)
        if rc:
            return rc
        if value[0] > end - pos[0]:
            return ENTRY_BAD_LENGTH
        start[0] = pos[0]
        pos[0] += value[0]
        return ENTRY_OK
    if wire[0] == 5:
        if end - pos[0] < 4:
            return ENTRY_BAD_LENGTH
        value[0] = 0
        memcpy(value, p + pos[0], 4)
        pos[0] += 4
        return ENTRY_OK
    return ENTRY_BAD_WIRE


cdef int _decode_entry(const char *data, size_t size, zl_entry *e) noexcept nogil:
    cdef const unsigned char *p = <const unsigned char *>data
    cdef size_t pos = 0, start = 0, sub_pos, sub_end, sub_start = 0
    cdef uint64_t number, value, sub_number, sub_value
    cdef int wire, sub_wire, rc
    e.source = EMPTY
    e.source_len = 0
    e.time_nano = 0
    e.line = EMPTY
    e.line_len = 0
    e.has_meta = False
    e.last = False
    e.id = EMPTY
    e.id_len = 0
    e.ordinal = 0
    while pos < size:
        rc = _next_field(p, size, &pos, &number, &wire, &value, &start)
        if rc:
            return rc
        if number == 1 and wire == 2:
            e.source = data + start
            e.source_len = value
        elif number == 2 and wire == 0:
            e.time_nano = <int64_t>value
        elif number == 3 and wire == 2:
            e.line = data + start
            e.line_len = value
        elif number == 5 and wire == 2:
            # Sub-message fields merge into what an earlier occurrence set, as protobuf does.
            e.has_meta = True
            sub_pos = start
            sub_end = start + value
            while sub_pos < sub_end:
                rc = _next_field(p, sub_end, &sub_pos, &sub_number, &sub_wire, &sub_value,
                                 &sub_start)
                if rc:
                    return rc
                if sub_number == 1 and sub_wire == 0:
                    e.last = sub_value != 0
                elif sub_number == 2 and sub_wire == 2:
                    e.id = data + sub_start
                    e.id_len = sub_value
                elif sub_number == 3 and sub_wire == 0:
                    e.ordinal = <int32_t><uint32_t>sub_value     # int32: the low 32 bits
        # partial (4), attrs (6), unknown fields, known numbers with another wire type: skipped
    return ENTRY_OK


def decode_entry(data):
    """One LogEntry (without its length prefix) as a Message. Same as _logentry_py.decode_entry."""
    cdef const unsigned char[::1] view = data
    cdef zl_entry e
    cdef size_t size = view.shape[0]
    cdef int rc = _decode_entry(<const char *>&view[0] if size else EMPTY, size, &e)
    if rc:
        raise ProtocolError(ENTRY_ERRORS[rc])
    partial = None
    if e.has_meta:
        partial = Partial(PyBytes_FromStringAndSize(e.id, e.id_len).decode("utf-8", "replace"),
                          e.ordinal, bool(e.last))
    return Message(PyBytes_FromStringAndSize(e.line, e.line_len),
                   PyBytes_FromStringAndSize(e.source, e.source_len).decode("utf-8", "replace"),
                   e.time_nano, partial)


cdef inline uint32_t _get_be32(const char *p) noexcept nogil:
    cdef const unsigned char *u = <const unsigned char *>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]


cdef class EntryStream(Stream):
    """The data plane of one Docker plugin FIFO: LogEntry frames in, framed messages out.

    Same API and output as zeroline._logentry_py.EntryStream (see there); decoding and framing of
    a whole read buffer run without the GIL.
    """
    cdef zl_buffer _carry           # an incomplete frame waiting for the rest of its bytes
    cdef zl_buffer _local           # accepted entries as [len][entry][len] (keep_local)
    cdef zl_buffer _fixed           # an entry's source and partial id with U+FFFD (invalid UTF-8)
    cdef size_t _max_entry
    cdef bint _keep_local
    cdef bint _entries_closed
    cdef readonly bint corrupt
    cdef readonly uint64_t entries_total
    cdef readonly uint64_t entry_bytes_total
    cdef readonly uint64_t line_bytes_total
    cdef readonly uint64_t partial_entries_total
    cdef readonly uint64_t malformed_total
    cdef readonly uint64_t oversized_total
    cdef readonly uint64_t truncated_total
    cdef readonly uint64_t discarded_bytes_total
    cdef int _error_code
    cdef uint64_t _error_value
    cdef zl_open_group _groups[OPEN_GROUPS]

    def __cinit__(self):
        self._carry.data = NULL
        self._carry.capacity = 0
        _buf_reset(&self._carry)
        self._local.data = NULL
        self._local.capacity = 0
        _buf_reset(&self._local)
        self._fixed.data = NULL
        self._fixed.capacity = 0
        _buf_reset(&self._fixed)

    def __init__(self, *, framing="seed", tenant="default", service="default", container_id="",
                 container_name="", attrs=None, max_pending_bytes=-1,
                 max_entry_bytes=MAX_ENTRY_BYTES, keep_local=False):
        Stream.__init__(self, "stdout", framing=framing, tenant=tenant, service=service,
                        container_id=container_id, container_name=container_name, attrs=attrs,
                        max_pending_bytes=max_pending_bytes)
        check_limits(max_frame_bytes=max_entry_bytes)
        self._max_entry = max_entry_bytes
        self._keep_local = keep_local
        _buf_reset(&self._carry)
        _buf_reset(&self._local)
        self._entries_closed = False
        self.corrupt = False
        self.entries_total = self.entry_bytes_total = self.line_bytes_total = 0
        self.partial_entries_total = self.malformed_total = self.oversized_total = 0
        self.truncated_total = self.discarded_bytes_total = 0
        self._error_code = 0
        self._error_value = 0
        memset(self._groups, 0, sizeof(self._groups))

    def __dealloc__(self):
        free(self._carry.data)
        free(self._local.data)
        free(self._fixed.data)

    @property
    def max_entry_bytes(self):
        return self._max_entry

    @property
    def keep_local(self):
        return self._keep_local

    @property
    def lines_total(self):
        return self.entries_total

    @property
    def bytes_total(self):
        return self.entry_bytes_total

    @property
    def partial_groups_total(self):
        return self.partial_entries_total

    @property
    def held_bytes(self):
        return self._carry.length - self._carry.head

    @property
    def errors_total(self):
        return self.malformed_total + self.oversized_total + self.truncated_total

    @property
    def last_error(self):
        code, value = self._error_code, self._error_value
        if code == 0:
            return ""
        if code == -1:
            return ("entry length %d over the %d-byte limit: the rest of this stream cannot be "
                    "framed and is discarded" % (value, self._max_entry))
        if code == -2:
            return "stream ended inside an entry (%d bytes dropped)" % value
        return "malformed entry skipped: %s" % ENTRY_ERRORS[code]

    cdef void _track_group(self, zl_entry *e, bint framed) noexcept nogil:
        # Remembers the last chunk of each source's open group (the twin's _track_group).
        cdef int i, slot = -1, free_slot = -1
        cdef zl_open_group *g
        if e.source_len > GROUP_SOURCE_BYTES:
            return
        for i in range(OPEN_GROUPS):
            g = &self._groups[i]
            if g.open and g.source_len == e.source_len and \
                    memcmp(g.source, e.source, e.source_len) == 0:
                slot = i
            elif not g.open and free_slot < 0:
                free_slot = i
        if not e.has_meta or e.last or e.id_len > GROUP_ID_BYTES:
            if slot >= 0:
                self._groups[slot].open = False     # a complete line: nothing of it is open
            return
        if slot < 0:
            if free_slot < 0:
                return
            slot = free_slot
        g = &self._groups[slot]
        g.open = True
        memcpy(g.source, e.source, e.source_len)
        g.source_len = e.source_len
        memcpy(g.id, e.id, e.id_len)
        g.id_len = e.id_len
        g.time_nano = e.time_nano
        g.ordinal = e.ordinal
        g.index = <int64_t>self._fr.messages_total - 1 if framed else NOT_FRAMED
        g.seq = self.entries_total

    cdef int _close_groups(self) except -1 nogil:
        # EOF: closes every open group, oldest chunk first. A final chunk still pending gets
        # last=true in place (msgpack: the byte just before the attrs tail is its last flag);
        # otherwise an empty chunk with the next ordinal and last=true follows. Seed payloads
        # carry no metadata, so there is nothing to close.
        cdef int i, best
        cdef zl_open_group *g
        cdef int64_t first_pending
        cdef uint64_t k
        cdef size_t pos
        cdef char *flag
        while True:
            best = -1
            for i in range(OPEN_GROUPS):
                if self._groups[i].open and (best < 0 or
                                             self._groups[i].seq < self._groups[best].seq):
                    best = i
            if best < 0:
                return 0
            g = &self._groups[best]
            g.open = False
            if self._fr.framing == FRAMING_SEED:
                continue
            first_pending = <int64_t>(self._fr.messages_total - self._fr.pending_count)
            if g.index != NOT_FRAMED and g.index >= first_pending:
                pos = self._fr.pending.head
                k = <uint64_t>(g.index - first_pending)
                while k:
                    pos += 8 + _get_u32(self._fr.pending.data + pos)
                    k -= 1
                flag = self._fr.pending.data + pos + 8 + _get_u32(self._fr.pending.data + pos) \
                    - self._fr.attrs_len - 1
                flag[0] = <char>0xc3
            else:
                _frame_message(&self._fr, EMPTY, 0, g.time_nano, g.source, g.source_len, g.id,
                               g.id_len, <int32_t>(<uint32_t>g.ordinal + 1), True)

    cdef int _fix_strings(self, zl_entry *e) except -1 nogil:
        # Points e's source and partial id at copies with U+FFFD for each ill-formed part.
        _buf_reset(&self._fixed)
        _buf_reserve(&self._fixed, 3 * (e.source_len + e.id_len) + 1)
        cdef char *out = self._fixed.data
        cdef size_t n = _utf8_replace(e.source, e.source_len, out)
        e.source = out
        e.source_len = n
        if e.has_meta:
            e.id_len = _utf8_replace(e.id, e.id_len, out + n)
            e.id = out + n
        return 0

    cdef int _take_frames(self, const char *data, size_t size, size_t *used) except -1 nogil:
        # Decodes every complete frame at the start of data; *used = bytes consumed.
        cdef size_t pos = 0, length
        cdef zl_entry e
        cdef int rc
        cdef char *p
        cdef uint64_t framed_before
        while size - pos >= 4:
            length = _get_be32(data + pos)
            if length > self._max_entry:
                self.oversized_total += 1
                self.corrupt = True
                self._error_code = -1
                self._error_value = length
                self.discarded_bytes_total += size - pos
                pos = size
                break
            if size - pos - 4 < length:
                break
            rc = _decode_entry(data + pos + 4, length, &e)
            if rc:
                self.malformed_total += 1
                self._error_code = rc
            else:
                if not _utf8_valid(e.source, e.source_len) or \
                        (e.has_meta and not _utf8_valid(e.id, e.id_len)):
                    self._fix_strings(&e)
                self.entries_total += 1
                self.line_bytes_total += e.line_len
                if e.has_meta:
                    self.partial_entries_total += 1
                framed_before = self._fr.messages_total
                _frame_message(&self._fr, e.line, e.line_len, e.time_nano, e.source,
                               e.source_len, e.id if e.has_meta else NULL, e.id_len, e.ordinal,
                               e.last)
                self._track_group(&e, self._fr.messages_total != framed_before)
                if self._keep_local:
                    _buf_reserve(&self._local, length + 8)
                    p = self._local.data + self._local.length
                    memcpy(p, data + pos, length + 4)         # the big-endian length and entry
                    memcpy(p + 4 + length, data + pos, 4)      # the length again, after it
                    self._local.length += length + 8
            pos += 4 + length
        used[0] = pos
        return 0

    cdef Py_ssize_t feed_raw(self, const char *data, size_t size, int64_t time_nano) except -1 nogil:
        cdef uint64_t before = self._fr.messages_total
        cdef size_t used = 0, held, take, frame_len
        cdef zl_buffer *carry = &self._carry
        self.entry_bytes_total += size
        if self.corrupt:
            self.discarded_bytes_total += size
            return 0
        held = carry.length - carry.head
        if held:
            # A frame spans reads: complete it with only the bytes it lacks, decode it, then go
            # on in place (copying whole reads into the carry cost 5-20% of decode speed and
            # kept 128 KiB per busy stream).
            if held < 4:
                take = 4 - held if size > 4 - held else size
                _buf_reserve(carry, take)
                memcpy(carry.data + carry.length, data, take)
                carry.length += take
                data += take
                size -= take
                held += take
                if held < 4:
                    return 0
            frame_len = _get_be32(carry.data + carry.head)
            if frame_len <= self._max_entry:
                take = 4 + frame_len - held
                if take > size:
                    take = size
                _buf_reserve(carry, take)
                memcpy(carry.data + carry.length, data, take)
                carry.length += take
                data += take
                size -= take
                held += take
                if held < 4 + frame_len:
                    return 0
            # Decodes the one carried frame, or finds its length over the limit.
            self._take_frames(carry.data + carry.head, held, &used)
            _buf_reset(carry)
            if carry.capacity > CARRY_KEEP_BYTES:
                free(carry.data)
                carry.data = NULL
                carry.capacity = 0
            if self.corrupt:
                self.discarded_bytes_total += size
                return <Py_ssize_t>(self._fr.messages_total - before)
        self._take_frames(data, size, &used)
        if not self.corrupt and used < size:
            _buf_reserve(carry, size - used)
            memcpy(carry.data + carry.length, data + used, size - used)
            carry.length += size - used
        return <Py_ssize_t>(self._fr.messages_total - before)

    cdef Py_ssize_t close_raw(self, int64_t time_nano) except -1 nogil:
        cdef uint64_t before = self._fr.messages_total
        if self._entries_closed:
            return 0
        self._entries_closed = True
        if self._carry.length > self._carry.head and not self.corrupt:
            self.truncated_total += 1
            self._error_code = -2
            self._error_value = self._carry.length - self._carry.head
        _buf_reset(&self._carry)
        self._close_groups()
        return <Py_ssize_t>(self._fr.messages_total - before)

    def feed(self, data, time_nano=-1):
        """Decode the complete frames in ``data`` (a frame may span feeds); returns messages queued.
        ``time_nano`` is ignored: entries carry their own."""
        if self._entries_closed:
            raise ValueError("feed() after close()")
        return Stream.feed(self, data, -1)

    def close(self, time_nano=-1):
        """EOF: a frame cut short is counted as truncated; open partial groups are closed (as
        _logentry_py.EntryStream.close). Returns how many messages were queued."""
        return Stream.close(self, -1)

    def take_local(self):
        """Remove and return the accepted entries as local-format records."""
        out = PyBytes_FromStringAndSize(self._local.data, self._local.length)
        _buf_reset(&self._local)
        return out

    def stats(self):
        out = Stream.stats(self)
        out.update(entries_total=self.entries_total, malformed_total=self.malformed_total,
                   oversized_total=self.oversized_total, truncated_total=self.truncated_total,
                   discarded_bytes_total=self.discarded_bytes_total)
        return out
