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
                               BATCH_MAX_BYTES, check_limits, check_time)
from zeroline.errors import ConfigError, ProtocolError, TransportError
from zeroline._logentry_py import MAX_ENTRY_BYTES

import msgpack
import zmq

IMPLEMENTATION = "cython"

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


# The parts, in dependency order (Cython includes are textual: later parts use earlier ones).
include "libzmq.pxi"
include "msgpack.pxi"
include "batch.pxi"
include "cutter.pxi"
include "stream.pxi"
include "receiver.pxi"

# ---------------------------------------------------------------------------------------------
# The Docker plugin's LogEntry frames

include "logentry.pxi"
