# Included by _core.pyx. Growable byte buffers and the msgpack encoding pieces the framer writes.

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
