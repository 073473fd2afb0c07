# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# Compiled data plane of zeroline: Docker-copier line cutting, seed/msgpack framing and batched
# ZeroMQ multipart send/receive, with the GIL released. Its pure-Python twin and readable
# specification is src/zeroline/_core_py.py; both must produce the same bytes.
#
# libzmq is never linked: at import we find the libzmq that pyzmq's own extension module already
# loaded (dlopen RTLD_NOLOAD of its file, then dlsym through that handle, which searches its
# dependencies) and call it through function pointers, so there is one libzmq in the process.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memchr, memcpy, memmove
from libc.errno cimport errno, EAGAIN, EINTR

import os

from zeroline._core_py import (Message, Partial, DEFAULT_LINE_BUFFER, SOURCES, FRAMINGS,
                               check_limits, check_time)
from zeroline.errors import ConfigError, ProtocolError, TransportError
from zeroline._logentry_py import MAX_ENTRY_BYTES

import msgpack
import zmq

IMPLEMENTATION = "cython"

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_REALTIME

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t buflen, unsigned int flags)

cdef extern from "<unistd.h>" nogil:
    int getpid()


# ---------------------------------------------------------------------------------------------
# libzmq, declared here (pyzmq wheels ship no zmq.h) and resolved at import.

ctypedef union zl_zmq_msg:
    unsigned char raw[64]       # zmq_msg_t is 64 opaque bytes, pointer-aligned
    void *align_p
    double align_d

ctypedef struct zl_pollitem:
    void *socket
    int fd
    short events
    short revents

ctypedef void (*fn_version)(int *, int *, int *) noexcept nogil
ctypedef int (*fn_errno)() noexcept nogil
ctypedef const char *(*fn_strerror)(int) noexcept nogil
ctypedef int (*fn_send)(void *, const void *, size_t, int) noexcept nogil
ctypedef int (*fn_poll)(zl_pollitem *, int, long) noexcept nogil
ctypedef int (*fn_msg_init)(zl_zmq_msg *) noexcept nogil
ctypedef int (*fn_msg_recv)(zl_zmq_msg *, void *, int) noexcept nogil
ctypedef int (*fn_msg_close)(zl_zmq_msg *) noexcept nogil
ctypedef void *(*fn_msg_data)(zl_zmq_msg *) noexcept nogil
ctypedef size_t (*fn_msg_size)(const zl_zmq_msg *) noexcept nogil
ctypedef int (*fn_msg_more)(const zl_zmq_msg *) noexcept nogil

cdef fn_version zmq_version
cdef fn_errno zmq_errno
cdef fn_strerror zmq_strerror
cdef fn_send zmq_send
cdef fn_poll zmq_poll
cdef fn_msg_init zmq_msg_init
cdef fn_msg_recv zmq_msg_recv
cdef fn_msg_close zmq_msg_close
cdef fn_msg_data zmq_msg_data
cdef fn_msg_size zmq_msg_size
cdef fn_msg_more zmq_msg_more

cdef enum:
    ZMQ_DONTWAIT = 1
    ZMQ_SNDMORE = 2
    ZMQ_POLLIN = 1
    ZMQ_POLLOUT = 2
    POLL_SLICE_MS = 100     # longest nogil wait before signals and cancel() are looked at
    PENDING_KEEP_BYTES = 64 * 1024   # batch buffer capacity kept by a stream once drained


cdef void *_resolve(void *handle, const char *name) except NULL:
    cdef void *sym = dlsym(handle, name)
    if sym == NULL:
        raise ImportError("zeroline: libzmq symbol %s not found through pyzmq" % name.decode())
    return sym


cdef int _load_libzmq() except -1:
    global zmq_version, zmq_errno, zmq_strerror, zmq_send, zmq_poll
    global zmq_msg_init, zmq_msg_recv, zmq_msg_close, zmq_msg_data, zmq_msg_size, zmq_msg_more
    import zmq.backend.cython._zmq as pyzmq_ext
    path = os.fsencode(pyzmq_ext.__file__)
    # RTLD_NOLOAD: only take a module that is already loaded, never load a second copy.
    cdef void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        raise ImportError("zeroline: cannot reach pyzmq's libzmq: %s" % dlerror().decode())
    zmq_version = <fn_version>_resolve(handle, b"zmq_version")
    zmq_errno = <fn_errno>_resolve(handle, b"zmq_errno")
    zmq_strerror = <fn_strerror>_resolve(handle, b"zmq_strerror")
    zmq_send = <fn_send>_resolve(handle, b"zmq_send")
    zmq_poll = <fn_poll>_resolve(handle, b"zmq_poll")
    zmq_msg_init = <fn_msg_init>_resolve(handle, b"zmq_msg_init")
    zmq_msg_recv = <fn_msg_recv>_resolve(handle, b"zmq_msg_recv")
    zmq_msg_close = <fn_msg_close>_resolve(handle, b"zmq_msg_close")
    zmq_msg_data = <fn_msg_data>_resolve(handle, b"zmq_msg_data")
    zmq_msg_size = <fn_msg_size>_resolve(handle, b"zmq_msg_size")
    zmq_msg_more = <fn_msg_more>_resolve(handle, b"zmq_msg_more")
    cdef int major = 0, minor = 0, patch = 0
    zmq_version(&major, &minor, &patch)
    found = "%d.%d.%d" % (major, minor, patch)
    if found != zmq.zmq_version():
        raise ImportError("zeroline: resolved libzmq %s but pyzmq uses %s" % (found, zmq.zmq_version()))
    return 0


_load_libzmq()


def libzmq_version():
    """Version of the libzmq the compiled core resolved (always pyzmq's own)."""
    cdef int major = 0, minor = 0, patch = 0
    zmq_version(&major, &minor, &patch)
    return "%d.%d.%d" % (major, minor, patch)


cdef inline void *_socket_handle(object socket) except NULL:
    if socket.closed:
        raise TransportError("cannot use the zmq socket: it is closed")
    return <void *><size_t>socket.underlying


cdef object _zmq_error(int err, str what):
    return TransportError("%s: %s" % (what, zmq_strerror(err).decode("utf-8", "replace")), err)


# ---------------------------------------------------------------------------------------------
# Buffers

