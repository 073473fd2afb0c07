"""zeroline benchmarks: ``python -m benchmarks [run] [--quick] [--check]`` and ``compare``.

One run measures, on the same seeded inputs (W1, W2), interleaved and repeated (median):
  a  cut+frame only, compiled Stream.feed on 1 MiB buffers + clear(), in memory
  b  compiled Stream → ipc PUSH → receiver process (count + CRC of every payload checked)
  b' the ``zeroline forward`` CLI on the same path (skipped with a note while it does not exist)
  c  the pure-Python twin on the same path (fewer lines)
  d  naive reference: readline loop + pyzmq send_multipart per line (fewer lines)
  e  compiled Stream into a bound XPUB (XPUB_NODROP=1) with no subscriber: sender cost only
  f  plain C reference sender (read + memchr + three zmq_send per line), if it compiles
and, on W1 only (benchmarks/bench_supervisor.py):
  sup      100 chatty streams (pipes) → zeroline's Supervisor (uvloop) → receiver process that
           checks count + CRC per stream; aggregate lines/s, fairness, RSS
  fwd_col  zeroline forward → zeroline collect --out DIR --count N → file (lines + CRC checked)
  rx       collector receive path alone: compiled Receiver.recv + take_payloads (queue pre-filled)
  rx_py    the same with a Python recv_multipart loop
and, on W1 only, the acked transport (benchmarks/bench_acked.py):
  fwd_acked  zeroline forward (zmq-socket=acked) → zeroline collect --bind-acked → file
  spool_w    forward acked into spool-dir with no collector, until it exits (spool checked)
  spool_r    forward acked with that spool and /dev/null as input → collect → file
  sup_acked  100 streams → Supervisor with an AckedSink → collect --bind-acked → file
and, on W1 only, issue 10's metrics cost (benchmarks/bench_metrics.py):
  met / met0  forward → collect → file with --metrics-address on both and /metrics of each
           scraped every 100 ms / without metrics (gated: met_over_met0)
  design rows, full runs only (or --rows): worker-thread prototype K=2/4 (sup_t2, sup_t4),
           400 idle streams more (sup500*), the old
           ZMQ_FD handler (sup_fdspin); see docs/design.md
and, on W1 only, the Docker logging plugin (benchmarks/bench_plugin.py; skipped with a note
without grpc_tools/protobuf, which encode the LogEntry frames once per run):
  plug     100 FIFOs (opened read-write by a writer, as dockerd) → Supervisor with one compiled
           EntryStream per FIFO → receiver process checking count + CRC per stream; entries/s
  plug_py  the same with the pure-Python EntryStream twin (fewer entries)
  dec      compiled EntryStream.feed on 64 KiB buffers + clear(), in memory: LogEntry decoding
  dec_py   the same with the twin
  dec_pb   the protobuf package: length prefix + LogEntry.FromString + seed payload per entry
  design row, full runs only (or --rows): plug_1w, plug with one write() per entry (dockerd's way)
and, separately (``python -m benchmarks.bench_curve [--check]``, issue 8): forward → collect
over tcp://127.0.0.1, push and acked, CurveZMQ vs plaintext interleaved; floors in gates.toml
[curve] (a table ``load_gates`` leaves alone).
then prints a table and the ratios, appends JSON lines to benchmarks/results/results.jsonl and,
with ``--check``, exits 1 when a ratio of benchmarks/gates.toml is under its floor or a check of
messages and bytes failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

from .workloads import WORKLOADS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "results.jsonl")
GATES = os.path.join(HERE, "gates.toml")

# Rows of issue 3 (bench_supervisor.py), measured on W1 only: fixed 100-byte lines.
SERVICE_ROWS = ("sup", "fwd_col", "rx", "rx_py")
# Rows of issue 7 (bench_acked.py), W1 only; they need the CLI.
ACKED_ROWS = ("fwd_acked", "spool_w", "spool_r", "sup_acked")
SUP_DESIGN_ROWS = ("sup_t2", "sup_t4", "sup500", "sup500_t2", "sup500_t4", "sup_fdspin")
SERVICE_WORKLOAD = "W1"
SUP_ROWS = ("sup",) + SUP_DESIGN_ROWS
# Rows of issue 4 (bench_plugin.py), W1 only; they need grpc_tools + protobuf (else skipped).
PLUGIN_ROWS = ("plug", "plug_py", "dec", "dec_py", "dec_pb")
PLUGIN_DESIGN_ROWS = ("plug_1w",)
DESIGN_ROWS = SUP_DESIGN_ROWS + PLUGIN_DESIGN_ROWS
#: Rows measured on SERVICE_WORKLOAD only.
W1_ROWS = SERVICE_ROWS + ACKED_ROWS + DESIGN_ROWS + PLUGIN_ROWS
ROWS = ("a", "b", "b_cli", "c", "d", "e", "f") + SERVICE_ROWS + ACKED_ROWS + PLUGIN_ROWS + \
    DESIGN_ROWS
# Rows of issue 10 (bench_metrics.py), W1 only; they need the CLI.
METRICS_ROWS = ("met", "met0")
W1_ROWS += METRICS_ROWS
ROWS += METRICS_ROWS
# Rows of issue 9 (bench_engine.py): a real Docker engine, 2 M lines of `yes` in a container per
# run, through the plugin / json-file / local; full runs (or --rows) only, skipped without an engine.
ENGINE_ROWS = ("engine", "engine_json", "engine_local")
W1_ROWS += ENGINE_ROWS
ROWS += ENGINE_ROWS
DESIGN_ROWS += ENGINE_ROWS
#: --quick leaves the design rows out (they are for docs/design.md, not for the gate).
QUICK_ROWS = tuple(r for r in ROWS if r not in DESIGN_ROWS)
ROW_INFO = {
    # row: (impl, what)
    "a": ("cython", "cut+frame in memory"),
    "b": ("cython", "e2e Stream → PUSH/PULL"),
    "b_cli": ("cli", "e2e zeroline forward"),
    "c": ("python", "e2e twin Stream"),
    "d": ("naive-pyzmq", "e2e readline+send_multipart"),
    "e": ("cython", "send → XPUB, no subscriber"),
    "f": ("c-ref", "e2e C read+memchr+zmq_send"),
    "sup": ("supervisor", "100 streams → Supervisor"),
    "fwd_col": ("cli", "forward → collect → file"),
    "rx": ("cython", "receive: Receiver, queued"),
    "rx_py": ("pyzmq", "receive: recv_multipart loop"),
    "fwd_acked": ("cli", "forward acked → collect → file"),
    "spool_w": ("cli", "forward acked → spool, no peer"),
    "spool_r": ("cli", "spool replay → collect → file"),
    "sup_acked": ("supervisor", "100 streams → AckedSink → file"),
    "sup_t2": ("threads-2", "100 streams → 2 worker threads"),
    "sup_t4": ("threads-4", "100 streams → 4 worker threads"),
    "sup500": ("supervisor", "100 + 400 idle → Supervisor"),
    "sup500_t2": ("threads-2", "100 + 400 idle → 2 threads"),
    "sup500_t4": ("threads-4", "100 + 400 idle → 4 threads"),
    "sup_fdspin": ("supervisor", "100 streams, retry per ZMQ_FD"),
    "plug": ("cython", "100 FIFOs → EntryStream → PUSH"),
    "plug_py": ("python", "100 FIFOs → twin EntryStream"),
    "plug_1w": ("cython", "plug, 1 write() per entry"),
    "dec": ("cython", "LogEntry decode+frame, memory"),
    "dec_py": ("python", "LogEntry decode, twin"),
    "dec_pb": ("protobuf", "FromString + seed payload"),
}
ROW_INFO["engine"] = ("plugin", "docker run, zeroline plugin → collect")
ROW_INFO["engine_json"] = ("dockerd", "docker run, json-file")
ROW_INFO["engine_local"] = ("dockerd", "docker run, local")
ROW_INFO["met"] = ("cli", "fwd_col, /metrics scraped 100 ms")
ROW_INFO["met0"] = ("cli", "fwd_col, no metrics")
# Ratio = median over rounds of the per-round ratio (rows of one round ran back to back);
# the gated ones and their floors are in gates.toml [ratios].
RATIOS = {
    "b_over_d": ("b", "d"),
    "b_over_c": ("b", "c"),
    "e_over_d": ("e", "d"),
    "a_over_b": ("a", "b"),
    "b_over_f": ("b", "f"),
    "b_cli_over_b": ("b_cli", "b"),
    "sup_over_b": ("sup", "b"),
    "sup_over_b_cli": ("sup", "b_cli"),
    "fwd_col_over_b": ("fwd_col", "b"),
    "rx_over_rx_py": ("rx", "rx_py"),
    "plug_over_b": ("plug", "b"),
    "plug_over_sup": ("plug", "sup"),
    "plug_over_plug_py": ("plug", "plug_py"),
    "dec_over_dec_pb": ("dec", "dec_pb"),
    "dec_over_dec_py": ("dec", "dec_py"),
    "fwd_acked_over_f": ("fwd_acked", "f"),
    "fwd_acked_over_fwd_col": ("fwd_acked", "fwd_col"),
    "sup_acked_over_fwd_acked": ("sup_acked", "fwd_acked"),
    "spool_w_over_fwd_acked": ("spool_w", "fwd_acked"),
    "spool_r_over_fwd_acked": ("spool_r", "fwd_acked"),
}

RATIOS["met_over_met0"] = ("met", "met0")
RATIOS["engine_over_engine_json"] = ("engine", "engine_json")

# Per-round numbers kept in results.jsonl next to the medians.
ROUND_KEYS = ("lines_per_s", "wall_s", "wall_recv_s", "wall_launch_s", "cpu_send_s", "cpu_recv_s",
              "peak_rss_mb", "recv_rss_mb", "ru_maxrss_mb", "passes", "messages", "error",
              "fairness", "spread", "window_min", "window_max", "blocked", "zmq_fd_wakeups",
              "collector_span_s", "cpu_dockerd_s")
# Numbers of the supervisor rows kept as medians next to the common ones.
SUP_KEYS = ("fairness", "spread", "kib_per_stream", "blocked", "zmq_fd_wakeups", "cpu_writer_s")

MODES = {
    # lines per workload for the full-size rows; slow rows (c, d) use the first slow_lines;
    # a and e repeat passes over the input until their timed loop lasts min_time_s.
    # stream_lines: lines per chatty stream of the sup rows (100 streams); rx_lines: messages
    # queued for row rx (~470 bytes each in the receiver while queued, hence the cap).
    # Plugin rows: plug and plug_1w take stream_lines entries per FIFO, plug_py
    # plug_py_stream_lines; dec and dec_pb decode the frames of dec_lines lines per pass, dec_py
    # those of slow_lines (each repeated until min_time_s).
    "full": {"lines": {"W1": 3_000_000, "W2": 2_000_000}, "slow_lines": 400_000,
             "min_time_s": 0.5, "stream_lines": 10_000, "rx_lines": 400_000,
             "plug_py_stream_lines": 5_000, "dec_lines": 400_000},
    "quick": {"lines": {"W1": 400_000, "W2": 400_000}, "slow_lines": 60_000,
              "min_time_s": 0.25, "stream_lines": 6_000, "rx_lines": 400_000,
              "plug_py_stream_lines": 2_000, "dec_lines": 200_000},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="zeroline benchmarks and regression gates.")
    p.add_argument("command", nargs="?", choices=("run", "compare"), default="run",
                   help="run (default) the benchmarks, or compare two recorded runs")
    p.add_argument("runs", nargs="*", help="compare: run ids (default: the last two)")
    p.add_argument("--quick", action="store_true", help="small inputs; fits CI on 2 cores")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a gated ratio is under its floor or a check failed")
    p.add_argument("--reps", type=int, default=3, help="rounds, interleaved (default 3)")
    p.add_argument("--workloads", default="W1,W2", help="comma-separated (default W1,W2)")
    p.add_argument("--rows", default=None,
                   help="comma-separated of %s (default: all; --quick: all but %s)"
                   % (",".join(ROWS), ",".join(DESIGN_ROWS)))
    p.add_argument("--lines", type=int, help="lines per workload (overrides the mode)")
    p.add_argument("--slow-lines", type=int, help="lines for rows c and d (overrides the mode)")
    p.add_argument("--stream-lines", type=int,
                   help="lines per chatty stream of the sup rows, entries per FIFO of the plug "
                   "rows (overrides the mode; plug_py takes at most its own, smaller count)")
    p.add_argument("--seed", type=int, default=1, help="input seed (default 1)")
    p.add_argument("--cli-stdin", choices=("file", "pipe"), default="file",
                   help="how the CLI gets its input: '< file' (default) or a pipe")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    p.add_argument("--require-rows", action="store_true",
                   help="with --check, fail when a row of --rows is skipped (no engine, no "
                   "protobuf): a gate must not pass on rows that never ran")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.rows is None:
        args.rows = ",".join(QUICK_ROWS if args.quick else ROWS)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error("unknown workload %r (have %s)" % (w, ", ".join(WORKLOADS)))
    for n in (args.lines, args.slow_lines, args.stream_lines):
        if n is not None and n < 1:
            p.error("line counts must be positive")
    for r in args.rows:
        if r not in ROWS:
            p.error("unknown row %r (have %s)" % (r, ", ".join(ROWS)))
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Helpers


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def git_commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return rev or None, bool(dirty.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def load_gates(path=GATES):
    with open(path, "rb") as f:
        gates = tomllib.load(f)
    floors = {k: float(v) for k, v in gates.get("ratios", {}).items() if not isinstance(v, dict)}
    per_workload = {k: {n: float(x) for n, x in v.items()}
                    for k, v in gates.get("ratios", {}).items() if isinstance(v, dict)}
    unknown = set(floors) - set(RATIOS)
    if unknown:
        raise SystemExit("gates.toml: unknown ratio(s) %s (have %s)"
                         % (", ".join(sorted(unknown)), ", ".join(RATIOS)))
    return floors, per_workload, gates.get("targets", {})


def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return "%.2f M" % (x / 1e6)
    return "%.1f k" % (x / 1e3)


def fmt(x, spec="%.1f"):
    return "-" if x is None else spec % x


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def make_context():
    # Children are forked from a forkserver that imported zmq and zeroline but never created a
    # zmq context (libzmq's threads do not survive fork); each child makes its own. A fork is
    # cheap (~10 ms) next to spawn (~250 ms of imports per child).
    path = os.environ.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")
    ctx = multiprocessing.get_context("forkserver")
    # benchmarks.bench_supervisor (and the uvloop and zeroline.supervisor it uses) is imported by
    # its own children only: preloaded, it would add 2-5 MB to every child's RSS figure.
    ctx.set_forkserver_preload(["zmq", "msgpack", "zeroline._core", "zeroline._core_py",
                                "benchmarks.bench_core", "benchmarks.bench_e2e"])
    return ctx


# ---------------------------------------------------------------------------------------------
# Run


class Session:
    """State of one run: inputs, digests, tools, and every measurement."""

    def __init__(self, args, tmp):
        from . import workloads

        self.args = args
        self.tmp = tmp
        self.mode = "quick" if args.quick else "full"
        conf = MODES[self.mode]
        self.min_time_s = conf["min_time_s"]
        self.stream_lines = args.stream_lines or conf["stream_lines"]
        self.rx_lines = conf["rx_lines"]
        self.plug_py_stream_lines = min(conf["plug_py_stream_lines"], self.stream_lines)
        self.dec_lines = conf["dec_lines"]
        self.workloads = {}
        for name in args.workloads:
            lines = args.lines or conf["lines"][name]
            slow = min(args.slow_lines or conf["slow_lines"], lines)
            t = time.monotonic()
            wl = workloads.generate(name, lines, os.path.join(tmp, name + ".txt"), args.seed,
                                    small_lines=slow)
            print("  generated %s: %s lines, %.1f MB, %d lines >= 16 KiB (%.1f s)"
                  % (name, format(wl.lines, ","), wl.nbytes / 1e6, wl.long_lines,
                     time.monotonic() - t), flush=True)
            self.workloads[name] = wl
        self._digests = {}
        self.results = {}          # (workload, row) -> [result per round]
        self.skipped = {}          # row -> reason
        self.notes = {}
        self._n = 0
        self.spools = []           # a spool spool_w filled, for spool_r

    def digest(self, wl, nbytes, prefix):
        from . import workloads

        key = (wl.path, nbytes, prefix)
        if key not in self._digests:
            self._digests[key] = workloads.expected_digest(wl.path, nbytes, prefix)
        return self._digests[key]

    def endpoint(self, row):
        self._n += 1
        return "ipc://%s/%s-%d.ipc" % (self.tmp, row, self._n)


def measure_row(sess, ctx, row, wl, tools):
    from . import bench_core, bench_e2e, bench_supervisor
    from .bench_core import PREFIX

    full = (wl.nbytes, wl.lines)
    small = (wl.small_nbytes, wl.small_lines)

    def digest_for(nbytes):
        return lambda prefix: sess.digest(wl, nbytes, prefix)

    if row in PLUGIN_ROWS + PLUGIN_DESIGN_ROWS:
        from . import bench_plugin

        def digest(nbytes, prefix):
            return sess.digest(wl, nbytes, prefix)

        entry_file = tools["plugin"]
        if row in bench_plugin.DECODE_ROWS:
            lines = wl.small_lines if row == "dec_py" else sess.dec_lines
            return bench_plugin.measure_decode(ctx, row, wl, entry_file, lines, sess.min_time_s,
                                               digest)
        lines = sess.plug_py_stream_lines if row == "plug_py" else sess.stream_lines
        return bench_plugin.measure_plugin(ctx, row, wl, entry_file, sess.endpoint(row),
                                           sess.tmp, lines, digest)
    if row in SUP_ROWS:
        lines = min(sess.stream_lines, wl.lines)
        return bench_supervisor.measure_supervisor(
            ctx, row, wl, sess.endpoint(row), lines,
            lambda nbytes, prefix: sess.digest(wl, nbytes, prefix))
    if row in ACKED_ROWS:
        from . import bench_acked

        if row == "sup_acked":
            return bench_acked.measure_sup_acked(
                ctx, tools["b_cli"], wl, sess.endpoint(row), sess.tmp,
                min(sess.stream_lines, wl.lines),
                lambda nbytes, prefix: sess.digest(wl, nbytes, prefix))
        return bench_acked.measure_cli_row(ctx, tools["b_cli"], row, wl, sess.endpoint(row),
                                           sess.tmp, digest_for(wl.nbytes), sess.spools)
    if row in ENGINE_ROWS:
        from . import bench_engine

        return bench_engine.measure(row, sess.tmp)
    if row in METRICS_ROWS:
        from . import bench_metrics

        exe = tools.get("b_cli") or bench_e2e.find_cli()[0]
        if exe is None:
            return {"lines": wl.lines, "nbytes": wl.nbytes, "error": "no zeroline CLI on PATH"}
        return bench_metrics.measure(exe, row, wl, sess.endpoint(row), sess.tmp)
    if row == "fwd_col":
        return bench_supervisor.measure_fwd_col(ctx, tools["b_cli"], wl, sess.endpoint(row),
                                                sess.tmp, digest_for(wl.nbytes))
    if row in ("rx", "rx_py"):
        lines = min(sess.rx_lines if row == "rx" else wl.small_lines, wl.lines)
        nbytes = wl.small_nbytes if lines == wl.small_lines else \
            bench_supervisor.prefix_bytes(wl.path, lines)
        return bench_supervisor.measure_receive(ctx, "cython" if row == "rx" else "pyzmq", wl,
                                                sess.endpoint(row), nbytes, lines,
                                                digest_for(nbytes))
    if row == "a":
        return bench_core.measure_cut_frame(ctx, wl, sess.min_time_s)
    if row == "e":
        return bench_core.measure_xpub(ctx, wl, sess.endpoint(row), sess.min_time_s)
    nbytes, lines = small if row in ("c", "d") else full
    expected = sess.digest(wl, nbytes, PREFIX)[0]
    ep = sess.endpoint(row)
    if row == "b":
        return bench_e2e.measure_stream(ctx, "cython", wl, ep, nbytes, lines, digest_for(nbytes),
                                        expected)
    if row == "c":
        return bench_e2e.measure_stream(ctx, "python", wl, ep, nbytes, lines, digest_for(nbytes),
                                        expected)
    if row == "d":
        return bench_e2e.measure_naive(ctx, wl, ep, nbytes, lines, digest_for(nbytes), expected)
    if row == "f":
        return bench_e2e.measure_c_ref(ctx, tools["f"], wl, ep, sess.tmp, digest_for(nbytes),
                                       expected)
    if row == "b_cli":
        return bench_e2e.measure_cli(ctx, tools["b_cli"], wl, ep, sess.tmp, digest_for(nbytes),
                                     expected, stdin_mode=sess.args.cli_stdin)
    raise ValueError(row)


def finish(res):
    """Derived numbers of one measurement."""
    wall = res.get("wall_s")
    if "error" in res or not wall:
        return res
    lines = res["lines"]
    res["lines_per_s"] = lines / wall
    res["mb_per_s"] = res["nbytes"] / wall / 1e6
    cpu = (res.get("cpu_send_s") or 0.0) + (res.get("cpu_recv_s") or 0.0)
    res["cpu_s_per_mline"] = cpu / lines * 1e6
    res["cpu_send_s_per_mline"] = (res.get("cpu_send_s") or 0.0) / lines * 1e6
    res["cpu_recv_s_per_mline"] = (res.get("cpu_recv_s") or 0.0) / lines * 1e6
    return res


def run(args):
    from . import bench_e2e

    try:
        from zeroline import _core  # noqa: F401
    except ImportError as exc:
        print("zeroline._core is not built (%s); build it with:\n"
              "  cd %s && python setup.py -q build_ext --inplace" % (exc, ROOT), file=sys.stderr)
        return 1
    floors, per_workload, targets = load_gates()
    commit, dirty = git_commit()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + \
        "-%d" % os.getpid()
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="zlb-", dir="/tmp")
    try:
        print("zeroline benchmarks, %s mode, %d round(s), commit %s%s, run %s"
              % ("quick" if args.quick else "full", args.reps, (commit or "?")[:12],
                 " (dirty)" if dirty else "", run_id), flush=True)
        sess = Session(args, tmp)
        sess.notes["load_before"] = load_average()
        tools = {}
        if "f" in args.rows:
            tools["f"], why = bench_e2e.build_ref_sender(tmp)
            if why:
                sess.skipped["f"] = why
        cli_rows = [r for r in ("b_cli", "fwd_col") + ACKED_ROWS if r in args.rows]
        if cli_rows:
            tools["b_cli"], why = bench_e2e.find_cli()
            if why:
                for row in cli_rows:
                    sess.skipped[row] = why
            else:
                sess.notes["cli"] = "%s (%s)" % (tools["b_cli"], bench_e2e.cli_version(
                    tools["b_cli"]) or "version unknown")
                print("  CLI: " + sess.notes["cli"], flush=True)
        plugin_rows = [r for r in args.rows if r in PLUGIN_ROWS + PLUGIN_DESIGN_ROWS]
        if plugin_rows and SERVICE_WORKLOAD in sess.workloads:
            from . import bench_plugin

            # Encoded once, before any timing: the frames of the first lines every row needs.
            wl = sess.workloads[SERVICE_WORKLOAD]
            t = time.monotonic()
            need = max(sess.stream_lines, sess.dec_lines, wl.small_lines)
            tools["plugin"], why = bench_plugin.prepare(tmp, wl, need)
            if why:
                for row in plugin_rows:
                    sess.skipped[row] = why
                print("  plugin rows skipped: " + why, flush=True)
            else:
                ef = tools["plugin"]
                sess.notes["plugin_entries"] = "%s; %s entries of %s, %.1f MB" % (
                    ef.note, format(ef.entries[-1], ","), SERVICE_WORKLOAD, ef.ends[-1] / 1e6)
                print("  encoded %s (%.1f s)" % (sess.notes["plugin_entries"],
                                                 time.monotonic() - t), flush=True)
        if any(r in ENGINE_ROWS for r in args.rows):
            from . import bench_engine

            why = bench_engine.available()
            for row in (ENGINE_ROWS if why else ()):
                sess.skipped[row] = why
        rows = [r for r in args.rows if r not in sess.skipped]
        ctx = make_context()
        run_rounds(sess, ctx, rows, tools, range(args.reps))
        summary = summarize(sess, floors, per_workload, targets)
        again = rows_to_confirm(summary, rows) if args.check else {}
        if again:
            # A gated ratio under its floor is measured again before it fails the check: its
            # rows (only those) run as many rounds more, and the verdict is the median over all
            # rounds. One unlucky stretch of other load on a shared machine fails CI no more;
            # a real regression stays under the floor with twice the evidence.
            again_rows = [r for r in rows if any(r in pair for pair in again.values())]
            print("  below floor: %s; measuring %s for %d more round(s)"
                  % (", ".join(sorted(again)), ", ".join(again_rows), args.reps), flush=True)
            sess.notes["confirmed"] = "%s: %d more rounds of %s" % (
                ", ".join(sorted(again)), args.reps, ", ".join(again_rows))
            run_rounds(sess, ctx, again_rows, tools, range(args.reps, 2 * args.reps))
        sess.notes["load_after"] = load_average()
        summary = summarize(sess, floors, per_workload, targets)
        report(sess, summary, targets)
        elapsed = time.monotonic() - started
        print("\nrun took %.1f s" % elapsed)
        if not args.no_save:
            save(sess, summary, run_id, commit, dirty, elapsed)
            print("appended to %s" % os.path.relpath(RESULTS))
        return verdict(sess, summary, targets, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_rounds(sess, ctx, rows, tools, rounds):
    """Measure every row of rows once per round; results are appended per (workload, row)."""
    for rnd in rounds:
        # A/B interleaving: every row once per round, the order reversed on odd rounds so
        # slow drift (thermal, page cache, other load) hits all rows alike.
        order = rows if rnd % 2 == 0 else rows[::-1]
        for name, wl in sess.workloads.items():
            for row in order:
                if row in W1_ROWS and name != SERVICE_WORKLOAD:
                    continue
                t = time.monotonic()
                res = finish(measure_row(sess, ctx, row, wl, tools))
                sess.results.setdefault((name, row), []).append(res)
                print("  round %d %s %-5s %s (%.1f s)"
                      % (rnd + 1, name, row,
                         ("%s lines/s" % fmt_rate(res.get("lines_per_s")))
                         if "error" not in res else "ERROR " + res["error"][:300],
                         time.monotonic() - t), flush=True)


def rows_to_confirm(summary, rows):
    """{"workload ratio": (num, den)} of the gated ratios under their floor, both rows measured."""
    again = {}
    for (name, ratio), r in summary["ratios"].items():
        num, den = RATIOS[ratio]
        if r["floor"] is not None and r["ok"] is False and r["rounds"] \
                and num in rows and den in rows:
            again["%s %s" % (name, ratio)] = (num, den)
    return again


def summarize(sess, floors, per_workload, targets):
    rows = {}
    for (name, row), results in sess.results.items():
        ok = [r for r in results if "error" not in r]
        rows[(name, row)] = {
            "lines": results[0].get("lines"),
            "nbytes": results[0].get("nbytes"),
            "lines_per_s": median(r.get("lines_per_s") for r in ok),
            "mb_per_s": median(r.get("mb_per_s") for r in ok),
            "cpu_s_per_mline": median(r.get("cpu_s_per_mline") for r in ok),
            "cpu_send_s_per_mline": median(r.get("cpu_send_s_per_mline") for r in ok),
            "cpu_recv_s_per_mline": median(r.get("cpu_recv_s_per_mline") for r in ok),
            "peak_rss_mb": median(r.get("peak_rss_mb") for r in ok),
            "recv_rss_mb": median(r.get("recv_rss_mb") for r in ok),
            "reps_lines_per_s": [r.get("lines_per_s") for r in results],
            "verified": results[0].get("verified") if not any("error" in r for r in results)
            else "FAIL",
            "errors": [r["error"] for r in results if "error" in r],
            "passes": results[0].get("passes"),
            **{k: median(r.get(k) for r in ok) for k in SUP_KEYS
               if any(r.get(k) is not None for r in ok)},
            "rounds": [{k: r.get(k) for k in ROUND_KEYS if r.get(k) is not None}
                       for r in results],
        }
    ratios = {}
    for name in sess.workloads:
        floors_here = dict(floors, **per_workload.get(name, {}))
        for ratio, (num, den) in RATIOS.items():
            a, b = sess.results.get((name, num)), sess.results.get((name, den))
            if not a or not b:
                # Not measured in this run (--rows, or a skipped optional row): nothing to gate.
                continue
            # Paired per round (same interleaved round), then the median.
            pairs = [x["lines_per_s"] / y["lines_per_s"] for x, y in zip(a, b)
                     if x.get("lines_per_s") and y.get("lines_per_s")]
            value = median(pairs)
            floor = floors_here.get(ratio)
            ok = None if floor is None else (value is not None and value >= floor)
            ratios[(name, ratio)] = {"value": value, "floor": floor, "ok": ok,
                                     "rounds": pairs, "why": None if pairs else "row failed"}
    return {"rows": rows, "ratios": ratios, "targets": target_status(sess, rows, targets)}


def target_status(sess, rows, targets):
    out = {}
    checks = [("b_lines_per_s", "b", "lines_per_s", ">="),
              ("e_lines_per_s", "e", "lines_per_s", ">="),
              ("a_lines_per_s", "a", "lines_per_s", ">="),
              ("cli_peak_rss_mb", "b_cli", "peak_rss_mb", "<"),
              ("fwd_col_lines_per_s", "fwd_col", "lines_per_s", ">="),
              ("fwd_acked_lines_per_s", "fwd_acked", "lines_per_s", ">="),
              ("fwd_acked_peak_rss_mb", "fwd_acked", "peak_rss_mb", "<"),
              ("spool_w_lines_per_s", "spool_w", "lines_per_s", ">="),
              ("spool_w_peak_rss_mb", "spool_w", "peak_rss_mb", "<"),
              ("spool_r_lines_per_s", "spool_r", "lines_per_s", ">="),
              ("spool_r_peak_rss_mb", "spool_r", "peak_rss_mb", "<"),
              ("sup_fairness", "sup", "fairness", "<="),
              ("sup_peak_rss_mb", "sup", "peak_rss_mb", "<"),
              ("sup_kib_per_stream", "sup", "kib_per_stream", "<"),
              ("plug_entries_per_s", "plug", "lines_per_s", ">=")]
    for name in sess.workloads:
        for key, row, metric, op in checks:
            if key not in targets or (row in W1_ROWS and name != SERVICE_WORKLOAD):
                continue
            value = rows.get((name, row), {}).get(metric)
            goal = float(targets[key])
            ok = None if value is None else (value >= goal if op == ">=" else
                                             value <= goal if op == "<=" else value < goal)
            out[(name, key)] = {"value": value, "target": goal, "op": op, "ok": ok}
    return out


def report(sess, summary, targets):
    from .workloads import DESCRIPTIONS

    rows, ratios = summary["rows"], summary["ratios"]
    head = ("row", "impl", "what", "lines", "lines/s", "MB/s", "CPU s/M", "send", "recv",
            "RSS MB", "check")
    line_fmt = "%-11s %-12s %-30s %10s %10s %7s %8s %6s %6s %7s  %s"
    for name, wl in sess.workloads.items():
        print("\n%s: %s; %s lines, %.1f MB (c, d: first %s lines)"
              % (name, DESCRIPTIONS[name], format(wl.lines, ","), wl.nbytes / 1e6,
                 format(wl.small_lines, ",")))
        print(line_fmt % head)
        for row in ROWS:
            impl, what = ROW_INFO[row]
            if row in sess.skipped:
                if row not in W1_ROWS or name == SERVICE_WORKLOAD:
                    print("%-11s %-12s %-30s skipped: %s" % (row, impl, what, sess.skipped[row]))
                continue
            s = rows.get((name, row))
            if s is None:
                continue
            lines = s["lines"]
            if s.get("passes"):
                lines = "%s×%d" % (_short(lines // s["passes"]), s["passes"])
            else:
                lines = _short(lines)
            check = s["verified"]
            if s["errors"]:
                check += " (%d/%d rounds failed: %s)" % (
                    len(s["errors"]), len(sess.results[(name, row)]), s["errors"][0][:160])
            print(line_fmt % (row, impl, what, lines, fmt_rate(s["lines_per_s"]),
                              fmt(s["mb_per_s"], "%.0f"), fmt(s["cpu_s_per_mline"], "%.3f"),
                              fmt(s["cpu_send_s_per_mline"], "%.2f"),
                              fmt(s["cpu_recv_s_per_mline"], "%.2f"),
                              fmt(s["peak_rss_mb"]), check))
        sup_table(sess, rows, name)
        plugin_table(sess, rows, name)
        print("ratios (median of per-round pairs):")
        for ratio in RATIOS:
            r = ratios.get((name, ratio))
            if r is None:
                continue
            status = "" if r["floor"] is None else (
                "  >= %g %s" % (r["floor"], "ok" if r["ok"] else "BELOW FLOOR"))
            rounds = " ".join("%.2f" % x for x in r.get("rounds") or [])
            print("  %-24s %8s%s%s" % (ratio, fmt(r["value"], "%.2f"), status,
                                       ("   rounds: " + rounds) if rounds else
                                       ("   (%s)" % r["why"] if r["why"] else "")))
        print("absolute targets (reported, not gated):")
        for (wname, key), t in summary["targets"].items():
            if wname != name:
                continue
            shown = fmt_rate(t["value"]) if key.endswith("per_s") else fmt(t["value"])
            goal = fmt_rate(t["target"]) if key.endswith("per_s") else fmt(t["target"])
            print("  %-22s %10s  target %s %s  %s" % (
                key, shown, t["op"], goal,
                "n/a" if t["ok"] is None else ("met" if t["ok"] else "MISSED")))
    print("\nload average (1 min) before/after: %s / %s on %d CPUs; other load skews single "
          "rounds, the paired medians less."
          % (fmt(sess.notes.get("load_before"), "%.2f"), fmt(sess.notes.get("load_after"), "%.2f"),
             os.cpu_count() or 0))
    print("CPU s/M: CPU seconds per million lines of the sender and receiver processes "
          "(getrusage, all threads);\n  row a: feed+clear only; b_cli: whole CLI process incl. "
          "start-up, timed first→last message at the receiver;\n  sup*: the supervisor process "
          "(writer process apart), timed go → last message; fwd_col: both CLI processes\n  incl. "
          "start-up, timed at the file, first line → last; rx*: receiver only, on a queue filled "
          "first.\nRSS MB: sender peak (VmHWM); sup*: the supervisor process; fwd_col: zeroline "
          "forward.\n"
          "plug*, dec*: lines = LogEntry entries (one per W1 line); MB/s counts frame bytes; "
          "plug*: CPU s/M and RSS of the plugin\n  process (writer process apart), timed go → "
          "last message; dec*: CPU of the timed decode loop only.\n"
          "fwd_acked, spool_r: both CLI processes incl. start-up, timed at the file, first line → "
          "last; spool_w: forward alone,\n  timed from the first spool byte to its exit; "
          "sup_acked: the supervisor process (CPU s/M send) and the collector\n  (recv), timed "
          "at the file too; RSS: forward / the supervisor process.")
    if sess.notes.get("plugin_entries"):
        print("plugin entries: " + sess.notes["plugin_entries"])
    if sess.notes.get("confirmed"):
        print("measured again (first median under the floor), ratios over all rounds: "
              + sess.notes["confirmed"])


def plugin_table(sess, rows, name):
    """The plug rows' own numbers (medians): how the writer wrote, its CPU, fairness, memory."""
    have = [r for r in PLUGIN_ROWS + PLUGIN_DESIGN_ROWS
            if r.startswith("plug") and (name, r) in rows]
    if not have:
        return
    print("plugin rows: 100 FIFOs; writes = the writer's write() size (blocks: 64 KiB of frames, "
          "entry: one frame);\n  writer CPU = the writer process (apart from CPU s/M); fairness, "
          "KiB/stream and blocked as the supervisor rows")
    fmt_ = "  %-11s %8s %-10s %9s %8s %10s %8s %10s"
    print(fmt_ % ("row", "streams", "writes", "entries/s", "fairness", "KiB/stream", "blocked",
                  "writer CPU"))
    for row in have:
        s = rows[(name, row)]
        first = sess.results[(name, row)][0]
        print(fmt_ % (row, fmt(first.get("streams"), "%d"),
                      (first.get("mode") or "-").split(", ")[-1].replace(" writes", ""),
                      fmt_rate(s.get("lines_per_s")), fmt(s.get("fairness"), "%.2f"),
                      fmt(s.get("kib_per_stream"), "%.2f"), fmt(s.get("blocked"), "%d"),
                      fmt(s.get("cpu_writer_s"), "%.2f s")))


