"""Prometheus metrics and ``/healthz`` for the long-running commands, read from the objects' own counters.

Nothing here runs per line: each source below is a ``prometheus_client`` custom collector that,
when ``/metrics`` is scraped, reads the counters the forwarding and receiving objects keep anyway
(``Supervisor.stats()``, a sink's ``stats()``, the spool's, the Collector's attributes) and turns
them into metric families. The HTTP server runs on its own thread; the objects are driven by the
main thread (event loop or receive loop) and only plain ints, dicts and lists are read from here,
copied first where the owner may change their size meanwhile.

``/healthz`` answers 200 ``ok`` while the process can do its job, or 503 with one reason per line:
the collector away longer than :data:`UNREACHABLE_S`, the spool full, writes failing.
"""

import http.server
import ipaddress
import socket
import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .errors import ConfigError, TransportError

#: /healthz fails once a sink had no collector connection for this long.
UNREACHABLE_S = 30.0
#: Label values kept per label set (containers in the plugin); past it, one ``other`` value.
MAX_LABEL_VALUES = 100
OTHER = "other"


def parse_address(text):
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is every address) as ``(host, port)``.

    Raises:
        ConfigError: not HOST:PORT, or a port outside 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("invalid --metrics-address %r: expected HOST:PORT, e.g. 127.0.0.1:9100"
                          % (text,))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError("invalid --metrics-address %r: %r is not an IPv6 address"
                              % (text, host)) from None
    elif ":" in host:
        raise ConfigError("invalid --metrics-address %r: write an IPv6 host in brackets, "
                          "[::1]:9100" % (text,))
    return host, int(port)


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _counter(name, doc, value=None, labels=()):
    family = CounterMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        family.add_metric([], value)
    return family


def _gauge(name, doc, value=None, labels=()):
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        family.add_metric([], value)
    return family


def _peer_up(sink):
    # A pub sink (XPUB) has no connection monitor: a subscription is what says a collector is there.
    if getattr(sink, "_monitor", None) is None and not getattr(sink, "connected", False):
        return bool(getattr(sink, "peer_seen", False))
    return bool(getattr(sink, "connected", False))


