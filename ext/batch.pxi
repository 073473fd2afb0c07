# Included by _core.pyx. The acked transport's batch body (docs/acked-protocol.md): records as a
# 4-byte big-endian length and the msgpack record. Stream.take_batch builds one from the pending
# queue, Receiver.add_batch splits one into the receive batch; both copy without the GIL.
# The frame-level codec (kinds, stream id, seq) is plain Python in _core_py, shared by both.

# Indexes into _core_py._BATCH_ERRORS, the twin's texts for a malformed body.
cdef enum:
    BATCH_OK = -1
    BATCH_BAD_EMPTY = 0
    BATCH_BAD_HEADER = 1
    BATCH_BAD_LENGTH = 2
    BATCH_BAD_SIZE = 3
    BATCH_BAD_DEST = 4


cdef inline void _put_be32(char *p, uint32_t v) noexcept nogil:
    # The wire's lengths are big-endian, unlike the native u32s of the in-memory records.
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline uint32_t _read_be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef void _batch_measure(zl_framer *f, size_t max_bytes, size_t *records, size_t *body,
                         int64_t *line_bytes) noexcept nogil:
    # How many pending records from the head make a body of at most max_bytes (at least one).
    cdef zl_buffer *b = &f.pending
    cdef size_t pos = b.head, size = 0, n = 0, need
    cdef int64_t lines = 0
    cdef uint32_t plen
    while pos < b.length:
        plen = _get_u32(b.data + pos)
        need = 4 + <size_t>plen
        if n and size + need > max_bytes:
            break
        size += need
        lines += _get_u32(b.data + pos + 4)
        n += 1
        pos += 8 + plen
    records[0] = n
    body[0] = size
    line_bytes[0] = lines


cdef void _batch_fill(zl_framer *f, char *out, size_t records, int64_t line_bytes) noexcept nogil:
    # Moves `records` measured records from the head of the pending queue into `out`, then
    # accounts for them as _send_some does for sent ones.
    cdef zl_buffer *b = &f.pending
    cdef uint32_t plen
    cdef size_t i
    for i in range(records):
        plen = _get_u32(b.data + b.head)
        _put_be32(out, plen)
        memcpy(out + 4, b.data + b.head + 8, plen)
        out += 4 + plen
        b.head += 8 + plen
    f.pending_count -= records
    f.pending_line_bytes -= line_bytes
    if b.head == b.length:
        _buf_reset(b)
        if b.capacity > PENDING_KEEP_BYTES:
            # Drained: give a large batch buffer back, so idle streams stay small.
            free(b.data)
            b.data = NULL
            b.capacity = 0


cdef int _batch_check(const unsigned char *p, size_t n, size_t max_record,
                      size_t *records, size_t *record_bytes) noexcept nogil:
    # Walks a whole body before anything is added, so a malformed one adds nothing.
    # Returns BATCH_OK or the first complaint, in the twin's (split_batch) order.
    cdef size_t pos = 0, count = 0, total = 0
    cdef uint32_t length
    if n == 0:
        return BATCH_BAD_EMPTY
    while pos < n:
        if n - pos < 4:
            return BATCH_BAD_HEADER
        length = _read_be32(p + pos)
        pos += 4
        if length > n - pos:
            return BATCH_BAD_LENGTH
        if length > max_record:
            return BATCH_BAD_SIZE
        pos += length
        total += length
        count += 1
    records[0] = count
    record_bytes[0] = total
    return BATCH_OK


cdef int _batch_append(zl_buffer *b, const char *tenant, size_t tlen, const char *service,
                       size_t slen, const unsigned char *p, size_t n, size_t records,
                       size_t record_bytes) except -1 nogil:
    # Appends a checked body's records as received messages: [u32 len][frame] x 3 each.
    cdef size_t pos = 0
    cdef uint32_t length
    cdef char *w
    _buf_reserve(b, records * (12 + tlen + slen) + record_bytes)
    w = b.data + b.length
    while pos < n:
        length = _read_be32(p + pos)
        _put_u32(w, <uint32_t>tlen)
        w = _put(w + 4, tenant, tlen)
        _put_u32(w, <uint32_t>slen)
        w = _put(w + 4, service, slen)
        _put_u32(w, length)
        w = _put(w + 4, <const char *>p + pos + 4, length)
        pos += 4 + length
    b.length = <size_t>(w - b.data)
    return 0


cdef int _body_send(void *sock, const char *tenant, size_t tlen, const char *service,
                    size_t slen, const unsigned char *p, size_t n, size_t *offset,
                    int *err) noexcept nogil:
    # Sends the records of a checked body from offset[0] as [tenant, service, record] messages
    # until done or the socket refuses a first frame (EAGAIN): a spooled batch of a pub/push
    # sink going out. offset[0] is left at the first record not sent.
    cdef size_t pos = offset[0]
    cdef uint32_t length
    cdef int rc, e
    while pos < n:
        length = _read_be32(p + pos)
        rc = zmq_send(sock, tenant, tlen, ZMQ_SNDMORE | ZMQ_DONTWAIT)
        if rc < 0:
            e = zmq_errno()
            if e == EAGAIN or e == EINTR:
                break
            err[0] = e
            offset[0] = pos
            return SEND_ERROR
        # Committed: later frames of a message never hit EAGAIN (as in _send_some).
        while True:
            rc = zmq_send(sock, service, slen, ZMQ_SNDMORE)
            if rc >= 0 or zmq_errno() != EINTR:
                break
        if rc >= 0:
            while True:
                rc = zmq_send(sock, p + pos + 4, length, 0)
                if rc >= 0 or zmq_errno() != EINTR:
                    break
        if rc < 0:
            err[0] = zmq_errno()
            offset[0] = pos
            return SEND_ERROR
        pos += 4 + length
    offset[0] = pos
    return SEND_DONE if pos >= n else SEND_WOULD_BLOCK


def send_body(socket, tenant, service, body, size_t offset=0):
    """Send a batch body's records, from byte ``offset``, as 3-frame messages
    ``[tenant, service, record]`` without waiting; returns the offset of the first record not
    sent (``len(body)`` when all went). Same as zeroline._core_py.send_body.

    Raises:
        ProtocolError: ``reason == "batch"``, a malformed body (nothing is sent).
        TransportError: a send error.
    """
    cdef void *sock = _socket_handle(socket)
    cdef const unsigned char[::1] view = body
    cdef const unsigned char *p = &view[0] if view.shape[0] else NULL
    cdef size_t n = view.shape[0], records = 0, record_bytes = 0
    cdef bytes tb = _as_bytes(tenant, "tenant")
    cdef bytes sb = _as_bytes(service, "service")
    cdef const char *t = tb
    cdef const char *s = sb
    cdef size_t tlen = len(tb), slen = len(sb)
    cdef int rc, err = 0
    cdef int check
    with nogil:
        check = _batch_check(p, n, <size_t>-1, &records, &record_bytes)
    if check != BATCH_OK:
        raise _malformed("batch", _BATCH_ERRORS[check])
    if offset > n:
        raise ConfigError("offset %d is past the end of the body (%d bytes)" % (offset, n))
    with nogil:
        rc = _body_send(sock, t, tlen, s, slen, p, n, &offset, &err)
    if rc == SEND_ERROR:
        raise _zmq_error(err, "zmq send failed")
    return offset
