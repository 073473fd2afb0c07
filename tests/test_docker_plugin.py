"""A dockerd stand-in drives the logging plugin for real: HTTP over its unix socket, FIFOs opened
read-write the way the daemon opens them, LogEntry frames from the protobuf package (the reference
encoder, compiled from tests/data/entry.proto), lines checked at a real ZeroMQ receiver and through
ReadLogs."""

import asyncio
import http.client
import json
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

import msgpack
import pytest
import uvloop
import zmq

from zeroline import core, docker_plugin
from zeroline.docker_plugin import LocalLog, Plugin, entry_boundary, serve

TIMEOUT_S = 30
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def entry_pb2():
    protoc = pytest.importorskip("grpc_tools.protoc")
    pytest.importorskip("google.protobuf")
    out = tempfile.mkdtemp(prefix="zlpb")
    rc = protoc.main(["protoc", "-I" + os.path.join(HERE, "data"), "--python_out=" + out,
                      os.path.join(HERE, "data", "entry.proto")])
    assert rc == 0
    sys.path.insert(0, out)
    try:
        import entry_pb2 as module
    finally:
        sys.path.remove(out)
    yield module
    shutil.rmtree(out, ignore_errors=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=TIMEOUT_S):
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Daemon:
    """Plays dockerd's part toward the plugin."""

    def __init__(self, sock_path, work_dir, pb2):
        self.sock_path = sock_path
        self.work_dir = work_dir
        self.pb2 = pb2
        self.fds = {}

    def call(self, method, body, raw=None):
        conn = UnixHTTPConnection(self.sock_path)
        data = raw if raw is not None else (b"" if body is None else
                                            json.dumps(body).encode() + b"\n")
        conn.request("POST", "/" + method, body=data,
                     headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, payload

    def call_json(self, method, body):
        status, payload = self.call(method, body)
        return status, json.loads(payload)

    def new_fifo(self):
        # The daemon's way: mkfifo 0700, open it read-write (no block, no EPIPE), then tell the
        # plugin the path.
        path = os.path.join(self.work_dir, "%064x" % random.getrandbits(256))
        os.mkfifo(path, 0o700)
        self.fds[path] = os.open(path, os.O_RDWR)
        return path

    def start(self, container_id, opts, env=None, name="/web"):
        path = self.new_fifo()
        info = {"Config": opts, "ContainerID": container_id, "ContainerName": name,
                "ContainerEntrypoint": "/bin/sh", "ContainerArgs": ["-c", "x"],
                "ContainerImageID": "sha256:" + "ab" * 32, "ContainerImageName": "busybox",
                "ContainerCreated": "2026-11-27T10:00:00.123456789Z",
                "ContainerEnv": env, "ContainerLabels": {"team": "ops"}, "LogPath": "",
                "DaemonName": "docker"}
        status, answer = self.call_json("LogDriver.StartLogging", {"File": path, "Info": info})
        return path, info, status, answer

    def entry(self, line, source="stdout", time_nano=None, partial=None):
        e = self.pb2.LogEntry(source=source, line=line,
                              time_nano=time.time_ns() if time_nano is None else time_nano)
        if partial is not None:
            e.partial = True
            e.partial_log_metadata.id, e.partial_log_metadata.ordinal, \
                e.partial_log_metadata.last = partial
        return e.SerializeToString()

    def log(self, path, *entries):
        for entry in entries:
            # One write per message, as the daemon's Log() does under its lock.
            os.write(self.fds[path], struct.pack(">I", len(entry)) + entry)

    def stop(self, path):
        status, answer = self.call_json("LogDriver.StopLogging", {"File": path})
        # Only after the reply does the daemon close its end and unlink the path.
        os.close(self.fds.pop(path))
        os.unlink(path)
        return status, answer

    def read_logs(self, info, since=None, until=None, tail=-1, follow=False):
        zero = "0001-01-01T00:00:00Z"
        body = {"Info": info, "Config": {"Since": since or zero, "Until": until or zero,
                                         "Tail": tail, "Follow": follow}}
        status, payload = self.call("LogDriver.ReadLogs", body)
        assert status == 200, payload
        return decode_frames(self.pb2, payload)


def decode_frames(pb2, payload):
    out, pos = [], 0
    while pos < len(payload):
        (size,) = struct.unpack_from(">I", payload, pos)
        entry = pb2.LogEntry()
        entry.ParseFromString(payload[pos + 4:pos + 4 + size])
        out.append(entry)
        pos += 4 + size
    return out


def wait_listening(sock_path, timeout_s=TIMEOUT_S):
    """True once a connect to ``sock_path`` succeeds: the socket file exists from bind() on, but
    the plugin listens only after giving it its mode."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock_path)
            return True
        except OSError:
            time.sleep(0.01)
        finally:
            probe.close()
    return False


class PluginThread:
    def __init__(self, sock_path, state_dir, spool=None):
        self.sock_path = sock_path
        self.state_dir = state_dir
        self.loop = None
        self.stop_event = None
        self.plugin = Plugin(state_dir, spool=spool)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert wait_listening(sock_path), "plugin did not start"

    def _run(self):
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            await serve(self.sock_path, self.state_dir, stop=self.stop_event, plugin=self.plugin)

        uvloop.run(main())

    def close(self):
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(TIMEOUT_S)


class Collector:
    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(endpoint)
        self.receiver = core.Receiver()
        self.messages = []

    def wait_for(self, count, timeout_s=TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            self.receiver.recv(self.sock, 4096, 50)
            self.messages.extend(self.receiver.take())
        return self.messages

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def env(entry_pb2):
    work = tempfile.mkdtemp(prefix="zld")
    sock_path = os.path.join(work, "plugins", "zeroline.sock")
    plugin = PluginThread(sock_path, os.path.join(work, "state"))
    endpoint = "ipc://%s/c.ipc" % work
    collector = Collector(endpoint)
    daemon = Daemon(sock_path, work, entry_pb2)
    daemon.endpoint = endpoint
    daemon.plugin = plugin
    daemon.collector = collector
    yield daemon
    for path, fd in list(daemon.fds.items()):
        os.close(fd)
    daemon.plugin.close()       # a test may have restarted it
    collector.close()
    shutil.rmtree(work, ignore_errors=True)


CID = "f" * 12 + "0123456789abcdef" * 3 + "0123"


def opts(endpoint, **extra):
    base = {"zmq-address": endpoint, "zmq-socket": "push", "mode": "blocking",
            "cache-disabled": "false"}
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return base


def test_activate_and_capabilities_answer_as_the_daemon_expects(env):
    status, answer = env.call_json("Plugin.Activate", None)
    assert (status, answer) == (200, {"Implements": ["LogDriver"]})
    status, answer = env.call_json("LogDriver.Capabilities", None)
    assert (status, answer) == (200, {"Cap": {"ReadLogs": True}, "Err": ""})


def test_entries_reach_the_collector_in_seed_framing(env):
    path, _, status, answer = env.start(CID, opts(env.endpoint),
                                        env=["TENANT_ID=acme", "SERVICE_ID=shop", "X=1"])
    assert (status, answer) == (200, {"Err": ""})
    env.log(path, env.entry(b"hello"), env.entry(b"", source="stderr"), env.entry(b"\xff\x00raw"))
    got = env.collector.wait_for(3)
    prefix = CID[:12].encode() + b": "
    assert got == [[b"acme", b"shop", prefix + b"hello"], [b"acme", b"shop", prefix],
                   [b"acme", b"shop", prefix + b"\xff\x00raw"]]
    assert env.stop(path) == (200, {"Err": ""})


def test_msgpack_carries_source_time_and_partial_metadata(env):
    path, _, status, answer = env.start(CID, opts(env.endpoint, zmq_framing="msgpack",
                                                  labels="team"))
    assert answer == {"Err": ""}
    gid = "9" * 11 + "a" * 53
    env.log(path, env.entry(b"a" * 16384, "stderr", 111, (gid, 1, False)),
            env.entry(b"tail", "stderr", 111, (gid, 2, True)), env.entry(b"next", "stdout", 222))
    got = env.collector.wait_for(3)
    records = [msgpack.unpackb(m[2]) for m in got]
    assert [(r["source"], r["time_nano"], r["line"]) for r in records] == [
        ("stderr", 111, b"a" * 16384), ("stderr", 111, b"tail"), ("stdout", 222, b"next")]
    assert records[0]["partial"] == {"id": gid, "ordinal": 1, "last": False}
    assert records[1]["partial"] == {"id": gid, "ordinal": 2, "last": True}
    assert "partial" not in records[2]
    assert records[2]["attrs"] == {"team": "ops"} and records[2]["container_name"] == "/web"
    env.stop(path)


def test_stop_answers_at_once_and_loses_nothing_still_in_the_pipe(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    entries = [env.entry(b"line-%04d" % i) for i in range(2000)]
    env.log(path, *entries)
    assert env.stop(path) == (200, {"Err": ""})
    got = env.collector.wait_for(2000)
    assert [m[2] for m in got] == [CID[:12].encode() + b": line-%04d" % i for i in range(2000)]


def test_read_logs_after_stop_shows_every_line_as_the_local_driver_does(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    gid = "c" * 64
    env.log(path, env.entry(b"one", time_nano=1_000), env.entry(b"x" * 10, "stderr", 2_000,
                                                                 (gid, 1, False)),
            env.entry(b"y", "stderr", 2_000, (gid, 2, True)), env.entry(b"four", time_nano=4_000))
    env.stop(path)
    # Right after the stop: the plugin may still drain the FIFO; ReadLogs waits for it.
    entries = env.read_logs(info)
    assert [(e.source, e.time_nano, e.line) for e in entries] == [
        ("stdout", 1000, b"one\n"), ("stderr", 2000, b"x" * 10), ("stderr", 2000, b"y\n"),
        ("stdout", 4000, b"four\n")]
    assert [e.line for e in env.read_logs(info, tail=2)] == [b"y\n", b"four\n"]
    assert env.read_logs(info, tail=0) == []
    assert [e.line for e in env.read_logs(info, since="1970-01-01T00:00:00.000002Z",
                                          until="1970-01-01T00:00:00.000003Z")] == [
        b"x" * 10, b"y\n"]


def test_read_logs_follow_streams_new_lines_until_the_container_stops(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"before"))
    env.collector.wait_for(1)
    conn = UnixHTTPConnection(env.sock_path)
    body = {"Info": info, "Config": {"Since": "0001-01-01T00:00:00Z",
                                     "Until": "0001-01-01T00:00:00Z", "Tail": -1,
                                     "Follow": True}}
    conn.request("POST", "/LogDriver.ReadLogs", body=json.dumps(body).encode())
    resp = conn.getresponse()
    assert resp.status == 200
    env.log(path, env.entry(b"after"))
    env.stop(path)
    payload = resp.read()           # ends when the plugin closes the stream after the stop
    conn.close()
    assert [e.line for e in decode_frames(env.pb2, payload)] == [b"before\n", b"after\n"]


def test_client_that_disconnects_during_follow_leaves_the_plugin_serving(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"a"))
    env.collector.wait_for(1)
    conn = UnixHTTPConnection(env.sock_path)
    body = {"Info": info, "Config": {"Tail": -1, "Follow": True}}
    conn.request("POST", "/LogDriver.ReadLogs", body=json.dumps(body).encode())
    resp = conn.getresponse()
    resp.read(4)
    conn.close()                    # docker logs -f interrupted
    env.log(path, env.entry(b"b"))
    assert [m[2] for m in env.collector.wait_for(2)][-1].endswith(b": b")
    assert env.call_json("LogDriver.Capabilities", None)[0] == 200
    env.stop(path)


def test_unknown_option_fails_the_start_with_a_clear_err(env):
    path, _, status, answer = env.start(CID, opts(env.endpoint, zmq_adress="x"))
    assert status == 200
    assert "unknown log opt 'zmq-adress' for zmq log driver" in answer["Err"]
    # The daemon never removes the FIFO of a failed StartLogging; the plugin does.
    assert not os.path.exists(path)


def test_a_start_refused_by_the_request_checks_removes_its_fifo_too(env):
    path = env.new_fifo()
    status, answer = env.call_json("LogDriver.StartLogging",
                                   {"File": path, "Info": {"ContainerID": 7}})
    assert status == 200 and "ContainerID must be a string" in answer["Err"]
    assert not os.path.exists(path)
    regular = os.path.join(env.work_dir, "not-a-fifo")
    open(regular, "wb").close()
    status, answer = env.call_json("LogDriver.StartLogging",
                                   {"File": regular, "Info": {"ContainerID": CID,
                                                              "Config": opts(env.endpoint)}})
    assert "is not a FIFO" in answer["Err"]
    assert os.path.exists(regular)      # only FIFOs are removed


def test_daemon_keys_are_accepted(env):
    path, _, _, answer = env.start(CID, opts(env.endpoint, mode="non-blocking",
                                             max_buffer_size="4m", cache_max_file="3",
                                             cache_max_size="1m", cache_compress="true"))
    assert answer == {"Err": ""}
    env.stop(path)


def test_missing_fifo_is_a_clear_err(env):
    status, answer = env.call_json("LogDriver.StartLogging",
                                   {"File": os.path.join(env.work_dir, "nope"),
                                    "Info": {"ContainerID": CID,
                                             "Config": opts(env.endpoint)}})
    assert status == 200 and "cannot open the log FIFO" in answer["Err"]


def test_stop_for_an_unknown_file_is_a_clear_err(env):
    status, answer = env.call_json("LogDriver.StopLogging", {"File": "/run/docker/logging/x"})
    assert status == 200 and "no logging instance" in answer["Err"]


def test_second_start_for_the_same_file_is_refused(env):
    path, info, _, answer = env.start(CID, opts(env.endpoint))
    assert answer == {"Err": ""}
    status, again = env.call_json("LogDriver.StartLogging", {"File": path, "Info": info})
    assert status == 200 and "already logging" in again["Err"]
    env.stop(path)


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]"])
def test_body_that_cannot_be_parsed_is_400(env, raw):
    status, payload = env.call("LogDriver.StartLogging", None, raw=raw)
    assert status == 400 and json.loads(payload)["Err"]


def test_unknown_fields_are_skipped(env):
    path, _, _, _ = env.start(CID, opts(env.endpoint))
    entry = env.entry(b"known") + b"\x78\x05" + b"\x82\x01\x03abc"   # fields 15 and 16
    env.log(path, entry)
    assert [m[2] for m in env.collector.wait_for(1)] == [CID[:12].encode() + b": known"]
    env.stop(path)


def test_bad_input_hurts_only_its_own_container(env):
    good, _, _, _ = env.start(CID, opts(env.endpoint))
    other = "e" * 64
    bad, _, _, _ = env.start(other, opts(env.endpoint))
    env.log(bad, env.entry(b"kept-before-garbage"))
    os.write(env.fds[bad], b"\x00\x00\x00\x05\xff\xff\xff\xff\xff")   # malformed entry
    env.log(bad, env.entry(b"kept-after-malformed"))
    os.write(env.fds[bad], struct.pack(">I", 2 * 1024 * 1024) + os.urandom(64))   # over 1 MiB
    env.log(bad, env.entry(b"lost-after-oversized"))
    env.log(good, env.entry(b"good"))
    env.stop(bad)
    env.stop(good)
    got = sorted(m[2] for m in env.collector.wait_for(3))
    assert got == [b"eeeeeeeeeeee: kept-after-malformed", b"eeeeeeeeeeee: kept-before-garbage",
                   CID[:12].encode() + b": good"]
    assert env.call_json("LogDriver.Capabilities", None)[0] == 200


def test_fifo_closed_mid_frame_keeps_what_was_complete(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    entry = env.entry(b"complete")
    os.write(env.fds[path], struct.pack(">I", len(entry)) + entry + b"\x00\x00\x01\x00abc")
    env.stop(path)
    assert [m[2] for m in env.collector.wait_for(1)] == [CID[:12].encode() + b": complete"]
    assert [e.line for e in env.read_logs(info)] == [b"complete\n"]


def test_random_garbage_never_stops_the_plugin(env):
    rng = random.Random(7)
    for _ in range(5):
        path, _, _, _ = env.start("%064x" % rng.getrandbits(256), opts(env.endpoint))
        os.write(env.fds[path], bytes(rng.getrandbits(8) for _ in range(4096)))
        env.stop(path)
    path, _, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"still-here"))
    assert [m[2] for m in env.collector.wait_for(1)][-1] == CID[:12].encode() + b": still-here"
    env.stop(path)


def test_zeroline_plugin_command_serves_and_stops_on_sigterm():
    import signal
    import subprocess

    work = tempfile.mkdtemp(prefix="zlc")
    sock_path = os.path.join(work, "zeroline.sock")
    state = os.path.join(work, "state")
    proc = subprocess.Popen([sys.executable, "-m", "zeroline", "plugin", "--socket", sock_path,
                             "--state-dir", state], stderr=subprocess.PIPE)
    try:
        assert wait_listening(sock_path)
        daemon = Daemon(sock_path, work, None)
        assert daemon.call_json("LogDriver.Capabilities", None) == (
            200, {"Cap": {"ReadLogs": True}, "Err": ""})
        assert stat_mode(state) == 0o700
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


def test_local_copy_rotates_compresses_and_still_serves_read_logs(env):
    path, info, _, answer = env.start(CID, opts(env.endpoint, cache_max_size="1k",
                                                cache_max_file="3", cache_compress="true"))
    assert answer == {"Err": ""}
    lines = [b"entry-%03d-" % i + b"p" * 40 for i in range(200)]
    for i, line in enumerate(lines):
        env.log(path, env.entry(line, time_nano=1_000 + i))
    env.stop(path)
    env.collector.wait_for(200)
    directory = os.path.join(env.plugin.state_dir, CID, "local-logs")
    got = [e.line for e in env.read_logs(info)]
    # Compression runs on a worker thread: wait (bounded) for the last .1 to become .1.gz.
    deadline = time.monotonic() + TIMEOUT_S
    while "container.log.1" in os.listdir(directory) and time.monotonic() < deadline:
        time.sleep(0.01)
    names = sorted(os.listdir(directory))
    assert names == ["container.log", "container.log.1.gz", "container.log.2.gz"]
    # What is left is the newest part of the log, complete, in order.
    assert got and got == [line + b"\n" for line in lines[-len(got):]]
    assert len(got) < 200


def test_old_copies_are_cleaned_up_but_active_ones_kept(env):
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"x"))
    env.collector.wait_for(1)
    old = os.path.join(env.plugin.state_dir, "a" * 64, "local-logs")
    os.makedirs(old)
    with open(os.path.join(old, "container.log"), "wb") as f:
        f.write(b"")
    removed = env.plugin.plugin.clean_old_copies(now=time.time() + 30 * 86400)
    assert removed == 1
    assert not os.path.exists(old)
    assert os.path.exists(os.path.join(env.plugin.state_dir, CID, "local-logs", "container.log"))
    env.stop(path)


def in_plugin_loop(env, fn):
    """Run fn() on the plugin's event loop thread; its result."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), env.plugin.loop).result(TIMEOUT_S)


def test_unused_sinks_close_and_their_empty_spools_go_but_a_spool_with_batches_stays(env):
    from zeroline.transport.spool import Spool

    spools = os.path.join(env.plugin.state_dir, "spool")
    kept, empty = os.path.join(spools, "k" * 32), os.path.join(spools, "e" * 32)
    with Spool(kept) as spool:                  # left by an earlier process, with one batch
        spool.append(b"s", 1, b"t", b"s", b"\x00\x00\x00\x01x", 1)
    with Spool(empty):
        pass
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"x"))
    assert len(env.collector.wait_for(1)) == 1
    (own,) = set(os.listdir(spools)) - {"k" * 32, "e" * 32}
    assert in_plugin_loop(env, env.plugin.plugin.close_idle_sinks) == 0    # still logging
    env.stop(path)
    for _ in range(TIMEOUT_S * 10):             # the instance is gone once its FIFO drained
        if not env.plugin.plugin.instances:
            break
        time.sleep(0.1)
    assert in_plugin_loop(env, env.plugin.plugin.close_idle_sinks) == 1
    assert in_plugin_loop(env, env.plugin.plugin.clean_spools) == 2
    assert os.listdir(spools) == ["k" * 32]
    assert not os.path.exists(os.path.join(spools, own))