class ForwarderMetrics:
    """Metrics of the forwarding side: ``run``, ``forward`` and the plugin's sinks.

    ``pairs()`` returns the ``(sink, supervisor)`` pairs to read; for ``run``/``forward`` set
    :attr:`sink` and :attr:`supervisor` once they exist (a scrape before reads zeros).
    """

    def __init__(self, unreachable_s=UNREACHABLE_S):
        self.sink = None
        self.supervisor = None
        self.unreachable_s = unreachable_s

    def pairs(self):
        if self.sink is None:
            return []
        return [(self.sink, self.supervisor)]

    def collect(self):
        totals = dict.fromkeys(("lines_total", "bytes_total", "partial_groups_total",
                                "sent_total", "dropped_total", "pending_messages",
                                "read_errors_total", "blocked_total", "streams",
                                "open_streams"), 0)
        sink_totals = {}
        entry_errors = {}
        connected = _gauge("zeroline_peer_connected",
                           "1 while the sink has a collector (connected, or subscribed for pub)",
                           labels=["endpoint"])
        disconnects = _counter("zeroline_peer_disconnects_total",
                               "Connections to the collector lost (each one is reconnected)",
                               labels=["endpoint"])
        for sink, sup in self.pairs():
            if sup is not None:
                st = sup.stats()
                for key in totals:
                    totals[key] += st.get(key, 0)
                for copier in list(sup.copiers):
                    stream = copier.stream
                    if hasattr(stream, "errors_total"):
                        est = stream.stats()
                        for reason in ("malformed", "oversized", "truncated"):
                            entry_errors[reason] = (entry_errors.get(reason, 0)
                                                    + est.get(reason + "_total", 0))
            ss = sink.stats()
            for key, value in ss.items():
                if isinstance(value, int):
                    sink_totals[key] = sink_totals.get(key, 0) + value
            endpoint = _text(getattr(sink, "endpoint", ""))
            connected.add_metric([endpoint], 1 if _peer_up(sink) else 0)
            disconnects.add_metric([endpoint], ss.get("disconnects_total", 0))
        acked = "lines_acked_total" in sink_totals
        yield _counter("zeroline_lines_read_total",
                       "Lines read from the inputs (a line cut into 16 KiB chunks counts once)",
                       totals["lines_total"])
        yield _counter("zeroline_bytes_read_total", "Bytes read from the inputs",
                       totals["bytes_total"])
        yield _counter("zeroline_partial_groups_total",
                       "Lines longer than the line buffer, sent as partial chunks",
                       totals["partial_groups_total"])
        yield _counter("zeroline_messages_sent_total",
                       "Messages (a line, or a chunk of a long one) handed to the transport "
                       "(acked: in first sends of batches)",
                       totals["sent_total"] + sink_totals.get("lines_sent_total", 0))
        dropped = _counter("zeroline_messages_dropped_total",
                           "Messages dropped, by reason (buffer_full: non-blocking mode)",
                           labels=["reason"])
        dropped.add_metric(["buffer_full"], totals["dropped_total"])
        yield dropped
        yield _counter("zeroline_read_errors_total", "Input reads that failed (the stream ends)",
                       totals["read_errors_total"])
        yield _counter("zeroline_send_blocked_total",
                       "Times the transport refused messages (backpressure)",
                       totals["blocked_total"])
        yield _gauge("zeroline_send_backlog_messages",
                     "Messages read and framed, not yet taken by the transport",
                     totals["pending_messages"])
        yield _gauge("zeroline_streams", "Input streams started", totals["streams"])
        yield _gauge("zeroline_streams_open", "Input streams not at EOF yet",
                     totals["open_streams"])
        yield connected
        yield disconnects
        if entry_errors:
            family = _counter("zeroline_entries_malformed_total",
                              "Docker LogEntry frames skipped, by reason", labels=["reason"])
            for reason, count in entry_errors.items():
                family.add_metric([reason], count)
            yield family
        if acked:
            yield _counter("zeroline_messages_acknowledged_total",
                           "Messages the collector acknowledged as written",
                           sink_totals["lines_acked_total"])
            yield _counter("zeroline_batches_sent_total", "Acked batches sent the first time",
                           sink_totals.get("batches_sent_total", 0))
            yield _counter("zeroline_batches_resent_total",
                           "Acked batches sent again (reconnect, time-out, gap)",
                           sink_totals.get("batches_resent_total", 0))
            yield _counter("zeroline_batches_acknowledged_total", "Acked batches acknowledged",
                           sink_totals.get("batches_acked_total", 0))
            malformed = _counter("zeroline_acks_received_total", "Acks received, by result",
                                 labels=["result"])
            malformed.add_metric(["ok"], sink_totals.get("acks_total", 0))
            malformed.add_metric(["malformed"], sink_totals.get("bad_acks_total", 0))
            yield malformed
            yield _gauge("zeroline_unacknowledged_batches",
                         "Batches sent and not acknowledged (the window)",
                         sink_totals.get("window_batches", 0))
            yield _gauge("zeroline_unacknowledged_messages",
                         "Messages in the unacknowledged window",
                         sink_totals.get("window_lines", 0))
        if "spool_bytes" in sink_totals:
            yield _gauge("zeroline_spool_bytes", "Bytes of spool segment files in use",
                         sink_totals["spool_bytes"])
            yield _gauge("zeroline_spool_records", "Batches kept in the spool",
                         sink_totals.get("spool_records", 0))
            yield _gauge("zeroline_spool_segments", "Spool segment files on disk",
                         sink_totals.get("spool_segments", 0))
            yield _gauge("zeroline_spool_full", "1 while the spool refuses batches",
                         int(any(getattr(s, "spool_full", False) for s, _ in self.pairs())))

    def problems(self, now=None):
        """Why the forwarder cannot do its job (empty: healthy)."""
        now = time.monotonic() if now is None else now
        out = []
        for sink, _ in self.pairs():
            if not _peer_up(sink):
                since = getattr(sink, "peer_changed_at", None)
                if since is not None and now - since > self.unreachable_s:
                    out.append("collector unreachable: no connection to %s for %.0f s"
                               % (_text(sink.endpoint), now - since))
            if getattr(sink, "spool_full", False):
                spool = sink.spool
                out.append("spool full: %s (%d of %d bytes)"
                           % (spool.path, spool.bytes_used, spool.max_bytes))
        return out


