"""The log processing center: binds PULL/SUB sockets, receives batches, writes tenant/service files."""

import base64
import json
import os
import threading
import time

import zmq

from . import core
from .errors import ConfigError, ProtocolError, TransportError

FORMATS = ("text", "json")
#: How long the chunks of a long line wait for the rest of their group before they are written
#: one per line as they are (a forwarder that died mid-line never sends the last chunk).
REASSEMBLY_WAIT_S = 5.0


def safe_path_part(value):
    """A tenant or service value as one harmless path component: no separators, NUL, '.' or '..'."""
    text = value.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if text in ("", ".", ".."):
        text = "_" + text
    return text


def render(message, fmt):
    """One decoded message (:func:`zeroline.core.decode`) as one output line, without the newline.

    Text: seed messages as received (``<container_id>: <line>``); msgpack messages as
    ``<container_id> <source>: <line>``. JSON: every field the framing carries; the line as UTF-8
    text when it is valid, else under ``line_base64``.
    """
    line = message["line"]
    if fmt == "text":
        if message["framing"] == "seed":
            return message["container_id"].encode() + b": " + line
        return ("%s %s: " % (message["container_id"], message.get("source", ""))).encode() + line
    out = dict(message)
    try:
        out["line"] = line.decode("utf-8")
    except UnicodeDecodeError:
        del out["line"]
        out["line_base64"] = base64.b64encode(line).decode("ascii")
    return json.dumps(out, ensure_ascii=False, sort_keys=False).encode("utf-8")


class Collector:
    """Receives 3-frame messages of either framing and writes them out.

    Args:
        out_dir: write ``OUT/<tenant>/<service>.log``; or None with ``out`` set.
        out: a binary file object to write every line to instead (``--stdout``).
        fmt: ``"text"`` or ``"json"``.
        context: a pyzmq context (default: a new one, terminated by :meth:`close`).

    Counters: ``messages_total``, ``bytes_total``, ``malformed_total``.
    """

    def __init__(self, out_dir=None, out=None, fmt="text", context=None):
        if fmt not in FORMATS:
            raise ConfigError("--format must be text or json, got %r" % (fmt,))
        if (out_dir is None) == (out is None):
            raise ConfigError("give exactly one of --out DIR or --stdout")
        self.out_dir = out_dir
        self.out = out
        self.fmt = fmt
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        self.sockets = []
        self.endpoints = []
        self._receiver = core.Receiver()
        self._files = {}
        self._stop = threading.Event()
        self._groups = {}       # partial id -> (first seen, tenant, service, prefix, [chunks])
        self.decode_errors_total = 0
        self.partial_expired_total = 0

    messages_total = property(lambda self: self._receiver.messages_total)
    bytes_total = property(lambda self: self._receiver.bytes_total)
    malformed_total = property(lambda self: self._receiver.malformed_total + self.decode_errors_total)

    def bind(self, endpoint, kind="pull"):
        """Bind a PULL (``kind="pull"``, for push forwarders) or SUB (``"sub"``, subscribed to
        everything, for pub forwarders) socket. The receive high-water mark is unlimited: libzmq was
        seen to lose queued messages when a sender disconnects while the receiver is at its HWM."""
        sock = self.context.socket(zmq.PULL if kind == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError("cannot bind %s: %s" % (endpoint, exc.strerror), exc.errno,
                                 endpoint) from None
        self.sockets.append(sock)
        self.endpoints.append(endpoint)
        return sock

    def stop(self):
        """Ask :meth:`run` to return after its current batch (thread-safe)."""
        self._stop.set()

    def run(self, until_messages=None):
        """Receive and write until :meth:`stop`, or until ``until_messages`` were received."""
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if until_messages is not None and self.messages_total >= until_messages:
                break
            for sock, _ in poller.poll(100):
                self._receiver.recv(sock, 65536, 0)
            self._write(self._receiver.take())
            if self._groups:
                self._expire_groups(time.monotonic() - REASSEMBLY_WAIT_S)
        self.flush()

    def _write(self, batch):
        for frames in batch:
            try:
                message = core.decode(frames)
            except ProtocolError:
                self.decode_errors_total += 1
                continue
            partial = message.get("partial")
            if partial is not None and self.fmt == "text":
                self._reassemble(message, partial)
                continue
            self._emit(message["tenant"], message["service"], render(message, self.fmt))

    def _emit(self, tenant, service, line):
        if self.out is not None:
            self.out.write(line + b"\n")
        else:
            self._file(tenant, service).write(line + b"\n")

    def _reassemble(self, message, partial):
        # Text output shows a long line as one line once all its chunks are here.
        key = partial["id"]
        group = self._groups.get(key)
        if group is None:
            prefix = render(dict(message, line=b""), "text")
            group = self._groups[key] = (time.monotonic(), message["tenant"], message["service"],
                                         prefix, [])
        group[4].append(message["line"])
        if partial["last"]:
            del self._groups[key]
            self._emit(group[1], group[2], group[3] + b"".join(group[4]))

    def _expire_groups(self, older_than):
        for key in [k for k, g in self._groups.items() if g[0] <= older_than]:
            _, tenant, service, prefix, chunks = self._groups.pop(key)
            self.partial_expired_total += 1
            for chunk in chunks:
                self._emit(tenant, service, prefix + chunk)

    def _file(self, tenant, service):
        key = (tenant, service)
        handle = self._files.get(key)
        if handle is None:
            folder = os.path.join(self.out_dir, safe_path_part(tenant))
            os.makedirs(folder, exist_ok=True)
            handle = open(os.path.join(folder, safe_path_part(service) + ".log"), "ab")
            self._files[key] = handle
        return handle

    def paths(self):
        """Files written so far."""
        return sorted(h.name for h in self._files.values())

    def flush(self):
        for handle in self._files.values():
            handle.flush()
        if self.out is not None:
            self.out.flush()

    def close(self):
        if self._groups:
            self._expire_groups(float("inf"))
        self.flush()
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets = []
        if self._own_context:
            self.context.term()

    def stats_line(self):
        return "received %d messages (%d payload bytes), %d malformed, %d partial groups " \
            "incomplete" % (self.messages_total, self.bytes_total, self.malformed_total,
                            self.partial_expired_total)