def test_cache_disabled_means_no_copy_and_empty_read_logs(env):
    path, info, _, answer = env.start(CID, opts(env.endpoint, cache_disabled="true"))
    assert answer == {"Err": ""}
    env.log(path, env.entry(b"only-forwarded"))
    env.stop(path)
    env.collector.wait_for(1)
    assert env.read_logs(info) == []
    assert not os.path.exists(os.path.join(env.plugin.state_dir, CID))


def test_non_blocking_container_never_waits_for_a_missing_collector(env):
    # Without a spool (ZEROLINE_SPOOL=off): Docker's ring, drops counted.
    env.plugin.close()
    env.plugin = PluginThread(env.sock_path, env.plugin.state_dir, spool=False)
    nobody = "ipc://%s/nobody.ipc" % env.work_dir
    path, info, _, answer = env.start(CID, opts(nobody, mode="non-blocking",
                                                max_buffer_size="1k"))
    assert answer == {"Err": ""}
    n = 20000     # 20000 x ~120 bytes: far more than the 1 MiB pipe the plugin asks for
    writer = threading.Thread(target=env.log, args=[path] + [env.entry(b"z" * 100)
                                                             for _ in range(n)])
    writer.start()
    writer.join(TIMEOUT_S)
    assert not writer.is_alive(), "the container was blocked in non-blocking mode"
    instance = env.plugin.plugin.instances[path]
    deadline = time.monotonic() + TIMEOUT_S
    while instance.stream.entries_total < n and time.monotonic() < deadline:
        time.sleep(0.01)
    st = instance.stream.stats()
    # A push socket queues up to zmq-hwm (1000) messages for the collector to come; behind that,
    # Docker's ring: 10 lines of 100 bytes fit in 1 KiB, every later one is dropped and counted.
    assert st["sent_total"] + st["pending_messages"] + st["dropped_total"] == n
    assert st["pending_messages"] <= 10 and st["sent_total"] <= 1000
    assert st["dropped_total"] >= n - 1010
    # Every entry still went to the local copy, so docker logs shows them all.
    env.stop(path)
    assert len(env.read_logs(info)) == n


