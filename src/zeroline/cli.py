"""The ``zeroline`` command: ``forward`` (a pipe or file to ZeroMQ) and ``collect`` (the receiver).

User mistakes give one line on stderr and exit status 2; an endpoint that cannot be used gives one
line and status 1; never a traceback.
"""

import argparse
import atexit
import dataclasses
import os
import select
import shutil
import signal
import socket as _socket
import sys
import tempfile
import textwrap
import threading
import time

from . import core
from .config import OPTIONS, ContainerInfo, validate_log_opts
from .errors import ConfigError, TransportError, ZerolineError

#: Bytes asked for in one read of `forward`'s input: one crossing into the compiled core per read.
READ_BYTES = 1 << 20
#: Where the embedded collector writes when no zmq-address is given.
DEFAULT_OUT_DIR = "zeroline-logs"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Shutdown(BaseException):
    """Raised from a signal handler to leave a blocking read or send; carries the signal number."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _say(text):
    sys.stderr.write("zeroline: %s\n" % text)
    sys.stderr.flush()


def _version_text():
    import zmq

    from . import __version__

    core_name = core.IMPLEMENTATION
    if core_name == "cython":
        core_name += ", libzmq %s" % core._impl.libzmq_version()
    return "zeroline %s (core: %s; pyzmq %s)" % (__version__, core_name, zmq.__version__)


def _log_opts_help(plugin=False):
    if plugin:
        lines = ["log-opts: the plugin takes no --log-opt of its own; each container's come from "
                 "`docker run --log-driver zeroline --log-opt KEY=VALUE` (or the daemon's "
                 "log-opts), checked at container start:"]
    else:
        lines = ["log-opts (--log-opt KEY=VALUE, repeatable; the same keys as the Docker "
                 "plugin's `docker run --log-opt`):"]
    for opt in OPTIONS.values():
        if opt.name.startswith("cache-") and not plugin:
            continue
        default = "" if opt.default in (None, "") else " [default: %s]" % opt.default
        choices = " (%s)" % "|".join(opt.choices) if opt.choices else ""
        lines.append("  %-20s %s%s%s" % (opt.name, opt.help, choices, default))
    if not plugin:
        lines.append("  cache-*              Docker's own cache keys: accepted and ignored.")
    wrap = dict(width=100, break_on_hyphens=False, break_long_words=False)
    return "\n".join(textwrap.fill(line, subsequent_indent=" " * 23, **wrap)
                     if line.startswith("  ") else textwrap.fill(line, **wrap) for line in lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and status 2, as for every other user mistake.
        self.exit(EXIT_USAGE, "zeroline: error: %s (see '%s --help')\n" % (message, self.prog))


def _parse_log_opts(pairs):
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--log-opt expects KEY=VALUE, got %r" % (pair,))
        raw[key] = value
    return raw


def build_parser():
    parser = _Parser(
        prog="zeroline",
        description="Forward container log lines to a ZeroMQ log processing center, cut exactly as "
                    "Docker's log copier cuts them.",
    )
    parser.add_argument("--version", action="store_true", help="print version and core, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    fwd = sub.add_parser(
        "forward",
        help="forward lines from stdin or a file/FIFO to a zmq endpoint",
        description="Read INPUT (stdin by default, or a file or FIFO), cut it into lines as Docker "
                    "does (16 KiB partial chunks, a trailing unterminated line flushed at EOF) and "
                    "send each as [tenant, service, payload]. Without zmq-address an embedded "
                    "collector is started and writes to --out. At EOF everything is flushed and "
                    "sent, then it waits up to zmq-linger for the queue to drain.",
        epilog=_log_opts_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fwd.add_argument("input", nargs="?", default="-", metavar="INPUT",
                     help="file or FIFO to read; '-' or nothing for stdin")
    fwd.add_argument("--log-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="driver option (see below)")
    fwd.add_argument("--container-id", default=None, metavar="ID",
                     help="container id for the payload prefix (default: this host's name)")
    fwd.add_argument("--container-name", default="", metavar="NAME",
                     help="container name (default: none)")
    fwd.add_argument("--source", choices=("stdout", "stderr"), default="stdout",
                     help="source stamped on every message (default: stdout)")
    fwd.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR",
                     help="embedded collector only: where OUT/<tenant>/<service>.log goes "
                          "(default: ./%s)" % DEFAULT_OUT_DIR)
    fwd.add_argument("--stats", action="store_true",
                     help="print one line of counters (named as the metrics) on stderr at the end")
    fwd.add_argument("--stats-interval", type=float, default=0, metavar="SECONDS",
                     help="also print one line of counters every SECONDS, for logs; on a "
                          "terminal a progress line is shown anyway (default: 0, none)")
    _add_metrics_option(fwd)

    run = sub.add_parser(
        "run",
        help="run a command and forward its stdout and stderr",
        description="Run CMD with its stdout and stderr as two streams (sources stdout/stderr), "
                    "cut and forward both, pass signals on to CMD and exit with its exit status "
                    "(128+N when a signal N ended it). TENANT_ID/SERVICE_ID come from CMD's "
                    "environment. Without zmq-address an embedded collector writes to --out.",
        epilog=_log_opts_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                     help="the command to run")
    run.add_argument("--log-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="driver option (see below)")
    run.add_argument("--container-id", default=None, metavar="ID",
                     help="container id for the payload prefix (default: this host's name)")
    run.add_argument("--container-name", default="", metavar="NAME",
                     help="container name (default: none)")
    run.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR",
                     help="embedded collector only: where OUT/<tenant>/<service>.log goes "
                          "(default: ./%s)" % DEFAULT_OUT_DIR)
    run.add_argument("--stats", action="store_true",
                     help="print one line of counters (named as the metrics) on stderr at the end")
    run.add_argument("--stats-interval", type=float, default=0, metavar="SECONDS",
                     help="also print one line of counters every SECONDS (default: 0, none)")
    _add_metrics_option(run)

    plug = sub.add_parser(
        "plugin",
        help="serve as a Docker logging plugin (docker --log-driver zeroline)",
        description="Serve Docker's logging-plugin protocol on a unix socket: every container "
                    "started with --log-driver zeroline gets a copier on its log FIFO, forwarding "
                    "to its zmq-address; a local copy in the format of Docker's local driver "
                    "serves `docker logs`. Copies of containers not logged to for --retention "
                    "are removed (checked at start and hourly). Stops on SIGTERM/SIGINT after "
                    "flushing every container.",
        epilog=_log_opts_help(plugin=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plug.add_argument("--socket", default=None, metavar="PATH",
                      help="unix socket to serve (default: %s)" % "/run/docker/plugins/zeroline.sock")
    plug.add_argument("--state-dir", default=None, metavar="DIR",
                      help="local copies for docker logs, created 0700 (default: /var/lib/zeroline)")
    plug.add_argument("--retention", default=os.environ.get("ZEROLINE_RETENTION", "7d"),
                      metavar="DURATION",
                      help="remove copies of containers idle this long, e.g. 7d, 12h "
                           "(default: $ZEROLINE_RETENTION or 7d)")
    _add_metrics_option(plug)

    keygen = sub.add_parser(
        "keygen",
        help="create a CurveZMQ key pair (for CURVE between forwarders and collectors)",
        description="Write a CurveZMQ key pair in the format of pyzmq's "
                    "zmq.auth.create_certificates: DIR/NAME.key (the public certificate, to give "
                    "to the other side) and DIR/NAME.key_secret (the secret one, created with "
                    "mode 0600; keep it on this host). Existing files are never overwritten "
                    "unless --force. Prints the public key (40 Z85 characters) on stdout.",
    )
    keygen.add_argument("name", metavar="NAME", help="file name stem, e.g. collector")
    keygen.add_argument("--dir", default=".", metavar="DIR",
                        help="where the two files go, created 0700 if missing (default: .)")
    keygen.add_argument("--force", action="store_true",
                        help="replace existing NAME.key / NAME.key_secret")

    col = sub.add_parser(
        "collect",
        help="receive lines and write them to files or stdout",
        description="Bind PULL (--bind, for push forwarders), SUB (--bind-sub, for pub "
                    "forwarders and the original driver) and/or ROUTER (--bind-acked, for "
                    "zmq-socket=acked forwarders) sockets, decode both framings and acked batches, "
                    "and write every line to OUT/<tenant>/<service>.log (tenant and service "
                    "escaped so they stay inside OUT) or to stdout. Text: seed payloads as "
                    "received, msgpack records as '<container_id> <source>: <line>', the chunks of "
                    "a long line joined again. Malformed messages are counted and skipped. A "
                    "write error (full disk) is reported with the path and retried, never fatal; "
                    "meanwhile nothing more is received. Runs until SIGINT/SIGTERM (or --count); "
                    "then what was received is written (and acknowledged) before it exits.",
    )
    col.add_argument("--bind", action="append", default=[], metavar="ENDPOINT",
                     help="bind a PULL socket (repeatable)")
    col.add_argument("--bind-sub", action="append", default=[], metavar="ENDPOINT",
                     help="bind a SUB socket subscribed to everything (repeatable)")
    col.add_argument("--bind-acked", action="append", default=[], metavar="ENDPOINT",
                     help="bind a ROUTER socket for acked forwarders (repeatable; needs --out: "
                          "the journal of written batches is OUT/.zeroline/acked-streams)")
    where = col.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="write OUT/<tenant>/<service>.log")
    where.add_argument("--stdout", action="store_true", help="print lines on stdout")
    col.add_argument("--format", choices=("text", "json"), default="text",
                     help="text: one line per message as above; json: one object per line with "
                          "every field the framing carries (default: text)")
    col.add_argument("--max-size", default=None, metavar="SIZE",
                     help="rotate a log file once it reached SIZE bytes, checked before each line "
                          "as Docker's json-file does; decimal units: 10m = 10,000,000 "
                          "(default: never)")
    col.add_argument("--max-files", type=int, default=None, metavar="N",
                     help="with --max-size: files kept per tenant/service, the live one included "
                          "(.log, .log.1 ... .log.N-1; the oldest is dropped; 1 truncates) "
                          "(default: 5)")
    col.add_argument("--count", type=int, default=None, metavar="N",
                     help="exit after N messages, for scripts and tests (default: no limit)")
    col.add_argument("--stats", action="store_true",
                     help="print one line of counters (named as the metrics) on stderr at exit")
    col.add_argument("--stats-interval", type=float, default=0, metavar="SECONDS",
                     help="also print one line of counters on stderr every SECONDS "
                          "(default: 0, none)")
    col.add_argument("--fsync", choices=("batch", "interval", "never"), default="interval",
                     help="batch: fsync the files written and the journal before each ack (an "
                          "acked line survives a power cut); interval: fsync at most once a "
                          "second, ack without waiting (a crash of the collector loses nothing "
                          "acked, a power cut up to a second); never: leave it to the OS "
                          "(default: interval)")
    col.add_argument("--curve-secret-key", default=None, metavar="FILE",
                     help="CURVE on every bind with this secret certificate (from zeroline "
                          "keygen; mode 0600): traffic encrypted, the collector authenticated")
    col.add_argument("--curve-allow", default=None, metavar="DIR",
                     help="with --curve-secret-key: only clients whose public key (NAME.key) is "
                          "in DIR are accepted; re-read on SIGHUP and when DIR changes; "
                          "without it any client with a valid handshake is")
    col.add_argument("--max-streams", type=int, default=None, metavar="N",
                     help="distinct tenant/service files at most; lines for further ones go to "
                          "OUT/_overflow/_overflow.log and are counted (default: 10000)")
    col.add_argument("--ipc-mode", default="660", metavar="OCTAL",
                     help="mode of ipc:// socket files bound here (default: 660)")
    _add_metrics_option(col)
    return parser


def _add_metrics_option(parser):
    parser.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics and health on "
                             "/healthz (200 ok, or 503 and the reason) (default: off)")


def _start_metrics(args, source):
    """The metrics server of ``--metrics-address``, started (None without the option).

    Raises:
        ConfigError: a malformed address.
        TransportError: the address cannot be bound (port in use).
    """
    if not getattr(args, "metrics_address", None):
        return None
    from .metrics import MetricsServer

    server = MetricsServer(args.metrics_address, source).start()
    atexit.register(server.close)
    _say("metrics on http://%s/metrics, health on /healthz" % server.address)
    return server


# --------------------------------------------------------------------------------------------
# forward

def _open_input(path):
    if path == "-":
        return sys.stdin.fileno()
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError("cannot read input %s: %s" % (path, exc.strerror)) from None


class _EmbeddedCollector:
    """A collector in a thread of this process, on a private ipc:// endpoint."""

    def __init__(self, out_dir, kind):
        from .collector import Collector

        self.tmp = tempfile.mkdtemp(prefix="zeroline-")
        # Also gone when an error ends the command before finish().
        atexit.register(shutil.rmtree, self.tmp, True)
        self.endpoint = "ipc://" + os.path.join(self.tmp, "collector.ipc")
        self.collector = Collector(out_dir=out_dir)
        self.collector.bind(self.endpoint, kind)
        self.thread = threading.Thread(target=self.collector.run, name="zeroline-collector",
                                       daemon=True)
        self.thread.start()

    def finish(self, expected, stall_s):
        # Wait for every sent message; give up only when nothing arrives for stall_s.
        seen, last_progress = -1, time.monotonic()
        while self.collector.messages_total < expected:
            if self.collector.messages_total != seen:
                seen, last_progress = self.collector.messages_total, time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                break
            time.sleep(0.01)
        self.collector.stop()
        self.thread.join()
        paths = self.collector.paths()
        self.collector.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return paths


