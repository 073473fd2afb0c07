"""The Docker plugin on a real Docker engine (issue 9): `zeroline plugin` as a legacy socket plugin,
`zeroline collect` as the receiving end, containers from the locally imported zl-busybox image.

Needs the engine scripts/docker-engine.sh sets up (the ``docker_engine`` fixture in conftest.py):
skipped where none can be started, a failure with CI=true. Every wait is bounded; nothing here
asserts on elapsed time.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

pytestmark = pytest.mark.docker_engine

PLUGIN_DIR = "/run/docker/plugins"
WAIT_S = 90                 # bound on every wait for the engine, the plugin or the collector
DOCKER_TIMEOUT_S = 180      # bound on one docker CLI call


def docker(*args, check=True, timeout=DOCKER_TIMEOUT_S, **kw):
    """Runs the docker CLI; returns the CompletedProcess (stdout/stderr as bytes)."""
    done = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, check=False,
                          **kw)
    if check and done.returncode != 0:
        raise AssertionError("docker %s failed (%d): %s" % (
            " ".join(args), done.returncode, done.stderr.decode("utf-8", "replace")))
    return done


def stop_process(proc, timeout=30):
    """SIGTERM, a bounded wait, then SIGKILL: never leaves the child behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_until(predicate, what, timeout=WAIT_S):
    """Polls predicate until it returns a true value (returned) or the bound passes (fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("gave up after %d s waiting for %s" % (timeout, what))
        time.sleep(0.1)


def zeroline_cmd(*args):
    return [sys.executable, "-m", "zeroline"] + list(args)


@pytest.fixture(scope="module")
def image(docker_engine):
    return docker_engine


@pytest.fixture(scope="module")
def plugin(image):
    """A `zeroline plugin` serving a legacy plugin socket; yields the log driver's name."""
    name = "zeroline-test-%s" % uuid.uuid4().hex[:10]
    socket_path = os.path.join(PLUGIN_DIR, name + ".sock")
    os.makedirs(PLUGIN_DIR, exist_ok=True)
    state = tempfile.mkdtemp(prefix="zl-engine-state-")
    log_path = os.path.join(state, "plugin.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(zeroline_cmd("plugin", "--socket", socket_path,
                                             "--state-dir", os.path.join(state, "copies")),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: os.path.exists(socket_path) or proc.poll() is not None,
                   "the plugin socket %s" % socket_path)
        if proc.poll() is not None:
            with open(log_path, "rb") as log:
                pytest.fail("zeroline plugin exited: %r" % log.read())
        yield name
    finally:
        stop_process(proc)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        shutil.rmtree(state, ignore_errors=True)


class Collector:
    """A `zeroline collect --format json` subprocess bound on ipc:// in a temp dir (``directory``:
    a given one, e.g. where forwarders already wait for a collector)."""

    def __init__(self, directory=None, address=None):
        self.dir = directory or tempfile.mkdtemp(prefix="zlc", dir="/tmp")
        self.address = address or "ipc://%s/c.ipc" % self.dir
        self.out = os.path.join(self.dir, "out")
        with open(os.path.join(self.dir, "collect.log"), "wb") as log:
            self.proc = subprocess.Popen(zeroline_cmd("collect", "--bind", self.address,
                                                      "--out", self.out, "--format", "json"),
                                         stdout=log, stderr=subprocess.STDOUT)
        if self.address.startswith("ipc://"):
            wait_until(lambda: os.path.exists(self.address[len("ipc://"):]) or
                       self.proc.poll() is not None, "the collector's socket")
        else:
            wait_until(lambda: _accepts(self.address) or self.proc.poll() is not None,
                       "the collector's port")
        assert self.proc.poll() is None, "zeroline collect exited"

    def records(self, tenant, service):
        path = os.path.join(self.out, tenant, service + ".log")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            data = f.read()
        # Only whole lines: the collector may be writing the next one.
        return [json.loads(line) for line in data.split(b"\n")[:-1]]

    def tail(self, tenant, service, size=1 << 16):
        """The records in the file's last ``size`` bytes (cheap on big files)."""
        path = os.path.join(self.out, tenant, service + ".log")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            lines = f.read().split(b"\n")[1:-1]
        return [json.loads(line) for line in lines]

    def wait_records(self, tenant, service, predicate, what):
        return wait_until(lambda: predicate(self.records(tenant, service)) and
                          self.records(tenant, service), what)

    def close(self):
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _accepts(address):
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def collector(image):
    c = Collector()
    try:
        yield c
    finally:
        c.close()