# -- a restarted plugin reattaches to the FIFOs of running containers ---------------------------

def records_dir(env):
    return os.path.join(env.plugin.state_dir, "instances")


def test_a_restarted_plugin_reads_on_where_the_pipe_is_and_loses_nothing(env):
    path, info, _, answer = env.start(CID, opts(env.endpoint))
    assert answer == {"Err": ""}
    assert len(os.listdir(records_dir(env))) == 1
    env.log(path, *[env.entry(b"before-%04d" % i) for i in range(500)])
    env.collector.wait_for(500)
    env.plugin.close()
    # No plugin runs: the pipe holds what the container writes (here less than its capacity).
    env.log(path, *[env.entry(b"between-%04d" % i) for i in range(300)])
    env.plugin = PluginThread(env.sock_path, env.plugin.state_dir)
    env.log(path, *[env.entry(b"after-%04d" % i) for i in range(200)])
    env.stop(path)
    expected = ([b"before-%04d" % i for i in range(500)] + [b"between-%04d" % i for i in range(300)]
                + [b"after-%04d" % i for i in range(200)])
    got = env.collector.wait_for(1000)
    assert [m[2] for m in got] == [CID[:12].encode() + b": " + line for line in expected]
    # The local copy went on in the same file: docker logs shows all of it.
    assert [e.line for e in env.read_logs(info)] == [line + b"\n" for line in expected]
    deadline = time.monotonic() + TIMEOUT_S     # the record goes once the FIFO ended
    while os.listdir(records_dir(env)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(records_dir(env)) == []


def test_an_entry_half_read_at_shutdown_is_completed_before_the_plugin_leaves(env, monkeypatch):
    monkeypatch.setattr(docker_plugin, "DETACH_WAIT_S", TIMEOUT_S)
    path, info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"first"))
    frame = env.entry(b"split-" + b"s" * 3000)
    frame = struct.pack(">I", len(frame)) + frame
    os.write(env.fds[path], frame[:1000])        # the daemon's write(), cut by a full pipe
    instance = env.plugin.plugin.instances[path]
    deadline = time.monotonic() + TIMEOUT_S
    while instance.stream.held_bytes != 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert instance.stream.held_bytes == 1000
    stopping = env.plugin.stop_event

    def rest_of_the_write():
        limit = time.monotonic() + TIMEOUT_S
        while not stopping.is_set() and time.monotonic() < limit:
            time.sleep(0.01)
        os.write(env.fds[path], frame[1000:])
        env.log(path, env.entry(b"for-the-next-process"))

    writer = threading.Thread(target=rest_of_the_write)
    writer.start()
    env.plugin.close()
    writer.join(TIMEOUT_S)
    with open(os.path.join(records_dir(env), os.listdir(records_dir(env))[0])) as f:
        assert json.load(f)["Clean"] is True
    # Taken before the next process sends: the collector's PULL interleaves two connections.
    env.collector.wait_for(2)
    env.plugin = PluginThread(env.sock_path, env.plugin.state_dir)
    env.stop(path)
    got = [m[2] for m in env.collector.wait_for(3)]
    prefix = CID[:12].encode() + b": "
    assert got == [prefix + b"first", prefix + b"split-" + b"s" * 3000,
                   prefix + b"for-the-next-process"]
    assert [e.line for e in env.read_logs(info)] == [b"first\n", b"split-" + b"s" * 3000 + b"\n",
                                                     b"for-the-next-process\n"]


