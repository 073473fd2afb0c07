"""--metrics-address: /metrics scraped while lines flow adds up to what was sent and received; /healthz
says why the process cannot do its job; --stats uses the metrics' names; forward's progress line."""

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import zmq
from test_docker_plugin import CID, Daemon, PluginThread, entry_pb2, opts  # noqa: F401
from test_docker_plugin import Collector as Receiver

from zeroline.collector import MAX_COUNTED_DESTINATIONS, Collector
from zeroline.metrics import (
    CollectorMetrics,
    ForwarderMetrics,
    MetricsServer,
    PluginMetrics,
    parse_address,
    summary_line,
)

from conftest import finish

TIMEOUT_S = 30
SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="zlm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def zl(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "zeroline", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def metrics_address(proc):
    """The address a command announced on stderr ('metrics on http://ADDR/metrics')."""
    seen = b""
    for _ in range(TIMEOUT_S * 10):
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            seen += chunk
            found = re.search(rb"metrics on http://([^/]+)/metrics", seen)
            if found:
                return found.group(1).decode()
            if not chunk:
                break
    raise AssertionError("no metrics address announced: %r" % seen)


def get(address, path):
    try:
        with urllib.request.urlopen("http://%s%s" % (address, path), timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(address):
    """``{name: value}`` and ``{name{labels}: value}`` of every sample."""
    status, text = get(address, "/metrics")
    assert status == 200, text
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, labels, value = SAMPLE.match(line).groups()
        out[name + (labels or "")] = float(value)
        if labels:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def scrape_until(address, name, want):
    """Scrape until ``name`` reaches ``want`` (bounded); values seen must never go down."""
    last = -1.0
    for _ in range(TIMEOUT_S * 20):
        got = scrape(address)
        value = got.get(name, 0.0)
        assert value >= last, (name, value, last)
        last = value
        if value >= want:
            return got
        time.sleep(0.05)
    raise AssertionError("%s stayed at %s, expected %s" % (name, last, want))


def wait_for_path(path, proc):
    for _ in range(TIMEOUT_S * 100):
        if os.path.exists(path) or proc.poll() is not None:
            return
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Whole commands


def test_run_and_collect_metrics_add_up_while_acked_lines_flow(short_dir):
    endpoint = "ipc://%s/acked.ipc" % short_dir
    out = os.path.join(short_dir, "out")
    col = zl("collect", "--bind-acked", endpoint, "--out", out, "--metrics-address",
             "127.0.0.1:0", "--stats")
    try:
        col_addr = metrics_address(col)
        go = os.path.join(short_dir, "go")
        env = dict(os.environ, TENANT_ID="acme", SERVICE_ID="web")
        # CMD writes 30,000 + 20,000 lines, then waits, so its metrics can be read at rest.
        run = zl("run", "--log-opt", "zmq-address=" + endpoint, "--log-opt", "zmq-socket=acked",
                 "--metrics-address", "127.0.0.1:0", "--stats", "--container-id", "c" * 12,
                 "--", "sh", "-c", "seq 1 30000; seq 1 20000 >&2; "
                 "i=0; while [ ! -e %s ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done" % go,
                 env=env)
        try:
            run_addr = metrics_address(run)
            mid = scrape(run_addr)           # while lines flow: read >= sent >= acknowledged
            assert (mid["zeroline_lines_read_total"] >= mid["zeroline_messages_sent_total"]
                    >= mid.get("zeroline_messages_acknowledged_total", 0))
            got = scrape_until(run_addr, "zeroline_messages_acknowledged_total", 50000)
            assert got["zeroline_lines_read_total"] == 50000
            assert got["zeroline_messages_sent_total"] == 50000
            assert got["zeroline_messages_acknowledged_total"] == 50000
            assert got["zeroline_bytes_read_total"] == sum(
                len(str(i)) + 1 for i in range(1, 30001)) + sum(
                len(str(i)) + 1 for i in range(1, 20001))
            assert got['zeroline_messages_dropped_total{reason="buffer_full"}'] == 0
            assert got["zeroline_unacknowledged_batches"] == 0
            assert got["zeroline_send_backlog_messages"] == 0
            # The connection is noticed on the sink's next timer tick.
            scrape_until(run_addr, 'zeroline_peer_connected{endpoint="%s"}' % endpoint, 1)
            assert got["zeroline_streams"] == 2
            assert get(run_addr, "/healthz") == (200, "ok\n")
            # The collector's side of the same lines.
            cgot = scrape_until(col_addr, "zeroline_collector_lines_written_total", 50000)
            assert cgot["zeroline_collector_messages_received_total"] == 50000
            assert cgot["zeroline_collector_acked_lines_total"] == 50000
            assert cgot['zeroline_collector_lines_written_total{service="web",tenant="acme"}'] \
                == 50000
            path = os.path.join(out, "acme", "web.log")
            assert cgot['zeroline_collector_bytes_written_total{service="web",tenant="acme"}'] \
                == os.path.getsize(path)
            assert cgot["zeroline_collector_malformed_total"] == 0
            assert get(col_addr, "/healthz") == (200, "ok\n")
        finally:
            open(go, "w").close()
            _, run_err = finish(run)
        assert run.returncode == 0, run_err
        # --stats: one line, the metrics' names.
        summary = [line for line in run_err.decode().splitlines() if "lines_read_total=" in line]
        assert len(summary) == 1, run_err
        fields = dict(kv.split("=", 1) for kv in summary[0].split()[1:] if "{" not in kv)
        assert fields["lines_read_total"] == "50000"
        assert fields["messages_acknowledged_total"] == "50000"
        assert all("zeroline_" + name in got for name in fields), (fields, sorted(got))
    finally:
        _, col_err = finish(col, signal.SIGTERM)
    assert col.returncode == 0, col_err
    assert b"lines_written_total=50000" in col_err and b"acked_lines_total=50000" in col_err


def test_collect_metrics_while_push_lines_flow_and_bounded_destinations(short_dir):
    endpoint = "ipc://%s/pull.ipc" % short_dir
    out = os.path.join(short_dir, "out")
    col = zl("collect", "--bind", endpoint, "--out", out, "--metrics-address", "127.0.0.1:0")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        addr = metrics_address(col)
        push.connect(endpoint)
        sent = 0
        # 150 destinations: 100 get their own labels, the rest share "other".
        for round_ in range(3):
            for dest in range(150):
                push.send_multipart([b"t%d" % dest, b"s", b"c: line %d" % round_])
                sent += 1
            push.send_multipart([b"t", b"s"])          # malformed: two frames
            scrape(addr)                                # scraped while lines flow
        got = scrape_until(addr, "zeroline_collector_messages_received_total", sent)
        got = scrape_until(addr, "zeroline_collector_lines_written_total", sent)
        assert got["zeroline_collector_messages_received_total"] == sent
        assert got['zeroline_collector_malformed_total{reason="frames"}'] == 3
        labelled = [k for k in got if k.startswith("zeroline_collector_lines_written_total{")]
        assert len(labelled) == MAX_COUNTED_DESTINATIONS + 1
        assert got['zeroline_collector_lines_written_total{service="other",tenant="other"}'] \
            == 50 * 3
    finally:
        push.close(linger=0)
        ctx.term()
        finish(col, signal.SIGTERM)
    assert col.returncode == 0


def test_bad_metrics_address_is_a_usage_error_and_a_busy_port_an_endpoint_error(short_dir):
    endpoint = "ipc://%s/x.ipc" % short_dir
    bad = subprocess.run([sys.executable, "-m", "zeroline", "collect", "--bind", endpoint,
                          "--stdout", "--metrics-address", "localhost"], capture_output=True,
                         timeout=TIMEOUT_S, check=False)
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1, bad.stderr
    assert b"--metrics-address" in bad.stderr
    holder = MetricsServer("127.0.0.1:0", ForwarderMetrics())
    try:
        busy = subprocess.run([sys.executable, "-m", "zeroline", "run", "--metrics-address",
                               holder.address, "--", "true"], capture_output=True,
                              timeout=TIMEOUT_S, check=False)
    finally:
        holder.close()
    assert busy.returncode == 1 and busy.stderr.count(b"\n") == 1, busy.stderr
    assert b"cannot serve metrics on" in busy.stderr


@pytest.mark.parametrize("text", ["nope", "host:", "host:99999", "::1:9100", "[nothost]:1"])
def test_parse_address_refuses_what_is_not_host_port(text):
    from zeroline.errors import ConfigError

    with pytest.raises(ConfigError):
        parse_address(text)


def test_parse_address_takes_ipv4_ipv6_and_any():
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    assert parse_address(":9100") == ("", 9100)


# ---------------------------------------------------------------------------------------------
# /healthz


class _FakeSink:
    endpoint = "tcp://collector:6362"

    def __init__(self, connected, since, spool_full=False):
        self.connected = self.peer_seen = connected
        self._monitor = object()
        self.peer_changed_at = since
        self.spool_full = spool_full
        self.spool = type("S", (), {"path": "/spool", "bytes_used": 10, "max_bytes": 10})()

    def stats(self):
        return {"disconnects_total": 1}


def test_healthz_is_503_with_the_reason_when_the_collector_is_away_or_the_spool_full():
    source = ForwarderMetrics(unreachable_s=1.0)
    server = MetricsServer("127.0.0.1:0", source).start()
    try:
        assert get(server.address, "/healthz") == (200, "ok\n")     # nothing to forward yet
        source.sink = _FakeSink(False, time.monotonic())
        assert get(server.address, "/healthz") == (200, "ok\n")     # away, not for long
        source.sink = _FakeSink(False, time.monotonic() - 60)
        status, text = get(server.address, "/healthz")
        assert status == 503 and "collector unreachable" in text
        assert "tcp://collector:6362" in text
        source.sink = _FakeSink(True, time.monotonic() - 60, spool_full=True)
        status, text = get(server.address, "/healthz")
        assert status == 503 and text.startswith("spool full: /spool")
        assert get(server.address, "/nothing")[0] == 404
    finally:
        server.close()


def test_healthz_is_503_naming_the_path_while_the_collector_cannot_write(short_dir):
    out = os.path.join(short_dir, "out")
    os.makedirs(out)
    open(os.path.join(out, "acme"), "w").close()     # the tenant's directory cannot be made
    endpoint = "ipc://%s/w.ipc" % short_dir
    warnings = []
    col = Collector(out_dir=out, warn=warnings.append)
    col.bind(endpoint, "pull")
    thread = threading.Thread(target=col.run, daemon=True)
    thread.start()
    server = MetricsServer("127.0.0.1:0", CollectorMetrics(col)).start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        assert get(server.address, "/healthz") == (200, "ok\n")
        push.connect(endpoint)
        push.send_multipart([b"acme", b"web", b"c: one"])
        for _ in range(TIMEOUT_S * 20):
            status, text = get(server.address, "/healthz")
            if status == 503:
                break
            time.sleep(0.05)
        assert status == 503, text
        assert text.startswith("cannot write %s" % os.path.join(out, "acme")), text
        got = scrape(server.address)
        assert got["zeroline_collector_write_failing"] == 1
        assert got["zeroline_collector_write_errors_total"] == 1
        assert any(os.path.join(out, "acme") in w for w in warnings), warnings
        os.unlink(os.path.join(out, "acme"))           # room again: it goes on by itself
        for _ in range(TIMEOUT_S * 20):
            if get(server.address, "/healthz")[0] == 200:
                break
            time.sleep(0.05)
        assert get(server.address, "/healthz") == (200, "ok\n")
        assert scrape(server.address)["zeroline_collector_lines_written_total"] == 1
    finally:
        push.close(linger=0)
        ctx.term()
        col.stop()
        thread.join(TIMEOUT_S)
        col.close()
        server.close()


# ---------------------------------------------------------------------------------------------
# The plugin, driven by the dockerd stand-in of test_docker_plugin


def test_plugin_metrics_count_containers_streams_and_entries(entry_pb2):  # noqa: F811

    work = tempfile.mkdtemp(prefix="zlp")
    sock_path = os.path.join(work, "plugins", "zeroline.sock")
    plugin = PluginThread(sock_path, os.path.join(work, "state"))
    endpoint = "ipc://%s/c.ipc" % work
    receiver = Receiver(endpoint)
    daemon = Daemon(sock_path, work, entry_pb2)
    server = MetricsServer("127.0.0.1:0", PluginMetrics(plugin.plugin)).start()
    other = "e" * 64
    try:
        first, _, status, _ = daemon.start(CID, opts(endpoint))
        assert status == 200
        second, _, status, _ = daemon.start(other, opts(endpoint))
        assert status == 200
        got = scrape(server.address)
        assert got["zeroline_plugin_containers"] == 2 and got["zeroline_plugin_streams"] == 2
        assert got['zeroline_plugin_container_streams{container_id="%s"}' % CID[:12]] == 1
        for i in range(300):
            daemon.log(first, daemon.entry(b"a%d" % i))
            if i % 3 == 0:
                daemon.log(second, daemon.entry(b"b%d" % i, source="stderr"))
        assert len(receiver.wait_for(400)) == 400
        got = scrape_until(server.address, "zeroline_messages_sent_total", 400)
        assert got["zeroline_lines_read_total"] == 400
        assert got['zeroline_plugin_container_entries_total{container_id="%s"}' % CID[:12]] \
            == 300
        assert got['zeroline_plugin_container_entries_total{container_id="%s"}'
                   % other[:12]] == 100
        # The connection is noticed on the sink's next timer tick.
        scrape_until(server.address, 'zeroline_peer_connected{endpoint="%s"}' % endpoint, 1)
        assert get(server.address, "/healthz") == (200, "ok\n")
        daemon.stop(second)
        for _ in range(TIMEOUT_S * 20):
            got = scrape(server.address)
            if got["zeroline_plugin_containers"] == 1:
                break
            time.sleep(0.05)
        assert got["zeroline_plugin_containers"] == 1 and got["zeroline_plugin_streams"] == 1
        assert got["zeroline_lines_read_total"] >= 400        # counters never go back
    finally:
        server.close()
        for fd in daemon.fds.values():
            os.close(fd)
        plugin.close()
        receiver.close()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# --stats and forward's progress


def test_summary_line_uses_the_metric_names_and_lists_reasons():
    with open(os.devnull, "wb") as devnull:
        col = Collector(out=devnull)
        try:
            col._malformed["batch"] = 2
            line = summary_line(CollectorMetrics(col))
        finally:
            col.close()
    assert line.startswith("messages_received_total=0 bytes_received_total=0 malformed_total=2")
    assert "malformed_total{reason=batch}=2" in line


def test_forward_file_shows_progress_on_a_terminal_and_nothing_otherwise(short_dir):
    path = os.path.join(short_dir, "in.log")
    with open(path, "wb") as f:
        f.write((b"y" * 99 + b"\n") * 2000)
    argv = [sys.executable, "-m", "zeroline", "forward", path, "--out",
            os.path.join(short_dir, "out")]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave, cwd=short_dir)
        os.close(slave)
        seen = b""
        for _ in range(TIMEOUT_S * 10):
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:                 # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(TIMEOUT_S) == 0, seen
    finally:
        os.close(master)
    assert b"\rzeroline: 195.3 KiB of 195.3 KiB (100%) read, 2000 lines" in seen, seen
    assert b"lines/s" in seen
    plain = subprocess.run(argv, capture_output=True, cwd=short_dir, timeout=TIMEOUT_S,
                           check=False)
    assert plain.returncode == 0, plain.stderr
    assert b"lines/s" not in plain.stderr and b"\r" not in plain.stderr


# ---------------------------------------------------------------------------------------------
# The benchmark rows run and check their file (no timing asserted)


@pytest.mark.parametrize("row", ["met", "met0"])
def test_metrics_benchmark_row_transfers_every_line(short_dir, row):
    import types

    from benchmarks import bench_metrics

    exe = shutil.which("zeroline")
    if exe is None:
        pytest.skip("no zeroline on PATH")
    path = os.path.join(short_dir, "w.txt")
    with open(path, "wb") as f:
        f.write((b"z" * 99 + b"\n") * 20000)
    wl = types.SimpleNamespace(path=path, lines=20000, nbytes=2_000_000)
    res = bench_metrics.measure(exe, row, wl, "ipc://%s/b.ipc" % short_dir, short_dir)
    assert "error" not in res, res
    assert res["messages"] == 20000 and res["wall_s"] > 0
