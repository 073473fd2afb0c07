"""zeroline: container logs over ZeroMQ, with Docker's copier semantics and a compiled core."""

import os as _os
from importlib import metadata as _metadata

from .core import (
    DEFAULT_LINE_BUFFER,
    IMPLEMENTATION,
    Framer,
    LineCutter,
    Message,
    Partial,
    Receiver,
    Stream,
    decode,
)
from .errors import ConfigError, ProtocolError, TransportError, ZerolineError
from . import transport as _transport  # noqa: F401  (registers the zmq log driver)

try:
    __version__ = _metadata.version("zeroline")
except _metadata.PackageNotFoundError:      # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_LINE_BUFFER",
    "IMPLEMENTATION",
    "ConfigError",
    "Framer",
    "LineCutter",
    "Message",
    "Partial",
    "ProtocolError",
    "Receiver",
    "Stream",
    "TransportError",
    "ZerolineError",
    "__version__",
    "decode",
    "get_include",
]


def get_include():
    """The directory to put on Cython's include path to ``cimport`` zeroline.

    It is the parent of the installed ``zeroline`` package, so that ``zeroline/__init__.pxd`` and
    ``zeroline/_core.pxd`` resolve: ``cythonize(..., include_path=[zeroline.get_include()])`` lets
    an extension write ``from zeroline cimport Stream``.

    Returns:
        An absolute path (str).
    """
    return _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
