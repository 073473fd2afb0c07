# Included by _core.pyx. Docker's copier: newline scan, the max-line cut into partial chunks,
# partial ids; and LineCutter, the cutting alone for embedders.

# ---------------------------------------------------------------------------------------------
# Cutting: Docker's copier (moby daemon/logger/copier.go), see _core_py.LineCutter.

ctypedef int (*zl_emit_fn)(void *ctx, const char *line, size_t n, int64_t time_nano,
                           const char *partial_id, int ordinal, bint last) except -1 nogil

cdef const char *HEX = b"0123456789abcdef"
cdef const char *SOURCE_NAMES[2]
SOURCE_NAMES[0] = b"stdout"
SOURCE_NAMES[1] = b"stderr"
cdef const char *EMPTY = b""


cdef inline uint64_t _splitmix64(uint64_t *state) noexcept nogil:
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef int _new_group_id(zl_cutter *c) except -1 nogil:
    cdef unsigned char raw[32]
    cdef uint64_t word
    cdef int i, j, digits
    cdef ssize_t got
    while True:
        if c.random_ids:
            got = 0
            while got < 32:
                j = <int>getrandom(raw + got, 32 - got, 0)
                if j < 0:
                    if errno == EINTR:
                        continue
                    with gil:
                        raise OSError(errno, "getrandom failed")
                got += j
        else:
            for i in range(4):
                word = _splitmix64(&c.id_state)
                for j in range(8):
                    raw[i * 8 + j] = <unsigned char>(word >> (8 * j))
        for i in range(32):
            c.group_id[2 * i] = HEX[raw[i] >> 4]
            c.group_id[2 * i + 1] = HEX[raw[i] & 15]
        # Docker draws again when the 12-char short form is all digits.
        digits = 0
        for i in range(12):
            if b'0' <= c.group_id[i] <= b'9':
                digits += 1
        if digits < 12:
            return 0


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _cutter_init(zl_cutter *c, size_t limit, object id_seed) except -1:
    # The hold buffer is allocated on first use: an idle stream costs no 16 KiB.
    c.held = NULL
    c.held_len = 0
    c.limit = limit
    c.group_open = False
    c.group_ordinal = 0
    c.group_time = 0
    c.closed = False
    c.random_ids = id_seed is None
    c.id_state = 0 if id_seed is None else <uint64_t>(id_seed & 0xFFFFFFFFFFFFFFFF)
    c.lines_total = 0
    c.bytes_total = 0
    c.partial_groups_total = 0
    return 0


cdef inline int _emit_line(zl_cutter *c, const char *line, size_t n, int64_t t,
                           zl_emit_fn emit, void *ctx) except -1 nogil:
    c.lines_total += 1
    if not c.group_open:
        return emit(ctx, line, n, t, NULL, 0, False)
    c.group_open = False
    c.group_ordinal += 1
    return emit(ctx, line, n, c.group_time, c.group_id, c.group_ordinal, True)


cdef inline int _emit_chunk(zl_cutter *c, const char *line, size_t n, int64_t t, bint last,
                            zl_emit_fn emit, void *ctx) except -1 nogil:
    if not c.group_open:
        _new_group_id(c)
        c.group_open = True
        c.group_ordinal = 0
        c.group_time = t
        c.partial_groups_total += 1
    c.group_ordinal += 1
    if last:
        c.group_open = False
        c.lines_total += 1
    return emit(ctx, line, n, c.group_time, c.group_id, c.group_ordinal, last)


cdef int _cut_feed(zl_cutter *c, const char *data, size_t size, int64_t t,
                   zl_emit_fn emit, void *ctx) except -1 nogil:
    cdef size_t pos = 0, window, k, n
    cdef const char *nl
    c.bytes_total += size
    while pos < size:
        # At most limit - held bytes fit before the copier buffer is full.
        window = size - pos
        if window > c.limit - c.held_len:
            window = c.limit - c.held_len
        nl = <const char *>memchr(data + pos, b'\n', window)
        if nl != NULL:
            k = <size_t>(nl - (data + pos))
            if c.held_len == 0:
                # Whole line inside this buffer: emit it in place, no copy.
                _emit_line(c, data + pos, k, t, emit, ctx)
            else:
                memcpy(c.held + c.held_len, data + pos, k)
                n = c.held_len + k
                c.held_len = 0
                _emit_line(c, c.held, n, t, emit, ctx)
            pos += k + 1
        elif c.held_len + window == c.limit:
            if c.held_len == 0:
                _emit_chunk(c, data + pos, window, t, False, emit, ctx)
            else:
                memcpy(c.held + c.held_len, data + pos, window)
                c.held_len = 0
                _emit_chunk(c, c.held, c.limit, t, False, emit, ctx)
            pos += window
        else:
            if c.held == NULL:
                c.held = <char *>malloc(c.limit)
                if c.held == NULL:
                    with gil:
                        raise MemoryError()
            memcpy(c.held + c.held_len, data + pos, size - pos)
            c.held_len += size - pos
            pos = size
    return 0