class Containers:
    """Starts containers with unique names; removes every one of them at teardown."""

    def __init__(self, image):
        self.image = image
        self.names = []

    def name(self):
        name = "zl-engine-%s" % uuid.uuid4().hex[:12]
        self.names.append(name)
        return name

    def run(self, script, *, driver=None, address=None, opts=(), env=(), detach=False,
            check=True, name=None):
        """`docker run` (attached unless detach) of `sh -c script`; returns (name, result)."""
        name = name or self.name()
        args = ["run", "--name", name]
        if detach:
            args.append("-d")
        if driver is not None:
            args += ["--log-driver", driver]
        if address is not None:
            args += ["--log-opt", "zmq-address=" + address, "--log-opt", "zmq-socket=push"]
        for opt in opts:
            args += ["--log-opt", opt]
        for item in env:
            args += ["-e", item]
        args += [self.image, "sh", "-c", script]
        return name, docker(*args, check=check)

    def wait(self, name):
        return int(docker("wait", name).stdout)

    def remove_all(self):
        for name in self.names:
            docker("rm", "-f", name, check=False)


@pytest.fixture
def containers(image):
    c = Containers(image)
    try:
        yield c
    finally:
        c.remove_all()


def by_group(records):
    groups = {}
    for r in records:
        if "partial" in r:
            groups.setdefault(r["partial"]["id"], []).append(r)
    return groups


# -- what reaches the collector ------------------------------------------------------------------

def test_frames_carry_tenant_and_service_from_the_container_env(plugin, collector, containers):
    name, _ = containers.run("echo hello; echo oops >&2", driver=plugin, address=collector.address,
                             opts=["zmq-framing=msgpack"],
                             env=["TENANT_ID=acme", "SERVICE_ID=shop"])
    full_id = docker("inspect", "-f", "{{.Id}}", name).stdout.decode().strip()
    records = collector.wait_records("acme", "shop", lambda rs: len(rs) >= 2, "2 lines")
    assert sorted((r["source"], r["line"]) for r in records) == [("stderr", "oops"),
                                                                  ("stdout", "hello")]
    for r in records:
        assert (r["tenant"], r["service"]) == ("acme", "shop")
        assert r["container_id"] == full_id[:12]
        assert r["container_name"] == "/" + name
        assert "partial" not in r


def test_a_long_line_arrives_as_16k_chunks_of_one_group(plugin, collector, containers):
    containers.run("head -c 40000 /dev/zero | tr '\\0' a; echo; echo next", driver=plugin,
                   address=collector.address, opts=["zmq-framing=msgpack"],
                   env=["SERVICE_ID=long"])
    records = collector.wait_records("default", "long", lambda rs: len(rs) >= 4, "4 messages")
    chunks = [r for r in records if "partial" in r]
    assert [len(r["line"]) for r in chunks] == [16384, 16384, 40000 - 2 * 16384]
    assert [(r["partial"]["ordinal"], r["partial"]["last"]) for r in chunks] == [
        (1, False), (2, False), (3, True)]
    assert len({r["partial"]["id"] for r in chunks}) == 1
    assert len({r["time_nano"] for r in chunks}) == 1          # the group's shared timestamp
    assert [r["line"] for r in records if "partial" not in r] == ["next"]


def test_an_unterminated_last_line_arrives_with_its_group_closed(plugin, collector, containers):
    # Docker sends "abc" with last=false and never closes the group (issue 9 item 5); the
    # plugin closes it at FIFO EOF, so a reassembling consumer need not wait.
    containers.run("echo first; printf abc", driver=plugin, address=collector.address,
                   opts=["zmq-framing=msgpack"], env=["SERVICE_ID=tail"])

    def closed(records):
        groups = by_group(records).values()
        return groups and all(g[-1]["partial"]["last"] for g in groups)

    records = collector.wait_records("default", "tail", closed, "the group of 'abc' closed")
    (group,) = by_group(records).values()
    assert "".join(r["line"] for r in group) == "abc"
    assert [r["partial"]["ordinal"] for r in group] == list(range(1, len(group) + 1))
    assert [r["partial"]["last"] for r in group] == [False] * (len(group) - 1) + [True]
    assert [r["line"] for r in records if "partial" not in r] == ["first"]