def sup_table(sess, rows, name):
    """The supervisor rows' own numbers (medians): fairness, memory, how often it blocked."""
    have = [r for r in SUP_ROWS if (name, r) in rows]
    if not have:
        return
    print("supervisor rows: fairness = max/min lines per chatty stream when the first finished "
          "(1.0 = fair; inf = a stream\n  had none yet); spread = max/min of each stream's "
          "average rate to its end; KiB/stream = RSS growth\n  while the streams were set up, "
          "per stream; blocked = socket refusals; wake-ups = ZMQ_FD readiness callbacks")
    fmt_ = "  %-11s %8s %8s %9s %10s %8s %10s %10s"
    print(fmt_ % ("row", "streams", "fairness", "spread", "KiB/stream", "blocked", "wake-ups",
                  "writer CPU"))
    for row in have:
        s = rows[(name, row)]
        streams = next((r.get("streams") for r in sess.results[(name, row)] if r.get("streams")),
                       None)
        print(fmt_ % (row, fmt(streams, "%d"), fmt(s.get("fairness"), "%.2f"),
                      fmt(s.get("spread"), "%.2f"), fmt(s.get("kib_per_stream"), "%.2f"),
                      fmt(s.get("blocked"), "%d"), fmt(s.get("zmq_fd_wakeups"), "%d"),
                      fmt(s.get("cpu_writer_s"), "%.2f s")))