def test_after_a_kill_the_next_plugin_skips_the_half_entry_and_reads_on(env):
    # A killed plugin cannot complete the entry it half read: its record says so (Clean false)
    # and the pipe starts inside that entry. The next process skips to the next entry boundary.
    path, _info, _, _ = env.start(CID, opts(env.endpoint))
    env.log(path, env.entry(b"old"))
    env.collector.wait_for(1)
    env.plugin.close()
    (name,) = os.listdir(records_dir(env))
    record_path = os.path.join(records_dir(env), name)
    with open(record_path) as f:
        record = json.load(f)
    record["Clean"] = False
    with open(record_path, "w") as f:
        json.dump(record, f)
    lost = env.entry(b"half-read-by-the-dead-process")
    lost = struct.pack(">I", len(lost)) + lost
    os.write(env.fds[path], lost[11:])
    env.log(path, *[env.entry(b"next-%d" % i) for i in range(50)])
    env.plugin = PluginThread(env.sock_path, env.plugin.state_dir)
    env.stop(path)
    got = [m[2] for m in env.collector.wait_for(51)]
    assert got == [CID[:12].encode() + b": " + line
                   for line in [b"old"] + [b"next-%d" % i for i in range(50)]]


def test_a_record_whose_fifo_is_gone_is_dropped_at_start(env):
    path, _info, _, _ = env.start(CID, opts(env.endpoint))
    env.plugin.close()
    # The daemon gave up on the stopped plugin: closed its end and removed the FIFO.
    os.close(env.fds.pop(path))
    os.unlink(path)
    env.plugin = PluginThread(env.sock_path, env.plugin.state_dir)
    assert env.plugin.plugin.instances == {}
    assert os.listdir(records_dir(env)) == []