def _endpoint_and_container(args, opts):
    """Starts the embedded collector when no zmq-address was given; the container is this
    process (forward) or CMD (run): its id and name from the flags, its env from ours."""
    embedded = None
    if opts.address is None:
        embedded = _EmbeddedCollector(args.out, _embedded_kind(opts.socket))
        opts = dataclasses.replace(opts, address=embedded.endpoint)
    container_id = args.container_id if args.container_id is not None else _socket.gethostname()
    info = ContainerInfo(container_id=container_id, container_name=args.container_name,
                         env=tuple("%s=%s" % kv for kv in os.environ.items()))
    return opts, embedded, info


def _embedded_kind(socket_kind):
    return {"pub": "sub", "push": "pull", "acked": "acked"}[socket_kind]


# --------------------------------------------------------------------------------------------
# The pipeline that forward and run share: copiers on a supervisor, one sink, signals, the end.

#: After the input's writer is gone, how long its pipes may stay silent (a background grandchild
#: holding them) before zeroline stops reading them.
EOF_STALL_S = 2.0
#: Signals passed on to CMD by `run`.
PASSED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGUSR2, signal.SIGWINCH)
#: Signals that make `forward` stop reading, flush, send and exit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Outcome:
    """What a forwarding pipeline did, for the summary and the exit status."""

    def __init__(self, sup, sink):
        self.stats = sup.stats()
        self.sink_stats = sink.stats()
        self.unsent_messages, self.undelivered_lines = sup.undelivered()
        self.stop_signal = None
        self.unread_bytes = 0
        self.spooled = getattr(sink, "spool", None) is not None

    @property
    def dropped(self):
        return self.stats["dropped_total"]

    def lost(self):
        """Lines (or, for pub/push, messages) known not to reach the collector; True when part
        of a file input was left unread."""
        if self.unread_bytes:
            return True
        if self.spooled:
            return self.dropped
        return self.dropped + self.undelivered_lines


