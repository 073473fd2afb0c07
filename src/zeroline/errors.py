"""The one exception tree of zeroline: every error it raises on purpose is a ZerolineError."""


class ZerolineError(Exception):
    """Base class of every error zeroline raises on purpose."""


class ConfigError(ZerolineError, ValueError):
    """A bad option, log-opt or command line: a user mistake, reported in one line."""


class ProtocolError(ZerolineError, ValueError):
    """Malformed input from a peer: a plugin request, a FIFO frame, a received message."""


class TransportError(ZerolineError, OSError):
    """A ZeroMQ endpoint could not be used (malformed, unreachable, closed socket).

    Carries ``errno`` and ``endpoint`` so callers can tell EAGAIN-like retries from failures.
    """

    def __init__(self, message, errno=0, endpoint=None):
        super().__init__(message)
        self.errno = errno
        self.endpoint = endpoint

    def __str__(self):
        return self.args[0] if self.args else ""