def frames(pb2_entry, lines):
    out = b""
    for line in lines:
        entry = pb2_entry(line)
        out += struct.pack(">I", len(entry)) + entry
    return out


def test_entry_boundary_finds_the_next_frame_wherever_the_pipe_was_cut(entry_pb2):
    rng = random.Random(3)

    def entry(line):
        return entry_pb2.LogEntry(source=rng.choice(["stdout", "stderr"]), line=line,
                                  time_nano=rng.getrandbits(62)).SerializeToString()

    lines = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))) for _ in range(40)]
    data = frames(entry, lines)
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        pos += 4 + struct.unpack_from(">I", data, pos)[0]
    assert entry_boundary(data) == 0
    for cut in rng.sample(range(1, len(data)), 300):
        following = [s for s in starts if s >= cut]
        expected = following[0] - cut if following else len(data) - cut
        assert entry_boundary(data[cut:]) == expected, cut


def test_local_copy_batches_rotate_as_record_by_record_writes_would(tmp_path):
    rng = random.Random(5)
    records = []
    for _ in range(400):
        entry = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 90)))
        records.append(struct.pack(">I", len(entry)) + entry + struct.pack(">I", len(entry)))
    log = LocalLog(str(tmp_path / "batched"), max_size=1000, max_file=100, compress=False)
    pos = 0
    while pos < len(records):
        n = rng.randrange(1, 30)
        log.write(b"".join(records[pos:pos + n]))
        pos += n
    log.close()
    # The model: the size is checked before each record (Docker's rotation).
    files, current = [], b""
    for record in records:
        if len(current) >= 1000:
            files.append(current)
            current = b""
        current += record
    files.append(current)
    directory = tmp_path / "batched"
    got = [(directory / ("container.log.%d" % i)).read_bytes() for i in range(len(files) - 1, 0, -1)]
    got.append((directory / "container.log").read_bytes())
    assert got == files


def test_with_the_default_spool_a_blocking_container_never_waits_for_a_missing_collector(env):
    later = "ipc://%s/later.ipc" % env.work_dir
    path, info, _, answer = env.start(CID, opts(later))
    assert answer == {"Err": ""}
    n = 20000       # 20000 x ~25 bytes: far more than a pipe, a read and zmq-hwm hold
    writer = threading.Thread(target=env.log, args=[path] + [env.entry(b"w-%05d" % i)
                                                             for i in range(n)])
    writer.start()
    writer.join(TIMEOUT_S)
    assert not writer.is_alive(), "the container was blocked although the plugin has a spool"
    env.stop(path)
    spools = os.listdir(os.path.join(env.plugin.state_dir, "spool"))
    assert len(spools) == 1
    # The collector comes: every line, in order, from the spool.
    collector = Collector(later)
    try:
        got = collector.wait_for(n)
        assert [m[2] for m in got] == [CID[:12].encode() + b": w-%05d" % i for i in range(n)]
    finally:
        collector.close()
