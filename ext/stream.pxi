# Included by _core.pyx. Stream: cut + frame into the pending batch + batched multipart send.

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

    def take_batch(self, max_bytes=BATCH_MAX_BYTES):
        """Remove pending messages from the head as one acked-transport batch body.

        Same contract as zeroline._core_py.Stream.take_batch: returns ``(body, records,
        line_bytes)``. Sized first, then one bytes object is filled without the GIL.
        """
        check_limits(max_bytes=max_bytes)
        cdef size_t limit = max_bytes, records, size
        cdef int64_t line_bytes
        with nogil:
            _batch_measure(&self._fr, limit, &records, &size, &line_bytes)
        if records == 0:
            return b"", 0, 0
        body = PyBytes_FromStringAndSize(NULL, size)
        cdef char *out = PyBytes_AS_STRING(body)
        with nogil:
            _batch_fill(&self._fr, out, records, line_bytes)
        return body, records, line_bytes

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