cdef int _cut_close(zl_cutter *c, int64_t t, zl_emit_fn emit, void *ctx) except -1 nogil:
    cdef size_t n
    if c.closed:
        return 0
    c.closed = True
    if c.held_len or c.group_open:
        n = c.held_len
        c.held_len = 0
        _emit_chunk(c, <const char *>c.held if c.held != NULL else EMPTY, n, t, True, emit, ctx)
    return 0


cdef int _check_common(object source, object max_line_bytes) except -1:
    if source not in SOURCES:
        raise ConfigError("source must be 'stdout' or 'stderr', got %r" % (source,))
    check_limits(max_line_bytes=max_line_bytes)
    return 0


cdef bytes _as_bytes(object value, str what):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ConfigError("%s must be str or bytes, got %s" % (what, type(value).__name__))


# ---------------------------------------------------------------------------------------------
# LineCutter: the cutting alone, returning Message tuples (embedding API; not the hot path).
# Records in `_out`: [u32 line_len][i64 time][i32 ordinal, 0 = no metadata][u8 last][id 64?][line]

cdef int _cutter_collect(void *ctx, const char *line, size_t n, int64_t t,
                         const char *partial_id, int ordinal, bint last) except -1 nogil:
    cdef zl_buffer *out = <zl_buffer *>ctx
    cdef size_t need = 17 + (64 if partial_id != NULL else 0) + n
    cdef int32_t o = ordinal
    _buf_reserve(out, need)
    cdef char *p = out.data + out.length
    _put_u32(p, <uint32_t>n)
    memcpy(p + 4, &t, 8)
    memcpy(p + 12, &o, 4)
    p[16] = 1 if last else 0
    p += 17
    if partial_id != NULL:
        p = _put(p, partial_id, 64)
    _put(p, line, n)
    out.length += need
    return 0


cdef class LineCutter:
    """Cuts a byte stream of one source into messages exactly as Docker's log copier does.

    Same API and output as zeroline._core_py.LineCutter (see there).
    """
    cdef zl_cutter _cut
    cdef zl_buffer _out
    cdef readonly str source

    def __cinit__(self):
        self._cut.held = NULL
        self._out.data = NULL
        self._out.capacity = 0
        _buf_reset(&self._out)

    def __init__(self, source="stdout", max_line_bytes=DEFAULT_LINE_BUFFER, id_seed=None):
        _check_common(source, max_line_bytes)
        if self._cut.held != NULL:
            free(self._cut.held)
            self._cut.held = NULL
        _buf_reset(&self._out)
        _cutter_init(&self._cut, max_line_bytes, id_seed)
        self.source = source

    def __dealloc__(self):
        free(self._cut.held)
        free(self._out.data)

    @property
    def max_line_bytes(self):
        return self._cut.limit

    @property
    def held_bytes(self):
        return self._cut.held_len

    @property
    def lines_total(self):
        return self._cut.lines_total

    @property
    def bytes_total(self):
        return self._cut.bytes_total

    @property
    def partial_groups_total(self):
        return self._cut.partial_groups_total

    def feed(self, data, time_nano=-1):
        """Cut ``data``; return the messages it completes. ``time_nano`` -1 means now."""
        if self._cut.closed:
            raise ValueError("feed() after close()")
        if data is None:
            raise TypeError("feed() needs a bytes-like object, not None")
        cdef const unsigned char[::1] view = data
        cdef size_t size = view.shape[0]
        cdef const char *p = <const char *>&view[0] if size else NULL
        cdef int64_t t = check_time(time_nano)
        with nogil:
            if t < 0:
                t = _now_ns()
            _cut_feed(&self._cut, p, size, t, _cutter_collect, &self._out)
        return self._take()

    def close(self, time_nano=-1):
        """Flush at EOF: unterminated text goes out and its partial group is closed (last=True)."""
        cdef int64_t t = check_time(time_nano)
        if t < 0:
            t = _now_ns()
        _cut_close(&self._cut, t, _cutter_collect, &self._out)
        return self._take()

    cdef list _take(self):
        cdef list out = []
        cdef size_t pos = 0, n
        cdef int64_t t
        cdef int32_t ordinal
        cdef const char *p
        source = self.source
        while pos < self._out.length:
            p = self._out.data + pos
            n = _get_u32(p)
            memcpy(&t, p + 8 - 4, 8)
            memcpy(&ordinal, p + 12, 4)
            if ordinal:
                partial = Partial(PyBytes_FromStringAndSize(p + 17, 64).decode("ascii"),
                                  ordinal, bool(p[16]))
                line = PyBytes_FromStringAndSize(p + 17 + 64, n)
                pos += 17 + 64 + n
            else:
                partial = None
                line = PyBytes_FromStringAndSize(p + 17, n)
                pos += 17 + n
            out.append(Message(line, source, t, partial))
        _buf_reset(&self._out)
        return out