def _short(n):
    if n is None:
        return "-"
    if n >= 1_000_000:
        return "%.2fM" % (n / 1e6)
    return "%dk" % round(n / 1e3)


def save(sess, summary, run_id, commit, dirty, elapsed):
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = {"run": run_id, "time": stamp, "commit": commit, "dirty": dirty, "mode": sess.mode,
            "reps": sess.args.reps, "seed": sess.args.seed, "host_cpus": os.cpu_count(),
            "python": sys.version.split()[0]}
    with open(RESULTS, "a") as f:
        for (name, row), s in summary["rows"].items():
            impl, what = ROW_INFO[row]
            rec = dict(base, kind="row", workload=name, row=row, impl=impl, what=what, **s)
            f.write(json.dumps(_finite(rec), sort_keys=True) + "\n")
        for name in sess.workloads:
            ratios = {k: v for (w, k), v in summary["ratios"].items() if w == name}
            targets = {k: v for (w, k), v in summary["targets"].items() if w == name}
            rec = dict(base, kind="ratios", workload=name, ratios=ratios, targets=targets,
                       skipped=sess.skipped, notes=sess.notes, elapsed_s=round(elapsed, 1))
            f.write(json.dumps(_finite(rec), sort_keys=True) + "\n")


def _finite(value):
    """JSON has no infinity (fairness of a starved stream): null, the window counts tell why."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def verdict(sess, summary, targets, args):
    failures = []
    for (name, ratio), r in summary["ratios"].items():
        if r["floor"] is not None and not r["ok"]:
            failures.append("%s %s = %s, floor %g" % (name, ratio, fmt(r["value"], "%.2f"),
                                                        r["floor"]))
    for (name, row), s in summary["rows"].items():
        if s["errors"]:
            failures.append("%s row %s: %s" % (name, row, s["errors"][0]))
    if getattr(args, "require_rows", False):
        # A gate whose rows were skipped would pass on nothing.
        for row, why in sess.skipped.items():
            if row not in args.rows:
                continue
            failures.append("row %s was asked for and skipped: %s" % (row, why))
    if not args.quick and targets.get("enforce_in_full"):
        for (name, key), t in summary["targets"].items():
            if t["ok"] is False:
                failures.append("%s target %s missed" % (name, key))
    if failures:
        print("\n%s:" % ("CHECK FAILED" if args.check else "problems"))
        for f in failures:
            print("  " + f)
    elif args.check:
        print("\ncheck passed: every gated ratio is at or above its floor, all messages verified")
    if args.quick and args.check:
        print("(quick mode: short timings on a shared machine are noisy; floors are kept)")
    return 1 if (failures and args.check) else 0


# ---------------------------------------------------------------------------------------------
# Compare


def compare(args):
    if not os.path.exists(RESULTS):
        print("no results yet: %s" % RESULTS, file=sys.stderr)
        return 2
    records = []
    with open(RESULTS) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    order = []
    for r in records:
        if r.get("run") not in order:
            order.append(r.get("run"))
    want = args.runs or order[-2:]
    if len(want) != 2 or any(w not in order for w in want):
        print("need two recorded runs (have %d); give their ids: %s"
              % (len(order), ", ".join(order[-5:])), file=sys.stderr)
        return 2
    before, after = ({(r["workload"], r["row"]): r for r in records
                      if r.get("run") == w and r.get("kind") == "row"} for w in want)
    meta = {w: next(r for r in records if r.get("run") == w) for w in want}
    for w in want:
        m = meta[w]
        print("%s: commit %s%s, %s mode, %s" % (w, (m.get("commit") or "?")[:12],
                                                 " (dirty)" if m.get("dirty") else "",
                                                 m.get("mode"), m.get("time")))
    print("%-4s %-6s %12s %12s %8s" % ("wl", "row", "before", "after", "change"))
    for key in sorted(set(before) | set(after)):
        b = before.get(key, {}).get("lines_per_s")
        a = after.get(key, {}).get("lines_per_s")
        change = "%+.1f%%" % ((a / b - 1) * 100) if a and b else "-"
        print("%-4s %-6s %12s %12s %8s" % (key[0], key[1], fmt_rate(b), fmt_rate(a), change))
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "compare":
        return compare(args)
    if args.runs:
        print("run takes no positional arguments", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