cdef int _buf_reserve(zl_buffer *b, size_t extra) except -1 nogil:
    cdef size_t need = b.length + extra
    cdef size_t cap
    cdef char *data
    if need <= b.capacity:
        return 0
    if b.head > 0 and b.length - b.head + extra <= b.capacity:
        # Consumed space at the front is enough: slide the unconsumed records down.
        memmove(b.data, b.data + b.head, b.length - b.head)
        b.length -= b.head
        b.head = 0
        return 0
    cap = b.capacity * 2 if b.capacity else 4096
    while cap < need:
        cap *= 2
    data = <char *>realloc(b.data, cap)
    if data == NULL:
        with gil:
            raise MemoryError()
    b.data = data
    b.capacity = cap
    return 0


cdef inline void _buf_reset(zl_buffer *b) noexcept nogil:
    b.head = 0
    b.length = 0


cdef inline void _put_u32(char *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline uint32_t _get_u32(const char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


# ---------------------------------------------------------------------------------------------
# msgpack pieces; byte-for-byte what msgpack-python's packb gives for the same values.

cdef inline size_t _int_len(int64_t v) noexcept nogil:
    if v >= 0:
        if v <= 0x7f: return 1
        if v <= 0xff: return 2
        if v <= 0xffff: return 3
        if v <= 4294967295LL: return 5
        return 9
    if v >= -32: return 1
    if v >= -128: return 2
    if v >= -32768: return 3
    if v >= -2147483648: return 5
    return 9


cdef inline void _put_be(char *p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[n - 1 - i] = <char>(v & 0xff)
        v >>= 8


cdef inline char *_pack_int(char *p, int64_t v) noexcept nogil:
    cdef size_t n = _int_len(v)
    if n == 1:
        p[0] = <char>v
        return p + 1
    if v >= 0:
        p[0] = <char>(0xcc if n == 2 else 0xcd if n == 3 else 0xce if n == 5 else 0xcf)
    else:
        p[0] = <char>(0xd0 if n == 2 else 0xd1 if n == 3 else 0xd2 if n == 5 else 0xd3)
    _put_be(p + 1, <uint64_t>v, <int>(n - 1))
    return p + n


cdef inline size_t _bin_header_len(size_t n) noexcept nogil:
    return 2 if n <= 0xff else 3 if n <= 0xffff else 5


cdef inline char *_pack_bin_header(char *p, size_t n) noexcept nogil:
    if n <= 0xff:
        p[0] = <char>0xc4
        _put_be(p + 1, n, 1)
        return p + 2
    if n <= 0xffff:
        p[0] = <char>0xc5
        _put_be(p + 1, n, 2)
        return p + 3
    p[0] = <char>0xc6
    _put_be(p + 1, n, 4)
    return p + 5


cdef inline size_t _str_header_len(size_t n) noexcept nogil:
    return 1 if n <= 31 else 2 if n <= 0xff else 3 if n <= 0xffff else 5


cdef inline char *_pack_str_header(char *p, size_t n) noexcept nogil:
    if n <= 31:
        p[0] = <char>(0xa0 | n)
        return p + 1
    if n <= 0xff:
        p[0] = <char>0xd9
        _put_be(p + 1, n, 1)
        return p + 2
    if n <= 0xffff:
        p[0] = <char>0xda
        _put_be(p + 1, n, 2)
        return p + 3
    p[0] = <char>0xdb
    _put_be(p + 1, n, 4)
    return p + 5


cdef inline char *_put(char *p, const char *s, size_t n) noexcept nogil:
    memcpy(p, s, n)
    return p + n


# Fixed key strings, already msgpack-encoded as fixstr.
cdef const char *K_TIME = b"\xa9time_nano"
cdef const char *K_LINE = b"\xa4line"
cdef const char *K_SOURCE = b"\xa6source"
cdef const char *K_PARTIAL = b"\xa7partial\x83\xa2id"    # key, fixmap(3), key "id"
cdef const char *K_ORDINAL = b"\xa7ordinal"
cdef const char *K_LAST = b"\xa4last"
cdef enum:
    K_TIME_LEN = 10
    K_LINE_LEN = 5
    K_SOURCE_LEN = 7
    K_PARTIAL_LEN = 12
    K_ORDINAL_LEN = 8
    K_LAST_LEN = 5


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


# ---------------------------------------------------------------------------------------------
# Stream: cut + frame into a pending batch + batched multipart send.
# Pending records: [u32 payload_len][u32 line_len][payload]

cdef enum:
    SEND_DONE = 0
    SEND_WOULD_BLOCK = 1
    SEND_ERROR = 2


cdef int _frame_message(zl_framer *f, const char *line, size_t n, int64_t t,
                        const char *source, size_t source_len, const char *partial_id,
                        size_t id_len, int ordinal, bint last) except -1 nogil:
    # Frames one message into the pending batch (partial_id NULL: no partial metadata).
    cdef size_t plen
    cdef char *p
    if f.max_pending_bytes >= 0 and f.pending_count > 0 and \
            f.pending_line_bytes + <int64_t>n > f.max_pending_bytes:
        # Docker's ring buffer: the incoming message is dropped, the queued ones are kept.
        f.dropped_total += 1
        f.dropped_bytes_total += n
        return 0
    if f.framing == FRAMING_SEED:
        plen = f.prefix_len + n
    else:
        plen = 1 + f.prefix_len + K_SOURCE_LEN + _str_header_len(source_len) + source_len \
            + K_TIME_LEN + _int_len(t) + K_LINE_LEN + _bin_header_len(n) + n + f.attrs_len
        if partial_id != NULL:
            plen += K_PARTIAL_LEN + _str_header_len(id_len) + id_len + K_ORDINAL_LEN \
                + _int_len(ordinal) + K_LAST_LEN + 1
    _buf_reserve(&f.pending, 8 + plen)
    p = f.pending.data + f.pending.length
    _put_u32(p, <uint32_t>plen)
    _put_u32(p + 4, <uint32_t>n)
    p += 8
    if f.framing == FRAMING_SEED:
        p = _put(p, f.prefix, f.prefix_len)
        _put(p, line, n)
    else:
        # Key order and integer widths as msgpack-python's packb of the twin's dict.
        p[0] = <char>(0x85 + (partial_id != NULL) + (f.attrs_len > 0))
        p = _put(p + 1, f.prefix, f.prefix_len)
        p = _put(p, K_SOURCE, K_SOURCE_LEN)
        p = _pack_str_header(p, source_len)
        p = _put(p, source, source_len)
        p = _put(p, K_TIME, K_TIME_LEN)
        p = _pack_int(p, t)
        p = _put(p, K_LINE, K_LINE_LEN)
        p = _pack_bin_header(p, n)
        p = _put(p, line, n)
        if partial_id != NULL:
            p = _put(p, K_PARTIAL, K_PARTIAL_LEN)
            p = _pack_str_header(p, id_len)
            p = _put(p, partial_id, id_len)
            p = _put(p, K_ORDINAL, K_ORDINAL_LEN)
            p = _pack_int(p, ordinal)
            p = _put(p, K_LAST, K_LAST_LEN)
            p[0] = <char>(0xc3 if last else 0xc2)
            p += 1
        _put(p, f.attrs_tail, f.attrs_len)
    f.pending.length += 8 + plen
    f.pending_count += 1
    f.pending_line_bytes += n
    f.messages_total += 1
    return 0


cdef int _stream_emit(void *ctx, const char *line, size_t n, int64_t t,
                      const char *partial_id, int ordinal, bint last) except -1 nogil:
    # The cutter's callback: the stream's own source, 64-hex group ids.
    cdef zl_framer *f = <zl_framer *>ctx
    return _frame_message(f, line, n, t, f.source, f.source_len, partial_id, 64, ordinal, last)


cdef int _send_some(zl_framer *f, void *sock, bint block, const char *tenant, size_t tlen,
                    const char *service, size_t slen, uint64_t *sent, int *err) noexcept nogil:
    # Sends pending records until done, EAGAIN on a first frame, or an error. On EAGAIN in
    # blocking mode it waits up to one poll slice for POLLOUT and returns, so the caller can
    # look at signals and the cancel flag with the GIL.
    cdef zl_buffer *b = &f.pending
    cdef uint32_t plen, llen
    cdef int rc, e
    cdef zl_pollitem item
    while b.head < b.length:
        plen = _get_u32(b.data + b.head)
        llen = _get_u32(b.data + b.head + 4)
        rc = zmq_send(sock, tenant, tlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
        if rc < 0:
            e = zmq_errno()
            if e == EAGAIN:
                if block:
                    item.socket = sock
                    item.fd = 0
                    item.events = ZMQ_POLLOUT
                    item.revents = 0
                    if zmq_poll(&item, 1, POLL_SLICE_MS) < 0:
                        e = zmq_errno()
                        if e != EINTR:
                            err[0] = e
                            return SEND_ERROR
                return SEND_WOULD_BLOCK
            if e == EINTR:
                return SEND_WOULD_BLOCK
            err[0] = e
            return SEND_ERROR
        # The message is committed now: libzmq cannot take back a first frame, and later
        # frames never hit EAGAIN, so they go blocking (retrying only on EINTR).
        while True:
            rc = zmq_send(sock, service, slen, ZMQ_SNDMORE)
            if rc >= 0 or zmq_errno() != EINTR:
                break
        if rc >= 0:
            while True:
                rc = zmq_send(sock, b.data + b.head + 8, plen, 0)
                if rc >= 0 or zmq_errno() != EINTR:
                    break
        if rc < 0:
            err[0] = zmq_errno()
            return SEND_ERROR
        b.head += 8 + plen
        f.pending_count -= 1
        f.pending_line_bytes -= llen
        sent[0] += 1
    _buf_reset(b)
    if b.capacity > PENDING_KEEP_BYTES:
        # Everything went out: give a large batch buffer back, so idle streams stay small.
        free(b.data)
        b.data = NULL
        b.capacity = 0
    return SEND_DONE


cdef class Stream:
    """The data plane of one source of one container: cut, frame, queue, send.

    Same API and output as zeroline._core_py.Stream (see there). Cutting and framing of a whole
    read buffer, and the multipart sends of a whole batch, run without the GIL.
    """

    def __cinit__(self):
        self._cut.held = NULL
        self._fr.pending.data = NULL
        self._fr.pending.capacity = 0
        _buf_reset(&self._fr.pending)
        self._cancel = 0

    def __init__(self, source="stdout", *, framing="seed", tenant="default", service="default",
                 container_id="", container_name="", attrs=None,
                 max_line_bytes=DEFAULT_LINE_BUFFER, id_seed=None, max_pending_bytes=-1):
        _check_common(source, max_line_bytes)
        check_limits(max_pending_bytes=max_pending_bytes)
        if framing not in FRAMINGS:
            raise ConfigError("framing must be 'seed' or 'msgpack', got %r" % (framing,))
        if self._cut.held != NULL:
            free(self._cut.held)
            self._cut.held = NULL
        _buf_reset(&self._fr.pending)       # a second __init__ starts from nothing
        _cutter_init(&self._cut, max_line_bytes, id_seed)
        self._source = SOURCES.index(source)
        self._tenant = _as_bytes(tenant, "tenant")
        self._service = _as_bytes(service, "service")
        self._container_id = _as_bytes(container_id, "container_id").decode("utf-8", "replace")
        self._container_name = _as_bytes(container_name, "container_name").decode("utf-8", "replace")
        self._attrs = {str(k): str(v) for k, v in (attrs or {}).items()}
        if framing == "seed":
            self._prefix = self._container_id.encode("utf-8") + b": "
            self._attrs_tail = b""
        else:
            # The record's leading keys never change: encode them once, without the map header.
            head = msgpack.packb({"container_id": self._container_id,
                                  "container_name": self._container_name}, use_bin_type=True)
            self._prefix = head[1:]
            self._attrs_tail = (msgpack.packb({"attrs": self._attrs}, use_bin_type=True)[1:]
                                if self._attrs else b"")
        self._fr.framing = FRAMING_SEED if framing == "seed" else FRAMING_MSGPACK
        self._fr.prefix = PyBytes_AS_STRING(self._prefix)
        self._fr.prefix_len = len(self._prefix)
        self._fr.source = SOURCE_NAMES[self._source]
        self._fr.source_len = 6
        self._fr.attrs_tail = PyBytes_AS_STRING(self._attrs_tail)
        self._fr.attrs_len = len(self._attrs_tail)
        self._fr.max_pending_bytes = max_pending_bytes
        self._fr.pending_line_bytes = 0
        self._fr.pending_count = 0
        self._fr.messages_total = 0
        self._fr.dropped_total = 0
        self._fr.dropped_bytes_total = 0
        self.sent_total = 0
        self._pid = getpid()

    def __dealloc__(self):
        free(self._cut.held)
        free(self._fr.pending.data)

    # -- C API (see _core.pxd) ----------------------------------------------------------------
    cdef Py_ssize_t feed_raw(self, const char *data, size_t size, int64_t time_nano) except -1 nogil:
        cdef uint64_t before = self._fr.messages_total
        if time_nano < 0:
            time_nano = _now_ns()
        _cut_feed(&self._cut, data, size, time_nano, _stream_emit, &self._fr)
        return <Py_ssize_t>(self._fr.messages_total - before)

    cdef Py_ssize_t close_raw(self, int64_t time_nano) except -1 nogil:
        cdef uint64_t before = self._fr.messages_total
        if time_nano < 0:
            time_nano = _now_ns()
        _cut_close(&self._cut, time_nano, _stream_emit, &self._fr)
        return <Py_ssize_t>(self._fr.messages_total - before)

    cdef uint64_t pending_count(self) noexcept nogil:
        return self._fr.pending_count

    # -- counters -----------------------------------------------------------------------------
    @property
    def source(self):
        return SOURCES[self._source]

    @property
    def framing(self):
        return FRAMINGS[self._fr.framing]

    @property
    def tenant(self):
        return self._tenant

    @property
    def service(self):
        return self._service

    @property
    def max_pending_bytes(self):
        return self._fr.max_pending_bytes

    @property
    def messages_total(self):
        return self._fr.messages_total

    @property
    def dropped_total(self):
        return self._fr.dropped_total

    @property
    def dropped_bytes_total(self):
        return self._fr.dropped_bytes_total

    @property
    def lines_total(self):
        return self._cut.lines_total

    @property
    def bytes_total(self):
        return self._cut.bytes_total

    @property
    def partial_groups_total(self):
        return self._cut.partial_groups_total

    @property
    def held_bytes(self):
        return self._cut.held_len

    @property
    def pending_messages(self):
        return self._fr.pending_count

    @property
    def pending_bytes(self):
        """Line bytes queued and not yet sent (the ring-buffer accounting unit, as Docker)."""
        return self._fr.pending_line_bytes

    def stats(self):
        """Counters as a dict (names follow ``<thing>_<event>_total``)."""
        return {
            "lines_total": self.lines_total,
            "bytes_total": self.bytes_total,
            "partial_groups_total": self.partial_groups_total,
            "messages_total": self.messages_total,
            "sent_total": self.sent_total,
            "dropped_total": self.dropped_total,
            "dropped_bytes_total": self.dropped_bytes_total,
            "pending_messages": self.pending_messages,
        }

    # -- data plane ---------------------------------------------------------------------------
    def feed(self, data, time_nano=-1):
        """Cut and frame one read buffer. Returns how many messages were queued."""
        if self._cut.closed:
            raise ValueError("feed() after close()")
        if data is None:
            raise TypeError("feed() needs a bytes-like object, not None")
        cdef const unsigned char[::1] view = data
        cdef size_t size = view.shape[0]
        cdef const char *p = <const char *>&view[0] if size else NULL
        cdef Py_ssize_t n
        cdef int64_t t = check_time(time_nano)
        with nogil:
            n = self.feed_raw(p, size, t)
        return n

    def close(self, time_nano=-1):
        """Flush unterminated text at EOF. Returns how many messages were queued."""
        cdef Py_ssize_t n
        cdef int64_t t = check_time(time_nano)
        with nogil:
            n = self.close_raw(t)
        return n

    def take(self):
        """Remove and return the pending messages as lists of three frames (embedding, tests)."""
        cdef list out = []
        cdef size_t pos = self._fr.pending.head, plen
        while pos < self._fr.pending.length:
            plen = _get_u32(self._fr.pending.data + pos)
            out.append([self._tenant, self._service,
                        PyBytes_FromStringAndSize(self._fr.pending.data + pos + 8, plen)])
            pos += 8 + plen
        self.clear()
        return out

    def clear(self):
        """Forget the pending messages (they are not counted as sent)."""
        _buf_reset(&self._fr.pending)
        self._fr.pending_count = 0
        self._fr.pending_line_bytes = 0

    def cancel(self):
        """Make a blocking ``send()`` in another thread return at its next wake-up (<= 100 ms)."""
        self._cancel = 1

    def send(self, socket, bint block=True):
        """Send pending messages on a pyzmq socket; return how many went out.

        With ``block=False`` it stops at the first message the socket will not take (high-water
        mark, no peer) and keeps the rest pending. With ``block=True`` it waits for the socket,
        waking every 100 ms so Ctrl-C, signals and ``cancel()`` are noticed.

        Raises:
            TransportError: closed socket, use from a forked child, or a send error.
        """
        cdef void *sock = _socket_handle(socket)
        cdef uint64_t sent = 0
        cdef int err = 0, rc
        cdef const char *tenant = PyBytes_AS_STRING(self._tenant)
        cdef size_t tlen = len(self._tenant)
        cdef const char *service = PyBytes_AS_STRING(self._service)
        cdef size_t slen = len(self._service)
        if getpid() != self._pid:
            raise TransportError("cannot send: this socket belongs to the parent process (fork)")
        try:
            while True:
                with nogil:
                    rc = _send_some(&self._fr, sock, block, tenant, tlen, service, slen, &sent, &err)
                if rc == SEND_DONE:
                    break
                if rc == SEND_ERROR:
                    raise _zmq_error(err, "zmq send failed")
                if not block:
                    break
                if self._cancel:
                    self._cancel = 0        # consumed: the next send() blocks again
                    break
                PyErr_CheckSignals()
                if socket.closed:
                    raise TransportError("cannot send: the zmq socket was closed")
        finally:
            self.sent_total += sent
        return sent


# ---------------------------------------------------------------------------------------------
# Receiver: batched multipart receive. Batch records: [u32 len][frame] x 3

from libc.stdlib cimport calloc
from libc.string cimport memcmp, memset

from zeroline._core_py import MALFORMED_REASONS, render_text as _py_render_text
from zeroline.errors import ProtocolError

# Indexes into Receiver._malformed, in the order of _core_py.MALFORMED_REASONS.
cdef enum:
    BAD_FRAMES = 0
    BAD_FRAME_SIZE = 1
    BAD_SEED = 2


cdef int _recv_some(Receiver self, void *sock, size_t max_messages, long timeout_ms,
                    uint64_t *got, int *err) except -1 nogil:
    cdef zl_pollitem item
    cdef zl_zmq_msg msg
    cdef int rc, parts, e
    cdef size_t start, size
    cdef bint bad, oversize
    item.socket = sock
    item.fd = 0
    item.events = ZMQ_POLLIN
    item.revents = 0
    rc = zmq_poll(&item, 1, timeout_ms)
    if rc < 0:
        e = zmq_errno()
        if e == EINTR:
            return 0
        err[0] = e
        return 1
    if rc == 0:
        return 0
    while got[0] < max_messages:
        start = self._batch.length
        parts = 0
        bad = oversize = False
        while True:
            zmq_msg_init(&msg)
            rc = zmq_msg_recv(&msg, sock, ZMQ_DONTWAIT)
            if rc < 0:
                e = zmq_errno()
                zmq_msg_close(&msg)
                if parts == 0 and (e == EAGAIN or e == EINTR):
                    return 0
                if e == EINTR:
                    continue        # inside a multipart message: the rest is already here
                err[0] = e
                return 1
            size = zmq_msg_size(&msg)
            parts += 1
            if size > self._max_frame_bytes:
                oversize = True
            if parts > 3 or oversize:
                bad = True
            if not bad:
                _buf_reserve(&self._batch, 4 + size)
                _put_u32(self._batch.data + self._batch.length, <uint32_t>size)
                memcpy(self._batch.data + self._batch.length + 4, zmq_msg_data(&msg), size)
                self._batch.length += 4 + size
            rc = zmq_msg_more(&msg)
            zmq_msg_close(&msg)
            if not rc:
                break
        if bad or parts != 3:
            # The frame count is the first complaint, as in the twin.
            self._batch.length = start
            self._malformed[BAD_FRAMES if parts != 3 else BAD_FRAME_SIZE] += 1
            self.malformed_total += 1
            continue
        self.bytes_total += size     # the last frame: the payload
        self._count += 1
        self.messages_total += 1
        got[0] += 1
    return 0


# ---------------------------------------------------------------------------------------------
# take_rendered: the batch as text lines grouped by (tenant, service), the twin's
# Receiver.take_rendered byte for byte. Four steps per batch:
#   1. nogil: parse every message, find its destination, classify it; records as zeroline frames
#      them are parsed here, anything else (and every partial chunk) is left to step 2;
#   2. GIL, only when step 1 left something: _core_py.render_text decides those, so the unusual
#      cases cannot disagree with the twin;
#   3. nogil: runs (one per destination, ended by a held partial chunk) and their sizes;
#   4. one bytes object per run, filled without the GIL.

cdef enum:
    R_SEED = 0          # payload + "\n"
    R_RECORD = 1        # cid " " source ": " line "\n", from a record parsed in C
    R_PY = 2            # a line rendered by render_text
    R_HELD = 3          # a partial chunk: its payload goes back to the caller
    R_SKIP = 4          # malformed: counted, left out
    R_FALLBACK = 5      # for render_text to decide

# The keys of a zeroline record, one bit each (a repeated or unknown key means: not ours).
cdef enum:
    KEY_CID = 1
    KEY_NAME = 2
    KEY_SOURCE = 4
    KEY_TIME = 8
    KEY_LINE = 16
    KEY_ATTRS = 32
    KEY_PARTIAL = 64

# What a record's payload starts with after its fixmap byte: fixstr(12) "container_id".
cdef const char *RECORD_HEAD = b"\xaccontainer_id"

ctypedef struct zl_rmsg:
    const char *tenant          # borrowed from the batch buffer, like service and payload
    const char *service
    const char *payload
    const char *py_line         # R_PY: borrowed from a bytes object held in `keep`
    size_t out_len              # bytes this message adds to its run
    uint32_t tlen, slen, plen
    uint32_t cid_off, cid_len, src_off, src_len, line_off, line_len   # R_RECORD, in payload
    int32_t dest
    int32_t run
    int32_t obj                 # R_PY/R_HELD: index in `keep`
    int kind

ctypedef struct zl_rdest:
    const char *tenant
    const char *service
    uint32_t tlen, slen
    uint64_t hash
    int32_t run                 # run still taking lines, or -1

ctypedef struct zl_rrun:
    int32_t dest
    int32_t held                # message index of the partial chunk that ended it, or -1
    size_t size
    size_t fill
    char *out                   # the run's bytes object, being filled

ctypedef struct zl_render:
    zl_rmsg *msgs
    size_t msgs_cap
    zl_rdest *dests
    size_t ndests, dests_cap
    int32_t *table              # open addressing over dests; -1 empty; capacity a power of two
    size_t table_cap
    zl_rrun *runs
    size_t nruns, runs_cap


cdef int _reserve(void **data, size_t *cap, size_t need, size_t elem) except -1 nogil:
    cdef size_t n
    cdef void *p
    if need <= cap[0]:
        return 0
    n = cap[0] * 2 if cap[0] else 64
    while n < need:
        n *= 2
    p = realloc(data[0], n * elem)
    if p == NULL:
        with gil:
            raise MemoryError()
    data[0] = p
    cap[0] = n
    return 0


cdef void _render_free(zl_render *r) noexcept nogil:
    if r != NULL:
        free(r.msgs)
        free(r.dests)
        free(r.table)
        free(r.runs)
        free(r)


cdef inline uint64_t _fnv(uint64_t h, const char *s, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        h = (h ^ <unsigned char>s[i]) * 0x100000001b3ULL
    return h


cdef int _table_insert(zl_render *r, int32_t d) noexcept nogil:
    cdef size_t mask = r.table_cap - 1
    cdef size_t i = r.dests[d].hash & mask
    while r.table[i] >= 0:
        i = (i + 1) & mask
    r.table[i] = d
    return 0


cdef int32_t _dest_of(zl_render *r, zl_rmsg *m) except -1 nogil:
    cdef uint64_t h = _fnv(0xcbf29ce484222325ULL, m.tenant, m.tlen)
    cdef size_t mask, i, cap
    cdef int32_t d
    cdef zl_rdest *x
    h = _fnv(h ^ m.tlen, b"\xff", 1)     # tenant "ab"/service "c" is not tenant "a"/service "bc"
    h = _fnv(h, m.service, m.slen)
    mask = r.table_cap - 1
    i = h & mask
    while r.table[i] >= 0:
        x = &r.dests[r.table[i]]
        if x.hash == h and x.tlen == m.tlen and x.slen == m.slen and \
                memcmp(x.tenant, m.tenant, m.tlen) == 0 and memcmp(x.service, m.service, m.slen) == 0:
            return r.table[i]
        i = (i + 1) & mask
    _reserve(<void **>&r.dests, &r.dests_cap, r.ndests + 1, sizeof(zl_rdest))
    d = <int32_t>r.ndests
    r.ndests += 1
    x = &r.dests[d]
    x.tenant = m.tenant
    x.service = m.service
    x.tlen = m.tlen
    x.slen = m.slen
    x.hash = h
    x.run = -1
    if r.ndests * 2 > r.table_cap:
        # Keep the table at most half full: grow and insert everything again.
        cap = r.table_cap * 2
        free(r.table)
        r.table = <int32_t *>malloc(cap * sizeof(int32_t))
        if r.table == NULL:
            r.table_cap = 0
            with gil:
                raise MemoryError()
        r.table_cap = cap
        memset(r.table, 0xff, cap * sizeof(int32_t))
        for d in range(<int32_t>r.ndests):
            _table_insert(r, d)
        return <int32_t>(r.ndests - 1)
    r.table[i] = d
    return d


cdef bint _utf8_ok(const unsigned char *s, size_t n) noexcept nogil:
    # Exactly what a strict UTF-8 decode accepts: no overlongs, surrogates or code points past
    # U+10FFFF (msgpack-python decodes str with errors="strict").
    cdef size_t i = 0
    cdef unsigned char c, lo, hi
    cdef int k, j
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xbf
        if 0xc2 <= c <= 0xdf:
            k = 1
        elif 0xe0 <= c <= 0xef:
            k = 2
            if c == 0xe0:
                lo = 0xa0
            elif c == 0xed:
                hi = 0x9f
        elif 0xf0 <= c <= 0xf4:
            k = 3
            if c == 0xf0:
                lo = 0x90
            elif c == 0xf4:
                hi = 0x8f
        else:
            return False
        if n - i <= <size_t>k:
            return False
        if not lo <= s[i + 1] <= hi:
            return False
        for j in range(2, k + 1):
            if not 0x80 <= s[i + j] <= 0xbf:
                return False
        i += k + 1
    return True


cdef inline bint _read_len(const unsigned char *p, size_t n, size_t *pos, int width,
                           size_t *length) noexcept nogil:
    # A big-endian length of `width` bytes at pos; False when the payload ends first.
    cdef size_t v = 0
    cdef int i
    if n - pos[0] < <size_t>width:
        return False
    for i in range(width):
        v = (v << 8) | p[pos[0] + i]
    pos[0] += width
    length[0] = v
    return True


cdef bint _read_str(const unsigned char *p, size_t n, size_t *pos, uint32_t *off,
                    uint32_t *length) noexcept nogil:
    # A msgpack str of valid UTF-8: its offset and length; False for anything else.
    cdef unsigned char c
    cdef size_t v
    if pos[0] >= n:
        return False
    c = p[pos[0]]
    pos[0] += 1
    if 0xa0 <= c <= 0xbf:
        v = c & 0x1f
    elif c == 0xd9:
        if not _read_len(p, n, pos, 1, &v): return False
    elif c == 0xda:
        if not _read_len(p, n, pos, 2, &v): return False
    elif c == 0xdb:
        if not _read_len(p, n, pos, 4, &v): return False
    else:
        return False
    if n - pos[0] < v or not _utf8_ok(p + pos[0], v):
        return False
    off[0] = <uint32_t>pos[0]
    length[0] = <uint32_t>v
    pos[0] += v
    return True


cdef bint _read_bin(const unsigned char *p, size_t n, size_t *pos, uint32_t *off,
                    uint32_t *length) noexcept nogil:
    cdef unsigned char c
    cdef size_t v
    if pos[0] >= n:
        return False
    c = p[pos[0]]
    pos[0] += 1
    if c == 0xc4:
        if not _read_len(p, n, pos, 1, &v): return False
    elif c == 0xc5:
        if not _read_len(p, n, pos, 2, &v): return False
    elif c == 0xc6:
        if not _read_len(p, n, pos, 4, &v): return False
    else:
        return False
    if n - pos[0] < v:
        return False
    off[0] = <uint32_t>pos[0]
    length[0] = <uint32_t>v
    pos[0] += v
    return True


cdef bint _skip_int(const unsigned char *p, size_t n, size_t *pos) noexcept nogil:
    cdef unsigned char c
    cdef size_t width
    if pos[0] >= n:
        return False
    c = p[pos[0]]
    pos[0] += 1
    if c <= 0x7f or c >= 0xe0:
        return True
    if 0xcc <= c <= 0xcf:
        width = <size_t>1 << (c - 0xcc)
    elif 0xd0 <= c <= 0xd3:
        width = <size_t>1 << (c - 0xd0)
    else:
        return False
    if n - pos[0] < width:
        return False
    pos[0] += width
    return True


cdef bint _skip_str_map(const unsigned char *p, size_t n, size_t *pos) noexcept nogil:
    # attrs: a map of str to str.
    cdef unsigned char c
    cdef size_t count, i
    cdef uint32_t off, length
    if pos[0] >= n:
        return False
    c = p[pos[0]]
    pos[0] += 1
    if 0x80 <= c <= 0x8f:
        count = c & 0x0f
    elif c == 0xde:
        if not _read_len(p, n, pos, 2, &count): return False
    elif c == 0xdf:
        if not _read_len(p, n, pos, 4, &count): return False
    else:
        return False
    for i in range(count):
        if not _read_str(p, n, pos, &off, &length) or not _read_str(p, n, pos, &off, &length):
            return False
    return True


cdef inline int _key_bit(const unsigned char *k, size_t n) noexcept nogil:
    if n == 12 and memcmp(k, b"container_id", 12) == 0: return KEY_CID
    if n == 14 and memcmp(k, b"container_name", 14) == 0: return KEY_NAME
    if n == 6 and memcmp(k, b"source", 6) == 0: return KEY_SOURCE
    if n == 9 and memcmp(k, b"time_nano", 9) == 0: return KEY_TIME
    if n == 4 and memcmp(k, b"line", 4) == 0: return KEY_LINE
    if n == 5 and memcmp(k, b"attrs", 5) == 0: return KEY_ATTRS
    if n == 7 and memcmp(k, b"partial", 7) == 0: return KEY_PARTIAL
    return 0


cdef bint _parse_record(const unsigned char *p, size_t n, zl_rmsg *m) noexcept nogil:
    # True when the payload is a zeroline record without partial metadata, exactly as the
    # twin's decode_payload would accept it, with the offsets render_text needs; False sends it
    # to render_text (partial chunks, other types or orders, duplicates, bad UTF-8, trailing
    # bytes). The caller checked the fixmap byte and the container_id key.
    cdef size_t pos = 1, klen
    cdef int count = p[0] & 0x0f, i, bit, seen = 0
    cdef uint32_t off, length
    m.src_off = 0
    m.src_len = 0
    for i in range(count):
        if pos >= n or not 0xa0 <= p[pos] <= 0xbf:
            return False
        klen = p[pos] & 0x1f
        pos += 1
        if n - pos < klen:
            return False
        bit = _key_bit(p + pos, klen)
        pos += klen
        if bit == 0 or bit == KEY_PARTIAL or seen & bit:
            return False
        seen |= bit
        if bit == KEY_TIME:
            if not _skip_int(p, n, &pos):
                return False
        elif bit == KEY_LINE:
            if not _read_bin(p, n, &pos, &m.line_off, &m.line_len):
                return False
        elif bit == KEY_ATTRS:
            if not _skip_str_map(p, n, &pos):
                return False
        else:
            if not _read_str(p, n, &pos, &off, &length):
                return False
            if bit == KEY_CID:
                m.cid_off = off
                m.cid_len = length
            elif bit == KEY_SOURCE:
                m.src_off = off
                m.src_len = length
    return pos == n and (seen & KEY_LINE) != 0


cdef inline bint _has_seed_sep(const char *p, size_t n) noexcept nogil:
    # b": " anywhere: the end of "<container_id>: ".
    cdef const char *end = p + n
    cdef const char *q = p
    while q < end:
        q = <const char *>memchr(q, b':', <size_t>(end - q))
        if q == NULL or q + 1 >= end:
            return False
        if q[1] == b' ':
            return True
        q += 1
    return False


cdef int _render_parse(Receiver self, zl_render *r, size_t n, size_t *fallbacks) except -1 nogil:
    cdef size_t pos = 0, i
    cdef const char *b = self._batch.data
    cdef const unsigned char *p
    cdef zl_rmsg *m
    _reserve(<void **>&r.msgs, &r.msgs_cap, n, sizeof(zl_rmsg))
    if r.table == NULL:
        r.table = <int32_t *>malloc(64 * sizeof(int32_t))
        if r.table == NULL:
            with gil:
                raise MemoryError()
        r.table_cap = 64
    memset(r.table, 0xff, r.table_cap * sizeof(int32_t))
    r.ndests = 0
    for i in range(n):
        m = &r.msgs[i]
        m.tlen = _get_u32(b + pos)
        m.tenant = b + pos + 4
        pos += 4 + m.tlen
        m.slen = _get_u32(b + pos)
        m.service = b + pos + 4
        pos += 4 + m.slen
        m.plen = _get_u32(b + pos)
        m.payload = b + pos + 4
        pos += 4 + m.plen
        m.dest = _dest_of(r, m)
        m.run = -1
        m.obj = -1
        p = <const unsigned char *>m.payload
        if m.plen >= 14 and 0x85 <= p[0] <= 0x87 and memcmp(p + 1, RECORD_HEAD, 13) == 0:
            if _parse_record(p, m.plen, m):
                m.kind = R_RECORD
                m.out_len = m.cid_len + 1 + m.src_len + 2 + m.line_len + 1
            else:
                m.kind = R_FALLBACK
                fallbacks[0] += 1
        elif _has_seed_sep(m.payload, m.plen):
            m.kind = R_SEED
            m.out_len = m.plen + 1
        else:
            m.kind = R_SKIP
            self._malformed[BAD_SEED] += 1
            self.malformed_total += 1
    return 0


cdef int _render_runs(zl_render *r, size_t n) except -1 nogil:
    cdef size_t i
    cdef zl_rmsg *m
    cdef zl_rdest *d
    cdef zl_rrun *run
    r.nruns = 0
    for i in range(n):
        m = &r.msgs[i]
        if m.kind == R_SKIP:
            continue
        d = &r.dests[m.dest]
        if d.run < 0:
            _reserve(<void **>&r.runs, &r.runs_cap, r.nruns + 1, sizeof(zl_rrun))
            d.run = <int32_t>r.nruns
            run = &r.runs[r.nruns]
            r.nruns += 1
            run.dest = m.dest
            run.held = -1
            run.size = 0
            run.fill = 0
            run.out = NULL
        run = &r.runs[d.run]
        if m.kind == R_HELD:
            run.held = <int32_t>i
            d.run = -1          # the destination's next message starts a new run
        else:
            m.run = d.run
            run.size += m.out_len
    return 0


cdef void _render_copy(zl_render *r, size_t n) noexcept nogil:
    cdef size_t i
    cdef zl_rmsg *m
    cdef zl_rrun *run
    cdef char *w
    for i in range(n):
        m = &r.msgs[i]
        if m.run < 0:
            continue
        run = &r.runs[m.run]
        w = run.out + run.fill
        run.fill += m.out_len
        if m.kind == R_SEED:
            w = _put(w, m.payload, m.plen)
        elif m.kind == R_RECORD:
            w = _put(w, m.payload + m.cid_off, m.cid_len)
            w[0] = b' '
            w = _put(w + 1, m.payload + m.src_off, m.src_len)
            w[0] = b':'
            w[1] = b' '
            w = _put(w + 2, m.payload + m.line_off, m.line_len)
        else:
            _put(w, m.py_line, m.out_len)
            continue
        w[0] = b'\n'


cdef class Receiver:
    """Receives 3-frame messages in batches (the collector's and benchmarks' receive path).

    Same API as zeroline._core_py.Receiver (see there).
    """

    def __cinit__(self):
        self._batch.data = NULL
        self._batch.capacity = 0
        _buf_reset(&self._batch)
        self._count = 0
        self._render = NULL
        memset(self._malformed, 0, sizeof(self._malformed))

    def __init__(self, max_frame_bytes=64 * 1024 * 1024):
        check_limits(max_frame_bytes=max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._pid = getpid()

    def __dealloc__(self):
        free(self._batch.data)
        _render_free(<zl_render *>self._render)

    @property
    def max_frame_bytes(self):
        return self._max_frame_bytes

    @property
    def pending_messages(self):
        return self._count

    @property
    def malformed_reasons(self):
        """``{reason: count}`` for every reason in MALFORMED_REASONS (a copy)."""
        return {reason: self._malformed[i] for i, reason in enumerate(MALFORMED_REASONS)}

    def recv(self, socket, size_t max_messages=4096, long timeout_ms=100):
        """Receive up to ``max_messages``; return how many well-formed ones were added."""
        cdef void *sock = _socket_handle(socket)
        cdef uint64_t got = 0
        cdef int err = 0, rc
        cdef long slice_ms
        cdef long left = timeout_ms
        if getpid() != self._pid:
            raise TransportError("cannot receive: this socket belongs to the parent process (fork)")
        while True:
            slice_ms = POLL_SLICE_MS if left < 0 or left > POLL_SLICE_MS else left
            with nogil:
                rc = _recv_some(self, sock, max_messages, slice_ms, &got, &err)
            if rc:
                raise _zmq_error(err, "zmq receive failed")
            if got or left == 0:
                break
            if left > 0:
                left -= slice_ms
            PyErr_CheckSignals()
        return got

    def take(self):
        """Remove and return the received messages as lists of three frames."""
        cdef list out = []
        cdef size_t pos = 0, n
        cdef int i
        while pos < self._batch.length:
            frames = []
            for i in range(3):
                n = _get_u32(self._batch.data + pos)
                frames.append(PyBytes_FromStringAndSize(self._batch.data + pos + 4, n))
                pos += 4 + n
            out.append(frames)
        _buf_reset(&self._batch)
        self._count = 0
        return out

    def take_payloads(self):
        """Remove the received messages and return their third frames, each followed by "\\n"."""
        cdef size_t pos = 0, n, total = 0
        cdef int i
        # First pass sizes the result, second fills it: one allocation.
        while pos < self._batch.length:
            for i in range(3):
                n = _get_u32(self._batch.data + pos)
                if i == 2:
                    total += n + 1
                pos += 4 + n
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *w = PyBytes_AS_STRING(out)
        pos = 0
        while pos < self._batch.length:
            for i in range(3):
                n = _get_u32(self._batch.data + pos)
                if i == 2:
                    memcpy(w, self._batch.data + pos + 4, n)
                    w[n] = b'\n'
                    w += n + 1
                pos += 4 + n
        _buf_reset(&self._batch)
        self._count = 0
        return out

    def take_rendered(self):
        """Remove the received messages and return them rendered as text, grouped by destination.

        Same output as zeroline._core_py.Receiver.take_rendered (see there): a list of
        ``(tenant, service, data, held)``.
        """
        cdef size_t n = self._count, i, fallbacks = 0
        cdef zl_render *r
        cdef zl_rmsg *m
        cdef zl_rrun *run
        cdef zl_rdest *d
        cdef list keep, runs, dest_objs, out
        if n == 0:
            _buf_reset(&self._batch)
            return []
        if self._render == NULL:
            self._render = calloc(1, sizeof(zl_render))
            if self._render == NULL:
                raise MemoryError()
        r = <zl_render *>self._render
        # From here on the batch is consumed, whatever happens.
        try:
            with nogil:
                _render_parse(self, r, n, &fallbacks)
            keep = []
            if fallbacks:
                for i in range(n):
                    m = &r.msgs[i]
                    if m.kind != R_FALLBACK:
                        continue
                    payload = PyBytes_FromStringAndSize(m.payload, m.plen)
                    try:
                        line = _py_render_text(payload)
                    except ProtocolError as exc:
                        self._malformed[MALFORMED_REASONS.index(exc.reason)] += 1
                        self.malformed_total += 1
                        m.kind = R_SKIP
                        continue
                    m.obj = len(keep)
                    if line is None:
                        m.kind = R_HELD
                        keep.append(payload)
                    else:
                        m.kind = R_PY
                        keep.append(line)
                        m.py_line = PyBytes_AS_STRING(line)
                        m.out_len = len(line)
            with nogil:
                _render_runs(r, n)
            runs = []
            for i in range(r.nruns):
                run = &r.runs[i]
                data = PyBytes_FromStringAndSize(NULL, run.size)
                run.out = PyBytes_AS_STRING(data)
                runs.append(data)
            with nogil:
                _render_copy(r, n)
            dest_objs = [None] * <Py_ssize_t>r.ndests
            out = []
            for i in range(r.nruns):
                run = &r.runs[i]
                names = dest_objs[run.dest]
                if names is None:
                    d = &r.dests[run.dest]
                    names = dest_objs[run.dest] = (PyBytes_FromStringAndSize(d.tenant, d.tlen),
                                                   PyBytes_FromStringAndSize(d.service, d.slen))
                out.append((names[0], names[1], runs[i],
                            keep[r.msgs[run.held].obj] if run.held >= 0 else None))
            return out
        finally:
            _buf_reset(&self._batch)
            self._count = 0


# ---------------------------------------------------------------------------------------------
# The Docker plugin's LogEntry frames

include "logentry.pxi"