def _stats_line(sup, sink):
    """One ``--stats-interval`` line: the supervisor's counters and, for acked, the window."""
    line = sup.stats_line()
    ss = sink.stats()
    if "lines_acked_total" in ss:
        line += ", %d lines acknowledged (%d batches, %d resent, %d in the window)" % (
            ss["lines_acked_total"], ss["batches_acked_total"], ss["batches_resent_total"],
            ss["window_batches"])
        if "spool_bytes" in ss:
            line += ", spool %d bytes in %d records" % (ss["spool_bytes"], ss["spool_records"])
    if getattr(sink, "_monitor", None) is not None and not sink.connected:
        # Said once when it happens, and on every interval line while it lasts.
        line += ", no collector at %s" % sink.endpoint
    return line


def _summary_line(sup, sink):
    """``--stats`` at exit: the counters under the names of their metrics."""
    from .metrics import ForwarderMetrics, summary_line

    source = ForwarderMetrics()
    source.sink, source.supervisor = sink, sup
    return summary_line(source)


def _report_end(outcome, sink, opts):
    """One line about what did not reach the collector, if anything (always on stderr)."""
    if not getattr(sink, "peer_seen", True) and not getattr(sink, "_missing_reported", True):
        _say("no collector at %s (nothing ever connected)" % sink.endpoint)
    if getattr(sink, "spool", None) is not None:
        batches, _ = sink.undelivered()
        if batches:
            _say("%d batches not yet %s by %s: kept in spool %s; the next zeroline with "
                 "spool-dir=%s sends them" % (
                     batches, "acknowledged" if opts.socket == "acked" else "taken",
                     sink.endpoint, opts.spool_dir, opts.spool_dir))
    elif outcome.undelivered_lines:
        what = "lines" if opts.socket == "acked" else "messages"
        _say("%d %s not delivered: %s did not %s them within zmq-linger (%gs without progress)"
             % (outcome.undelivered_lines, what, sink.endpoint,
                "acknowledge" if opts.socket == "acked" else "take", opts.linger_s))
    if outcome.unread_bytes:
        _say("stopped reading the input with %d bytes left: %s took nothing for zmq-linger "
             "(%gs); forward it again once the collector is back, or use zmq-socket=acked with "
             "spool-dir" % (outcome.unread_bytes, sink.endpoint, opts.linger_s))
    if outcome.dropped:
        _say("dropped %d lines (non-blocking buffer full; by stream: %s)" % (
            outcome.dropped, ", ".join("%s=%d" % kv
                                       for kv in outcome.stats["dropped_by_stream"].items())))