class PluginMetrics(ForwarderMetrics):
    """The Docker plugin: every sink it opened, plus containers and their streams (FIFOs)."""

    def __init__(self, plugin, unreachable_s=UNREACHABLE_S, max_label_values=MAX_LABEL_VALUES):
        super().__init__(unreachable_s)
        self.plugin = plugin
        self.max_label_values = max_label_values

    def pairs(self):
        return list(self.plugin.sinks.values())

    def collect(self):
        yield from super().collect()
        by_container = [(cid, list(instances))
                        for cid, instances in list(self.plugin.by_container.items())]
        yield _gauge("zeroline_plugin_containers", "Containers logging through the plugin",
                     len(by_container))
        yield _gauge("zeroline_plugin_streams", "Log streams (FIFOs) being read",
                     sum(len(instances) for _, instances in by_container))
        streams = _gauge("zeroline_plugin_container_streams",
                         "Log streams (FIFOs) per container (short id; past %d containers, "
                         "'other')" % self.max_label_values, labels=["container_id"])
        entries = _counter("zeroline_plugin_container_entries_total",
                           "LogEntry frames read per container while it logs (short id; past "
                           "%d containers, 'other')" % self.max_label_values,
                           labels=["container_id"])
        counts = {}
        for cid, instances in sorted(by_container):
            key = cid[:12] if len(counts) < self.max_label_values else OTHER
            row = counts.setdefault(key, [0, 0])
            row[0] += len(instances)
            row[1] += sum(instance.stream.entries_total for instance in instances)
        for key, (n, total) in counts.items():
            streams.add_metric([key], n)
            entries.add_metric([key], total)
        yield streams
        yield entries


