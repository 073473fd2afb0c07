# Included by _core.pyx. libzmq without zmq.h or a link: the prototypes we call, resolved at
# import through pyzmq's own extension module, and the one errno-to-exception mapper.

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD


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