class _Progress:
    """``forward`` with stderr on a terminal: one line, rewritten about once a second, with the
    bytes read (of the file's size when it has one) and the lines per second."""

    INTERVAL_S = 1.0

    def __init__(self, size):
        self.size = size
        self.started = time.monotonic()
        self.last = (self.started, 0)

    def show(self, st, final=False):
        now = time.monotonic()
        since, seen = (self.started, 0) if final else self.last
        self.last = (now, st["lines_total"])
        rate = (st["lines_total"] - seen) / (now - since) if now > since else 0.0
        done = st["bytes_total"]
        if self.size:
            where = "%s of %s (%d%%)" % (_human_bytes(done), _human_bytes(self.size),
                                         min(100, done * 100 // self.size))
        else:
            where = _human_bytes(done)
        sys.stderr.write("\rzeroline: %s read, %d lines, %.0f lines/s\x1b[K%s"
                         % (where, st["lines_total"], rate, "\n" if final else ""))
        sys.stderr.flush()


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024
    return "%d B" % n


def _progress_for(fd):
    """A :class:`_Progress` when stderr is a terminal (and the input is not), else None."""
    try:
        if not os.isatty(sys.stderr.fileno()) or os.isatty(fd):
            return None
        st = os.fstat(fd)
    except (OSError, ValueError):
        return None
    import stat

    return _Progress(st.st_size if stat.S_ISREG(st.st_mode) else None)


async def _pipeline(sink, opts, args, sources, child=None, metrics=None, display=None):
    """Copy ``sources`` (``(fd, stream, name, read_bytes)``, read_bytes None for the sink's
    size) into ``sink`` until they end.

    ``forward`` (no child): SIGINT/SIGTERM/SIGHUP stop reading; what was read is flushed and
    sent. ``run``: the listed signals go to CMD; once CMD exited, the pipes are read to their
    end whatever the collector does. Then everything is sent, waiting at most zmq-linger without
    progress. A second SIGINT/SIGTERM leaves at once; one after CMD exited ends the wait.
    """
    import asyncio

    from .supervisor import Supervisor

    loop = asyncio.get_running_loop()
    sup = Supervisor(sink, loop)
    if metrics is not None:
        metrics.supervisor = sup            # read by the metrics thread from now on
    blocking = opts.mode == "blocking"
    for fd, stream, name, read_bytes in sources:
        sup.add(fd, stream, name, blocking=blocking, read_bytes=read_bytes)

    state = {"signal": None, "count": {}, "ending": False}
    drain_task = None
    exited = loop.create_future()

    def on_signal(signum):
        count = state["count"][signum] = state["count"].get(signum, 0) + 1
        if child is not None and not exited.done():
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
            if signum in (signal.SIGINT, signal.SIGTERM) and count > 1:
                os._exit(128 + signum)      # a second signal: leave at once
            return
        if state["signal"] is not None and signum in (signal.SIGINT, signal.SIGTERM):
            os._exit(128 + signum)          # a second signal: leave at once
        if state["signal"] is None:
            state["signal"] = signum
        if drain_task is not None:
            drain_task.cancel()             # stop waiting for the collector
        elif not state["ending"]:
            sup.stop_reading()

    handled = PASSED_SIGNALS if child is not None else STOP_SIGNALS
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)

    ticker = None
    if getattr(args, "stats_interval", 0) > 0:
        def tick():
            nonlocal ticker
            _say(_stats_line(sup, sink))
            ticker = loop.call_later(args.stats_interval, tick)
        ticker = loop.call_later(args.stats_interval, tick)
    display_handle = None
    if display is not None:             # forward's progress line on a terminal
        def show():
            nonlocal display_handle
            display.show(sup.stats())
            display_handle = loop.call_later(display.INTERVAL_S, show)
        display_handle = loop.call_later(display.INTERVAL_S, show)

    pidfd = None
    if child is not None:
        pidfd = os.pidfd_open(child.pid)

        def on_exit():
            loop.remove_reader(pidfd)
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        await exited
        os.close(pidfd)
        child.wait()
        # CMD is gone: what is left in its pipes is bounded; read it all.
        sup.read_to_end()
    try:
        # Read to the end, unless the pipes stay silent (a background grandchild holds them).
        last, last_change = None, time.monotonic()
        while sup._open:
            await asyncio.sleep(0.05)
            st = sup.stats()
            progress = (st["bytes_total"], st["sent_total"], sink.progress_mark())
            if progress != last:
                last, last_change = progress, time.monotonic()
            elif child is not None and time.monotonic() - last_change > EOF_STALL_S:
                sup.stop_reading()
            if child is None and not sup._final:
                _notice_input_end(sup, opts, time.monotonic() - last_change, state)
        state["ending"] = True
        if state["signal"] is None:
            drain_task = asyncio.ensure_future(sup.drain(opts.linger_s))
            try:
                await drain_task
            except asyncio.CancelledError:
                pass
    finally:
        if ticker is not None:
            ticker.cancel()
        if display_handle is not None:
            display_handle.cancel()
            display.show(sup.stats(), final=True)
        for signum in handled:
            loop.remove_signal_handler(signum)
        sup.close()
    outcome = _Outcome(sup, sink)
    outcome.stop_signal = state["signal"]
    outcome.unread_bytes = state.get("unread", 0)
    return sup, outcome


def _writer_gone(fd):
    # A pipe or FIFO whose writers all closed polls POLLHUP, even with data left in it.
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _notice_input_end(sup, opts, stalled_s, state):
    """`forward` while the sink refuses: its input may have ended behind the stopped copier.

    A pipe whose writer is gone holds a bounded rest: read it all, then the end's wait applies.
    A regular file is never 'ended' by a writer: after zmq-linger without any progress its
    reading stops, and the unread rest is reported (never silently lost)."""
    for copier in sup.copiers:
        if copier.eof or copier.reading:
            continue
        if copier.pollable:
            if _writer_gone(copier.fd):
                sup.read_to_end()
                return
        elif stalled_s > opts.linger_s:
            try:
                offset = os.lseek(copier.fd, 0, os.SEEK_CUR)
                size = os.fstat(copier.fd).st_size
            except OSError:
                offset = size = 0
            state["unread"] = state.get("unread", 0) + max(0, size - offset)
            copier.finish()


def _finish(sup, sink, outcome, opts, args, embedded):
    """Close the sink, stop an embedded collector, print the summary. Returns False when
    pub/push could not confirm that libzmq's queue drained (acked counts what is not
    acknowledged in ``outcome`` instead)."""
    confirmed = sink.close() or opts.socket == "acked"
    expected = sup.stats()["sent_total"]
    paths = embedded.finish(expected, max(opts.linger_s, 5.0)) if embedded else []
    if not confirmed and not getattr(sink, "peer_seen", True):
        # Nothing ever connected: whatever libzmq took is still in its queue, gone with it.
        outcome.undelivered_lines += expected
        outcome.unsent_messages += expected
    if args.stats:
        _say(_summary_line(sup, sink))
    _report_end(outcome, sink, opts)
    if not confirmed and opts.socket != "acked" and not outcome.undelivered_lines:
        _say("warning: zmq-linger ran out before the send queue drained; lines may be lost")
    if embedded:
        written = sink.stats().get("lines_acked_total", expected)
        _say("%d messages -> embedded collector -> %s" % (written, ", ".join(paths) or args.out))
    return confirmed


def _open_sink(opts):
    from .transport import open_sink

    return open_sink(opts)


def _forwarder_metrics():
    from .metrics import ForwarderMetrics

    return ForwarderMetrics()


def cmd_forward(args):
    import uvloop

    opts = validate_log_opts(_parse_log_opts(args.log_opt), require_address=False)
    if args.stats_interval < 0:
        raise ConfigError("--stats-interval must not be negative")
    fd = _open_input(args.input)
    metrics = _forwarder_metrics()
    _start_metrics(args, metrics)
    opts, embedded, info = _endpoint_and_container(args, opts)
    sink = metrics.sink = _open_sink(opts)
    try:
        stream = sink.stream(info, args.source)
        sources = [(fd, stream, "%s/%s" % (info.short_id or "-", args.source), READ_BYTES)]
        sup, outcome = uvloop.run(_pipeline(sink, opts, args, sources, metrics=metrics,
                                            display=_progress_for(fd)))
    except BaseException:
        sink.close(0)
        raise
    # No close of fd here: its copier owns it and closed it at EOF, and a second close could
    # hit a file opened since under the same number (the embedded collector's output was).
    confirmed = _finish(sup, sink, outcome, opts, args, embedded)
    if outcome.stop_signal == signal.SIGINT:
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if outcome.lost() or not confirmed else EXIT_OK


def cmd_run(args):
    import subprocess

    import uvloop

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("run needs a command: zeroline run [OPTIONS] -- CMD [ARGS...]")
    opts = validate_log_opts(_parse_log_opts(args.log_opt), require_address=False)
    metrics = _forwarder_metrics()
    _start_metrics(args, metrics)
    opts, embedded, info = _endpoint_and_container(args, opts)
    sink = metrics.sink = _open_sink(opts)
    try:
        # CMD starts at once: whether a collector is there is the sink's business.
        try:
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            _say("error: cannot run %s: %s" % (cmd[0], exc.strerror))
            sink.close(0)
            if embedded:
                embedded.finish(0, 0)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        from .supervisor import grow_pipe

        sources = []
        for source, pipe in (("stdout", child.stdout), ("stderr", child.stderr)):
            fd = os.dup(pipe.fileno())
            pipe.close()
            grow_pipe(fd)
            sources.append((fd, sink.stream(info, source),
                            "%s/%s" % (info.short_id or "-", source), None))
        sup, outcome = uvloop.run(_pipeline(sink, opts, args, sources, child=child,
                                            metrics=metrics))
    except BaseException:
        sink.close(0)
        raise
    _finish(sup, sink, outcome, opts, args, embedded)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


# --------------------------------------------------------------------------------------------
# collect

def _parse_retention(text):
    from .config import parse_duration

    text = text.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return parse_duration(text)


def cmd_plugin(args):
    import asyncio

    import uvloop

    from . import docker_plugin

    retention_s = _parse_retention(args.retention)
    socket_path = args.socket or docker_plugin.DEFAULT_SOCKET
    state_dir = args.state_dir or docker_plugin.DEFAULT_STATE_DIR
    plugin = docker_plugin.Plugin(state_dir, retention_s)
    if args.metrics_address:
        from .metrics import PluginMetrics

        _start_metrics(args, PluginMetrics(plugin))

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        count = {"n": 0}

        def on_signal():
            count["n"] += 1
            if count["n"] > 1:
                os._exit(1)         # a second signal: leave at once
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        ready = asyncio.Event()
        task = asyncio.ensure_future(docker_plugin.serve(socket_path, state_dir, retention_s,
                                                         ready=ready, stop=stop, plugin=plugin))
        await asyncio.wait([task, asyncio.ensure_future(ready.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            _say("plugin listening on %s (state in %s)" % (socket_path, state_dir))
        await task

    try:
        uvloop.run(main())
    except ZerolineError:
        raise       # a non-socket at --socket (status 2), a live plugin on it (status 1)
    except OSError as exc:
        raise TransportError("cannot serve on %s: %s" % (socket_path, exc.strerror or exc),
                             exc.errno or 0, socket_path) from None
    return EXIT_OK


def cmd_keygen(args):
    """``zeroline keygen NAME``: write a key pair, print where and the public key."""
    from .keys import create_keypair, load_public_key

    public_path, secret_path = create_keypair(args.dir, args.name, force=args.force)
    print(load_public_key(public_path).decode("ascii"))
    _say("wrote %s (public) and %s (secret, mode 0600)" % (public_path, secret_path))
    return EXIT_OK


def cmd_collect(args):
    from .collector import DEFAULT_MAX_FILES, DEFAULT_MAX_STREAMS, Collector
    from .config import parse_decimal_size

    if not args.bind and not args.bind_sub and not args.bind_acked:
        raise ConfigError("collect needs at least one --bind, --bind-sub or --bind-acked ENDPOINT")
    if args.bind_acked and args.stdout:
        raise ConfigError("--bind-acked needs --out DIR (its journal lives there), not --stdout")
    max_size = None
    if args.max_size is not None:
        if args.stdout:
            raise ConfigError("--max-size applies to files: use it with --out DIR")
        max_size = parse_decimal_size(args.max_size)
        if max_size <= 0:
            raise ConfigError("--max-size must be positive, got %r" % args.max_size)
    if args.max_files is not None and max_size is None:
        raise ConfigError("--max-files needs --max-size (as Docker's max-file)")
    if args.count is not None and args.count < 0:
        raise ConfigError("--count must not be negative, got %d" % args.count)
    if args.stats_interval < 0:
        raise ConfigError("--stats-interval must not be negative")
    max_streams = DEFAULT_MAX_STREAMS if args.max_streams is None else args.max_streams
    if max_streams < 1:
        raise ConfigError("--max-streams must be at least 1, got %d" % max_streams)
    try:
        ipc_mode = int(args.ipc_mode, 8)
    except ValueError:
        ipc_mode = -1
    if not 0 <= ipc_mode <= 0o777:
        raise ConfigError("--ipc-mode must be an octal mode such as 660, got %r" % args.ipc_mode)
    curve_key = None
    if args.curve_secret_key is not None:
        from .keys import load_secret_key

        curve_key = load_secret_key(args.curve_secret_key)
    elif args.curve_allow is not None:
        raise ConfigError("--curve-allow needs --curve-secret-key FILE (CURVE on)")
    out = sys.stdout.buffer if args.stdout else None
    collector = Collector(out_dir=None if out else args.out, out=out, fmt=args.format,
                          max_size=max_size,
                          max_files=DEFAULT_MAX_FILES if args.max_files is None else args.max_files,
                          fsync=args.fsync, warn=_say, max_streams=max_streams,
                          curve_secret_key=curve_key, curve_allow=args.curve_allow,
                          ipc_mode=ipc_mode)
    if args.metrics_address:
        from .metrics import CollectorMetrics

        try:
            _start_metrics(args, CollectorMetrics(collector))
        except ZerolineError:
            collector.close()
            raise
    status = EXIT_OK
    received = []

    def on_signal(signum, frame):
        # First signal: stop receiving, write what libzmq already holds and held chunks,
        # acknowledge, close; a second: leave now.
        received.append(signum)
        if len(received) > 1:
            os._exit(128 + signum)
        collector.stop()

    try:
        try:
            # Handlers first: once an endpoint is bound, a signal already finds them.
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
            if collector.curve is not None and args.curve_allow is not None:
                # SIGHUP: read the --curve-allow directory again (it is also watched).
                signal.signal(signal.SIGHUP, lambda signum, frame: collector.curve.reload())
            for endpoint in args.bind:
                collector.bind(endpoint, "pull")
            for endpoint in args.bind_sub:
                collector.bind(endpoint, "sub")
            for endpoint in args.bind_acked:
                collector.bind(endpoint, "acked")
            collector.run(until_messages=args.count, stats_interval_s=args.stats_interval,
                          report=_say)
        finally:
            collector.close()
    except OSError as exc:
        if isinstance(exc, ZerolineError):
            raise
        # Log files are retried, never fatal (Collector); this is stdout, or OUT/.zeroline that
        # cannot be created at start.
        _say("error: cannot write %s: %s" % (exc.filename or ("stdout" if args.stdout else args.out),
                                            exc.strerror or exc))
        status = EXIT_FAILURE
    if received:
        status = EXIT_INTERRUPTED if received[0] == signal.SIGINT else EXIT_OK
    if collector.unwritten_bytes:
        status = EXIT_FAILURE
    if args.stats:
        from .metrics import CollectorMetrics, summary_line

        _say(summary_line(CollectorMetrics(collector)))
    return status


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "forward":
            return cmd_forward(args)
        if args.command == "plugin":
            return cmd_plugin(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "keygen":
            return cmd_keygen(args)
        return cmd_collect(args)
    except ConfigError as exc:
        _say("error: %s" % exc)
        return EXIT_USAGE
    except (TransportError, ZerolineError) as exc:
        _say("error: %s" % exc)
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_FAILURE
    except _Shutdown as stop:
        return EXIT_INTERRUPTED if stop.signum == signal.SIGINT else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