class CollectorMetrics:
    """``zeroline collect``: what the Collector received, wrote and refused."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        col = self.collector
        yield _counter("zeroline_collector_messages_received_total",
                       "Messages received (acked batches: their records)", col.messages_total)
        yield _counter("zeroline_collector_bytes_received_total", "Payload bytes received",
                       col.bytes_total)
        malformed = _counter("zeroline_collector_malformed_total",
                             "Malformed messages skipped, by reason", labels=["reason"])
        for reason, count in col.malformed_reasons.items():
            malformed.add_metric([reason], count)
        yield malformed
        yield _counter("zeroline_collector_partial_groups_expired_total",
                       "Long lines written as chunks because their last chunk never came",
                       col.partial_expired_total)
        lines = _counter("zeroline_collector_lines_written_total",
                         "Lines written, per tenant and service (past %d destinations, "
                         "'other')" % MAX_LABEL_VALUES, labels=["tenant", "service"])
        nbytes = _counter("zeroline_collector_bytes_written_total",
                          "Bytes written, per tenant and service (past %d destinations, "
                          "'other')" % MAX_LABEL_VALUES, labels=["tenant", "service"])
        for (tenant, service), (n, size) in list(
                getattr(col, "written_by_destination", {}).items()):
            lines.add_metric([_text(tenant), _text(service)], n)
            nbytes.add_metric([_text(tenant), _text(service)], size)
        yield lines
        yield nbytes
        first, last = col.first_message_at, col.last_message_at
        yield _gauge("zeroline_collector_receive_seconds",
                     "Seconds from the first to the last batch received",
                     round(last - first, 3) if first is not None and last is not None else 0)
        yield _counter("zeroline_collector_overflow_lines_total",
                       "Lines written to _overflow because --max-streams destinations exist",
                       getattr(col, "overflow_total", 0))
        yield _counter("zeroline_collector_write_errors_total",
                       "Write error episodes (full disk, I/O error); each is retried",
                       col.write_errors_total)
        yield _gauge("zeroline_collector_write_failing", "1 while writes fail and are retried",
                     int(getattr(col, "write_error", None) is not None))
        if getattr(col, "_journal", None) is not None:
            yield _counter("zeroline_collector_acked_batches_total", "Acked batches accepted",
                           col.acked_batches_total)
            yield _counter("zeroline_collector_acked_lines_total",
                           "Records of the acked batches accepted", col.acked_lines_total)
            yield _counter("zeroline_collector_duplicate_batches_total",
                           "Acked batches received again and not written twice",
                           col.duplicate_batches_total)
            yield _counter("zeroline_collector_gap_batches_total",
                           "Acked batches refused because one before them was missing",
                           col.gap_batches_total)
            yield _counter("zeroline_collector_acks_sent_total", "Acks sent to forwarders",
                           col.acks_sent_total)
            yield _gauge("zeroline_collector_acked_streams",
                         "Acked streams whose de-duplication state is kept", len(col._streams))
            yield _counter("zeroline_collector_acked_streams_forgotten_total",
                           "Least recently active acked streams forgotten past the bound",
                           col.acked_streams_forgotten_total)
        if hasattr(col, "curve_refused_total"):
            yield _counter("zeroline_collector_curve_refused_total",
                           "Connections refused by CURVE authentication",
                           col.curve_refused_total)

    def problems(self, now=None):
        col = self.collector
        error = getattr(col, "write_error", None)
        if error is not None:
            return ["cannot write %s" % error]
        return []


def summary_line(source):
    """One line of ``name=value`` for ``--stats``: the metrics' own names without ``zeroline_``
    (labelled families summed; reasons that counted something listed as ``name{reason=...}``)."""
    parts = []
    for family in source.collect():
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        name = samples[0].name
        short = name.removeprefix("zeroline_").removeprefix("collector_")
        total = sum(s.value for s in samples)
        parts.append(("%s=%d" if total == int(total) else "%s=%g") % (short, total))
        for sample in samples:
            if "reason" in sample.labels and sample.value:
                parts.append("%s{reason=%s}=%d" % (short, sample.labels["reason"], sample.value))
    return " ".join(parts)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "zeroline"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        server = self.server
        if path == "/metrics":
            try:
                body, status = generate_latest(server.registry), 200
            except Exception as exc:        # noqa: BLE001 - a scrape must never kill the server
                body, status = ("metrics failed: %s\n" % exc).encode(), 500
            self._answer(status, CONTENT_TYPE_LATEST if status == 200 else "text/plain", body)
        elif path == "/healthz":
            problems = server.source.problems()
            if problems:
                self._answer(503, "text/plain; charset=utf-8",
                             ("\n".join(problems) + "\n").encode())
            else:
                self._answer(200, "text/plain; charset=utf-8", b"ok\n")
        else:
            self._answer(404, "text/plain", b"not found: try /metrics or /healthz\n")

    def _answer(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):   # the base class's signature
        pass                                # no line per scrape on stderr


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class MetricsServer:
    """``/metrics`` and ``/healthz`` for ``source`` on ``address``, served from a thread.

    Args:
        address: ``HOST:PORT`` (see :func:`parse_address`); port 0 picks a free one.
        source: a :class:`ForwarderMetrics`, :class:`PluginMetrics` or :class:`CollectorMetrics`.

    Raises:
        ConfigError: a malformed address or a host that does not resolve.
        TransportError: the address cannot be bound (port in use, no such local address).
    """

    def __init__(self, address, source):
        host, port = parse_address(address)
        self.source = source
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(source)
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError("invalid --metrics-address %r: %s" % (address, exc.strerror)) \
                from None
        family = infos[0][0]
        server_class = type("_Server", (_Server,), {"address_family": family})
        try:
            self.httpd = server_class(infos[0][4][:2], _Handler)
        except OSError as exc:
            raise TransportError("cannot serve metrics on %s: %s" % (address, exc.strerror),
                                 exc.errno or 0, address) from None
        self.httpd.registry = self.registry
        self.httpd.source = source
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="zeroline-metrics",
                                       kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def address(self):
        """``host:port`` actually bound (the port chosen when 0 was asked)."""
        host, port = self.httpd.server_address[:2]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["UNREACHABLE_S", "CollectorMetrics", "ForwarderMetrics", "MetricsServer",
           "PluginMetrics", "parse_address", "summary_line"]