def test_many_lines_from_concurrent_containers_all_arrive_in_order(plugin, collector, containers):
    lines, count = 20000, 3
    names = []
    for i in range(count):
        name, _ = containers.run("seq 1 %d; seq 1 %d >&2" % (lines, lines), driver=plugin,
                                 address=collector.address, opts=["zmq-framing=msgpack"],
                                 env=["SERVICE_ID=bulk%d" % i], detach=True)
        names.append(name)
    for name in names:
        assert containers.wait(name) == 0
    expected = [str(n) for n in range(1, lines + 1)]
    for i in range(count):
        records = collector.wait_records("default", "bulk%d" % i,
                                         lambda rs: len(rs) >= 2 * lines,
                                         "%d lines of bulk%d" % (2 * lines, i))
        assert len(records) == 2 * lines
        for source in ("stdout", "stderr"):
            assert [r["line"] for r in records if r["source"] == source] == expected, source


# -- docker logs through ReadLogs, against json-file ---------------------------------------------

MIXED = (r"echo plain; printf 'tab\there\r\n'; echo; echo '<&>\"quote\" \\back'; "
         r"echo to-stderr >&2; head -c 20000 /dev/zero | tr '\0' b; echo; "
         r"printf 'caf\303\251 \342\202\254\n'; printf unterminated")


def test_docker_logs_right_after_exit_is_byte_identical_to_json_file(plugin, containers,
                                                                       collector):
    pairs = []
    for driver in ("json-file", plugin):
        kw = {} if driver == "json-file" else {"address": collector.address}
        name, _ = containers.run(MIXED, driver=driver, **kw)
        logs = docker("logs", name)             # at once: the container has just exited
        pairs.append((logs.stdout, logs.stderr))
    (json_out, json_err), (zl_out, zl_err) = pairs
    assert zl_out == json_out
    assert zl_err == json_err
    assert json_out.endswith(b"unterminated")       # no \n added to an unterminated line
    assert b"b" * 20000 + b"\n" in zl_out


def test_invalid_utf8_is_kept_by_the_plugin_where_json_file_replaces_it(plugin, containers,
                                                                        collector):
    name, _ = containers.run(r"printf 'bad \377\376 end\n'", driver=plugin,
                             address=collector.address)
    assert docker("logs", name).stdout == b"bad \xff\xfe end\n"


def timestamped(output):
    """`docker logs --timestamps` output as [(timestamp, line)]."""
    rows = []
    for raw in output.split(b"\n")[:-1]:
        stamp, _, text = raw.partition(b" ")
        assert re.match(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$", stamp), raw
        rows.append((stamp.decode(), text))
    return rows


def test_tail_timestamps_since_and_until_select_as_json_file_does(plugin, containers, collector):
    script = "i=1; while [ $i -le 6 ]; do echo line$i; i=$((i+1)); sleep 0.2; done"
    names = {}
    for driver in ("json-file", plugin):
        kw = {} if driver == "json-file" else {"address": collector.address}
        names[driver], _ = containers.run(script, driver=driver, **kw)
    expected = [b"line%d" % i for i in range(1, 7)]
    for driver, name in names.items():
        assert docker("logs", "--tail", "2", name).stdout == b"line5\nline6\n", driver
        assert docker("logs", "--tail", "0", name).stdout == b"", driver
        assert docker("logs", "--tail", "all", name).stdout.split(b"\n")[:-1] == expected
        rows = timestamped(docker("logs", "--timestamps", name).stdout)
        assert [text for _, text in rows] == expected, driver
        stamps = [stamp for stamp, _ in rows]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        since = docker("logs", "--since", stamps[2], name).stdout
        assert since.split(b"\n")[:-1] == expected[2:], driver
        until = docker("logs", "--until", stamps[1], name).stdout
        assert until.split(b"\n")[:-1] == expected[:2], driver
        both = docker("logs", "--since", stamps[1], "--until", stamps[3], name).stdout
        assert both.split(b"\n")[:-1] == expected[1:4], driver
        with_tail = timestamped(docker("logs", "--timestamps", "--tail", "1", name).stdout)
        assert with_tail == rows[-1:], driver


def read_line(proc, timeout=WAIT_S):
    """One line from a Popen's stdout, waiting at most timeout (fails otherwise)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail("no output from docker logs -f within %d s" % timeout)
    return proc.stdout.readline()


def test_follow_streams_a_running_container_and_ends_with_it(plugin, containers, collector):
    # The container writes a line, then waits (bounded) for a file that the test creates once
    # `docker logs -f` has shown that line: what follows can only come through following.
    script = ("echo before; n=0; while [ ! -e /tmp/go ] && [ $n -lt 900 ]; do sleep 0.1; "
              "n=$((n+1)); done; i=1; while [ $i -le 50 ]; do echo after$i; i=$((i+1)); done")
    name, _ = containers.run(script, driver=plugin, address=collector.address, detach=True)
    follow = subprocess.Popen(["docker", "logs", "-f", name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert read_line(follow) == b"before\n"
        docker("exec", name, "touch", "/tmp/go")
        rest, _ = follow.communicate(timeout=WAIT_S)
        assert rest == b"".join(b"after%d\n" % i for i in range(1, 51))
        assert follow.returncode == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert containers.wait(name) == 0


# -- options checked at docker run ---------------------------------------------------------------

@pytest.mark.parametrize("opt, message", [
    ("bogus-key=1", "unknown log opt 'bogus-key' for zmq log driver"),
    ("zmq-socket=carrier-pigeon", "zmq-socket"),
    ("zmq-address=http://example", "zmq-address"),
    ("zmq-hwm=lots", "zmq-hwm"),
])
def test_bad_options_fail_docker_run_with_the_plugins_message(plugin, containers, collector,
                                                              opt, message):
    _, run = containers.run("echo never", driver=plugin, address=collector.address,
                            opts=[opt], check=False)
    assert run.returncode != 0
    assert message in run.stderr.decode("utf-8", "replace")
    assert run.stdout == b""


def test_a_missing_address_fails_docker_run(plugin, containers):
    _, run = containers.run("echo never", driver=plugin, check=False)
    assert run.returncode != 0
    assert "zmq-address" in run.stderr.decode("utf-8", "replace")


def test_docker_stop_loses_nothing_between_the_local_copy_and_the_collector(plugin, collector,
                                                                          containers):
    # A writer that is still writing when stopped: every line docker logs shows (the plugin's
    # local copy) must also reach the collector, in order, once the FIFO is read to its end.
    script = "i=0; while [ $i -lt 1000000 ]; do echo n$i; i=$((i+1)); usleep 200; done"
    name, _ = containers.run(script, driver=plugin, address=collector.address,
                             opts=["zmq-framing=msgpack"], env=["SERVICE_ID=stopped"],
                             detach=True)
    collector.wait_records("default", "stopped", lambda rs: len(rs) >= 500, "500 lines")
    docker("stop", "-t", "1", name)
    shown = docker("logs", name).stdout.split(b"\n")[:-1]
    assert len(shown) >= 500
    assert shown == [b"n%d" % i for i in range(len(shown))]
    records = collector.wait_records("default", "stopped", lambda rs: len(rs) >= len(shown),
                                     "%d lines" % len(shown))
    assert [r["line"].encode() for r in records] == shown


# -- the plugin restarted under running containers (issue 9, item 1) ---------------------------

class PluginProcess:
    """A `zeroline plugin` subprocess on a legacy socket; restartable on the same state dir."""

    def __init__(self, env=None):
        self.env = dict(os.environ, **(env or {}))
        self.name = "zeroline-test-%s" % uuid.uuid4().hex[:10]
        self.socket_path = os.path.join(PLUGIN_DIR, self.name + ".sock")
        self.dir = tempfile.mkdtemp(prefix="zl-engine-restart-")
        self.state = os.path.join(self.dir, "state")
        self.proc = None
        self.runs = 0
        os.makedirs(PLUGIN_DIR, exist_ok=True)

    def start(self):
        self.runs += 1
        log_path = os.path.join(self.dir, "plugin-%d.log" % self.runs)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(zeroline_cmd("plugin", "--socket", self.socket_path,
                                                      "--state-dir", self.state),
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_until(lambda: self.log().count(b"plugin listening on") >= self.runs or
                   self.proc.poll() is not None, "the plugin to listen")
        assert self.proc.poll() is None, self.log()

    def log(self):
        out = b""
        for run in range(1, self.runs + 1):
            path = os.path.join(self.dir, "plugin-%d.log" % run)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out += f.read()
        return out

    def signal(self, signum):
        self.proc.send_signal(signum)
        self.proc.wait(WAIT_S)

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def restartable(image):
    p = PluginProcess()
    try:
        p.start()
        yield p
    finally:
        p.close()


def numbered(records, prefix):
    return [int(r["line"][len(prefix):]) for r in records if r["line"].startswith(prefix)]


SLOW = "i=0; while true; do echo s$i; i=$((i+1)); usleep 20000; done"
FAST_LINES = 200000
# 1000 lines, then (once the test has stopped the plugin) the rest at full speed.
FAST = ("seq 1 1000; n=0; while [ ! -e /tmp/go ] && [ $n -lt 900 ]; do usleep 100000; "
        "n=$((n+1)); done; seq 1001 %d" % FAST_LINES)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_plugin_restart_under_running_containers(restartable, collector, containers, signum):
    common = dict(driver=restartable.name, address=collector.address, detach=True,
                  opts=["zmq-framing=msgpack"])
    slow, _ = containers.run(SLOW, env=["SERVICE_ID=slow"], **common)
    fast, _ = containers.run(FAST, env=["SERVICE_ID=fast"], **common)
    collector.wait_records("default", "slow", lambda rs: len(rs) >= 50, "50 slow lines")
    collector.wait_records("default", "fast", lambda rs: len(rs) >= 1000, "1000 fast lines")
    # Stopped first, then the fast writer is let go: 1.3 MB against a 64 KiB pipe, so it is
    # surely blocked when the plugin goes. SIGTERM is handled once the plugin runs again.
    restartable.proc.send_signal(signal.SIGSTOP)
    try:
        docker("exec", fast, "touch", "/tmp/go")
        time.sleep(1)
        restartable.proc.send_signal(signum)
    finally:
        restartable.proc.send_signal(signal.SIGCONT)
    restartable.proc.wait(WAIT_S)
    time.sleep(2)       # no plugin for 2 s: the pipes and the engine's copiers hold the lines
    restartable.start()
    assert b"reattached 2 logging instance(s)" in restartable.log()
    # The fast writer was blocked on its full pipe; it goes on and ends.
    assert containers.wait(fast) == 0
    seen = len(collector.records("default", "slow"))
    collector.wait_records("default", "slow", lambda rs: len(rs) >= seen + 50,
                           "50 slow lines after the restart")
    docker("stop", "-t", "1", slow, timeout=WAIT_S)       # returns: nothing blocks the copier
    shown_fast = docker("logs", fast).stdout.split(b"\n")[:-1]
    shown_slow = docker("logs", slow).stdout.split(b"\n")[:-1]
    last_slow = int(shown_slow[-1][1:])
    expected = {"fast": list(range(1, FAST_LINES + 1)), "slow": list(range(last_slow + 1))}
    got = {}
    for service, prefix, last in (("fast", "", str(FAST_LINES)), ("slow", "s", "s%d" % last_slow)):
        wait_until(lambda service=service, last=last: any(
            r["line"] == last for r in collector.tail("default", service)),
            "the %s writer's last line" % service)
        got[service] = numbered(collector.records("default", service), prefix)
    if signum == signal.SIGTERM:
        # Every line, once, at the collector (two connections to it may interleave a little)
        # and in docker logs (the local copy went on in the same file).
        assert shown_fast == [b"%d" % i for i in expected["fast"]]
        assert shown_slow == [b"s%d" % i for i in expected["slow"]]
        for service in ("fast", "slow"):
            assert sorted(got[service]) == expected[service], service
    else:
        # Lost: what the killed process had read and not yet sent (and the entry it had half
        # read, missing from docker logs too). No duplicate; everything after the restart.
        for service in ("fast", "slow"):
            assert len(set(got[service])) == len(got[service]), service
            missing = sorted(set(expected[service]) - set(got[service]))
            assert len(missing) < len(expected[service]) // 4, missing[:20]
            print("SIGKILL, %s writer: %d of %d lines lost" % (service, len(missing),
                                                               len(expected[service])))
        assert len(shown_fast) >= FAST_LINES - 1


# -- fairness and a collector that comes back (issue 9, items 2 and 3) ---------------------------

@pytest.mark.parametrize("spool", ["off", "full"])
def test_a_blocking_container_beside_a_non_blocking_one_flows_when_the_collector_is_back(
        image, containers, spool):
    # The reproduction of issue 9 item 2, where the blocking container parks in the Supervisor:
    # without a spool, or with a spool that the non-blocking `yes` has filled.
    plugin = PluginProcess({"ZEROLINE_SPOOL": "off"} if spool == "off" else None)
    directory = tempfile.mkdtemp(prefix="zlc", dir="/tmp")
    address = "ipc://%s/c.ipc" % directory
    sink_opts = ["zmq-framing=msgpack"] + (["spool-max-size=16m"] if spool == "full" else [])
    collector = None
    try:
        plugin.start()
        blocking, _ = containers.run(
            "i=0; while true; do echo b$i; i=$((i+1)); usleep 2000; done", driver=plugin.name,
            address=address, detach=True, opts=sink_opts, env=["SERVICE_ID=blocking"])
        greedy, _ = containers.run("yes %s" % ("y" * 100), driver=plugin.name, address=address,
                                   detach=True, env=["SERVICE_ID=greedy"],
                                   opts=sink_opts + ["mode=non-blocking", "max-buffer-size=1m"])
        time.sleep(3)       # the collector is away: what holds lines fills up
        collector = Collector(directory)
        # Issue 9: 1 blocking line against 100 MB of the other one. Now it flows.
        records = collector.wait_records("default", "blocking", lambda rs: len(rs) >= 500,
                                         "500 lines of the blocking container")
        got = numbered(records, "b")
        assert got == list(range(len(got)))
        docker("stop", "-t", "2", blocking, timeout=WAIT_S)   # hang guard only
        docker("rm", "-f", greedy)
    finally:
        if collector is not None:
            collector.close()
        containers.remove_all()         # before the plugin goes: the engine waits for it
        plugin.close()


def test_a_blocking_container_without_a_collector_can_be_stopped_and_its_lines_come_later(
        plugin, containers):
    # Issue 9 item 4: the plugin's default spool keeps it reading while no collector is there,
    # so the engine's copier never blocks on the FIFO (it would hold docker stop, kill, logs).
    directory = tempfile.mkdtemp(prefix="zlc", dir="/tmp")
    address = "ipc://%s/c.ipc" % directory
    lines = 200000
    name, _ = containers.run("seq 1 %d; echo done; sleep 600" % lines, driver=plugin,
                             address=address, detach=True, opts=["zmq-framing=msgpack"],
                             env=["SERVICE_ID=later"])
    wait_until(lambda: docker("logs", "--tail", "1", name, timeout=WAIT_S).stdout == b"done\n",
               "every line read by the plugin (docker logs)")
    docker("stop", "-t", "2", name, timeout=WAIT_S)       # hang guard only
    collector = Collector(directory)
    try:
        wait_until(lambda: any(r["line"] == "done" for r in collector.tail("default", "later")),
                   "the spooled lines at the collector")
        got = [r["line"] for r in collector.records("default", "later")]
        assert got == [str(i) for i in range(1, lines + 1)] + ["done"]
    finally:
        collector.close()


# -- the managed (v2) plugin, built with no registry (scripts/build-managed-plugin.sh) -------------

MANAGED = "zeroline-managed"
BUILD_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "scripts", "build-managed-plugin.sh")


@pytest.fixture(scope="module")
def managed_plugin(image):
    """The managed plugin: the one CI built once (.ci/run), else built here (about 2 minutes
    the first time; the rootfs is cached in /var/cache/zeroline when that exists) and removed at
    the end."""
    enabled = docker("plugin", "inspect", "-f", "{{.Enabled}}", MANAGED, check=False)
    built_here = enabled.returncode != 0
    if built_here:
        done = subprocess.run(["bash", BUILD_SCRIPT, MANAGED], capture_output=True, timeout=1200,
                              check=False)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    elif enabled.stdout.strip() != b"true":
        docker("plugin", "enable", MANAGED)
    try:
        yield MANAGED
    finally:
        if built_here:
            subprocess.run(["bash", BUILD_SCRIPT, "--remove", MANAGED], timeout=120, check=False)


def test_the_managed_plugin_forwards_and_serves_docker_logs(managed_plugin, containers):
    # A managed plugin has its own mount namespace (host network): the collector is on TCP.
    collector = Collector(address="tcp://127.0.0.1:%d" % free_port())
    try:
        name, _ = containers.run(MIXED, driver=managed_plugin, address=collector.address,
                                 opts=["zmq-framing=msgpack"], env=["SERVICE_ID=managed"])
        reference, _ = containers.run(MIXED, driver="json-file")
        assert docker("logs", name).stdout == docker("logs", reference).stdout
        records = collector.wait_records("default", "managed",
                                         lambda rs: any(r["line"] == "unterminated" for r in rs),
                                         "the managed plugin's lines")
        assert [r["line"] for r in records if r["source"] == "stdout"][:2] == [
            "plain", "tab\there\r"]
        assert [r["line"] for r in records if r["source"] == "stderr"] == ["to-stderr"]
        assert records[-1]["partial"]["last"] is True       # the group closed at EOF
    finally:
        collector.close()
